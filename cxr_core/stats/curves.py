"""ROC and precision-recall curves and the reliability (calibration) curve with ECE and Brier.

Inputs follow :mod:`cxr_core.stats.metrics` (already validated there): ``y`` class indices, ``p``
(N, C) probabilities. Curves are data; the pages plot them from :mod:`cxr_core.stats.tables`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn import metrics as skm

from cxr_core.core.json_safe import frozen_array
from cxr_core.stats.metrics import POSITIVE


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
class Reliability:
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


def roc_curve(label: str, is_pos: np.ndarray, score: np.ndarray) -> Curve:
    """One-vs-rest ROC curve of one class, its AUC as the area."""
    fpr, tpr, thr = skm.roc_curve(is_pos, score, drop_intermediate=True)
    thr = np.where(np.isfinite(thr), thr, np.nan)  # sklearn's leading inf: "nothing positive"
    auc = float(skm.roc_auc_score(is_pos, score))
    return Curve(label, frozen_array(fpr), frozen_array(tpr), frozen_array(thr), auc)


def pr_curve(label: str, is_pos: np.ndarray, score: np.ndarray) -> Curve:
    """One-vs-rest precision-recall curve of one class, its average precision as the area."""
    prec, rec, thr = skm.precision_recall_curve(is_pos, score, drop_intermediate=True)
    thr = np.append(thr, np.nan)  # the final (recall 0, precision 1) point has no threshold
    ap = float(skm.average_precision_score(is_pos, score))
    return Curve(label, frozen_array(rec), frozen_array(prec), frozen_array(thr), ap)


def macro_roc(curves: list[Curve]) -> Curve:
    """Vertical average of per-class ROC curves on the union FPR grid (sklearn's recipe).

    Its ``area`` is the mean of the class AUCs (the macro AUC), not the area under the
    averaged curve, so the legend agrees with the reported macro AUC.
    """
    grid = np.unique(np.concatenate([c.x for c in curves]))
    mean_tpr = np.mean([np.interp(grid, c.x, c.y) for c in curves], axis=0)
    area = float(np.mean([c.area for c in curves]))
    nan = np.full(grid.shape, np.nan)
    return Curve("macro", frozen_array(grid), frozen_array(mean_tpr), frozen_array(nan), area)


def roc_pr_curves(y: np.ndarray, p: np.ndarray,
                  labels: list[str]) -> tuple[tuple[Curve, ...], tuple[Curve, ...]]:
    """ROC and PR curves: positive class only for binary, one-vs-rest (+ macro ROC) otherwise."""
    classes = [POSITIVE] if len(labels) == 2 else list(range(len(labels)))
    roc = [roc_curve(labels[k], y == k, p[:, k]) for k in classes]
    pr = [pr_curve(labels[k], y == k, p[:, k]) for k in classes]
    if len(classes) > 1:
        roc.append(macro_roc(roc))
    return tuple(roc), tuple(pr)


def _reliability(hit: np.ndarray, conf: np.ndarray, n_bins: int, kind: str,
                 brier: float) -> Reliability:
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
    return Reliability(kind, frozen_array(edges), frozen_array(mean_conf),  # type: ignore
                       frozen_array(mean_hit), frozen_array(count, int), ece, brier)


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int) -> Reliability:
    """Binary: positive-class reliability; multi-class: top-label confidence."""
    n_classes = p.shape[1]
    brier = float(skm.brier_score_loss(y, p if n_classes > 2 else p[:, POSITIVE],
                                       labels=list(range(n_classes))))
    if n_classes == 2:
        return _reliability(y == POSITIVE, p[:, POSITIVE], n_bins, "positive", brier)
    top = np.argmax(p, axis=1)
    return _reliability(top == y, p.max(axis=1), n_bins, "top_label", brier)
