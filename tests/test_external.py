"""External validation (issue 25): the external flag, patients scoped by dataset, cross-fitted
site thresholds, and external figures that never use images the model saw."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_model_store import make_run

from cxr_core.cli import main
from cxr_core.core.errors import ConfigError
from cxr_core.core.records import scoped_patient
from cxr_core.data.indexing import index_dataset, list_datasets
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation.card_measured import run_measured
from cxr_core.evaluation.external import external_entry
from cxr_core.models.card import card_markdown, entry_title, external_text, headline
from cxr_core.stats.crossfit import cross_fitted_threshold
from cxr_core.storage import evals as eval_store
from cxr_core.storage import open_db
from cxr_core.storage import runs as run_store
from cxr_core.storage.datasets import list_images

LABELS = ["NORMAL", "PNEUMONIA"]


# -- Cross-fitted site thresholds (pure) -----------------------------------------------------

def _scores(n: int, seed: int = 0, sep: float = 0.35):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(sep * y + (1 - sep) * rng.random(n), 0, 1)


def test_a_separable_site_gets_a_perfect_cross_fitted_threshold():
    y = np.array([0] * 30 + [1] * 30)
    p = np.r_[np.linspace(0.0, 0.4, 30), np.linspace(0.6, 1.0, 30)]
    cf = cross_fitted_threshold(y, p, n_boot=50)
    # The highest threshold reaching 0.95 on the choosing folds may miss a scored positive.
    assert cf.specificity.estimate == 1.0 and 0.9 <= cf.sensitivity.estimate <= 1.0
    assert cf.n == 60 and cf.n_patients == 60 and cf.folds == 5 and cf.repeats == 20
    assert 0.6 <= cf.threshold <= 0.7
    assert set(cf.to_json()) >= {"specificity", "specificity_ci", "sensitivity", "folds",
                                 "repeats", "n_patients", "target_sensitivity"}


def test_out_of_sample_sensitivity_lands_near_the_target_with_an_interval():
    y, p = _scores(2000, seed=3)
    cf = cross_fitted_threshold(y, p, n_boot=200, repeats=5)
    assert abs(cf.sensitivity.estimate - 0.95) < 0.02
    assert cf.specificity.low < cf.specificity.estimate < cf.specificity.high
    assert cf.sensitivity.low <= 0.95 <= cf.sensitivity.high + 0.01


def test_cross_fitting_is_seeded_and_counts_patients():
    y, p = _scores(200, seed=1)
    groups = [f"p{i // 2}" for i in range(200)]  # two films per patient
    a = cross_fitted_threshold(y, p, groups, n_boot=50, seed=7)
    b = cross_fitted_threshold(y, p, groups, n_boot=50, seed=7)
    assert a == b and a.n_patients == 100
    assert cross_fitted_threshold(y, p, groups, n_boot=50, seed=8).per_repeat != a.per_repeat


@pytest.mark.parametrize("n_normal, match", [(9, "at least 10 images of each class"),
                                             (0, "every class must occur")])
def test_a_site_sample_with_too_few_of_a_class_is_refused(n_normal, match):
    y = np.array([0] * n_normal + [1] * 40)
    p = np.linspace(0, 1, y.size)
    with pytest.raises(ConfigError, match=match):
        cross_fitted_threshold(y, p)


# -- Patients scoped by dataset ---------------------------------------------------------------

def test_file_name_patients_are_scoped_by_dataset_metadata_ones_link_datasets():
    assert scoped_patient(1, "person1003") != scoped_patient(2, "person1003")
    assert scoped_patient(1, "person1003") == scoped_patient(1, "person1003")
    assert scoped_patient(1, "pid-0123456789abcdef") == scoped_patient(2, "pid-0123456789abcdef")
    assert scoped_patient(1, "dcm-0123456789abcdef") == "dcm-0123456789abcdef"
    assert scoped_patient(1, None) is None and scoped_patient(1, "") is None


# -- The external flag --------------------------------------------------------------------------

def test_the_external_flag_is_stored_kept_and_cleared(cxr_home, tiny_dataset):
    db = open_db()
    assert index_dataset(db, tiny_dataset).external is False
    assert index_dataset(db, tiny_dataset, external=True).external is True
    assert index_dataset(db, tiny_dataset).external is True  # None keeps what it was
    assert [d.external for d in list_datasets(db)] == [True]
    assert index_dataset(db, tiny_dataset, external=False).external is False


def test_cli_index_external_prints_and_stores_the_flag(cxr_home, tiny_dataset, capsys):
    assert main(["index", str(tiny_dataset), "--name", "site", "--external", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["external"] is True
    assert main(["index", str(tiny_dataset), "--name", "site", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["external"] is True
    assert main(["index", str(tiny_dataset), "--name", "site", "--not-external", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["external"] is False


def test_a_run_config_lists_only_datasets_flagged_external(cxr_home, tiny_dataset, tmp_path):
    from cxr_core.training.service import make_config

    db = open_db()
    index_dataset(db, tiny_dataset, name="plain")
    with pytest.raises(ConfigError, match="not flagged as external"):
        make_config(db, {"recipe": "cpu128", "dataset": "plain", "external": ["plain"]})
    site = tmp_path / "site"
    shutil.copytree(tiny_dataset, site)
    index_dataset(db, site, name="site", external=True)
    cfg = make_config(db, {"recipe": "cpu128", "dataset": "plain", "external": ["site"]})
    assert cfg.external == ("site",) and cfg.to_dict()["external"] == ["site"]
    with pytest.raises(ConfigError, match="external must be a list"):
        make_config(db, {"recipe": "cpu128", "dataset": "plain", "external": "site"})


# -- External figures ---------------------------------------------------------------------------

@pytest.fixture()
def site_and_run(cxr_home, shared_data, tmp_path):
    """The real external sample indexed as external; a run whose training images include a
    byte-identical copy of one site film and a film named like another site patient."""
    db = open_db()
    site = index_dataset(db, shared_data / "chest_xray_224_external", name="site",
                         external=True)
    with db.session() as s:
        site_recs = list_images(session=s, dataset_id=site.dataset_id)
    copied, namesake = site_recs[0], next(r for r in site_recs[1:]
                                          if r.patient and r.patient != site_recs[0].patient)
    train = tmp_path / "train"
    (train / copied.label).mkdir(parents=True)
    shutil.copy(shared_data / "chest_xray_224_external" / copied.relpath,
                train / copied.label / "copy_of_site.jpeg")
    other = next(r for r in site_recs if r.label != copied.label)
    (train / other.label).mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_data / "chest_xray_224" / "train" / "NORMAL" / "IM-0115-0001.jpeg",
                train / other.label / f"{namesake.patient}_bacteria_9999.jpeg")
    own = index_dataset(db, train, name="train")
    with db.session() as s:
        train_ids = [r.id for r in list_images(session=s, dataset_id=own.dataset_id)]
    run_id = make_run(db, "r")
    db.write(lambda s: run_store.set_run_images(session=s, run_id=run_id, train_ids=train_ids,
                                                val_ids=[]))
    y = np.array([LABELS.index("NORMAL" if r.label == "NORMAL" else "PNEUMONIA")
                  for r in site_recs])
    rng = np.random.default_rng(0)
    p = np.clip(0.45 * y + 0.55 * rng.random(y.size), 0, 1)
    ev_id = es.record_evaluation(
        db, run_id=run_id, model_ref=f"run:{run_id}", dataset_id=site.dataset_id, split="",
        labels=LABELS, image_ids=[r.id for r in site_recs],
        paths=[r.relpath for r in site_recs], y_true=y, probs=p, threshold=0.5, n_boot=0,
        groups=[r.patient for r in site_recs])
    return db, run_id, ev_id, site, copied, namesake


def test_external_figures_leave_out_only_what_the_model_saw(site_and_run):
    db, run_id, ev_id, site, copied, namesake = site_and_run
    with db.session() as s:
        info = eval_store.get_evaluation(session=s, evaluation_id=ev_id)
    assert info.dataset_external
    entry = external_entry(db, info, n_boot=50)
    # The byte-identical copy is left out; the same file-name patient in another dataset is
    # not known to be the same child, so it stays.
    assert entry["excluded_seen"] == 1 and entry["n"] == 200
    assert entry["role"] == "external" and entry["dataset"] == "site"
    assert 0.5 < entry["auc"] <= 1 and entry["auc_ci"][0] <= entry["auc"]
    assert entry["sensitivity"] is not None and not entry["stored_threshold_chosen_here"]
    site_thr = entry["site_threshold"]
    assert site_thr["method"] == "cross-fitted" and site_thr["folds"] == 5
    assert site_thr["specificity_ci"][0] <= site_thr["specificity"] <= site_thr["specificity_ci"][1]
    measured = run_measured(db, run_id)
    assert [e["role"] for e in measured] == ["external"]


def test_a_cards_site_threshold_is_known_on_its_films_under_another_dataset_name(site_and_run):
    """The shipped card's operating point was chosen on `chest_xray_224_external`; the same
    folder indexed here as "site" (as a benchmark does) is the same films: chosen here. A card
    naming another site's dataset is not."""
    from pathlib import Path

    from cxr_core.evaluation.external import stored_threshold_chosen_here

    db, _, ev_id, site, *_ = site_and_run
    with db.session() as s:
        info = eval_store.get_evaluation(session=s, evaluation_id=ev_id)
    assert info.dataset_name == "site"
    shipped = json.loads((Path(__file__).parents[1] / "models" / "default" /
                          "model_card.json").read_text())
    assert shipped["operating_point"]["dataset"] == "chest_xray_224_external"
    assert stored_threshold_chosen_here(db, info, shipped)
    other = {"operating_point": {**shipped["operating_point"], "dataset": "hospital-b"}}
    assert not stored_threshold_chosen_here(db, info, other)
    calibrated = {"operating_point": {"threshold": 0.5, "chosen_on": "calibration"}}
    assert not stored_threshold_chosen_here(db, info, calibrated)


def test_a_threshold_chosen_on_the_site_is_not_reported_at_that_site(site_and_run):
    from cxr_core.evaluation import site_thresholds

    db, run_id, ev_id, site, *_ = site_and_run
    cand = site_thresholds.candidate(db, evaluation_id=ev_id, n_boot=20)
    site_thresholds.record(db, cand, changed_by="lead@h.org")
    model = f"run:{run_id}"
    with db.session() as s:
        op = eval_store.site_operating_point(session=s, model_ref=model,
                                             dataset_id=site.dataset_id)
    with db.session() as s:
        rows = eval_store.get_predictions(session=s, evaluation_id=ev_id)
    ev2 = es.record_evaluation(
        db, run_id=run_id, model_ref=model, dataset_id=site.dataset_id, split="",
        labels=LABELS, image_ids=list(rows.image_ids), paths=list(rows.paths),
        y_true=rows.y_true, probs=rows.probs, threshold=op.threshold, n_boot=0)
    with db.session() as s:
        info = eval_store.get_evaluation(session=s, evaluation_id=ev2)
    entry = external_entry(db, info, n_boot=20)
    assert entry["stored_threshold_chosen_here"]
    assert entry["sensitivity"] is None and entry["specificity"] is None
    assert entry["site_threshold"]["specificity"] is not None  # cross-fitted stays
    assert "chosen on this sample" in external_text(entry)


def test_external_figures_lead_the_headline_and_the_card():
    ext = {"role": "external", "dataset": "site", "split": "(all)", "n": 200,
           "n_patients": 142, "auc": 0.95, "auc_ci": [0.92, 0.97], "sensitivity": 0.97,
           "sensitivity_ci": [0.94, 0.99], "specificity": 0.75, "specificity_ci": [0.65, 0.84],
           "threshold": 0.7, "stored_threshold_chosen_here": False,
           "threshold_chosen_here": False, "excluded_seen": 1,
           "site_threshold": {"method": "cross-fitted", "target_sensitivity": 0.95, "folds": 5,
                              "repeats": 20, "sensitivity": 0.95, "sensitivity_ci": [0.9, 0.98],
                              "specificity": 0.8, "specificity_ci": [0.72, 0.89]}}
    temporal = {"role": "selection", "validation": "temporal", "dataset": "train",
                "split": "val", "n": 549, "auc": 0.998, "threshold_chosen_here": False}
    heads = headline([temporal, ext])
    assert [h["role"] for h in heads] == ["external", "selection"]
    assert entry_title(ext) == "at a new site: site [(all)], 200 images, 142 patients"
    text = external_text(ext, selected_on=["site"])
    assert "AUC 0.950 [0.920, 0.970]" in text and "specificity 0.800 [0.720, 0.890]" in text
    assert "1 image(s) the model trained" in text and "recipe was chosen on this sample" in text
    md = card_markdown({"labels": LABELS, "measured": [temporal, ext],
                        "recipe_selected_on": ["site"], "notes": ["A plain note."]})
    assert md.index("at a new site") < md.index("temporal validation")
    assert "A plain note." in md
    refused = dict(ext, site_threshold={"refused": "a site threshold needs at least 10"})
    assert "no site threshold (a site threshold needs at least 10)" in external_text(refused)


def test_a_shipped_card_knows_its_training_films_by_content_anywhere(cxr_home, tiny_dataset,
                                                                     tmp_path):
    """Byte-identical films are the same films whatever the dataset (the demo films are
    copies of the shipped model's training films): the card's content hashes say so."""
    import hashlib

    from test_model_store import BINARY_CARD, save_tiny_model

    db = open_db()
    files = sorted(tiny_dataset.rglob("*.jpeg"))[:2]
    card = dict(BINARY_CARD, training_sha256=[hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                                              for f in files])
    model = save_tiny_model(tmp_path / "shipped" / "model.keras", card=card)
    out = es.evaluate_dataset(db, str(model), str(tiny_dataset))
    assert out.overlap["same_content"] == 2 and out.overlap["train_patients"] == 0
