"""Engine and session factory. SQLite gets WAL, a busy timeout and foreign keys.

The schema is created and upgraded by Alembic (``upgrade``), never by ``create_all``, so a
database made by an older version is migrated in place.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
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


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (idempotent).

    SQLite: migrations that recreate a table (batch mode) run with foreign keys off, as
    SQLite's own ALTER TABLE procedure prescribes: with them on, dropping the old copy of a
    table runs an implicit DELETE that would fire ON DELETE actions or fail on self-references.
    ``PRAGMA foreign_key_check`` must then come back empty before the migration commits.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction
            conn.commit()
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                if sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if bad:
                        raise RuntimeError(f"migration to {revision} left foreign-key "
                                           f"violations (rolled back): {bad[:5]}")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
