"""The data jobs a worker does (registered by :mod:`cxr_core.app`):

- ``index``: params ``{"path", "name", "external"}`` of :func:`cxr_core.data.indexing.index_dataset`; result
  the index report (:meth:`~cxr_core.data.indexing.IndexReport.to_json` plus ``dataset_id`` and
  ``warnings``). Batches commit as it goes, so a job failed by a killed worker resumes where it
  stopped when asked again.
- ``split_preview``: params ``{"dataset_id", "scheme", "val_fraction", "seed", "labels"
  ("original" | "current"), "as_of_relabel_id", "indexed_at", "split", "split_group"}`` of
  :func:`cxr_core.data.balance_report.split_preview`; result its JSON. The label version and the
  index time are in the params, so a finished job is the cached preview of exactly that state.
- ``balance_tables``: params ``{"dataset_id", "scheme", "as_of_relabel_id", "indexed_at"}``;
  result the Class balance tables over the labels as of that relabel id
  (:func:`cxr_core.data.balance_report.balance_tables`, ``current=True``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core.data import balance_report, indexing
from cxr_core.jobs.queue import Handler, Progress
from cxr_core.storage import Database


def _index(db: Database, job_id: int, params: Mapping[str, Any], progress: Progress) -> dict:
    rep = indexing.index_dataset(db, params["path"], name=params.get("name"), progress=progress,
                                 external=params.get("external"))
    return {**rep.to_json(), "dataset_id": rep.dataset_id, "warnings": rep.warnings}


def _split_preview(db: Database, job_id: int, params: Mapping[str, Any],
                   progress: Progress) -> dict:

    progress(0, 1)
    out = balance_report.split_preview(
        db, params["dataset_id"], params["scheme"], val_fraction=params["val_fraction"],
        seed=params["seed"], as_of_relabel_id=params.get("as_of_relabel_id"),
        current=params.get("labels") == "current", strategy=params.get("split", "patient"),
        group=params.get("split_group")).to_json()
    progress(1, 1)
    return out


def _balance_tables(db: Database, job_id: int, params: Mapping[str, Any],
                    progress: Progress) -> dict:
    from dataclasses import asdict


    progress(0, 1)
    out = asdict(balance_report.balance_tables(db, params["dataset_id"], params["scheme"],
                                               as_of_relabel_id=params.get("as_of_relabel_id"),
                                               current=True))
    progress(1, 1)
    return out


HANDLERS: dict[str, Handler] = {"index": _index, "split_preview": _split_preview,
                                "balance_tables": _balance_tables}
