"""What a worker does with a run that is a study's trial, and the loop's study tick.

:func:`process_run` is the ``run_one`` the composition root gives the worker loop: an
ordinary run goes straight to :func:`cxr_core.training.runner.process_run`; a trial also gets
an epoch hook that reports the per-epoch validation metric to its Optuna trial and asks the
pruner (a pruned trial's run ends "cancelled" with a ``pruned ...`` reason), and when the run
ends the study is advanced: Optuna is told the result, and the next trial is asked for and
queued (:func:`cxr_core.search.study.advance`). :func:`tick` runs every loop turn: studies
whose trials ended elsewhere (a killed worker's trial, reaped as failed) are advanced too.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from cxr_core.search import study as studies
from cxr_core.search.config import StudyConfig
from cxr_core.storage import Database, optuna_store
from cxr_core.storage.studies import StudyRecord
from cxr_core.training import runner
from cxr_core.training import service as training_service


def pruning_hook(study: StudyRecord, trial_number: int, storage: Any,
                 epochs: int) -> Callable:
    """An epoch hook reporting ``intermediate_key`` to the trial after every epoch and asking
    its pruner after every epoch but the last (a trial that ran to its end completes).

    Optuna's errors (a store that went away, a trial already ended) are logged and the run
    goes on: a pruning report never fails a trial.
    """
    import optuna

    cfg = StudyConfig.from_dict(study.config)
    ostudy = studies.load(study, storage)
    trial_id = storage.get_trial_id_from_study_id_trial_number(ostudy._study_id, trial_number)
    trial = optuna.trial.Trial(ostudy, trial_id)
    key = cfg.intermediate_key

    def hook(epoch: int, logs: dict[str, float]) -> str | None:
        value = logs.get(key)
        if value is None or not math.isfinite(value):
            return None
        try:
            trial.report(float(value), epoch)
            if epoch < epochs and trial.should_prune():
                return (f"{studies.PRUNED_PREFIX} by the study's {cfg.pruner} pruner after epoch "
                        f"{epoch} ({key} {value:.4f}): trial {trial_number} of "
                        f"{study.name!r}")
        except (optuna.exceptions.OptunaError, RuntimeError, ValueError) as exc:
            print(f"pruning report for trial {trial_number} failed: {exc}", file=sys.stderr)
        return None

    return hook


def process_run(db: Database, run_id: int, *, progress: Any = None) -> runner.RunOutcome:
    """Train a claimed run; a trial reports to its pruner, then advances its study."""
    study = studies.trial_of(db, run_id)
    if study is None:
        outcome = runner.process_run(db, run_id, progress=progress)
        if (promoted := studies.promoted_from(db, run_id)) is not None:
            studies.mark_selected_on(db, run_id, promoted)
        return outcome
    run = training_service.get_run(db, run_id)
    number = run.trial_number
    with optuna_store.optuna_storage(studies.store_url(study)) as storage:
        try:
            hook = pruning_hook(study, number, storage, int(run.config.get("epochs") or 0))
        except Exception as exc:  # noqa: BLE001  (no pruning rather than no trial)
            print(f"trial {number}: no pruning reports ({exc})", file=sys.stderr)
            hook = None
        outcome = runner.process_run(db, run_id, progress=progress, epoch_hook=hook)
    studies.mark_selected_on(db, run_id, study)
    studies.advance(db, study.id)
    return outcome


def tick(db: Database) -> dict:
    """A worker loop's turn: advance the studies that are due (:func:`study.advance_due`)."""
    return studies.advance_due(db)
