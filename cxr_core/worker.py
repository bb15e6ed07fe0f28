"""The training worker: a process that claims queued runs from the DB and trains them.

The app never trains in its own process (Streamlit does not support app threads): a page
writes a queued run and calls :func:`ensure_worker`, which launches
``python -m cxr_core worker`` detached (its own session; output appended to
``<CXR_HOME>/logs/worker.log``) unless a live worker exists. The worker:

* claims runs atomically (``UPDATE ... WHERE status='queued'``; safe with several workers),
* prepares the data from the index (label snapshot, patient split) and calls
  :func:`cxr_core.training.train` with sinks that write long-form metric rows (per epoch,
  and per batch at most every 2 s), run log lines, and a cancel check after every batch,
* beats a heartbeat (worker row and run row) from a thread every 5 s,
* at the end stores the operating point, chosen on the run's calibration slice (binary:
  target sensitivity 0.95), the validation and calibration evaluations
  (:mod:`cxr_core.run_outputs`) and ``model_card.json`` with its ``measured`` list.

A worker killed with SIGKILL stops beating; :func:`reap_dead_runs` (called by the pages and
by every worker loop) marks its run failed once the heartbeat is older than 30 s, or at once
when the worker's pid is gone on this host. The CLI's in-process ``train`` uses the same
:func:`process_run`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_core.config import get_settings
from cxr_core.errors import ConfigError, CxrError
from cxr_core.storage import Database, StorageError, open_db
from cxr_core.storage import jobs as job_store
from cxr_core.storage import runs as store
from cxr_core.run_data import PreparedData, prepare_data

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5.0
STALE_AFTER_S = 30.0
POLL_S = 2.0
APP_IDLE_EXIT_S = 600.0  # a worker started by the app exits after this long without work
LAUNCH_GRACE_S = 90.0  # a just-launched worker has this long to register (TF import)

Progress = Callable[[int, int], None]


# -- Liveness -------------------------------------------------------------------------------

def pid_alive(pid: int, host: str) -> bool | None:
    """Whether process ``pid`` runs on ``host`` (None: another host, cannot tell).

    A killed child its parent has not waited for yet is a zombie: counted as dead.
    """
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): the heartbeat age decides
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def reap_dead_runs(db: Database, stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Mark running runs of dead workers failed (stale heartbeat, or pid gone on this host).

    Returns:
        The ids of the runs marked failed.
    """
    return db.write(lambda s: store.reap_dead_runs(session=s, stale_after_s=stale_after_s,
                                                   is_alive=pid_alive))


WORKER_KINDS = ("all", "runs", "jobs")  # what a worker serves: training runs, jobs, or both


def _serves(worker_kinds: str, wanted: str) -> bool:
    return worker_kinds == "all" or worker_kinds == wanted


def ensure_worker(db: Database, *, idle_exit_s: float = APP_IDLE_EXIT_S,
                  kinds: str = "runs") -> int | None:
    """Make sure a worker serves the queue of ``kinds`` ("runs" or "jobs"); launch one
    (detached) if none is alive.

    A worker training a run takes no job until the run ends, so for "jobs" a live worker
    counts only while it is not training; otherwise a worker serving only jobs is launched.
    With ``CXR_WORKER=off`` this process never launches one: workers on other hosts (or one
    started by hand) claim the queue.

    Args:
        db: the database (its URL is passed to the worker).
        idle_exit_s: a launched worker exits after this long with an empty queue.
        kinds: the queue to serve.

    Returns:
        The pid of the live (or launched) worker on this host; None when the live workers are
        elsewhere, or none is alive and ``CXR_WORKER=off``.
    """
    settings = get_settings()
    with db.session() as s:
        live = [w for w in store.live_workers(session=s, fresh_after_s=STALE_AFTER_S)
                if _serves(w.kinds, kinds)]
        busy = store.busy_worker_ids(session=s) if kinds == "jobs" else set()
    for w in live:
        if w.id in busy:
            continue
        alive = pid_alive(w.pid, w.host)
        if alive is True:
            return w.pid
        if alive is None:  # another host's worker, heartbeat fresh: it serves the queue
            return None
    if settings.worker == "off":
        return None
    marker = settings.home / ("worker.pid" if kinds == "runs" else "worker-jobs.pid")
    try:  # launched moments ago and still starting: not registered yet
        launched = json.loads(marker.read_text())
        if (time.time() - launched["started"] < LAUNCH_GRACE_S
                and pid_alive(int(launched["pid"]), socket.gethostname())):
            return int(launched["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CXR_HOME=str(settings.home), CXR_DB_URL=db.url,
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p))
    # A runs worker also takes jobs while it is idle; a jobs worker never trains.
    cmd = [sys.executable, "-m", "cxr_core", "worker", "--idle-exit", str(idle_exit_s),
           "--kinds", "all" if kinds == "runs" else "jobs"]
    with open(log_dir / "worker.log", "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    marker.write_text(json.dumps({"pid": proc.pid, "started": time.time()}))
    return proc.pid


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


# -- One run --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunOutcome:
    """How one run ended (the CLI prints :meth:`to_json`)."""

    run_id: int
    status: str  # finished | failed | cancelled
    epochs: int
    val: dict = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict:
        out = {"run_id": self.run_id, "status": self.status, "epochs": self.epochs,
               "val": self.val}
        if self.error:
            out["error"] = self.error
        return out


def _fmt(logs: dict[str, float]) -> str:
    keys = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")
    parts = [f"{k} {logs[k]:.4f}" for k in keys if k in logs]
    if "lr" in logs:
        parts.append(f"lr {logs['lr']:.2g}")
    if "images_per_s" in logs:
        parts.append(f"{logs['images_per_s']:.0f} img/s")
    return ", ".join(parts)


def db_sinks(db: Database, run_id: int, *, epochs: int, progress: Progress | None = None,
             batch_interval_s: float = 2.0) -> Any:
    """TrainSinks that write metrics, epochs done and log lines, and read the cancel flag."""
    from cxr_core.train_io import TrainSinks

    first_batch = [True]

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        def write(s) -> None:
            store.add_metrics(session=s, run_id=run_id, kind="epoch", step=epoch, values=logs)
            store.set_epochs_done(session=s, run_id=run_id, epochs_done=epoch)
            store.add_log(session=s, run_id=run_id, message=f"epoch {epoch}/{epochs}: {_fmt(logs)}")
        db.write(write)
        if progress is not None:
            progress(epoch, epochs)

    def on_batch_end(step: int, logs: dict[str, float]) -> None:
        def write(s) -> None:
            if first_batch[0]:  # a resumed run rewrites the batches past its checkpoint
                store.truncate_metrics(session=s, run_id=run_id, after_batch_step=step - 1)
            store.add_metrics(session=s, run_id=run_id, kind="batch", step=step, values=logs)
        db.write(write)
        first_batch[0] = False

    def should_cancel() -> bool:
        with db.session() as s:
            return store.should_stop(session=s, run_id=run_id)

    def log(level: str, message: str) -> None:
        db.write(lambda s: store.add_log(session=s, run_id=run_id, message=message, level=level))

    return TrainSinks(on_epoch_end, on_batch_end, should_cancel, log, batch_interval_s)


def _log(db: Database, run_id: int, message: str, level: str = "info") -> None:
    db.write(lambda s: store.add_log(session=s, run_id=run_id, message=message, level=level))


def _complete(db: Database, run: store.RunRecord, cfg: Any, prepared: PreparedData, result: Any,
              run_dir: Path) -> RunOutcome:
    """Validation and calibration outputs, model card and the run's final row."""
    from cxr_core.card_measured import refresh_run_card
    from cxr_core.model_store import write_model_card
    from cxr_core.run_outputs import RunOutputs, record_outputs

    try:
        out = record_outputs(db, run, cfg, prepared, result)
    except ConfigError as exc:  # e.g. a validation split missing a class: keep the model
        _log(db, run.id, f"validation metrics not stored: {exc}", "warning")
        out = RunOutputs({}, None, None)
    val, op, eval_id = out.val, out.operating_point, out.evaluation_id
    if op and op.get("calibration_skipped"):
        _log(db, run.id, f"threshold chosen on validation: {op['calibration_skipped']}",
             "warning")
    snap = prepared.snapshot
    write_model_card(
        run_dir, name=run.display_name, cfg=cfg, classes=result.classes,
        saliency_layer=result.saliency_layer, operating_point=op, val_metrics=val,
        dataset={"id": prepared.dataset_id, "name": prepared.dataset_name,
                 "root": prepared.dataset_root, "counts": prepared.counts},
        label_snapshot={"source": cfg.label_source, "hash": snap.hash,
                        "relabel_id": snap.newest_relabel_id, "n_relabels": snap.n_relabels},
        extra={"run_id": run.id, "model_ref": f"run:{run.id}", "epochs": result.epochs_done,
               "best_epoch": result.best_epoch, "weights": result.weights_report,
               "evaluation_id": eval_id,
               "calibration_evaluation_id": out.calibration_evaluation_id})
    refresh_run_card(db, run.id)  # "measured": every split, with patient-clustered intervals
    summary = {"val": val, "epochs": result.epochs_done, "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "images_per_s": result.images_per_s,
               "n_train": result.n_train, "n_val": result.n_val, "skipped": result.skipped,
               "feature_cache": result.feature_cache, "evaluation_id": eval_id,
               "operating_point": op, "n_calibration": len(prepared.calibration),
               "calibration_evaluation_id": out.calibration_evaluation_id}
    db.write(lambda s: store.finish_run(session=s, run_id=run.id, status="finished",
                                        summary=summary, only_if="running"))
    _log(db, run.id, "finished: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()
                                              if isinstance(v, float)))
    return RunOutcome(run.id, "finished", result.epochs_done, val)


def _start(db: Database, run: store.RunRecord, cfg: Any, run_dir: Path) -> tuple[PreparedData, int]:
    """Prepare the data, record the snapshot and artifacts; returns (data, initial epoch)."""
    from cxr_core.checkpoints import resume_epoch

    resume = run.resume_requested
    initial = resume_epoch(run_dir, run.epochs_done) if resume else 0
    as_of = (run.label_snapshot_relabel_id or 0) if resume and run.label_snapshot_hash else None
    prepared = prepare_data(db, cfg, as_of_relabel_id=as_of)
    snap = prepared.snapshot

    def write(s) -> None:
        store.set_run_artifacts(session=s, run_id=run.id, artifact_dir=str(run_dir),
                                snapshot_hash=snap.hash,
                                snapshot_relabel_id=snap.newest_relabel_id)
        store.set_epochs_done(session=s, run_id=run.id, epochs_done=initial)
        data = prepared.data  # the images it trains, selects and calibrates on (warnings)
        store.set_run_images(session=s, run_id=run.id,
                             train_ids=[i for i, v in zip(data.image_ids, data.is_val)
                                        if i is not None and not v],
                             val_ids=[i for i, v in zip(data.image_ids, data.is_val)
                                      if i is not None and v],
                             calib_ids=[r.id for r in prepared.calibration])
        if resume:
            store.truncate_metrics(session=s, run_id=run.id, after_epoch=initial)
        store.add_log(session=s, run_id=run.id, message=(
            f"{'resuming from epoch ' + str(initial) if resume else 'started'} on "
            f"{socket.gethostname()} (pid {os.getpid()}): dataset {prepared.dataset_name!r}, "
            f"{cfg.label_scheme} labels ({cfg.label_source}, snapshot {snap.hash[:12]}), "
            f"train {prepared.counts['train']}, val {prepared.counts['val']}, calibration "
            f"{prepared.counts.get('calibration') or prepared.calibration_skipped}"))
    db.write(write)
    return prepared, initial


def process_run(db: Database, run_id: int, *, progress: Progress | None = None) -> RunOutcome:
    """Train one claimed (running) run to its end and record everything.

    Never raises for a failing run: it is marked failed with its error (a KeyboardInterrupt
    or SystemExit also marks it failed, then propagates).

    Args:
        db: the database.
        run_id: a run this process has claimed.
        progress: (epochs done, epochs) after each epoch (the CLI prints it).

    Returns:
        How the run ended.
    """
    from cxr_core import training
    from cxr_core.train_config import TrainConfig

    with db.session() as s:
        run = store.require_run(session=s, run_id=run_id)
    epochs = 0
    try:
        cfg = TrainConfig.from_dict(run.config)
        run_dir = Path(run.artifact_dir or get_settings().runs_dir / str(run_id))
        prepared, epochs = _start(db, run, cfg, run_dir)
        result = training.train(cfg, prepared.data, run_dir, cache_root=get_settings().cache_dir,
                                sinks=db_sinks(db, run_id, epochs=cfg.epochs, progress=progress),
                                initial_epoch=epochs)
        epochs = result.epochs_done
        if result.status == "cancelled":
            return _cancelled(db, run_id, epochs)
        return _complete(db, run, cfg, prepared, result, run_dir)
    except CxrError as exc:
        return _fail(db, run_id, epochs, str(exc))
    except Exception as exc:  # any training error ends this run, not the worker
        _log(db, run_id, traceback.format_exc(limit=20), "error")
        return _fail(db, run_id, epochs, f"{type(exc).__name__}: {exc}")
    except BaseException:  # KeyboardInterrupt / SystemExit (SIGTERM): record, then stop
        _fail(db, run_id, epochs, "the worker was stopped; resume to continue")
        raise


def _cancelled(db: Database, run_id: int, epochs: int) -> RunOutcome:
    with db.session() as s:
        status = store.require_run(session=s, run_id=run_id).status
    if status != "running":  # reaped meanwhile: keep its reason
        return RunOutcome(run_id, status, epochs, error="stopped: the run was marked " + status)
    msg = f"cancelled on request after {epochs} complete epoch(s)"
    db.write(lambda s: store.finish_run(session=s, run_id=run_id, status="cancelled", error=msg,
                                        only_if="running"))
    _log(db, run_id, msg, "warning")
    return RunOutcome(run_id, "cancelled", epochs, error=msg)


def _fail(db: Database, run_id: int, epochs: int, error: str) -> RunOutcome:
    def write(s) -> None:
        store.finish_run(session=s, run_id=run_id, status="failed", error=error, only_if="running")
        store.add_log(session=s, run_id=run_id, message=f"failed: {error}", level="error")
    db.write(write)
    return RunOutcome(run_id, "failed", epochs, error=error)


# -- The worker loop ------------------------------------------------------------------------

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


def run_worker(once: bool = False, idle_exit_s: float | None = None, *,
               db: Database | None = None, poll_s: float = POLL_S,
               stale_after_s: float = STALE_AFTER_S, kinds: str = "all") -> dict:
    """Claim and do queued jobs and train queued runs until stopped (jobs first: short).

    Args:
        once: exit as soon as the queue is empty.
        idle_exit_s: exit after this many seconds with an empty queue (None: never).
        db: the database (opened from the settings when None).
        poll_s: seconds between queue checks while idle.
        stale_after_s: heartbeat age after which another worker's run is reaped.
        kinds: "all", "runs" (training only) or "jobs" (jobs only).

    Returns:
        ``{"worker_id", "pid", "runs": [outcome...], "jobs": [id...], "status": "finished"}``.

    Raises:
        ConfigError: an unknown ``kinds``.
    """
    from cxr_core import jobs

    if kinds not in WORKER_KINDS:
        raise ConfigError(f"kinds must be one of {WORKER_KINDS}. Received: kinds={kinds!r}")
    db = db or open_db()
    worker_id, beat = register(db, kinds)
    done_jobs: list[int] = []
    restore = _sigterm_to_exit()
    outcomes = []
    idle_since = time.monotonic()
    try:
        while True:
            reap_dead_runs(db, stale_after_s)
            if kinds != "runs":
                db.write(lambda s: job_store.reap_dead_jobs(session=s,
                                                            stale_after_s=stale_after_s))
                job_id = db.write(lambda s: job_store.claim_next_job(session=s,
                                                                     worker_id=worker_id))
                if job_id is not None:
                    beat.job_id = job_id
                    jobs.run_job(db, job_id)
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
            outcomes.append(process_run(db, run_id).to_json())
            beat.run_id = None
            idle_since = time.monotonic()
    finally:
        restore()
        unregister(db, worker_id, beat)
    return {"worker_id": worker_id, "pid": os.getpid(), "runs": outcomes, "jobs": done_jobs,
            "status": "finished"}
