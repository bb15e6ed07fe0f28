"""Hyperparameter studies as the app's database knows them: the ``studies`` rows and their
trial runs (``runs.study_id``, ``runs.trial_number``; migration 0015).

The Optuna study itself lives in its own store (:mod:`cxr_core.storage.optuna_store`). Every
function takes a keyword-only ``session``; :func:`lock_study` serialises one study's "tell the
ended trials, ask and queue the next" section across processes and hosts.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cxr_core.core.errors import RunError
from cxr_core.storage.runs import ACTIVE_STATUSES, RunRecord, _record, as_utc, db_now
from db.models import Run, Study

STUDY_STATUSES = ("running", "finished", "stopped")


@dataclass(frozen=True)
class StudyRecord:
    """A study as the rest of the package sees it."""

    id: int
    name: str
    status: str  # running | finished | stopped
    config: dict  # the StudyConfig as JSON
    optuna_study: str
    optuna_url: str  # the store's URL, password left out
    trials_queued: int
    best_run_id: int | None
    best_value: float | None
    promoted_run_id: int | None
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None
    note: str | None


def _study(row: Study) -> StudyRecord:
    return StudyRecord(row.id, row.name, row.status, json.loads(row.config_json),
                       row.optuna_study, row.optuna_url, int(row.trials_queued or 0),
                       row.best_run_id, row.best_value, row.promoted_run_id, row.created_by,
                       as_utc(row.created_at), as_utc(row.finished_at), row.note)


def create_study(*, session: Session, name: str, config: Mapping, optuna_study: str,
                 optuna_url: str, created_by: str | None, note: str | None = None) -> int:
    """Insert a running study; returns its id.

    Raises:
        RunError: a study of this name exists.
    """
    if session.scalar(select(Study.id).where(Study.name == name)) is not None:
        raise RunError(f"a study named {name!r} exists; choose another name. Received: "
                       f"name={name!r}")
    row = Study(name=name, status="running", config_json=json.dumps(dict(config)),
                optuna_study=optuna_study, optuna_url=optuna_url, trials_queued=0,
                created_by=created_by, created_at=db_now(session), note=note)
    session.add(row)
    session.flush()
    return row.id


def get_study(*, session: Session, name_or_id: str | int) -> StudyRecord | None:
    """A study by name, or by id (an int, or a string of digits that names no study)."""
    row = session.scalar(select(Study).where(Study.name == str(name_or_id)))
    if row is None and str(name_or_id).isdigit():
        row = session.get(Study, int(name_or_id))
    return None if row is None else _study(row)


def require_study(*, session: Session, name_or_id: str | int) -> StudyRecord:
    study = get_study(session=session, name_or_id=name_or_id)
    if study is None:
        raise RunError(f"no study with this name or id. Received: {name_or_id!r}")
    return study


def study_promoting(*, session: Session, run_id: int) -> StudyRecord | None:
    """The study whose best trial this run retrains ("promote"), if any."""
    row = session.scalar(select(Study).where(Study.promoted_run_id == run_id))
    return None if row is None else _study(row)


def list_studies(*, session: Session, statuses: tuple[str, ...] | None = None,
                 limit: int = 100) -> list[StudyRecord]:
    """Studies, newest first."""
    q = select(Study).order_by(Study.id.desc()).limit(limit)
    if statuses:
        q = q.where(Study.status.in_(list(statuses)))
    return [_study(r) for r in session.scalars(q)]


def lock_study(*, session: Session, study_id: int) -> StudyRecord:
    """Take the study's lock for the rest of the transaction and return it fresh.

    SQLite: the database write lock (``BEGIN IMMEDIATE``; one writer at a time). PostgreSQL:
    the study row ``FOR UPDATE``: another worker finishing a trial of the same study waits
    here until this transaction commits, then sees its queued trials.
    """
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        if not conn.connection.dbapi_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        row = session.get(Study, study_id, populate_existing=True)
    else:
        row = session.scalar(select(Study).where(Study.id == study_id)
                             .with_for_update().execution_options(populate_existing=True))
    if row is None:
        raise RunError(f"no study with this id. Received: study_id={study_id}")
    return _study(row)


def update_study(*, session: Session, study_id: int, **values) -> None:
    """Set some of ``status``, ``trials_queued``, ``best_run_id``, ``best_value``,
    ``promoted_run_id``, ``note`` (``finished_at`` is stamped when the status ends)."""
    allowed = {"status", "trials_queued", "best_run_id", "best_value", "promoted_run_id",
               "note"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RunError(f"unknown study fields {unknown}; expected some of {sorted(allowed)}")
    if values.get("status") not in (None, *STUDY_STATUSES):
        raise RunError(f"a study is one of {STUDY_STATUSES}. Received: "
                       f"status={values['status']!r}")
    if values.get("status") in ("finished", "stopped"):
        values["finished_at"] = db_now(session)
    session.execute(update(Study).where(Study.id == study_id).values(**values))


def trial_runs(*, session: Session, study_id: int) -> list[RunRecord]:
    """A study's trial runs, by trial number."""
    rows = session.scalars(select(Run).where(Run.study_id == study_id)
                           .order_by(Run.trial_number, Run.id))
    return [_record(r) for r in rows]


def count_active_trials(*, session: Session, study_id: int) -> int:
    return int(session.scalar(select(func.count()).select_from(Run).where(
        Run.study_id == study_id, Run.status.in_(ACTIVE_STATUSES))) or 0)


def studies_to_advance(*, session: Session) -> list[int]:
    """Running studies that have fewer queued or running trials than they may (a trial
    ended, or was reaped with its dead worker): cheap enough for every worker loop turn."""
    active = (select(Run.study_id, func.count().label("n")).where(
        Run.study_id.is_not(None), Run.status.in_(ACTIVE_STATUSES))
        .group_by(Run.study_id).subquery())
    rows = session.execute(select(Study.id, Study.config_json, Study.trials_queued,
                                  func.coalesce(active.c.n, 0))
                           .outerjoin(active, active.c.study_id == Study.id)
                           .where(Study.status == "running")).all()
    out = []
    for sid, cfg, queued, n_active in rows:
        cfg = json.loads(cfg)
        more = queued < int(cfg.get("n_trials", 0)) and n_active < int(cfg.get("parallel", 1))
        if more or n_active == 0:  # room for a trial, or every trial ended: finish it
            out.append(sid)
    return out
