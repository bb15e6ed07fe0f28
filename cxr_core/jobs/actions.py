"""Queueing a job as a principal: the kind's action (:data:`cxr_core.jobs.queue.KINDS`) is
checked and audited through :mod:`cxr_core.auth.gate`; indexing checks the folder against the
data roots; an app principal may name models only by reference (:mod:`cxr_core.core.model_refs`:
``run:ID``, shipped models, ensembles; the CLI may pass a file path); every kind is capped per
user (read-only view jobs together, :data:`~cxr_core.core.limits.ENV` ``max_view_jobs``; each
other kind on its own, ``max_jobs``), a job with a ``parent`` counting once through it; view
jobs are not audited when they succeed.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cxr_core.auth.gate import audited, authorize, record
from cxr_core.auth.policy import Principal
from cxr_core.core import data_roots, limits, model_refs
from cxr_core.core.errors import ConfigError, QuotaExceeded
from cxr_core.jobs import queue
from cxr_core.storage import Database, lock_for_write
from cxr_core.storage import jobs as job_store


def submit_job(db: Database, p: Principal, kind: str, params: Mapping[str, Any], *,
               once: bool = True, parent: str | None = None) -> int:
    """Queue a worker job as ``p``: each kind needs its action
    (:data:`~cxr_core.jobs.queue.KINDS`). Indexing checks the folder against the data roots
    first; an app principal's models must be references; view jobs are capped per user
    together (:func:`_submit_view`), every other kind on its own. With ``once``, an open job
    with the same params is returned.

    Args:
        parent: what the job belongs to (``"audit:7"``, ``"study:3"``): it is not capped
            (its parent was admitted once, see :mod:`cxr_core.core.limits`), and the user's
            open jobs with that parent count as one.

    Raises:
        ConfigError: an unknown kind.
        PermissionDenied, QuotaExceeded, PathNotAllowed: refused (and audited).
    """
    if kind not in queue.KINDS:
        raise ConfigError(f"job kind must be one of {sorted(queue.KINDS)}. "
                          f"Received: kind={kind!r}")
    action = queue.KINDS[kind]
    authorize(db, p, action, kind)
    if p.source != "cli":  # the CLI runs on the server and may still pass a file path
        try:
            model_refs.check_params(params, identity=p.identity)
        except Exception as exc:
            record(db, p, action, kind, outcome="denied", detail={"why": str(exc)})
            raise
    if kind == "index":

        try:
            data_roots.check_path(params["path"], roots=data_roots.allowed_roots())
        except Exception as exc:
            record(db, p, action, str(params.get("path")), outcome="denied",
                   detail={"why": str(exc)})
            raise
    submit = queue.submit_once if once else queue.submit
    if action == "compute_view":
        return _submit_view(db, p, kind, params, submit, parent)
    made: list[int] = []
    audit_row = audited(p, action, lambda job_id: f"job:{job_id}", {"kind": kind, **dict(params)})
    lim = limits.Limits.from_env()

    def and_then(session: Any, job_id: int) -> None:  # in the job row's transaction
        if parent is None:  # a parent's children wait in the queue past the cap
            lock_for_write(session)  # two tabs submitting at once count each other's job
            n = job_store.count_open_units(session=session, created_by=p.identity,
                                           kinds=(kind,))
            limits.check_jobs(n - 1, lim, p.identity, kind)  # n counts the new job itself
        made.append(job_id)
        audit_row(session, job_id)
    try:
        job = submit(db, kind, params, created_by=p.identity, and_then=and_then, parent=parent)
    except QuotaExceeded as exc:
        record(db, p, action, kind, outcome="denied", detail={"why": str(exc)})
        raise
    if not made:  # an open job with these params was returned: nothing new to commit with
        record(db, p, action, f"job:{job}", detail={"kind": kind, "existing": True,
                                                    **dict(params)})
    return job


def _submit_view(db: Database, p: Principal, kind: str, params: Mapping[str, Any],
                 submit: Callable[..., int], parent: str | None = None) -> int:
    """A view job: read-only, so a success is not audited (every page view would be a row);
    a new one past the user's cap is refused, and that is. An open job with the same params
    (``submit_once``) is returned without counting."""

    lim = limits.Limits.from_env()

    def cap(session: Any, job_id: int) -> None:  # in the new job's transaction
        if parent is not None:  # counted once through its parent, never refused
            return
        lock_for_write(session)  # two tabs submitting at once count each other's job
        n = job_store.count_open_units(session=session, created_by=p.identity,
                                       kinds=queue.VIEW_KINDS)
        limits.check_view_jobs(n - 1, lim, p.identity)  # n counts the new job itself
    try:
        return submit(db, kind, params, created_by=p.identity, and_then=cap, parent=parent)
    except QuotaExceeded as exc:
        record(db, p, "compute_view", kind, outcome="denied", detail={"why": str(exc)})
        raise
