"""Jobs: heavy work a page asks for and a worker does (queued → running → finished | failed).

Claims are conditional UPDATEs (PostgreSQL: ``FOR UPDATE SKIP LOCKED`` picks the row), times
come from the database's clock, and progress is two integers the page polls.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import distinct, func, select, update
from sqlalchemy.orm import Session

from cxr_core.core.errors import ConfigError
from cxr_core.storage.runs import as_utc, claim_candidates, db_now
from db.models import Job


@dataclass(frozen=True)
class JobRecord:
    """A job as the rest of the package sees it."""

    id: int
    kind: str
    params: dict
    status: str
    done: int
    total: int
    result: Any
    error: str | None
    worker_id: int | None
    created_at: datetime
    finished_at: datetime | None
    created_by: str | None = None  # who submitted it (None: the app itself)
    parent: str | None = None  # what it belongs to ("audit:7"): caps count a parent once


def _record(row: Job) -> JobRecord:
    return JobRecord(row.id, row.kind, json.loads(row.params_json), row.status, row.done,
                     row.total, json.loads(row.result_json) if row.result_json else None,
                     row.error, row.worker_id, as_utc(row.created_at), as_utc(row.finished_at),
                     row.created_by, row.parent)


def params_key(params: Mapping[str, Any]) -> str:
    """The params as canonical JSON (sorted keys): equal params, equal text, so a job with
    given params is found by one indexed equality."""
    return json.dumps(dict(params), sort_keys=True)


def find_jobs(*, session: Session, kind: str, params: Mapping[str, Any],
              statuses: Sequence[str] | None = None, limit: int = 1) -> list[JobRecord]:
    """The newest jobs of ``kind`` with exactly these params (in some statuses)."""
    q = select(Job).where(Job.kind == kind, Job.params_json == params_key(params))
    if statuses is not None:
        q = q.where(Job.status.in_(list(statuses)))
    return [_record(r) for r in session.scalars(q.order_by(Job.id.desc()).limit(limit))]


def create_job(*, session: Session, kind: str, params: Mapping[str, Any],
               created_by: str | None = None, parent: str | None = None) -> int:
    row = Job(kind=kind, params_json=params_key(params), status="queued", done=0, total=0,
              created_at=db_now(session), created_by=created_by, parent=parent)
    session.add(row)
    session.flush()
    return row.id


def count_open_jobs(*, session: Session, created_by: str, kinds: Sequence[str]) -> int:
    """Queued or running jobs of ``kinds`` that ``created_by`` submitted (the view-job cap)."""
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.created_by == created_by, Job.status.in_(("queued", "running")),
        Job.kind.in_(list(kinds)))) or 0)


def count_open_units(*, session: Session, created_by: str, kinds: Sequence[str]) -> int:
    """What the per-user job caps count: ``created_by``'s queued or running jobs of ``kinds``,
    one per job without a parent plus one per distinct parent (the folds of one audit, the
    trials of one search count once)."""
    open_jobs = (Job.created_by == created_by, Job.status.in_(("queued", "running")),
                 Job.kind.in_(list(kinds)))
    alone = session.scalar(select(func.count()).select_from(Job).where(
        *open_jobs, Job.parent.is_(None))) or 0
    parents = session.scalar(select(func.count(distinct(Job.parent))).where(
        *open_jobs, Job.parent.is_not(None))) or 0
    return int(alone) + int(parents)


def latest_created(*, session: Session, kind: str) -> datetime | None:
    """When the newest job of ``kind`` was queued (None: never): periodic jobs' schedule."""
    return as_utc(session.scalar(select(func.max(Job.created_at)).where(Job.kind == kind)))


def get_job(*, session: Session, job_id: int) -> JobRecord | None:
    row = session.get(Job, job_id)
    return _record(row) if row is not None else None


def list_jobs(*, session: Session, kind: str | None = None,
              statuses: Sequence[str] | None = None, limit: int | None = 10) -> list[JobRecord]:
    """Jobs (of a kind, in some statuses), newest first; ``limit`` None returns them all."""
    q = select(Job).order_by(Job.id.desc())
    if kind is not None:
        q = q.where(Job.kind == kind)
    if statuses is not None:
        q = q.where(Job.status.in_(list(statuses)))
    if limit is not None:
        q = q.limit(limit)
    return [_record(r) for r in session.scalars(q)]


def claim_next_job(*, session: Session, worker_id: int,
                   kinds: Sequence[str] | None = None) -> int | None:
    """Claim the oldest queued job (of ``kinds``, all when None) for ``worker_id``."""
    queued = select(Job.id).where(Job.status == "queued").order_by(Job.id)
    if kinds is not None:
        queued = queued.where(Job.kind.in_(list(kinds)))
    now = db_now(session)
    for job_id in claim_candidates(session, queued):
        res = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="running", worker_id=worker_id, started_at=now, heartbeat_at=now))
        if res.rowcount == 1:
            return job_id
    return None


def set_progress(*, session: Session, job_id: int, done: int, total: int) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(
        done=int(done), total=int(total), heartbeat_at=db_now(session)))


def heartbeat_job(*, session: Session, job_id: int) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                    .values(heartbeat_at=db_now(session)))


def finish_job(*, session: Session, job_id: int, status: str, result: Any = None,
               error: str | None = None) -> None:
    if status not in ("finished", "failed"):
        raise ConfigError(f"a job ends finished or failed. Received: status={status!r}")
    session.execute(update(Job).where(Job.id == job_id).values(
        status=status, finished_at=db_now(session), error=error,
        result_json=None if result is None else json.dumps(result)))


def reap_dead_jobs(*, session: Session, stale_after_s: float) -> list[int]:
    """Running jobs whose worker stopped stamping them are marked failed (ask again)."""
    now = db_now(session)
    cutoff = now - timedelta(seconds=stale_after_s)
    ids = session.scalars(select(Job.id).where(Job.status == "running",
                                               Job.heartbeat_at < cutoff)).all()
    for job_id in ids:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(
            status="failed", finished_at=now,
            error=f"its worker stopped (no heartbeat for {stale_after_s:g} s); start it again"))
    return list(ids)
