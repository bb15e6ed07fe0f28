"""Settings from the environment; the app also reads .streamlit/secrets.toml's [cxr] table.

In the app, ``[cxr]`` keys (``home``, ``db_url``, ``data_dir``, ``patient_salt``, or their
``CXR_*`` names) fill the matching environment variables that are not already set
(:func:`apply_secrets`): the environment wins, and worker processes the app starts inherit them.

CXR_HOME      state folder: DB, caches, run artifacts (default ~/.cxr)
CXR_DB_URL    any SQLAlchemy URL (default sqlite:///$CXR_HOME/cxr.db); PostgreSQL works
CXR_DATA_DIR  dataset folders/files to register at start, separated by the OS path separator
CXR_PATIENT_SALT  secret mixed into hashed DICOM PatientIDs (default: $CXR_HOME/patient_salt)
CXR_DATA_ROOTS  folders datasets and weights files may lie under (cxr_core.core.data_roots)
CXR_DEMO      "off": no first-launch demo dataset (cxr_core.app)
CXR_OPTUNA_URL  the hyperparameter studies' Optuna store (default: $CXR_HOME/optuna.db beside a
              SQLite database; schema "optuna" of the same PostgreSQL database; cxr_core.search)
CXR_MAX_*     per-run limits and the per-user run quota (cxr_core.core.limits)
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.core.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Where state lives. Built fresh from the environment on each call (no module state)."""

    home: Path
    db_url: str
    data_dirs: tuple[Path, ...]
    artifacts: Path | None = None  # CXR_ARTIFACTS: runs and uploads (shared across hosts)
    worker: str = "auto"  # CXR_WORKER: "auto" (the app starts a local worker) or "off"
    # CXR_DEMO: on a first launch (no dataset known, no CXR_DATA_DIR) the app indexes the
    # embedded demo dataset and evaluates the shipped model on it; "off" skips that.
    demo: bool = True
    optuna_url: str = ""  # CXR_OPTUNA_URL: the studies' Optuna store ("" : the default)

    @property
    def artifacts_root(self) -> Path:
        """Where runs and uploads live: ``CXR_ARTIFACTS``, else ``CXR_HOME``. Several hosts
        sharing one database must share this folder too (a network filesystem)."""
        return self.artifacts or self.home

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"  # decoded pixels: per host, rebuilt when missing

    @property
    def runs_dir(self) -> Path:
        return self.artifacts_root / "runs"

    @property
    def uploads_dir(self) -> Path:
        return self.artifacts_root / "uploads"

    @property
    def patient_salt_file(self) -> Path:
        return self.home / "patient_salt"


SECRET_KEYS = {"home": "CXR_HOME", "db_url": "CXR_DB_URL", "data_dir": "CXR_DATA_DIR",
               "patient_salt": "CXR_PATIENT_SALT", "artifacts": "CXR_ARTIFACTS",
               "worker": "CXR_WORKER", "demo": "CXR_DEMO", "data_roots": "CXR_DATA_ROOTS",
               # per-run limits and quotas (cxr_core.core.limits)
               "max_active_runs_per_user": "CXR_MAX_ACTIVE_RUNS_PER_USER",
               "max_image_size": "CXR_MAX_IMAGE_SIZE", "max_epochs": "CXR_MAX_EPOCHS",
               "max_train_images": "CXR_MAX_TRAIN_IMAGES",
               "max_queued_view_jobs": "CXR_MAX_QUEUED_VIEW_JOBS",
               # job caps, upload caps and the decode budget (cxr_core.core.limits; issue 26)
               "max_queued_jobs_per_user": "CXR_MAX_QUEUED_JOBS_PER_USER",
               "max_upload_files": "CXR_MAX_UPLOAD_FILES", "max_upload_mb": "CXR_MAX_UPLOAD_MB",
               "max_decode_mb": "CXR_MAX_DECODE_MB",
               # retention of review uploads and exports (cxr_core.review.retention)
               "retention_days": "CXR_RETENTION_DAYS",
               "retention_days_uploads": "CXR_RETENTION_DAYS_UPLOADS",
               "retention_days_exports": "CXR_RETENTION_DAYS_EXPORTS",
               "optuna_url": "CXR_OPTUNA_URL"}
WORKER_MODES = ("auto", "off")


def apply_secrets(table: Mapping[str, Any]) -> dict[str, str]:
    """Set the ``CXR_*`` variables named in a ``[cxr]`` secrets table, unless already set.

    Args:
        table: e.g. ``{"db_url": "postgresql+psycopg2://...", "data_dir": ["/data/a"]}``;
            ``data_dir`` may be a list of paths.

    Returns:
        The variables set (name -> value).

    Raises:
        ConfigError: an unknown key (a typo must not be silently ignored).
    """
    names = {**SECRET_KEYS, **{v: v for v in SECRET_KEYS.values()}}
    unknown = sorted(k for k in table if k not in names)
    if unknown:
        raise ConfigError(f"unknown key(s) in [cxr] of secrets.toml: {unknown}. "
                          f"Expected some of {sorted(SECRET_KEYS)}")
    done = {}
    for key, value in table.items():
        var = names[key]
        if isinstance(value, (list, tuple)):
            value = os.pathsep.join(str(v) for v in value)
        if not os.environ.get(var) and str(value).strip():
            os.environ[var] = done[var] = str(value)
    return done


def get_settings() -> Settings:
    """Read the settings from environment variables.

    Returns:
        The current settings; CXR_HOME is created if missing.

    Raises:
        ConfigError: CXR_WORKER is neither "auto" nor "off", or CXR_DEMO neither "on" nor
            "off".
    """
    home = Path(os.environ.get("CXR_HOME") or Path.home() / ".cxr").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    db_url = os.environ.get("CXR_DB_URL") or f"sqlite:///{home / 'cxr.db'}"
    raw = os.environ.get("CXR_DATA_DIR", "")
    data_dirs = tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip())
    artifacts = os.environ.get("CXR_ARTIFACTS", "").strip()
    worker = os.environ.get("CXR_WORKER", "").strip().lower() or "auto"
    if worker not in WORKER_MODES:
        raise ConfigError(f"CXR_WORKER must be one of {WORKER_MODES}. Received: {worker!r}")
    demo = os.environ.get("CXR_DEMO", "").strip().lower() or "on"
    if demo not in ("on", "off"):
        raise ConfigError(f"CXR_DEMO must be 'on' or 'off'. Received: {demo!r}")
    return Settings(home=home, db_url=db_url, data_dirs=data_dirs,
                    artifacts=Path(artifacts).expanduser() if artifacts else None, worker=worker,
                    demo=demo == "on", optuna_url=os.environ.get("CXR_OPTUNA_URL", "").strip())


def patient_salt(settings: Settings | None = None) -> str:
    """The secret that DICOM PatientIDs are hashed with, stable for one deployment.

    ``CXR_PATIENT_SALT`` when set (set it when several hosts share one database); else a
    random salt made once in ``$CXR_HOME/patient_salt`` (mode 0600) and read from there on
    every later scan. Changing or deleting it changes every DICOM patient on re-index.

    Raises:
        ConfigError: the salt file exists but is empty, or the database is shared (not a local
            SQLite file) and ``CXR_PATIENT_SALT`` is not set: each host would mint its own.
    """
    env = os.environ.get("CXR_PATIENT_SALT")
    if env:
        return env
    settings = settings or get_settings()
    if not settings.db_url.startswith("sqlite"):
        raise ConfigError("CXR_PATIENT_SALT is required when the database is shared (CXR_DB_URL "
                          "is not a local SQLite file): set the same secret on every host, or "
                          "each would hash the same patients differently")
    path = settings.patient_salt_file
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic and never overwrites: concurrent first scans agree
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    salt = path.read_text().strip()
    if not salt:
        raise ConfigError(
            f"patient salt file is empty: {path} (restore it or set CXR_PATIENT_SALT)")
    return salt


def salt_fingerprint(salt: str) -> str:
    """An HMAC of a fixed message under the salt: tells two salts apart, reveals neither."""
    return hmac.new(salt.encode("utf-8"), b"cxr patient salt fingerprint",
                    hashlib.sha256).hexdigest()[:32]
