"""The site round (issue 25 item 3): a next training round that adds a site's images confirmed
on Review, with their current labels, split by patient so no site patient is in two parts."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core.core.errors import DatasetError
from cxr_core.core.records import scoped_patient
from cxr_core.data.indexing import index_dataset
from cxr_core.review.queues import LabelChoice, submit_relabel
from cxr_core.storage import open_db
from cxr_core.storage.datasets import list_images
from cxr_core.training import inputs
from cxr_core.training.config import TrainConfig

CLASSES = ("NORMAL", "PNEUMONIA")
BASE = dict(recipe="cpu128", model="small3_50", image_size=32, epochs=1, batch_size=16,
            augment="zoom_shift", balancing="class_weights", calibration_fraction=0.3)


@pytest.fixture()
def two_sites(cxr_home, shared_data, tmp_path):
    """Our training folder (32 + 32 train films) and a new site (the first 20 + 20 films of
    the external sample, one of them a byte-identical copy of a training film)."""
    train = tmp_path / "train" / "train"
    for cls in CLASSES:
        files = sorted((shared_data / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        (train / cls).mkdir(parents=True)
        for f in files[::max(1, len(files) // 32)][:32]:
            (train / cls / f.name).symlink_to(f)
    site = tmp_path / "site"
    for cls in CLASSES:
        (site / cls).mkdir(parents=True)
        for f in sorted((shared_data / "chest_xray_224_external" / cls).glob("*.jpeg"))[:20]:
            (site / cls / f.name).symlink_to(f)
    twin = next((train / "NORMAL").iterdir())
    shutil.copy(twin, site / "NORMAL" / "copy_of_a_training_film.jpeg")
    db = open_db()
    index_dataset(db, train.parent, name="ours")
    info = index_dataset(db, site, name="site", external=True)
    with db.session() as s:
        recs = list_images(session=s, dataset_id=info.dataset_id)
    return db, recs


def _confirm(db, recs, n: int, flip: int = 0) -> dict[int, str]:
    """Confirm ``n`` site films on Review, correcting the first ``flip`` of them; returns
    id -> the label a reader gave."""
    given = {}
    for k, r in enumerate(recs[:n]):
        label = r.label if k >= flip else ("NORMAL" if r.label != "NORMAL" else "PNEUMONIA")
        submit_relabel(db, image_id=r.id, choice=LabelChoice(label, None), reviewer="dr.a")
        given[r.id] = label
    return given


def test_the_next_round_takes_exactly_the_confirmed_films_with_their_current_labels(two_sites):
    db, recs = two_sites
    site = [r for r in recs if "copy_of" not in r.relpath]
    rng = np.random.default_rng(0)
    picked = [site[i] for i in rng.permutation(len(site))[:24]]
    given = _confirm(db, picked, 24, flip=3)
    twin = next(r for r in recs if "copy_of" in r.relpath)
    submit_relabel(db, image_id=twin.id, choice=LabelChoice("NORMAL", None), reviewer="dr.a")
    cfg = TrainConfig.from_dict({**BASE, "dataset": "ours",
                                 "extra": [{"dataset": "site", "repeat": 3}]})
    prep = inputs.prepare_data(db, cfg)
    data = prep.data
    site_ids = {r.id for r in recs}
    taken = [i for i in data.image_ids if i in site_ids] + [
        r.id for r in prep.calibration if r.id in site_ids]
    assert sorted(taken) == sorted(given)  # the confirmed ones; the twin of a training film not
    (extra,) = prep.extra
    assert extra["left_out_duplicates"] == 1 and extra["repeat"] == 3
    assert extra["train"] + extra["val"] + extra["calibration"] == 24
    for i, y, is_val, rep in zip(data.image_ids, data.labels, data.is_val, data.train_repeat):
        if i in given:  # current labels: the three corrections included
            assert CLASSES[y] == given[i]
            assert rep == (1 if is_val else 3)
        else:
            assert rep == 1
    by_id = {r.id: r for r in recs}
    parts = {"train": {i for i, v in zip(data.image_ids, data.is_val) if i in given and not v},
             "val": {i for i, v in zip(data.image_ids, data.is_val) if i in given and v},
             "calib": {r.id for r in prep.calibration if r.id in given}}
    patients = {k: {scoped_patient(by_id[i].dataset_id, by_id[i].patient) for i in v}
                for k, v in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["calib"]
    assert not patients["val"] & patients["calib"]
    assert data.label_snapshot != prep.snapshot.hash  # the site's labels are in the identity


def test_images_all_takes_every_labelled_site_film_and_none_confirmed_is_refused(two_sites):
    db, recs = two_sites
    none = TrainConfig.from_dict({**BASE, "dataset": "ours", "extra": ["site"]})
    with pytest.raises(DatasetError, match="confirm some on Review"):
        inputs.prepare_data(db, none)
    every = TrainConfig.from_dict({**BASE, "dataset": "ours",
                                   "extra": [{"dataset": "site", "images": "all"}]})
    prep = inputs.prepare_data(db, every)
    assert sum(prep.extra[0][k] for k in ("train", "val", "calibration")) == 40
    assert prep.data.train_repeat is not None and set(prep.data.train_repeat) == {1}


def test_a_next_round_trains_and_its_card_records_the_site_images(two_sites, tmp_path):
    """Through the worker: the run trains on our films plus the confirmed site films."""
    import json

    from cxr_core import app
    from cxr_core.storage import runs as store
    from cxr_core.training import service

    db, recs = two_sites
    _confirm(db, [r for r in recs if "copy_of" not in r.relpath], 30)
    cfg = service.make_config(db, {**BASE, "dataset": "ours",
                                   "extra": [{"dataset": "site", "repeat": 2}]})
    rid = service.queue_run(db, cfg)
    (outcome,) = app.run_worker(once=True, db=db)["runs"]
    assert outcome["status"] == "finished", outcome
    with db.session() as s:
        run = store.get_run(session=s, run_id=rid)
        logs = store.get_logs(session=s, run_id=rid)
    card = json.loads((Path(run.artifact_dir) / "model_card.json").read_text())
    (extra,) = card["extra_data"]
    assert extra["dataset"] == "site" and extra["repeat"] == 2
    assert card["training_config"]["extra"] == [{"dataset": "site", "images": "reviewed",
                                                 "repeat": 2}]
    assert any("extra 'site': train" in line.message for line in logs)


# -- Review's new-site queue -------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def site_db(request, cxr_home):
    return open_db() if request.param == "sqlite" else open_db(
        url=request.getfixturevalue("pg_url"))


def _site_with_scores(db, tmp_path, model_ref="default"):
    """Six patients, 1-3 films each, scored by a model without a run (the shipped default)."""
    import json

    from test_review import make_dataset

    from cxr_core.review import queues as review
    from db.models import EvalPrediction, Evaluation
    from test_review import prediction_columns

    files = {"NORMAL": ["IM-0001-0001.png", "IM-0001-0002.png", "IM-0002-0001.png"],
             "PNEUMONIA": ["person10_bacteria_1.png", "person10_bacteria_2.png",
                           "person10_virus_3.png", "person11_virus_4.png",
                           "person12_bacteria_5.png", "person13_bacteria_6.png"]}
    rep = index_dataset(db, make_dataset(tmp_path / "site", files), name="site",
                        external=True)
    with db.session() as s:
        ids = {r.relpath.split("/")[-1]: r.id for r in list_images(session=s,
                                                                    dataset_id=rep.dataset_id)}
    # P(pneumonia); the threshold is 0.5: distance to it orders "uncertain"
    p = {"IM-0001-0001.png": 0.52, "IM-0001-0002.png": 0.55, "IM-0002-0001.png": 0.10,
         "person10_bacteria_1.png": 0.49, "person10_bacteria_2.png": 0.51,
         "person10_virus_3.png": 0.47, "person11_virus_4.png": 0.60,
         "person12_bacteria_5.png": 0.95, "person13_bacteria_6.png": 0.70}
    labels = ("NORMAL", "PNEUMONIA")
    with db.session() as s:
        ev = Evaluation(run_id=None, model_ref=model_ref, dataset_id=rep.dataset_id, split="",
                        labels_json=json.dumps(labels), images_key="k",
                        metrics_json=json.dumps({"threshold": 0.5}))
        s.add(ev)
        s.flush()
        s.add_all([EvalPrediction(evaluation_id=ev.id, image_id=ids[f], y_true=0,
                                  probs_json=json.dumps([1 - v, v]),
                                  **prediction_columns([1 - v, v], labels))
                   for f, v in p.items()])
    return db, rep.dataset_id, ids, review


def test_the_new_site_queue_puts_one_film_per_patient_first_most_uncertain_first(site_db,
                                                                                 tmp_path):
    db, dataset_id, ids, review = _site_with_scores(site_db, tmp_path)
    state = review.load_state(db, dataset_id)  # the shipped model's evaluation feeds it
    assert state.model_ref == "default" and state.threshold == 0.5
    assert [(r.model_ref, r.run_id, r.n_predictions) for r in state.runs] == [("default", None, 9)]
    order = [e.image_id for e in review.build_queue(db, state, "new_site")]
    name = {v: k for k, v in ids.items()}
    assert [name[i] for i in order] == [
        # each patient's most uncertain film, by distance to 0.5
        "person10_bacteria_1.png", "IM-0001-0001.png", "person11_virus_4.png",
        "person13_bacteria_6.png", "IM-0002-0001.png", "person12_bacteria_5.png",
        # then the second films, then the third
        "person10_bacteria_2.png", "IM-0001-0002.png", "person10_virus_3.png"]
    uncertain = [name[i] for i in
                 (e.image_id for e in review.build_queue(db, state, "uncertain"))]
    assert uncertain[:3] == ["person10_bacteria_1.png", "person10_bacteria_2.png",
                             "IM-0001-0001.png"]  # one patient's films first there


def test_a_reviewed_film_does_not_let_its_patient_jump_the_new_site_queue(site_db, tmp_path):
    db, dataset_id, ids, review = _site_with_scores(site_db, tmp_path)
    state = review.load_state(db, dataset_id, "default")
    first = review.next_in_queue(db, state, "new_site", reviewer="dr.a")
    assert first.current.image_id == ids["person10_bacteria_1.png"] and first.n_total == 9
    assert first.current.run_ref == "default" and first.current.score == pytest.approx(0.49)
    submit_relabel(db, image_id=first.current.image_id,
                   choice=LabelChoice("PNEUMONIA", "bacteria"), reviewer="dr.a")
    second = review.next_in_queue(db, state, "new_site", reviewer="dr.a")
    assert second.current.image_id == ids["IM-0001-0001.png"]  # not person10's second film
    assert (second.n_reviewed, second.n_left) == (1, 8)


# -- Compare: base and next round at their site thresholds, on the unconfirmed films -----------

def test_compare_puts_two_models_side_by_side_on_the_unconfirmed_films(two_sites):
    from test_model_store import make_run

    from cxr_core.evaluation import compare as cs
    from cxr_core.evaluation import evaluate as es
    from cxr_core.evaluation import site_thresholds

    db, recs = two_sites
    rng = np.random.default_rng(2)
    y = np.array([0 if r.label == "NORMAL" else 1 for r in recs])
    evals = []
    for name, sep in (("base", 0.3), ("next", 0.6)):
        run_id = make_run(db, name)
        p = np.clip(sep * y + (1 - sep) * rng.random(y.size), 0, 1)
        evals.append(es.record_evaluation(
            db, run_id=run_id, model_ref=f"run:{run_id}", dataset_id=recs[0].dataset_id,
            split="", labels=list(CLASSES), image_ids=[r.id for r in recs],
            paths=[r.relpath for r in recs], y_true=y, probs=p, threshold=0.5, n_boot=0))
    with pytest.raises(Exception, match="no site threshold recorded"):
        cs.compare_evaluations(db, evals, mode="site", n_boot=0)
    thresholds = []
    for ev_id in evals:
        cand = site_thresholds.candidate(db, evaluation_id=ev_id, n_boot=20)
        thresholds.append(site_thresholds.record(db, cand, changed_by="dr.a").threshold)
    confirmed = _confirm(db, recs, 15)
    cmp = cs.compare_evaluations(db, evals, mode="site", n_boot=0, images="unconfirmed")
    assert list(cmp.thresholds.values()) == pytest.approx(thresholds)
    assert all(src.startswith("site threshold (dr.a") for src in cmp.threshold_sources.values())
    assert cmp.confirmed_left_out == 15 and len(cmp.y_true) == len(recs) - 15
    assert not set(cmp.image_ids) & set(confirmed)
    everything = cs.compare_evaluations(db, evals, mode="site", n_boot=0)
    assert len(everything.y_true) == len(recs) and everything.confirmed_left_out == 0
    ci = cs.comparison_intervals(db, evals, mode="site", target=0.95, truth="current",
                                 as_of_relabel_id=None, thresholds=cmp.thresholds, n_boot=20,
                                 images="unconfirmed")
    assert ci["n_boot"] == 20 and ci["rows"]


# -- the measured round, as Compare shows it ------------------------------------------------

def _measured_round() -> dict:
    """The bench's JSON shape (bench/site_round.py), two budgets."""
    fig = {"sensitivity": 0.95, "sensitivity_ci": [0.9, 0.99], "specificity": 0.8,
           "specificity_ci": [0.7, 0.88], "accuracy": 0.9, "n": 200}
    return {"bench": "site-round", "site": "/data/site", "base": "default", "folds": 3,
            "wall_s": 12.0, "budgets": [
                {"budget": 0, "n_scored": 200, "base_stored": fig, "base_crossfit": fig,
                 "next_own": fig, "next_crossfit": fig,
                 "base_site": {"refused": "under 10 films of a class"}},
                {"budget": 50, "n_scored": 200, "base_stored": fig, "base_crossfit": fig,
                 "next_own": fig, "next_crossfit": {**fig, "specificity": 0.86},
                 "base_site": {**fig, "specificity": 0.83}}]}


def test_a_measured_site_round_reads_back_as_long_form_rows(tmp_path):
    import json

    from cxr_core.evaluation import site_round

    assert site_round.measured(tmp_path) is None  # none recorded: nothing to show
    (tmp_path / "site_round.json").write_text(json.dumps(_measured_round()))
    got = site_round.measured(tmp_path)
    assert got.budgets == [0, 50] and got.base == "default"
    assert len(got.rows) == 8  # 2 budgets x 4 decision rules (next_own is not a site rule)
    by = {(r["budget"], r["key"]): r for r in got.rows}
    assert by[(0, "base_site")]["refused"] and by[(0, "base_site")]["specificity"] is None
    assert by[(50, "next_crossfit")]["specificity"] == 0.86
    assert by[(50, "base_site")]["low"] == 0.7


@pytest.mark.parametrize("text, match", [
    ("{not json", "not readable JSON"),
    ('{"bench": "training", "budgets": [1]}', "not a site-round benchmark result"),
    ('{"bench": "site-round", "budgets": []}', "not a site-round benchmark result"),
    ("[1, 2]", "Received keys: list"),
])
def test_a_broken_site_round_file_is_a_clear_error(tmp_path, text, match):
    from cxr_core.core.errors import ConfigError
    from cxr_core.evaluation import site_round

    (tmp_path / "site_round.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        site_round.measured(tmp_path)
