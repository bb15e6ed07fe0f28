"""CXR_MAX_TRAIN_IMAGES applies to the images a run really trains on: a whole-dataset run
(``max_images`` None) is judged by its indexed dataset's usable images, and a ``max_images``
above a smaller dataset by what it takes."""
from __future__ import annotations

import pytest

from cxr_core.auth import admin
from cxr_core.review import actions
from cxr_core.training import actions as training_actions
from cxr_core.auth import policy
from cxr_core.review import queues as review
from cxr_core.training import inputs
from cxr_core.core.errors import QuotaExceeded
from cxr_core.data.indexing import index_dataset, open_dataset
from cxr_core.storage import open_db
from cxr_core.training.config import TrainConfig
from db.models import Run

SCI = policy.Principal(identity="ds@h.org", roles=frozenset({"viewer", "reviewer", "scientist"}))
ADMIN = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
TRAIN_IMAGES = 14  # tiny_dataset: 6 NORMAL + 8 PNEUMONIA under train/, 4 under test/


@pytest.fixture()
def db(cxr_home, tiny_dataset, monkeypatch):
    for var in ("CXR_MAX_TRAIN_IMAGES", "CXR_MAX_EPOCHS", "CXR_MAX_IMAGE_SIZE",
                "CXR_MAX_ACTIVE_RUNS_PER_USER"):
        monkeypatch.delenv(var, raising=False)
    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    return db


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "tiny", "model": "custom5_224", "image_size": 64,
                          "epochs": 1, **kw})


def runs(db) -> int:
    with db.session() as s:
        return s.query(Run).count()


def test_the_count_is_what_prepare_data_takes(db, tiny_dataset):
    assert inputs.count_training_images(db, cfg()) == TRAIN_IMAGES
    prepared = inputs.prepare_data(db, cfg())
    taken = sum(sum(c.values()) for c in prepared.counts.values())  # train + val + calibration
    assert taken == TRAIN_IMAGES
    assert inputs.count_training_images(db, cfg(dataset=str(tiny_dataset))) == TRAIN_IMAGES
    small = inputs.count_training_images(db, cfg(max_images=6))
    assert small == sum(sum(c.values()) for c in
                        inputs.prepare_data(db, cfg(max_images=6)).counts.values())
    assert small < TRAIN_IMAGES


def test_a_whole_dataset_run_over_the_limit_is_refused(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_TRAIN_IMAGES", str(TRAIN_IMAGES - 1))
    with pytest.raises(QuotaExceeded, match=rf"Received: max_images=None \(the whole dataset, "
                                            rf"{TRAIN_IMAGES} images\)"):
        training_actions.start_run(db, SCI, cfg(), start_worker=False)
    assert runs(db) == 0
    (ev,) = admin.audit_log(db, ADMIN, action="train")
    assert ev.outcome == "denied" and "CXR_MAX_TRAIN_IMAGES" in ev.detail["why"]
    training_actions.start_run(db, SCI, cfg(max_images=TRAIN_IMAGES - 1), start_worker=False)  # a subset
    assert runs(db) == 1


def test_a_whole_dataset_run_within_the_limit_passes(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_TRAIN_IMAGES", str(TRAIN_IMAGES))
    training_actions.start_run(db, SCI, cfg(), start_worker=False)
    # max_images above the dataset's size: judged by the 14 images it really takes.
    training_actions.start_run(db, SCI, cfg(max_images=1000), start_worker=False)
    assert runs(db) == 2


def test_the_labels_it_trains_on_decide_what_counts(db):
    _, records = open_dataset(db, "tiny")
    normal = next(r for r in records if r.split == "train" and r.label == "NORMAL")
    # A pneumonia without its bacteria/virus subtype has no three_class class: left out.
    actions.relabel(db, ADMIN, image_id=normal.id, choice=review.LabelChoice("PNEUMONIA", None))
    three = dict(label_scheme="three_class", calibration_fraction=0.0)
    assert inputs.count_training_images(db, cfg(**three)) == TRAIN_IMAGES  # original labels
    current = cfg(**three, label_source="current")
    assert inputs.count_training_images(db, current) == TRAIN_IMAGES - 1
    assert sum(sum(c.values()) for c in inputs.prepare_data(db, current).counts.values()) \
        == TRAIN_IMAGES - 1


def test_a_folder_not_indexed_yet_cannot_be_judged_so_a_limit_refuses_it(db, monkeypatch,
                                                                         tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert inputs.count_training_images(db, cfg(dataset=str(other))) is None
    monkeypatch.setenv("CXR_MAX_TRAIN_IMAGES", "100")
    with pytest.raises(QuotaExceeded, match=r"the whole dataset\)"):
        training_actions.start_run(db, SCI, cfg(dataset=str(other)), start_worker=False)
