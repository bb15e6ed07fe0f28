"""Four reviewer processes relabel the same and different images at once (issue 8): no relabel
is lost, and the current labels derived from the append-only history are right.

Reuses the writer process of tests/test_review_concurrency.py (``_worker``): each process has
its own engine and writes one short transaction per relabel, all starting together.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import types
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

import test_review_concurrency as rc
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import relabels as store

pytestmark = pytest.mark.robustness
N_PROCS, N_EACH, SHARED, PRIVATE = 4, 90, 2, 1


def test_four_reviewers_relabel_shared_and_own_images_at_once(db, robust_home, tmp_path,
                                                              monkeypatch, stored_intact):
    root = tmp_path / "reviewers" / "train" / "NORMAL"
    root.mkdir(parents=True)
    for k in range(SHARED + N_PROCS * PRIVATE):
        Image.fromarray(np.full((16, 16), k * 15, np.uint8)).save(root / f"IM-{k:04d}-0001.png")
    dataset_id = index_dataset(db, tmp_path / "reviewers", name="reviewers").dataset_id
    with db.session() as s:
        originals = store.original_labels(session=s, dataset_id=dataset_id)
    ids = sorted(originals)
    shared = ids[:SHARED]
    own = {f"r{i}": ids[SHARED + i * PRIVATE:SHARED + (i + 1) * PRIVATE] for i in range(N_PROCS)}

    # As in test_review_concurrency: spawned children must not re-run a page script as __main__.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    ctx = mp.get_context("spawn")
    # A barrier as the start signal: the worker's start.wait() returns only once all four
    # processes (spawned: each imports the package first) and this one are there.
    start, out = ctx.Barrier(N_PROCS + 1), ctx.Queue()
    worker = rc._spawnable_worker(monkeypatch)
    procs = [ctx.Process(target=worker, args=(str(robust_home), dataset_id, name, start, out,
                                              shared + mine, N_EACH))
             for name, mine in own.items()]
    results = rc.run_writers(procs, out, lambda: start.wait(timeout=180))
    assert len(results) == N_PROCS

    # No lost relabel: every acknowledged id is a stored row, and nothing else is.
    written = sorted(i for _, w, _ in results for i in w)
    assert len(written) == len(set(written)) == N_PROCS * N_EACH
    with db.session() as s:
        rows = store.list_relabels(session=s, dataset_id=dataset_id)
        current = store.current_labels(session=s, dataset_id=dataset_id)
    assert [r.id for r in rows] == written
    per_image = Counter(r.image_id for r in rows)
    cycle = SHARED + PRIVATE  # each reviewer goes round its images N_EACH / cycle times
    assert all(per_image[i] == N_PROCS * N_EACH // cycle for i in shared)
    for name, mine in own.items():
        assert all(per_image[i] == N_EACH // cycle for i in mine)
        assert {r.reviewer for r in rows if r.image_id in mine} == {name}
        notes = sorted(int(r.note.split()[1]) for r in rows if r.reviewer == name)
        assert notes == list(range(N_EACH))

    # Current labels: each image's newest row (highest id), and each row's "old" label is the
    # one its predecessor set, i.e. every writer saw the relabel committed just before its own.
    history: dict[int, list] = defaultdict(list)
    for r in rows:
        history[r.image_id].append(r)
    for image_id, label in originals.items():
        chain = history[image_id]
        assert current[image_id] == (chain[-1].new_label, chain[-1].new_subtype)
        previous = label
        for r in chain:
            assert (r.old_label, r.old_subtype) == previous, (image_id, r)
            previous = (r.new_label, r.new_subtype)
