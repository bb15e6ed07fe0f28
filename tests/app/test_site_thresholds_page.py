"""AppTest: Compare → Site calibration (a worker computes the candidate, a person records it)
and Predict deciding with that site's operating point for its images, the global one elsewhere."""
from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest
from test_model_store import BINARY_CARD, make_run, save_tiny_model
from test_site_thresholds import site_folder  # noqa: F401  (fixture: 48 real films)

from cxr_core.evaluation import evaluate as es
from cxr_core.jobs import queue
from cxr_core.jobs import launcher
from cxr_core.evaluation import operating_points as ops
from cxr_core.evaluation import site_thresholds
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core import app

PAGES = Path(__file__).resolve().parents[2] / "app_pages"


@pytest.fixture(autouse=True)
def launched(monkeypatch):
    """The tests play the worker; the pages launch none."""
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)


@pytest.fixture()
def evaluated(cxr_home, site_folder, tiny_dataset):  # noqa: F811
    """A run (tiny 16 px model, global threshold 0.6) evaluated on the site's 48 films."""
    db = open_db()
    index_dataset(db, site_folder, name="site_b")
    run_id = make_run(db, "tiny")
    save_tiny_model(cxr_home / "runs" / str(run_id) / "best.keras", card=BINARY_CARD)
    ops.set_operating_point(db, run_id=run_id, y_true=[0, 1, 0, 1], p_pos=[0.2, 0.6, 0.4, 0.7])
    es.evaluate_model(db, f"run:{run_id}", "site_b")
    st.cache_resource.clear()
    st.cache_data.clear()
    return db, run_id


def test_site_calibration_is_computed_by_a_job_and_recorded_by_a_person(evaluated):
    db, run_id = evaluated
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    at.selectbox(key="site_ref").set_value(f"run:{run_id}").run()
    at.slider(key="site_target").set_value(0.9).run()
    assert not at.exception, at.exception
    assert not queue.recent_jobs(db, "site_calibration")  # nothing asked yet
    at.button(key="site_go").click().run()
    (job,) = queue.recent_jobs(db, "site_calibration")  # queued by the page, not computed there
    assert job.status == "queued" and job.params["target"] == 0.9
    assert not [m for m in at.metric if m.label == "Candidate threshold"]
    app.run_worker(once=True, kinds="jobs", db=db)
    at.run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    cand = queue.get_job(db, job.id).result
    assert metrics["Candidate threshold"] == f"{cand['threshold']:.3f}"
    assert float(metrics["Sensitivity"]) >= 0.9
    assert any("On 48 images of site_b (24 positive, 24 negative, 48 patients)"
               in c.value.replace("\\", "") and "bootstrap resamples over patients" in c.value
               for c in at.caption)
    assert any("small sample" in w.value for w in at.warning)
    at.text_input(key="site_who").input("dr b")
    at.text_input(key="site_note").input("March sample")
    at.button[[b.label.replace("\\", "") for b in at.button].index(
        "Record as site_b's operating point")].click().run()
    assert not at.exception, at.exception
    assert any(s.value.replace("\\", "").startswith("Recorded: site operating point for site_b")
               for s in at.success)
    (op,) = site_thresholds.site_points(db, model_ref=f"run:{run_id}")
    assert (op.changed_by, op.note, op.sample_n) == ("dr b", "March sample", 48)
    assert op.threshold == pytest.approx(cand["threshold"])
    assert at.dataframe[-1].value["by"].tolist() == ["dr b"]


def test_an_unevaluated_site_says_to_evaluate_first(evaluated, tiny_dataset):
    db, run_id = evaluated
    index_dataset(db, tiny_dataset, name="tiny")
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    at.selectbox(key="site_ref").set_value(f"run:{run_id}").run()
    at.selectbox(key="site_data").set_value("tiny").run()
    assert not at.exception, at.exception
    assert any("No evaluation of this model on tiny yet" in i.value for i in at.info)


def test_predict_uses_the_site_point_for_its_images_and_the_global_one_elsewhere(
        evaluated, site_folder):  # noqa: F811
    db, run_id = evaluated
    (ev,) = site_thresholds.site_evaluations(db, f"run:{run_id}", 1)
    cand = site_thresholds.candidate(db, evaluation_id=ev.id, target=0.9, n_boot=20)
    site_thresholds.record(db, cand, changed_by="dr b")
    at = AppTest.from_file(str(PAGES / "predict.py"), default_timeout=120).run()
    at.sidebar.selectbox(key="predict_model").set_value(f"run:{run_id}").run()
    at.radio(key="predict_source").set_value("From a dataset").run()
    at.button(key="predict_pick_images_1_sample").click().run()
    assert not at.exception, at.exception
    used = [c.value.replace("\\", "") for c in at.caption  # the names escaped
            if c.value.startswith("Decided with")]
    assert used == [f"Decided with the {site_thresholds.describe(site_thresholds.site_points(db)[0])}."]
    assert "by dr b" in used[0] and "site_b" in used[0]
    assert f"operating point {cand.threshold:.3f}" in at.markdown[0].value
    # An upload: the global point unless the user says it comes from the calibrated site.
    at.radio(key="predict_source").set_value("Upload").run()
    film = next((site_folder / "train" / "NORMAL").iterdir())
    at.file_uploader(key="predict_files").set_value((film.name, film.read_bytes(),
                                                     "image/jpeg")).run()
    assert not at.exception, at.exception
    used = [c.value.replace("\\", "") for c in at.caption  # the names escaped
            if c.value.startswith("Decided with")]
    assert used[0].startswith("Decided with the global operating point 0.600")
    assert "operating point 0.600" in at.markdown[0].value
    at.selectbox(key="predict_site").set_value(1).run()
    used = [c.value.replace("\\", "") for c in at.caption  # the names escaped
            if c.value.startswith("Decided with")]
    assert "site operating point for site_b" in used[0]
    assert f"operating point {cand.threshold:.3f}" in at.markdown[0].value


def test_the_measured_site_round_is_drawn_where_site_thresholds_are_chosen(cxr_home, monkeypatch,
                                                                          tmp_path):
    """Compare → Site threshold shows what reviewing a new site's films bought the shipped
    model (the bench's file beside it), one line per decision rule; refused budgets said."""
    import json

    from test_site_round import _measured_round

    from cxr_core.evaluation import site_round

    measured = {**_measured_round(), "base_threshold": {
        "value": 0.155, "stored": 0.422, "note": "the stored threshold 0.422 was chosen on this "
                                                 "site's films (site_b)"}}
    (tmp_path / "site_round.json").write_text(json.dumps(measured))
    monkeypatch.setattr(site_round, "measured",
                        lambda model_dir=tmp_path: site_round.parse(json.loads(
                            (tmp_path / "site_round.json").read_text())))
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    [chart] = at.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    names = {t["name"] for t in spec["data"]}
    assert names == {*site_round.SERIES.values(), site_round.BEFORE_THE_SITE} - {
        site_round.SERIES["base_stored"]}  # the base's threshold was chosen on this site
    assert any("refused at 0 films confirmed" in c.value for c in at.caption)
    assert any(c.value.replace("\\", "").startswith("Base model: the stored threshold 0.422 was "
                                                     "chosen on this site's films (site_b)")
               for c in at.caption)
    assert any("every film is scored only in the fold where no one confirmed it" in c.value
               for c in at.caption)


def test_a_broken_site_round_file_is_an_error_not_a_crash(cxr_home, monkeypatch):
    from cxr_core.core.errors import ConfigError
    from cxr_core.evaluation import site_round

    def broken():
        raise ConfigError("models/default/site_round.json is not readable JSON")

    monkeypatch.setattr(site_round, "measured", broken)
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("not readable JSON" in e.value for e in at.error)
