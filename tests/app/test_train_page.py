"""AppTest: the Train page: form → queued run, live curves from the DB, cancel/resume, reaping."""
from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cxr_core.jobs import launcher
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage import runs as store

PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "train.py")
CONFIG = {"recipe": "cpu128", "dataset": "tiny", "model": "small3_50", "epochs": 3}



@pytest.fixture()
def db(cxr_home, tiny_dataset):
    database = open_db()
    index_dataset(database, tiny_dataset, name="tiny")
    return database


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60).run()


def running_run(db, pid: int | None = None) -> int:
    wid = db.write(lambda s: store.register_worker(session=s, pid=pid or os.getpid(),
                                                   host=socket.gethostname()))
    return db.write(lambda s: store.create_run(session=s, name="live", config=CONFIG,
                                               worker_id=wid))


def add_epoch(db, run_id: int, epoch: int) -> None:
    values = {"loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "accuracy": 0.5 + epoch / 10,
              "val_accuracy": 0.5, "lr": 1e-3}
    db.write(lambda s: store.add_metrics(session=s, run_id=run_id, kind="epoch", step=epoch,
                                         values=values))


def chart_steps(at: AppTest) -> set[int]:
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    steps: set[int] = set()
    for trace in spec["data"]:
        x = trace["x"]
        if isinstance(x, dict):  # plotly 6+: typed arrays as {"dtype", "bdata"}
            x = np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"])
        steps |= {int(v) for v in x}
    return steps


def caption_rows(at: AppTest) -> int:
    text = next(c.value for c in at.caption if "metric rows" in c.value)
    return int(text.split()[0])


def test_page_without_runs(db):
    at = page()
    assert not at.exception
    assert any("No run yet" in i.value for i in at.info)
    assert at.selectbox(key="train_recipe").value == "robust128"  # chosen on the external sample


def test_a_pneumoniamnist_dataset_proposes_the_mnist28_recipe(cxr_home, tmp_path):
    npz = tmp_path / "pneumoniamnist.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, train_images=rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1]] * 4))
    index_dataset(open_db(), npz, name="mnist")
    at = page()
    assert not at.exception
    assert at.selectbox(key="train_recipe").value == "mnist28"
    assert at.number_input(key="train_mnist28_size").value == 28


def test_live_curves_pick_up_new_metric_rows(db):
    rid = running_run(db)
    add_epoch(db, rid, 1)
    at = page()
    assert not at.exception and caption_rows(at) == 4 and chart_steps(at) == {1}
    add_epoch(db, rid, 2)  # the worker writes another epoch; the fragment redraws from the DB
    at.run()
    assert not at.exception and caption_rows(at) == 8 and chart_steps(at) == {1, 2}


def test_a_first_epoch_in_progress_shows_running_metrics_and_an_eta(db):
    rid = running_run(db)
    for step in range(1, 4):  # 3 of 10 batches of epoch 1 reported, no epoch row yet
        db.write(lambda s, step=step: store.add_metrics(
            session=s, run_id=rid, kind="batch", step=step,
            values={"loss": 1.0 / step, "accuracy": 0.5, "epoch_progress": step / 10,
                    "eta_s": 1620.0}))
    at = page()
    assert not at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any("during epoch" in t["name"] for t in spec["data"])
    assert caption_rows(at) == 6  # loss and accuracy at 3 positions
    assert any("epoch 0.30 of 3" in c.value and "about 27 min left" in c.value
               for c in at.caption)


def test_start_queues_a_run_and_ensures_a_worker(db, monkeypatch):
    started = []
    monkeypatch.setattr(launcher, "ensure_worker", lambda database, **kw: started.append(1) or 4242)
    at = page()
    at.number_input(key="train_robust128_epochs").set_value(2)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and started == [1]
    assert any("worker process 4242" in s.value for s in at.success)
    with db.session() as s:
        [run] = store.list_runs(session=s)
    assert run.status == "queued" and run.config["dataset"] == "tiny"
    assert run.config["epochs"] == 2 and run.config["recipe"] == "robust128"
    assert run.config["intensity"] == "none" and run.config["label_smoothing"] == 0.1


def test_the_form_sets_the_levers_under_shift(db, monkeypatch):
    monkeypatch.setattr(launcher, "ensure_worker", lambda database, **kw: 1)
    at = page()
    at.selectbox(key="train_robust128_intensity").set_value("standardize")
    at.number_input(key="train_robust128_smooth").set_value(0.1)
    at.selectbox(key="train_robust128_augment").set_value("shift_robust")
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception
    with db.session() as s:
        [run] = store.list_runs(session=s)
    assert run.config["intensity"] == "standardize"
    assert run.config["label_smoothing"] == pytest.approx(0.1)
    assert run.config["augment"] == "shift_robust"


def test_the_form_starts_a_next_round_with_a_sites_confirmed_films(db, tiny_dataset, tmp_path,
                                                                   monkeypatch):
    """Another site: evaluated at the end (external), and its confirmed films added."""
    import shutil

    monkeypatch.setattr(launcher, "ensure_worker", lambda database, **kw: 1)
    shutil.copytree(tiny_dataset, tmp_path / "site")
    index_dataset(db, tmp_path / "site", name="site", external=True)
    at = page()
    at.selectbox(key="train_dataset").set_value("tiny").run()  # sorted: "site" comes first
    at.multiselect(key="train_robust128_external").set_value(["site"])
    at.multiselect(key="train_robust128_extra").set_value(["site"])
    at.number_input(key="train_robust128_extra_repeat").set_value(4)
    at.number_input(key="train_robust128_ema").set_value(0.99)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception, at.exception
    with db.session() as s:
        [run] = store.list_runs(session=s)
    assert run.config["external"] == ["site"] and run.config["ema"] == pytest.approx(0.99)
    assert run.config["extra"] == [{"dataset": "site", "images": "reviewed", "repeat": 4}]


def test_cancel_and_resume_buttons(db, monkeypatch):
    monkeypatch.setattr(launcher, "ensure_worker", lambda database, **kw: 4242)
    rid = db.write(lambda s: store.create_run(session=s, name="q", config=CONFIG))
    at = page()
    at.button(key=f"train_cancel_{rid}").click().run()
    assert not at.exception
    with db.session() as s:
        assert store.get_run(session=s, run_id=rid).status == "cancelled"
    at.run()
    at.button(key=f"train_resume_{rid}").click().run()
    with db.session() as s:
        run = store.get_run(session=s, run_id=rid)
    assert run.status == "queued" and run.resume_requested


def test_dead_workers_run_is_marked_failed_on_load(db):
    rid = running_run(db, pid=2**22 + 4321)  # no such process
    at = page()
    assert not at.exception
    with db.session() as s:
        assert store.get_run(session=s, run_id=rid).status == "failed"
    assert any("no longer running" in e.value for e in at.error)


def test_runs_are_listed_a_page_at_a_time(db):
    from app_pages.train import RUNS_PAGE  # noqa: F401  (the page's size, read from the module)

    for n in range(60):
        db.write(lambda s: store.create_run(session=s, name=f"r{n}", config=CONFIG))
    at = page()
    assert not at.exception, at.exception
    assert len(at.dataframe[0].value) == 50 and at.dataframe[0].value["id"].max() == 60
    at.number_input(key="train_runs_page").set_value(2).run()
    assert not at.exception, at.exception
    assert at.dataframe[0].value["id"].tolist() == list(range(10, 0, -1))  # the oldest ten


def test_the_form_sets_a_configurable_head_and_the_reports_optimisers(db, monkeypatch):
    monkeypatch.setattr(launcher, "ensure_worker", lambda database, **kw: 1)
    at = page()
    at.toggle(key="train_robust128_head_on").set_value(True)
    at.number_input(key="train_robust128_head_layers").set_value(2)
    at.text_input(key="train_robust128_head_units").set_value("256, 128")
    at.selectbox(key="train_robust128_head_act").set_value("selu")
    at.number_input(key="train_robust128_head_dropout").set_value(0.1)
    at.selectbox(key="train_robust128_opt").set_value("adadelta")
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception, at.exception
    with db.session() as s:
        [run] = store.list_runs(session=s)
    assert run.config["head"] == {"layers": 2, "units": [256, 128], "activation": "selu",
                                  "batch_norm": False, "dropout": pytest.approx(0.1)}
    assert run.config["optimizer"] == "adadelta"
