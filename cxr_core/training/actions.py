"""The training actions a principal may take: start a run (queued for a worker, or in this
process for the CLI), cancel and resume (own runs, or anyone's as admin). The role, the per-run
limits and the user's active-run quota are checked first; the run row, its owner and its audit
row commit together (:mod:`cxr_core.auth.gate`).
"""
from __future__ import annotations

from typing import Any

from cxr_core.auth.gate import audited, authorize, authorize_owned, record
from cxr_core.auth.policy import Principal
from cxr_core.core import limits
from cxr_core.core.errors import RunError
from cxr_core.jobs import launcher
from cxr_core.storage import AndThen, Database
from cxr_core.storage import audit as store
from cxr_core.storage import label_audits as audit_store
from cxr_core.training import inputs
from cxr_core.training import label_audit
from cxr_core.training import service as training_service


def _check_run_request(db: Database, p: Principal, cfg: Any, parent: str | None = None) -> None:
    """The role, the per-run limits and the user's active-run quota (a refusal is audited).
    A run with a ``parent`` is not held to the quota: its parent was admitted once, and the
    quota counts the parent's runs as one (:mod:`cxr_core.core.limits`)."""

    authorize(db, p, "train")
    lim = limits.Limits.from_env()
    try:
        # The images it would really train on (a whole-dataset run is judged by them too).
        n = inputs.count_training_images(db, cfg) if lim.max_train_images else None
        limits.check_run(cfg, lim, n_images=n)
        if parent is None:
            with db.session() as s:
                limits.check_active(store.count_active_runs(session=s, created_by=p.identity),
                                    lim, p.identity)
    except Exception as exc:
        record(db, p, "train", outcome="denied", detail={"why": str(exc)})
        raise


def _train_ok(p: Principal, cfg: Any, name: str | None, **extra: Any) -> AndThen:
    return audited(p, "train", lambda rid: f"run:{rid}",
               {"name": name or cfg.name, "model": getattr(cfg, "model", ""), **extra})


def start_run(db: Database, p: Principal, cfg: Any, *, name: str | None = None,
              start_worker: bool = True, parent: str | None = None) -> tuple[int, int | None]:
    """Check the role, the per-run limits and the user's active-run quota; queue the run (its
    row, owner and audit row in one transaction), then make sure a worker serves it: (run id,
    local worker pid or None). A run with a ``parent`` (``"audit:7"``, ``"study:3"``) waits in
    the queue past the quota; the quota counts its parent once."""

    _check_run_request(db, p, cfg, parent)
    run_id = training_service.queue_run(db, cfg, name=name, created_by=p.identity,
                                        and_then=_train_ok(p, cfg, name, parent=parent)
                                        if parent else _train_ok(p, cfg, name),
                                        parent=parent)
    pid = None
    if start_worker:  # after the commit: a worker never sees a run without its audit row
        pid = launcher.ensure_worker(db)
    return run_id, pid


def train_here(db: Database, p: Principal, cfg: Any, *, name: str | None = None,
               progress: Any = None) -> Any:
    """The CLI's ``train`` without ``--detach``: the same checks as :func:`start_run`, then the
    run (owned by ``p``, its audit row in the run row's transaction) trains in this process.
    Returns the worker's RunOutcome."""

    _check_run_request(db, p, cfg)
    return training_service.run_in_process(db, cfg, name=name, progress=progress,
                                           created_by=p.identity,
                                           and_then=_train_ok(p, cfg, name, in_process=True))


def _run_owner(db: Database, run_id: int) -> str | None:

    if training_service.get_run(db, run_id) is None:
        raise RunError(f"no run with id {run_id}. Received: run_id={run_id}")
    with db.session() as s:
        return store.run_owner(session=s, run_id=run_id)


def cancel_run(db: Database, p: Principal, run_id: int) -> str:

    action = authorize_owned(db, p, owner=_run_owner(db, run_id), own="cancel_own_run",
                              any_="cancel_any_run", target=f"run:{run_id}")
    return training_service.cancel_run(
        db, run_id, and_then=audited(p, action, f"run:{run_id}",
                                 lambda status: {"status": status, "what": "cancel"}))


def resume_run(db: Database, p: Principal, run_id: int, *, start_worker: bool = True) -> None:

    action = authorize_owned(db, p, owner=_run_owner(db, run_id), own="cancel_own_run",
                              any_="cancel_any_run", target=f"run:{run_id}")
    training_service.resume_run(db, run_id, start_worker=start_worker,
                                and_then=audited(p, action, f"run:{run_id}", {"what": "resume"}))


def start_label_audit(db: Database, p: Principal, cfg: Any, *, folds: int = 5, seed: int = 0,
                      start_worker: bool = True) -> tuple[int, list[int]]:
    """Check the role (``label_audit``), the per-run limits (each fold is one run of ``cfg``)
    and the user's active-run quota (an audit's folds count once), then store the audit and
    queue its fold runs (the audit row in the same transaction); a worker is started after
    the commit unless ``start_worker`` is False. Returns (audit id, fold run ids)."""

    authorize(db, p, "label_audit", str(cfg.dataset))
    label_audit.check_folds(folds)
    lim = limits.Limits.from_env()
    try:
        n = inputs.count_training_images(db, cfg) if lim.max_train_images else None
        limits.check_run(cfg, lim, n_images=n)
        with db.session() as s:
            limits.check_active(store.count_active_runs(session=s, created_by=p.identity),
                                lim, p.identity)
    except Exception as exc:
        record(db, p, "label_audit", str(cfg.dataset), outcome="denied",
               detail={"why": str(exc)})
        raise
    audit_id, run_ids = label_audit.start_audit(
        db, cfg, folds=folds, seed=seed, created_by=p.identity,
        and_then=audited(p, "label_audit", lambda a: f"label_audit:{a}",
                         {"dataset": cfg.dataset, "folds": folds, "seed": seed,
                          "label_scheme": cfg.label_scheme, "label_source": cfg.label_source}))
    if start_worker:
        launcher.ensure_worker(db)
    return audit_id, run_ids


def resume_label_audit(db: Database, p: Principal, audit_id: int, *,
                       start_worker: bool = True) -> list[int]:
    """Resume an audit's failed or cancelled fold runs (own audits, or anyone's as admin),
    each from its last checkpoint; returns their ids."""

    with db.session() as s:
        owner = audit_store.require_audit(session=s, audit_id=audit_id).created_by
    action = authorize_owned(db, p, owner=owner, own="cancel_own_run", any_="cancel_any_run",
                             target=f"label_audit:{audit_id}")
    run_ids = label_audit.resumable_folds(db, audit_id)
    for run_id in run_ids:
        training_service.resume_run(db, run_id, start_worker=False, and_then=audited(
            p, action, f"run:{run_id}", {"what": "resume", "label_audit": audit_id}))
    if run_ids and start_worker:
        launcher.ensure_worker(db)
    return run_ids
