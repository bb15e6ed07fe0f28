"""Probabilities → metrics: confusion matrix, ROC/PR, calibration, operating points, CIs, McNemar.

Input convention used throughout:

* ``y_true``: int array (N,) of class indices ``0..C-1``.
* ``probs``: float array (N, C) of class probabilities (rows sum to 1). For binary problems
  column 1 is the positive class ("PNEUMONIA"); a (N,) vector of positive-class
  probabilities is also accepted and becomes ``[1 - p, p]``.
* ``labels``: the C class names, in column order.

Binary predictions are ``positive iff p_pos >= threshold``; multi-class predictions are the
argmax (the argmax *is* the operating point there). Everything here is pure numpy / scipy /
scikit-learn and returns data; plotting happens in the pages from the long-form ``*_table``
helpers (``px.line(rows, x="fpr", y="tpr", color="run")``).

Bad inputs raise :class:`~cxr_core.errors.ConfigError` (a ``ValueError``) whose message says
what was expected and what was received.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from cxr_core.errors import ConfigError

__all__ = [
    "Calibration",
    "ClassMetrics",
    "Curve",
    "EvalReport",
    "Interval",
    "McNemarResult",
    "OperatingPoint",
    "calibration_table",
    "choose_threshold",
    "confusion_table",
    "disagreements",
    "evaluate",
    "matched_thresholds",
    "mcnemar",
    "metrics_table",
    "pr_table",
    "predict",
    "roc_table",
    "threshold_for_sensitivity",
]

POSITIVE = 1  # column of the positive class ("PNEUMONIA") in binary probs
_SUM_TOL = 1e-3  # float32 softmax rows can miss 1.0 by ~1e-6; 1e-3 still catches real mistakes
_RANGE_TOL = 1e-6  # allowed excursion outside [0, 1] before clipping (float noise)
_EXACT_BELOW = 25  # McNemar: exact binomial test when b + c < 25, chi-square otherwise


# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------
def _frozen_array(values: Any, dtype: Any = float) -> np.ndarray:
    """Copy into a read-only array so frozen dataclasses stay effectively immutable."""
    arr = np.array(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class ClassMetrics:
    """Per-class metrics; sensitivity/specificity/AUC/AP are one-vs-rest for this class."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int
    sensitivity: float  # == recall; kept under its clinical name
    specificity: float
    auc: float
    average_precision: float


@dataclass(frozen=True, eq=False)  # eq=False: array fields make == ambiguous
class Curve:
    """One ROC or PR curve.

    For ROC, ``x`` is FPR and ``y`` is TPR; for PR, ``x`` is recall and ``y`` is precision.
    ``thresholds[i]`` gives point i (predict positive iff score >= threshold); ``nan`` marks a
    point without one (ROC's first point, sklearn's ``inf``; PR's final (0, 1) point).
    """

    label: str  # class name, or "macro" for the vertical average of the per-class ROC curves
    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray
    area: float  # AUC for ROC, average precision for PR


@dataclass(frozen=True, eq=False)
class Calibration:
    """Reliability curve on equal-width bins over [0, 1], with ECE and Brier score.

    ``kind == "positive"`` (binary): the positive-class probability against the positive rate.
    ``kind == "top_label"`` (multi-class): the top-label confidence against top-label accuracy.
    Empty bins have ``count == 0`` and ``nan`` confidence/accuracy.
    """

    kind: Literal["positive", "top_label"]
    bin_edges: np.ndarray  # (n_bins + 1,)
    confidence: np.ndarray  # (n_bins,) mean predicted probability in the bin
    accuracy: np.ndarray  # (n_bins,) observed frequency in the bin
    count: np.ndarray  # (n_bins,) samples in the bin
    ece: float  # sum over bins of count/N * |accuracy - confidence|
    brier: float  # binary: mean (p - y)^2; multi-class: mean over samples of sum over classes


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval around a point estimate."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n_boot: int = 0


@dataclass(frozen=True, eq=False)
class EvalReport:
    """Everything one evaluation computes; build it with :func:`evaluate`.

    Top-level ``auc``, ``average_precision``, ``sensitivity`` and ``specificity`` are for the
    positive class in binary problems and macro averages (one-vs-rest) in multi-class ones.
    """

    labels: tuple[str, ...]
    n: int
    threshold: float | None  # binary operating point used; None = argmax (multi-class)
    confusion_matrix: np.ndarray  # (C, C) rows = true class, columns = predicted class
    per_class: tuple[ClassMetrics, ...]
    accuracy: float
    auc: float
    average_precision: float
    sensitivity: float
    specificity: float
    roc: tuple[Curve, ...]  # binary: positive class; multi-class: each class, then "macro"
    pr: tuple[Curve, ...]  # binary: positive class; multi-class: each class
    calibration: Calibration
    ci: dict[str, Interval] = field(default_factory=dict)  # "auc", "sensitivity", "specificity"
    # What the bootstrap resampled: "image" (no groups given) or "patient" (whole patient
    # clusters); None when no intervals were computed (n_boot == 0).
    ci_unit: Literal["image", "patient"] | None = None
    # Patient clusters when groups were given (images without an id count one each), else None.
    n_clusters: int | None = None

    @property
    def is_binary(self) -> bool:
        """True for two classes."""
        return len(self.labels) == 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists, floats, ints, None for nan/inf); superset of the CLI's keys."""
        return _jsonable({
            "n": self.n, "labels": list(self.labels), "threshold": self.threshold,
            "accuracy": self.accuracy, "auc": self.auc,
            "average_precision": self.average_precision,
            "sensitivity": self.sensitivity, "specificity": self.specificity,
            "confusion_matrix": self.confusion_matrix,
            "per_class": [vars(m) for m in self.per_class],
            "roc": [_curve_dict(c, "fpr", "tpr") for c in self.roc],
            "pr": [_curve_dict(c, "recall", "precision") for c in self.pr],
            "calibration": vars(self.calibration),
            "ci": {k: vars(v) for k, v in self.ci.items()},
            "ci_unit": self.ci_unit, "n_clusters": self.n_clusters,
        })


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
        return _jsonable(vars(self))


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test between two classifiers on the same images.

    ``b``: images A gets right and B gets wrong; ``c``: A wrong, B right.
    ``method == "exact"``: two-sided binomial test of b ~ Bin(b + c, 1/2),
    ``statistic = min(b, c)``.
    ``method == "chi2_cc"``: ``statistic = max(|b - c| - 1, 0)^2 / (b + c)`` (Edwards'
    continuity correction), p from chi-square with 1 degree of freedom.
    """

    b: int
    c: int
    statistic: float
    p_value: float
    method: Literal["exact", "chi2_cc"]
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return _jsonable(vars(self))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _as_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    """1-D int array of class indices, or ConfigError."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ConfigError(f"{name} must be a non-empty 1-D array of class indices. "
                          f"Received: shape={y.shape}")
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{name} must hold integer class indices. Received: dtype={y.dtype}")
    return y.astype(np.int64)


def _as_probs(probs: Any, n: int) -> np.ndarray:
    """(N, C) float array of probabilities; a (N,) vector is the positive-class column."""
    p = np.asarray(probs, dtype=float)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise ConfigError(f"probs must have shape (N, C) or (N,) with N={n} (len of y_true) "
                          f"and C >= 2. Received: shape={np.shape(probs)}")
    if not np.all(np.isfinite(p)):
        raise ConfigError(f"probs must be finite. Received: {int((~np.isfinite(p)).sum())} "
                          "nan/inf values")
    lo, hi = float(p.min()), float(p.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ConfigError(f"probs must lie in [0, 1]. Received: min={lo:.6g}, max={hi:.6g}")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOL)
    if bad.size:
        raise ConfigError(f"each row of probs must sum to 1 (±{_SUM_TOL}). Received: "
                          f"{bad.size} rows off, e.g. row {bad[0]} sums to {sums[bad[0]]:.6g}")
    return np.clip(p, 0.0, 1.0)


def _validate(y_true: Any, probs: Any, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Check the (y_true, probs, labels) triple; every class must occur in y_true."""
    y = _as_labels(y_true)
    p = _as_probs(probs, y.size)
    names = list(labels)
    if len(names) != p.shape[1] or len(set(names)) != len(names):
        raise ConfigError(f"labels must be {p.shape[1]} distinct names (one per probs column). "
                          f"Received: labels={names}")
    if y.min() < 0 or y.max() >= len(names):
        raise ConfigError(f"y_true must hold class indices in 0..{len(names) - 1}. "
                          f"Received: min={y.min()}, max={y.max()}")
    counts = np.bincount(y, minlength=len(names))
    if np.any(counts == 0):
        found = {names[k]: int(v) for k, v in enumerate(counts)}
        raise ConfigError("every class must occur in y_true (AUC and specificity need "
                          f"positives and negatives). Received: counts={found}")
    return y, p


def _validate_binary(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    """Binary y (0/1, both present) and the positive-class probability vector."""
    arr = np.asarray(p_pos, dtype=float)
    if arr.ndim == 2 and arr.shape[1] > 2:
        raise ConfigError("thresholds are for binary problems; for multi-class the argmax is "
                          f"the operating point. Received: probs with {arr.shape[1]} columns")
    y, p = _validate(y_true, arr, ["negative", "positive"])
    return y, p[:, POSITIVE]


# ---------------------------------------------------------------------------------------------
# Predictions and simple counts
# ---------------------------------------------------------------------------------------------
def predict(probs: Any, *, threshold: float | None = None) -> np.ndarray:
    """Class predictions from probabilities.

    Args:
        probs: (N, C) probabilities or a (N,) positive-class vector.
        threshold: binary only: predict positive iff ``p_pos >= threshold``. None means
            argmax (for binary, ``p_pos >= 0.5`` up to ties).

    Returns:
        Int array (N,) of predicted class indices.

    Raises:
        ConfigError: bad probabilities, or a threshold for a multi-class problem / outside [0, 1].
    """
    p = _as_probs(probs, len(np.asarray(probs)))
    if threshold is None:
        return np.argmax(p, axis=1)
    if p.shape[1] != 2:
        raise ConfigError("a threshold applies to binary problems only; multi-class uses the "
                          f"argmax. Received: threshold={threshold}, C={p.shape[1]}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    return (p[:, POSITIVE] >= threshold).astype(np.int64)


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix by bincount (fast enough for bootstrap loops)."""
    return np.bincount(y * n_classes + pred, minlength=n_classes**2).reshape(n_classes, -1)


def _sens_spec(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest sensitivity and specificity for every class of a confusion matrix."""
    tp = np.diag(cm).astype(float)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fn), tn / (tn + fp)


def _rank_auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count 1/2); equals sklearn's roc_auc_score, much cheaper."""
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(score)
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _summary(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Top-level AUC/sensitivity/specificity (positive class, or macro one-vs-rest)."""
    n_classes = p.shape[1]
    sens, spec = _sens_spec(_confusion(y, pred, n_classes))
    if n_classes == 2:
        return {"auc": _rank_auc(y == POSITIVE, p[:, POSITIVE]),
                "sensitivity": float(sens[POSITIVE]), "specificity": float(spec[POSITIVE])}
    aucs = [_rank_auc(y == k, p[:, k]) for k in range(n_classes)]
    return {"auc": float(np.mean(aucs)), "sensitivity": float(np.mean(sens)),
            "specificity": float(np.mean(spec))}


# ---------------------------------------------------------------------------------------------
# Curves, calibration, bootstrap
# ---------------------------------------------------------------------------------------------
def _roc_curve(label: str, is_pos: np.ndarray, score: np.ndarray) -> Curve:
    fpr, tpr, thr = skm.roc_curve(is_pos, score, drop_intermediate=True)
    thr = np.where(np.isfinite(thr), thr, np.nan)  # sklearn's leading inf: "nothing positive"
    auc = float(skm.roc_auc_score(is_pos, score))
    return Curve(label, _frozen_array(fpr), _frozen_array(tpr), _frozen_array(thr), auc)


def _pr_curve(label: str, is_pos: np.ndarray, score: np.ndarray) -> Curve:
    prec, rec, thr = skm.precision_recall_curve(is_pos, score, drop_intermediate=True)
    thr = np.append(thr, np.nan)  # the final (recall 0, precision 1) point has no threshold
    ap = float(skm.average_precision_score(is_pos, score))
    return Curve(label, _frozen_array(rec), _frozen_array(prec), _frozen_array(thr), ap)


def _macro_roc(curves: list[Curve]) -> Curve:
    """Vertical average of per-class ROC curves on the union FPR grid (sklearn's recipe).

    Its ``area`` is the mean of the class AUCs (the macro AUC), not the area under the
    averaged curve, so the legend agrees with the reported macro AUC.
    """
    grid = np.unique(np.concatenate([c.x for c in curves]))
    mean_tpr = np.mean([np.interp(grid, c.x, c.y) for c in curves], axis=0)
    area = float(np.mean([c.area for c in curves]))
    nan = np.full(grid.shape, np.nan)
    return Curve("macro", _frozen_array(grid), _frozen_array(mean_tpr), _frozen_array(nan), area)


def _reliability(hit: np.ndarray, conf: np.ndarray, n_bins: int, kind: str,
                 brier: float) -> Calibration:
    """Equal-width reliability bins; bin i is [e_i, e_{i+1}) and the last bin includes 1.0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="right")  # same binning as calibration_curve
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, mean_hit = conf_sum / count, hit_sum / count
    gaps = np.where(count > 0, np.abs(mean_hit - mean_conf), 0.0)
    ece = float(np.sum(count / conf.size * gaps))
    return Calibration(kind, _frozen_array(edges), _frozen_array(mean_conf),  # type: ignore
                       _frozen_array(mean_hit), _frozen_array(count, int), ece, brier)


def _calibration(y: np.ndarray, p: np.ndarray, n_bins: int) -> Calibration:
    """Binary: positive-class reliability; multi-class: top-label confidence."""
    n_classes = p.shape[1]
    brier = float(skm.brier_score_loss(y, p if n_classes > 2 else p[:, POSITIVE],
                                       labels=list(range(n_classes))))
    if n_classes == 2:
        return _reliability(y == POSITIVE, p[:, POSITIVE], n_bins, "positive", brier)
    top = np.argmax(p, axis=1)
    return _reliability(top == y, p.max(axis=1), n_bins, "top_label", brier)


def _is_missing_group(value: Any) -> bool:
    """None, a blank string or a float nan (pandas' missing value) means "no patient id"."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def _cluster_ids(groups: Any, n: int) -> np.ndarray:
    """Int cluster id (N,) per image, numbered by first occurrence.

    Equal ids share a cluster; every missing id (see :func:`_is_missing_group`) is a cluster
    of its own.
    """
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__"):
        raise ConfigError("groups must be a sequence with one patient id (or None) per image. "
                          f"Received: {type(groups).__name__}")
    if len(groups) != n:
        raise ConfigError(f"groups must have one patient id (or None) per image (N={n}, the "
                          f"length of y_true). Received: {len(groups)} entries")
    values = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    seen: dict[Any, int] = {}
    ids = np.empty(n, dtype=np.int64)
    for i, value in enumerate(values):
        if _is_missing_group(value):
            ids[i] = len(seen)
            seen[object()] = ids[i]  # a fresh key: never shared
            continue
        try:
            ids[i] = seen.setdefault(value, len(seen))
        except TypeError:
            raise ConfigError("groups must hold hashable patient ids (str) or None. "
                              f"Received: {type(value).__name__} at index {i}") from None
    return ids


def _cluster_strata(y: np.ndarray, clusters: np.ndarray, n_classes: int
                    ) -> tuple[list[np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Strata of cluster ids and the map from drawn cluster ids to their image indices.

    Clusters are stratified by the set of classes among their images: first the clusters
    holding class 0 only, 1 only, ... (in class order), then mixed clusters by class set. A
    resample keeps each stratum's cluster count, so every class stays present; when every
    image is its own cluster the strata and draws are exactly those of the image bootstrap.
    """
    n_clusters = int(clusters.max()) + 1
    present = np.zeros((n_clusters, n_classes), dtype=bool)
    present[clusters, y] = True
    code = present.astype(np.int64) @ (np.int64(1) << np.arange(n_classes, dtype=np.int64))
    pure = [1 << k for k in range(n_classes)]
    mixed = sorted(set(np.unique(code).tolist()) - set(pure))
    strata = [np.flatnonzero(code == c) for c in pure + mixed]
    strata = [s for s in strata if s.size]

    order = np.argsort(clusters, kind="stable")  # images grouped by cluster, in index order
    sizes = np.bincount(clusters, minlength=n_clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def expand(drawn: np.ndarray) -> np.ndarray:
        size = sizes[drawn]
        ends = np.cumsum(size)
        # position j of the output belongs to draw d(j); its offset into the cluster is
        # j - (ends[d] - size[d]); add the cluster's start in `order`.
        shift = np.repeat(starts[drawn] - ends + size, size)
        return order[shift + np.arange(int(ends[-1]))]

    return strata, expand


def _bootstrap(y: np.ndarray, p: np.ndarray, pred: np.ndarray, n_boot: int,
               seed: int, point: dict[str, float],
               clusters: np.ndarray | None = None) -> dict[str, Interval]:
    """Stratified percentile bootstrap (95%) of AUC, sensitivity and specificity.

    Without ``clusters`` each class is resampled with replacement to its own size, so every
    resample keeps every class (no resample has to be skipped for AUC) and the prevalence is
    fixed. With ``clusters`` (a cluster id per image) whole clusters are resampled instead,
    stratified by their class set (see :func:`_cluster_strata`): each replicate draws as many
    clusters as there are, with all their images. A replicate lacking a class would be
    skipped (nan, ignored by the percentiles); the stratification prevents that.
    """
    rng = np.random.default_rng(seed)
    n_classes = p.shape[1]
    if clusters is None:
        strata = [np.flatnonzero(y == k) for k in range(n_classes)]
        expand: Callable[[np.ndarray], np.ndarray] = lambda drawn: drawn  # noqa: E731
    else:
        strata, expand = _cluster_strata(y, clusters, n_classes)
    draws: dict[str, list[float]] = {key: [] for key in point}
    for _ in range(n_boot):
        idx = expand(np.concatenate([s[rng.integers(0, s.size, s.size)] for s in strata]))
        y_b = y[idx]
        if np.bincount(y_b, minlength=n_classes).min() == 0:
            continue
        for key, value in _summary(y_b, p[idx], pred[idx]).items():
            draws[key].append(value)
    out = {}
    for key, values in draws.items():
        low, high = (np.nanpercentile(values, [2.5, 97.5]) if values
                     else (math.nan, math.nan))
        out[key] = Interval(point[key], float(low), float(high), 0.95, n_boot)
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _per_class(y: np.ndarray, p: np.ndarray, pred: np.ndarray, cm: np.ndarray,
               labels: list[str]) -> tuple[ClassMetrics, ...]:
    ks = list(range(len(labels)))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(
        y, pred, labels=ks, zero_division=0.0)
    sens, spec = _sens_spec(cm)
    return tuple(
        ClassMetrics(labels[k], float(prec[k]), float(rec[k]), float(f1[k]), int(sup[k]),
                     float(sens[k]), float(spec[k]),
                     float(skm.roc_auc_score(y == k, p[:, k])),
                     float(skm.average_precision_score(y == k, p[:, k])))
        for k in ks)


def _curves(y: np.ndarray, p: np.ndarray, labels: list[str]) -> tuple[tuple, tuple]:
    """ROC and PR curves: positive class only for binary, one-vs-rest (+ macro ROC) otherwise."""
    classes = [POSITIVE] if len(labels) == 2 else list(range(len(labels)))
    roc = [_roc_curve(labels[k], y == k, p[:, k]) for k in classes]
    pr = [_pr_curve(labels[k], y == k, p[:, k]) for k in classes]
    if len(classes) > 1:
        roc.append(_macro_roc(roc))
    return tuple(roc), tuple(pr)


def evaluate(y_true: Any, probs: Any, labels: list[str], *, threshold: float | None = None,
             n_boot: int = 1000, seed: int = 0, n_bins: int = 10,
             groups: Sequence[str | None] | None = None) -> EvalReport:
    """Evaluate class probabilities against the true labels.

    Args:
        y_true: int array (N,) of class indices; every class must occur.
        probs: (N, C) probabilities, or a (N,) positive-class vector for binary.
        labels: the C class names in column order (binary: positive class second).
        threshold: binary operating point (positive iff p >= threshold). None uses 0.5 and
            records it; pass the stored validation threshold instead of relying on that.
            Must be None for multi-class (argmax).
        n_boot: bootstrap resamples for the 95% intervals; 0 skips them (``ci`` stays empty).
        seed: seed of the bootstrap; same seed, same intervals.
        n_bins: equal-width reliability bins for the calibration curve and ECE.
        groups: optional patient id per image (N,). Given, the bootstrap resamples whole
            patients (all images of a drawn patient enter the replicate), because images of
            one patient are correlated and image resampling makes the intervals too narrow.
            None, "" (or nan) entries count as a patient of their own. The report's
            ``ci_unit`` says "patient" and ``n_clusters`` the number of patients; without
            groups ``ci_unit`` is "image" and the intervals are as before.

    Returns:
        An :class:`EvalReport`.

    Raises:
        ConfigError: shapes disagree, probabilities are out of [0, 1] or rows do not sum to 1,
            a class is missing from y_true, the threshold/n_boot/n_bins are invalid, or groups
            is not one id per image.
    """
    y, p = _validate(y_true, probs, labels)
    names = list(labels)
    if n_boot < 0 or n_bins < 1:
        raise ConfigError(f"need n_boot >= 0 and n_bins >= 1. Received: n_boot={n_boot}, "
                          f"n_bins={n_bins}")
    if len(names) == 2 and threshold is None:
        threshold = 0.5
    clusters = None if groups is None else _cluster_ids(groups, y.size)
    pred = predict(p, threshold=threshold)
    cm = _confusion(y, pred, len(names))
    per_class = _per_class(y, p, pred, cm, names)
    summary = _summary(y, p, pred)
    auc = (per_class[POSITIVE].auc if len(names) == 2
           else float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro")))
    ap = (per_class[POSITIVE].average_precision if len(names) == 2
          else float(np.mean([m.average_precision for m in per_class])))
    roc, pr = _curves(y, p, names)
    ci = (_bootstrap(y, p, pred, n_boot, seed, {**summary, "auc": auc}, clusters)
          if n_boot else {})
    ci_unit = ("image" if clusters is None else "patient") if n_boot else None
    return EvalReport(
        labels=tuple(names), n=int(y.size), threshold=threshold,
        confusion_matrix=_frozen_array(cm, int), per_class=per_class,
        accuracy=float(skm.accuracy_score(y, pred)), auc=auc, average_precision=ap,
        sensitivity=summary["sensitivity"], specificity=summary["specificity"],
        roc=roc, pr=pr, calibration=_calibration(y, p, n_bins), ci=ci, ci_unit=ci_unit,
        n_clusters=None if clusters is None else int(clusters.max()) + 1)


# ---------------------------------------------------------------------------------------------
# Operating points
# ---------------------------------------------------------------------------------------------
def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target_sensitivity must be in (0, 1]. Received: {target}")


def threshold_for_sensitivity(y_true: Any, p_pos: Any, target: float = 0.95) -> float:
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
    y, p = _validate_binary(y_true, p_pos)
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
                     target_sensitivity: float = 0.95) -> OperatingPoint:
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
    y, p = _validate_binary(y_true, p_pos)
    if method == "sensitivity":
        threshold = threshold_for_sensitivity(y, p, target_sensitivity)
        target: float | None = float(target_sensitivity)
    else:
        threshold, target = _youden_threshold(y, p), None
    sens, spec = _sens_spec(_confusion(y, (p >= threshold).astype(np.int64), 2))
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


# ---------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------
def _same_length(y: np.ndarray, preds: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {name: _as_labels(pred, f"predictions of {name!r}") for name, pred in preds.items()}
    for name, pred in out.items():
        if pred.size != y.size:
            raise ConfigError(f"predictions of {name!r} must have one entry per image "
                              f"(N={y.size}). Received: {pred.size}")
    return out


def mcnemar(y_true: Any, pred_a: Any, pred_b: Any) -> McNemarResult:
    """McNemar's test: do two runs make different numbers of errors on the same images?

    Uses the exact two-sided binomial test when the discordant count ``b + c < 25`` and the
    chi-square test with continuity correction otherwise (see :class:`McNemarResult`).

    Args:
        y_true: true class indices (N,).
        pred_a: predictions of run A (N,).
        pred_b: predictions of run B (N,), on the same images in the same order.

    Returns:
        A :class:`McNemarResult`; ``b + c == 0`` gives p = 1.

    Raises:
        ConfigError: arrays of different lengths or not integer class indices.
    """
    y = _as_labels(y_true)
    preds = _same_length(y, {"A": pred_a, "B": pred_b})
    right_a, right_b = preds["A"] == y, preds["B"] == y
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    if b + c < _EXACT_BELOW:
        p_value = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        return McNemarResult(b, c, float(min(b, c)), float(p_value), "exact", int(y.size))
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    p_value = float(stats.chi2.sf(statistic, df=1))
    return McNemarResult(b, c, float(statistic), p_value, "chi2_cc", int(y.size))


def disagreements(y_true: Any, preds: dict[str, Any], *, with_truth: bool = False) -> np.ndarray:
    """Indices of images on which runs disagree.

    Args:
        y_true: true class indices (N,); used for the length check and ``with_truth``.
        preds: run name → predictions (N,) on the same images in the same order.
        with_truth: False (default): images where the runs do not all predict the same
            class. True: also images where they all agree but are wrong, i.e. where
            {truth, run predictions} holds more than one class.

    Returns:
        Sorted int array of image indices.

    Raises:
        ConfigError: no runs (or one run without ``with_truth``), or lengths differ.
    """
    y = _as_labels(y_true)
    if len(preds) < (1 if with_truth else 2):
        raise ConfigError("need at least 2 runs to compare (or 1 with with_truth=True). "
                          f"Received: {len(preds)} run(s): {list(preds)}")
    stack = np.vstack(list(_same_length(y, preds).values()))
    if with_truth:
        stack = np.vstack([stack, y])
    return np.flatnonzero(np.any(stack != stack[0], axis=0))


# ---------------------------------------------------------------------------------------------
# Long-form tables for plotting (px.line(rows, ..., color="run"))
# ---------------------------------------------------------------------------------------------
def _curve_rows(reports: dict[str, EvalReport], attr: str, x: str, y: str) -> list[dict]:
    rows = []
    for run, report in reports.items():
        for curve in getattr(report, attr):
            for xv, yv, tv in zip(curve.x, curve.y, curve.thresholds):
                rows.append({"run": run, "class": curve.label, x: float(xv), y: float(yv),
                             "threshold": _num(tv), "area": curve.area})
    return rows


def roc_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, class, fpr, tpr, threshold, area}`` of every ROC curve of every run."""
    return _curve_rows(reports, "roc", "fpr", "tpr")


def pr_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, class, recall, precision, threshold, area}`` of every PR curve."""
    return _curve_rows(reports, "pr", "recall", "precision")


def calibration_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, bin_low, bin_high, confidence, accuracy, count}`` of non-empty bins."""
    rows = []
    for run, report in reports.items():
        cal = report.calibration
        for i in np.flatnonzero(cal.count):
            rows.append({"run": run, "bin_low": float(cal.bin_edges[i]),
                         "bin_high": float(cal.bin_edges[i + 1]),
                         "confidence": float(cal.confidence[i]),
                         "accuracy": float(cal.accuracy[i]), "count": int(cal.count[i])})
    return rows


def confusion_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, true, pred, count, fraction}``; fraction is of the true class's row."""
    rows = []
    for run, report in reports.items():
        cm = report.confusion_matrix
        for i, true in enumerate(report.labels):
            for j, pred in enumerate(report.labels):
                rows.append({"run": run, "true": true, "pred": pred, "count": int(cm[i, j]),
                             "fraction": float(cm[i, j] / cm[i].sum())})
    return rows


def metrics_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, class, metric, value, low, high}``; class "all" holds the top-level metrics.

    ``low``/``high`` are the bootstrap interval where one exists, else None.
    """
    rows = []
    per_class_keys = ("precision", "recall", "f1", "sensitivity", "specificity", "auc",
                      "average_precision")
    for run, r in reports.items():
        for key in ("accuracy", "auc", "average_precision", "sensitivity", "specificity"):
            ci = r.ci.get(key)
            rows.append({"run": run, "class": "all", "metric": key, "value": getattr(r, key),
                         "low": ci.low if ci else None, "high": ci.high if ci else None})
        for m in r.per_class:
            rows.extend({"run": run, "class": m.label, "metric": key,
                         "value": getattr(m, key), "low": None, "high": None}
                        for key in per_class_keys)
    return rows


# ---------------------------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """float, or None for nan/inf (JSON has neither)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _curve_dict(curve: Curve, x: str, y: str) -> dict[str, Any]:
    return {"class": curve.label, x: curve.x, y: curve.y, "thresholds": curve.thresholds,
            "area": curve.area}


def _jsonable(obj: Any) -> Any:
    """Recursively turn numpy values/arrays into JSON-safe Python values (nan/inf → None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj
