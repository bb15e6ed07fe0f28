"""SIGKILL of the worker mid-trial (issue 28 item 6): the study survives. The dead worker's
trial run is reaped as failed, the next worker's loop tells Optuna the trial failed (never
left running) and queues the next trial, which trains to the end and finishes the study."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_core import app
from cxr_core.auth.policy import local_principal
from cxr_core.search import actions, study
from cxr_core.storage import runs as store
from cxr_core.training import service as svc

pytestmark = pytest.mark.robustness
REPO = Path(__file__).resolve().parents[2]


def test_a_study_survives_a_worker_killed_mid_trial(db, robust_home, train_set, tiny_run,
                                                    wait_for):
    cfg = actions.resolve_config(db, {
        "name": "killed", "n_trials": 2, "parallel": 1,
        "base": {**tiny_run, "dataset": train_set, "epochs": 5, "early_stopping": False},
        "space": {"head.units": {"type": "categorical", "choices": [8, 16]},
                  "learning_rate": {"type": "log", "low": 1e-3, "high": 1e-2}}})
    created = actions.create_study(db, local_principal("sci"), cfg, start_worker=False)
    [first] = created.run_ids
    env = dict(os.environ, CXR_HOME=str(robust_home), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_core", "worker", "--once"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def epochs_done() -> int:
        with db.session() as s:
            return store.get_run(session=s, run_id=first).epochs_done

    try:
        wait_for(lambda: epochs_done() >= 1, 240, "the first trial's first epoch")
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-trial: no handler, no last write
        proc.wait()
    assert study.status(db, "killed")["trials"][0]["state"] == "running"  # nobody knows yet

    out = app.run_worker(once=True, db=db)  # another worker: reap, tell, queue, train
    with db.session() as s:
        dead = store.get_run(session=s, run_id=first)
    assert dead.status == "failed" and "no longer running" in dead.error
    st = study.status(db, "killed")
    assert [t["state"] for t in st["trials"]] == ["fail", "complete"], st
    assert st["state"] == "finished" and [r["run_id"] for r in out["runs"]] == \
        [st["trials"][1]["run_id"]]
    assert svc.get_run(db, st["trials"][1]["run_id"]).status == "finished"
