"""The search actions a principal may take: create a study (its first trials queued), stop it,
promote its best trial. Roles through :mod:`cxr_core.auth.gate` (``search``: scientist and
admin; stopping another's study needs ``cancel_any_run``); the study row and its audit row
commit together; a promoted run is started like any run (:func:`training.actions.start_run`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.auth.gate import audited, authorize, authorize_owned, record
from cxr_core.auth.policy import Principal
from cxr_core.core import limits
from cxr_core.core.errors import ConfigError
from cxr_core.jobs import launcher
from cxr_core.search import study as studies
from cxr_core.search.config import StudyConfig
from cxr_core.storage import Database, optuna_store
from cxr_core.storage import audit as audit_store
from cxr_core.storage import runs as run_store
from cxr_core.storage import studies as store
from cxr_core.training import actions as training_actions
from cxr_core.training import inputs
from cxr_core.training import service as training_service


@dataclass(frozen=True)
class Created:
    """A new study: its id and name, the runs of its first trials, warnings to show."""

    study_id: int
    name: str
    run_ids: tuple[int, ...]
    warnings: tuple[str, ...]
    worker_pid: int | None = None

    def to_json(self) -> dict:
        return {"study": self.name, "id": self.study_id, "queued_runs": list(self.run_ids),
                "warnings": list(self.warnings), "worker_pid": self.worker_pid}


def resolve_config(db: Database, data: Mapping[str, Any],
                   base_dir: str | Path | None = None) -> StudyConfig:
    """A study config with its base run config resolved as a run's would be (dataset path,
    saved augmentation preset, external datasets) and its objective dataset checked to be
    flagged external.

    Raises:
        ConfigError, DatasetError: naming the bad field.
    """
    raw = StudyConfig.from_dict(data)  # the shape and the space first: errors name fields
    base = training_service.make_config(db, raw.base_config().to_dict(), base_dir).to_dict()
    return StudyConfig.from_dict({**raw.to_dict(), "base": base})


def _check_limits(db: Database, p: Principal, cfg: StudyConfig) -> None:
    lim = limits.Limits.from_env()
    try:
        configs = [cfg.base_config()] + [cfg.trial_config({q.name: v})
                                         for q in cfg.space for v in q.values_to_check()]
        for c in configs:
            limits.check_run(c, lim)
        if lim.max_train_images:  # the images a trial would really train on
            limits.check_run(cfg.base_config(), lim,
                             n_images=inputs.count_training_images(db, cfg.base_config()))
        with db.session() as s:  # admitted once: its trials (parent "study:N") count as one
            limits.check_active(audit_store.count_active_runs(session=s, created_by=p.identity),
                                lim, p.identity)
    except Exception as exc:
        record(db, p, "search", outcome="denied", detail={"why": str(exc)})
        raise


def create_study(db: Database, p: Principal, cfg: StudyConfig, *,
                 start_worker: bool = True) -> Created:
    """Check the role and limits; create the Optuna study in its own store and the app's
    study row (with its audit row, one transaction); then queue its first ``parallel``
    trials and make sure a worker serves them.

    Raises:
        PermissionDenied, ConfigError, QuotaExceeded, RunError (the name is taken).
    """
    authorize(db, p, "search")
    _check_limits(db, p, cfg)
    url = optuna_store.store_url()
    with db.session() as s:
        if store.get_study(session=s, name_or_id=cfg.name) is not None:
            raise ConfigError(f"a study named {cfg.name!r} exists; choose another name. "
                              f"Received: name={cfg.name!r}")
    optuna_name = studies.create_optuna_study(cfg, url)
    warnings = tuple(cfg.warnings())
    study_id = db.write(
        lambda s: store.create_study(session=s, name=cfg.name, config=cfg.to_dict(),
                                     optuna_study=optuna_name,
                                     optuna_url=optuna_store.redacted(url),
                                     created_by=p.identity, note=" ".join(warnings) or None),
        and_then=audited(p, "search", lambda sid: f"study:{sid}",
                         {"name": cfg.name, "n_trials": cfg.n_trials,
                          "parallel": cfg.parallel, "objective": cfg.objective.describe(),
                          "space": sorted(q.name for q in cfg.space)}))
    first = studies.advance(db, study_id)
    pid = launcher.ensure_worker(db) if start_worker and first.queued else None
    return Created(study_id, cfg.name, first.queued, warnings, pid)


def stop_study(db: Database, p: Principal, name_or_id: str | int) -> dict:
    """Stop a study: no new trial is asked; its queued trials are cancelled at once and its
    running ones within a batch (each then told to Optuna as pruned or failed, never left
    running). Returns the study's status."""
    study = studies.get_study(db, name_or_id)
    authorize_owned(db, p, owner=study.created_by, own="search", any_="cancel_any_run",
                    target=f"study:{study.id}")

    def work(s) -> list[int]:
        store.update_study(session=s, study_id=study.id, status="stopped",
                           note=f"stopped by {p.identity}")
        cancelled = []
        for run in store.trial_runs(session=s, study_id=study.id):
            if run.active:
                run_store.request_cancel(session=s, run_id=run.id)
                cancelled.append(run.id)
        return cancelled

    cancelled = db.write(work, and_then=audited(p, "search", f"study:{study.id}",
                                                lambda ids: {"what": "stop", "runs": ids}))
    studies.advance(db, study.id)  # the queued ones, cancelled now, are told at once
    return {"study": study.name, "status": "stopped", "cancelled_runs": cancelled}


def promote_best(db: Database, p: Principal, name_or_id: str | int,
                 changes: Mapping[str, Any] | None = None, *,
                 start_worker: bool = True) -> dict:
    """"Promote the best trial": retrain its values with the full recipe (every image, the
    calibration slice, no pruning) as a new ordinary run (:func:`study.promote_config`),
    started like any run (role, limits, quota, audit). Returns the run id and its config."""
    study = studies.get_study(db, name_or_id)
    authorize(db, p, "search", target=f"study:{study.id}")
    cfg = training_service.make_config(db, studies.promote_config(db, study.id, changes))
    run_id, pid = training_actions.start_run(db, p, cfg, start_worker=start_worker)
    studies.record_promoted(db, study.id, run_id)
    return {"study": study.name, "run_id": run_id, "worker_pid": pid,
            "config": cfg.to_dict()}
