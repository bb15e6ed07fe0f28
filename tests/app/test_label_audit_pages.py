"""AppTest of issue 27 on the pages: Review's blind reading (the score hidden until the reader
answers), the likely-mislabelled queue (why it was flagged, after the answer), the conflicts
queue (adjudication), the reading-mode form and "PNEUMONIA (subtype not stated)"; Class
balance's noise matrix; Compare's per-class report; the run view's parameter counts."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from cxr_core.auth import policy
from cxr_core.data.indexing import index_dataset
from cxr_core.review import actions
from cxr_core.review import queues as review
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import label_audits as audit_store
from cxr_core.storage import open_db
from cxr_core.storage import relabels as rel_store
from cxr_core.storage import reviews as review_store
from cxr_core.storage import runs as run_store
from cxr_core.training import label_audit

PAGES = Path(__file__).resolve().parents[2] / "app_pages"
FILES = {"NORMAL": ["IM-0001-0001.png", "IM-0002-0001.png", "IM-0003-0001.png"],
         "PNEUMONIA": ["person1_bacteria_1.png", "person2_virus_2.png", "person3_virus_3.png"]}
ADMIN = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
A = policy.Principal(identity="a@h.org", roles=frozenset({"viewer", "reviewer"}))
B = policy.Principal(identity="b@h.org", roles=frozenset({"viewer", "reviewer"}))


@pytest.fixture()
def tiny(cxr_home, tmp_path, monkeypatch):
    """(db, dataset_id, {file name: image id}) of six generated films."""
    from cxr_core.jobs import launcher

    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    for n, (cls, names) in enumerate(FILES.items()):
        (tmp_path / "tiny" / "train" / cls).mkdir(parents=True)
        for k, name in enumerate(names):
            Image.fromarray(np.full((40, 40), 60 * n + 20 * k, np.uint8)).save(
                tmp_path / "tiny" / "train" / cls / name)
    db = open_db()
    dataset_id = index_dataset(db, tmp_path / "tiny", name="tiny").dataset_id
    with db.session() as s:
        originals = rel_store.original_labels(session=s, dataset_id=dataset_id)
        ids = {r.relpath.rsplit("/", 1)[-1]: r.id
               for r in ds_store.get_images(session=s, image_ids=sorted(originals))}
    st.cache_resource.clear()
    st.cache_data.clear()
    return db, dataset_id, ids


def start(page: str = "review.py", reviewer: str = "Dr Test") -> AppTest:
    at = AppTest.from_file(str(PAGES / page), default_timeout=60).run()
    assert not at.exception, at.exception
    if page == "review.py":
        at.text_input(key="review_name").input(reviewer).run()
        assert not at.exception, at.exception
    return at


def plain(text: str) -> str:
    """Markdown as read: the pages escape what they print (md())."""
    return text.replace("\\", "")


def send(db, image_id: int, p: float) -> None:
    with db.session() as s:
        review_store.send_to_review(session=s, image_id=image_id, upload_sha256=None,
                                    source="predict", run_ref="default",
                                    predicted="PNEUMONIA" if p >= .5 else "NORMAL",
                                    probs=[1 - p, p], sent_by="dr b")


def finished_audit(db, dataset_id: int, ids: dict) -> int:
    """A stored, finished label audit over the six films (probabilities written as a fold
    run would), one normal film looking like pneumonia out of fold."""
    names = sorted(ids)
    given = {n: 0 if n.startswith("IM-") else 1 for n in names}
    probs = {n: ([0.1, 0.9] if n == "IM-0002-0001.png" else
                 [0.8, 0.2] if given[n] == 0 else [0.25, 0.75]) for n in names}
    audit_id = db.write(lambda s: audit_store.create_audit(
        session=s, dataset_id=dataset_id, label_scheme="binary", label_source="current",
        labels=("NORMAL", "PNEUMONIA"), folds=2, seed=0, config={"model": "small3_50"},
        snapshot_hash="0" * 64, snapshot_relabel_id=None,
        assignments=[(ids[n], k % 2, given[n]) for k, n in enumerate(names)]))
    db.write(lambda s: audit_store.set_fold_probs(session=s, audit_id=audit_id, run_id=None,
                                                  probs={ids[n]: probs[n] for n in names}))
    with db.session() as s:
        audit = audit_store.require_audit(session=s, audit_id=audit_id)
        images = audit_store.audit_images(session=s, audit_id=audit_id)
    result, scores = label_audit.confident_learning(audit, images)
    db.write(lambda s: audit_store.finish_audit(session=s, audit_id=audit_id, result=result,
                                                scores=scores))
    return audit_id


# -- Review ---------------------------------------------------------------------------------

def test_blind_mode_hides_the_score_and_labels_until_the_reader_answers(tiny):
    db, dataset_id, ids = tiny
    image = ids["person1_bacteria_1.png"]
    send(db, image, 0.9)
    at = start()
    at.radio(key="review_queue").set_value("sent").run()
    assert at.metric[0].value == "0.900"  # open reading: the score shows
    assert any("Original: **PNEUMONIA·bacteria**" in m.value for m in at.markdown)
    actions.set_reading(db, ADMIN, dataset_id=dataset_id, blind=True, reads_per_image=1)
    at.run()
    assert not at.exception, at.exception
    assert not at.metric  # blind: no model score ...
    text = " ".join(m.value for m in at.markdown)
    # ... no folder label, not even the path (its folder and file name say it) ...
    assert "Original" not in text and "PNEUMONIA" not in text and "bacteria" not in text
    assert f"Image {image}" in text and "Blind reading" in text
    assert at.toggle(key="review_saliency").disabled  # ... and no saliency map
    at.button(key="review_label_0").click().run()  # the reader answers NORMAL
    assert not at.exception, at.exception
    (shown,) = [plain(i.value) for i in at.info if "You answered" in i.value]
    assert "You answered **NORMAL**" in shown and "Folder label: **PNEUMONIA·bacteria**" in shown
    assert "P(pneumonia) 0.900" in shown
    with db.session() as s:
        row = rel_store.list_relabels(session=s, image_ids=[image])[-1]
    assert (row.new_label, row.run_ref, row.score) == ("NORMAL", None, None)  # nothing shown


def test_the_likely_mislabelled_queue_says_why_only_after_the_answer(tiny):
    db, dataset_id, ids = tiny
    audit_id = finished_audit(db, dataset_id, ids)
    at = start()
    assert "Likely mislabelled (label audit, out-of-fold)" in at.radio(key="review_queue").options
    at.radio(key="review_queue").set_value("mislabelled").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="review_audit").value == audit_id
    assert any("IM-0002-0001.png" in plain(m.value) for m in at.markdown)  # flagged first
    assert not any("Why it was flagged" in i.value for i in at.info)  # not before answering
    at.button(key="review_label_3").click().run()  # PNEUMONIA (subtype not stated)
    assert not at.exception, at.exception
    (shown,) = [plain(i.value) for i in at.info if "You answered" in i.value]
    assert "Why it was flagged" in shown and f"Label audit #{audit_id}" in shown
    assert "Confident learning suggests PNEUMONIA" in shown
    with db.session() as s:
        row = rel_store.list_relabels(session=s, image_ids=[ids["IM-0002-0001.png"]])[-1]
    assert (row.new_label, row.new_subtype) == ("PNEUMONIA", None)  # no subtype guessed


def test_the_subtype_free_button_is_offered(tiny):
    at = start()
    at.radio(key="review_queue").set_value("class").run()
    labels = [b.label for b in at.button if b.key and b.key.startswith("review_label_")]
    assert labels == ["NORMAL", "PNEUMONIA·bacteria", "PNEUMONIA·virus",
                      "PNEUMONIA (subtype not stated)"]


def test_an_adjudicator_settles_conflicting_reads_on_the_page(tiny):
    db, dataset_id, ids = tiny
    image = ids["IM-0001-0001.png"]
    actions.set_reading(db, ADMIN, dataset_id=dataset_id, blind=True, reads_per_image=2)
    actions.relabel(db, A, image_id=image, choice=review.LabelChoice("PNEUMONIA", "virus"))
    actions.relabel(db, B, image_id=image, choice=review.LabelChoice("NORMAL", None))
    at = start()  # local mode: every role, admin implies adjudicator
    at.radio(key="review_queue").set_value("conflicts").run()
    assert not at.exception, at.exception
    reads = at.dataframe[0].value
    assert sorted(reads["reader"]) == ["a@h.org", "b@h.org"]
    at.text_area(key="review_note").input("lobar consolidation").run()
    at.button(key="review_adjudicate_1").click().run()  # PNEUMONIA·bacteria
    assert not at.exception, at.exception
    with db.session() as s:
        labels = rel_store.current_labels(session=s, dataset_id=dataset_id)
        last = rel_store.list_relabels(session=s, image_ids=[image])[-1]
    assert labels[image] == ("PNEUMONIA", "bacteria")
    assert (last.kind, last.reviewer, last.note) == ("adjudication", "Dr Test",
                                                      "lobar consolidation")
    assert "Nothing left" in at.success[0].value
    at.button(key="review_undo_btn").click().run()  # undo works as for relabels
    with db.session() as s:
        assert rel_store.current_labels(session=s, dataset_id=dataset_id)[image] == \
            ("NORMAL", None)


def test_the_reading_mode_form_saves_an_audited_setting(tiny):
    db, dataset_id, _ = tiny
    at = start()
    at.toggle(key="review_mode_blind").set_value(True)
    at.number_input(key="review_mode_reads").set_value(2)
    at.text_input(key="review_mode_note").input("reader study")
    at.button[[b.label for b in at.button].index("Save reading mode")].click().run()
    assert not at.exception, at.exception
    from cxr_core.review import reading

    mode = reading.reading_setting(db, dataset_id)
    assert (mode.blind, mode.reads_per_image, mode.changed_by) == (True, 2, "Dr Test")


# -- Class balance, Compare, Train -----------------------------------------------------------

def test_class_balance_shows_the_noise_matrix_of_each_audit(tiny):
    db, dataset_id, ids = tiny
    audit_id = finished_audit(db, dataset_id, ids)
    at = start("class_balance.py")
    assert not at.exception, at.exception
    assert at.selectbox(key="balance_audit").value == audit_id
    spec = json.loads(next(c for c in at.get("plotly_chart")
                           if "P(given | true)" in c.proto.spec).proto.spec)
    z = spec["data"][0]["z"]
    if isinstance(z, dict):  # plotly 6+: typed arrays as {"dtype", "bdata", "shape"}
        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(
            [int(n) for n in str(z["shape"]).split(",")])
    z = np.asarray(z, dtype=float)
    with db.session() as s:
        stored = audit_store.require_audit(session=s, audit_id=audit_id).result
    assert z.ravel() == pytest.approx(np.ravel(stored["noise_matrix"]["matrix"]))
    assert z.sum(axis=0) == pytest.approx([1, 1], abs=1e-5)
    assert any("flagged" in c.value and "never trained on it" in c.value for c in at.caption)


def test_compare_shows_each_runs_per_class_report(two_runs, monkeypatch):
    from cxr_core.jobs import launcher

    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    table = next(d.value for d in at.dataframe if "f1" in d.value.columns)
    assert list(table.columns) == ["run", "class", "precision", "recall", "f1", "support"]
    assert set(table["run"]) == {"alpha", "beta"}
    assert list(table["class"][:4]) == ["NORMAL", "PNEUMONIA", "macro avg", "weighted avg"]


def test_the_run_view_shows_parameter_counts_and_the_per_class_report(cxr_home, tiny_dataset):
    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    summary = {"parameters": {"total": 1234567, "trainable": 1230000, "non_trainable": 4567},
               "per_class": {"split": "val", "threshold": 0.42, "n": 10, "rows": [
                   {"class": "NORMAL", "precision": 1.0, "recall": 0.8, "f1": 0.889,
                    "support": 5}]},
               "left_out_unlabelled": {"PNEUMONIA (subtype not stated)": 2}}

    def add(s):
        rid = run_store.create_run(session=s, name="done", config={"epochs": 1})
        run_store.finish_run(session=s, run_id=rid, status="finished", summary=summary)
        return rid
    db.write(add)
    at = AppTest.from_file(str(PAGES / "train.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Parameters"] == "1,234,567" and metrics["Trainable"] == "1,230,000"
    assert any("operating point 0.420" in c.value for c in at.caption)
    assert any("2 PNEUMONIA (subtype not stated)" in c.value.replace("\\", "")
               for c in at.caption)


def test_home_shows_the_shipped_cards_per_class_report_and_size(cxr_home):
    card = json.loads((PAGES.parent / "models" / "default" / "model_card.json").read_text())
    at = AppTest.from_file(str(PAGES.parent / "streamlit_app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    total, trainable = card["parameters"]["total"], card["parameters"]["trainable"]
    assert any(f"{total:,} ({trainable:,} trainable) parameters" in e.label
               for e in at.expander)
    (table,) = at.table
    assert list(table.value["class"]) == ["NORMAL", "PNEUMONIA", "macro avg", "weighted avg"]
