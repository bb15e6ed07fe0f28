"""AppTest of the review page: name once, relabel, undo, skip, sent queue, export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage import relabels as rel_store, reviews as store
from cxr_core.storage.evals import prediction_columns
from cxr_core import app

PAGE = str(Path(__file__).resolve().parents[2] / "app_pages" / "review.py")
FILES = {"NORMAL": ["IM-0001-0001.png", "IM-0002-0001.png", "IM-0003-0001.png"],
         "PNEUMONIA": ["person1_bacteria_1.png", "person2_virus_2.png"]}


@pytest.fixture()
def tiny(cxr_home, tmp_path):
    """(db, dataset_id) of five generated images indexed into the test's CXR_HOME."""
    for n, (cls, names) in enumerate(FILES.items()):
        (tmp_path / "tiny" / "train" / cls).mkdir(parents=True)
        for k, name in enumerate(names):
            arr = np.full((48, 40), 60 * n + 20 * k, np.uint8)
            Image.fromarray(arr).save(tmp_path / "tiny" / "train" / cls / name)
    db = open_db()
    dataset_id = index_dataset(db, tmp_path / "tiny", name="tiny").dataset_id
    st.cache_resource.clear()  # get_db() must open this test's CXR_HOME
    st.cache_data.clear()
    return db, dataset_id


def start(reviewer: str = "Dr Test") -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    at.text_input(key="review_name").input(reviewer).run()
    assert not at.exception, at.exception
    return at


def progress_text(at: AppTest) -> str:
    return at.get("progress")[0].proto.text


def relabels(db, dataset_id):
    with db.session() as s:
        return rel_store.list_relabels(session=s, dataset_id=dataset_id)


def test_name_is_asked_once_then_the_queue_shows(tiny):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert at.text_input(key="review_name") and not at.get("progress")
    at.text_input(key="review_name").input("Dr Test").run()
    assert "Reviewing as **Dr Test**" in [c.value for c in at.sidebar.caption]
    assert [b.label for b in at.button if b.key and b.key.startswith("review_label_")] == []
    assert "Nothing left" in at.success[0].value  # no run yet: the disagreement queue is empty


def test_relabel_then_undo(tiny):
    db, dataset_id = tiny
    at = start()
    at.radio(key="review_queue").set_value("class").run()
    assert progress_text(at) == "0 reviewed, 3 left"
    labels = [at.button(key=f"review_label_{i}").label for i in range(3)]
    assert labels == ["NORMAL", "PNEUMONIA·bacteria", "PNEUMONIA·virus"]
    at.text_area(key="review_note").input("consolidation left base").run()
    at.button(key="review_label_1").click().run()
    assert not at.exception, at.exception
    rows = relabels(db, dataset_id)
    assert [(r.old_label, r.new_label, r.new_subtype, r.reviewer, r.note) for r in rows] == [
        ("NORMAL", "PNEUMONIA", "bacteria", "Dr Test", "consolidation left base")]
    assert progress_text(at) == "1 reviewed, 2 left"
    assert at.text_area(key="review_note").value == ""  # the note belongs to one click
    at.button(key="review_undo_btn").click().run()
    rows = relabels(db, dataset_id)
    assert len(rows) == 2 and rows[1].undo_of == rows[0].id
    assert progress_text(at) == "0 reviewed, 3 left"
    assert at.button(key="review_undo_btn").disabled


def test_skip_moves_to_the_next_image(tiny):
    at = start()
    at.radio(key="review_queue").set_value("class").run()
    first = at.markdown[0].value
    at.button(key="review_skip").click().run()
    assert at.markdown[0].value != first
    assert progress_text(at) == "0 reviewed, 3 left"  # skipped is still left


def test_sent_queue_shows_model_output_and_exports(tiny, monkeypatch):
    from cxr_core.jobs import queue
    from cxr_core.jobs import launcher

    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    db, dataset_id = tiny
    with db.session() as s:
        image_id = max(rel_store.original_labels(session=s, dataset_id=dataset_id))
        store.send_to_review(session=s, image_id=image_id, upload_sha256=None, source="predict",
                             run_ref="default", predicted="PNEUMONIA", probs=[0.1, 0.9],
                             sent_by="dr b")
    at = start()
    at.radio(key="review_queue").set_value("sent").run()
    assert progress_text(at) == "0 reviewed, 1 left"
    assert at.metric[0].value == "0.900"
    assert not at.toggle(key="review_saliency").value
    at.button(key="review_label_0").click().run()
    row = relabels(db, dataset_id)[0]
    assert (row.image_id, row.run_ref, row.score, row.new_label) == (image_id, "default", 0.9,
                                                                     "NORMAL")
    assert "Nothing left" in at.success[0].value
    # The export is a job: the page queues it, a worker writes the file, the page offers it.
    assert not at.get("download_button")
    at.button(key="review_export_go").click().run()
    job = queue.get_job(db, at.session_state["review_export"])
    assert job.kind == "export_relabels" and job.status == "queued"
    assert app.run_worker(once=True, kinds="jobs")["jobs"] == [job.id]
    at.run()
    assert not at.exception, at.exception
    (button,) = at.get("download_button")
    assert "1 rows" in button.proto.label
    path = Path(queue.get_job(db, job.id).result["path"])
    assert path.read_text().count("\n") == 2 and "Dr Test" in path.read_text()


def _tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    # Entry block
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="predictions")(x))


def test_saliency_toggle_with_a_real_run_model(tiny, tmp_path):
    """With a run whose model file exists, the toggle overlays a Grad-CAM map."""
    import json

    from db.models import Evaluation, EvalPrediction, Run

    db, dataset_id = tiny
    (tmp_path / "run1").mkdir()
    _tiny_model().save(tmp_path / "run1" / "best.keras")
    (tmp_path / "run1" / "model_card.json").write_text(json.dumps({
        "labels": ["NORMAL", "PNEUMONIA"], "label_scheme": "binary", "image_size": 32,
        "channels": 1, "saliency_layer": "conv"}))
    with db.session() as s:
        run = Run(name="r1", status="finished", config_json="{}",
                  artifact_dir=str(tmp_path / "run1"))
        s.add(run)
        s.flush()
        ev = Evaluation(run_id=run.id, model_ref=f"run:{run.id}", dataset_id=dataset_id,
                        split="val", labels_json='["NORMAL", "PNEUMONIA"]', images_key="k")
        s.add(ev)
        s.flush()
        s.add_all([EvalPrediction(evaluation_id=ev.id, image_id=i, y_true=0,
                                  probs_json=json.dumps([1 - p, p]),
                                  **prediction_columns([1 - p, p], ("NORMAL", "PNEUMONIA")))
                   for i, p in zip(rel_store.original_labels(session=s, dataset_id=dataset_id),
                                   (0.1, 0.45, 0.9, 0.7, 0.2))])
    at = start()
    at.radio(key="review_queue").set_value("uncertain").run()
    assert progress_text(at) == "0 reviewed, 5 left"
    assert at.metric[0].value == "0.450"
    plain = at.get("image")[0].value[0]
    at.toggle(key="review_saliency").set_value(True).run()
    assert not at.exception, at.exception
    assert at.get("image")[0].value[0] != plain


def test_upload_sent_to_review_is_relabelled_on_the_page(tiny):
    """An upload stored by hash and sent from Predict is shown and relabelled like an image."""
    import io

    from cxr_core.predict.inference import ImageInput
    from cxr_core.predict.uploads import store_upload

    db, dataset_id = tiny
    shas = []
    for value, probs in ((90, [0.6, 0.4]), (200, [0.2, 0.8])):  # the second is sent last
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(buf, format="PNG")
        shas.append(store_upload(ImageInput(f"scan{value}.png", data=buf.getvalue())))
        with db.session() as s:
            store.send_to_review(session=s, image_id=None, upload_sha256=shas[-1],
                                 source="predict", run_ref="default",
                                 predicted="PNEUMONIA" if probs[1] > .5 else "NORMAL",
                                 probs=probs, sent_by="dr b")
    sha = shas[1]
    at = start()
    at.radio(key="review_queue").set_value("sent").run()
    assert not at.exception, at.exception
    assert progress_text(at) == "0 reviewed, 2 left"
    assert at.markdown[0].value.startswith(f"**Upload {sha[:12]}")
    assert "PNEUMONIA (0.200 / 0.800)" in at.markdown[0].value.replace("\\", "")
    assert at.metric[0].value == "0.800" and not at.error
    assert at.get("image")  # the stored bytes are shown
    at.text_area(key="review_note").input("clear lungs").run()
    at.button(key="review_label_0").click().run()
    assert not at.exception, at.exception
    with db.session() as s:
        rows = rel_store.list_upload_relabels(session=s)
        assert rel_store.upload_labels(session=s)[sha] == ("NORMAL", None)
    assert [(r.upload_sha256, r.old_label, r.new_label, r.note, r.run_ref, r.score)
            for r in rows] == [(sha, "PNEUMONIA", "NORMAL", "clear lungs", "default", 0.8)]
    assert relabels(db, dataset_id) == []  # the dataset's history is untouched
    assert progress_text(at) == "0 reviewed, 1 left"  # the labelled upload's item is closed
    assert at.markdown[0].value.startswith(f"**Upload {shas[0][:12]}")
    at.button(key="review_undo_btn").click().run()
    assert not at.exception, at.exception
    with db.session() as s:
        assert rel_store.list_upload_relabels(session=s)[-1].undo_of == rows[0].id
        assert rel_store.upload_labels(session=s)[sha] == ("PNEUMONIA", None)
    assert progress_text(at) == "0 reviewed, 2 left"


def test_upload_with_missing_file_shows_an_error(tiny):
    db, _ = tiny
    with db.session() as s:
        store.send_to_review(session=s, image_id=None, upload_sha256="ab" * 32, source="compare",
                             run_ref=None, predicted=None, probs=None, sent_by="dr b")
    at = start()
    at.radio(key="review_queue").set_value("sent").run()
    assert not at.exception, at.exception
    assert "missing" in at.error[0].value
    at.button(key="review_skip").click().run()  # skip works with an upload's key
    assert progress_text(at) == "0 reviewed, 1 left"


def test_image_changed_since_relabel_is_flagged_and_queued(tiny, tmp_path):
    db, dataset_id = tiny
    at = start()
    at.radio(key="review_queue").set_value("class").run()
    at.button(key="review_label_1").click().run()  # relabel the first NORMAL image
    path = tmp_path / "tiny" / "train" / "NORMAL" / "IM-0001-0001.png"
    Image.fromarray(np.full((48, 40), 201, np.uint8)).save(path)  # a re-export: new bytes
    index_dataset(db, tmp_path / "tiny", name="tiny")
    at = start("Dr Two")
    assert any("changed on disk since they were relabelled" in w.value for w in at.warning)
    at.radio(key="review_queue").set_value("changed").run()
    assert not at.exception, at.exception
    assert at.markdown[0].value.replace("\\", "").startswith("**train/NORMAL/IM-0001-0001.png**")
    assert any("Image changed since it was relabelled" in w.value for w in at.warning)
    at.button(key="review_label_1").click().run()  # confirmed on the new bytes
    assert "Nothing left" in at.success[0].value
    assert len(relabels(db, dataset_id)) == 2  # the first relabel is kept beside the new one


def test_agreement_is_computed_by_a_worker_once_per_relabel_version(tiny, monkeypatch):
    from cxr_core.jobs import queue
    from cxr_core.review import queues as review
    from cxr_core.jobs import launcher

    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    db, dataset_id = tiny
    with db.session() as s:
        ids = sorted(rel_store.original_labels(session=s, dataset_id=dataset_id))
    normal, virus = review.LabelChoice("NORMAL", None), review.LabelChoice("PNEUMONIA", "virus")
    for n, image_id in enumerate(ids[:4]):
        review.submit_relabel(db, image_id=image_id, choice=normal, reviewer="dr a")
        review.submit_relabel(db, image_id=image_id, choice=virus if n == 0 else normal,
                              reviewer="dr b")
    at = start()
    at.toggle(key="review_agreement").set_value(True).run()
    assert not at.exception, at.exception
    assert any("Comparing reviewers" in p.proto.text for p in at.get("progress"))
    app.run_worker(once=True, kinds="jobs")
    at.run()
    assert not at.exception, at.exception
    pairs = at.dataframe[0].value
    assert (pairs["reviewer_a"][0], pairs["reviewer_b"][0], pairs["n_images"][0]) == (
        "dr a", "dr b", 4)
    assert pairs["agreement"][0] == 0.75
    assert any("1 images where reviewers' newest labels differ" in c.value for c in at.caption)
    at.run()  # the kept result: no new job for the same relabel version
    assert len(queue.recent_jobs(db, "agreement")) == 1
