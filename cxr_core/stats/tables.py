"""Long-form tables of evaluation reports for plotting: one row per point, keyed by run.

A page draws several runs at once with ``px.line(roc_table(reports), x="fpr", y="tpr",
color="run")``; ``reports`` maps a run's display name to its
:class:`~cxr_core.stats.reports.EvalReport`.
"""
from __future__ import annotations

import numpy as np

from cxr_core.core.json_safe import num
from cxr_core.stats.reports import EvalReport


def _curve_rows(reports: dict[str, EvalReport], attr: str, x: str, y: str) -> list[dict]:
    rows = []
    for run, report in reports.items():
        for curve in getattr(report, attr):
            for xv, yv, tv in zip(curve.x, curve.y, curve.thresholds):
                rows.append({"run": run, "class": curve.label, x: float(xv), y: float(yv),
                             "threshold": num(tv), "area": curve.area})
    return rows


def roc_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, class, fpr, tpr, threshold, area}`` of every ROC curve of every run."""
    return _curve_rows(reports, "roc", "fpr", "tpr")


def pr_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, class, recall, precision, threshold, area}`` of every PR curve."""
    return _curve_rows(reports, "pr", "recall", "precision")


def reliability_table(reports: dict[str, EvalReport]) -> list[dict]:
    """Rows ``{run, bin_low, bin_high, confidence, accuracy, count}`` of non-empty bins."""
    rows = []
    for run, report in reports.items():
        cal = report.reliability
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
