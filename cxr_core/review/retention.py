"""Retention of review uploads and exports (issue 26 item 8): what may be deleted, and when.

Settings (the environment, or the ``[cxr]`` secrets table):

``CXR_RETENTION_DAYS``          days an upload or an export is kept (default 30; 0 keeps them)
``CXR_RETENTION_DAYS_UPLOADS``  the same for uploads sent to review only (overrides the above)
``CXR_RETENTION_DAYS_EXPORTS``  the same for relabel CSV exports only (overrides the above)

**A clinician's evidence is never deleted.** An upload (``<artifacts>/uploads/<sha256>.<ext>``)
is the image a review item shows and a relabel was made on. It is kept, whatever its age, while
any relabel row names it (undone ones and undo rows too: the history must still show what was
relabelled) or any review item of it is unresolved. Only an upload nothing refers to any more
(e.g. a stored file whose review item never committed, or one whose items were resolved
without a relabel) is deleted, once its newest send is older than the retention. The check and
the delete run under the database's write lock, and :func:`cxr_core.predict.uploads.send_to_review`
writes the file and its item under that same lock, so an upload being sent again at that moment
is never deleted under it. Exports (``<artifacts>/exports/``) are copies of the relabel history
that can be made again at any time: they are deleted by age alone.

The ``cleanup`` job (:mod:`cxr_core.review.handlers`) runs :func:`cleanup`; long-running
workers queue it once a day (:data:`CLEANUP_EVERY_S`, wired by :mod:`cxr_core.app`: checked
when a worker starts and every 10 minutes; the app starts a worker whenever work is queued),
and ``python -m cxr_core cleanup --json`` runs it now.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cxr_core.core.errors import ConfigError
from cxr_core.core.settings import get_settings
from cxr_core.storage import Database, lock_for_write
from cxr_core.storage import reviews as store

ENV = {"days": "CXR_RETENTION_DAYS", "uploads": "CXR_RETENTION_DAYS_UPLOADS",
       "exports": "CXR_RETENTION_DAYS_EXPORTS"}
DEFAULT_DAYS = 30
CLEANUP_EVERY_S = 24 * 3600.0  # how often workers queue the cleanup job
STALE_PART_S = 24 * 3600.0  # an interrupted write (.upload-*, *.part) older than this is junk
_UPLOAD = re.compile(r"^([0-9a-f]{64})\.[A-Za-z0-9]{1,8}$")


@dataclass(frozen=True)
class Retention:
    """Days each kind of file is kept; 0 keeps it forever."""

    uploads_days: int = DEFAULT_DAYS
    exports_days: int = DEFAULT_DAYS

    def __post_init__(self) -> None:
        for name in ("uploads_days", "exports_days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"retention days must be a whole number >= 0 (0 keeps "
                                  f"files forever). Received: {name}={value!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.uploads_days or self.exports_days)

    @classmethod
    def from_env(cls, environ: Any = None) -> Retention:
        """From ``CXR_RETENTION_DAYS`` and its per-kind overrides.

        Raises:
            ConfigError: a value that is not a whole number >= 0 (the variable is named).
        """
        env = os.environ if environ is None else environ

        def days(var: str, default: int) -> int:
            raw = str(env.get(var, "")).strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError as exc:
                raise ConfigError(f"{var} must be a whole number of days >= 0 (0 keeps files "
                                  f"forever). Received: {var}={raw!r}") from exc
            if value < 0:
                raise ConfigError(f"{var} must be >= 0 (0 keeps files forever). Received: "
                                  f"{var}={raw!r}")
            return value
        base = days(ENV["days"], DEFAULT_DAYS)
        return cls(days(ENV["uploads"], base), days(ENV["exports"], base))


@dataclass
class CleanupReport:
    """What a cleanup did (or, with ``dry_run``, would do)."""

    uploads_days: int
    exports_days: int
    dry_run: bool = False
    uploads_deleted: list[str] = field(default_factory=list)  # file names
    uploads_kept_referenced: int = 0  # named by a relabel or an unresolved review item
    uploads_kept_recent: int = 0  # newer than the retention
    exports_deleted: list[str] = field(default_factory=list)
    exports_kept: int = 0
    bytes_freed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _age_cutoff(now: datetime, days: int) -> datetime:
    return now - timedelta(days=days)


def _mtime(path: Path) -> datetime | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    except FileNotFoundError:
        return None


def _expire_upload(db: Database, path: Path, sha: str, cutoff: datetime,
                   dry_run: bool) -> tuple[str, int]:
    """Delete one upload if nothing needs it and it is old, under the write lock that
    :func:`cxr_core.predict.uploads.send_to_review` takes: ("deleted" | "referenced" |
    "recent" | "gone", bytes)."""
    def decide(s: Any) -> tuple[str, int]:
        lock_for_write(s)
        refs = store.upload_references(session=s, upload_sha256=sha)
        if refs.open_items or refs.relabels:
            return "referenced", 0
        modified = _mtime(path)
        if modified is None:
            return "gone", 0
        newest = max(modified, refs.newest_item_at or modified)
        if newest >= cutoff:
            return "recent", 0
        size = path.stat().st_size
        if not dry_run:
            path.unlink()
        return "deleted", size
    return db.write(decide)


def _clean_uploads(db: Database, folder: Path, days: int, now: datetime,
                   report: CleanupReport) -> None:
    if not days or not folder.is_dir():
        return
    cutoff = _age_cutoff(now, days)
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".upload-"):  # a write that never finished
            modified = _mtime(path)
            if modified is not None and (now - modified).total_seconds() > STALE_PART_S:
                report.bytes_freed += path.stat().st_size
                if not report.dry_run:
                    path.unlink()
            continue
        match = _UPLOAD.match(path.name)
        if match is None or not path.is_file():
            continue  # not ours: never touched
        outcome, size = _expire_upload(db, path, match.group(1), cutoff, report.dry_run)
        if outcome == "deleted":
            report.uploads_deleted.append(path.name)
            report.bytes_freed += size
        elif outcome == "referenced":
            report.uploads_kept_referenced += 1
        elif outcome == "recent":
            report.uploads_kept_recent += 1


def _clean_exports(folder: Path, days: int, now: datetime, report: CleanupReport) -> None:
    if not days or not folder.is_dir():
        return
    cutoff = _age_cutoff(now, days)
    for path in sorted(folder.iterdir()):
        modified = _mtime(path)
        if not path.is_file() or modified is None:
            continue
        if modified >= cutoff:
            report.exports_kept += 1
            continue
        report.bytes_freed += path.stat().st_size
        report.exports_deleted.append(path.name)
        if not report.dry_run:
            path.unlink()


def cleanup(db: Database, *, dry_run: bool = False, retention: Retention | None = None,
            now: datetime | None = None,
            progress: Callable[[int, int], None] | None = None) -> CleanupReport:
    """Delete uploads nothing refers to and exports, older than the retention.

    Args:
        db: the database (the references are read under its write lock).
        dry_run: report what would be deleted, delete nothing.
        retention: the days (default :meth:`Retention.from_env`).
        now: the time ages are counted to (default: now, UTC).
        progress: ``progress(done, total)`` over the two folders.

    Returns:
        What was deleted and what was kept, and why.

    Raises:
        ConfigError: a retention setting is not a whole number >= 0.
    """
    retention = retention or Retention.from_env()
    now = now or datetime.now(timezone.utc)
    root = get_settings().artifacts_root
    report = CleanupReport(retention.uploads_days, retention.exports_days, dry_run)
    if progress is not None:
        progress(0, 2)
    _clean_uploads(db, root / "uploads", retention.uploads_days, now, report)
    if progress is not None:
        progress(1, 2)
    _clean_exports(root / "exports", retention.exports_days, now, report)
    if progress is not None:
        progress(2, 2)
    return report
