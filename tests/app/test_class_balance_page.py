"""AppTest: the entry script and the class-balance page, on a real indexed dataset."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cxr_core.jobs import launcher
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core import app

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """The tests play the worker (:func:`with_jobs_done`); the page launches no process."""
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)


def with_jobs_done(at: AppTest) -> AppTest:
    """Run the jobs the page queued (what the launched worker does), then the page again."""
    app.run_worker(once=True, kinds="jobs")
    at.run()
    assert not at.exception, at.exception
    return at



def test_entry_without_dataset_says_how_to_add_one(cxr_home):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert not at.exception
    assert any("No dataset yet" in i.value for i in at.info)


def test_add_dataset_by_path_in_the_app(cxr_home, tiny_dataset):
    from cxr_core.storage.datasets import list_datasets

    def indexed() -> list[int]:
        with open_db().session() as s:
            return [d.n_images for d in list_datasets(session=s)]

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    at.text_input[0].set_value(str(tiny_dataset))
    at.button[0].click().run()
    assert indexed() == []  # queued: a worker reads the folder, not the page
    with_jobs_done(at)
    assert indexed() == [18]


def test_class_balance_page_on_tiny_dataset(cxr_home, tiny_dataset):
    index_dataset(open_db(), tiny_dataset, name="tiny")
    at = AppTest.from_file(str(REPO / "app_pages" / "class_balance.py"), default_timeout=60).run()
    assert not at.exception
    assert at.metric[0].value == "18"
    assert "Computing the patient-grouped split: job #1 queued" in at.get("progress")[0].proto.text
    with_jobs_done(at)
    assert any("patients in both train and validation: **0**" in c.value for c in at.caption)
    at.radio(key="balance_scheme").set_value("three_class").run()
    with_jobs_done(at)
    assert any("patients in both train and validation: **0**" in c.value for c in at.caption)
    at.radio(key="balance_scheme").set_value("binary").run()
    assert not at.get("progress")  # that version's split is kept with its job: not asked again


def test_class_balance_bad_ratio_is_a_message(cxr_home, tiny_dataset):
    index_dataset(open_db(), tiny_dataset, name="tiny")
    at = with_jobs_done(AppTest.from_file(str(REPO / "app_pages" / "class_balance.py"),
                                          default_timeout=60).run())
    at.text_input(key="balance_ratio_binary").set_value("2:x").run()
    assert not at.exception and any("Ratio must look like" in e.value for e in at.error)


def test_class_balance_real_train_split(cxr_home, shared_data):
    index_dataset(open_db(), shared_data / "chest_xray_224" / "train")
    at = AppTest.from_file(str(REPO / "app_pages" / "class_balance.py"), default_timeout=120).run()
    assert not at.exception
    assert at.metric[0].value == "5,216"


def test_original_vs_current_counts_after_a_relabel(cxr_home, tiny_dataset):
    from cxr_core.review.queues import LabelChoice, submit_relabel
    from cxr_core.data.indexing import open_dataset

    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    _, recs = open_dataset(db, "tiny")
    normal = next(r for r in recs if r.label == "NORMAL" and r.split == "train")
    submit_relabel(db, image_id=normal.id, choice=LabelChoice("PNEUMONIA", "virus"),
                   reviewer="dr-a")
    at = AppTest.from_file(str(REPO / "app_pages" / "class_balance.py"), default_timeout=60).run()
    at.toggle(key="balance_current").set_value(True).run()
    assert not at.exception
    assert any("Counting the current labels" in p.proto.text for p in at.get("progress"))
    with_jobs_done(at)  # a worker derives the current labels once per relabel version
    delta = at.dataframe[0].value
    assert delta.loc["NORMAL", "change"] == -1 and delta.loc["PNEUMONIA", "change"] == 1


def test_home_shows_the_demo_model_card(cxr_home, tmp_path, monkeypatch):
    import json

    from cxr_core.models import store as model_store

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert not at.exception
    # The shipped card headlines the new site (external validation); its threshold was chosen
    # on those films, so the page shows the cross-fitted figures, never the resubstituted ones.
    labels = [m.label for m in at.metric]
    assert labels[:4] == ["AUC", "Sensitivity (site threshold, cross-fitted)",
                          "Specificity (site threshold, cross-fitted)", "Threshold (site)"]
    assert float(at.metric[0].value) > 0.9
    assert "Sensitivity (stored threshold)" not in labels
    assert any(m.value.replace("\\", "").startswith("**At a new site") for m in at.markdown)
    assert any("only cross-fitted figures are reported" in c.value.replace("\\", "")
               for c in at.caption)
    # The in-distribution rows say where their (site) threshold came from.
    assert any("Threshold chosen on the films of the site chest_xray_224_external"
               in c.value.replace("\\", "") for c in at.caption)
    # A card without a 'measured' list, from a random patient split: said so, with a warning.
    card = json.loads((model_store.DEFAULT_MODELS_DIR / "model_card.json").read_text())
    card.pop("measured")
    card["training_config"]["split"] = "patient"
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setattr(model_store, "DEFAULT_MODELS_DIR", tmp_path)
    at.run()
    assert "Validation AUC" in [m.label for m in at.metric]
    assert any("random patient-grouped validation split (in-distribution)" in c.value
               for c in at.caption)
    assert any("in-distribution figures" in w.value for w in at.warning)


def test_temporal_split_preview_shows_what_was_held_out(cxr_home, tiny_dataset):
    index_dataset(open_db(), tiny_dataset, name="tiny")
    at = AppTest.from_file(str(REPO / "app_pages" / "class_balance.py"), default_timeout=60).run()
    at.radio(key="balance_split").set_value("temporal").run()
    with_jobs_done(at)
    assert any("patients in both train and validation: **0**" in c.value for c in at.caption)
    order = next(d.value for d in at.dataframe if "val" in d.value.columns)
    assert set(order.index) == {"NORMAL", "PNEUMONIA"}
    assert order.loc["PNEUMONIA", "val"].startswith("person 1–")  # the earliest patients
    at.radio(key="balance_split").set_value("group").run()
    assert any("Name the folder to hold out" in i.value for i in at.info)
