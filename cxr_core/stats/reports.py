"""One evaluation of class probabilities: per-class metrics, ROC/PR, the reliability curve and
intervals assembled into an :class:`EvalReport`.

Conventions (``y_true``, ``probs``, ``labels``, thresholds) are those of
:mod:`cxr_core.stats.metrics`. The parts live in their own modules: :mod:`cxr_core.stats.curves`
(ROC, PR, reliability), :mod:`cxr_core.stats.intervals` (the bootstrap, by image or by patient),
:mod:`cxr_core.stats.thresholds` (operating points), :mod:`cxr_core.stats.paired` (McNemar,
disagreements) and :mod:`cxr_core.stats.tables` (long-form rows for plotting). Pure numpy /
scipy / scikit-learn; it returns data.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn import metrics as skm

from cxr_core.core.errors import ConfigError
from cxr_core.core.json_safe import frozen_array, jsonable
from cxr_core.stats.curves import Curve, Reliability, reliability, roc_pr_curves
from cxr_core.stats.intervals import Interval, bootstrap_intervals, cluster_ids
from cxr_core.stats.metrics import POSITIVE, confusion, predict, sens_spec, summary, validate


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
    reliability: Reliability
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
        return jsonable({
            "n": self.n, "labels": list(self.labels), "threshold": self.threshold,
            "accuracy": self.accuracy, "auc": self.auc,
            "average_precision": self.average_precision,
            "sensitivity": self.sensitivity, "specificity": self.specificity,
            "confusion_matrix": self.confusion_matrix,
            "per_class": [vars(m) for m in self.per_class],
            "roc": [_curve_dict(c, "fpr", "tpr") for c in self.roc],
            "pr": [_curve_dict(c, "recall", "precision") for c in self.pr],
            "reliability": vars(self.reliability),
            "ci": {k: vars(v) for k, v in self.ci.items()},
            "ci_unit": self.ci_unit, "n_clusters": self.n_clusters,
        })


def _curve_dict(curve: Curve, x: str, y: str) -> dict[str, Any]:
    return {"class": curve.label, x: curve.x, y: curve.y, "thresholds": curve.thresholds,
            "area": curve.area}


def _per_class(y: np.ndarray, p: np.ndarray, pred: np.ndarray, cm: np.ndarray,
               labels: list[str]) -> tuple[ClassMetrics, ...]:
    ks = list(range(len(labels)))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(
        y, pred, labels=ks, zero_division=0.0)
    sens, spec = sens_spec(cm)
    return tuple(
        ClassMetrics(labels[k], float(prec[k]), float(rec[k]), float(f1[k]), int(sup[k]),
                     float(sens[k]), float(spec[k]),
                     float(skm.roc_auc_score(y == k, p[:, k])),
                     float(skm.average_precision_score(y == k, p[:, k])))
        for k in ks)


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
        n_bins: equal-width bins for the reliability curve and ECE.
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
    y, p = validate(y_true, probs, labels)
    names = list(labels)
    if n_boot < 0 or n_bins < 1:
        raise ConfigError(f"need n_boot >= 0 and n_bins >= 1. Received: n_boot={n_boot}, "
                          f"n_bins={n_bins}")
    if len(names) == 2 and threshold is None:
        threshold = 0.5
    clusters = None if groups is None else cluster_ids(groups, y.size)
    pred = predict(p, threshold=threshold)
    cm = confusion(y, pred, len(names))
    per_class = _per_class(y, p, pred, cm, names)
    point = summary(y, p, pred)
    auc = (per_class[POSITIVE].auc if len(names) == 2
           else float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro")))
    ap = (per_class[POSITIVE].average_precision if len(names) == 2
          else float(np.mean([m.average_precision for m in per_class])))
    roc, pr = roc_pr_curves(y, p, names)
    ci = (bootstrap_intervals(y, p, pred, n_boot, seed, {**point, "auc": auc}, clusters)
          if n_boot else {})
    ci_unit = ("image" if clusters is None else "patient") if n_boot else None
    return EvalReport(
        labels=tuple(names), n=int(y.size), threshold=threshold,
        confusion_matrix=frozen_array(cm, int), per_class=per_class,
        accuracy=float(skm.accuracy_score(y, pred)), auc=auc, average_precision=ap,
        sensitivity=point["sensitivity"], specificity=point["specificity"],
        roc=roc, pr=pr, reliability=reliability(y, p, n_bins), ci=ci, ci_unit=ci_unit,
        n_clusters=None if clusters is None else int(clusters.max()) + 1)


def class_report(per_class: Sequence[ClassMetrics | dict]) -> list[dict[str, Any]]:
    """scikit-learn's classification report as rows: each class's precision, recall, F1 and
    support at the operating point, then the macro average (unweighted mean over classes) and
    the weighted average (weighted by support), as ``classification_report`` computes them.

    Args:
        per_class: :attr:`EvalReport.per_class` (or its ``to_dict`` form, a stored one).

    Returns:
        Rows ``{"class", "precision", "recall", "f1", "support"}``.
    """
    rows = [{"class": m["label"] if isinstance(m, dict) else m.label,
             **{k: (m[k] if isinstance(m, dict) else getattr(m, k))
                for k in ("precision", "recall", "f1", "support")}} for m in per_class]
    if not rows:
        return []
    support = np.array([r["support"] for r in rows], dtype=float)
    total = float(support.sum())
    for name, weights in (("macro avg", np.ones(len(rows)) / len(rows)),
                          ("weighted avg", support / total if total else support)):
        rows.append({"class": name,
                     **{k: float(np.dot(weights, [r[k] for r in rows[:len(support)]]))
                        for k in ("precision", "recall", "f1")},
                     "support": int(total)})
    return rows
