"""Split strategies: temporal (earliest share of each class and numbering series, dates
first), group (leave one folder out), always grouped by patient and identical bytes."""
from __future__ import annotations

import pytest

from cxr_core.core.records import ImageRecord
from cxr_core.data.datasets import parse_name
from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.data.splits import make_split, temporal_key
from cxr_core.training.config import TrainConfig


def rec(i, name, label, *, split="train", sha=None, date=None, folder=None):
    subtype, patient = parse_name(name)
    return ImageRecord(id=i, dataset_id=1, relpath=f"{folder or split}/{label}/{name}",
                       split=split, label=label, subtype=subtype, patient=patient,
                       sha256=sha or f"{i:064x}", width=8, height=8, mode="L", bytes=1,
                       error=None, acquired_date=date, missing=False)


def kermany():
    """Normals in two numbering series, pneumonia patients with 1-3 images each."""
    out, i = [], 0
    for n in range(115, 155):  # IM-0115 .. IM-0154
        i += 1
        out.append(rec(i, f"IM-{n:04d}-0001.jpeg", "NORMAL"))
    for n in range(383, 403):  # NORMAL2-IM-0383 .. 0402
        i += 1
        out.append(rec(i, f"NORMAL2-IM-{n:04d}-0001.jpeg", "NORMAL"))
    for p in range(1, 61):
        for k in range(1 + p % 3):
            i += 1
            out.append(rec(i, f"person{p}_{'virus' if p % 2 else 'bacteria'}_{i}.jpeg",
                           "PNEUMONIA"))
    return out


def labels_of(records):
    return [r.label for r in records]


def test_temporal_holds_out_the_earliest_of_each_class_and_series():
    records = kermany()
    plan = make_split("temporal", records, labels_of(records), val_fraction=0.25)
    assert plan.strategy == "temporal" and plan.unordered == 0
    by_id = {r.id: r for r in records}
    for series in ("im", "normal2", "person"):
        val = [temporal_key(by_id[i])[2] for i in plan.val if temporal_key(by_id[i])[1] == series]
        train = [temporal_key(by_id[i])[2] for i in plan.train
                 if temporal_key(by_id[i])[1] == series]
        assert val and train and max(val) < min(train), series  # strictly earlier
    normals = [by_id[i] for i in plan.val if by_id[i].label == "NORMAL"]
    assert {temporal_key(r)[1] for r in normals} == {"im", "normal2"}  # both series held out
    assert 0.22 <= len(plan.val) / (len(plan.val) + len(plan.train)) <= 0.35
    patients_val = {by_id[i].patient for i in plan.val}
    assert not patients_val & {by_id[i].patient for i in plan.train}  # no patient leaks
    assert sorted(plan.val + plan.train) == sorted(r.id for r in records)


def test_dates_order_before_ids_and_duplicates_move_together():
    records = [rec(1, "IM-0900-0001.jpeg", "NORMAL", date="2015-01-02"),  # early by date
               rec(2, "IM-0001-0001.jpeg", "NORMAL", date="2017-06-01"),  # late by date
               rec(3, "IM-0500-0001.jpeg", "NORMAL", date="2016-03-03"),
               rec(4, "IM-0600-0001.jpeg", "NORMAL", date="2016-09-09"),
               rec(5, "person9_virus_1.jpeg", "PNEUMONIA", sha="d" * 64),
               rec(6, "person90_virus_2.jpeg", "PNEUMONIA", sha="d" * 64),  # same bytes
               rec(7, "person50_virus_3.jpeg", "PNEUMONIA"),
               rec(8, "person70_virus_4.jpeg", "PNEUMONIA"),
               rec(9, "scan_without_id.png", "PNEUMONIA")]
    plan = make_split("temporal", records, labels_of(records), val_fraction=0.25)
    assert 1 in plan.val and 2 in plan.train  # the date wins over the patient number
    assert {5, 6} <= set(plan.val)  # a duplicate of the earliest patient goes with it
    assert 9 in plan.train and plan.unordered == 1  # no date, no ordered id: kept in train


def test_temporal_needs_an_order_and_a_validation_image_per_class():
    plain = [rec(i, f"scan{i}.png", "NORMAL" if i % 2 else "PNEUMONIA") for i in range(8)]
    with pytest.raises(DatasetError, match="dates or ordered patient ids"):
        make_split("temporal", plain, labels_of(plain))
    mixed = plain + [rec(20, "IM-0001-0001.jpeg", "NORMAL"), rec(21, "IM-0002-0001.jpeg",
                                                                  "NORMAL")]
    with pytest.raises(DatasetError, match="PNEUMONIA"):
        make_split("temporal", mixed, labels_of(mixed))


def test_test_folder_images_stay_test_in_every_strategy():
    records = kermany() + [rec(999, "IM-0001-0001.jpeg", "NORMAL", split="test")]
    for strategy, kw in (("patient", {}), ("temporal", {})):
        plan = make_split(strategy, records, labels_of(records), **kw)
        assert plan.test == (999,) and 999 not in plan.val + plan.train


def test_group_leaves_one_folder_out_with_its_patients():
    records = [rec(1, "IM-0001-0001.jpeg", "NORMAL", folder="train/site_a"),
               rec(2, "IM-0002-0001.jpeg", "NORMAL", folder="train/site_b"),
               rec(3, "IM-0002-0002.jpeg", "NORMAL", folder="train/site_a"),  # patient 0002
               rec(4, "person1_virus_1.jpeg", "PNEUMONIA", folder="train/site_b"),
               rec(5, "person2_virus_2.jpeg", "PNEUMONIA", folder="train/site_a")]
    plan = make_split("group", records, labels_of(records), group="train/site_b/")
    assert sorted(plan.val) == [2, 3, 4] and sorted(plan.train) == [1, 5]
    assert plan.strategy == "group"
    with pytest.raises(DatasetError, match="no labelled train image under"):
        make_split("group", records, labels_of(records), group="train/site_c")
    with pytest.raises(DatasetError, match="train/site"):  # "train/site" is no folder name
        make_split("group", records, labels_of(records), group="train/site")
    with pytest.raises(ConfigError, match="split_group"):
        make_split("group", records, labels_of(records), group=" ")
    with pytest.raises(ConfigError, match="split must be one of"):
        make_split("random", records, labels_of(records))


def test_train_config_validates_the_split():
    assert TrainConfig(dataset="x", split="temporal").split == "temporal"
    with pytest.raises(ConfigError, match="split must be one of"):
        TrainConfig(dataset="x", split="by_image")
    with pytest.raises(ConfigError, match="needs split_group"):
        TrainConfig(dataset="x", split="group")
    with pytest.raises(ConfigError, match="only used with split='group'"):
        TrainConfig(dataset="x", split="patient", split_group="train/a")
    cfg = TrainConfig(dataset="x", split="group", split_group="train/a")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_a_run_prepares_its_data_with_the_temporal_split(cxr_home, tiny_dataset):
    from cxr_core.training import inputs
    from cxr_core.data.indexing import index_dataset, indexed_records
    from cxr_core.storage import open_db

    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    prepared = inputs.prepare_data(db, TrainConfig(dataset="tiny", split="temporal",
                                                     val_fraction=0.3))
    data = prepared.data
    by_id = {r.id: r for r in indexed_records(db, prepared.dataset_id)}
    # Validation = the selection part and the calibration slice carved from it.
    val = [by_id[i] for i, v in zip(data.image_ids, data.is_val) if v] + list(
        prepared.calibration)
    train = [by_id[i] for i, v in zip(data.image_ids, data.is_val) if not v]
    for series in ("im", "person"):
        v = [temporal_key(r)[2] for r in val if temporal_key(r)[1] == series]
        t = [temporal_key(r)[2] for r in train if temporal_key(r)[1] == series]
        assert v and t and max(v) < min(t)


def test_group_can_leave_a_metadata_site_out():
    records = [rec(1, "IM-0001-0001.jpeg", "NORMAL")._replace(site="a"),
               rec(2, "IM-0002-0001.jpeg", "NORMAL")._replace(site="b"),
               rec(3, "IM-0002-0002.jpeg", "NORMAL")._replace(site="a"),  # patient 0002
               rec(4, "person1_virus_1.jpeg", "PNEUMONIA")._replace(site="b"),
               rec(5, "person2_virus_2.jpeg", "PNEUMONIA")]  # no site
    plan = make_split("group", records, labels_of(records), group="site:b")
    assert sorted(plan.val) == [2, 3, 4] and sorted(plan.train) == [1, 5]
    with pytest.raises(DatasetError, match="of site 'c'"):
        make_split("group", records, labels_of(records), group="site:c")
    with pytest.raises(ConfigError, match="site:NAME"):
        make_split("group", records, labels_of(records), group="site:")
