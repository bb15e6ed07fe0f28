"""Jobs as user actions: a page asks for heavy work (evaluating a model over a dataset) and a
worker process does it, so the Streamlit process never decodes a dataset or runs a model over
one. The page polls :func:`get_job` for progress; the result is JSON in the database, so a
reload or an app restart loses nothing.

Kinds (:data:`KINDS`):

- ``index``: params ``{"path", "name"}`` of :func:`cxr_core.indexing.index_dataset`; result
  the index report (:meth:`~cxr_core.indexing.IndexReport.to_json` plus ``dataset_id`` and
  ``warnings``). Batches commit as it goes, so a job failed by a killed worker resumes where
  it stopped when asked again.
- ``evaluate``: params of :func:`cxr_core.evaluation_service.evaluate_model`; result
  ``{"evaluation_id"}``.
- ``split_preview``: params ``{"dataset_id", "scheme", "val_fraction", "seed", "labels"
  ("original" | "current"), "as_of_relabel_id", "indexed_at", "split", "split_group"}`` of
  :func:`cxr_core.balance_report.split_preview`; result its JSON. The label version and the
  index time are in the params, so a finished job is the cached preview of exactly that state.
- ``compare_ci``: params ``{"evaluation_ids", "mode", "target", "truth",
  "as_of_relabel_id", "thresholds", "n_boot"}``; result the comparison's metrics with bootstrap 95%
  intervals (:func:`cxr_core.compare_service.comparison_intervals`), kept per label version.
- ``balance_tables``: params ``{"dataset_id", "scheme", "as_of_relabel_id", "indexed_at"}``;
  result the Class balance tables over the labels as of that relabel id
  (:func:`cxr_core.balance_report.balance_tables`, ``current=True``).
- ``agreement``: params ``{"dataset_id", "newest_relabel_id", "limit", "offset"}``; result
  Cohen's kappa per reviewer pair and a page of conflicts (:func:`cxr_core.agreement.agreement`).
- ``site_calibration``: params ``{"evaluation_id", "sample" ("all" | "reviewed"), "labels",
  "as_of_relabel_id", "method", "target", "n_boot"}``; result the candidate site operating
  point with patient-clustered intervals (:func:`cxr_core.site_calibration.candidate`), kept
  per label version (the page records it only when a person says so).
- ``export_relabels``: params ``{"dataset_id"}`` (None: every dataset); writes the CSV of
  every relabel row under ``<artifacts>/exports/`` and returns ``{"path", "rows"}``.
"""
from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from cxr_core.errors import ConfigError, CxrError
from cxr_core.storage import AndThen, Database
from cxr_core.storage import jobs as store
from cxr_core.storage.jobs import JobRecord

Progress = Callable[[int, int], None]
Handler = Callable[[Database, int, Mapping[str, Any], Progress], dict]
PROGRESS_EVERY_S = 0.5  # progress writes per job at most this often


def _index(db: Database, job_id: int, params: Mapping[str, Any], progress: Progress) -> dict:
    from cxr_core import indexing

    rep = indexing.index_dataset(db, params["path"], name=params.get("name"), progress=progress)
    return {**rep.to_json(), "dataset_id": rep.dataset_id, "warnings": rep.warnings}


def _export_relabels(db: Database, job_id: int, params: Mapping[str, Any],
                     progress: Progress) -> dict:
    from cxr_core import review_export
    from cxr_core.storage import get_settings

    out = get_settings().artifacts_root / "exports" / f"relabels-job{job_id}.csv"
    rows = review_export.write_relabels_csv(db, out, dataset_id=params.get("dataset_id"),
                                            progress=progress)
    return {"path": str(out), "rows": rows}


def _split_preview(db: Database, job_id: int, params: Mapping[str, Any],
                   progress: Progress) -> dict:
    from cxr_core import balance_report

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

    from cxr_core import balance_report

    progress(0, 1)
    out = asdict(balance_report.balance_tables(db, params["dataset_id"], params["scheme"],
                                               as_of_relabel_id=params.get("as_of_relabel_id"),
                                               current=True))
    progress(1, 1)
    return out


def _agreement(db: Database, job_id: int, params: Mapping[str, Any],
               progress: Progress) -> dict:
    from cxr_core import agreement

    progress(0, 1)
    out = agreement.agreement(db, params["dataset_id"], conflicts_limit=params["limit"],
                              conflicts_offset=params["offset"]).to_json()
    progress(1, 1)
    return out


def _compare_ci(db: Database, job_id: int, params: Mapping[str, Any],
                progress: Progress) -> dict:
    from cxr_core import compare_service

    progress(0, 1)
    out = compare_service.comparison_intervals(
        db, params["evaluation_ids"], mode=params["mode"], target=params["target"],
        truth=params["truth"], as_of_relabel_id=params.get("as_of_relabel_id"),
        thresholds=params.get("thresholds"), n_boot=params.get("n_boot", 500))
    progress(1, 1)
    return out


def _evaluate(db: Database, job_id: int, params: Mapping[str, Any], progress: Progress) -> dict:
    from cxr_core import evaluation_service as es

    evaluation_id, _ = es.evaluate_model(db, params["model_ref"], params["data"],
                                         split=params.get("split"), progress=progress,
                                         labels=params.get("labels", "current"))
    return {"evaluation_id": evaluation_id}


def _site_calibration(db: Database, job_id: int, params: Mapping[str, Any],
                      progress: Progress) -> dict:
    from cxr_core import site_calibration

    progress(0, 1)
    out = site_calibration.candidate(
        db, evaluation_id=params["evaluation_id"], sample=params.get("sample", "all"),
        labels=params.get("labels", "current"), method=params.get("method", "sensitivity"),
        target=params.get("target", 0.95), n_boot=params.get("n_boot", 500),
        as_of_relabel_id=params.get("as_of_relabel_id")).to_json()
    progress(1, 1)
    return out


def _create_ensemble(db: Database, job_id: int, params: Mapping[str, Any],
                     progress: Progress) -> dict:
    """A named ensemble from the page: loading the members (TensorFlow) and choosing its
    operating point happen here, in a worker, never in the Streamlit script thread. It is made
    by the job's submitter (checked and audited when it was queued), never a name in params."""
    from cxr_core import ensembles

    progress(0, 1)
    job = get_job(db, job_id)
    info = ensembles.create_ensemble(db, params["name"], params["members"],
                                     threshold=params.get("threshold"),
                                     changed_by=job.created_by if job else "",
                                     note=params.get("note", ""))
    progress(1, 1)
    return {"ensemble": info.ref, "members": list(info.members), "threshold": info.threshold,
            "threshold_source": info.threshold_source}


KINDS: dict[str, Handler] = {
    "index": _index,
    "evaluate": _evaluate,
    "export_relabels": _export_relabels,
    "split_preview": _split_preview,
    "compare_ci": _compare_ci,
    "balance_tables": _balance_tables,
    "agreement": _agreement,
    "site_calibration": _site_calibration,
    "create_ensemble": _create_ensemble,
}


def submit(db: Database, kind: str, params: Mapping[str, Any], *,
           start_worker: bool = True, created_by: str | None = None,
           and_then: AndThen | None = None) -> int:
    """Queue a job and make sure a worker will take it; returns the job id.

    ``created_by`` is stored with it (who asked). ``and_then(session, job_id)`` runs in the
    job row's transaction (an audit row, a quota check that may refuse it); the worker is
    started only once both are committed.

    A worker busy training does not take jobs until its run ends, so when every live local
    worker is training, a second one serving only jobs is started (``CXR_WORKER=auto``).

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in KINDS:
        raise ConfigError(f"job kind must be one of {sorted(KINDS)}. Received: kind={kind!r}")
    job_id = db.write(lambda s: store.create_job(session=s, kind=kind, params=params,
                                                 created_by=created_by), and_then=and_then)
    if start_worker:
        from cxr_core import worker

        worker.ensure_worker(db, kinds="jobs")
    return job_id


def get_job(db: Database, job_id: int) -> JobRecord | None:
    with db.session() as s:
        return store.get_job(session=s, job_id=job_id)


def recent_jobs(db: Database, kind: str, *, limit: int = 10) -> list[JobRecord]:
    """The newest jobs of a kind, newest first."""
    with db.session() as s:
        return store.list_jobs(session=s, kind=kind, limit=limit)


def submit_once(db: Database, kind: str, params: Mapping[str, Any], *,
                start_worker: bool = True, created_by: str | None = None,
                and_then: AndThen | None = None) -> int:
    """:func:`submit`, unless a job of that kind with the same params is queued or running
    (two tabs asking to index one folder get one job); returns that job's id. ``and_then``
    runs only when a job is created (in its transaction)."""
    with db.session() as s:
        open_jobs = store.find_jobs(session=s, kind=kind, params=params,
                                    statuses=("queued", "running"))
    if open_jobs:
        if start_worker:
            from cxr_core import worker

            worker.ensure_worker(db, kinds="jobs")
        return open_jobs[0].id
    return submit(db, kind, params, start_worker=start_worker, created_by=created_by,
                  and_then=and_then)


def latest_job(db: Database, kind: str, params: Mapping[str, Any]) -> JobRecord | None:
    """The newest job of ``kind`` with exactly these params, in any status (a finished one
    holds its result: the page reads it instead of asking again)."""
    with db.session() as s:
        found = store.find_jobs(session=s, kind=kind, params=params)
    return found[0] if found else None


def run_job(db: Database, job_id: int) -> JobRecord:
    """Do one claimed job and record how it ended (a failure is stored, not raised)."""
    job = get_job(db, job_id)
    if job is None:
        raise ConfigError(f"no job {job_id}")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done == total:
            last[0] = now
            db.write(lambda s: store.set_progress(session=s, job_id=job_id, done=done,
                                                  total=total))

    error, result = None, None
    try:
        result = KINDS[job.kind](db, job_id, job.params, progress)
    except CxrError as exc:
        error = str(exc)
    except Exception as exc:  # stored for the page; the worker goes on with the next job
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    db.write(lambda s: store.finish_job(session=s, job_id=job_id,
                                        status="failed" if error else "finished",
                                        result=result, error=error))
    return get_job(db, job_id)
