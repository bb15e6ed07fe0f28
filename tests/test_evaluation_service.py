"""evaluation_service: stored evaluations, operating points, evaluate_model, CLI, comparisons."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_model_store import BINARY_CARD, make_run, save_tiny_model

from cxr_core.stats import reports as ev
from cxr_core.evaluation import compare as cs
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import operating_points as ops
from cxr_core.core.errors import ConfigError, DatasetError, RunError
from cxr_core.storage import open_db
from cxr_core.storage.datasets import list_datasets

REPO = Path(__file__).resolve().parents[1]
LABELS = ["NORMAL", "PNEUMONIA"]


def _scores(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)


def _record(db, run_id, y, p, paths=None, **kw) -> int:
    paths = paths or [f"/x/{i}.jpeg" for i in range(len(y))]
    ref = f"run:{run_id}" if run_id else "f.keras"
    return es.record_evaluation(db, run_id=run_id, model_ref=ref, dataset_id=None, split="test",
                                labels=LABELS, image_ids=[None] * len(y), paths=paths,
                                y_true=y, probs=p, **kw)


# -- record / read back ------------------------------------------------------------------------

def test_record_round_trip_gives_the_same_metrics(cxr_home):
    db = open_db()
    y, p = _scores()
    eval_id = _record(db, None, y, p, threshold=0.4, n_boot=50)
    [info] = es.list_evaluations(db)
    assert info.id == eval_id and info.n == len(y) and info.labels == tuple(LABELS)
    preds = es.load_predictions(db, eval_id)
    assert np.array_equal(preds.y_true, y) and np.allclose(preds.probs[:, 1], p, atol=1e-6)
    again = ev.evaluate(preds.y_true, preds.probs, LABELS, threshold=0.4, n_boot=50).to_dict()
    for key in ("auc", "accuracy", "sensitivity", "specificity", "threshold"):
        assert again[key] == pytest.approx(info.metrics[key], abs=1e-6)
    assert again["confusion_matrix"] == info.metrics["confusion_matrix"]
    assert info.metrics["ci"]["auc"]["n_boot"] == 50


def test_evaluations_list_a_page_without_parsing_metrics(cxr_home):
    db = open_db()
    y, p = _scores()
    ids = [_record(db, None, y, p, n_boot=0) for _ in range(5)]
    page = es.list_evaluations(db, with_metrics=False, limit=2, offset=1)
    assert [e.id for e in page] == ids[::-1][1:3] and all(e.metrics == {} for e in page)
    assert all(e.n == len(y) for e in page)  # the stored size, no prediction rows counted
    assert es.list_evaluations(db, limit=1)[0].metrics["auc"] > 0


def test_images_key_is_order_sensitive():
    a = es.images_key([1, 2, None], ["a", "b", "c"])
    assert a == es.images_key([1, 2, None], ["x", "y", "c"])  # ids win over paths
    assert a != es.images_key([2, 1, None], ["b", "a", "c"])


@pytest.mark.parametrize("kw, match", [
    ({"paths": ["a"]}, "one image id, path"),
    ({"labels": ["A", "B", "C"]}, "probability columns"),
])
def test_record_rejects_inconsistent_outputs(cxr_home, kw, match):
    y, p = _scores(5)
    args = dict(run_id=None, model_ref="f.keras", dataset_id=None, split="", labels=LABELS,
                image_ids=[None] * 5, paths=list("abcde"), y_true=y, probs=p)
    with pytest.raises(ConfigError, match=match):
        es.record_evaluation(open_db(), **{**args, **kw})


# -- operating points --------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_its_target_on_validation(cxr_home, target):
    db = open_db()
    run_id = make_run(db, "r")
    y, p = _scores(seed=int(target * 100))
    op = ops.set_operating_point(db, run_id=run_id, y_true=y, p_pos=p, target=target)
    assert np.mean(p[y == 1] >= op.threshold) >= target
    assert op.sensitivity >= target and op.method == "sensitivity" and op.target == target
    assert ops.get_operating_point(db, run_id) == op


def test_youden_and_record_uses_the_run_operating_point(cxr_home):
    db = open_db()
    run_id = make_run(db, "r")
    y, p = _scores()
    op = ops.set_operating_point(db, run_id=run_id, y_true=y, p_pos=p, method="youden")
    assert op.method == "youden" and op.target is None
    eval_id = _record(db, run_id, y, p, threshold=0.99, n_boot=0)  # the run's point wins
    [info] = es.list_evaluations(db, run_id=run_id)
    assert info.id == eval_id and info.metrics["threshold"] == pytest.approx(op.threshold)


def test_manual_threshold_is_recorded_in_history(cxr_home):
    db = open_db()
    run_id = make_run(db, "r")
    y, p = _scores()
    auto = ops.set_operating_point(db, run_id=run_id, y_true=y, p_pos=p)
    eval_id = _record(db, run_id, y, p, n_boot=0)
    manual = ops.set_manual_threshold(db, run_id=run_id, threshold=0.6, changed_by=" Dr Lee ",
                                     note="too many false positives", evaluation_id=eval_id)
    assert manual.method == "manual" and manual.changed_by == "Dr Lee"
    assert manual.sensitivity == pytest.approx(np.mean(p[y == 1] >= 0.6))
    history = ops.operating_point_history(db, run_id)
    assert [h.id for h in history] == [manual.id, auto.id]  # newest first, nothing overwritten
    assert ops.get_operating_point(db, run_id).threshold == 0.6


@pytest.mark.parametrize("kw, exc, match", [
    ({"changed_by": "  "}, ConfigError, "needs the name"),
    ({"threshold": 1.2}, ConfigError, "must be in"),
    ({"run_id": 999}, RunError, "no run with id 999"),
    ({"evaluation_id": 999}, ConfigError, "not a binary evaluation"),
])
def test_manual_threshold_errors(cxr_home, kw, exc, match):
    db = open_db()
    args = {"run_id": make_run(db, "r"), "threshold": 0.5, "changed_by": "me", **kw}
    with pytest.raises(exc, match=match):
        ops.set_manual_threshold(db, **args)


# -- evaluate_model ----------------------------------------------------------------------------

def test_evaluate_model_on_tiny_dataset(cxr_home, tiny_dataset, tmp_path):
    db = open_db()
    model = save_tiny_model(tmp_path / "m" / "m.keras", card=BINARY_CARD)
    calls = []
    eval_id, report = es.evaluate_model(db, str(model), str(tiny_dataset),
                                        progress=lambda d, t: calls.append((d, t)))
    assert report.n == 18 and report.threshold == 0.3 and report.labels == tuple(LABELS)
    assert int(np.sum(report.confusion_matrix)) == 18 and calls[-1] == (18, 18)
    preds = es.load_predictions(db, eval_id)
    assert all(i is not None for i in preds.image_ids) and Path(preds.paths[0]).is_file()
    assert int(np.sum(preds.y_true)) == 10  # 8 train + 2 test pneumonia
    test_id, test_report = es.evaluate_model(db, str(model), "chest_xray", split="test")
    assert test_report.n == 4
    with pytest.raises(DatasetError, match="for split 'val'"):
        es.evaluate_model(db, str(model), "chest_xray", split="val")


def test_evaluate_split_folder_path_and_comparable_groups(cxr_home, tiny_dataset, tmp_path):
    db = open_db()
    a = save_tiny_model(tmp_path / "a" / "m.keras", seed=1)
    b = save_tiny_model(tmp_path / "b" / "m.keras", seed=2)
    id_a, rep = es.evaluate_model(db, str(a), str(tiny_dataset / "test"))
    id_b, _ = es.evaluate_model(db, str(b), "chest_xray", split="test")
    assert rep.n == 4
    with db.session() as s:  # the whole dataset stays indexed (train rows not dropped)
        assert [d.n_images for d in list_datasets(session=s)] == [18]
    with pytest.raises(DatasetError, match="split folder"):
        es.evaluate_model(db, str(a), str(tiny_dataset / "test"), split="train")
    [group] = cs.comparable_groups(db)
    assert {e.id for e in group.evaluations} == {id_a, id_b}
    assert group.label == "chest_xray [test] · 4 images · 2 models"


def test_evaluate_model_multiclass(cxr_home, tiny_dataset, tmp_path):
    db = open_db()
    model = save_tiny_model(tmp_path / "t" / "m.keras", units=3)
    eval_id, report = es.evaluate_model(db, str(model), str(tiny_dataset))
    assert report.labels == ("NORMAL", "BACTERIA", "VIRUS") and report.threshold is None
    assert report.confusion_matrix.shape == (3, 3) and report.n == 18
    other = save_tiny_model(tmp_path / "u" / "m.keras", units=3, seed=5)
    other_id, _ = es.evaluate_model(db, str(other), str(tiny_dataset))
    cmp = cs.compare_evaluations(db, [eval_id, other_id], n_boot=20)
    assert cmp.thresholds == {n: None for n in cmp.names} and len(cmp.mcnemar_rows()) == 1
    with pytest.raises(ConfigError, match="matched sensitivity needs binary"):
        cs.compare_evaluations(db, [eval_id, other_id], mode="matched")


def test_evaluate_model_on_real_pneumoniamnist(cxr_home, shared_data, tmp_path):
    db = open_db()
    model = save_tiny_model(tmp_path / "m.keras", size=28)
    _, report = es.evaluate_model(db, str(model), str(shared_data / "pneumoniamnist_trainval.npz"),
                                  split="val")
    assert report.n == 524
    assert report.confusion_matrix.sum(axis=1).tolist() == [135, 389]


@pytest.mark.slow
def test_evaluate_model_on_real_fullres_sample(cxr_home, shared_data, tmp_path):
    root = shared_data / "chest_xray_fullres_sample"
    counts = [len(list((root / "train" / c).glob("*.jpeg"))) for c in LABELS]
    model = save_tiny_model(tmp_path / "m.keras", size=32, channels=3)
    _, report = es.evaluate_model(open_db(), str(model), str(root))
    assert report.n == sum(counts) and report.confusion_matrix.sum(axis=1).tolist() == counts


def test_evaluate_cli_json(cxr_home, tiny_dataset, tmp_path):
    model = save_tiny_model(tmp_path / "m" / "m.keras")
    env = {**os.environ, "CXR_HOME": str(cxr_home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cxr_core", "evaluate", "--model", str(model),
                           "--data", str(tiny_dataset), "--split", "test", "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"n", "auc", "accuracy", "sensitivity", "specificity", "threshold",
            "confusion_matrix", "labels"} <= set(out)
    assert out["n"] == 4 and out["labels"] == LABELS and out["threshold"] == 0.5
    assert out["threshold_source"] == "none (0.5)" and set(out["ci"]) == {
        "auc", "sensitivity", "specificity"}
    assert np.array(out["confusion_matrix"]).sum() == 4 and out["evaluation_id"] == 1
    bad = subprocess.run([sys.executable, "-m", "cxr_core", "evaluate", "--model", "default",
                          "--data", str(tiny_dataset), "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if not (REPO / "models" / "default" / "model.keras").is_file():
        assert bad.returncode != 0 and "no default model shipped yet" in bad.stderr
        assert bad.stdout == ""


# -- comparisons -------------------------------------------------------------------------------

def test_compare_at_operating_points_and_matched_sensitivity(cxr_home):
    db = open_db()
    y, p1 = _scores(seed=1)
    _, p2 = _scores(seed=2)
    p2 = np.clip(0.4 * y + 0.6 * np.random.default_rng(3).random(len(y)), 0, 1)
    r1, r2 = make_run(db, "alpha"), make_run(db, "beta")
    ops.set_operating_point(db, run_id=r1, y_true=y, p_pos=p1, target=0.9)
    e1, e2 = _record(db, r1, y, p1, n_boot=0), _record(db, r2, y, p2, n_boot=0)
    cmp = cs.compare_evaluations(db, [e1, e2], n_boot=20)
    assert cmp.names == ("alpha", "beta")
    assert cmp.thresholds["alpha"] == ops.get_operating_point(db, r1).threshold
    assert cmp.threshold_sources["beta"] == "at evaluation" and cmp.thresholds["beta"] == 0.5
    matched = cs.compare_evaluations(db, [e1, e2], mode="matched", target=0.9, n_boot=20)
    for name in matched.names:
        assert matched.reports[name].sensitivity >= 0.9
    [row] = matched.mcnemar_rows()
    assert 0.0 <= row["p_value"] <= 1.0 and row["run A"] == "alpha"
    dis = matched.disagreement_rows()
    assert dis and all(d["alpha"] != d["beta"] for d in dis)
    assert {r["metric"] for r in matched.metrics_rows()} >= {"auc", "sensitivity"}


@pytest.mark.parametrize("which, match", [("one", "compare 2 to 4"),
                                          ("other_images", "same images")])
def test_compare_rejects_incomparable_sets(cxr_home, which, match):
    db = open_db()
    y, p = _scores(20)
    e1 = _record(db, None, y, p, n_boot=0)
    ids = [e1] if which == "one" else [e1, _record(db, None, y, p, n_boot=0,
                                                   paths=[f"/o/{i}" for i in range(20)])]
    with pytest.raises(ConfigError, match=match):
        cs.compare_evaluations(db, ids)


def test_send_disagreement_to_review(cxr_home, tiny_dataset):
    from cxr_core.data.indexing import open_dataset
    from cxr_core.storage import reviews

    db = open_db()
    _, records = open_dataset(db, str(tiny_dataset))
    item = cs.send_disagreement_to_review(db, image_id=records[0].id, run_ref="run:1",
                                          predicted="PNEUMONIA", probs=[0.2, 0.8], sent_by="me")
    with db.session() as s:
        [row] = reviews.list_review_items(session=s)
    assert row.id == item and row.source == "compare"


def test_a_shipped_model_warns_of_the_patients_its_card_says_it_has_seen(cxr_home, tiny_dataset,
                                                                         tmp_path):
    """A model known only by its card (models/default, a .keras file) has no run images in
    this database: its card's training_patients still make the seen-data warning on its own
    training folder. File-name patients are scoped by dataset: on another folder the same
    names are not known to be the same children."""
    from cxr_core.data.provenance import overlap_warning

    db = open_db()
    card = dict(BINARY_CARD, training_patients={"train": ["person1", "person2", "0001"],
                                                "val": ["person100"], "calib": []},
                dataset={"name": "chest_xray", "root": str(tiny_dataset)})
    elsewhere = save_tiny_model(tmp_path / "elsewhere" / "model.keras",
                                card=dict(card, dataset={"root": str(tmp_path / "other")}))
    out = es.evaluate_dataset(db, str(elsewhere), str(tiny_dataset))
    assert out.overlap["recorded"] and out.overlap["train_patients"] == 0
    path = save_tiny_model(tmp_path / "shipped" / "model.keras", card=card)
    out = es.evaluate_dataset(db, str(path), str(tiny_dataset))
    assert out.overlap["recorded"] and out.overlap["train_patients"] == 3
    assert out.overlap["val_patients"] == 1 and out.overlap["calib_patients"] is None
    text = overlap_warning(out.overlap, out.report.n)
    assert "3 patients are shared with its training set" in text
    assert "1 patients are shared with its validation set" in text
    plain = save_tiny_model(tmp_path / "other" / "model.keras", card=dict(BINARY_CARD))
    assert es.evaluate_dataset(db, str(plain), str(tiny_dataset)).overlap is None
