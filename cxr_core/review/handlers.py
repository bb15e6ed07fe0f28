"""The review jobs a worker does (registered by :mod:`cxr_core.app`):

- ``agreement``: params ``{"dataset_id", "newest_relabel_id", "limit", "offset"}``; result
  Cohen's kappa per reviewer pair and a page of conflicts (:func:`cxr_core.review.agreement.agreement`).
- ``export_relabels``: params ``{"dataset_id"}`` (None: every dataset); writes the CSV of
  every relabel row under ``<artifacts>/exports/`` and returns ``{"path", "rows"}``.
- ``cleanup``: params ``{"dry_run"}`` (optional); deletes uploads nothing refers to and exports
  older than the retention (:mod:`cxr_core.review.retention`), returns its report. Workers
  queue it once a day.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core.jobs.queue import Handler, Progress
from cxr_core.review import agreement
from cxr_core.review import export as review_export
from cxr_core.review import retention
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


def _cleanup(db: Database, job_id: int, params: Mapping[str, Any], progress: Progress) -> dict:

    return retention.cleanup(db, dry_run=bool(params.get("dry_run", False)),
                             progress=progress).to_json()


HANDLERS: dict[str, Handler] = {"export_relabels": _export_relabels, "agreement": _agreement,
                                "cleanup": _cleanup}
