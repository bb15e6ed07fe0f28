"""App restart during a run (issue 8): the run started from the Train page is still listed,
with its live status, by a fresh app, and the fresh app shows it finished.

The run is started the way the Train page starts one (its "Start training" button: a queued
run + a detached worker process). The "restart" is a new AppTest of the page with Streamlit's
caches cleared: a new session and a new cached DB engine, as in a new app process; only the
DB and the worker process carry over. While the fresh app renders, the worker is paused with
SIGSTOP (well inside the 30 s heartbeat window) so the run is certainly mid-flight, then
resumed with SIGCONT to finish.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from cxr_core.storage import runs as store

pytestmark = pytest.mark.robustness
PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "train.py")


def fresh_app() -> AppTest:
    """A new app "process": empty st caches (get_db is a cache_resource), a new session."""
    st.cache_resource.clear()
    st.cache_data.clear()
    return AppTest.from_file(PAGE, default_timeout=90)


def status_shown(at: AppTest, run_id: int) -> str:
    """The status cell of the run's row in the runs table."""
    table = at.dataframe[0].value
    rows = table[table["id"] == run_id]
    assert len(rows) == 1, table
    return rows["status"].iloc[0]


def get(db, run_id: int) -> store.RunRecord:
    with db.session() as s:
        return store.get_run(session=s, run_id=run_id)


def stop_worker(pid: int) -> None:
    """SIGTERM (the worker marks its current run failed and unregisters), then reap it."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:  # already reaped by subprocess' own clean-up
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def test_app_restart_during_a_run_still_shows_it_and_it_finishes(db, robust_home, train_set,
                                                                 wait_for):
    at = fresh_app()
    at.session_state["dataset_name"] = train_set
    at.run()
    assert not at.exception
    at.selectbox(key="train_robust128_model").set_value("small3_50")
    at.selectbox(key="train_robust128_augment").set_value("none")
    at.number_input(key="train_robust128_size").set_value(32)
    at.number_input(key="train_robust128_epochs").set_value(3)
    at.number_input(key="train_robust128_batch").set_value(8)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and any("queued" in s.value for s in at.success)
    run_id = at.session_state["train_detail_run"]
    pid = json.loads((robust_home / "worker.pid").read_text())["pid"]  # ensure_worker's launch
    try:
        wait_for(lambda: get(db, run_id).status == "running", 240, "the worker to claim the run")
        os.kill(pid, signal.SIGSTOP)
        del at  # the old app is gone; a new one starts with nothing but the DB

        at = fresh_app().run()
        assert not at.exception
        assert status_shown(at, run_id) == "🏃 running"
        assert get(db, run_id).status == "running"  # the live worker's run was not reaped
        assert any(f"#{run_id}" in m.value and "running" in m.value for m in at.markdown)

        os.kill(pid, signal.SIGCONT)
        wait_for(lambda: get(db, run_id).status not in ("queued", "running"), 240,
                 "the run to end")
        at.run()
        assert not at.exception
        assert get(db, run_id).status == "finished", get(db, run_id).error
        assert status_shown(at, run_id) == "✅ finished"
        assert any(f"#{run_id}" in m.value and "finished" in m.value for m in at.markdown)
    finally:
        stop_worker(pid)
