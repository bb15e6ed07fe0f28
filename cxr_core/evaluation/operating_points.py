"""A run's operating point as user actions: chosen on validation, set by hand, read back.

A run's threshold is chosen on validation outputs (:func:`set_operating_point`, usually by
training) or set by a person (:func:`set_manual_threshold`, an explicit, recorded action). Both
append a row; the newest row is the run's operating point, used by Compare, Predict and
:func:`cxr_core.models.store.decide`. Choosing is :mod:`cxr_core.stats.thresholds` (pure); the rows
are :mod:`cxr_core.storage.evals`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError, RunError
from cxr_core.stats.metrics import POSITIVE
from cxr_core.stats.thresholds import choose_threshold
from cxr_core.storage import AndThen, Database
from cxr_core.storage import evals as store
from cxr_core.storage.evals import OperatingPoint


def _require_run(db: Database, run_id: int) -> None:
    with db.session() as s:
        if store.get_run_brief(session=s, run_id=run_id) is None:
            raise RunError(f"no run with id {run_id}. Received: run_id={run_id}")


def set_operating_point(db: Database, *, run_id: int, y_true: Any, p_pos: Any,
                        method: str = "sensitivity", target: float = 0.95,
                        changed_by: str = "system", note: str = "",
                        details: dict | None = None) -> OperatingPoint:
    """Choose a threshold on held-out outputs and make it the run's (global) operating point.

    Args:
        db: the database.
        run_id: the run.
        y_true: binary labels (1 = positive) of the images it is chosen on.
        p_pos: positive-class probabilities (N,) or (N, 2).
        method: "sensitivity" (highest threshold reaching ``target``) or "youden".
        target: target sensitivity for method "sensitivity".
        changed_by: who (or what) set it.
        note: why.
        details: stored with the row, e.g. ``{"chosen_on": "calibration"}`` (the split the
            threshold was chosen on: numbers scored there are not independent of it).

    Returns:
        The stored operating point (sensitivity/specificity reached on these data).

    Raises:
        ConfigError: bad inputs, multi-class probabilities or unknown method.
        RunError: no such run.
    """
    chosen = choose_threshold(y_true, p_pos, method=method,  # type: ignore[arg-type]
                              target_sensitivity=target)
    _require_run(db, run_id)
    return db.write(lambda s: store.add_operating_point(
        session=s, run_id=run_id, threshold=chosen.threshold, method=chosen.method,
        target=chosen.target, sensitivity=chosen.sensitivity, specificity=chosen.specificity,
        changed_by=changed_by or "system", note=note, sample_n=len(np.asarray(y_true)),
        details=details))


def set_prior_point(db: Database, *, run_id: int, y_true: Any, p_pos: Any, priors: dict,
                    changed_by: str = "training") -> OperatingPoint:
    """A two-class argmax model's operating point (the subtype step): 0.5 on probabilities
    already moved to the target prior (``priors``: the card's train/target priors), i.e. the
    Bayes decision at that prior, with the sensitivity/specificity it reaches on these data.

    Raises:
        ConfigError: probabilities that are not two-class.
        RunError: no such run.
    """
    p = np.asarray(p_pos, dtype=float)
    p = p[:, 1] if p.ndim == 2 else p
    y = np.asarray(y_true, dtype=int)
    if p.shape != y.shape:
        raise ConfigError(f"y_true and p_pos must match. Received: {y.shape} and {p.shape}")
    pred = p >= 0.5
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else None
    spec = float((~pred[neg]).mean()) if neg.any() else None
    _require_run(db, run_id)
    details = {"chosen_on": "priors", "train_prior": priors.get("train"),
               "target_prior": priors.get("target"), "target_source": priors.get("target_source")}
    return db.write(lambda s: store.add_operating_point(
        session=s, run_id=run_id, threshold=0.5, method="priors", target=None,
        sensitivity=sens, specificity=spec, changed_by=changed_by,
        note="the decision at the target prior (probabilities moved from the training prior)",
        sample_n=int(y.size), details=details))


def set_manual_threshold(db: Database, *, run_id: int, threshold: float, changed_by: str,
                         note: str = "", evaluation_id: int | None = None,
                         and_then: AndThen | None = None) -> OperatingPoint:
    """A person sets the run's threshold by hand: recorded with who, when and why.

    Args:
        db: the database.
        run_id: the run.
        threshold: the new binary threshold (positive iff p >= threshold), in [0, 1].
        changed_by: the person's name (required: this is an accountable action).
        note: the reason.
        evaluation_id: optionally, a stored binary evaluation of this run on which the
            sensitivity/specificity at the new threshold are computed and recorded.
        and_then: ``and_then(session, operating_point)`` in the same transaction (the audit
            row of :func:`cxr_core.evaluation.actions.set_manual_threshold`).

    Returns:
        The new operating point.

    Raises:
        ConfigError: empty name, threshold outside [0, 1], or an evaluation that is not
            a binary evaluation of this run.
        RunError: no such run.
    """
    if not (changed_by or "").strip():
        raise ConfigError("changing a run's threshold needs the name of who changes it. "
                          f"Received: changed_by={changed_by!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    _require_run(db, run_id)
    sens = spec = None
    if evaluation_id is not None:
        sens, spec = _sens_spec_at(db, run_id, evaluation_id, float(threshold))
    details = {"chosen_on": "manual"}
    if evaluation_id is not None:
        details["measured_on_evaluation"] = evaluation_id
    return db.write(lambda s: store.add_operating_point(
        session=s, run_id=run_id, threshold=float(threshold), method="manual", target=None,
        sensitivity=sens, specificity=spec, changed_by=changed_by.strip(), note=note,
        details=details), and_then=and_then)


def _sens_spec_at(db: Database, run_id: int, evaluation_id: int,
                  threshold: float) -> tuple[float, float]:
    with db.session() as s:
        info = store.get_evaluation(session=s, evaluation_id=evaluation_id)
        preds = store.get_predictions(session=s, evaluation_id=evaluation_id)
    if info is None or preds is None or info.run_id != run_id or len(info.labels) != 2:
        raise ConfigError(f"evaluation {evaluation_id} is not a binary evaluation of run "
                          f"{run_id}. Received: evaluation_id={evaluation_id}")
    pred = (preds.probs[:, POSITIVE] >= threshold).astype(np.int64)
    y = preds.y_true
    pos, neg = y == POSITIVE, y != POSITIVE
    sens = float(np.mean(pred[pos] == 1)) if pos.any() else float("nan")
    spec = float(np.mean(pred[neg] == 0)) if neg.any() else float("nan")
    return sens, spec


def get_operating_point(db: Database, run_id: int) -> OperatingPoint | None:
    """The run's global operating point (the newest history row without a dataset), or None
    when it has none. A dataset's own one: :mod:`cxr_core.evaluation.site_thresholds`."""
    with db.session() as s:
        return store.latest_operating_point(session=s, run_id=run_id)


def operating_point_history(db: Database, run_id: int) -> list[OperatingPoint]:
    """Every threshold the run has had, newest first (the first one is in force)."""
    with db.session() as s:
        return store.operating_points(session=s, run_id=run_id)
