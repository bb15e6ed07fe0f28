"""What a worker process does: register with a heartbeat, then claim and do queued jobs and
train queued runs until the queue stays empty (or forever).

Claims are atomic (``UPDATE ... WHERE status='queued'``; ``SKIP LOCKED`` on PostgreSQL), so any
number of workers on any hosts share one database. A heartbeat thread stamps the worker (and its
current run or job) every 5 s; SIGTERM marks the current run failed before the process exits.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from cxr_core.core.errors import ConfigError
from cxr_core.jobs import queue
from cxr_core.jobs.launcher import STALE_AFTER_S, WORKER_KINDS, reap_dead_runs
from cxr_core.jobs.queue import Handler
from cxr_core.storage import Database, StorageError, open_db
from cxr_core.storage import jobs as job_store
from cxr_core.storage import runs as store

HEARTBEAT_S = 5.0
POLL_S = 2.0
SCHEDULE_CHECK_S = 600.0  # how often a worker looks whether a periodic job is due


class Heartbeat:
    """A daemon thread stamping the worker (and its current run) every ``interval_s``."""

    def __init__(self, db: Database, worker_id: int, interval_s: float = HEARTBEAT_S):
        self.db, self.worker_id, self.interval_s = db, worker_id, interval_s
        self.run_id: int | None = None
        self.job_id: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cxr-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            self.db.write(lambda s: store.heartbeat(session=s, worker_id=self.worker_id,
                                                    run_id=self.run_id))
            if self.job_id is not None:
                self.db.write(lambda s: job_store.heartbeat_job(session=s, job_id=self.job_id))
        except StorageError as exc:  # a missed beat is retried at the next one
            print(f"heartbeat failed: {exc}", file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)


def _sigterm_to_exit() -> Callable[[], None]:
    """SIGTERM raises SystemExit in the main thread (so the current run is marked failed)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def register(db: Database, kinds: str = "all") -> tuple[int, Heartbeat]:
    """Register this process as a worker (serving ``kinds``) and start its heartbeat."""
    worker_id = db.write(lambda s: store.register_worker(session=s, pid=os.getpid(),
                                                         host=socket.gethostname(),
                                                         kinds=kinds))
    return worker_id, Heartbeat(db, worker_id).start()


def unregister(db: Database, worker_id: int, heartbeat: Heartbeat) -> None:
    heartbeat.stop()
    db.write(lambda s: store.stop_worker(session=s, worker_id=worker_id))


RunOne = Callable[[Database, int], Any]  # (db, claimed run id) -> outcome with .to_json()
Tick = Callable[[Database], Any]  # called every loop turn, after reaping (study upkeep)


def run_worker(once: bool = False, idle_exit_s: float | None = None, *,
               handlers: Mapping[str, Handler], run_one: RunOne | None,
               db: Database | None = None, poll_s: float = POLL_S,
               stale_after_s: float = STALE_AFTER_S, kinds: str = "all",
               scheduled: Mapping[str, float] | None = None,
               tick: Tick | None = None) -> dict:
    """Claim and do queued jobs and train queued runs until stopped (jobs first: short).

    The loop knows no domain: the composition root (:func:`cxr_core.app.run_worker`) passes
    the job handlers and the function that trains one claimed run.

    Args:
        handlers: job kind -> handler (:func:`cxr_core.jobs.queue.check_handlers`).
        run_one: trains one claimed run to its end and records it; None only when ``kinds``
            is "jobs".
        once: exit as soon as the queue is empty.
        idle_exit_s: exit after this many seconds with an empty queue (None: never).
        db: the database (opened from the settings when None).
        poll_s: seconds between queue checks while idle.
        stale_after_s: heartbeat age after which another worker's run is reaped.
        kinds: "all", "runs" (training only) or "jobs" (jobs only).
        scheduled: job kind -> seconds: periodic system jobs this worker queues when due
            (:func:`cxr_core.jobs.queue.submit_if_due`; checked when it starts and then at
            most every :data:`SCHEDULE_CHECK_S`), e.g. the daily ``cleanup``. Not by a
            runs-only worker, nor with ``once`` (a one-shot drain of the queue).
        tick: called every turn after reaping dead runs (the composition root passes the
            studies' upkeep: trials of a dead worker are told and replaced there).

    Returns:
        ``{"worker_id", "pid", "runs": [outcome...], "jobs": [id...], "status": "finished"}``.

    Raises:
        ConfigError: an unknown ``kinds``.
    """
    if kinds not in WORKER_KINDS:
        raise ConfigError(f"kinds must be one of {WORKER_KINDS}. Received: kinds={kinds!r}")
    if run_one is None and kinds != "jobs":
        raise ConfigError(f"a worker serving runs needs run_one. Received: kinds={kinds!r}")
    handlers = queue.check_handlers(handlers)
    db = db or open_db()
    worker_id, beat = register(db, kinds)
    done_jobs: list[int] = []
    restore = _sigterm_to_exit()
    outcomes = []
    idle_since = time.monotonic()
    next_check = 0.0
    try:
        while True:
            if scheduled and kinds != "runs" and not once and time.monotonic() >= next_check:
                for kind, every_s in scheduled.items():
                    queue.submit_if_due(db, kind, every_s)
                next_check = time.monotonic() + SCHEDULE_CHECK_S
            reap_dead_runs(db, stale_after_s)
            if tick is not None and kinds != "jobs":
                tick(db)
            if kinds != "runs":
                db.write(lambda s: job_store.reap_dead_jobs(session=s,
                                                            stale_after_s=stale_after_s))
                job_id = db.write(lambda s: job_store.claim_next_job(session=s,
                                                                     worker_id=worker_id))
                if job_id is not None:
                    beat.job_id = job_id
                    queue.run_job(db, job_id, handlers)
                    beat.job_id = None
                    done_jobs.append(job_id)
                    idle_since = time.monotonic()
                    continue
            run_id = None if kinds == "jobs" else db.write(
                lambda s: store.claim_next_run(session=s, worker_id=worker_id))
            if run_id is None:
                if once or (idle_exit_s is not None
                            and time.monotonic() - idle_since >= idle_exit_s):
                    break
                time.sleep(poll_s)
                continue
            beat.run_id = run_id
            outcomes.append(run_one(db, run_id).to_json())
            beat.run_id = None
            idle_since = time.monotonic()
    finally:
        restore()
        unregister(db, worker_id, beat)
    return {"worker_id": worker_id, "pid": os.getpid(), "runs": outcomes, "jobs": done_jobs,
            "status": "finished"}
