"""Database: Alembic migrations, SQLite pragmas, URLs, retries."""
from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

from cxr_core.core.settings import get_settings
from cxr_core.storage import open_db, retrying
from db.models import Base


def test_migrations_create_every_table_and_are_idempotent(cxr_home):
    db = open_db()
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables and "alembic_version" in tables
    open_db()  # second upgrade is a no-op
    with db.engine.connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar() is not None


def test_open_db_reaches_head(cxr_home):
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from db.engine import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    db = open_db()
    with db.engine.connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar() == head
    cols = {c["name"]: c for c in inspect(db.engine).get_columns("relabels")}
    assert cols["image_id"]["nullable"] and cols["upload_sha256"]["nullable"]
    assert "ix_relabels_upload_sha256" in {i["name"] for i in inspect(db.engine).get_indexes(
        "relabels")}


def _downgrade(engine, revision):
    """db.engine has only upgrade(); alembic's downgrade on the same connection handover."""
    from alembic import command
    from alembic.config import Config

    from db.engine import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_upload_relabels_migration_keeps_rows_and_downgrades(tmp_path):
    from db.engine import make_engine, upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0001")
    with engine.begin() as c:  # a database as 0001 left it, with one relabel
        c.execute(text("INSERT INTO datasets (name, root, layout, classes_json, created_at) "
                       "VALUES ('d', '/d', 'folders', '[]', '2026-01-01')"))
        c.execute(text("INSERT INTO images (dataset_id, relpath, split, label) "
                       "VALUES (1, 'train/NORMAL/a.png', 'train', 'NORMAL')"))
        c.execute(text("INSERT INTO relabels (image_id, old_label, new_label, reviewer, note, "
                       "created_at) VALUES (1, 'NORMAL', 'PNEUMONIA', 'alice', 'n', '2026-01-02')"))
    upgrade(engine)
    with engine.begin() as c:
        assert c.execute(text("SELECT id, image_id, new_label, reviewer, upload_sha256 "
                              "FROM relabels")).all() == [(1, 1, "PNEUMONIA", "alice", None)]
        c.execute(text("INSERT INTO relabels (upload_sha256, old_label, new_label, reviewer, "
                       "note, created_at) VALUES ('ab', 'NORMAL', 'NORMAL', 'bob', '', "
                       "'2026-01-03')"))
    _downgrade(engine, "0001")  # upload rows cannot exist at 0001: dropped
    cols = {c["name"]: c for c in inspect(engine).get_columns("relabels")}
    assert "upload_sha256" not in cols and not cols["image_id"]["nullable"]
    with engine.connect() as c:
        assert c.execute(text("SELECT id, image_id FROM relabels")).all() == [(1, 1)]
    engine.dispose()


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
