"""A pneumonia label without a guessed subtype (issue 27 item 6): ``relabel add --label
PNEUMONIA`` and Review's "PNEUMONIA (subtype not stated)" record (PNEUMONIA, no subtype);
binary training uses it, three-class training leaves it out and says how many; nothing
invents a subtype."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_core import app
from cxr_core.cli import main
from cxr_core.data.indexing import index_dataset, open_dataset
from cxr_core.storage import open_db
from cxr_core.storage import relabels as rel_store
from cxr_core.storage import runs as run_store
from cxr_core.training import inputs
from cxr_core.training import service as svc
from cxr_core.training.config import TrainConfig

TINY = dict(recipe="cpu128", model="small3_50", image_size=32, epochs=1, batch_size=16,
            augment="none", balancing="class_weights")


@pytest.fixture(scope="module")
def films(shared_data, tmp_path_factory) -> Path:
    """12 films of each class: normal, bacterial, viral (Kermany names carry the subtype)."""
    root = tmp_path_factory.mktemp("unstated") / "films"
    for cls, pattern in (("NORMAL", "*.jpeg"), ("PNEUMONIA", "*bacteria*.jpeg"),
                         ("PNEUMONIA", "*virus*.jpeg")):
        found = sorted((shared_data / "chest_xray_224" / "train" / cls).glob(pattern))
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for f in found[::max(1, len(found) // 12)][:12]:
            (root / "train" / cls / f.name).symlink_to(f)
    return root


@pytest.fixture()
def relabelled(cxr_home, films, capsys, monkeypatch) -> tuple:
    """The films indexed, and one viral film relabelled PNEUMONIA without a subtype from the
    command line: (db, its image id)."""
    db = open_db()
    index_dataset(db, films, name="films")
    _, records = open_dataset(db, "films")
    viral = next(r for r in records if r.subtype == "virus")
    monkeypatch.setenv("CXR_CLI_IDENTITY", "dr.lee@h.org")
    capsys.readouterr()
    assert main(["relabel", "add", "--dataset", "films", "--path", viral.relpath,
                 "--label", "PNEUMONIA", "--note", "consolidation; cannot call viral or "
                 "bacterial from the film", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["new_label"], out["new_subtype"], out["old_subtype"]) == ("PNEUMONIA", None,
                                                                          "virus")
    assert out["reviewer"] == "cli:dr.lee@h.org"
    return db, viral.id


def test_the_cli_records_pneumonia_without_a_subtype(relabelled):
    db, image_id = relabelled
    with db.session() as s:
        labels = rel_store.current_labels(session=s, dataset_id=1)
        originals = rel_store.original_labels(session=s, dataset_id=1)
    assert labels[image_id] == ("PNEUMONIA", None)  # no subtype invented
    assert originals[image_id] == ("PNEUMONIA", "virus")  # the original is never overwritten


def test_binary_training_uses_it_three_class_leaves_it_out_and_counts_it(relabelled):
    db, image_id = relabelled
    cfg = {**TINY, "dataset": "films", "label_source": "current"}
    binary = inputs.prepare_data(db, TrainConfig.from_dict(cfg))
    ids = list(binary.data.image_ids) + [r.id for r in binary.calibration]
    assert image_id in ids and binary.unlabelled == {}
    if image_id in binary.data.image_ids:
        assert binary.data.labels[list(binary.data.image_ids).index(image_id)] == 1
    three = inputs.prepare_data(db, TrainConfig.from_dict({**cfg, "label_scheme": "three_class"}))
    assert image_id not in three.data.image_ids
    assert three.unlabelled == {"PNEUMONIA (subtype not stated)": 1}
    assert len(three.data.image_ids) == len(binary.data.image_ids) + \
        len(binary.calibration) - 1  # three-class runs set no calibration slice apart
    # The originals still have the subtype: a three-class run on them keeps the film.
    original = inputs.prepare_data(db, TrainConfig.from_dict(
        {**cfg, "label_scheme": "three_class", "label_source": "original"}))
    assert image_id in original.data.image_ids and original.unlabelled == {}


def test_a_three_class_run_says_how_many_it_left_out(relabelled):
    db, _ = relabelled
    run_id = svc.queue_run(db, svc.make_config(db, {**TINY, "dataset": "films",
                                                    "label_source": "current",
                                                    "label_scheme": "three_class"}))
    out = app.run_worker(once=True, db=db)
    assert [r["status"] for r in out["runs"]] == ["finished"], out
    with db.session() as s:
        logs = [x.message for x in run_store.get_logs(session=s, run_id=run_id)]
    assert any("left out 1 image(s) labelled PNEUMONIA (subtype not stated)" in x
               for x in logs), logs
    run = svc.get_run(db, run_id)
    assert run.summary["left_out_unlabelled"] == {"PNEUMONIA (subtype not stated)": 1}
    assert [r["class"] for r in run.summary["per_class"]["rows"]] == [
        "NORMAL", "BACTERIA", "VIRUS", "macro avg", "weighted avg"]
