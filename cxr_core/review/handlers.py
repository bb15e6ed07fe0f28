"""The review jobs a worker does (registered by :mod:`cxr_core.app`):

- ``agreement``: params ``{"dataset_id", "newest_relabel_id", "limit", "offset"}``; result
  Cohen's kappa per reviewer pair and a page of conflicts (:func:`cxr_core.review.agreement.agreement`).
- ``export_relabels``: params ``{"dataset_id"}`` (None: every dataset); writes the CSV of
  every relabel row under ``<artifacts>/exports/`` and returns ``{"path", "rows"}``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core.jobs.queue import Handler, Progress
from cxr_core.review import agreement
from cxr_core.review import export as review_export
from cxr_core.storage import Database, get_settings


def _export_relabels(db: Database, job_id: int, params: Mapping[str, Any],
                     progress: Progress) -> dict:

    out = get_settings().artifacts_root / "exports" / f"relabels-job{job_id}.csv"
    rows = review_export.write_relabels_csv(db, out, dataset_id=params.get("dataset_id"),
                                            progress=progress)
    return {"path": str(out), "rows": rows}


def _agreement(db: Database, job_id: int, params: Mapping[str, Any],
               progress: Progress) -> dict:

    progress(0, 1)
    out = agreement.agreement(db, params["dataset_id"], conflicts_limit=params["limit"],
                              conflicts_offset=params["offset"]).to_json()
    progress(1, 1)
    return out


HANDLERS: dict[str, Handler] = {"export_relabels": _export_relabels, "agreement": _agreement}
