"""Migrations are serialized and safe (issue 26 item 4): many processes opening a fresh home
at once all succeed; a failed migration leaves the database as it was (DDL included, SQLite
too); a snapshot is taken before upgrading a database that has a schema."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core.storage import open_db
from db.engine import MIGRATIONS, current_revision, head_revision, make_engine, upgrade

REPO = Path(__file__).resolve().parents[1]
FAILING = '''"""a migration that fails half-way (tests)"""
from alembic import op
import sqlalchemy as sa

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    op.add_column("datasets", sa.Column("half_col", sa.Integer(), nullable=True))
    raise RuntimeError("the migration fails after its first statements")


def downgrade() -> None:
    pass
'''


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path, cxr_home):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh' / 'cxr.db'}"
    return request.getfixturevalue("pg_url")


def test_many_processes_opening_a_fresh_home_at_once_all_succeed(url, tmp_path):
    code = ("import sys; from cxr_core.storage import open_db; "
            "db = open_db(url=sys.argv[1]); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-500:] for _, e in outs]
    assert current_revision(make_engine(url)) == head_revision()


def test_a_failed_migration_leaves_the_database_as_it_was(url, tmp_path):
    db = open_db(url=url)  # at head
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO datasets (name, root, layout, classes_json, external, "
                          "created_at) VALUES ('kept', '/x', 'classes', '[]', false, "
                          "CURRENT_TIMESTAMP)"))
    head = head_revision()
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, scripts)
    (scripts / "versions" / "9999_fails.py").write_text(FAILING.format(head=head))
    with pytest.raises(RuntimeError, match="fails after its first statements"):
        upgrade(db.engine, revision_dir=scripts, backup_dir=tmp_path / "backups")
    assert current_revision(db.engine) == head
    tables = set(inspect(db.engine).get_table_names())
    columns = {c["name"] for c in inspect(db.engine).get_columns("datasets")}
    assert "half_done" not in tables and "half_col" not in columns
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM datasets")).scalars().all() == ["kept"]


def test_an_older_database_is_copied_before_it_is_upgraded(tmp_path, cxr_home):
    url = f"sqlite:///{tmp_path / 'old' / 'cxr.db'}"
    engine = make_engine(url)
    assert upgrade(engine, "0009") is None  # a fresh database: nothing to copy
    copy = upgrade(engine)
    assert copy is not None and copy.parent == tmp_path / "old" / "backups"
    assert copy.name.startswith(f"before-{head_revision()}-from-0009-")
    assert current_revision(make_engine(f"sqlite:///{copy}")) == "0009"
    assert current_revision(engine) == head_revision()
    assert upgrade(engine) is None  # at head: no copy, no lock taken


def test_postgresql_gets_a_pg_dump_before_upgrading(pg_url, tmp_path):  # noqa: F811
    if shutil.which("pg_dump") is None:
        pytest.skip("pg_dump is not on PATH")
    engine = make_engine(pg_url)
    upgrade(engine, "0009")
    copy = upgrade(engine, backup_dir=tmp_path / "pg")
    assert copy is not None and copy.stat().st_size > 0


# -- Backup and restore -------------------------------------------------------------------------

def test_backup_and_restore_bring_back_the_database_the_salt_and_the_artifacts(cxr_home,
                                                                                tmp_path,
                                                                                tiny_dataset,
                                                                                capsys):
    import json
    import os

    from cxr_core.cli import main
    from cxr_core.core.settings import patient_salt
    from cxr_core.data.indexing import index_dataset, list_datasets

    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    db.engine.dispose()  # the app and its workers are stopped for a restore
    salt = patient_salt()
    run_folder = cxr_home / "runs" / "1"
    run_folder.mkdir(parents=True)
    (run_folder / "model_card.json").write_text("{}")
    assert main(["backup", "--out", str(tmp_path / "bk"), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["database"] == "database.db" and made["salt"] == "patient_salt"
    assert made["artifacts"] == ["runs"] and made["schema_revision"] == head_revision()
    assert oct((tmp_path / "bk" / "patient_salt").stat().st_mode & 0o777) == "0o600"
    assert main(["backup", "--out", str(tmp_path / "bk"), "--json"]) == 2  # not empty
    assert "new or empty" in capsys.readouterr().err

    # A new machine: an empty home.
    new_home = tmp_path / "new_home"
    os.environ["CXR_HOME"] = str(new_home)
    assert main(["restore", "--from", str(tmp_path / "bk"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["restored"] == ["database", "patient_salt", "runs"]
    restored = open_db()
    assert [d.name for d in list_datasets(restored)] == ["tiny"]
    restored.engine.dispose()
    assert patient_salt() == salt
    assert (new_home / "runs" / "1" / "model_card.json").is_file()
    assert main(["restore", "--from", str(tmp_path / "bk"), "--json"]) == 2  # a database exists
    assert "restore with --force" in capsys.readouterr().err
    assert main(["restore", "--from", str(tmp_path / "bk"), "--force", "--json"]) == 0
    kept = list(new_home.glob("cxr.db.before-restore-*"))
    assert kept  # the replaced database is kept beside, never deleted


# -- The patient salt cannot drift (issue 26 item 5) -------------------------------------------

def test_indexing_refuses_a_salt_other_than_the_one_the_database_was_made_with(
        cxr_home, tiny_dataset, monkeypatch):
    from cxr_core.core.errors import DatasetError
    from cxr_core.data.indexing import index_dataset

    db = open_db()
    monkeypatch.setenv("CXR_PATIENT_SALT", "first secret")
    index_dataset(db, tiny_dataset, name="tiny")
    monkeypatch.setenv("CXR_PATIENT_SALT", "another secret")  # a second host, a wiped home
    with pytest.raises(DatasetError, match="patient salt differs") as info:
        index_dataset(db, tiny_dataset, name="tiny")
    assert "another secret" not in str(info.value) and "restore" in str(info.value)
    monkeypatch.setenv("CXR_PATIENT_SALT", "first secret")
    index_dataset(db, tiny_dataset, name="tiny")  # the right one again: fine


def test_a_shared_database_needs_an_explicit_salt(cxr_home, monkeypatch):
    from cxr_core.core.errors import ConfigError
    from cxr_core.core.settings import patient_salt

    monkeypatch.delenv("CXR_PATIENT_SALT", raising=False)
    monkeypatch.setenv("CXR_DB_URL", "postgresql+psycopg2://cxr@db.example.org/cxr")
    with pytest.raises(ConfigError, match="CXR_PATIENT_SALT is required"):
        patient_salt()
    monkeypatch.setenv("CXR_PATIENT_SALT", "shared secret")
    assert patient_salt() == "shared secret"
