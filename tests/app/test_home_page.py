"""AppTest of Home: datasets are indexed by worker jobs (CXR_DATA_DIR at start, the form)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cxr_core.jobs import queue
from cxr_core.jobs import launcher
from cxr_core.storage import open_db
from cxr_core import app

PAGE = str(Path(__file__).resolve().parents[2] / "streamlit_app.py")  # Home is its default


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """The test plays the worker; the page must not launch a process."""
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)


def run_page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def test_data_dirs_are_indexed_by_a_worker_not_the_page(cxr_home, tiny_dataset, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("CXR_DATA_DIR", f"{tiny_dataset}:{tmp_path / 'gone'}")
    at = run_page()
    assert [p.proto.text for p in at.get("progress")] == [
        f"Indexing {tiny_dataset}: job #1 queued for a worker",
        f"Indexing {tmp_path / 'gone'}: job #2 queued for a worker"]
    assert at.info and "No dataset yet" in at.info[0].value  # nothing read in the page
    assert app.run_worker(once=True, kinds="jobs")["jobs"] == [1, 2]
    at.run()
    assert not at.exception, at.exception
    assert not at.get("progress")
    assert at.dataframe[0].value["name"].tolist() == ["chest_xray"]
    (warning,) = [w for w in at.warning if "CXR_DATA_DIR" in w.value]
    # The path is markdown-escaped (it renders literally); compare without the escapes.
    assert f"CXR_DATA_DIR {tmp_path / 'gone'}" in warning.value.replace("\\", "")


def test_the_add_form_queues_an_index_job_and_shows_its_report(cxr_home, tiny_dataset):
    at = run_page()
    at.text_input[0].input(str(tiny_dataset))
    at.text_input[1].input("tiny")
    at.button[0].click().run()
    assert not at.exception, at.exception
    (job,) = queue.recent_jobs(open_db(), "index")
    assert job.status == "queued" and job.params == {"path": str(tiny_dataset), "name": "tiny"}
    assert "queued for a worker" in at.get("progress")[0].proto.text
    app.run_worker(once=True, kinds="jobs")
    at.run()
    assert not at.exception, at.exception
    assert "Indexed **tiny**: 18 images (18 read, 0 unchanged)" in at.success[0].value
    at.run()  # shown once
    assert not at.success and at.dataframe[0].value["name"].tolist() == ["tiny"]


def _entry(split, role, validation, auc, sens, spec, *, here=False, chosen_on="calibration"):
    return {"split": split, "dataset": "chest_xray_224", "role": role, "validation": validation,
            "n": 500, "n_patients": 400, "ci_unit": "patient", "auc": auc,
            "auc_ci": [auc - 0.01, min(1.0, auc + 0.01)], "sensitivity": sens,
            "sensitivity_ci": [sens - 0.03, min(1.0, sens + 0.02)], "specificity": spec,
            "specificity_ci": [spec - 0.05, min(1.0, spec + 0.04)], "threshold": 0.8,
            "chosen_on": chosen_on, "threshold_chosen_here": here, "label_source": "original"}


def test_home_headlines_temporal_validation_then_in_distribution(cxr_home, tmp_path,
                                                                 monkeypatch):
    """Temporal figures first, in-distribution second and labelled so; never the figures of
    the slice the threshold was chosen on."""
    import json

    from cxr_core.models import store as model_store

    card = json.loads((model_store.DEFAULT_MODELS_DIR / "model_card.json").read_text())
    card["measured"] = [
        _entry("calibration", "calibration", "temporal", 0.999, 0.951, 0.990, here=True),
        _entry("val", "selection", "patient", 0.998, 0.970, 0.960),
        _entry("val", "selection", "temporal", 0.981, 0.956, 0.872)]
    folder = tmp_path / "default"
    folder.mkdir()
    (folder / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setattr(model_store, "DEFAULT_MODELS_DIR", folder)
    at = run_page()
    titles = [m.value.replace("\\", "") for m in at.markdown if m.value.startswith("**")]
    assert titles[0].startswith("**Temporal validation: chest_xray_224 [val]") and \
        titles[0].endswith("(headline)")
    assert titles[1].startswith("**In-distribution validation") and "optimistic" in titles[1]
    assert len(titles) == 2  # the calibration slice is never a headline
    values = [m.value for m in at.metric]
    assert values[:4] == ["0.981", "0.956", "0.872", "0.800"] and "0.999" not in values
    assert "0.872 [0.822, 0.912]" in at.caption[0].value
    assert "not on these images" in at.caption[0].value


def test_home_says_how_the_threshold_holds_under_synthetic_shift(cxr_home, tmp_path,
                                                                 monkeypatch):
    import json

    from cxr_core.models import store as model_store

    card = json.loads((model_store.DEFAULT_MODELS_DIR / "model_card.json").read_text())
    card["measured"] = [_entry("val", "selection", "temporal", 0.981, 0.956, 0.872)]
    card["stress"] = {"n": 549, "split": "val", "threshold": 0.857, "min_auc": 0.990,
                      "worst_specificity": {"perturbation": "blur", "specificity": 0.71},
                      "rows": [{"perturbation": "none", "what": "unchanged", "auc": 0.998,
                                "sensitivity": 0.97, "specificity": 0.99},
                               {"perturbation": "blur", "what": "blur", "auc": 0.990,
                                "sensitivity": 0.99, "specificity": 0.71}]}
    folder = tmp_path / "default"
    folder.mkdir()
    (folder / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setattr(model_store, "DEFAULT_MODELS_DIR", folder)
    at = run_page()
    [warning] = [w.value.replace("\\", "") for w in at.warning if "synthetic" in w.value]
    assert "specificity falls from 0.990 to 0.710 (blur)" in warning
    assert "AUC stays at least 0.990" in warning and "not a deployment figure" in warning


def test_home_leads_with_the_figures_at_a_new_site(cxr_home, tmp_path, monkeypatch):
    """External validation (another site or period) is the headline; temporal figures follow,
    labelled optimistic for a new site."""
    import json

    from cxr_core.models import store as model_store

    card = json.loads((model_store.DEFAULT_MODELS_DIR / "model_card.json").read_text())
    external = {"role": "external", "dataset": "site", "split": "(all)", "n": 201,
                "n_patients": 143, "auc": 0.953, "auc_ci": [0.92, 0.98], "sensitivity": 0.968,
                "sensitivity_ci": [0.93, 0.99], "specificity": 0.753,
                "specificity_ci": [0.65, 0.85], "threshold": 0.76, "excluded_seen": 0,
                "stored_threshold_chosen_here": False, "threshold_chosen_here": False,
                "site_threshold": {"method": "cross-fitted", "target_sensitivity": 0.95,
                                   "folds": 5, "repeats": 20, "sensitivity": 0.952,
                                   "sensitivity_ci": [0.9, 0.99], "specificity": 0.805,
                                   "specificity_ci": [0.72, 0.89]}}
    card["measured"] = [_entry("val", "selection", "temporal", 0.998, 0.97, 0.99), external]
    card["recipe_selected_on"] = ["site"]
    folder = tmp_path / "default"
    folder.mkdir()
    (folder / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setattr(model_store, "DEFAULT_MODELS_DIR", folder)
    at = run_page()
    titles = [m.value.replace("\\", "") for m in at.markdown if m.value.startswith("**")]
    assert titles[0] == "**At a new site: site [(all)], 201 images, 143 patients** (headline)"
    assert titles[1].startswith("**Temporal validation") and "optimistic" in titles[1]
    values = [m.value for m in at.metric]
    assert values[:4] == ["0.953", "0.968", "0.753", "0.805"]
    caption = at.caption[0].value.replace("\\", "")
    assert "cross-fitted" in caption and "recipe was chosen on this sample" in caption


def test_a_dataset_is_flagged_external_on_home_and_audited(cxr_home, tiny_dataset):
    from cxr_core.auth import admin
    from cxr_core.auth.policy import local_principal
    from cxr_core.data.indexing import index_dataset, list_datasets

    db = open_db()
    index_dataset(db, tiny_dataset, name="site")
    at = run_page()
    assert at.dataframe[0].value["external"].tolist() == [""]
    (flag,) = [b for b in at.button if b.label == "Flag as external"]
    flag.click().run()
    assert not at.exception, at.exception
    assert [d.external for d in list_datasets(db)] == [True]
    assert at.dataframe[0].value["external"].tolist() == ["yes"]
    events = admin.audit_log(db, local_principal(""), action="index_dataset")
    assert events[0].detail == {"external": True} and events[0].target.startswith("dataset:")
    (unflag,) = [b for b in at.button if b.label == "Unflag as external"]
    unflag.click().run()
    assert [d.external for d in list_datasets(db)] == [False]


def test_a_first_launch_indexes_the_demo_films_and_evaluates_the_shipped_model(cxr_home,
                                                                              monkeypatch):
    """No dataset, no CXR_DATA_DIR: the app queues the demo job (a worker indexes the 300
    embedded films and evaluates the shipped model there); Home says it is the demo and that
    the shipped model's figures on it are on its own training films."""
    from cxr_core.evaluation import evaluate as es

    monkeypatch.setenv("CXR_DEMO", "on")
    at = run_page()
    assert "demo" in at.get("progress")[0].proto.text.lower()
    assert app.run_worker(once=True, kinds="jobs")["jobs"] == [1]
    (job,) = queue.recent_jobs(open_db(), "demo")
    assert job.status == "finished", job.error
    assert job.result["images"] == 300 and job.result["duplicate_groups"] == 5
    assert isinstance(job.result["evaluations"]["default"], int)
    (ev,) = es.list_evaluations(open_db())
    assert ev.model_ref == "default" and ev.dataset_name == "demo" and ev.n == 300
    at.run()
    assert not at.exception, at.exception
    info = " | ".join(i.value for i in at.info)
    assert "demo dataset" in info and "its own training films" in info
    assert at.dataframe[0].value["name"].tolist() == ["demo"]
    at.run()
    assert not queue.recent_jobs(open_db(), "index")  # asked once: the database knows one now
    assert len(queue.recent_jobs(open_db(), "demo")) == 1


def test_the_demo_can_be_turned_off(cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_DEMO", "off")
    at = run_page()
    assert not at.get("progress") and not queue.recent_jobs(open_db(), "demo")
