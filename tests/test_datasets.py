"""Layouts, name parsing, index, splits, duplicates and bad input (issue: foundation)."""
from __future__ import annotations

import csv
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import write_image

from cxr_core.core import labels as core_labels
from cxr_core.data import datasets as ds
from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.data.indexing import index_dataset, open_dataset
from cxr_core.data.splits import patient_split
from cxr_core.storage import open_db


@pytest.mark.parametrize("name, expected", [
    ("person1003_virus_1685.jpeg", ("virus", "person1003")),
    ("person1004_bacteria_2935.jpeg", ("bacteria", "person1004")),
    ("IM-0115-0001.jpeg", (None, "0115")),
    ("NORMAL2-IM-1427-0001.jpeg", (None, "NORMAL2-1427")),
    ("covid_case_12.png", (None, None)),
])
def test_parse_name(name, expected):
    assert ds.parse_name(name) == expected


@pytest.mark.parametrize("label, subtype, scheme, expected", [
    ("NORMAL", None, "binary", "NORMAL"),
    ("PNEUMONIA", "virus", "binary", "PNEUMONIA"),
    ("COVID19", None, "binary", "PNEUMONIA"),
    ("PNEUMONIA", "bacteria", "three_class", "BACTERIA"),
    ("PNEUMONIA", None, "three_class", None),
    ("COVID19", None, "folders", "COVID19"),
])
def test_scheme_label(label, subtype, scheme, expected):
    assert core_labels.scheme_label(label, subtype, scheme) == expected


def test_bad_scheme_names_value():
    with pytest.raises(ConfigError, match="label_scheme='four'"):
        core_labels.scheme_classes("four", [])


def test_kaggle_layout_nested_and_missing_splits(tmp_path):
    root = tmp_path / "chest_xray" / "chest_xray"
    write_image(root / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    write_image(root / "train" / "PNEUMONIA" / "person1_virus_1.jpeg", seed=1)
    write_image(root / "test" / "NORMAL" / "IM-0002-0001.jpeg", seed=2)
    layout = ds.discover(tmp_path / "chest_xray")
    assert layout.kind == "splits" and layout.root == root
    assert {e.split for e in layout.entries} == {"train", "test"}
    assert layout.classes == ("NORMAL", "PNEUMONIA")


def test_generic_class_folders_without_splits(tmp_path):
    for i, cls in enumerate(["COVID19", "NORMAL", "PNEUMONIA"]):
        write_image(tmp_path / cls / f"img{i}.png", seed=i, fmt="PNG")
    layout = ds.discover(tmp_path)
    assert layout.kind == "classes" and layout.classes == ("COVID19", "NORMAL", "PNEUMONIA")
    assert {e.split for e in layout.entries} == {""}


def test_npz_with_and_without_test(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if k == "images"
                           else rng.integers(0, 2, (n, 1)))
              for s, n in (("train", 6), ("val", 3)) for k in ("images", "labels")}
    np.savez(tmp_path / "a.npz", **arrays)
    assert Counter(e.split for e in ds.discover(tmp_path / "a.npz").entries) == {"train": 6, "val": 3}
    arrays.update(test_images=arrays["val_images"], test_labels=arrays["val_labels"])
    np.savez(tmp_path / "b.npz", **arrays)
    assert Counter(e.split for e in ds.discover(tmp_path / "b.npz").entries)["test"] == 3
    np.savez(tmp_path / "c.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="train_images"):
        ds.discover(tmp_path / "c.npz")


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no images found"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "expected a folder"),
])
def test_bad_paths(tmp_path, make, match):
    with pytest.raises(DatasetError, match=match):
        ds.discover(make(tmp_path))


def test_bad_files_are_reported_and_rest_indexes(tmp_path, cxr_home):
    root = tmp_path / "data"
    write_image(root / "NORMAL" / "IM-0001-0001.jpeg")
    (root / "NORMAL" / "IM-0002-0001.jpeg").write_text("this is not an image")
    (root / "NORMAL" / "IM-0003-0001.jpeg").write_bytes(b"")
    good = write_image(root / "PNEUMONIA" / "person1_virus_1.jpeg", size=(64, 64), seed=3)
    (root / "PNEUMONIA" / "person2_virus_2.jpeg").write_bytes(good.read_bytes()[:200])  # truncated
    from PIL import Image
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(root / "PNEUMONIA" / "p16.png")
    Image.new("CMYK", (24, 24), (10, 20, 30, 40)).save(root / "PNEUMONIA" / "cmyk.jpeg")
    (root / "EMPTY").mkdir()
    rep = index_dataset(open_db(), root, name="bad")
    # readable headers: two good JPEGs, 16-bit PNG, CMYK JPEG; the text file, the empty file and
    # the file cut inside its header are reported, not fatal.
    assert rep.summary["images"] == 4
    assert rep.summary["unreadable"] == 3
    assert any("not a readable image" in p for p in rep.problems)
    assert any("empty" in p for p in rep.problems)
    assert any(p.startswith("empty class folder: EMPTY") for p in rep.problems)
    _, recs = open_dataset(open_db(), "bad")
    modes = {r.relpath.rsplit("/", 1)[-1]: r.mode for r in recs}
    assert modes["p16.png"].startswith("I") and modes["cmyk.jpeg"] == "CMYK"


def test_incremental_reindex(tiny_dataset, cxr_home):
    db = open_db()
    first = index_dataset(db, tiny_dataset)
    assert first.scanned == 18 and first.summary["images"] == 18
    second = index_dataset(db, tiny_dataset)
    assert second.scanned == 0 and second.unchanged == 18
    changed = tiny_dataset / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    write_image(changed, seed=99)
    os.utime(changed, ns=(1, 1))
    (tiny_dataset / "test" / "NORMAL" / "IM-0101-0001.jpeg").unlink()
    write_image(tiny_dataset / "test" / "NORMAL" / "IM-0102-0001.jpeg", seed=100)
    third = index_dataset(db, tiny_dataset)
    assert (third.scanned, third.removed, third.summary["images"]) == (2, 1, 18)


def test_duplicates_and_patient_split(tiny_dataset, cxr_home):
    src = tiny_dataset / "train" / "PNEUMONIA" / "person3_bacteria_4.jpeg"
    shutil.copy(src, tiny_dataset / "train" / "PNEUMONIA" / "person9_bacteria_9.jpeg")
    shutil.copy(src, tiny_dataset / "test" / "PNEUMONIA" / "person99_bacteria_9.jpeg")
    rep = index_dataset(open_db(), tiny_dataset)
    assert rep.duplicate_groups == 1 and rep.cross_split_duplicates == 1
    _, recs = open_dataset(open_db(), rep.dataset)
    labels = [core_labels.scheme_label(r.label, r.subtype, "binary") for r in recs]
    plan = patient_split(recs, labels, val_fraction=0.3, seed=1)
    by_id = {r.id: r for r in recs}
    train_p = {by_id[i].patient for i in plan.train}
    assert not train_p & {by_id[i].patient for i in plan.val}
    dup_ids = {r.id for r in recs if r.sha256 == by_id[next(
        r.id for r in recs if r.relpath.endswith("person3_bacteria_4.jpeg"))].sha256}
    assert len({("train" if i in plan.train else "val") for i in dup_ids if i not in plan.test}) == 1
    assert plan == patient_split(recs, labels, val_fraction=0.3, seed=1)  # seeded


def test_real_train_split_counts_and_grouped_split(shared_data, cxr_home):
    rep = index_dataset(open_db(), shared_data / "chest_xray_224" / "train")
    s = rep.summary
    assert s["by_class"] == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert s["by_subtype"] == {"NORMAL": 1341, "PNEUMONIA/bacteria": 2530, "PNEUMONIA/virus": 1345}
    assert s["unreadable"] == 0 and 20 <= rep.duplicate_groups <= 40
    _, recs = open_dataset(open_db(), rep.dataset)
    labels = [core_labels.scheme_label(r.label, r.subtype, "binary") for r in recs]
    plan = patient_split(recs, labels, val_fraction=0.15, seed=0)
    by_id = {r.id: r for r in recs}
    patients = lambda ids: {by_id[i].patient for i in ids}
    hashes = lambda ids: {by_id[i].sha256 for i in ids}
    assert not patients(plan.train) & patients(plan.val)
    assert not hashes(plan.train) & hashes(plan.val)
    frac = sum(labels[recs.index(by_id[i])] == "NORMAL" for i in plan.val) / len(plan.val)
    assert abs(frac - 1341 / 5216) < 0.03  # stratified
    assert 0.12 < len(plan.val) / 5216 < 0.18


def test_real_fullres_sample_sizes_and_modes(shared_data, cxr_home):
    rep = index_dataset(open_db(), shared_data / "chest_xray_fullres_sample")
    _, recs = open_dataset(open_db(), rep.dataset)
    with open(shared_data / "chest_xray_fullres_sample_manifest.csv") as fh:
        manifest = {row["file"]: row for row in csv.DictReader(fh)}
    assert len(recs) == len(manifest) == 265
    for r in recs:
        m = manifest[r.relpath.rsplit("/", 1)[-1]]
        assert (r.width, r.height, r.mode, r.bytes, r.sha256, r.label) == (
            int(m["width"]), int(m["height"]), m["mode"], int(m["bytes"]), m["sha256"], m["class"])


def test_real_pneumoniamnist(shared_data, cxr_home):
    rep = index_dataset(open_db(), shared_data / "pneumoniamnist_trainval.npz")
    assert rep.summary["by_split"] == {"train": 4708, "val": 524}
    assert rep.summary["by_class"] == {"NORMAL": 1214 + 135, "PNEUMONIA": 3494 + 389}


def test_indexing_one_split_folder_keeps_the_other_splits(tiny_dataset, cxr_home):
    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    rep = index_dataset(db, tiny_dataset / "test", name="tiny")
    assert rep.removed == 0 and rep.summary["by_split"] == {"test": 4, "train": 14}


def _index_killed_at_the_13th_file(db, path, monkeypatch) -> None:
    """Index ``path`` as "tiny" and crash while reading the 13th file (an app restart)."""
    real_scan, reads = ds.scan_file, []

    def crash_on_13th(root, entry, salt=None):
        reads.append(entry.relpath)
        if len(reads) == 13:
            raise KeyboardInterrupt("the app was restarted")
        return real_scan(root, entry, salt)

    monkeypatch.setattr(ds, "scan_file", crash_on_13th)
    with pytest.raises(KeyboardInterrupt):
        index_dataset(db, path, name="tiny")
    monkeypatch.setattr(ds, "scan_file", real_scan)


def test_an_index_killed_midway_keeps_what_it_read_and_resumes(tiny_dataset, cxr_home,
                                                               monkeypatch):
    """Rows are committed in batches: a restart reads only the files not stored yet."""
    from cxr_core.data import indexing

    monkeypatch.setattr(indexing, "BATCH", 5)
    db = open_db()
    _index_killed_at_the_13th_file(db, tiny_dataset, monkeypatch)
    with db.session() as s:
        from cxr_core.storage import datasets as dstore

        info = dstore.get_dataset(session=s, name_or_id="tiny")
        stored = dstore.list_images(session=s, dataset_id=info.id)
    assert len(stored) == 10 and info.summary is None  # two batches of 5; no stale counts
    rep = index_dataset(db, tiny_dataset, name="tiny")
    assert rep.scanned == 8 and rep.unchanged == 10  # only the rest is read
    assert rep.summary["images"] == 18
    _, records = open_dataset(db, "tiny")
    assert sorted(r.id for r in records if r.relpath in {x.relpath for x in stored}) == sorted(
        r.id for r in stored)  # the rows stored before the crash kept their ids


def test_a_killed_reindex_leaves_no_stale_counts(tiny_dataset, cxr_home, monkeypatch):
    from cxr_core.data import indexing
    from cxr_core.storage import datasets as dstore

    monkeypatch.setattr(indexing, "BATCH", 5)
    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    for f in tiny_dataset.rglob("*.*"):  # a copy without mtimes: every file is read again
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    _index_killed_at_the_13th_file(db, tiny_dataset, monkeypatch)
    with db.session() as s:
        assert dstore.get_dataset(session=s, name_or_id="tiny").summary is None
    rep = index_dataset(db, tiny_dataset, name="tiny")
    assert rep.scanned == 8 and rep.summary["images"] == 18


def test_a_split_folder_is_the_dataset_of_its_root_never_a_second_copy(tiny_dataset, cxr_home):
    """Training or evaluating on ``…/train`` of an indexed dataset uses that dataset (its ids,
    its relabels); it used to index a copy ("chest_xray-2"), where the relabels made on the
    first did not exist, and runs trained on the same folder shared no image ids."""
    from cxr_core.review import queues as review
    from cxr_core.review.queues import LabelChoice
    from cxr_core.storage import datasets as dstore
    from cxr_core.storage import relabels as rstore

    db = open_db()
    first = index_dataset(db, tiny_dataset, name="site")
    info, records = open_dataset(db, "site")
    normal = next(r for r in records if r.split == "train" and r.label == "NORMAL")
    review.submit_relabel(db, image_id=normal.id, choice=LabelChoice("PNEUMONIA", "virus"),
                          reviewer="dr a")
    for path in (tiny_dataset / "train", str(tiny_dataset / "train") + "/", tiny_dataset):
        again, recs = open_dataset(db, str(path))
        assert again.id == first.dataset_id and {r.id for r in recs} == {r.id for r in records}
    rep = index_dataset(db, tiny_dataset / "train")  # no --name: the folder keeps its name
    assert rep.dataset_id == first.dataset_id and rep.dataset == "site"
    with db.session() as s:
        assert [d.name for d in dstore.list_datasets(session=s)] == ["site"]
        [rel] = rstore.list_relabels(session=s, image_ids=[normal.id])
    assert rel.new_label == "PNEUMONIA" and rel.reviewer == "dr a"
