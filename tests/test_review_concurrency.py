"""Four processes writing 250 relabels each against one SQLite DB lose nothing and raise nothing."""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import sys
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_core.review import queues as review
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage import relabels as store

N_PROCS, N_EACH = 4, 250


def _worker(home: str, dataset_id: int, reviewer: str, start, out,
            ids: list[int] | None = None, n_each: int = N_EACH, db_url: str | None = None) -> None:
    """One reviewer process: its own engine (open_db), one short transaction per relabel.

    It relabels ``ids`` (default: every image of the dataset) in turn, ``n_each`` times in all,
    on ``db_url`` (default: the SQLite DB under ``home``).
    """
    os.environ["CXR_HOME"] = home
    os.environ.pop("CXR_DB_URL", None)
    db = open_db(url=db_url) if db_url else open_db()
    if ids is None:
        with db.session() as s:
            ids = sorted(store.original_labels(session=s, dataset_id=dataset_id))
    choices = [review.LabelChoice("NORMAL", None), review.LabelChoice("PNEUMONIA", "virus")]
    start.wait()  # all processes write at the same time
    written, errors = [], []
    for n in range(n_each):
        try:
            written.append(review.submit_relabel(db, image_id=ids[n % len(ids)],
                                                 choice=choices[n % 2], reviewer=reviewer,
                                                 note=f"{reviewer} {n}"))
        except Exception as exc:  # the test reports any error a user would have seen
            errors.append(f"{type(exc).__name__}: {exc}")
    db.engine.dispose()
    out.put((reviewer, written, errors))


def _spawnable_worker(monkeypatch):
    """``_worker`` under an importable module name: spawned children import it by name, and
    ``tests`` itself is shadowed by a site-packages package in some environments."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return importlib.import_module(Path(__file__).stem)._worker


def _collect(procs, out) -> list:
    """Results of every process; fails fast (no long timeout) when a process dies."""
    results, deadline = [], time.monotonic() + 600  # generous: CI machines may be loaded
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            results.append(out.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a writer process died with exit code {dead}"
    return results


def run_writers(procs, out, release) -> list:
    """Starts the writer processes, lets them go at once with ``release()`` and returns each
    one's ``(reviewer, written ids, errors)``; fails on a dead process or any writer error."""
    for p in procs:
        p.start()
    release()
    results = _collect(procs, out)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(results) == len(procs)
    assert [e for _, _, e in results if e] == []
    return results


def test_four_processes_250_relabels_each(cxr_home, tmp_path, monkeypatch):
    root = tmp_path / "ds" / "train" / "NORMAL"
    root.mkdir(parents=True)
    for k in range(8):
        Image.fromarray(np.full((16, 16), k * 20, np.uint8)).save(root / f"IM-{k:04d}-0001.png")
    db = open_db()  # migrate once before the workers start
    dataset_id = index_dataset(db, tmp_path / "ds", name="conc").dataset_id
    # Spawned children re-run the parent's __main__ file; after AppTests that is a page script
    # (Streamlit's test harness leaves it there), so give them an empty __main__ instead.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    worker = _spawnable_worker(monkeypatch)
    procs = [ctx.Process(target=worker, args=(str(cxr_home), dataset_id, f"r{i}", start, out))
             for i in range(N_PROCS)]
    t0 = time.perf_counter()
    results = run_writers(procs, out, start.set)
    print(f"{N_PROCS} x {N_EACH} relabels in {time.perf_counter() - t0:.1f} s (process start "
          "included)")
    assert len(results) == N_PROCS
    written = sorted(i for _, w, _ in results for i in w)
    assert len(written) == N_PROCS * N_EACH == len(set(written))
    with db.session() as s:
        rows = store.list_relabels(session=s, dataset_id=dataset_id)
    assert sorted(r.id for r in rows) == written
    for reviewer, _, _ in results:
        notes = sorted(int(r.note.split()[1]) for r in rows if r.reviewer == reviewer)
        assert notes == list(range(N_EACH))
