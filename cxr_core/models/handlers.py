"""The model jobs a worker does (registered by :mod:`cxr_core.app`):

- ``create_ensemble``: params ``{"name", "members", "threshold", "note"}``; loads the members
  (TensorFlow) and chooses the named ensemble's operating point in the worker, never in the
  Streamlit script thread; result ``{"ensemble", "members", "threshold", "threshold_source"}``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core.jobs import queue
from cxr_core.jobs.queue import Handler, Progress
from cxr_core.models import ensembles
from cxr_core.storage import Database


def _create_ensemble(db: Database, job_id: int, params: Mapping[str, Any],
                     progress: Progress) -> dict:
    """A named ensemble from the page: loading the members (TensorFlow) and choosing its
    operating point happen here, in a worker, never in the Streamlit script thread. It is made
    by the job's submitter (checked and audited when it was queued), never a name in params."""

    progress(0, 1)
    job = queue.get_job(db, job_id)
    info = ensembles.create_ensemble(db, params["name"], params["members"],
                                     threshold=params.get("threshold"),
                                     changed_by=job.created_by if job else "",
                                     note=params.get("note", ""))
    progress(1, 1)
    return {"ensemble": info.ref, "members": list(info.members), "threshold": info.threshold,
            "threshold_source": info.threshold_source}


HANDLERS: dict[str, Handler] = {"create_ensemble": _create_ensemble}
