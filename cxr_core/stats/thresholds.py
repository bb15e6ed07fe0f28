"""Binary operating points: the threshold reaching a target sensitivity, Youden's J, and
matched-sensitivity thresholds for comparing runs.

Thresholds are chosen on validation data and stored with the run
(:mod:`cxr_core.evaluation.operating_points`); Predict and Compare use the stored one. Multi-class
problems have no threshold: the argmax is their operating point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn import metrics as skm

from cxr_core.core.errors import ConfigError
from cxr_core.core.json_safe import jsonable
from cxr_core.stats.metrics import POSITIVE, confusion, sens_spec, validate_binary

DEFAULT_TARGET_SENSITIVITY = 0.95  # the operating point every recipe and ensemble aims at

@dataclass(frozen=True)
class OperatingPoint:
    """A binary decision threshold and how it performs on the data it was chosen on."""

    threshold: float  # predict positive iff p_pos >= threshold
    method: Literal["sensitivity", "youden"]
    target: float | None  # target sensitivity for method "sensitivity"; None for "youden"
    sensitivity: float
    specificity: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, to store with a run."""
        return jsonable(vars(self))


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target_sensitivity must be in (0, 1]. Received: {target}")


def threshold_for_sensitivity(y_true: Any, p_pos: Any,
                              target: float = DEFAULT_TARGET_SENSITIVITY) -> float:
    """The highest threshold whose sensitivity on these data is >= ``target``.

    Predictions are ``positive iff p_pos >= threshold``. Sensitivity only drops as the
    threshold rises, so the highest qualifying threshold is the k-th highest positive score,
    with k the fewest positives meeting the target; it maximises specificity among all
    thresholds meeting the target. Use it on validation data, or on each run's scores for
    "matched sensitivity" comparisons (see :func:`matched_thresholds`).

    Args:
        y_true: binary labels (N,), 1 = positive; both classes must occur.
        p_pos: positive-class probabilities (N,), or (N, 2) probabilities.
        target: sensitivity to reach, in (0, 1].

    Returns:
        The threshold (one of the positive scores).

    Raises:
        ConfigError: bad inputs, multi-class probabilities, or a target outside (0, 1].
    """
    _check_target(target)
    y, p = validate_binary(y_true, p_pos)
    pos_scores = np.sort(p[y == POSITIVE])[::-1]
    # Same division the check `hits / n_pos >= target` does, so no float surprise at k/n == target.
    reached = np.arange(1, pos_scores.size + 1) / pos_scores.size >= target
    k = int(np.argmax(reached))  # first True; the last entry (sensitivity 1.0) always is
    return float(pos_scores[k])


def _youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising J = sens + spec - 1; ties go to the highest threshold."""
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thr)  # drop sklearn's leading inf ("nothing positive", J = 0)
    j = (tpr - fpr)[finite]
    return float(thr[finite][int(np.argmax(j))])  # thresholds descend: argmax = highest tie


def choose_threshold(y_true: Any, p_pos: Any, *,
                     method: Literal["sensitivity", "youden"] = "sensitivity",
                     target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> OperatingPoint:
    """Choose a binary operating point on (validation) data.

    Args:
        y_true: binary labels (N,), 1 = positive; both classes must occur.
        p_pos: positive-class probabilities (N,), or (N, 2) probabilities.
        method: "sensitivity": the highest threshold with sensitivity >= target (so the
            target is met with the best specificity); "youden": maximise J = sens + spec - 1.
        target_sensitivity: the target for method "sensitivity", in (0, 1].

    Returns:
        An :class:`OperatingPoint` with the sensitivity/specificity reached on these data.

    Raises:
        ConfigError: unknown method, multi-class probabilities (the argmax is the operating
            point there), or bad inputs.
    """
    if method not in ("sensitivity", "youden"):
        raise ConfigError("method must be 'sensitivity' or 'youden'. "
                          f"Received: method={method!r}")
    y, p = validate_binary(y_true, p_pos)
    if method == "sensitivity":
        threshold = threshold_for_sensitivity(y, p, target_sensitivity)
        target: float | None = float(target_sensitivity)
    else:
        threshold, target = _youden_threshold(y, p), None
    sens, spec = sens_spec(confusion(y, (p >= threshold).astype(np.int64), 2))
    return OperatingPoint(threshold, method, target, float(sens[POSITIVE]), float(spec[POSITIVE]))


def matched_thresholds(y_true: Any, probs_by_run: dict[str, Any],
                       target: float = 0.95) -> dict[str, float]:
    """Per-run thresholds that all reach the same sensitivity on the same images.

    Args:
        y_true: binary labels (N,) shared by all runs.
        probs_by_run: run name → positive-class probabilities (N,) or (N, 2).
        target: the sensitivity every run must reach, in (0, 1].

    Returns:
        Run name → :func:`threshold_for_sensitivity` of that run.

    Raises:
        ConfigError: as :func:`threshold_for_sensitivity`.
    """
    return {run: threshold_for_sensitivity(y_true, p, target) for run, p in probs_by_run.items()}
