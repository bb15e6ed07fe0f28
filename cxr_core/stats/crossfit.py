"""Cross-fitted site thresholds: what a threshold chosen on a site's own labelled films gives on
films it was not chosen on.

A threshold chosen on a sample and scored on the same sample flatters it. Cross-fitting splits
the site's images into ``folds`` patient-grouped, class-stratified folds; the threshold (the
highest reaching the target sensitivity, :func:`cxr_core.stats.thresholds.threshold_for_sensitivity`)
is chosen on all folds but one and applied to that one; the decisions are pooled over the folds.
That is repeated ``repeats`` times with other fold draws; the figure is the median over repeats,
with a percentile interval from resampling whole patients (stratified by their class set, as
:func:`cxr_core.stats.intervals.bootstrap_intervals`), each resample scored as the median over
the repeats' decisions. Pure numpy / scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from cxr_core.core.errors import ConfigError
from cxr_core.stats.intervals import Interval, cluster_ids, cluster_strata
from cxr_core.stats.metrics import validate_binary
from cxr_core.stats.thresholds import DEFAULT_TARGET_SENSITIVITY, threshold_for_sensitivity

MIN_PER_CLASS = 10  # fewer images of a class than this: no site threshold (refused)
FOLDS = 5
REPEATS = 20


@dataclass(frozen=True)
class CrossFit:
    """A site threshold's cross-fitted figures on the site's own images."""

    sensitivity: Interval
    specificity: Interval
    accuracy: float  # median over repeats
    threshold: float  # median of every fold's chosen threshold (the figures are not at it)
    threshold_range: tuple[float, float]  # min, max over folds and repeats
    target: float
    folds: int
    repeats: int
    n: int
    n_patients: int
    per_repeat: tuple[tuple[float, float], ...] = field(default=(), repr=False)  # (sens, spec)

    def to_json(self) -> dict:
        ci = lambda iv: [iv.low, iv.high]  # noqa: E731
        return {"method": "cross-fitted", "target_sensitivity": self.target,
                "folds": self.folds, "repeats": self.repeats, "n": self.n,
                "n_patients": self.n_patients,
                "sensitivity": self.sensitivity.estimate, "sensitivity_ci": ci(self.sensitivity),
                "specificity": self.specificity.estimate, "specificity_ci": ci(self.specificity),
                "accuracy": self.accuracy, "threshold_median": self.threshold,
                "threshold_range": list(self.threshold_range)}


def check_sample(y: np.ndarray, *, min_per_class: int = MIN_PER_CLASS) -> None:
    """Raise ConfigError unless both classes have at least ``min_per_class`` images."""
    counts = np.bincount(y, minlength=2)
    if counts.min() < min_per_class:
        raise ConfigError(f"a site threshold needs at least {min_per_class} images of each "
                          f"class. Received: {int(counts[0])} normal, {int(counts[1])} "
                          "pneumonia")


def _fold_decisions(y: np.ndarray, p: np.ndarray, clusters: np.ndarray, folds: int,
                    target: float, seed: int) -> tuple[np.ndarray, list[float]]:
    """One repeat: out-of-fold decisions (N,) and the threshold chosen for each fold."""
    n_splits = min(folds, int(np.bincount(y).min()), len(np.unique(clusters)))
    if n_splits < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds with both classes. Received: "
                          f"{np.bincount(y, minlength=2).tolist()} images per class")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pred = np.zeros(y.size, dtype=np.int64)
    chosen = []
    for fit_idx, score_idx in splitter.split(p, y, clusters):
        if np.bincount(y[fit_idx], minlength=2).min() == 0:
            raise ConfigError("a fold's threshold sample lacks a class; use fewer folds")
        thr = threshold_for_sensitivity(y[fit_idx], p[fit_idx], target)
        pred[score_idx] = (p[score_idx] >= thr).astype(np.int64)
        chosen.append(thr)
    return pred, chosen


def cross_fitted_decisions(y: np.ndarray, p: np.ndarray, clusters: np.ndarray, *,
                           target: float = DEFAULT_TARGET_SENSITIVITY, folds: int = FOLDS,
                           repeats: int = REPEATS, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold decisions (repeats, N) of site thresholds, and every threshold chosen.

    Args:
        y, p: validated 0/1 labels and P(pneumonia).
        clusters: patient cluster id per image (:func:`cxr_core.stats.intervals.cluster_ids`).
        target, folds, repeats, seed: as :func:`cross_fitted_threshold`.
    """
    decisions, thresholds = [], []
    for r in range(repeats):
        pred, chosen = _fold_decisions(y, p, clusters, folds, target, seed + r)
        decisions.append(pred)
        thresholds += chosen
    return np.stack(decisions), thresholds


def decision_intervals(y: np.ndarray, preds: np.ndarray, clusters: np.ndarray, *,
                       n_boot: int = 500, seed: int = 0) -> tuple[Interval, Interval, float]:
    """Sensitivity and specificity of decisions ``preds`` (repeats, N) — the median over the
    repeats — with percentile intervals from resampling whole patients (stratified by their
    class set); and the median accuracy. A single decision vector is one repeat."""
    preds = np.atleast_2d(preds)
    pos, neg = y == 1, y == 0
    sens = float(np.median(preds[:, pos].mean(axis=1)))
    spec = float(np.median(1.0 - preds[:, neg].mean(axis=1)))
    acc = float(np.median((preds == y).mean(axis=1)))
    boot_sens, boot_spec = [], []
    if n_boot:
        rng = np.random.default_rng(seed)
        strata, expand = cluster_strata(y, clusters, 2)
        for _ in range(n_boot):
            idx = expand(np.concatenate([s[rng.integers(0, s.size, s.size)] for s in strata]))
            yb = y[idx]
            pb, nb = yb == 1, yb == 0
            if not pb.any() or not nb.any():
                continue
            db = preds[:, idx]
            boot_sens.append(float(np.median(db[:, pb].mean(axis=1))))
            boot_spec.append(float(np.median(1.0 - db[:, nb].mean(axis=1))))

    def interval(point: float, draws: list[float]) -> Interval:
        if not draws:
            return Interval(point, float("nan"), float("nan"), 0.95, n_boot)
        low, high = np.percentile(draws, [2.5, 97.5])
        return Interval(point, float(low), float(high), 0.95, n_boot)

    return interval(sens, boot_sens), interval(spec, boot_spec), acc


def cross_fitted_threshold(y_true, p_pos, groups=None, *,
                           target: float = DEFAULT_TARGET_SENSITIVITY, folds: int = FOLDS,
                           repeats: int = REPEATS, seed: int = 0, n_boot: int = 500,
                           min_per_class: int = MIN_PER_CLASS) -> CrossFit:
    """Sensitivity and specificity of a site threshold on images it was not chosen on.

    Args:
        y_true: 0 (normal) / 1 (pneumonia) per image.
        p_pos: P(pneumonia) per image.
        groups: patient id per image (None: each image its own patient); folds and the
            bootstrap keep a patient's images together.
        target: sensitivity the threshold aims at on its choosing folds.
        folds, repeats, seed: the fold draws (repeat r uses ``seed + r``).
        n_boot: patient resamples for the intervals (0: no interval).
        min_per_class: a sample with fewer images of a class is refused.

    Returns:
        The medians over repeats with their patient-clustered 95% intervals.

    Raises:
        ConfigError: bad inputs, or too few images of a class.
    """
    y, p = validate_binary(y_true, p_pos)
    check_sample(y, min_per_class=min_per_class)
    clusters = cluster_ids([None] * y.size if groups is None else groups, y.size)
    preds, thresholds = cross_fitted_decisions(y, p, clusters, target=target, folds=folds,
                                               repeats=repeats, seed=seed)
    sens, spec, acc = decision_intervals(y, preds, clusters, n_boot=n_boot, seed=seed)
    per = tuple((float(d[y == 1].mean()), float(1.0 - d[y == 0].mean())) for d in preds)
    return CrossFit(sens, spec, acc, float(np.median(thresholds)),
                    (float(min(thresholds)), float(max(thresholds))), target, folds, repeats,
                    int(y.size), int(len(np.unique(clusters))), per)
