"""Probabilities → predictions and the basic counts: input checks, confusion matrix, sensitivity,
specificity and the rank AUC that every evaluation module builds on.

Input convention used by all evaluation modules (:mod:`cxr_core.stats.reports`,
:mod:`cxr_core.stats.thresholds`, :mod:`cxr_core.stats.intervals`, :mod:`cxr_core.stats.paired`):

* ``y_true``: int array (N,) of class indices ``0..C-1``.
* ``probs``: float array (N, C) of class probabilities (rows sum to 1). For binary problems
  column 1 is the positive class ("PNEUMONIA"); a (N,) vector of positive-class
  probabilities is also accepted and becomes ``[1 - p, p]``.
* ``labels``: the C class names, in column order.

Binary predictions are ``positive iff p_pos >= threshold``; multi-class predictions are the
argmax (the argmax *is* the operating point there). Pure numpy / scipy.

Bad inputs raise :class:`~cxr_core.core.errors.ConfigError` (a ``ValueError``) whose message says
what was expected and what was received.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from cxr_core.core.errors import ConfigError

POSITIVE = 1  # column of the positive class ("PNEUMONIA") in binary probs
_SUM_TOL = 1e-3  # float32 softmax rows can miss 1.0 by ~1e-6; 1e-3 still catches real mistakes
_RANGE_TOL = 1e-6  # allowed excursion outside [0, 1] before clipping (float noise)


# -- Validation -----------------------------------------------------------------------------

def as_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
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


def as_probs(probs: Any, n: int) -> np.ndarray:
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


def validate(y_true: Any, probs: Any, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Check the (y_true, probs, labels) triple; every class must occur in y_true."""
    y = as_labels(y_true)
    p = as_probs(probs, y.size)
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


def validate_binary(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    """Binary y (0/1, both present) and the positive-class probability vector."""
    arr = np.asarray(p_pos, dtype=float)
    if arr.ndim == 2 and arr.shape[1] > 2:
        raise ConfigError("thresholds are for binary problems; for multi-class the argmax is "
                          f"the operating point. Received: probs with {arr.shape[1]} columns")
    y, p = validate(y_true, arr, ["negative", "positive"])
    return y, p[:, POSITIVE]


# -- Predictions and counts -----------------------------------------------------------------

def predict(probs: Any, *, threshold: float | None = None) -> np.ndarray:
    """Class predictions from probabilities.

    Args:
        probs: (N, C) probabilities or a (N,) positive-class vector.
        threshold: binary: predict positive iff ``p_pos >= threshold``. Three or more classes:
            the two-step (hierarchical) reading, class 0 (normal) unless ``1 - p[:, 0] >=
            threshold``, then the most probable of the other classes. None means the argmax
            (for binary, ``p_pos >= 0.5`` up to ties).

    Returns:
        Int array (N,) of predicted class indices.

    Raises:
        ConfigError: bad probabilities, or a threshold outside [0, 1].
    """
    p = as_probs(probs, len(np.asarray(probs)))
    if threshold is None:
        return np.argmax(p, axis=1)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    if p.shape[1] != 2:
        first = (1.0 - p[:, 0]) >= threshold
        return np.where(first, 1 + np.argmax(p[:, 1:], axis=1), 0).astype(np.int64)
    return (p[:, POSITIVE] >= threshold).astype(np.int64)


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix by bincount (fast enough for bootstrap loops)."""
    return np.bincount(y * n_classes + pred, minlength=n_classes**2).reshape(n_classes, -1)


def sens_spec(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def summary(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Top-level AUC/sensitivity/specificity (positive class, or macro one-vs-rest)."""
    n_classes = p.shape[1]
    sens, spec = sens_spec(confusion(y, pred, n_classes))
    if n_classes == 2:
        return {"auc": _rank_auc(y == POSITIVE, p[:, POSITIVE]),
                "sensitivity": float(sens[POSITIVE]), "specificity": float(spec[POSITIVE])}
    aucs = [_rank_auc(y == k, p[:, k]) for k in range(n_classes)]
    return {"auc": float(np.mean(aucs)), "sensitivity": float(np.mean(sens)),
            "specificity": float(np.mean(spec))}
