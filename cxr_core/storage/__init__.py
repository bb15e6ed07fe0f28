"""The ONE place that talks to the database (a package: one module per area).

Functions take a keyword-only ``session`` and return dataclasses, never ORM rows; the caller
owns one transaction per user action (``with db.session() as s: ...``). Writers that may meet
concurrent writers (relabels, run state) go through :func:`retrying` for SQLite's
``database is locked``.

May import :mod:`cxr_core.core` and :mod:`db` (the ORM models, engine and migrations) only.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cxr_core.core.settings import Settings, get_settings

T = TypeVar("T")

# A hook run in a write's own transaction, after its writer: ``hook(session, result)``. An
# action's audit row goes in this way, so the action and its row commit (or roll back) together.
AndThen = Callable[[Session, Any], object]

# The base of every error a database call can raise (driver and ORM errors alike). Code outside
# storage that survives a failed call (the worker's heartbeat retries at the next beat) catches
# this, so it need not import SQLAlchemy.
StorageError = SQLAlchemyError


@dataclass
class Database:
    """An engine with its session factory; one per process (the app caches it)."""

    engine: Engine
    factory: sessionmaker[Session]
    url: str

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error."""
        with self.factory.begin() as s:
            yield s

    def write(self, fn: Callable[[Session], T], *, attempts: int = 8,
              and_then: AndThen | None = None) -> T:
        """Run ``fn(session)`` in its own short transaction, retrying lock errors.

        ``and_then(session, result)``, when given, runs in the same transaction right after
        ``fn`` (an action's audit row): an error in either rolls both back, and a retry after a
        lock error runs both again.
        """
        return retrying(lambda: self._once(fn, and_then), attempts=attempts)

    def _once(self, fn: Callable[[Session], T], and_then: AndThen | None = None) -> T:
        with self.session() as s:
            out = fn(s)
            if and_then is not None:
                and_then(s, out)
            return out


def retrying(fn: Callable[[], T], *, attempts: int = 8) -> T:
    """Call ``fn`` again (jittered back-off) when the DB reports a lock or busy error."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            msg = str(exc).lower()
            if attempt == attempts - 1 or not ("locked" in msg or "busy" in msg):
                raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


_PG_WRITE_LOCK = 0x637872  # "cxr": the advisory lock key of read-then-write sections


def lock_for_write(session: Session) -> None:
    """Serialise a read-then-write section (a relabel reads the label it replaces).

    SQLite: take the write lock now (``BEGIN IMMEDIATE``) unless a transaction is open.
    pysqlite starts a transaction only at the first INSERT/UPDATE, so the reads a write depends
    on would run before it, outside any transaction: another process could commit in between
    and the row would record a stale value. The busy timeout makes other writers wait.

    PostgreSQL: READ COMMITTED lets two transactions read the same "current" label, so take a
    transaction-scoped advisory lock (released at commit or rollback). Ids are then also
    drawn from the sequence in commit order, which the "labels as of relabel id" replay needs.
    """
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        if not conn.connection.dbapi_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")


def open_db(settings: Settings | None = None, *, url: str | None = None) -> Database:
    """Open (and migrate to the newest schema) the configured database.

    Args:
        settings: defaults to :func:`cxr_core.core.settings.get_settings`.
        url: overrides the settings' URL.

    Returns:
        A ready database.
    """
    from db.engine import make_engine, session_factory, upgrade

    url = url or (settings or get_settings()).db_url
    engine = make_engine(url)
    upgrade(engine)
    return Database(engine, session_factory(engine), url)


def snapshot(db: Database, out: Path) -> Path | None:
    """A consistent copy of the database at ``out`` (SQLite ``VACUUM INTO``; PostgreSQL
    ``pg_dump`` when it is on PATH, else None and the command is logged)."""
    from db.engine import snapshot as engine_snapshot

    return engine_snapshot(db.engine, Path(out))


def schema_revision(db: Database) -> str | None:
    """The migration revision the database is at."""
    from db.engine import current_revision

    return current_revision(db.engine)
