"""The composition root: where the packages are wired together, and nothing else.

- :func:`open_db`: the configured database (the CLI's handle); :func:`open_app_db`: what the app does once per process (open and migrate the database, queue
  an index job per ``CXR_DATA_DIR`` folder).
- :func:`job_handlers`: every domain's job handlers, checked against the queue's kinds. The
  queue (:mod:`cxr_core.jobs.queue`) knows kind names and the action each needs; the code that
  does a kind lives in its domain's ``handlers`` module.
- :func:`run_worker`: the worker loop (:mod:`cxr_core.jobs.loop`) with those handlers and the
  run runner (:func:`cxr_core.training.runner.process_run`); ``python -m cxr_core worker``.

Only this module, the CLI and ``__main__`` sit at the top of ``cxr_core`` and may import every
package.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr_core import storage
from cxr_core.data import handlers as data_handlers
from cxr_core.evaluation import handlers as evaluation_handlers
from cxr_core.jobs import loop, queue
from cxr_core.jobs.queue import Handler
from cxr_core.models import handlers as model_handlers
from cxr_core.review import handlers as review_handlers
from cxr_core.storage import Database
from cxr_core.training import runner


def open_db() -> Database:
    """The configured database, migrated to the newest schema: the CLI's handle (the CLI, like
    the pages, never imports storage itself)."""
    return storage.open_db()


def open_app_db(*, start_worker: bool = True) -> tuple[Database, list[int]]:
    """Open the configured database (migrated to the newest schema) and queue an index job
    per ``CXR_DATA_DIR`` path: what the app does once per process. A worker does the indexing
    (incremental, so cheap when nothing changed); the web process reads no folder.

    Returns:
        (the database, the index job ids, one per data folder; an already queued or running
        job for a path is reused).
    """
    db = storage.open_db()
    return db, [queue.submit_once(db, "index", {"path": str(path), "name": None},
                                  start_worker=start_worker)
                for path in storage.get_settings().data_dirs]


def job_handlers() -> Mapping[str, Handler]:
    """Every job kind's handler, from the domains that own them (checked to cover the kinds)."""
    return queue.check_handlers({**data_handlers.HANDLERS, **evaluation_handlers.HANDLERS,
                                 **review_handlers.HANDLERS, **model_handlers.HANDLERS})


def run_job(db: Database, job_id: int) -> Any:
    """Do one claimed job with its domain's handler (:func:`cxr_core.jobs.queue.run_job`)."""
    return queue.run_job(db, job_id, job_handlers())


def run_worker(once: bool = False, idle_exit_s: float | None = None, **kwargs: Any) -> dict:
    """The worker loop, wired: jobs go to the domains' handlers, runs to the training runner.

    Keyword arguments are :func:`cxr_core.jobs.loop.run_worker`'s (``db``, ``poll_s``,
    ``stale_after_s``, ``kinds``).
    """
    return loop.run_worker(once=once, idle_exit_s=idle_exit_s, handlers=job_handlers(),
                           run_one=runner.process_run, **kwargs)
