"""Label provenance: every evaluation records its labels; Compare scores all runs against one
explicitly chosen label version; scoring a run on what it trained on is flagged."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_core.evaluation import compare as cs
from cxr_core.evaluation import evaluate as es
from cxr_core.data import provenance
from cxr_core.review import queues as review
from cxr_core.core.errors import ConfigError
from cxr_core.data.indexing import open_dataset
from cxr_core.storage import evals as eval_store
from cxr_core.storage import open_db
from cxr_core.storage import runs as run_store
from test_model_store import make_run, save_tiny_model

LABELS = ["NORMAL", "PNEUMONIA"]


@pytest.fixture()
def two_evals(cxr_home, tiny_dataset, tmp_path):
    """Model A evaluated on the test split, one test image relabelled, then model B."""
    db = open_db()
    a = save_tiny_model(tmp_path / "a" / "m.keras", seed=1)
    b = save_tiny_model(tmp_path / "b" / "m.keras", seed=2)
    first = es.evaluate_dataset(db, str(a), str(tiny_dataset), split="test", n_boot=0)
    _, records = open_dataset(db, str(tiny_dataset))
    target = next(r for r in records if r.split == "test" and r.label == "NORMAL")
    rid = review.submit_relabel(db, image_id=target.id, reviewer="dr a",
                                choice=review.LabelChoice("PNEUMONIA", "virus"))
    second = es.evaluate_dataset(db, str(b), str(tiny_dataset), split="test", n_boot=0)
    return db, first, second, target, rid


def test_each_evaluation_stores_the_labels_it_was_scored_against(two_evals):
    db, first, second, target, rid = two_evals
    a, b = (es.list_evaluations(db)[::-1])
    assert (a.label_source, a.label_relabel_id) == ("current", None)
    assert (b.label_source, b.label_relabel_id) == ("current", rid)
    assert a.label_hash != b.label_hash and a.label_scheme == "binary"
    assert "no relabels" in a.labels_text and f"#{rid}" in b.labels_text
    assert first.truth.hash == a.label_hash and second.truth.relabel_id == rid
    # the relabelled NORMAL image counts as PNEUMONIA in B's stored truth, not in A's
    pa, pb = es.load_predictions(db, a.id), es.load_predictions(db, b.id)
    k = pa.image_ids.index(target.id)
    assert (pa.y_true[k], pb.y_true[k]) == (0, 1)


def test_original_labels_can_be_chosen_and_are_recorded(two_evals, tiny_dataset, tmp_path):
    db, first, *_ = two_evals
    c = save_tiny_model(tmp_path / "c" / "m.keras", seed=3)
    out = es.evaluate_dataset(db, str(c), str(tiny_dataset), split="test", n_boot=0,
                              labels="original")
    info = eval_store_info(db, out.evaluation_id)
    assert info.label_source == "original" and info.label_hash == first.truth.hash
    with pytest.raises(ConfigError, match="labels must be one of"):
        es.evaluate_dataset(db, str(c), str(tiny_dataset), split="test", labels="newest")


def eval_store_info(db, evaluation_id):
    with db.session() as s:
        return eval_store.get_evaluation(session=s, evaluation_id=evaluation_id)


def test_compare_scores_every_run_against_the_chosen_labels(two_evals):
    db, first, second, target, rid = two_evals
    ids = [first.evaluation_id, second.evaluation_id]
    current = cs.compare_evaluations(db, ids, n_boot=0, truth="current")
    original = cs.compare_evaluations(db, ids, n_boot=0, truth="original")
    k = current.image_ids.index(target.id)
    assert current.y_true[k] == 1 and original.y_true[k] == 0  # one truth for both runs
    assert current.truth_source == "current" and f"#{rid}" in current.truth_text
    assert original.truth_text.startswith("original labels")
    for cmp in (current, original):  # confusion matrices add up to the chosen truth
        for name in cmp.names:
            assert cmp.reports[name].confusion_matrix.sum(axis=1).tolist() == \
                np.bincount(cmp.y_true, minlength=2).tolist()
    rows = current.provenance_rows
    assert [r["compared against"] for r in rows] == [current.truth_text] * 2
    assert {r["stored against"] for r in rows} == {
        e.labels_text for e in current.evaluations.values()}
    with pytest.raises(ConfigError, match="labels must be one of"):
        cs.compare_evaluations(db, ids, truth="stored")


def test_compare_leaves_out_images_without_a_class_under_the_chosen_labels(
        cxr_home, tiny_dataset, tmp_path):
    db = open_db()
    a = save_tiny_model(tmp_path / "a" / "m.keras", units=3, seed=1)
    b = save_tiny_model(tmp_path / "b" / "m.keras", units=3, seed=2)
    e1 = es.evaluate_dataset(db, str(a), str(tiny_dataset), n_boot=0)
    e2 = es.evaluate_dataset(db, str(b), str(tiny_dataset), n_boot=0)
    _, records = open_dataset(db, str(tiny_dataset))
    virus = next(r for r in records if r.subtype == "virus")
    review.submit_relabel(db, image_id=virus.id, reviewer="dr a",  # no subtype: no 3-class
                          choice=review.LabelChoice("PNEUMONIA", None))
    cmp = cs.compare_evaluations(db, [e1.evaluation_id, e2.evaluation_id], n_boot=0)
    assert cmp.dropped == 1 and virus.id not in cmp.image_ids
    assert len(cmp.y_true) == e1.report.n - 1


def test_unindexed_evaluations_need_identical_stored_labels(cxr_home):
    db = open_db()
    y = np.array([0, 1] * 10)
    p = np.linspace(0.05, 0.95, 20)
    paths = [f"/x/{i}.jpeg" for i in range(20)]

    def record(y_true):
        return es.record_evaluation(db, run_id=None, model_ref="f.keras", dataset_id=None,
                                    split="test", labels=LABELS, image_ids=[None] * 20,
                                    paths=paths, y_true=y_true, probs=p, n_boot=0)
    e1, e2 = record(y), record(y)
    cmp = cs.compare_evaluations(db, [e1, e2], n_boot=0)
    assert cmp.truth_source == "stored" and "not indexed" in cmp.truth_text
    flipped = y.copy()
    flipped[0] = 1
    e3 = record(flipped)
    with pytest.raises(ConfigError, match="scored against different labels"):
        cs.compare_evaluations(db, [e1, e3], n_boot=0)


def test_record_refuses_a_truth_that_does_not_match_y(cxr_home):
    db = open_db()
    truth = provenance.Truth("current", "binary", None, "h", np.array([0, 1]))
    with pytest.raises(ConfigError, match="does not match"):
        es.record_evaluation(db, run_id=None, model_ref="f.keras", dataset_id=None,
                             split="test", labels=LABELS, image_ids=[1, 2], paths=["a", "b"],
                             y_true=np.array([1, 1]), probs=np.array([0.2, 0.8]), truth=truth)


def test_run_overlap_counts_images_patients_and_identical_files(cxr_home, tiny_dataset):
    db = open_db()
    _, records = open_dataset(db, str(tiny_dataset))
    by = {r.relpath.rsplit("/", 1)[1]: r for r in records}
    run_id = make_run(db, "r")
    with db.session() as s:
        assert not eval_store.run_overlap(session=s, run_id=run_id, image_ids=[1]).recorded
    train = [by["IM-0001-0001.jpeg"].id, by["person1_bacteria_1.jpeg"].id]
    val = [by["person2_virus_3.jpeg"].id]
    db.write(lambda s: run_store.set_run_images(session=s, run_id=run_id, train_ids=train,
                                                val_ids=val))
    evaluated = [by["IM-0001-0002.jpeg"].id, by["person1_bacteria_1.jpeg"].id,
                 by["person2_virus_3.jpeg"].id, by["IM-0100-0001.jpeg"].id]
    with db.session() as s:
        ov = eval_store.run_overlap(session=s, run_id=run_id, image_ids=evaluated)
    assert (ov.train_images, ov.val_images) == (1, 1)
    assert (ov.train_patients, ov.val_patients) == (2, 1)  # IM-0001 and person1; person2
    text = provenance.overlap_warning(ov.to_dict(), 4)
    assert "1 of the 4 images were in its training set" in text
    assert "2 patients are shared with its training set" in text
    assert provenance.overlap_warning({"recorded": True}, 4) is None
    assert provenance.overlap_warning(None, 4) is None
    db.write(lambda s: run_store.set_run_images(session=s, run_id=run_id, train_ids=val,
                                                val_ids=[]))  # a resumed run: replaced
    with db.session() as s:
        assert eval_store.run_overlap(session=s, run_id=run_id,
                                      image_ids=evaluated).train_images == 1
