"""The hyperparameter studies' Optuna store: where it is, and opening it.

Optuna's RDB storage keeps its own schema version in an ``alembic_version`` table, the table
the app's Alembic uses, so the two never share one SQLite file or one PostgreSQL schema:

* ``CXR_OPTUNA_URL`` when set (any SQLAlchemy URL Optuna accepts; refused when it is the app's
  own database without another schema);
* else, beside a SQLite app database: ``$CXR_HOME/optuna.db``;
* else, on PostgreSQL: the same database, schema ``optuna`` (``search_path`` set per
  connection; the schema is created on first use). A ``pg_dump`` of the app database then
  holds it too.

Opening is a context manager that disposes the store's engine after use, so a worker or a page
holds no connection between studies' turns.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cxr_core.core.errors import ConfigError
from cxr_core.core.settings import Settings, get_settings

OPTUNA_FILE = "optuna.db"
OPTUNA_SCHEMA = "optuna"
SQLITE_TIMEOUT_S = 60  # Optuna's writes wait this long for another process's lock


def store_url(settings: Settings | None = None) -> str:
    """The Optuna store's SQLAlchemy URL for these settings (see the module docstring).

    Raises:
        ConfigError: ``CXR_OPTUNA_URL`` is the app's own database (same file, or same
            PostgreSQL database and schema).
    """
    settings = settings or get_settings()
    app = make_url(settings.db_url)
    if settings.optuna_url:
        url = settings.optuna_url
        if _same_place(make_url(url), app):
            raise ConfigError("CXR_OPTUNA_URL must not be the app's own database: Optuna keeps "
                              "its own alembic_version table. Use another SQLite file, another "
                              "PostgreSQL database, or options=-csearch_path=SCHEMA. Received: "
                              f"{make_url(url).render_as_string(hide_password=True)}")
        return url
    if app.get_backend_name() == "sqlite":
        return f"sqlite:///{settings.home / OPTUNA_FILE}"
    return app.update_query_dict({"options": f"-csearch_path={OPTUNA_SCHEMA}"}).render_as_string(
        hide_password=False)


def _schema(url) -> str | None:
    opts = url.query.get("options") or ""
    for part in str(opts).replace("-c ", "-c").split():
        if part.startswith("-csearch_path="):
            return part.split("=", 1)[1].split(",")[0]
    return None


def _same_place(a, b) -> bool:
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return Path(a.database or "").resolve() == Path(b.database or "").resolve()
    return ((a.host, a.port, a.database) == (b.host, b.port, b.database)
            and (_schema(a) or "public") == (_schema(b) or "public"))


def redacted(url: str) -> str:
    """The URL with its password left out (what the app stores and shows)."""
    return make_url(url).render_as_string(hide_password=True)


def _engine_kwargs(url: str) -> dict:
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def ensure_schema(url: str) -> None:
    """Create the PostgreSQL schema the URL's ``search_path`` names, if missing."""
    parsed = make_url(url)
    schema = _schema(parsed)
    if parsed.get_backend_name() != "postgresql" or not schema:
        return
    plain = parsed.difference_update_query(["options"])
    engine = create_engine(plain)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    finally:
        engine.dispose()


@contextmanager
def optuna_storage(url: str | None = None) -> Iterator[object]:
    """An ``optuna.storages.RDBStorage`` on the store (created on first use), disposed after.

    Args:
        url: the store; None: :func:`store_url` of the current settings.
    """
    import optuna

    url = url or store_url()
    ensure_schema(url)
    storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    try:
        yield storage
    finally:
        storage.engine.dispose()


def in_app_dump(settings: Settings | None = None) -> bool:
    """Whether a ``pg_dump`` of the app database already holds the store (same database)."""
    settings = settings or get_settings()
    a, b = make_url(store_url(settings)), make_url(settings.db_url)
    return (a.get_backend_name() == b.get_backend_name() == "postgresql"
            and (a.host, a.port, a.database) == (b.host, b.port, b.database))


def snapshot(out: Path, settings: Settings | None = None) -> Path | None:
    """A consistent copy of the store at ``out`` (SQLite ``VACUUM INTO``; another PostgreSQL
    database ``pg_dump``); None when there is no store yet, or it is inside the app
    database's dump (:func:`in_app_dump`)."""
    from db.engine import snapshot as engine_snapshot

    settings = settings or get_settings()
    url = store_url(settings)
    parsed = make_url(url)
    if in_app_dump(settings):
        return None
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return None
    engine = create_engine(url)
    try:
        return engine_snapshot(engine, Path(out))
    finally:
        engine.dispose()


def restore_file(src: Path, settings: Settings | None = None, *, stamp: str) -> bool:
    """Put a backed-up SQLite store back (the replaced one kept, renamed); False when the
    store is not a SQLite file here."""
    import shutil

    settings = settings or get_settings()
    parsed = make_url(store_url(settings))
    if parsed.get_backend_name() != "sqlite":
        return False
    target = Path(parsed.database)
    target.parent.mkdir(parents=True, exist_ok=True)
    for part in (target, target.with_name(target.name + "-wal"),
                 target.with_name(target.name + "-shm")):
        if part.exists():
            part.rename(part.with_name(f"{part.name}.before-restore-{stamp}"))
    shutil.copyfile(src, target)
    return True
