"""Engine and session factory. SQLite gets WAL, a busy timeout and foreign keys.

The schema is created and upgraded by Alembic (``upgrade``), never by ``create_all``, so a
database made by an older version is migrated in place: one migrator at a time, after a
snapshot, in one transaction with its DDL.
"""
from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # first: the next one may wait
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, far fewer fsyncs
    cur.close()


def make_engine(url: str) -> Engine:
    """Create an engine for any SQLAlchemy URL; SQLite files get their folder and pragmas.

    Args:
        url: e.g. ``sqlite:///~/.cxr/cxr.db`` or ``postgresql+psycopg://user@host/cxr``.

    Returns:
        The engine (callers cache one per process).
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000,
                                                  "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


MIGRATION_LOCK_KEY = 4_211_837_113  # pg_advisory_lock key of the migrator


def _config(revision_dir: Path | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(revision_dir or MIGRATIONS))
    return cfg


def head_revision(revision_dir: Path | None = None) -> str | None:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config(revision_dir)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision a database is at (None: no schema yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _sqlite_path(engine: Engine) -> Path | None:
    db = engine.url.database
    return Path(db) if engine.dialect.name == "sqlite" and db and db != ":memory:" else None


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """One migrator at a time: a file lock beside a SQLite file, a session advisory lock on
    PostgreSQL. The app, every worker and the CLI migrate on open; the others wait here."""
    path = _sqlite_path(engine)
    if path is not None:
        with open(path.with_name(path.name + ".migrate.lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
            conn.commit()
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
                conn.commit()
        return
    yield


def _transactional_sqlite(engine: Engine) -> Engine:
    """An engine on the same SQLite file whose transactions also hold DDL: pysqlite sends no
    BEGIN before a CREATE or ALTER, so a failed migration would keep half its changes. Its
    own transaction handling is turned off and every transaction starts with BEGIN IMMEDIATE
    (the SQLAlchemy pysqlite recipe)."""
    eng = create_engine(engine.url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000,
                                                  "check_same_thread": False})

    @event.listens_for(eng, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None
        _sqlite_pragmas(dbapi_conn, _record)

    @event.listens_for(eng, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return eng


def snapshot(engine: Engine, out: Path) -> Path | None:
    """A consistent copy of the database at ``out``: ``VACUUM INTO`` on SQLite, ``pg_dump``
    (custom format) on PostgreSQL when it is on PATH. Returns the file, or None when no copy
    could be made (then the command to run is logged)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if _sqlite_path(engine) is not None:
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM INTO ?", (str(out),))
        return out
    if engine.dialect.name == "postgresql":
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        tool = shutil.which("pg_dump")
        if tool is None:
            log.warning("no pg_dump on PATH: back up the database yourself before migrating: "
                        "pg_dump --format=custom --file %s '%s'", out,
                        engine.url.set(drivername="postgresql"))
            return None
        subprocess.run([tool, "--format=custom", "--file", str(out), url], check=True,
                       capture_output=True)
        return out
    return None


def upgrade(engine: Engine, revision: str = "head", *, backup_dir: Path | None = None,
            revision_dir: Path | None = None) -> Path | None:
    """Bring the schema to ``revision`` with Alembic (idempotent), safely.

    Serialized (:func:`migration_lock`); a database that has a schema is first copied to
    ``backup_dir`` (default: ``backups/`` beside a SQLite file; PostgreSQL needs it given);
    the migration runs in one transaction, DDL included (SQLite: :func:`_transactional_sqlite`),
    so a failed migration leaves the database as it was.

    SQLite: migrations that recreate a table (batch mode) run with foreign keys off, as
    SQLite's own ALTER TABLE procedure prescribes: with them on, dropping the old copy of a
    table runs an implicit DELETE that would fire ON DELETE actions or fail on self-references.
    ``PRAGMA foreign_key_check`` must then come back empty before the migration commits.

    Returns:
        The snapshot taken before upgrading, or None (nothing to upgrade, a fresh database,
        or no way to copy one).
    """
    from alembic import command

    target = head_revision(revision_dir) if revision == "head" else revision
    if current_revision(engine) == target:
        return None  # the common case, without waiting for the lock
    with migration_lock(engine):
        current = current_revision(engine)
        if current == target:
            return None  # another process migrated while this one waited
        taken = None
        if current is not None:
            where = backup_dir or (_sqlite_path(engine).parent / "backups"
                                   if _sqlite_path(engine) else None)
            if where is not None:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                suffix = ".db" if _sqlite_path(engine) else ".pgdump"
                taken = snapshot(engine, where / f"before-{target}-from-{current}-{stamp}{suffix}")
        cfg = _config(revision_dir)
        sqlite = engine.dialect.name == "sqlite"
        mig = _transactional_sqlite(engine) if sqlite else engine
        try:
            with mig.connect() as conn:
                raw = conn.connection.driver_connection if sqlite else None
                if raw is not None:  # outside any transaction (autocommit), or it is a no-op
                    raw.execute("PRAGMA foreign_keys=OFF")
                with conn.begin():
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, revision)
                    if sqlite:
                        bad = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if bad:
                            raise RuntimeError(f"migration to {revision} left foreign-key "
                                               f"violations (rolled back): {bad[:5]}")
                if raw is not None:
                    raw.execute("PRAGMA foreign_keys=ON")
        finally:
            if mig is not engine:
                mig.dispose()
        return taken


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
