"""Site calibration: a model's operating point re-chosen on a site's labelled sample (with
patient-clustered intervals), recorded as an explicit action, and used for that site only."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from test_model_store import BINARY_CARD, make_run, save_tiny_model

from cxr_core.evaluation import evaluate as es
from cxr_core.jobs import queue
from cxr_core.models import refs
from cxr_core.evaluation import operating_points as ops
from cxr_core.evaluation import site_thresholds
from cxr_core.core.errors import ConfigError
from cxr_core.data.indexing import index_dataset, open_dataset
from cxr_core.storage import open_db
from cxr_core.storage.relabels import add_relabel
from cxr_core.stats.thresholds import choose_threshold
from cxr_core import app

CLASSES = ("NORMAL", "PNEUMONIA")


@pytest.fixture(scope="module")
def site_folder(shared_data, tmp_path_factory) -> Path:
    """24 NORMAL + 24 PNEUMONIA real films (Kermany names: real patients), a second site."""
    root = tmp_path_factory.mktemp("site") / "site_b" / "train"
    for cls in CLASSES:
        files = sorted((shared_data / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        (root / cls).mkdir(parents=True)
        for f in files[5::max(1, len(files) // 24)][:24]:
            (root / cls / f.name).symlink_to(f)
    return root.parent


@pytest.fixture()
def site_run(cxr_home, site_folder, tiny_dataset):
    """A run (a real tiny model with a global operating point) evaluated on site_b."""
    db = open_db()
    index_dataset(db, site_folder, name="site_b")
    index_dataset(db, tiny_dataset, name="tiny")
    run_id = make_run(db, "tiny")
    save_tiny_model(cxr_home / "runs" / str(run_id) / "best.keras", card=BINARY_CARD)
    ops.set_operating_point(db, run_id=run_id, y_true=[0, 1, 0, 1], p_pos=[0.2, 0.6, 0.4, 0.7],
                            changed_by="training", details={"chosen_on": "calibration"})
    evaluation_id, _ = es.evaluate_model(db, f"run:{run_id}", "site_b")
    return db, run_id, evaluation_id


def test_site_sample_gives_a_threshold_with_patient_clustered_intervals(site_run):
    db, run_id, evaluation_id = site_run
    cand = site_thresholds.candidate(db, evaluation_id=evaluation_id, target=0.9, n_boot=200)
    preds = es.load_predictions(db, evaluation_id)
    chosen = choose_threshold(preds.y_true, preds.probs[:, 1], target_sensitivity=0.9)
    assert cand.threshold == pytest.approx(chosen.threshold) and cand.method == "sensitivity"
    assert (cand.n, cand.n_positive, cand.n_negative) == (48, 24, 24)
    assert cand.ci_unit == "patient" and cand.n_patients == 48
    assert cand.sensitivity >= 0.9 and cand.dataset_name == "site_b"
    for key in ("sensitivity", "specificity", "auc"):
        low, high = getattr(cand, f"{key}_ci")
        assert low <= getattr(cand, key) <= high
    assert cand.global_threshold == pytest.approx(0.6)
    assert any("small sample" in w for w in cand.warnings)  # 24 a class: flagged, not refused
    assert site_thresholds.SiteCandidate.from_json(cand.to_json()) == cand


def test_recorded_site_point_is_used_for_that_site_and_the_global_one_elsewhere(site_run):
    db, run_id, evaluation_id = site_run
    cand = site_thresholds.candidate(db, evaluation_id=evaluation_id, target=0.9, n_boot=50)
    with pytest.raises(ConfigError, match="needs the name of who records it"):
        site_thresholds.record(db, cand, changed_by=" ")
    op = site_thresholds.record(db, cand.to_json(), changed_by="dr b", note="local sample, March")
    site_b = open_dataset(db, "site_b")[0].id
    tiny = open_dataset(db, "tiny")[0].id
    assert (op.model_ref, op.dataset_id, op.run_id) == (f"run:{run_id}", site_b, run_id)
    assert (op.changed_by, op.note, op.sample_n, op.chosen_on) == (
        "dr b", "local sample, March", 48, "site")
    assert abs(op.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert op.details["sensitivity_ci"] == cand.sensitivity_ci
    assert ops.get_operating_point(db, run_id).threshold == pytest.approx(0.6)  # global kept
    assert site_thresholds.site_points(db, model_ref=f"run:{run_id}") == [op]
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    here, text = site_thresholds.operating_point_for(db, loaded, site_b)
    assert here.threshold == pytest.approx(cand.threshold) and "site_b" in text
    assert "dr b" in text and here.threshold_source == text
    for elsewhere in (tiny, None):
        other, text = site_thresholds.operating_point_for(db, loaded, elsewhere)
        assert other.threshold == pytest.approx(0.6)
        assert text.startswith("global operating point 0.600") and "calibration" in text


def test_too_small_or_one_class_samples_are_refused(site_run):
    db, run_id, evaluation_id = site_run
    with pytest.raises(ConfigError, match="has no NORMAL or PNEUMONIA image"):
        site_thresholds.candidate(db, evaluation_id=evaluation_id, sample="reviewed")
    info, records = open_dataset(db, "site_b")
    for r in [r for r in records if r.label == "NORMAL"][:12]:  # confirmed on Review
        db.write(lambda s, r=r: add_relabel(session=s, image_id=r.id, new_label=r.label,
                                            new_subtype=r.subtype, reviewer="dr b"))
    with pytest.raises(ConfigError, match="has no PNEUMONIA image"):
        site_thresholds.candidate(db, evaluation_id=evaluation_id, sample="reviewed")
    for r in [r for r in records if r.label == "PNEUMONIA"][:3]:
        db.write(lambda s, r=r: add_relabel(session=s, image_id=r.id, new_label=r.label,
                                            new_subtype=r.subtype, reviewer="dr c"))
    with pytest.raises(ConfigError, match=r"too small .* Received: \{'NORMAL': 12, "
                                          r"'PNEUMONIA': 3\}"):
        site_thresholds.candidate(db, evaluation_id=evaluation_id, sample="reviewed")


def test_the_shipped_default_can_be_site_calibrated_through_a_job(cxr_home, site_folder):
    """The default model has no run: its site row is keyed by model_ref alone."""
    db = open_db()
    index_dataset(db, site_folder, name="site_b")
    info, records = open_dataset(db, "site_b")
    y = np.array([CLASSES.index(r.label) for r in records])
    rng = np.random.default_rng(0)
    p = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.15, len(y)), 0, 1)
    evaluation_id = es.record_evaluation(
        db, run_id=None, model_ref="default", dataset_id=info.id, split="train",
        labels=list(CLASSES), image_ids=[r.id for r in records],
        paths=[r.relpath for r in records], y_true=y, probs=p, n_boot=0)
    job = queue.submit(db, "site_calibration", {"evaluation_id": evaluation_id, "target": 0.95,
                                               "n_boot": 100}, start_worker=False)
    app.run_worker(once=True, kinds="jobs", db=db)
    result = queue.get_job(db, job).result
    assert result["model_ref"] == "default" and result["run_id"] is None
    op = site_thresholds.record(db, result, changed_by="dr d")
    assert op.run_id is None and site_thresholds.site_operating_point(db, "default", info.id) == op
    loaded = refs.load_model_ref("default")
    here, text = site_thresholds.operating_point_for(db, loaded, info.id)
    assert here.threshold == pytest.approx(result["threshold"]) != loaded.threshold
    assert site_thresholds.operating_point_for(db, loaded, None)[0].threshold == loaded.threshold


def test_site_calibration_from_the_cli_prints_then_records_as_the_cli_identity(
        site_run, capsys, monkeypatch):
    from cxr_core import cli

    db, run_id, evaluation_id = site_run
    monkeypatch.setenv("CXR_CLI_IDENTITY", "ds@h.org")
    capsys.readouterr()
    assert cli.main(["site-calibrate", "--evaluation", str(evaluation_id), "--target", "0.9",
                     "--n-boot", "50", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recorded"] is None and shown["candidate"]["n"] == 48
    assert site_thresholds.site_points(db, model_ref=f"run:{run_id}") == []  # printing records nothing
    monkeypatch.setenv("CXR_CLI_ROLES", "reviewer")
    assert cli.main(["site-calibrate", "--evaluation", str(evaluation_id), "--record"]) == 2
    assert "may not site calibration" in capsys.readouterr().err
    monkeypatch.delenv("CXR_CLI_ROLES")
    assert cli.main(["site-calibrate", "--evaluation", str(evaluation_id), "--target", "0.9",
                     "--n-boot", "50", "--record", "--note", "March sample", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [op] = site_thresholds.site_points(db, model_ref=f"run:{run_id}")
    assert out["recorded"]["threshold"] == pytest.approx(op.threshold)
    assert (op.changed_by, op.note) == ("cli:ds@h.org", "March sample")
    assert op.threshold == pytest.approx(shown["candidate"]["threshold"])


def test_a_candidate_says_what_it_gives_on_films_it_was_not_chosen_on(site_run):
    """The in-sample figures flatter; the candidate also carries the cross-fitted ones and how
    their interval narrows as films are confirmed, in confirmation order."""
    db, run_id, evaluation_id = site_run
    recs = open_dataset(db, "site_b")[1]
    rng = np.random.default_rng(1)
    order = [recs[i] for i in rng.permutation(len(recs))[:44]]
    for r in order:
        db.write(lambda s, r=r: add_relabel(session=s, image_id=r.id, new_label=r.label,
                                            new_subtype=r.subtype, reviewer="dr b"))
    cand = site_thresholds.candidate(db, evaluation_id=evaluation_id, sample="reviewed",
                                     n_boot=100)
    crossed = cand.cross_fitted
    assert crossed["method"] == "cross-fitted" and crossed["n"] == 44
    assert crossed["specificity_ci"][0] <= crossed["specificity"] <= crossed["specificity_ci"][1]
    steps = cand.narrowing
    assert [s["n"] for s in steps] == sorted(s["n"] for s in steps) and steps[-1]["n"] == 44
    assert all(s["low"] <= s["specificity"] <= s["high"] for s in steps)
    # The first step is the first films confirmed, cross-fitted on their own.
    from cxr_core.stats.crossfit import cross_fitted_threshold

    preds = es.load_predictions(db, evaluation_id)
    where = {i: k for k, i in enumerate(preds.image_ids)}
    first = [where[r.id] for r in order[:steps[0]["n"]]]
    own = cross_fitted_threshold(preds.y_true[first], preds.probs[first, 1],
                                 [order[k].patient for k in range(len(first))], repeats=5,
                                 n_boot=100)
    assert steps[0]["specificity"] == pytest.approx(own.specificity.estimate)
    small = site_thresholds.candidate(db, evaluation_id=evaluation_id, sample="all",
                                      n_boot=20)
    assert small.cross_fitted["n"] == 48
    assert site_thresholds.SiteCandidate.from_json(cand.to_json()) == cand
