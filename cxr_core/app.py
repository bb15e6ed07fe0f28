"""The composition root: where the packages are wired together, and nothing else.

- :func:`open_db`: the configured database (the CLI's handle); :func:`open_app_db`: what the app does once per process (open and migrate the database, queue
  an index job per ``CXR_DATA_DIR`` folder).
- :func:`job_handlers`: every domain's job handlers, checked against the queue's kinds. The
  queue (:mod:`cxr_core.jobs.queue`) knows kind names and the action each needs; the code that
  does a kind lives in its domain's ``handlers`` module.
- :func:`run_worker`: the worker loop (:mod:`cxr_core.jobs.loop`) with those handlers and the
  run runner (:func:`cxr_core.search.trials.process_run`, which hands ordinary runs to
  :func:`cxr_core.training.runner.process_run`); ``python -m cxr_core worker``.
  A long-running worker queues the daily ``cleanup`` job (:mod:`cxr_core.review.retention`)
  when it is due (checked when it starts and every 10 minutes; ``--once`` does not).

Only this module, the CLI and ``__main__`` sit at the top of ``cxr_core`` and may import every
package.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core import storage
from cxr_core.core.data_roots import DEMO_DIR
from cxr_core.core.errors import CxrError
from cxr_core.data import handlers as data_handlers
from cxr_core.data.indexing import index_dataset, list_datasets
from cxr_core.evaluation import handlers as evaluation_handlers
from cxr_core.evaluation.evaluate import evaluate_model
from cxr_core.jobs import loop, queue
from cxr_core.jobs.queue import Handler, Progress
from cxr_core.models import handlers as model_handlers
from cxr_core.review import handlers as review_handlers
from cxr_core.review import retention
from cxr_core.search import trials as search_trials
from cxr_core.storage import Database
from cxr_core.storage import backup as storage_backup


def open_db() -> Database:
    """The configured database, migrated to the newest schema: the CLI's handle (the CLI, like
    the pages, never imports storage itself)."""
    return storage.open_db()


DEMO_PATH = DEMO_DIR / "chest_xray_mini"  # 300 real train films (demo/README.md)
DEMO_NAME = "demo"
DEMO_MODELS = ("default",)  # the shipped models evaluated on the demo films


def backup(out: str) -> dict:
    """``python -m cxr_core backup``: :func:`cxr_core.storage.backup.backup`."""
    return storage_backup.backup(out)


def restore(src: str, *, force: bool = False) -> dict:
    """``python -m cxr_core restore``: :func:`cxr_core.storage.backup.restore`."""
    return storage_backup.restore(src, force=force)


def open_app_db(*, start_worker: bool = True) -> tuple[Database, list[int]]:
    """Open the configured database (migrated to the newest schema) and queue an index job
    per ``CXR_DATA_DIR`` path: what the app does once per process. A worker does the indexing
    (incremental, so cheap when nothing changed); the web process reads no folder.

    On a first launch (no dataset known, no ``CXR_DATA_DIR``, ``CXR_DEMO`` not "off") it
    queues the ``demo`` job instead: the embedded demo films indexed, and the shipped model
    evaluated on them, so every page has real films to show.

    Returns:
        (the database, the job ids, one per data folder or the demo job; an already queued or
        running job for a path is reused).
    """
    db = storage.open_db()
    settings = storage.get_settings()
    jobs = [queue.submit_once(db, "index", {"path": str(path), "name": None},
                              start_worker=start_worker) for path in settings.data_dirs]
    if not jobs and settings.demo and DEMO_PATH.is_dir() and not list_datasets(db):
        jobs.append(queue.submit_once(db, "demo", {"path": str(DEMO_PATH), "name": DEMO_NAME,
                                                   "models": list(DEMO_MODELS)},
                                      start_worker=start_worker))
    return db, jobs


def scheduled_jobs() -> dict[str, float]:
    """The periodic system jobs workers queue when due (kind -> seconds): the retention
    cleanup once a day, unless retention is off (every ``CXR_RETENTION_DAYS*`` set to 0)."""
    if not retention.Retention.from_env().enabled:
        return {}
    return {"cleanup": retention.CLEANUP_EVERY_S}


def cleanup(*, dry_run: bool = False) -> dict:
    """``python -m cxr_core cleanup``: :func:`cxr_core.review.retention.cleanup` now."""
    return retention.cleanup(open_db(), dry_run=dry_run).to_json()


def _demo(db: Database, job_id: int, params: Mapping[str, Any], progress: Progress) -> dict:
    """The ``demo`` job: index the demo films, then evaluate each shipped model on them (its
    figures there are on its own training films: the evaluation's overlap says so)."""
    rep = index_dataset(db, params["path"], name=params["name"], progress=progress)
    evaluations = {}
    for ref in params.get("models") or ():
        try:
            evaluations[ref], _ = evaluate_model(db, ref, params["name"], progress=progress)
        except CxrError as exc:  # e.g. no shipped model in this checkout: the films still show
            evaluations[ref] = f"not evaluated: {exc}"
    return {**rep.to_json(), "dataset_id": rep.dataset_id, "warnings": rep.warnings,
            "evaluations": evaluations}


def job_handlers() -> Mapping[str, Handler]:
    """Every job kind's handler, from the domains that own them (checked to cover the kinds)."""
    return queue.check_handlers({**data_handlers.HANDLERS, **evaluation_handlers.HANDLERS,
                                 **review_handlers.HANDLERS, **model_handlers.HANDLERS,
                                 "demo": _demo})


def run_job(db: Database, job_id: int) -> Any:
    """Do one claimed job with its domain's handler (:func:`cxr_core.jobs.queue.run_job`)."""
    return queue.run_job(db, job_id, job_handlers())


def run_worker(once: bool = False, idle_exit_s: float | None = None, **kwargs: Any) -> dict:
    """The worker loop, wired: jobs go to the domains' handlers, runs to the training runner
    (through the search's trial runner: a study's trial reports to its pruner and advances its
    study), and every turn advances the studies that are due.

    Keyword arguments are :func:`cxr_core.jobs.loop.run_worker`'s (``db``, ``poll_s``,
    ``stale_after_s``, ``kinds``).
    """
    kwargs.setdefault("scheduled", scheduled_jobs())
    return loop.run_worker(once=once, idle_exit_s=idle_exit_s, handlers=job_handlers(),
                           run_one=search_trials.process_run, tick=search_trials.tick, **kwargs)
