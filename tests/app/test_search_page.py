"""AppTest: the Search page: a study from the form (a space from the reports) queues its first
trials as runs; the live trials table; Optuna's plots once trials completed; promote the best
trial; stop the study; refused without the scientist role. Trials are played by the real
worker loop with the fake runner of ``search_fakes``."""
from __future__ import annotations

from pathlib import Path

import pytest
import search_fakes
from streamlit.testing.v1 import AppTest

from cxr_core import app
from cxr_core.data.indexing import index_dataset
from cxr_core.jobs import launcher
from cxr_core.search import study
from cxr_core.storage import open_db
from cxr_core.storage import runs as store

PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "search.py")
TRAIN = str(Path(__file__).resolve().parents[2] / "app_pages" / "train.py")


@pytest.fixture()
def db(cxr_home, tiny_dataset, monkeypatch):
    monkeypatch.setattr(launcher, "ensure_worker", lambda database, **kw: 4242)
    database = open_db()
    index_dataset(database, tiny_dataset, name="tiny")
    return database


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60).run()


def create_from_form(at: AppTest, name: str = "heads", trials: int = 3) -> AppTest:
    at.text_input(key="search_name").set_value(name)
    at.number_input(key="search_size").set_value(32)
    at.number_input(key="search_epochs").set_value(2)
    at.number_input(key="search_max").set_value(0)
    at.number_input(key="search_trials").set_value(trials)
    at.number_input(key="search_parallel").set_value(2)
    next(b for b in at.button if b.label == "Create study").click().run()
    assert not at.exception, at.exception
    return at


def test_a_study_from_the_form_queues_its_first_trials(db):
    at = create_from_form(page())
    assert any("trials as runs 1, 2 queued" in s.value for s in at.success)
    st = study.status(db, "heads")
    assert st["asked"] == 2 and st["state"] == "running"
    assert set(st["trials"][0]["params"]) == {"head.layers", "head.units", "head.activation",
                                              "optimizer", "learning_rate"}  # seed 004's
    table = at.dataframe[0].value
    assert list(table["trial"]) == [0, 1] and set(table["state"]) == {"running"}
    assert table["run"].tolist() == ["./train?run=1", "./train?run=2"]


def test_trials_plots_promote_and_stop(db, monkeypatch):
    at = create_from_form(page(), trials=4)
    monkeypatch.setattr(search_fakes.runner, "process_run", search_fakes.fake_process_run)
    app.run_worker(once=True, db=db, poll_s=0.01)
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["state"]) <= {"complete", "pruned"}
    assert len(at.get("plotly_chart")) >= 4  # history, parallel, importances, slice (+ epochs)
    at.button(key="search_promote").click().run()
    assert not at.exception, at.exception
    promoted = study.get_study(db, "heads").promoted_run_id
    with db.session() as s:
        run = store.get_run(session=s, run_id=promoted)
    assert run.status == "queued" and run.study_id is None and "best (trial" in run.name
    assert any(f"Run {promoted} queued" in s.value for s in at.success)


def test_stop_cancels_the_active_trials(db):
    at = create_from_form(page())
    at.button(key="search_stop").click().run()
    assert not at.exception, at.exception
    st = study.status(db, "heads")
    assert st["state"] == "stopped" and {t["state"] for t in st["trials"]} == {"fail"}


def test_an_external_objective_warns_that_it_is_no_longer_external(db, tiny_dataset, tmp_path):
    import shutil

    shutil.copytree(tiny_dataset, tmp_path / "site")
    index_dataset(db, tmp_path / "site", name="site", external=True)
    at = page()
    at.selectbox(key="search_dataset").set_value("tiny").run()
    at.selectbox(key="search_objective").set_value("site")
    create_from_form(at)
    assert any("no longer external" in w.value for w in at.warning)
    run = study.status(db, "heads")["trials"][0]
    with db.session() as s:
        assert store.get_run(session=s, run_id=run["run_id"]).config["external"] == ["site"]


def test_a_bad_space_is_refused_naming_the_field(db):
    at = page()
    preset = at.selectbox(key="search_preset").value
    at.text_area(key=f"search_space_{preset}").set_value(
        '{"learning_rate": {"type": "float", "low": 1, "high": 0.1}}')
    at = create_from_form(at)
    # shown escaped (md): "space\\.learning\\_rate\\: low must be at most high ..."
    assert any("learning\\_rate" in e.value and "low must be at most high" in e.value
               for e in at.error)
    assert study.list_studies(db) == []


def test_a_trial_shows_on_train_with_its_number_and_opens_from_its_link(db):
    create_from_form(page())
    at = AppTest.from_file(TRAIN, default_timeout=60)
    at.query_params["run"] = "2"
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert table.set_index("id").loc[2, "trial"] == 1 and "trial 1" in table.set_index("id").loc[2, "run"]
    assert at.selectbox(key="train_detail_run").value == 2


def test_viewers_are_refused(db, monkeypatch):
    from cxr_core.auth import policy

    viewer = policy.Principal(identity="v@h.org", roles=frozenset({"viewer"}))
    monkeypatch.setattr("app_pages._access.principal", lambda: viewer)
    at = page()
    assert not at.exception
    assert any("scientist role" in i.value for i in at.info)


def test_a_restarted_app_shows_the_study_and_its_trials(db):
    import streamlit as st

    create_from_form(page())
    st.cache_resource.clear()  # a new app process: a new cached engine, a new session
    st.cache_data.clear()
    at = page()
    assert not at.exception, at.exception
    assert at.selectbox(key="search_study").value == study.get_study(db, "heads").id
    assert list(at.dataframe[0].value["trial"]) == [0, 1]
