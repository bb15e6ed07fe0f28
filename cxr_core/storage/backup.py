"""Back up and restore everything the app keeps: ``python -m cxr_core backup --out PATH`` and
``python -m cxr_core restore --from PATH``.

A backup is a folder: the database (``database.db`` from SQLite's ``VACUUM INTO``, or
``database.pgdump`` from ``pg_dump --format=custom``), the patient salt (``patient_salt``, mode
0600; not when ``CXR_PATIENT_SALT`` sets it: then keep that secret yourself), the hyperparameter
studies' Optuna store (``optuna.db``, or ``optuna.pgdump`` for another PostgreSQL database; in
the same PostgreSQL database, schema ``optuna``, it is inside ``database.pgdump``), the artifacts (run
folders with their models and cards, named ensembles, review uploads, exports) and
``manifest.json`` (what, when, the schema revision). Caches and logs are left out: they are
rebuilt. A restore copies them back into ``CXR_HOME`` / ``CXR_ARTIFACTS`` (stop the app and its
workers first); it refuses to replace an existing database or a different salt unless
``force``, and even then keeps the replaced database beside it, renamed.

Persistence as a whole: the database and the folders the app keeps beside it. The CLI reaches
it through the composition root (:mod:`cxr_core.app`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from cxr_core import storage  # the package's own database handle
from cxr_core.core.errors import ConfigError
from cxr_core.core.settings import Settings, get_settings
from cxr_core.storage import optuna_store

ARTIFACT_DIRS = ("runs", "ensembles", "uploads", "exports")


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None


def backup(out: str | Path, *, settings: Settings | None = None) -> dict:
    """Write a backup folder (see the module docstring) and return its manifest.

    Raises:
        ConfigError: ``out`` exists and is not empty, or no database copy could be made.
    """
    settings = settings or get_settings()
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"the backup folder must be new or empty. Received: {out}")
    out.mkdir(parents=True, exist_ok=True)
    db = storage.open_db(settings)
    sqlite = _sqlite_file(settings.db_url) is not None
    dump = storage.snapshot(db, out / ("database.db" if sqlite else "database.pgdump"))
    if dump is None:
        raise ConfigError("no copy of the database could be made (PostgreSQL: put pg_dump on "
                          "PATH); nothing else was backed up without it")
    salt = "environment (CXR_PATIENT_SALT): keep it yourself"
    if not os.environ.get("CXR_PATIENT_SALT") and settings.patient_salt_file.is_file():
        target = out / "patient_salt"
        shutil.copyfile(settings.patient_salt_file, target)
        os.chmod(target, 0o600)
        salt = "patient_salt"
    optuna = _backup_optuna(out, settings)
    copied = []
    for name in ARTIFACT_DIRS:
        src = settings.artifacts_root / name
        if src.is_dir():
            shutil.copytree(src, out / "artifacts" / name)
            copied.append(name)
    manifest = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "database": dump.name, "schema_revision": storage.schema_revision(db),
                "salt": salt, "optuna": optuna, "artifacts": copied}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"backup": str(out), **manifest}


def _backup_optuna(out: Path, settings: Settings) -> str | None:
    """The studies' Optuna store: a copy's file name, where it is instead, or None (none)."""
    if optuna_store.in_app_dump(settings):
        return "database (schema optuna)"
    sqlite = optuna_store.store_url(settings).startswith("sqlite")
    copy = optuna_store.snapshot(out / ("optuna.db" if sqlite else "optuna.pgdump"), settings)
    return copy.name if copy is not None else None


def restore(src: str | Path, *, settings: Settings | None = None, force: bool = False) -> dict:
    """Copy a backup folder back into this install; returns what was restored.

    Raises:
        ConfigError: not a backup folder, an existing database or a different salt without
            ``force``, or a PostgreSQL dump without ``pg_restore`` on PATH.
    """
    settings = settings or get_settings()
    src = Path(src).expanduser()
    try:
        manifest = json.loads((src / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{src} is not a backup folder (no readable manifest.json)") from exc
    dump = src / manifest["database"]
    target = _sqlite_file(settings.db_url)
    if dump.suffix == ".db":
        if target is None:
            raise ConfigError("this backup holds a SQLite database; CXR_DB_URL points elsewhere")
        if target.exists() and not force:
            raise ConfigError(f"a database exists at {target}: move it away, or restore with "
                              "--force to replace it (it is kept beside, renamed)")
        target.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for part in (target, target.with_name(target.name + "-wal"),
                     target.with_name(target.name + "-shm")):
            if part.exists():  # replaced, never deleted: kept as <name>.before-restore-<stamp>
                part.rename(part.with_name(f"{part.name}.before-restore-{stamp}"))
        shutil.copyfile(dump, target)
    else:
        tool = shutil.which("pg_restore")
        if tool is None:
            raise ConfigError(f"pg_restore is not on PATH: run pg_restore --clean --dbname URL "
                              f"{dump}")
        url = settings.db_url.replace("+psycopg2", "").replace("+psycopg", "")
        subprocess.run([tool, "--clean", "--if-exists", "--dbname", url, str(dump)], check=True,
                       capture_output=True)
    restored = ["database"]
    optuna = manifest.get("optuna")
    if optuna == "optuna.db" and optuna_store.restore_file(
            src / optuna, settings, stamp=time.strftime("%Y%m%d-%H%M%S")):
        restored.append("optuna")
    elif optuna == "optuna.pgdump":
        tool = shutil.which("pg_restore")
        if tool is None:
            raise ConfigError(f"pg_restore is not on PATH: run pg_restore --clean --dbname "
                              f"CXR_OPTUNA_URL {src / optuna}")
        url = optuna_store.store_url(settings).replace("+psycopg2", "").replace("+psycopg", "")
        subprocess.run([tool, "--clean", "--if-exists", "--dbname", url, str(src / optuna)],
                       check=True, capture_output=True)
        restored.append("optuna")
    salt = src / "patient_salt"
    if salt.is_file():
        here = settings.patient_salt_file
        if here.is_file() and here.read_bytes() != salt.read_bytes() and not force:
            raise ConfigError(f"{here} holds another patient salt: patients would be hashed "
                              "differently; restore with --force to replace it")
        here.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(salt, here)
        os.chmod(here, 0o600)
        restored.append("patient_salt")
    for name in manifest.get("artifacts") or ():
        shutil.copytree(src / "artifacts" / name, settings.artifacts_root / name,
                        dirs_exist_ok=True)
        restored.append(name)
    storage.open_db(settings)  # migrate a backup from an older version now
    return {"restored": restored, "from": str(src), "schema_revision":
            manifest.get("schema_revision")}
