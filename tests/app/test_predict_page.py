"""AppTest of the Predict page: uploads (good and bad), table + CSV, saliency, send to review,
and images picked from an indexed dataset. The model is a finished run's tiny 32 px CNN."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from cxr_core.storage import open_db
from cxr_core.storage import reviews
from cxr_core.storage import runs as run_store

PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "predict.py")
CARD = {"labels": ["NORMAL", "PNEUMONIA"], "label_scheme": "binary",
        "operating_point": {"threshold": 0.45, "method": "sensitivity", "target": 0.95}}


def _jpeg(seed: int, size: int = 72) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def run_ref(cxr_home) -> str:
    """A finished run whose artifacts hold a tiny small3_128 model (32 px) and its card."""
    import keras

    from cxr_core.models import graph
    from cxr_core.models.specs import ModelConfig

    db = open_db()
    run_id = db.write(lambda s: run_store.create_run(session=s, name="tiny", config={}))
    folder = cxr_home / "runs" / str(run_id)
    folder.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    graph.build_model(ModelConfig(name="small3_128", image_size=32, channels=1), 2) \
        .save(folder / "best.keras")
    (folder / "model_card.json").write_text(json.dumps(CARD))
    db.write(lambda s: run_store.set_run_artifacts(session=s, run_id=run_id,
                                                   artifact_dir=str(folder)))
    db.write(lambda s: run_store.finish_run(session=s, run_id=run_id, status="finished"))
    st.cache_resource.clear()  # get_db() must open this test's CXR_HOME
    st.cache_data.clear()
    return f"run:{run_id}"


def start(ref: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, at.exception
    at.sidebar.selectbox(key="predict_model").set_value(ref).run()
    assert not at.exception, at.exception
    return at


def test_upload_batch_with_bad_files_then_saliency_and_review(run_ref, cxr_home):
    at = start(run_ref)
    files = [("a.jpeg", _jpeg(1), "image/jpeg"), ("notes.png", b"not an image", "image/png"),
             ("empty.dcm", b"", "application/dicom"), ("b.jpeg", _jpeg(2), "image/jpeg")]
    at.file_uploader(key="predict_files").set_value(files).run()
    assert not at.exception, at.exception
    errors = [e.value.replace("\\", "") for e in at.error]  # file names escaped
    assert len(errors) == 2
    assert errors[0].startswith("notes.png: not a readable image")
    assert errors[1].startswith("empty.dcm: the file is empty")
    table = at.dataframe[0].value
    assert list(table["file"]) == ["a.jpeg", "notes.png", "empty.dcm", "b.jpeg"]
    assert at.get("download_button")  # the CSV of the batch
    assert "operating point 0.450" in at.markdown[0].value

    # Saliency: every method renders; the class and opacity change without recomputing predict
    for method in ("gradcam", "gradcam++", "scorecam", "smoothgrad"):
        at.selectbox(key="predict_method").set_value(method).run()
        assert not at.exception, at.exception
        assert len(at.get("image")) == 2  # the image and its overlay
    explained = at.radio(key="predict_class")
    assert explained.options[0].replace("\\", "").endswith("(predicted)")  # escaped
    explained.set_value(1 - explained.value)
    at.slider(key="predict_alpha").set_value(0.8).run()
    assert not at.exception, at.exception

    # Pick the second good image, then send it to review
    at.selectbox(key="predict_pick").set_value(1).run()
    at.text_input(key="predict_sent_by").input("Dr Test").run()
    at.button(key="predict_send").click().run()
    assert not at.exception, at.exception
    assert "Sent to the review queue" in at.success[0].value
    with open_db().session() as s:
        [item] = reviews.list_review_items(session=s)
    assert item.source == "predict" and item.run_ref == run_ref and item.sent_by == "Dr Test"
    stored = [p.name for p in (cxr_home / "uploads").iterdir()]
    assert stored == [f"{item.upload_sha256}.jpg"]  # by content hash, not "b.jpeg"


def test_single_upload_shows_decision_without_table(run_ref):
    at = start(run_ref)
    at.file_uploader(key="predict_files").set_value(("x.png", _jpeg(3), "image/png")).run()
    assert not at.exception, at.exception
    assert not at.dataframe and not at.error
    assert [m.label for m in at.metric] == ["P(NORMAL)", "P(PNEUMONIA)"]


def test_pick_images_from_an_indexed_dataset(run_ref, tiny_dataset):
    from cxr_core.data.indexing import index_dataset

    index_dataset(open_db(), tiny_dataset, name="tiny")
    st.cache_data.clear()
    at = start(run_ref)
    at.radio(key="predict_source").set_value("From a dataset").run()
    assert not at.exception, at.exception
    at.button(key="predict_pick_images_1_sample").click().run()
    assert not at.exception, at.exception
    assert len(at.multiselect(key="predict_pick_images_1_sel").value) == 8
    assert len(at.dataframe[0].value) == 8
    # The picker searches on the server: only matching paths reach the browser.
    at.text_input(key="predict_pick_images_1_search").input("virus").run()
    picker = at.multiselect(key="predict_pick_images_1_sel")
    # The options are the 8 picked (kept) and the server's matches: every virus film, no other.
    assert all("virus" in o for o in picker.options if o not in picker.value)
    virus = [o for o in picker.options if "virus" in o]
    assert len(virus) == 4  # the tiny set's four virus films, wherever they are listed
    keep = next(o for o in picker.value if "virus" not in o) if any(
        "virus" not in o for o in picker.value) else picker.value[0]
    picker.set_value([keep, next(v for v in virus if v != keep)]).run()
    assert not at.exception, at.exception
    assert len(at.dataframe[0].value) == 2
    at.button(key="predict_send").click().run()
    with open_db().session() as s:
        [item] = reviews.list_review_items(session=s)
    assert item.image_id is not None and item.upload_sha256 is None


def test_a_selection_does_not_follow_the_user_to_another_dataset(run_ref, tiny_dataset,
                                                                tmp_path):
    import shutil

    from cxr_core.data.indexing import index_dataset

    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    index_dataset(open_db(), tiny_dataset, name="a")
    index_dataset(open_db(), other, name="b")
    st.cache_data.clear()
    at = start(run_ref)
    at.radio(key="predict_source").set_value("From a dataset").run()
    at.button(key="predict_pick_images_1_sample").click().run()
    assert len(at.multiselect(key="predict_pick_images_1_sel").value) == 8
    at.sidebar.selectbox(key="predict_dataset").set_value("b").run()
    assert not at.exception, at.exception
    assert at.multiselect(key="predict_pick_images_2_sel").value == []  # a fresh picker
    assert not at.dataframe  # nothing predicted from dataset a's paths under b's root


def test_default_model_on_a_real_film(cxr_home, shared_data):
    st.cache_resource.clear()
    st.cache_data.clear()
    film = sorted((shared_data / "chest_xray_fullres_sample" / "train" / "PNEUMONIA").glob("*"))[0]
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert at.sidebar.selectbox(key="predict_model").value == "default"  # the shipped model first
    at.file_uploader(key="predict_files").set_value((film.name, film.read_bytes(), "image/jpeg"))
    at.run()
    assert not at.exception, at.exception
    assert at.markdown[0].value.startswith("**PNEUMONIA**") and "model card" in at.markdown[0].value
    assert len(at.get("image")) == 2


def test_an_ensemble_predicts_explains_and_says_where_its_threshold_comes_from(two_runs):
    """A named ensemble of two runs is picked like any model; its operating point is its own
    (chosen on the mean of the members' shared validation outputs), and the page says so."""
    from cxr_core.models import ensembles
    from cxr_core.evaluation import evaluate as es

    db = open_db()
    y = np.array([0, 1, 0, 1, 0, 1])
    outputs = ([0.2, 0.7, 0.4, 0.6, 0.1, 0.9], [0.3, 0.5, 0.2, 0.8, 0.6, 0.7])
    for run_id, p in zip(two_runs, map(np.array, outputs)):
        es.record_evaluation(db, run_id=run_id, model_ref=f"run:{run_id}", dataset_id=None,
                             split="val", labels=["NORMAL", "PNEUMONIA"], image_ids=[None] * 6,
                             paths=[f"v{i}.png" for i in range(6)], y_true=y,
                             probs=np.column_stack([1 - p, p]), n_boot=0)
    ensembles.create_ensemble(db, "pair", [f"run:{r}" for r in two_runs], changed_by="ds")
    st.cache_resource.clear()
    at = start("ensemble:pair")
    at.file_uploader(key="predict_files").set_value(("x.png", _jpeg(5), "image/png")).run()
    assert not at.exception, at.exception
    [note] = [i.value.replace("\\", "") for i in at.info if "Ensemble" in i.value]
    assert "Its own operating point" in note and "val outputs, 6 images" in note
    assert "ensemble operating point" in at.markdown[0].value
    assert not at.warning or all("decisions use 0.5" not in w.value for w in at.warning)
    captions = [i.caption for img in at.get("image") for i in img.proto.imgs]
    assert any("mean of 2 members' normalised Grad-CAM maps" in c for c in captions), captions
    at.text_input(key="predict_sent_by").input("Dr Test").run()
    at.button(key="predict_send").click().run()
    assert not at.exception, at.exception
    with open_db().session() as s:
        [item] = reviews.list_review_items(session=s)
    assert item.run_ref == "ensemble:pair"


def test_an_upload_over_the_per_request_cap_is_refused_before_decoding(run_ref, monkeypatch):
    monkeypatch.setenv("CXR_MAX_UPLOAD_FILES", "2")
    at = start(run_ref)
    files = [(f"{i}.png", _jpeg(i), "image/png") for i in range(3)]
    at.file_uploader(key="predict_files").set_value(files).run()
    assert not at.exception, at.exception
    [error] = at.error
    assert "files per upload is limited to 2" in error.value.replace("\\", "")
    assert "Received: 3 files" in error.value.replace("\\", "")
    assert not at.metric and not at.dataframe  # nothing was predicted
