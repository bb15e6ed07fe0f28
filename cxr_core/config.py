"""Settings from the environment (or .streamlit/secrets.toml's [cxr] table via the app).

CXR_HOME      state folder: DB, caches, run artifacts (default ~/.cxr)
CXR_DB_URL    any SQLAlchemy URL (default sqlite:///$CXR_HOME/cxr.db); PostgreSQL works
CXR_DATA_DIR  dataset folders/files to register at start, separated by the OS path separator
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Where state lives. Built fresh from the environment on each call (no module state)."""

    home: Path
    db_url: str
    data_dirs: tuple[Path, ...]

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"


def get_settings() -> Settings:
    """Read the settings from environment variables.

    Returns:
        The current settings; CXR_HOME is created if missing.
    """
    home = Path(os.environ.get("CXR_HOME") or Path.home() / ".cxr").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    db_url = os.environ.get("CXR_DB_URL") or f"sqlite:///{home / 'cxr.db'}"
    raw = os.environ.get("CXR_DATA_DIR", "")
    data_dirs = tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip())
    return Settings(home=home, db_url=db_url, data_dirs=data_dirs)
