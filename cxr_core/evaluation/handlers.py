"""The evaluation jobs a worker does (registered by :mod:`cxr_core.app`):

- ``evaluate``: params of :func:`cxr_core.evaluation.evaluate.evaluate_model`; result
  ``{"evaluation_id"}``.
- ``compare_ci``: params ``{"evaluation_ids", "mode", "target", "truth", "as_of_relabel_id",
  "thresholds", "n_boot", "images"}``; result the comparison's metrics with bootstrap 95% intervals
  (:func:`cxr_core.evaluation.compare.comparison_intervals`), kept per label version.
- ``site_calibration`` (the kind's stored name): params ``{"evaluation_id", "sample" ("all" |
  "reviewed"), "labels", "as_of_relabel_id", "method", "target", "n_boot"}``; result the
  candidate site threshold with patient-clustered intervals
  (:func:`cxr_core.evaluation.site_thresholds.candidate`), kept per label version (the page
  records it only when a person says so).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core.evaluation import compare as compare_service
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import site_thresholds
from cxr_core.jobs.queue import Handler, Progress
from cxr_core.storage import Database


def _compare_ci(db: Database, job_id: int, params: Mapping[str, Any],
                progress: Progress) -> dict:

    progress(0, 1)
    out = compare_service.comparison_intervals(
        db, params["evaluation_ids"], mode=params["mode"], target=params["target"],
        truth=params["truth"], as_of_relabel_id=params.get("as_of_relabel_id"),
        thresholds=params.get("thresholds"), n_boot=params.get("n_boot", 500),
        images=params.get("images", "all"))
    progress(1, 1)
    return out


def _evaluate(db: Database, job_id: int, params: Mapping[str, Any], progress: Progress) -> dict:

    evaluation_id, _ = es.evaluate_model(db, params["model_ref"], params["data"],
                                         split=params.get("split"), progress=progress,
                                         labels=params.get("labels", "current"))
    return {"evaluation_id": evaluation_id}


def _site_calibration(db: Database, job_id: int, params: Mapping[str, Any],
                      progress: Progress) -> dict:

    progress(0, 1)
    out = site_thresholds.candidate(
        db, evaluation_id=params["evaluation_id"], sample=params.get("sample", "all"),
        labels=params.get("labels", "current"), method=params.get("method", "sensitivity"),
        target=params.get("target", 0.95), n_boot=params.get("n_boot", 500),
        as_of_relabel_id=params.get("as_of_relabel_id")).to_json()
    progress(1, 1)
    return out


HANDLERS: dict[str, Handler] = {"evaluate": _evaluate, "compare_ci": _compare_ci,
                                "site_calibration": _site_calibration}
