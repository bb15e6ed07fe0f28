"""A dataset's metadata.csv: the index reads patient (hashed), date, site, sex, age and view;
bad cells are reported by line, the rest applied; the temporal split orders by its dates."""
from __future__ import annotations


import pytest

from cxr_core.data import indexing
from cxr_core.core.errors import DatasetError
from cxr_core.data.indexing import index_dataset
from cxr_core.data.splits import make_split
from cxr_core.storage import open_db

META = """path,patient,date,site,sex,age,view
train/NORMAL/IM-0001-0001.jpeg,MRN-777,2016-02-01,site_a,F,4.5,PA
train/NORMAL/IM-0001-0002.jpeg,MRN-777,20160203,site_a,female,4.5,AP
train/PNEUMONIA/person1_bacteria_1.jpeg,,2015-13-01,site_b,X,200,
train/PNEUMONIA/person9_nothing.jpeg,MRN-1,2016-01-01,,,,
"""


def by_path(db, dataset_id):
    return {r.relpath: r for r in indexing.indexed_records(db, dataset_id)}


def test_the_index_applies_metadata_and_reports_bad_cells(cxr_home, tiny_dataset):
    (tiny_dataset / "metadata.csv").write_text(META)
    db = open_db()
    rep = index_dataset(db, tiny_dataset, name="tiny")
    recs = by_path(db, rep.dataset_id)
    a, b = recs["train/NORMAL/IM-0001-0001.jpeg"], recs["train/NORMAL/IM-0001-0002.jpeg"]
    assert (a.acquired_date, a.site, a.sex, a.age_years, a.view) == ("2016-02-01", "site_a", "F",
                                                                     4.5, "PA")
    assert (b.acquired_date, b.sex, b.view) == ("2016-02-03", "F", "AP")
    assert a.patient == b.patient and a.patient.startswith("pid-")  # hashed, never the MRN
    assert "MRN" not in a.patient
    p = recs["train/PNEUMONIA/person1_bacteria_1.jpeg"]
    assert (p.acquired_date, p.sex, p.age_years, p.site) == (None, None, None, "site_b")
    assert p.patient == "person1"  # an empty cell keeps what the index parsed
    problems = " | ".join(rep.problems)
    assert "line 4, date '2015-13-01'" in problems and "line 4, sex 'X'" in problems
    assert "line 4, age '200'" in problems
    assert "no image at train/PNEUMONIA/person9_nothing.jpeg" in problems
    assert rep.summary["metadata"] == {"file": "metadata.csv", "rows": 4, "applied": 3,
                                       "unknown_paths": 1}


def test_metadata_survives_a_rescan_of_a_changed_file(cxr_home, tiny_dataset):
    from conftest import write_image

    (tiny_dataset / "metadata.csv").write_text(META)
    db = open_db()
    dataset_id = index_dataset(db, tiny_dataset, name="tiny").dataset_id
    write_image(tiny_dataset / "train" / "NORMAL" / "IM-0001-0001.jpeg", seed=999)  # new bytes
    rep = index_dataset(db, tiny_dataset, name="tiny")
    assert rep.scanned == 1
    rec = by_path(db, dataset_id)["train/NORMAL/IM-0001-0001.jpeg"]
    assert (rec.site, rec.acquired_date) == ("site_a", "2016-02-01")


@pytest.mark.parametrize("text, match", [
    ("file,site\nx.jpeg,a\n", "needs a 'path' column"),
    ("path,hospital\nx.jpeg,a\n", r"unknown metadata column\(s\) \['hospital'\]"),
])
def test_a_metadata_file_of_the_wrong_shape_is_refused(cxr_home, tiny_dataset, text, match):
    (tiny_dataset / "metadata.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        index_dataset(open_db(), tiny_dataset, name="tiny")


def test_the_temporal_split_orders_by_metadata_dates(cxr_home, tiny_dataset):
    rows = ["path,date"]
    names = sorted(p.relative_to(tiny_dataset).as_posix()
                   for p in tiny_dataset.rglob("*.jpeg") if "/test/" not in f"/{p.parent}/")
    for n, rel in enumerate(reversed(names)):  # dates run against the patient numbers
        rows.append(f"{rel},2016-01-{n + 1:02d}")
    (tiny_dataset / "metadata.csv").write_text("\n".join(rows) + "\n")
    db = open_db()
    dataset_id = index_dataset(db, tiny_dataset, name="tiny").dataset_id
    recs = [r for r in indexing.indexed_records(db, dataset_id) if r.split != "test"]
    plan = make_split("temporal", recs, [r.label for r in recs], val_fraction=0.3)
    dates = {r.id: r.acquired_date for r in recs}
    for label in ("NORMAL", "PNEUMONIA"):
        val = [dates[r.id] for r in recs if r.id in plan.val and r.label == label]
        train = [dates[r.id] for r in recs if r.id in plan.train and r.label == label]
        assert val and max(val) < min(train)  # by date, not by patient number
