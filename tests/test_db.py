"""Database: Alembic migrations, SQLite pragmas, URLs, retries."""
from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

from cxr_core.config import get_settings
from cxr_core.storage import open_db, retrying
from db.models import Base


def test_migrations_create_every_table_and_are_idempotent(cxr_home):
    db = open_db()
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables and "alembic_version" in tables
    open_db()  # second upgrade is a no-op
    with db.engine.connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar() is not None


def test_sqlite_wal_and_busy_timeout(cxr_home):
    db = open_db()
    with db.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA busy_timeout")).scalar() >= 10_000
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_settings_from_env(cxr_home, monkeypatch, tmp_path):
    assert get_settings().db_url == f"sqlite:///{cxr_home / 'cxr.db'}"
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.setenv("CXR_DATA_DIR", f"/a:/b")
    s = get_settings()
    assert s.db_url.endswith("other.db") and [str(p) for p in s.data_dirs] == ["/a", "/b"]


def test_postgres_url_builds_engine_without_connecting():
    from db.engine import make_engine

    pytest.importorskip("psycopg2", reason="PostgreSQL driver not installed")
    engine = make_engine("postgresql+psycopg2://u:p@localhost:1/cxr")
    assert engine.dialect.name == "postgresql"


def test_retrying_retries_locks_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("insert", {}, Exception("database is locked"))
        return "ok"

    assert retrying(flaky) == "ok" and len(calls) == 3
    with pytest.raises(OperationalError):
        retrying(lambda: (_ for _ in ()).throw(OperationalError("x", {}, Exception("syntax"))))
