"""The evaluation actions a principal may take: a manual run threshold, recording a site
threshold, sending a disagreement to review; checked and audited through
:mod:`cxr_core.auth.gate`, the audit row in the action's transaction.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cxr_core.auth.gate import audited, authorize
from cxr_core.auth.policy import Principal
from cxr_core.evaluation import compare as compare_service
from cxr_core.evaluation import operating_points as ops
from cxr_core.evaluation import site_thresholds
from cxr_core.storage import Database


def send_disagreement(db: Database, p: Principal, *, image_id: int, run_ref: str,
                      predicted: str, probs: Sequence[float]) -> int:

    authorize(db, p, "send_to_review", f"image:{image_id}")
    return compare_service.send_disagreement_to_review(
        db, image_id=image_id, run_ref=run_ref, predicted=predicted, probs=probs,
        sent_by=p.identity, and_then=audited(p, "send_to_review", lambda item: f"review_item:{item}",
                                         {"model": run_ref}))


def set_manual_threshold(db: Database, p: Principal, *, run_id: int, threshold: float,
                         note: str = "", evaluation_id: int | None = None) -> Any:

    authorize(db, p, "set_operating_point", f"run:{run_id}")
    return ops.set_manual_threshold(
        db, run_id=run_id, threshold=threshold, changed_by=p.identity, note=note,
        evaluation_id=evaluation_id,
        and_then=audited(p, "set_operating_point", f"run:{run_id}",
                     {"threshold": threshold, "note": note}))


def record_site_threshold(db: Database, p: Principal, candidate: Any, *,
                            note: str = "") -> Any:

    authorize(db, p, "site_calibration")
    return site_thresholds.record(
        db, candidate, changed_by=p.identity, note=note,
        and_then=audited(p, "site_calibration", lambda op: f"{op.model_ref}@dataset:{op.dataset_id}",
                     lambda op: {"threshold": op.threshold, "n": op.sample_n, "note": note}))
