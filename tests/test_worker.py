"""The worker and run storage: claims, real runs through the DB, cancel, kill + resume, CLI."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from cxr_core.training import service as svc
from cxr_core.training import inputs
from cxr_core.jobs import launcher
from cxr_core.jobs import loop
from cxr_core.training import runner
from cxr_core.core.errors import RunError
from cxr_core.storage import open_db
from cxr_core.storage import evals as eval_store
from cxr_core.storage import runs as store
from cxr_core import app

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("NORMAL", "PNEUMONIA")
TINY = dict(recipe="cpu128", model="small3_50", image_size=32, epochs=1, batch_size=16,
            augment="none", balancing="class_weights")


@pytest.fixture(scope="module")
def real_slice(shared_data, tmp_path_factory) -> Path:
    """32 NORMAL + 32 PNEUMONIA real 224 px films, linked into a Kaggle-style folder."""
    root = tmp_path_factory.mktemp("slice") / "chest_xray_slice" / "train"
    for cls in CLASSES:
        files = sorted((shared_data / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        (root / cls).mkdir(parents=True)
        for f in files[::max(1, len(files) // 32)][:32]:
            (root / cls / f.name).symlink_to(f)
    return root.parent


def queue(db, dataset: Path, **changes) -> int:
    return svc.queue_run(db, svc.make_config(db, {**TINY, "dataset": str(dataset), **changes}))


def get(db, run_id: int) -> store.RunRecord:
    with db.session() as s:
        return store.get_run(session=s, run_id=run_id)


# -- Storage: claims, cancel, resume, reaping -----------------------------------------------

def test_two_workers_claim_each_queued_run_once(cxr_home):
    db = open_db()
    ids = [db.write(lambda s: store.create_run(session=s, name="", config={})) for _ in range(12)]
    claimed: list[list[int]] = [[], []]
    dbs = [open_db(), open_db()]  # own engines and connections, like two processes

    def claim_all(slot: int) -> None:
        mine = dbs[slot]
        wid = mine.write(lambda s: store.register_worker(session=s, pid=os.getpid(), host="h"))
        while (rid := mine.write(lambda s: store.claim_next_run(session=s, worker_id=wid))):
            claimed[slot].append(rid)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed[0] + claimed[1]) == ids


def test_cancel_and_resume_rules(cxr_home):
    db = open_db()
    rid = db.write(lambda s: store.create_run(session=s, name="q", config={}))
    assert svc.cancel_run(db, rid) == "cancelled"  # a queued run is cancelled at once
    with pytest.raises(RunError, match="only queued or running"):
        svc.cancel_run(db, rid)
    svc.resume_run(db, rid, start_worker=False)
    run = get(db, rid)
    assert run.status == "queued" and run.resume_requested and run.error is None
    with pytest.raises(RunError, match="is queued"):
        svc.resume_run(db, rid, start_worker=False)


def test_reap_marks_stale_or_dead_runs_failed(cxr_home):
    db = open_db()
    alive = db.write(lambda s: store.register_worker(session=s, pid=os.getpid(),
                                                     host=socket.gethostname()))
    gone = db.write(lambda s: store.register_worker(session=s, pid=2**22 + 12345,
                                                    host=socket.gethostname()))
    a = db.write(lambda s: store.create_run(session=s, name="", config={}, worker_id=alive))
    b = db.write(lambda s: store.create_run(session=s, name="", config={}, worker_id=gone))
    assert launcher.reap_dead_runs(db) == [b]  # pid gone: at once
    assert "no longer running" in get(db, b).error and get(db, a).status == "running"
    later = store.utcnow() + timedelta(seconds=31)
    assert db.write(lambda s: store.reap_dead_runs(session=s, stale_after_s=30,
                                                   is_alive=launcher.pid_alive, now=later)) == [a]
    assert "no heartbeat" in get(db, a).error


def test_prepare_data_uses_current_labels_and_records_the_snapshot(cxr_home, real_slice):
    from cxr_core.data.indexing import open_dataset
    from cxr_core.storage.relabels import add_relabel
    from cxr_core.training.config import TrainConfig

    db = open_db()
    info, records = open_dataset(db, str(real_slice))
    normal = next(r for r in records if r.label == "NORMAL")
    rel = db.write(lambda s: add_relabel(session=s, image_id=normal.id, new_label="PNEUMONIA",
                                         new_subtype="virus", reviewer="dr a"))
    cfg = {**TINY, "dataset": info.name}
    current = inputs.prepare_data(db, TrainConfig.from_dict({**cfg, "label_source": "current"}))
    original = inputs.prepare_data(db, TrainConfig.from_dict(cfg))
    assert current.snapshot.newest_relabel_id == rel and original.snapshot.newest_relabel_id is None
    assert current.snapshot.hash != original.snapshot.hash
    assert current.dataset_name == info.name and current.data.classes == CLASSES
    for prep, want in ((current, 1), (original, 0)):  # PNEUMONIA is class 1
        ids = list(prep.data.image_ids)
        assert prep.data.labels[ids.index(normal.id)] == want
    as_of = inputs.prepare_data(db, TrainConfig.from_dict({**cfg, "label_source": "current"}),
                                as_of_relabel_id=0)  # a resumed run reproduces its snapshot
    assert as_of.snapshot.hash == original.snapshot.hash
    subset = inputs.prepare_data(db, TrainConfig.from_dict({**cfg, "max_images": 20}))
    n, n_val = len(subset.data.paths), int(subset.data.is_val.sum())
    assert 16 <= n <= 22 and 0 < n_val < n  # stratified subsample, still split by patient


# -- Real runs through the DB ---------------------------------------------------------------

def test_worker_trains_a_queued_run_end_to_end(cxr_home, real_slice):
    from cxr_core.models.refs import load_model_ref

    db = open_db()
    rid = queue(db, real_slice, name="tiny")
    out = app.run_worker(once=True, db=db)
    assert [r["status"] for r in out["runs"]] == ["finished"], out
    run = get(db, rid)
    assert run.status == "finished" and run.epochs_done == 1 and run.label_snapshot_hash
    assert run.summary["val"]["auc"] is not None
    with db.session() as s:
        epoch = store.get_metrics(session=s, run_ids=[rid], kind="epoch", keys=None)
        batch = store.get_metrics(session=s, run_ids=[rid], kind="batch", keys=None)
        evals = eval_store.list_evaluations(session=s, run_id=rid)
        op = eval_store.latest_operating_point(session=s, run_id=rid)
        stopped = store.live_workers(session=s, fresh_after_s=60)
    assert {m.key for m in epoch} >= {"loss", "val_loss", "auc", "val_auc", "lr"}
    assert batch and batch[0].step == 1
    assert sorted(e.split for e in evals) == ["calibration", "val"]
    val = next(e for e in evals if e.split == "val")
    assert val.n == run.summary["n_val"]
    folder = Path(run.artifact_dir)
    assert (folder / "checkpoints" / "epoch_001.keras").is_file()
    assert (folder / "best.keras").is_file()
    card = json.loads((folder / "model_card.json").read_text())
    assert card["operating_point"]["threshold"] == pytest.approx(op.threshold)
    assert card["label_snapshot"]["hash"] == run.label_snapshot_hash
    assert card["labels"] == list(CLASSES) and card["saliency_layer"] == "block3_relu"
    assert not stopped  # the worker unregistered
    loaded = load_model_ref(f"run:{rid}", db=db)
    assert loaded.threshold == pytest.approx(op.threshold) and loaded.image_size == 32
    # Provenance: the val evaluation says which labels it used and that it is the run's own
    # validation set; evaluating the run on its dataset warns of the training overlap.
    assert val.label_source == "original" and val.label_scheme == "binary" and val.label_hash
    assert val.overlap["recorded"] and val.overlap["val_images"] == val.n
    assert val.overlap["train_images"] == 0 and val.metrics["ci_unit"] == "patient"
    from cxr_core.evaluation import evaluate as es

    out = es.evaluate_dataset(db, f"run:{rid}", str(real_slice), n_boot=0)
    n_train, n_val = run.summary["n_train"], run.summary["n_val"]
    assert (out.overlap["train_images"], out.overlap["val_images"]) == (n_train, n_val)
    assert out.overlap["calib_images"] == run.summary["n_calibration"] > 0
    assert out.warnings and "in its training set" in out.warnings[0]
    assert "its calibration slice" in out.warnings[0]


def test_threshold_is_chosen_on_a_calibration_slice_disjoint_from_selection(cxr_home,
                                                                           real_slice):
    """The slice is kept out of training and model selection (by patient and bytes), the
    threshold is chosen on it alone, and the card measures every split with intervals."""
    from cxr_core.evaluation import evaluate as es
    from cxr_core.storage import datasets as ds_store
    from cxr_core.stats.thresholds import choose_threshold

    db = open_db()
    rid = queue(db, real_slice, name="calibrated")
    assert app.run_worker(once=True, db=db)["runs"][0]["status"] == "finished"
    run = get(db, rid)
    with db.session() as s:
        evals = {e.split: e for e in eval_store.list_evaluations(session=s, run_id=rid)}
        op = eval_store.latest_operating_point(session=s, run_id=rid)
    cal, val = evals["calibration"], evals["val"]
    cal_preds, val_preds = es.load_predictions(db, cal.id), es.load_predictions(db, val.id)
    assert cal.n == run.summary["n_calibration"] == op.sample_n >= 4
    assert set(cal_preds.y_true.tolist()) == {0, 1}  # stratified: both classes
    prepared = inputs.prepare_data(db, svc.make_config(db, {**TINY,
                                                              "dataset": str(real_slice)}))
    train_ids = {i for i, v in zip(prepared.data.image_ids, prepared.data.is_val) if not v}
    sel_ids = set(val_preds.image_ids)
    cal_ids = set(cal_preds.image_ids)
    assert cal_ids == {r.id for r in prepared.calibration}  # deterministic by seed
    assert not cal_ids & (sel_ids | train_ids) and sel_ids.isdisjoint(train_ids)
    with db.session() as s:
        images = {r.id: r for r in ds_store.get_images(session=s, image_ids=sorted(
            cal_ids | sel_ids | train_ids))}
    for a, b in ((cal_ids, sel_ids), (cal_ids, train_ids)):
        assert not {images[i].patient for i in a} & {images[i].patient for i in b}
        assert not {images[i].sha256 for i in a} & {images[i].sha256 for i in b}
    chosen = choose_threshold(cal_preds.y_true, cal_preds.probs[:, 1],
                              target_sensitivity=0.95)
    assert op.threshold == pytest.approx(chosen.threshold) and op.chosen_on == "calibration"
    card = json.loads((Path(run.artifact_dir) / "model_card.json").read_text())
    assert card["operating_point"]["chosen_on"] == "calibration"
    assert card["operating_point"]["calibration_n"] == cal.n
    measured = {m["split"]: m for m in card["measured"]}
    assert set(measured) == {"val", "calibration"}
    for split, role in (("val", "selection"), ("calibration", "calibration")):
        m = measured[split]
        assert m["role"] == role and m["threshold"] == pytest.approx(op.threshold)
        assert m["chosen_on"] == "calibration" and m["ci_unit"] == "patient"
        for key in ("auc", "sensitivity", "specificity"):
            low, high = m[f"{key}_ci"]
            assert low <= m[key] <= high
    assert measured["calibration"]["threshold_chosen_here"]
    assert not measured["val"]["threshold_chosen_here"]
    es.evaluate_dataset(db, f"run:{rid}", str(real_slice), n_boot=50)  # a later evaluation
    card = json.loads((Path(run.artifact_dir) / "model_card.json").read_text())
    later = card["measured"][-1]
    assert len(card["measured"]) == 3 and later["split"] == "(all)" and later["role"] == "seen"
    assert later["n"] == 64 and later["sensitivity_ci"][0] <= later["sensitivity"]


def test_calibration_fraction_zero_chooses_on_validation_and_says_so(cxr_home, real_slice):
    db = open_db()
    rid = queue(db, real_slice, calibration_fraction=0)
    assert app.run_worker(once=True, db=db)["runs"][0]["status"] == "finished"
    run = get(db, rid)
    card = json.loads((Path(run.artifact_dir) / "model_card.json").read_text())
    assert card["operating_point"]["chosen_on"] == "val"
    assert "calibration_fraction is 0" in card["operating_point"]["calibration_skipped"]
    (m,) = card["measured"]
    assert m["split"] == "val" and m["threshold_chosen_here"] and m["chosen_on"] == "val"
    assert run.summary["n_calibration"] == 0


def _flagged_run(db, real_slice) -> tuple[int, int, loop.Heartbeat]:
    wid, beat = loop.register(db)
    rid = db.write(lambda s: store.create_run(
        session=s, name="", worker_id=wid,
        config=svc.make_config(db, {**TINY, "dataset": str(real_slice), "epochs": 3}).to_dict()))
    assert svc.cancel_run(db, rid) == "running"  # flagged: the worker checks every batch
    return rid, wid, beat


def _batch_steps(db, rid: int) -> set[int]:
    with db.session() as s:
        rows = store.get_metrics(session=s, run_ids=[rid], kind="batch", keys=None)
    return {m.step for m in rows}


def test_cancel_flag_stops_a_run_after_one_batch(cxr_home, real_slice, monkeypatch):
    from cxr_core.training import fit

    db = open_db()
    monkeypatch.setattr(fit, "_cache_progress", lambda sinks: None)  # no check while caching
    rid, wid, beat = _flagged_run(db, real_slice)
    outcome = runner.process_run(db, rid)
    loop.unregister(db, wid, beat)
    assert outcome.status == "cancelled" and outcome.epochs == 0
    assert _batch_steps(db, rid) == {1} and get(db, rid).status == "cancelled"


def test_cancel_flag_also_stops_image_caching(cxr_home, real_slice):
    db = open_db()
    rid, wid, beat = _flagged_run(db, real_slice)
    outcome = runner.process_run(db, rid)
    loop.unregister(db, wid, beat)
    assert outcome.status == "cancelled" and not _batch_steps(db, rid)


# The SIGKILL + resume test lives in tests/robustness/test_killed_worker.py (issue 8).


def test_ensure_worker_launches_one_detached_worker(cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_WORKER", "auto")  # the default outside the tests
    db = open_db()
    pid = launcher.ensure_worker(db, idle_exit_s=1)
    try:
        assert launcher.ensure_worker(db) == pid  # still starting up: not launched twice
        assert (cxr_home / "logs" / "worker.log").exists()
        assert os.getsid(pid) == pid  # its own session: survives the app's process group
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_worker_off_means_the_app_launches_none(cxr_home, monkeypatch):
    """CXR_WORKER=off: runs stay queued for workers elsewhere; this process starts nothing."""
    monkeypatch.setenv("CXR_WORKER", "off")
    db = open_db()
    launched = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: launched.append(a))
    assert launcher.ensure_worker(db) is None
    assert not launched and not (cxr_home / "worker.pid").exists()


def test_a_live_worker_on_another_host_serves_the_queue(cxr_home, monkeypatch):
    db = open_db()
    db.write(lambda s: store.register_worker(session=s, pid=4242, host="gpu-host-2"))
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    assert launcher.ensure_worker(db) is None


# -- CLI --------------------------------------------------------------------------------------

def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXR_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "cxr_core", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_cli_train_json(cxr_home, real_slice, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**TINY, "dataset": str(real_slice)}))
    out = _cli("train", "--config", str(config), "--json", home=cxr_home)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "finished" and data["epochs"] == 1 and data["run_id"] == 1
    assert {"auc", "accuracy", "sensitivity", "specificity"} <= set(data["val"])


def test_cli_train_detach_only_queues_and_bad_config_is_one_line(cxr_home, real_slice, tmp_path,
                                                                  capsys):
    from cxr_core.cli import main

    config = tmp_path / "run.json"
    config.write_text(json.dumps({**TINY, "dataset": str(real_slice)}))
    code = main(["train", "--config", str(config), "--detach", "--json"])
    marker = cxr_home / "worker.pid"
    if marker.exists():  # the worker it launched: stop it before it trains
        pid = json.loads(marker.read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # our child: do not leave a zombie
    assert code == 0 and json.loads(capsys.readouterr().out) == {"run_id": 1, "status": "queued"}
    config.write_text(json.dumps({**TINY, "dataset": str(real_slice), "epochs": 0}))
    assert main(["train", "--config", str(config), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.strip() == "error: epochs must be an integer in [1, 10000]. Received: epochs=0"


def test_cli_worker_gpu_limits_the_devices_before_tensorflow_loads(cxr_home, monkeypatch):
    from cxr_core.cli import main

    seen = []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(loop, "run_worker", lambda **kw: seen.append(
        os.environ.get("CUDA_VISIBLE_DEVICES")) or {"runs": 0})
    assert main(["worker", "--once", "--gpu", "2,3"]) == 0
    assert seen == ["2,3"]


def test_a_run_config_external_dataset_is_evaluated_when_the_run_ends(cxr_home, real_slice,
                                                                      shared_data, tmp_path):
    """``external`` in a run config: the worker evaluates the finished run there and the
    card's external entry is the first thing its measured list headlines."""
    from cxr_core.data.indexing import index_dataset
    from cxr_core.models.card import headline

    db = open_db()
    site = tmp_path / "site"
    for cls in CLASSES:  # 12 + 12 films of the new site (the external sample)
        (site / cls).mkdir(parents=True)
        for f in sorted((shared_data / "chest_xray_224_external" / cls).glob("*.jpeg"))[:12]:
            (site / cls / f.name).symlink_to(f)
    index_dataset(db, site, name="site", external=True)
    rid = queue(db, real_slice, name="tiny", external=["site"])
    out = app.run_worker(once=True, db=db)
    (outcome,) = out["runs"]
    assert outcome["status"] == "finished", outcome
    (brief,) = outcome["external"]
    assert brief["dataset"] == "site" and brief["n"] == 24 and brief["auc"] is not None
    assert brief["site_specificity"] is not None  # 12 of each class: a site threshold
    run = get(db, rid)
    assert run.summary["external"] == [brief]
    card = json.loads((Path(run.artifact_dir) / "model_card.json").read_text())
    assert headline(card["measured"])[0]["role"] == "external"
    with db.session() as s:
        logs = store.get_logs(session=s, run_id=rid, limit=50)
    assert any("external site: AUC" in line.message for line in logs)
