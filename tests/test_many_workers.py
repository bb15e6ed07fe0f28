"""Many worker processes on one database claim disjoint runs (PostgreSQL: SKIP LOCKED), and
heartbeats are stamped with the database's clock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core.storage import open_db
from cxr_core.storage import runs as store

REPO = Path(__file__).resolve().parents[1]
RUNS = 40

# One worker's claim loop: the storage calls worker.run_worker makes, without training.
CLAIMER = r"""
import json, os, random, socket, sys, time
from pathlib import Path
from cxr_core.storage import open_db
from cxr_core.storage import runs as store
db = open_db(url=sys.argv[1])
wid = db.write(lambda s: store.register_worker(session=s, pid=os.getpid(),
                                               host=socket.gethostname()))
go = Path(sys.argv[2])
while not go.exists():  # every process starts claiming at the same moment
    time.sleep(0.01)
got = []
while True:
    rid = db.write(lambda s: store.claim_next_run(session=s, worker_id=wid))
    if rid is None:
        break
    got.append(rid)
    time.sleep(random.uniform(0, 0.02))  # "training"
    db.write(lambda s: store.heartbeat(session=s, worker_id=wid, run_id=rid))
    db.write(lambda s: store.finish_run(session=s, run_id=rid, status="finished"))
print(json.dumps({"worker": wid, "runs": got}))
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, cxr_home) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{cxr_home / 'cxr.db'}"
    return request.getfixturevalue("pg_url")


@pytest.mark.parametrize("n_workers", [2, 4])
def test_workers_claim_disjoint_runs(url, n_workers, tmp_path):
    db = open_db(url=url)
    queued = [db.write(lambda s, i=i: store.create_run(session=s, name=f"r{i}", config={}))
              for i in range(RUNS)]
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n_workers)]
    time.sleep(1.0)  # let them import and register
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    claimed = [rid for o in outs for rid in o["runs"]]
    assert sorted(claimed) == sorted(queued)  # every run once: none twice, none left
    with db.session() as s:
        runs = {r.id: r for r in store.list_runs(session=s, limit=1000)}
    assert all(runs[rid].status == "finished" for rid in queued)
    for o in outs:
        assert all(runs[rid].worker_id == o["worker"] for rid in o["runs"])
    db.engine.dispose()


def test_heartbeats_use_the_database_clock(pg_url, monkeypatch):  # noqa: F811
    """A worker whose host clock is an hour fast still stamps 'now' as the database sees it,
    so the app on another host does not judge its runs dead (or a dead one alive)."""
    db = open_db(url=pg_url)
    with db.session() as s:
        db_clock = store.db_now(s)
    skewed = db_clock + timedelta(hours=1)
    monkeypatch.setattr(store, "utcnow", lambda: skewed)  # this host's clock
    wid = db.write(lambda s: store.register_worker(session=s, pid=1, host="skewed-host"))
    rid = db.write(lambda s: store.create_run(session=s, name="r", config={}))
    assert db.write(lambda s: store.claim_next_run(session=s, worker_id=wid)) == rid
    db.write(lambda s: store.heartbeat(session=s, worker_id=wid, run_id=rid))
    with db.session() as s:
        live = store.live_workers(session=s, fresh_after_s=30)
        run = store.get_run(session=s, run_id=rid)
    assert [w.id for w in live] == [wid]
    for stamp in (live[0].heartbeat_at, run.heartbeat_at):
        assert abs(stamp - db_clock) < timedelta(seconds=30)
    reaped = db.write(lambda s: store.reap_dead_runs(session=s, stale_after_s=30,
                                                     is_alive=lambda pid, host: None))
    assert reaped == []  # fresh by the database's clock
    db.engine.dispose()
