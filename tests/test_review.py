"""Review: append-only relabels, derived labels, snapshots, queues, agreement, export."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from cxr_core.predict import explain
from cxr_core.review import queues as review
from cxr_core.review import view as review_view
from cxr_core.review.agreement import agreement, cohen_kappa
from cxr_core.review.export import export_relabels_csv, relabels_to_csv
from cxr_core.review.view import describe_entry
from cxr_core.core.errors import ConfigError
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage import relabels as rel_store, reviews as store
from cxr_core.storage.evals import prediction_columns
from db.models import Evaluation, EvalPrediction, ImageRow, OperatingPoint, Run

FILES = {"NORMAL": ["IM-0001-0001.png", "IM-0002-0001.png", "IM-0003-0001.png"],
         "PNEUMONIA": ["person1_bacteria_1.png", "person2_virus_2.png", "person3_bacteria_3.png"]}


def make_dataset(root, files=FILES):
    """Tiny generated images in the Kaggle layout (train/<CLASS>/<Kermany name>)."""
    for n, (cls, names) in enumerate(files.items()):
        (root / "train" / cls).mkdir(parents=True)
        for k, name in enumerate(names):
            arr = np.full((32, 32), 40 * n + 10 * k, np.uint8)
            Image.fromarray(arr).save(root / "train" / cls / name)
    return root


@pytest.fixture()
def db(cxr_home):
    return open_db()


@pytest.fixture()
def ds(db, tmp_path):
    """(dataset_id, {file name: image_id}) of a six-image dataset."""
    rep = index_dataset(db, make_dataset(tmp_path / "tiny"), name="tiny")
    with db.session() as s:
        ids = {r.relpath.split("/")[-1]: r.id for r in
               s.query(ImageRow).filter_by(dataset_id=rep.dataset_id)}
    return rep.dataset_id, ids


def add_predictions(db, dataset_id, probs_by_image, *, labels=("NORMAL", "PNEUMONIA"),
                    threshold=None, name="r1"):
    """Insert a finished run with one val evaluation (and an operating point) directly."""
    with db.session() as s:
        run = Run(name=name, status="finished", config_json="{}")
        s.add(run)
        s.flush()
        ev = Evaluation(run_id=run.id, model_ref=f"run:{run.id}", dataset_id=dataset_id,
                        split="val", labels_json=json.dumps(list(labels)), images_key="k")
        s.add(ev)
        s.flush()
        s.add_all([EvalPrediction(evaluation_id=ev.id, image_id=i, y_true=0,
                                  probs_json=json.dumps(list(p)),
                                  **prediction_columns(p, labels))
                   for i, p in probs_by_image.items()])
        if threshold is not None:
            s.add(OperatingPoint(run_id=run.id, threshold=0.5, method="youden"))
            s.flush()
            s.add(OperatingPoint(run_id=run.id, threshold=threshold, method="sensitivity"))
        return run.id


def relabel(db, image_id, label, subtype=None, reviewer="alice", **kw):
    return review.submit_relabel(db, image_id=image_id, choice=review.LabelChoice(label, subtype),
                                 reviewer=reviewer, **kw)


# -- Append-only semantics and undo ------------------------------------------------------------

def test_relabel_appends_and_undo_is_a_new_row(db, ds):
    dataset_id, ids = ds
    img = ids["IM-0001-0001.png"]
    rid = relabel(db, img, "PNEUMONIA", "virus", note="opacity RLL", run_ref="run:1", score=0.7)
    uid = review.submit_undo(db, relabel_id=rid, reviewer="bob")
    with db.session() as s:
        rows = rel_store.list_relabels(session=s, dataset_id=dataset_id)
        original = s.get(ImageRow, img)
        assert (original.label, original.subtype) == ("NORMAL", None)  # never overwritten
    assert [r.id for r in rows] == [rid, uid]
    first, undo = rows
    assert (first.old_label, first.new_label, first.new_subtype) == ("NORMAL", "PNEUMONIA", "virus")
    assert (first.reviewer, first.note, first.run_ref, first.score) == ("alice", "opacity RLL",
                                                                        "run:1", 0.7)
    assert undo.undo_of == rid and undo.reviewer == "bob"
    assert (undo.old_label, undo.old_subtype, undo.new_label) == ("PNEUMONIA", "virus", "NORMAL")
    with db.session() as s:
        assert rel_store.current_labels(session=s, dataset_id=dataset_id)[img] == ("NORMAL", None)


@pytest.mark.parametrize("case", ["twice", "undo_of_undo", "missing"])
def test_undo_errors(db, ds, case):
    img = ds[1]["IM-0001-0001.png"]
    rid = relabel(db, img, "PNEUMONIA", "bacteria")
    uid = review.submit_undo(db, relabel_id=rid, reviewer="alice")
    target = {"twice": rid, "undo_of_undo": uid, "missing": 9999}[case]
    with pytest.raises(ConfigError, match="relabel_id"):
        review.submit_undo(db, relabel_id=target, reviewer="alice")


@pytest.mark.parametrize("kwargs, match", [
    ({"reviewer": "  "}, "reviewer"),
    ({"image_id": 9999}, "image_id"),
])
def test_relabel_rejects_bad_input(db, ds, kwargs, match):
    args = {"image_id": ds[1]["IM-0001-0001.png"], "reviewer": "alice"} | kwargs
    with pytest.raises(ConfigError, match=match):
        relabel(db, args.pop("image_id"), "PNEUMONIA", "virus", **args)


# -- Current-label derivation and snapshots ----------------------------------------------------

def test_current_label_is_newest_non_undone_relabel(db, ds):
    dataset_id, ids = ds
    img, other = ids["person1_bacteria_1.png"], ids["IM-0002-0001.png"]
    r1 = relabel(db, img, "PNEUMONIA", "virus")
    r2 = relabel(db, img, "NORMAL", reviewer="bob")
    relabel(db, other, "PNEUMONIA", "bacteria")
    with db.session() as s:
        assert rel_store.current_labels(session=s, dataset_id=dataset_id)[img] == ("NORMAL", None)
        assert rel_store.list_relabels(session=s, image_ids=[img])[1].old_subtype == "virus"
    review.submit_undo(db, relabel_id=r2, reviewer="bob")
    with db.session() as s:
        now = rel_store.current_labels(session=s, dataset_id=dataset_id)
        assert now[img] == ("PNEUMONIA", "virus")  # back to the previous relabel, not the original
        assert now[other] == ("PNEUMONIA", "bacteria")
        assert now[ids["IM-0003-0001.png"]] == ("NORMAL", None)
        assert rel_store.current_labels(session=s, dataset_id=dataset_id,
                                    as_of_relabel_id=r1)[img] == ("PNEUMONIA", "virus")
        assert rel_store.current_labels(session=s, dataset_id=dataset_id, as_of_relabel_id=0) == \
            rel_store.original_labels(session=s, dataset_id=dataset_id)


def test_snapshot_hash_changes_when_a_relabel_lands(db, ds):
    dataset_id, ids = ds
    with db.session() as s:
        before = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
    assert (before.newest_relabel_id, before.n_relabels) == (None, 0)
    rid = relabel(db, ids["IM-0001-0001.png"], "PNEUMONIA", "virus")
    with db.session() as s:
        after = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
    assert after.hash != before.hash and (after.newest_relabel_id, after.n_relabels) == (rid, 1)
    uid = review.submit_undo(db, relabel_id=rid, reviewer="alice")
    with db.session() as s:
        undone = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
        replay = rel_store.label_snapshot(session=s, dataset_id=dataset_id, as_of_relabel_id=rid)
        labels = rel_store.current_labels(session=s, dataset_id=dataset_id, as_of_relabel_id=rid)
    assert undone.hash == before.hash and (undone.newest_relabel_id, undone.n_relabels) == (uid, 2)
    assert replay == after and rel_store.labels_hash(labels) == after.hash


# -- Agreement ----------------------------------------------------------------------------------

def test_cohen_kappa_on_a_known_table():
    # 50 images: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = .7, p_e = .5, kappa = .4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # undefined: chance agreement 1
    with pytest.raises(ConfigError, match="equally long"):
        cohen_kappa(["x"], [])


def test_agreement_pairs_and_conflicts(db, ds):
    dataset_id, ids = ds
    names = sorted(ids)
    truth = ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"]
    other = ["NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA"]
    for name, la, lb in zip(names, truth, other):
        relabel(db, ids[name], la, reviewer="alice")
        relabel(db, ids[name], lb, reviewer="bob")
    wrong = relabel(db, ids[names[0]], "PNEUMONIA", reviewer="carol")
    review.submit_undo(db, relabel_id=wrong, reviewer="carol")  # undone labels do not count
    agr = agreement(db, dataset_id)
    assert len(agr.pairs) == 1
    pair = agr.pairs[0]
    assert (pair.reviewer_a, pair.reviewer_b, pair.n_images) == ("alice", "bob", 4)
    assert pair.agreement == 0.75
    assert pair.kappa == pytest.approx(0.5)
    assert [c.image_id for c in agr.conflicts] == [ids[names[1]]]
    assert agr.conflicts[0].labels == (("alice", "NORMAL"), ("bob", "PNEUMONIA"))


# -- Model outputs and queues --------------------------------------------------------------------

def test_newest_evaluation_and_operating_point_feed_the_queues(db, ds):
    dataset_id, ids = ds
    img = ids["IM-0001-0001.png"]
    run_id = add_predictions(db, dataset_id, {img: (0.9, 0.1)}, threshold=0.3)
    with db.session() as s:
        s.add(Evaluation(run_id=run_id, model_ref="x", dataset_id=dataset_id, split="test",
                         labels_json='["NORMAL", "PNEUMONIA"]', images_key="k2"))
        s.flush()
        newest = s.query(Evaluation).order_by(Evaluation.id.desc()).first()
        s.add(EvalPrediction(evaluation_id=newest.id, image_id=img, y_true=0,
                             probs_json="[0.2, 0.8]",
                             **prediction_columns([0.2, 0.8], ("NORMAL", "PNEUMONIA"))))
    from cxr_core.storage import review_queue

    with db.session() as s:
        runs = store.models_with_predictions(session=s, dataset_id=dataset_id)
        assert review_queue.run_scores(session=s, model_ref=f"run:{run_id}",
                                       dataset_id=dataset_id + 1, threshold=None) is None
    state = review.load_state(db, dataset_id)
    assert state.threshold == 0.3 and state.model_ref == f"run:{run_id}"
    assert state.scores.labels == ("NORMAL", "PNEUMONIA")
    entry = review.build_queue(db, state, "class", class_name="NORMAL")[0]
    assert (entry.image_id, entry.score, entry.predicted) == (img, 0.8, "PNEUMONIA")  # newest
    assert [(r.run_id, r.n_predictions) for r in runs] == [(run_id, 2)]


@pytest.mark.parametrize("probs, labels, threshold, expected", [
    ((0.6, 0.4), ("NORMAL", "PNEUMONIA"), 0.3, (0.4, "PNEUMONIA", 0.1)),
    ((0.6, 0.4), ("NORMAL", "PNEUMONIA"), None, (0.4, "NORMAL", 0.1)),
    ((0.4,), ("NORMAL", "PNEUMONIA"), 0.4, (0.4, "PNEUMONIA", 0.0)),
    ((0.2, 0.5, 0.3), ("NORMAL", "BACTERIA", "VIRUS"), None, (0.8, "BACTERIA", 0.2)),
])
def test_model_output(probs, labels, threshold, expected):
    out = review.model_output(probs, labels, threshold)
    assert (out.score, out.predicted, out.margin) == pytest.approx(expected)


def test_model_output_rejects_mismatched_probs():
    with pytest.raises(ConfigError, match="probability per class"):
        review.model_output((0.1, 0.2, 0.7), ("NORMAL", "PNEUMONIA"), 0.5)


def test_queues(db, ds):
    dataset_id, ids = ds
    n1, n2, p1, p2 = (ids[k] for k in ("IM-0001-0001.png", "IM-0002-0001.png",
                                       "person1_bacteria_1.png", "person2_virus_2.png"))
    add_predictions(db, dataset_id, {n1: (0.1, 0.9), n2: (0.55, 0.45), p1: (0.95, 0.05),
                                     p2: (0.3, 0.7)}, threshold=0.5)
    state = review.load_state(db, dataset_id)

    def ids_of(kind, **kw):
        return [e.image_id for e in review.build_queue(db, state, kind, **kw)]

    assert ids_of("disagreement") == [p1, n1]  # most confident disagreement first
    assert ids_of("uncertain") == [n2, p2, n1, p1]
    assert sorted(ids_of("class", class_name="NORMAL")) == sorted(
        v for k, v in ids.items() if k.startswith("IM"))
    assert sorted(ids_of("random", seed=1)) == sorted(ids.values())
    assert ids_of("random", seed=1) == ids_of("random", seed=1)
    entry = review.build_queue(db, state, "uncertain")[0]
    assert (entry.run_ref, entry.predicted) == (state.model_ref, "NORMAL")
    with pytest.raises(ConfigError, match="queue"):
        review.build_queue(db, state, "nope")


def test_sent_to_review_queue_closes_on_relabel_and_reopens_on_undo(db, ds):
    dataset_id, ids = ds
    img = ids["IM-0003-0001.png"]
    with db.session() as s:
        store.send_to_review(session=s, image_id=img, upload_sha256=None, source="predict",
                             run_ref="default", predicted="PNEUMONIA", probs=[0.2, 0.8],
                             sent_by="dr a")
        store.send_to_review(session=s, image_id=None, upload_sha256="ab" * 32, source="compare",
                             run_ref="run:1", predicted=None, probs=None, sent_by="dr a")
    state = review.load_state(db, dataset_id)
    queue = review.build_queue(db, state, "sent")
    assert [(e.key, e.run_ref, e.score, e.predicted) for e in queue] == [
        ("ab" * 32, "run:1", None, None), (img, "default", 0.8, "PNEUMONIA")]  # newest first
    assert state.open_uploads == 1
    rid = relabel(db, img, "PNEUMONIA", "bacteria", run_ref="default", score=0.8)
    assert [e.key for e in review.build_queue(db, review.load_state(db, dataset_id), "sent")] == [
        "ab" * 32]
    review.submit_undo(db, relabel_id=rid, reviewer="alice")
    assert len(review.build_queue(db, review.load_state(db, dataset_id), "sent")) == 2


# -- Uploads sent to review -----------------------------------------------------------------------

SHA = "cd" * 32


def send_upload(db, sha=SHA, predicted="PNEUMONIA", probs=(0.3, 0.7)):
    with db.session() as s:
        return store.send_to_review(session=s, image_id=None, upload_sha256=sha, source="predict",
                                    run_ref="default", predicted=predicted, probs=list(probs),
                                    sent_by="dr a")


def reviewed(db, reviewer, image_ids, shas=(SHA,)):
    """Images (ids) and uploads (sha256) ``reviewer`` has an active relabel of (SQL)."""
    from cxr_core.storage import review_queue

    with db.session() as s:
        return review_queue.reviewed_among(session=s, reviewer=reviewer, image_ids=image_ids,
                                           upload_sha256s=shas)


def upload_relabel(db, label, subtype=None, reviewer="alice", sha=SHA):
    return review.submit_relabel(db, upload_sha256=sha, choice=review.LabelChoice(label, subtype),
                                 reviewer=reviewer, run_ref="default", score=0.7)


def test_upload_relabel_undo_and_current_label(db, ds):
    dataset_id, ids = ds
    send_upload(db)
    with db.session() as s:
        before = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
        assert rel_store.upload_labels(session=s) == {SHA: ("PNEUMONIA", None)}  # the prediction
    r1 = upload_relabel(db, "NORMAL")
    r2 = upload_relabel(db, "PNEUMONIA", "virus", reviewer="bob")
    with db.session() as s:
        assert rel_store.upload_labels(session=s) == {SHA: ("PNEUMONIA", "virus")}
        assert store.list_review_items(session=s) == []  # closed by the relabel
        rows = rel_store.list_upload_relabels(session=s)
    assert [(r.image_id, r.upload_sha256, r.old_label, r.old_subtype, r.new_label) for r in rows] \
        == [(None, SHA, "PNEUMONIA", None, "NORMAL"), (None, SHA, "NORMAL", None, "PNEUMONIA")]
    uid = review.submit_undo(db, relabel_id=r2, reviewer="bob")
    with db.session() as s:
        assert rel_store.upload_labels(session=s) == {SHA: ("NORMAL", None)}  # back to r1
        undo = rel_store.list_upload_relabels(session=s, upload_sha256s=[SHA])[-1]
        assert len(store.list_review_items(session=s)) == 1  # reopened
        # Dataset labels, snapshot and relabel list never see upload rows.
        assert rel_store.label_snapshot(session=s, dataset_id=dataset_id) == before
        assert rel_store.list_relabels(session=s, dataset_id=dataset_id) == []
        assert rel_store.list_relabels(session=s) == []
        assert rel_store.current_labels(session=s, dataset_id=dataset_id) == \
            rel_store.original_labels(session=s, dataset_id=dataset_id)
    assert (undo.id, undo.undo_of, undo.old_label, undo.old_subtype, undo.new_label) == (
        uid, r2, "PNEUMONIA", "virus", "NORMAL")
    review.submit_undo(db, relabel_id=r1, reviewer="alice")
    with db.session() as s:
        assert rel_store.upload_labels(session=s) == {SHA: ("PNEUMONIA", None)}
    state = review.load_state(db, dataset_id)
    assert reviewed(db, "alice", ids.values()) == set()
    assert [e.key for e in review.build_queue(db, state, "sent")] == [SHA]


def test_upload_and_image_relabels_coexist(db, ds):
    dataset_id, ids = ds
    send_upload(db)
    img = ids["IM-0001-0001.png"]
    upload_relabel(db, "NORMAL")
    rid = relabel(db, img, "PNEUMONIA", "virus")
    state = review.load_state(db, dataset_id)
    assert reviewed(db, "alice", ids.values()) == {SHA, img}
    with db.session() as s:
        snap = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
    assert (snap.newest_relabel_id, snap.n_relabels) == (rid, 1)
    info = describe_entry(db, state, review.QueueEntry(None, "default", 0.7, "PNEUMONIA", SHA,
                                                   (0.3, 0.7)))
    assert info.facts == (("Model", "PNEUMONIA (0.300 / 0.700)"), ("Current", "NORMAL"))
    assert info.reviewers == (("alice", "NORMAL"),)


@pytest.mark.parametrize("kwargs, match", [
    ({"upload_sha256": "ef" * 32}, "upload_sha256 must name an upload"),  # never sent
    ({"upload_sha256": SHA, "image_id": 1}, "exactly one"),
    ({"upload_sha256": SHA, "reviewer": " "}, "reviewer"),
])
def test_upload_relabel_rejects_bad_input(db, ds, kwargs, match):
    send_upload(db)
    args = {"reviewer": "alice"} | kwargs
    with pytest.raises(ConfigError, match=match):
        review.submit_relabel(db, choice=review.LabelChoice("NORMAL", None), **args)


def test_relabels_table_checks_exactly_one_target(db, ds):
    from sqlalchemy.exc import IntegrityError

    from db.models import Relabel

    for target in ({}, {"image_id": ds[1]["IM-0001-0001.png"], "upload_sha256": SHA}):
        with pytest.raises(IntegrityError), db.session() as s:
            s.add(Relabel(old_label="A", new_label="B", reviewer="x", note="", **target))


@pytest.mark.parametrize("kwargs, match", [
    ({"image_id": None, "upload_sha256": None}, "exactly one"),
    ({"image_id": 1, "upload_sha256": "ab"}, "exactly one"),
    ({"source": "email"}, "source"),
])
def test_send_to_review_rejects_bad_input(db, kwargs, match):
    args = {"image_id": 1, "upload_sha256": None, "source": "predict", "run_ref": None,
            "predicted": None, "probs": None, "sent_by": "x"} | kwargs
    with db.session() as s, pytest.raises(ConfigError, match=match):
        store.send_to_review(session=s, **args)


def test_queue_view_counts_and_skips():
    queue = [review.QueueEntry(i) for i in (1, 2, 3, 4)]
    view = review.queue_view(queue, reviewed={2}, skipped=[1])
    assert (view.current.image_id, view.n_reviewed, view.n_left, view.n_total) == (3, 1, 3, 4)
    assert review.queue_view(queue, reviewed={1, 2, 3, 4}).current is None


def test_reviewed_by_ignores_undone_rows(db, ds):
    dataset_id, ids = ds
    a = relabel(db, ids["IM-0001-0001.png"], "NORMAL")
    relabel(db, ids["IM-0002-0001.png"], "NORMAL")
    review.submit_undo(db, relabel_id=a, reviewer="alice")
    assert reviewed(db, "alice", ids.values()) == {ids["IM-0002-0001.png"]}
    assert reviewed(db, "bob", ids.values()) == set()


# -- Labels, export, viewing ---------------------------------------------------------------------

def test_label_choices_split_classes_with_subtypes(db, ds):
    state = review.load_state(db, ds[0])
    texts = [c.text for c in review.label_choices(["NORMAL", "PNEUMONIA", "COVID19"],
                                                  state.label_pairs)]
    # A reader need not guess the subtype: pneumonia without one is a button too (issue 27).
    assert texts == ["COVID19", "NORMAL", "PNEUMONIA·bacteria", "PNEUMONIA·virus",
                     "PNEUMONIA (subtype not stated)"]
    assert [c.text for c in review.label_choices(["NORMAL", "PNEUMONIA"], [])] == [
        "NORMAL", "PNEUMONIA"]


def test_export_csv_has_every_row(db, ds):
    dataset_id, ids = ds
    rid = relabel(db, ids["IM-0001-0001.png"], "PNEUMONIA", "virus", note='says "RLL", maybe')
    review.submit_undo(db, relabel_id=rid, reviewer="bob")
    rows = list(csv.DictReader(io.StringIO(export_relabels_csv(db, dataset_id))))
    assert [r["id"] for r in rows] == [str(rid), str(rid + 1)]
    assert rows[0]["note"] == 'says "RLL", maybe'
    assert rows[0]["relpath"].endswith("IM-0001-0001.png")
    assert rows[1]["undo_of"] == str(rid) and rows[0]["undo_of"] == ""
    assert export_relabels_csv(db, dataset_id + 1).count("\n") == 1  # header only


def test_export_csv_includes_upload_rows(db, ds):
    dataset_id, ids = ds
    send_upload(db)
    img_row = relabel(db, ids["IM-0001-0001.png"], "PNEUMONIA", "virus")
    up_row = upload_relabel(db, "NORMAL")
    rows = list(csv.DictReader(io.StringIO(export_relabels_csv(db, dataset_id))))
    assert [r["id"] for r in rows] == [str(img_row), str(up_row)]
    assert (rows[1]["image_id"], rows[1]["relpath"], rows[1]["upload_sha256"]) == ("", SHA, SHA)
    assert (rows[1]["old_label"], rows[1]["new_label"]) == ("PNEUMONIA", "NORMAL")
    assert rows[0]["upload_sha256"] == "" and rows[0]["relpath"].endswith("IM-0001-0001.png")
    with db.session() as s:
        every = rel_store.list_relabels(session=s, dataset_id=dataset_id, include_uploads=True)
    assert relabels_to_csv(every) == export_relabels_csv(db, dataset_id)


def test_render_view_window_level_and_zoom():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    same = review_view.render_view(img, level=128, window=256)
    assert np.abs(same.astype(int) - img).max() <= 1
    narrow = review_view.render_view(img, level=128, window=64)
    assert narrow[0, 0] == 0 and narrow[-1, -1] == 255 and narrow[8, 0] == 128
    zoomed = review_view.render_view(img, zoom=2.0, center=(0.0, 1.0))
    assert zoomed.shape == (8, 8) and zoomed[0, 0] == same[8, 0]


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"zoom": 0.5}])
def test_render_view_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError, match="Received"):
        review_view.render_view(np.zeros((4, 4), np.uint8), **kwargs)


def test_saliency_unavailable_without_model_file(tmp_path):
    dirs = {"run:3": str(tmp_path)}
    assert "run:3 has no model file" in explain.saliency_unavailable("run:3", dirs)
    assert "no model" in explain.saliency_unavailable(None, None)
    (tmp_path / "best.keras").write_bytes(b"x")  # the run layout: <artifact_dir>/best.keras
    assert explain.model_file("run:3", str(tmp_path)) == tmp_path / "best.keras"
    assert explain.saliency_unavailable("run:3", dirs) is None
    assert explain.model_file(str(tmp_path / "best.keras"), None) is not None
    assert explain.model_file("run:4", None) is None
