"""Training runs, workers, long-form metrics and run logs.

A run goes ``queued → running → finished | failed | cancelled``; ``failed`` and ``cancelled``
runs can be queued again with ``resume_requested`` (the worker then continues from the last
checkpoint). Workers claim queued runs with a conditional ``UPDATE ... WHERE status='queued'``,
so two workers never train the same run: on SQLite the loser of the race gets "database is
locked" (a stale read snapshot), which :meth:`Database.write` retries, and then sees the run
taken. Every function takes a keyword-only ``session``; writers that race (claims, heartbeats,
cancel flags) are meant to be called through :meth:`Database.write`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.orm import Session

from cxr_core.core.errors import RunError
from db.models import Metric, Run, RunImage, RunLog, Worker

RUN_STATUSES = ("queued", "running", "finished", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
RESUMABLE_STATUSES = ("failed", "cancelled")
METRIC_KINDS = ("epoch", "batch")
LOG_LEVELS = ("debug", "info", "warning", "error")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def db_now(session: Session) -> datetime:
    """The database's clock (UTC), so hosts with skewed clocks agree on heartbeat ages.

    PostgreSQL: ``now()`` (the transaction's start; transactions here are short). SQLite is a
    file on this host, so this host's clock is the database's clock.
    """
    if session.get_bind().dialect.name == "sqlite":
        return utcnow()
    return as_utc(session.scalar(select(func.now())))


def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); make them comparable."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class RunRecord:
    """A training run as the rest of the package sees it."""

    id: int
    name: str
    status: str
    config: dict  # the resolved TrainConfig as JSON
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    worker_id: int | None
    cancel_requested: bool
    resume_requested: bool
    epochs_done: int
    artifact_dir: str | None
    error: str | None
    label_snapshot_hash: str | None
    label_snapshot_relabel_id: int | None
    summary: dict | None  # final validation metrics and the like
    created_by: str | None = None  # the identity that queued it (None: before sign-in)
    parent: str | None = None  # what it belongs to ("audit:7"): caps count a parent once
    study_id: int | None = None  # a study's trial: the study (its parent) ...
    trial_number: int | None = None  # ... and Optuna's trial number

    @property
    def display_name(self) -> str:
        return self.name or f"run {self.id}"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass(frozen=True)
class WorkerRecord:
    """A worker process (one per host process that trains)."""

    id: int
    pid: int
    host: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    kinds: str = "all"  # what it serves: "all", "runs" or "jobs"


class MetricRow(NamedTuple):
    """One long-form metric value (a NamedTuple: a long run has many thousands)."""

    run_id: int
    kind: str  # epoch | batch
    step: int  # epoch number (1-based) or global batch number
    key: str  # loss, accuracy, auc, val_loss, lr, images_per_s, ...
    value: float


@dataclass(frozen=True)
class LogLine:
    id: int
    run_id: int
    created_at: datetime
    level: str
    message: str


def _record(row: Run) -> RunRecord:
    return RunRecord(
        row.id, row.name or "", row.status, json.loads(row.config_json or "{}"),
        as_utc(row.created_at), as_utc(row.started_at), as_utc(row.finished_at),
        as_utc(row.heartbeat_at), row.worker_id, bool(row.cancel_requested),
        bool(row.resume_requested), int(row.epochs_done or 0), row.artifact_dir, row.error,
        row.label_snapshot_hash, row.label_snapshot_relabel_id,
        json.loads(row.summary_json) if row.summary_json else None, row.created_by,
        row.parent, row.study_id, row.trial_number)


def _worker(row: Worker) -> WorkerRecord:
    return WorkerRecord(row.id, row.pid, row.host, as_utc(row.started_at),
                        as_utc(row.heartbeat_at), as_utc(row.stopped_at), row.kinds or "all")


# -- Runs -----------------------------------------------------------------------------------

def create_run(*, session: Session, name: str, config: Mapping,
               worker_id: int | None = None, created_by: str | None = None,
               parent: str | None = None,
               study_id: int | None = None, trial_number: int | None = None) -> int:
    """Insert a run; queued, or already claimed (running) by ``worker_id``.

    Creating it claimed in the same statement is how the in-process CLI keeps a detached
    worker from taking the run between "queue" and "claim".

    Returns:
        The run id.
    """
    now = db_now(session)  # a run created running is judged by heartbeat ages from now on
    row = Run(name=name or "", config_json=json.dumps(dict(config)), created_at=now,
              status="queued" if worker_id is None else "running", worker_id=worker_id,
              created_by=created_by, parent=parent, study_id=study_id,
              trial_number=trial_number,
              started_at=None if worker_id is None else now,
              heartbeat_at=None if worker_id is None else now)
    session.add(row)
    session.flush()
    return row.id


def get_run(*, session: Session, run_id: int) -> RunRecord | None:
    row = session.get(Run, run_id)
    return None if row is None else _record(row)


def require_run(*, session: Session, run_id: int) -> RunRecord:
    """The run, or RunError naming the id."""
    run = get_run(session=session, run_id=run_id)
    if run is None:
        raise RunError(f"no run with this id. Received: run_id={run_id}")
    return run


def list_runs(*, session: Session, statuses: Sequence[str] | None = None,
              limit: int = 200, offset: int = 0) -> list[RunRecord]:
    """Runs, newest first (a page: ``limit`` from ``offset``)."""
    q = select(Run).order_by(Run.id.desc()).limit(limit).offset(offset)
    if statuses:
        q = q.where(Run.status.in_(list(statuses)))
    return [_record(r) for r in session.scalars(q)]


def count_runs(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Run)) or 0


def claim_run(*, session: Session, run_id: int, worker_id: int) -> bool:
    """Atomically move one queued run to running for ``worker_id``; False if it was taken."""
    now = db_now(session)
    res = session.execute(
        update(Run).where(Run.id == run_id, Run.status == "queued")
        .values(status="running", worker_id=worker_id, heartbeat_at=now, error=None,
                finished_at=None, started_at=func.coalesce(Run.started_at, now)))
    return res.rowcount == 1


def claim_candidates(session: Session, query: Select) -> list[int]:
    """Ids of ``query`` (oldest queued first) a worker should try to claim.

    PostgreSQL: the oldest row no other worker is claiming (``FOR UPDATE SKIP LOCKED``), so
    many workers never wait on or fight over one row. SQLite has one writer at a time: a few
    candidates, and the caller's conditional UPDATE settles who gets each.
    """
    if session.get_bind().dialect.name == "sqlite":
        return list(session.scalars(query.limit(20)))
    return list(session.scalars(query.limit(1).with_for_update(skip_locked=True)))


def claim_next_run(*, session: Session, worker_id: int) -> int | None:
    """Claim the oldest queued run for ``worker_id`` (see :func:`claim_candidates`).

    Returns:
        The claimed run id, or None when nothing is queued.
    """
    queued = select(Run.id).where(Run.status == "queued").order_by(Run.id)
    for run_id in claim_candidates(session, queued):
        if claim_run(session=session, run_id=run_id, worker_id=worker_id):
            return run_id
    return None


def set_run_images(*, session: Session, run_id: int, train_ids: Iterable[int],
                   val_ids: Iterable[int], calib_ids: Iterable[int] = ()) -> None:
    """Record the images a run trains on, selects on ("val") and chooses its threshold on
    ("calib", the calibration slice), replacing a resumed run's rows."""
    session.execute(delete(RunImage).where(RunImage.run_id == run_id))
    rows = [{"run_id": run_id, "image_id": int(i), "role": role}
            for role, ids in (("train", train_ids), ("val", val_ids), ("calib", calib_ids))
            for i in ids]
    for start in range(0, len(rows), 1000):
        session.execute(insert(RunImage), rows[start:start + 1000])


def set_run_artifacts(*, session: Session, run_id: int, artifact_dir: str | None = None,
                      snapshot_hash: str | None = None, snapshot_relabel_id: int | None = None,
                      name: str | None = None) -> None:
    """Record where a run keeps its files and which label snapshot it trains on."""
    values: dict = {}
    if artifact_dir is not None:
        values["artifact_dir"] = artifact_dir
    if snapshot_hash is not None:
        values["label_snapshot_hash"] = snapshot_hash
        values["label_snapshot_relabel_id"] = snapshot_relabel_id
    if name is not None:
        values["name"] = name
    if values:
        session.execute(update(Run).where(Run.id == run_id).values(**values))


def set_epochs_done(*, session: Session, run_id: int, epochs_done: int) -> None:
    """Epochs with a saved checkpoint (a resume continues from there)."""
    session.execute(update(Run).where(Run.id == run_id).values(
        epochs_done=epochs_done, heartbeat_at=db_now(session)))


def finish_run(*, session: Session, run_id: int, status: str, error: str | None = None,
               summary: Mapping | None = None, only_if: str | None = None) -> bool:
    """End a run: finished, failed (with ``error``) or cancelled; clears the resume flag.

    Args:
        only_if: end it only when its status is still this (a worker finishing a run that
            was reaped meanwhile must not overwrite "failed").

    Returns:
        Whether the run was updated.
    """
    if status not in ("finished", "failed", "cancelled"):
        raise RunError(f"a run ends as finished, failed or cancelled. Received: status={status!r}")
    values: dict = dict(status=status, finished_at=utcnow(), error=error, resume_requested=False,
                        cancel_requested=False)
    if summary is not None:
        values["summary_json"] = json.dumps(dict(summary), default=float)
    q = update(Run).where(Run.id == run_id)
    if only_if is not None:
        q = q.where(Run.status == only_if)
    return session.execute(q.values(**values)).rowcount == 1


def request_cancel(*, session: Session, run_id: int) -> str:
    """Cancel a run: a queued run is cancelled at once, a running one is flagged.

    The worker checks the flag after every batch and stops within one batch.

    Returns:
        The run's status after the request ("cancelled" or "running").

    Raises:
        RunError: no such run, or it has already ended.
    """
    run = require_run(session=session, run_id=run_id)
    if run.status == "queued":
        finish_run(session=session, run_id=run_id, status="cancelled",
                   error="cancelled before it started")
        return "cancelled"
    if run.status != "running":
        raise RunError(f"only queued or running runs can be cancelled. Received: run {run_id} "
                       f"is {run.status}")
    session.execute(update(Run).where(Run.id == run_id).values(cancel_requested=True))
    return "running"


def cancel_requested(*, session: Session, run_id: int) -> bool:
    """The cancel flag (one indexed read: cheap enough to call every batch)."""
    return bool(session.scalar(select(Run.cancel_requested).where(Run.id == run_id)))


def should_stop(*, session: Session, run_id: int) -> bool:
    """True when the run's cancel flag is set or it is no longer running (e.g. reaped)."""
    row = session.execute(select(Run.cancel_requested, Run.status).where(Run.id == run_id)).first()
    return row is None or bool(row[0]) or row[1] != "running"


def request_resume(*, session: Session, run_id: int) -> None:
    """Queue a failed or cancelled run again; the worker continues from its last checkpoint.

    Raises:
        RunError: no such run, or it is not failed/cancelled.
    """
    run = require_run(session=session, run_id=run_id)
    if run.status not in RESUMABLE_STATUSES:
        raise RunError(f"only failed or cancelled runs can be resumed. Received: run {run_id} "
                       f"is {run.status}")
    session.execute(update(Run).where(Run.id == run_id, Run.status == run.status).values(
        status="queued", resume_requested=True, cancel_requested=False, error=None,
        finished_at=None, worker_id=None))


def heartbeat(*, session: Session, worker_id: int, run_id: int | None = None) -> None:
    """Stamp the worker (and the run it trains) as alive, on the database's clock."""
    now = db_now(session)
    session.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now))
    if run_id is not None:
        session.execute(update(Run).where(Run.id == run_id, Run.status == "running")
                        .values(heartbeat_at=now))


def reap_dead_runs(*, session: Session, stale_after_s: float,
                   is_alive: Callable[[int, str], bool | None],
                   now: datetime | None = None) -> list[int]:
    """Mark running runs of dead workers as failed.

    A run is dead when its heartbeat (or start) is older than ``stale_after_s``, or when
    ``is_alive(pid, host)`` of its worker says False (None: cannot tell, e.g. another host).

    Returns:
        The ids of the runs marked failed.
    """
    now = now or db_now(session)
    cutoff = now - timedelta(seconds=stale_after_s)
    rows = session.execute(select(Run, Worker).outerjoin(Worker, Worker.id == Run.worker_id)
                           .where(Run.status == "running")).all()
    reaped = []
    for run, worker in rows:
        beat = as_utc(run.heartbeat_at or run.started_at or run.created_at)
        where = f"pid {worker.pid} on {worker.host}" if worker is not None else "unknown worker"
        if worker is not None and is_alive(worker.pid, worker.host) is False:
            why = f"worker process ({where}) is no longer running"
        elif beat is not None and beat < cutoff:
            why = (f"no heartbeat from the worker ({where}) for "
                   f"{(now - beat).total_seconds():.0f} s (limit {stale_after_s:g} s)")
        else:
            continue
        session.execute(update(Run).where(Run.id == run.id, Run.status == "running").values(
            status="failed", finished_at=now, resume_requested=False,
            error=f"{why}; the run can be resumed from epoch {run.epochs_done}"))
        session.add(RunLog(run_id=run.id, level="error", message=f"marked failed: {why}",
                           created_at=now))
        reaped.append(run.id)
    # synchronize_session=False: the session holds naive (SQLite) datetimes that Python
    # cannot compare with the aware cutoff; the SQL comparison itself is in UTC on both sides.
    session.execute(update(Worker).where(Worker.stopped_at.is_(None), Worker.heartbeat_at < cutoff)
                    .values(stopped_at=now).execution_options(synchronize_session=False))
    return reaped


# -- Workers --------------------------------------------------------------------------------

def register_worker(*, session: Session, pid: int, host: str, kinds: str = "all") -> int:
    now = db_now(session)
    row = Worker(pid=pid, host=host, started_at=now, heartbeat_at=now, kinds=kinds)
    session.add(row)
    session.flush()
    return row.id


def stop_worker(*, session: Session, worker_id: int) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id)
                    .values(stopped_at=db_now(session)))


def busy_worker_ids(*, session: Session) -> set[int]:
    """Workers training a run right now."""
    return set(session.scalars(select(Run.worker_id).where(Run.status == "running",
                                                           Run.worker_id.is_not(None))))


def live_workers(*, session: Session, fresh_after_s: float) -> list[WorkerRecord]:
    """Workers not stopped whose heartbeat is younger than ``fresh_after_s``."""
    cutoff = db_now(session) - timedelta(seconds=fresh_after_s)
    rows = session.scalars(select(Worker).where(Worker.stopped_at.is_(None))
                           .order_by(Worker.id.desc())).all()
    return [_worker(r) for r in rows if as_utc(r.heartbeat_at) >= cutoff]


# -- Metrics and logs -----------------------------------------------------------------------

def add_metrics(*, session: Session, run_id: int, kind: str, step: int,
                values: Mapping[str, float]) -> int:
    """Append one long-form row per finite value; returns the number of rows written."""
    if kind not in METRIC_KINDS:
        raise RunError(f"metric kind must be one of {METRIC_KINDS}. Received: kind={kind!r}")
    now = utcnow()
    rows = [{"run_id": run_id, "kind": kind, "step": int(step), "key": str(k), "value": float(v),
             "created_at": now}
            for k, v in values.items() if v is not None and float(v) == float(v)]  # drop NaN
    if rows:
        session.execute(insert(Metric), rows)
    return len(rows)


def get_metrics(*, session: Session, run_ids: Iterable[int], kind: str = "epoch",
                keys: Sequence[str] | None = None) -> list[MetricRow]:
    """Long-form metrics of some runs, ordered by run, step and key."""
    q = (select(Metric.run_id, Metric.kind, Metric.step, Metric.key, Metric.value)
         .where(Metric.run_id.in_(list(run_ids)), Metric.kind == kind)
         .order_by(Metric.run_id, Metric.step, Metric.key))
    if keys:
        q = q.where(Metric.key.in_(list(keys)))
    return [MetricRow._make(r) for r in session.connection().execute(q)]


def get_metrics_thinned(*, session: Session, run_ids: Iterable[int], kind: str,
                        keys: Sequence[str], max_points: int) -> list[MetricRow]:
    """Like :func:`get_metrics`, with at most about ``max_points`` rows per run and key: every
    k-th row counted back from the newest (always kept), thinned in SQL with window functions
    (SQLite and PostgreSQL), so a long run's batch rows never all leave the database.
    ``max_points=1`` gives each run's newest row per key.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1. Received: max_points={max_points}")
    part = (Metric.run_id, Metric.key)
    newest_first = func.row_number().over(partition_by=part, order_by=Metric.step.desc())
    sub = (select(Metric.run_id, Metric.kind, Metric.step, Metric.key, Metric.value,
                  newest_first.label("rn"), func.count().over(partition_by=part).label("n"))
           .where(Metric.run_id.in_(list(run_ids)), Metric.kind == kind,
                  Metric.key.in_(list(keys))).subquery())
    stride = (sub.c.n + (max_points - 1)) // max_points  # SQL integer division (2.0: // )
    q = (select(sub.c.run_id, sub.c.kind, sub.c.step, sub.c.key, sub.c.value)
         .where((sub.c.rn - 1) % stride == 0)
         .order_by(sub.c.run_id, sub.c.step, sub.c.key))
    return [MetricRow._make(r) for r in session.connection().execute(q)]


def truncate_metrics(*, session: Session, run_id: int, after_epoch: int | None = None,
                     after_batch_step: int | None = None) -> None:
    """Drop rows a resumed run writes again.

    A run killed mid-epoch wrote batch rows (and maybe an epoch row) past its last
    checkpoint; the resumed run trains from there and writes them anew.
    """
    if after_epoch is not None:
        session.execute(delete(Metric).where(Metric.run_id == run_id, Metric.kind == "epoch",
                                             Metric.step > after_epoch))
    if after_batch_step is not None:
        session.execute(delete(Metric).where(Metric.run_id == run_id, Metric.kind == "batch",
                                             Metric.step > after_batch_step))


def add_log(*, session: Session, run_id: int, message: str, level: str = "info") -> None:
    session.add(RunLog(run_id=run_id, level=level if level in LOG_LEVELS else "info",
                       message=str(message), created_at=utcnow()))


def get_logs(*, session: Session, run_id: int, limit: int = 500) -> list[LogLine]:
    """The newest ``limit`` log lines of a run, oldest first."""
    rows = session.scalars(select(RunLog).where(RunLog.run_id == run_id)
                           .order_by(RunLog.id.desc()).limit(limit)).all()
    return [LogLine(r.id, r.run_id, as_utc(r.created_at), r.level, r.message)
            for r in reversed(rows)]
