"""The same storage code on PostgreSQL (CXR_TEST_PG_URL; CI starts a local server)."""
from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text

from cxr_core.indexing import index_dataset, open_dataset
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
