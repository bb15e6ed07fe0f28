"""Starting and reaping worker processes: the app never trains or runs a job in its own process
(Streamlit does not support app threads).

A page writes a queued run or job and calls :func:`ensure_worker`, which launches
``python -m cxr_core worker`` detached (its own session; output appended to
``<CXR_HOME>/logs/worker.log``) unless a live worker serves that queue. A worker killed with
SIGKILL stops beating; :func:`reap_dead_runs` (called by the pages and by every worker loop)
marks its run failed once the heartbeat is older than 30 s, or at once when the worker's pid is
gone on this host. What a worker does is :mod:`cxr_core.jobs.loop`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cxr_core.core.settings import get_settings
from cxr_core.storage import Database
from cxr_core.storage import runs as store

REPO = Path(__file__).resolve().parents[2]
STALE_AFTER_S = 30.0
APP_IDLE_EXIT_S = 600.0  # a worker started by the app exits after this long without work
LAUNCH_GRACE_S = 90.0  # a just-launched worker has this long to register (TF import)


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
