"""Jobs as user actions: a page asks for heavy work (evaluating a model over a dataset) and a
worker process does it, so the Streamlit process never decodes a dataset or runs a model over
one. The page polls :func:`get_job` for progress; the result is JSON in the database, so a
reload or an app restart loses nothing.

The queue knows each kind's name and the action a submitter needs (:data:`KINDS`, the one
table), never the code that does it: each domain keeps its handlers in its own ``handlers``
module (``HANDLERS``: kind -> callable) and the composition root (:mod:`cxr_core.app`) hands them
to :func:`run_job` and the worker loop, so the queue imports no domain.

Kinds and their handlers: ``index``, ``split_preview``, ``balance_tables``
(:mod:`cxr_core.data.handlers`); ``evaluate``, ``compare_ci``, ``site_calibration``
(:mod:`cxr_core.evaluation.handlers`); ``agreement``, ``export_relabels``, ``cleanup``
(:mod:`cxr_core.review.handlers`); ``create_ensemble`` (:mod:`cxr_core.models.handlers`);
``demo`` (:mod:`cxr_core.app`: it spans data and evaluation).
"""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from cxr_core.core.errors import ConfigError, CxrError
from cxr_core.jobs import launcher
from cxr_core.storage import AndThen, Database
from cxr_core.storage import jobs as store
from cxr_core.storage.jobs import JobRecord
from cxr_core.storage.runs import db_now

Progress = Callable[[int, int], None]  # (done, total)
Handler = Callable[[Database, int, Mapping[str, Any], Progress], dict]  # (db, job id, params, progress) -> result
PROGRESS_EVERY_S = 0.5  # progress writes per job at most this often

# kind -> the action (cxr_core.auth.policy.POLICY) a submitter needs. Jobs that change state or
# read every record need their role; the rest compute a read-only view of what the pages show
# (split preview, comparison intervals, balance tables, agreement, a site-threshold candidate):
# ``compute_view``, every role, capped per user, not audited when done. The kind names are
# stored in the jobs table (and "site_calibration" in the audit log), so they stay as they were.
KINDS: dict[str, str] = {
    "index": "index_dataset",
    "evaluate": "evaluate",
    "export_relabels": "export_relabels",
    "split_preview": "compute_view",
    "compare_ci": "compute_view",
    "balance_tables": "compute_view",
    "agreement": "compute_view",
    "site_calibration": "compute_view",
    "create_ensemble": "set_operating_point",
    "demo": "index_dataset",  # queued by the app itself on a first launch (cxr_core.app)
    "cleanup": "cleanup",  # retention of uploads and exports; queued by workers once a day
}
VIEW_KINDS = tuple(k for k, a in KINDS.items() if a == "compute_view")


def submit(db: Database, kind: str, params: Mapping[str, Any], *,
           start_worker: bool = True, created_by: str | None = None,
           and_then: AndThen | None = None, parent: str | None = None) -> int:
    """Queue a job and make sure a worker will take it; returns the job id.

    ``created_by`` is stored with it (who asked), and ``parent`` (what it belongs to, e.g.
    ``"audit:7"``: per-user caps count a parent's jobs once, :mod:`cxr_core.core.limits`). ``and_then(session, job_id)`` runs in the
    job row's transaction (an audit row, a quota check that may refuse it); the worker is
    started only once both are committed.

    A worker busy training does not take jobs until its run ends, so when every live local
    worker is training, a second one serving only jobs is started (``CXR_WORKER=auto``).

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in KINDS:
        raise ConfigError(f"job kind must be one of {sorted(KINDS)}. Received: kind={kind!r}")
    job_id = db.write(lambda s: store.create_job(session=s, kind=kind, params=params,
                                                 created_by=created_by, parent=parent),
                      and_then=and_then)
    if start_worker:
        launcher.ensure_worker(db, kinds="jobs")
    return job_id


def submit_if_due(db: Database, kind: str, every_s: float, *,
                  start_worker: bool = False) -> int | None:
    """Queue a periodic system job (no submitter, empty params) unless one of ``kind`` was
    queued in the last ``every_s`` seconds (by the database's clock, so every host agrees);
    returns the job id or None. Workers call it for the kinds the composition root schedules.
    """
    with db.session() as s:
        last = store.latest_created(session=s, kind=kind)
        now = db_now(s)
    if last is not None and (now - last).total_seconds() < every_s:
        return None
    return submit_once(db, kind, {}, start_worker=start_worker)


def get_job(db: Database, job_id: int) -> JobRecord | None:
    with db.session() as s:
        return store.get_job(session=s, job_id=job_id)


def recent_jobs(db: Database, kind: str, *, limit: int = 10) -> list[JobRecord]:
    """The newest jobs of a kind, newest first."""
    with db.session() as s:
        return store.list_jobs(session=s, kind=kind, limit=limit)


def submit_once(db: Database, kind: str, params: Mapping[str, Any], *,
                start_worker: bool = True, created_by: str | None = None,
                and_then: AndThen | None = None, parent: str | None = None) -> int:
    """:func:`submit`, unless a job of that kind with the same params is queued or running
    (two tabs asking to index one folder get one job); returns that job's id. ``and_then``
    runs only when a job is created (in its transaction)."""
    with db.session() as s:
        open_jobs = store.find_jobs(session=s, kind=kind, params=params,
                                    statuses=("queued", "running"))
    if open_jobs:
        if start_worker:
            launcher.ensure_worker(db, kinds="jobs")
        return open_jobs[0].id
    return submit(db, kind, params, start_worker=start_worker, created_by=created_by,
                  and_then=and_then, parent=parent)


def latest_job(db: Database, kind: str, params: Mapping[str, Any]) -> JobRecord | None:
    """The newest job of ``kind`` with exactly these params, in any status (a finished one
    holds its result: the page reads it instead of asking again)."""
    with db.session() as s:
        found = store.find_jobs(session=s, kind=kind, params=params)
    return found[0] if found else None


def check_handlers(handlers: Mapping[str, Handler]) -> Mapping[str, Handler]:
    """``handlers`` if it covers exactly the kinds of :data:`KINDS` (the composition root's
    wiring is checked once, not at the first job of a forgotten kind).

    Raises:
        ConfigError: a kind without a handler, or a handler for no kind.
    """
    missing, extra = sorted(set(KINDS) - set(handlers)), sorted(set(handlers) - set(KINDS))
    if missing or extra:
        raise ConfigError(f"job handlers must cover the kinds {sorted(KINDS)}. "
                          f"Received: missing={missing}, unknown={extra}")
    return handlers


def run_job(db: Database, job_id: int, handlers: Mapping[str, Handler]) -> JobRecord:
    """Do one claimed job with its kind's handler and record how it ended (a failure is
    stored, not raised)."""
    job = get_job(db, job_id)
    if job is None:
        raise ConfigError(f"no job {job_id}")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done == total:
            last[0] = now
            db.write(lambda s: store.set_progress(session=s, job_id=job_id, done=done,
                                                  total=total))

    error, result = None, None
    try:
        handler = handlers.get(job.kind)
        if handler is None:
            raise ConfigError(f"no handler for job kind {job.kind!r} in this worker")
        result = handler(db, job_id, job.params, progress)
    except CxrError as exc:
        error = str(exc)
    except Exception as exc:  # stored for the page; the worker goes on with the next job
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    db.write(lambda s: store.finish_job(session=s, job_id=job_id,
                                        status="failed" if error else "finished",
                                        result=result, error=error))
    return get_job(db, job_id)
