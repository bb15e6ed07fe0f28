"""Hyperparameter studies (cxr_core.search): the space refused naming its field, trials as
queued runs asked and told under the study's lock, pruning through the epoch hook, cancel and
a dead worker's trial never left running, a restart and a backup keep the study; SQLite and
PostgreSQL. The runner is the fake of ``search_fakes`` (no TensorFlow) except in the slow
end-to-end test, which trains real tiny trials."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import search_fakes
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core import app
from cxr_core.auth.policy import local_principal
from cxr_core.core.errors import ConfigError
from cxr_core.data.indexing import index_dataset
from cxr_core.search import actions, study
from cxr_core.search.config import SPACE_PRESETS, StudyConfig, apply_params
from cxr_core.storage import open_db
from cxr_core.storage import runs as store

REPO = Path(__file__).resolve().parents[1]
BASE = {"recipe": "cpu128", "dataset": "tiny", "image_size": 32, "epochs": 2,
        "augment": "none", "batch_size": 8}
SPACE = {"learning_rate": {"type": "log", "low": 1e-4, "high": 1e-2},
         "optimizer": {"type": "categorical", "choices": ["adam", "adagrad", "adadelta"]},
         "head.layers": {"type": "int", "low": 1, "high": 3},
         "head.units": {"type": "categorical", "choices": [32, 64]},
         "head.activation": {"type": "categorical", "choices": ["relu", "selu", "tanh"]}}


def config(**kw) -> dict:
    return {"name": "s1", "base": BASE, "space": SPACE, "n_trials": 3, "parallel": 2, **kw}


@pytest.mark.parametrize("space, field, message", [
    ({"nope": {"type": "float", "low": 0, "high": 1}}, "space.nope", "unknown field"),
    ({"head.width": {"type": "int", "low": 1, "high": 2}}, "space.head.width", "unknown field"),
    ({"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}, "space.learning_rate",
     "low must be at most high"),
    ({"optimizer": {"type": "categorical", "choices": []}}, "space.optimizer",
     "non-empty choices"),
    ({"optimizer": {"type": "categorical", "choices": ["adam", "adamw"]}}, "space.optimizer",
     "'adamw' is not a valid run config"),
    ({"head.units": {"type": "int", "low": 0, "high": 8}}, "space.head.units",
     "head.units must be integers"),
    ({"learning_rate": {"type": "log", "low": 0, "high": 1}}, "space.learning_rate",
     "log scale needs low > 0"),
    ({"dataset": {"type": "categorical", "choices": ["a"]}}, "space.dataset", "unknown field"),
    ({"epochs": {"type": "gaussian", "low": 1, "high": 2}}, "space.epochs", "type must be"),
])
def test_a_bad_space_is_refused_naming_the_field(space, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        StudyConfig.from_dict(config(space=space))
    assert field in str(err.value)


@pytest.mark.parametrize("changes, message", [
    ({"parallel": 4}, "parallel must be at most n_trials"),
    ({"space": {}}, "at least one value"),
    ({"pruner": "asha"}, "pruner must be one of"),
    ({"name": "../x"}, "name must be"),
    ({"objective": {"metric": "auc", "where": "x"}}, "objective must be"),
    ({"bogus": 1}, "unknown study config keys"),
    ({"base": {**BASE, "label_scheme": "three_class", "calibration_fraction": 0.0,
               "monitor": "val_loss"}}, "needs binary labels"),
])
def test_a_bad_study_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_dict(config(**changes))


def test_params_go_into_the_run_config_and_the_head():
    cfg = StudyConfig.from_dict(config())
    run = cfg.trial_config({"learning_rate": 0.003, "optimizer": "adadelta",
                            "head.layers": 3, "head.units": 32, "head.activation": "selu"})
    assert run.learning_rate == 0.003 and run.optimizer == "adadelta"
    assert run.head.widths == (32, 32, 32) and run.head.initializer == "lecun_normal"
    assert apply_params({"dropout": 0.3}, {"head.dropout": 0.1})["dropout"] is None
    for preset in SPACE_PRESETS.values():  # the page's presets are valid spaces
        StudyConfig.from_dict(config(space=preset))


@pytest.fixture()
def db(cxr_home, tiny_dataset):
    database = open_db()
    index_dataset(database, tiny_dataset, name="tiny")
    return database


def create(db, **kw):
    return actions.create_study(db, local_principal("sci"),
                                actions.resolve_config(db, config(**kw)), start_worker=False)


def work_the_queue(db, monkeypatch) -> dict:
    """The real worker loop (claim, trial runner, study tick) with the fake runner."""
    monkeypatch.setattr(search_fakes.runner, "process_run", search_fakes.fake_process_run)
    return app.run_worker(once=True, db=db, poll_s=0.01)


def test_trials_are_queued_runs_asked_as_trials_end(db, monkeypatch):
    created = create(db)
    assert len(created.run_ids) == 2  # `parallel` at once, not every trial
    with db.session() as s:
        runs = [store.get_run(session=s, run_id=i) for i in created.run_ids]
    assert {r.trial_number for r in runs} == {0, 1}
    assert all(r.study_id == created.study_id and r.status == "queued" for r in runs)
    assert runs[0].config["head"]["layers"] in (1, 2, 3)  # the trial's values, in its config
    out = work_the_queue(db, monkeypatch)
    assert len(out["runs"]) == 3  # the third was asked for when a trial ended
    st = study.status(db, "s1")
    assert st["state"] == "finished" and st["asked"] == 3
    assert {t["state"] for t in st["trials"]} <= {"complete", "pruned"}
    assert sorted(t["run_id"] for t in st["trials"]) == sorted(r["run_id"] for r in out["runs"])
    complete = [t for t in st["trials"] if t["state"] == "complete"]
    best = study.best(db, "s1")
    assert best["value"] == max(t["value"] for t in complete) == st["best_value"]
    assert best["run_id"] == st["best_run_id"] and best["config"]["dataset"] == "tiny"
    assert all(t["intermediate"] for t in st["trials"])  # the epoch hook reported to Optuna


def test_the_pruner_stops_a_bad_trial_through_the_epoch_hook(db, monkeypatch):
    create(db, n_trials=4, parallel=1, startup_trials=1, warmup_epochs=0)
    aucs = iter([0.9, 0.1, 0.9, 0.1])

    def runner(database, run_id, *, progress=None, epoch_hook=None):
        value = next(aucs)
        why = epoch_hook(1, {"val_auc": value})
        status = "cancelled" if why else "finished"
        database.write(lambda s: store.finish_run(
            session=s, run_id=run_id, status=status, error=why,
            summary=None if why else {"val": {"auc": value}}, only_if="running"))
        return search_fakes.runner.RunOutcome(run_id, status, 1)

    monkeypatch.setattr(search_fakes.runner, "process_run", runner)
    app.run_worker(once=True, db=db, poll_s=0.01)
    states = [t["state"] for t in study.status(db, "s1")["trials"]]
    assert states == ["complete", "pruned", "complete", "pruned"]


def test_a_cancelled_trial_is_pruned_or_failed_never_left_running(db, monkeypatch):
    created = create(db, n_trials=2, parallel=2)
    first, second = created.run_ids
    wid = db.write(lambda s: store.register_worker(session=s, pid=os.getpid(),
                                                   host=socket.gethostname()))
    assert db.write(lambda s: store.claim_next_run(session=s, worker_id=wid)) == first
    out = actions.stop_study(db, local_principal("sci"), "s1")
    assert out["cancelled_runs"] == [first, second]
    # the running one stops within a batch: here after reporting one epoch
    monkeypatch.setattr(search_fakes.runner, "process_run", search_fakes.fake_process_run)
    from cxr_core.search import trials

    assert trials.process_run(db, first).status == "cancelled"
    st = study.status(db, "s1")
    assert st["state"] == "stopped"
    assert [t["state"] for t in st["trials"]] == ["pruned", "fail"]  # reported, or not yet


def test_a_dead_workers_trial_is_failed_and_the_study_goes_on(db, monkeypatch):
    created = create(db, n_trials=3, parallel=1)
    [rid] = created.run_ids
    dead = db.write(lambda s: store.register_worker(session=s, pid=2**22 + 4321,
                                                    host=socket.gethostname()))
    assert db.write(lambda s: store.claim_next_run(session=s, worker_id=dead)) == rid
    # a worker (any) reaps the dead one's run, tells Optuna it failed, queues the next trial
    out = work_the_queue(db, monkeypatch)
    with db.session() as s:
        assert store.get_run(session=s, run_id=rid).status == "failed"
    st = study.status(db, "s1")
    assert st["trials"][0]["state"] == "fail"
    assert st["state"] == "finished" and st["asked"] == 3 and len(out["runs"]) == 2


def test_a_restart_keeps_the_study_and_a_backup_holds_its_store(db, monkeypatch, tmp_path,
                                                                cxr_home):
    from cxr_core.storage import backup

    create(db, n_trials=3, parallel=1)
    db.engine.dispose()
    again = open_db()  # a new process's handle: the study and its queued trial are there
    assert study.status(again, "s1")["asked"] == 1
    work_the_queue(again, monkeypatch)
    before = study.status(again, "s1")
    manifest = backup.backup(tmp_path / "bk")
    assert manifest["optuna"] == "optuna.db" and (tmp_path / "bk" / "optuna.db").is_file()
    (cxr_home / "optuna.db").unlink()
    backup.restore(tmp_path / "bk", force=True)
    assert study.status(open_db(), "s1")["trials"] == before["trials"]


def test_the_optuna_store_is_never_the_apps_database(cxr_home, monkeypatch):
    from cxr_core.storage import optuna_store

    assert optuna_store.store_url().endswith("/optuna.db")
    monkeypatch.setenv("CXR_OPTUNA_URL", f"sqlite:///{cxr_home / 'cxr.db'}")
    with pytest.raises(ConfigError, match="must not be the app's own database"):
        optuna_store.store_url()
    monkeypatch.delenv("CXR_OPTUNA_URL")
    monkeypatch.setenv("CXR_DB_URL", "postgresql+psycopg2://u:secret@db.example/cxr")
    url = optuna_store.store_url()
    assert "search_path" in url and optuna_store.in_app_dump()
    assert "secret" not in optuna_store.redacted(url)


def test_the_cli_creates_reports_and_refuses_naming_the_field(db, tmp_path, capsys,
                                                              monkeypatch):
    from cxr_core.cli import main

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(config(n_trials=2, parallel=1)))
    bad.write_text(json.dumps(config(space={"learning_rate": {"type": "float", "low": 1,
                                                              "high": 0.1}})))
    assert main(["search", "create", "--config", str(bad), "--json"]) == 2
    assert "space.learning_rate" in capsys.readouterr().err
    assert main(["search", "create", "--config", str(good), "--no-worker", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["study"] == "s1" and len(created["queued_runs"]) == 1
    work_the_queue(db, monkeypatch)
    assert main(["search", "status", "s1", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and len(status["trials"]) == 2
    assert all({"state", "params", "value"} <= set(t) for t in status["trials"])
    assert main(["search", "best", "s1", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["value"] == status["best_value"] and set(best["params"]) == set(SPACE)


def test_promote_the_best_trial_queues_a_full_recipe_run(db, monkeypatch):
    create(db, n_trials=2, parallel=2, base={**BASE, "max_images": 12,
                                              "calibration_fraction": 0.0})
    work_the_queue(db, monkeypatch)
    best = study.best(db, "s1")
    out = actions.promote_best(db, local_principal("sci"), "s1", start_worker=False)
    cfg = out["config"]
    assert cfg["max_images"] is None and cfg["calibration_fraction"] == 0.3  # the recipe's
    assert cfg["head"] == best["config"]["head"] and cfg["optimizer"] == best["params"]["optimizer"]
    with db.session() as s:
        run = store.get_run(session=s, run_id=out["run_id"])
    assert run.study_id is None and run.status == "queued"  # an ordinary run: no pruning
    assert study.get_study(db, "s1").promoted_run_id == out["run_id"]


@pytest.fixture()
def pg_home(pg_url, cxr_home, monkeypatch, tmp_path):  # noqa: F811
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.begin() as c:
        c.execute(text("DROP SCHEMA IF EXISTS optuna CASCADE"))
    engine.dispose()
    monkeypatch.setenv("CXR_DB_URL", pg_url)
    monkeypatch.setenv("CXR_PATIENT_SALT", "search-tests")  # a shared database needs one ...
    monkeypatch.setenv("CXR_DATA_ROOTS", str(tmp_path))  # ... and data roots
    return pg_url


def test_a_study_on_postgresql_keeps_optuna_in_its_own_schema(pg_home, tiny_dataset,
                                                              monkeypatch):
    from sqlalchemy import create_engine, text

    database = open_db()
    index_dataset(database, tiny_dataset, name="tiny")
    create(database, n_trials=3, parallel=2)
    work_the_queue(database, monkeypatch)
    assert study.status(database, "s1")["state"] == "finished"
    engine = create_engine(pg_home)
    with engine.connect() as c:
        tables = set(c.execute(text("SELECT table_schema || '.' || table_name FROM "
                                    "information_schema.tables")).scalars())
    engine.dispose()
    assert {"public.alembic_version", "optuna.alembic_version", "optuna.trials",
            "public.studies"} <= tables and "public.trials" not in tables
    database.engine.dispose()


WORKER = r"""
import json, sys
import search_fakes
search_fakes.install()
from cxr_core import app
from cxr_core.storage import open_db
out = app.run_worker(idle_exit_s=1.5, db=open_db(), poll_s=0.05)
print(json.dumps([r["run_id"] for r in out["runs"]]))
"""


@pytest.mark.parametrize("n_workers", [2, 4])
def test_workers_on_postgresql_never_run_the_same_trial(pg_home, tiny_dataset, n_workers):
    import subprocess
    import sys

    database = open_db()
    index_dataset(database, tiny_dataset, name="tiny")
    create(database, n_trials=10, parallel=n_workers)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(n_workers)]
    claimed = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        claimed.append(json.loads(out.strip().splitlines()[-1]))
    runs = [r for c in claimed for r in c]
    assert len(runs) == len(set(runs)) == 10  # every trial's run once: none twice, none left
    st = study.status(database, "s1")
    assert st["state"] == "finished" and st["asked"] == 10
    assert sorted(t["number"] for t in st["trials"]) == list(range(10))
    assert sorted(t["run_id"] for t in st["trials"]) == sorted(runs)
    assert all(t["state"] in ("complete", "pruned") for t in st["trials"])
    database.engine.dispose()


@pytest.mark.slow
def test_a_real_tiny_study_trains_prunes_and_records_the_head(cxr_home):
    """Real trials (32 px, 2 epochs, 60 demo films) on the real worker: complete trials carry
    their head in the model card; a pruned one ends cancelled with the pruner's reason."""
    database = open_db()
    index_dataset(database, REPO / "demo" / "chest_xray_mini", name="demo")
    created = actions.create_study(database, local_principal("sci"), actions.resolve_config(
        database, config(base={**BASE, "dataset": "demo", "max_images": 60}, n_trials=2,
                         parallel=1)), start_worker=False)
    app.run_worker(once=True, db=database, poll_s=0.01)
    st = study.status(database, created.study_id)
    assert st["state"] == "finished" and len(st["trials"]) == 2
    for t in st["trials"]:
        assert t["state"] in ("complete", "pruned", "fail")
        with database.session() as s:  # trials are ordinary runs, with their artifacts
            rec = store.get_run(session=s, run_id=t["run_id"])
        if t["state"] == "complete":
            card = json.loads((Path(rec.artifact_dir) / "model_card.json").read_text())
            assert card["head"]["config"]["layers"] == t["params"]["head.layers"]
            assert card["head"]["optimizer"] == t["params"]["optimizer"]
            assert t["value"] == pytest.approx(rec.summary["val"]["auc"])


def test_an_external_objective_is_read_there_and_marked_on_the_card(db, tiny_dataset, tmp_path,
                                                                   monkeypatch):
    import shutil

    from cxr_core.models.card import card_markdown

    shutil.copytree(tiny_dataset, tmp_path / "site")
    index_dataset(db, tmp_path / "site", name="site", external=True)
    with pytest.raises(ConfigError, match="not flagged as external"):
        create(db, objective={"metric": "auc", "dataset": "tiny"})
    created = create(db, n_trials=1, parallel=1, objective={"metric": "auc", "dataset": "site"})
    assert "no longer external" in created.warnings[0]

    def runner(database, run_id, *, progress=None, epoch_hook=None):
        card = tmp_path / f"run{run_id}"
        card.mkdir()
        (card / "model_card.json").write_text(json.dumps({"name": "t", "measured": []}))
        database.write(lambda s: store.set_run_artifacts(session=s, run_id=run_id,
                                                         artifact_dir=str(card)))
        database.write(lambda s: store.finish_run(
            session=s, run_id=run_id, status="finished", only_if="running",
            summary={"val": {"auc": 0.99}, "external": [{"dataset": "site", "auc": 0.81}]}))
        return search_fakes.runner.RunOutcome(run_id, "finished", 1)

    monkeypatch.setattr(search_fakes.runner, "process_run", runner)
    app.run_worker(once=True, db=db, poll_s=0.01)
    st = study.status(db, "s1")
    assert st["trials"][0]["value"] == pytest.approx(0.81)  # not the validation AUC
    [rid] = created.run_ids
    with db.session() as s:
        assert store.get_run(session=s, run_id=rid).config["external"] == ["site"]
    card = json.loads((tmp_path / f"run{rid}" / "model_card.json").read_text())
    assert card["recipe_selected_on"] == ["site"] and card["selected_by_study"] == "s1"
    entry = {"role": "external", "dataset": "site", "auc": 0.81, "n": 10}
    assert "no longer a fully independent test" in card_markdown({**card, "measured": [entry]})


@pytest.mark.parametrize("sampler, pruner", [("tpe", "hyperband"), ("random", "none")])
def test_each_sampler_and_pruner_runs_a_study_to_its_end(db, monkeypatch, sampler, pruner):
    create(db, n_trials=4, parallel=2, sampler=sampler, pruner=pruner)
    out = work_the_queue(db, monkeypatch)
    st = study.status(db, "s1")
    assert st["state"] == "finished" and len(out["runs"]) == 4 and st["pruner"] == pruner
    assert len({json.dumps(t["params"], sort_keys=True) for t in st["trials"]}) == 4


def test_the_runners_epoch_sink_stops_the_run_on_the_hooks_reason(db):
    """Training never imports Optuna: the pruner's answer reaches the run through the runner's
    per-epoch sink, which then answers the batch-level cancel check."""
    from cxr_core.training import runner

    wid = db.write(lambda s: store.register_worker(session=s, pid=os.getpid(),
                                                   host=socket.gethostname()))
    rid = db.write(lambda s: store.create_run(session=s, name="r", config={}, worker_id=wid))
    seen = []

    def hook(epoch, logs):
        seen.append((epoch, logs["val_auc"]))
        return "pruned after epoch 2" if epoch == 2 else None

    stop: list[str] = []
    sinks = runner.db_sinks(db, rid, epochs=3, epoch_hook=hook, stop=stop)
    sinks.on_epoch_end(1, {"val_auc": 0.7})
    assert not sinks.should_cancel()
    sinks.on_epoch_end(2, {"val_auc": 0.6})
    assert sinks.should_cancel() and stop == ["pruned after epoch 2"]
    assert seen == [(1, 0.7), (2, 0.6)]
    with db.session() as s:  # the epoch rows were written before the hook was asked
        assert [r.step for r in store.get_metrics(session=s, run_ids=[rid],
                                                  keys=["val_auc"])] == [1, 2]
    assert runner._cancelled(db, rid, 2, stop[0]).error == "pruned after epoch 2"


def test_the_measured_study_in_docs_is_valid_and_reported():
    """docs/experiments/search/: the study docs/experiments.md reports, and its baseline."""
    from cxr_core.training.config import TrainConfig

    root = REPO / "docs" / "experiments" / "search"
    cfg = StudyConfig.from_dict(json.loads((root / "seed004_head.json").read_text()))
    assert set(cfg.to_dict()["space"]) == set(SPACE_PRESETS[next(iter(SPACE_PRESETS))])
    base = TrainConfig.from_dict(json.loads((root / "seed004_head_default.json").read_text()))
    assert base.to_dict() == {**cfg.base_config().to_dict(), "name": base.name}
    report = (REPO / "docs" / "experiments.md").read_text()
    assert "search/seed004_head.json" in report and "search/seed004_head_default.json" in report
