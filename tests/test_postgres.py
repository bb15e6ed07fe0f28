"""The same storage code on PostgreSQL (CXR_TEST_PG_URL; CI starts a local server)."""
from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text

from cxr_core.data.indexing import index_dataset, open_dataset
from cxr_core.storage import open_db

PG_URL = os.environ.get("CXR_TEST_PG_URL")


@pytest.fixture()
def pg_url():
    if not PG_URL:
        if os.environ.get("CXR_REQUIRE_PG") == "1":
            pytest.fail("CXR_TEST_PG_URL is required in CI")
        pytest.skip("set CXR_TEST_PG_URL=postgresql+psycopg2://... to run PostgreSQL tests")
    engine = create_engine(PG_URL)
    with engine.begin() as c:  # a clean schema per test
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


def test_migrate_index_and_reopen_on_postgres(pg_url, tiny_dataset, cxr_home):
    db = open_db(url=pg_url)
    rep = index_dataset(db, tiny_dataset, name="tiny")
    assert rep.summary["images"] == 18
    again = index_dataset(open_db(url=pg_url), tiny_dataset, name="tiny")
    assert again.scanned == 0 and again.unchanged == 18
    _, recs = open_dataset(db, "tiny")
    assert len(recs) == 18 and all(r.sha256 and r.width == 32 for r in recs)
    assert {r.patient for r in recs} >= {"person1", "0001", "NORMAL2-0003"}
    db.engine.dispose()


def test_four_concurrent_reviewers_keep_the_old_label_chain_on_postgres(pg_url, tmp_path,
                                                                         cxr_home, monkeypatch):
    # READ COMMITTED alone let two writers read the same "current" label; the advisory lock
    # in storage.lock_for_write makes every row's old label the one its predecessor set.
    import multiprocessing as mp
    import sys
    import types
    from collections import defaultdict

    import numpy as np
    from PIL import Image

    import test_review_concurrency as rc
    from cxr_core.storage import relabels as store

    root = tmp_path / "ds" / "train" / "NORMAL"
    root.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((16, 16), k * 40, np.uint8)).save(root / f"IM-{k:04d}-0001.png")
    db = open_db(url=pg_url)
    dataset_id = index_dataset(db, tmp_path / "ds", name="pgconc").dataset_id
    with db.session() as s:
        originals = store.original_labels(session=s, dataset_id=dataset_id)
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(5), ctx.Queue()
    worker = rc._spawnable_worker(monkeypatch)
    procs = [ctx.Process(target=worker, args=(str(cxr_home), dataset_id, f"r{i}", start, out,
                                              sorted(originals), 60, pg_url))
             for i in range(4)]
    rc.run_writers(procs, out, lambda: start.wait(timeout=180))
    with db.session() as s:
        rows = store.list_relabels(session=s, dataset_id=dataset_id)
    assert len(rows) == 240
    chains = defaultdict(list)
    for r in rows:  # list_relabels is in id order
        chains[r.image_id].append(r)
    for image_id, label in originals.items():
        previous = label
        for r in chains[image_id]:
            assert (r.old_label, r.old_subtype) == previous, (image_id, r.id)
            previous = (r.new_label, r.new_subtype)
    db.engine.dispose()


def test_audit_log_is_append_only_on_postgres(pg_url, cxr_home):
    from sqlalchemy.exc import DBAPIError

    from cxr_core.auth import admin as auth_admin
    from cxr_core.auth import gate as actions
    from cxr_core.auth import policy

    db = open_db(url=pg_url)
    admin = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
    actions.record(db, admin, "manage_roles", "x@h.org")
    for sql in ("UPDATE audit_events SET actor = 'someone-else'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"):
            with db.session() as s:
                s.execute(text(sql))
    assert [e.actor for e in auth_admin.audit_log(db, admin)] == ["lead@h.org"]
