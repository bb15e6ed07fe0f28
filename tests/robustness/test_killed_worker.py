"""SIGKILL of the training worker mid-epoch (issue 8): the dead-worker logic marks the run
failed, and it resumes from its last checkpoint to completion.

Moved here from tests/test_worker.py and extended: the run is reaped by the call the Train page
makes on load, the checkpoint it resumes from is on disk, each epoch's metrics are stored
once, and the finished model loads.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_core.training import service as svc
from cxr_core.models.refs import load_model_ref
from cxr_core.storage import runs as store
from cxr_core import app

pytestmark = pytest.mark.robustness
REPO = Path(__file__).resolve().parents[2]


def get(db, run_id: int) -> store.RunRecord:
    with db.session() as s:
        return store.get_run(session=s, run_id=run_id)


def test_killed_worker_run_is_failed_then_resumes_from_checkpoint(db, robust_home, train_set,
                                                                  tiny_run, wait_for):
    epochs = 5  # enough that even a fast machine is still training when the kill lands
    rid = svc.queue_run(db, svc.make_config(db, {**tiny_run, "dataset": train_set,
                                                 "epochs": epochs, "early_stopping": False}))
    env = dict(os.environ, CXR_HOME=str(robust_home), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_core", "worker", "--once"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: get(db, rid).epochs_done >= 1, 240, "the first epoch")
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-epoch: no handler, no clean-up, no last write
        proc.wait()
    killed = get(db, rid)
    done = killed.epochs_done
    assert killed.status == "running" and 1 <= done < epochs  # nobody has noticed yet
    assert (Path(killed.artifact_dir) / "checkpoints" / f"epoch_{done:03d}.keras").is_file()

    assert svc.refresh(db) == [rid]  # what the Train page calls on load: pid gone -> failed
    failed = get(db, rid)
    assert failed.status == "failed" and "no longer running" in failed.error

    svc.resume_run(db, rid, start_worker=False)
    out = app.run_worker(once=True, db=db)
    assert [(r["run_id"], r["status"], r["epochs"]) for r in out["runs"]] == \
        [(rid, "finished", epochs)], out
    with db.session() as s:
        logs = [x.message for x in store.get_logs(session=s, run_id=rid)]
        rows = store.get_metrics(session=s, run_ids=[rid], kind="epoch", keys=["loss"])
    assert any(f"resuming from epoch {m}" in x for x in logs for m in range(done, epochs))
    assert [r.step for r in rows] == list(range(1, epochs + 1))  # each epoch once
    finished = get(db, rid)
    assert finished.status == "finished" and finished.epochs_done == epochs
    assert load_model_ref(f"run:{rid}", db=db).image_size == 32
