"""``python -m cxr_core relabel add|import|list``: the review page's writer from the command line.

The CLI runs in-process through :func:`cxr_core.cli.main` against the test's CXR_HOME database.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core import cli
from cxr_core.review import relabel_import
from cxr_core.review import queues as review
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import open_db
from cxr_core.storage import relabels as store
from db.models import Relabel

FILES = {"NORMAL": ["IM-0001-0001.png", "IM-0002-0001.png", "IM-0003-0001.png"],
         "PNEUMONIA": ["person1_bacteria_1.png", "person2_virus_2.png", "person3_bacteria_3.png"]}
N1 = "train/NORMAL/IM-0001-0001.png"
N2 = "train/NORMAL/IM-0002-0001.png"
N3 = "train/NORMAL/IM-0003-0001.png"
P1 = "train/PNEUMONIA/person1_bacteria_1.png"
P2 = "train/PNEUMONIA/person2_virus_2.png"


def make_dataset(root: Path) -> Path:
    for n, (cls, names) in enumerate(FILES.items()):
        (root / "train" / cls).mkdir(parents=True)
        for k, name in enumerate(names):
            Image.fromarray(np.full((32, 32), 40 * n + 10 * k, np.uint8)).save(
                root / "train" / cls / name)
    return root


@pytest.fixture()
def db(cxr_home):
    return open_db()


@pytest.fixture()
def root(db, tmp_path) -> Path:
    """A six-image Kermany-style dataset indexed as "tiny"; returns its folder."""
    path = make_dataset(tmp_path / "tiny")
    index_dataset(db, path, name="tiny")
    return path


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """(exit code, the JSON object printed or None, stderr) of one in-process CLI call."""
    capsys.readouterr()
    # ``relabel add|import`` record the CLI's identity (``cli:`` + CXR_CLI_IDENTITY): these
    # tests name it with --reviewer NAME, run as CXR_CLI_IDENTITY=NAME and pass --reviewer
    # cli:NAME (test_relabel_add_is_the_cli_identity checks a mismatch).
    old = os.environ.get("CXR_CLI_IDENTITY")
    argv = list(argv)
    if ("add" in argv or "import" in argv) and "--reviewer" in argv:
        k = argv.index("--reviewer") + 1
        os.environ["CXR_CLI_IDENTITY"] = argv[k]
        argv[k] = f"cli:{argv[k].strip()}" if argv[k].strip() else argv[k]
    try:
        rc = cli.main(list(argv))
    finally:
        if old is None:
            os.environ.pop("CXR_CLI_IDENTITY", None)
        else:
            os.environ["CXR_CLI_IDENTITY"] = old
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def rows(db, dataset="tiny"):
    return relabel_import.relabel_history(db, dataset=dataset)[1]


def write_csv(tmp_path, text: str, name="relabels.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def stored_row(db, relabel_id):
    """Every column of a relabel row but the id, the image id and the time."""
    with db.session() as s:
        r = s.get(Relabel, relabel_id)
        return {c: getattr(r, c) for c in ("upload_sha256", "image_sha256", "old_label",
                                           "old_subtype", "new_label", "new_subtype", "reviewer",
                                           "note", "run_ref", "score", "undo_of")}


# -- add / list -------------------------------------------------------------------------------

def test_add_then_list_round_trip(db, root, capsys):
    rc, rec, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path", N1,
                       "--label", "PNEUMONIA", "--subtype", "virus", "--reviewer", "alice",
                       "--note", "RLL consolidation", "--json")
    assert rc == 0, err
    assert {k: rec[k] for k in ("dataset", "path", "old_label", "old_subtype", "new_label",
                                "new_subtype", "reviewer", "note", "undo_of")} == {
        "dataset": "tiny", "path": N1, "old_label": "NORMAL", "old_subtype": None,
        "new_label": "PNEUMONIA", "new_subtype": "virus", "reviewer": "cli:alice",
        "note": "RLL consolidation", "undo_of": None}
    assert isinstance(rec["id"], int) and rec["created_at"]
    # the button's text names the same choice; old label is now the first relabel's
    rc, second, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path", N1,
                          "--label", "PNEUMONIA·bacteria", "--reviewer", "bob", "--json")
    assert rc == 0, err
    assert (second["old_label"], second["old_subtype"]) == ("PNEUMONIA", "virus")
    assert second["new_subtype"] == "bacteria"
    review.submit_undo(db, relabel_id=second["id"], reviewer="cli:bob")  # the page's undo

    rc, listed, err = run(capsys, "relabel", "list", "--dataset", "tiny", "--json")
    assert rc == 0, err
    assert listed["dataset"] == "tiny" and listed["count"] == 3
    got = listed["relabels"]
    assert [r["id"] for r in got] == sorted(r["id"] for r in got)  # oldest first
    assert got[0] == rec and got[1] == second
    assert got[2]["undo_of"] == second["id"] and got[2]["path"] == N1
    assert (got[2]["new_label"], got[2]["new_subtype"]) == ("PNEUMONIA", "virus")
    with db.session() as s:
        info = ds_store.get_dataset(session=s, name_or_id="tiny")
        current = store.current_labels(session=s, dataset_id=info.id)
    image = ds_store_image(db, N1)
    assert current[image.id] == ("PNEUMONIA", "virus")


def ds_store_image(db, relpath, dataset="tiny"):
    with db.session() as s:
        info = ds_store.get_dataset(session=s, name_or_id=dataset)
        return ds_store.image_by_path(session=s, dataset_id=info.id, relpath=relpath)


def test_an_absolute_path_inside_the_root_names_the_image(db, root, capsys, tmp_path):
    rc, rec, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path",
                       str((root / N1).resolve()), "--label", "NORMAL", "--reviewer", "a",
                       "--json")
    assert rc == 0 and rec["path"] == N1, err
    path = write_csv(tmp_path, f"path,label\n{(root / P1).resolve()},NORMAL\n")
    rc, out, err = run(capsys, "relabel", "import", path, "--dataset", "tiny", "--reviewer", "a",
                       "--json")
    assert rc == 0 and rows(db)[-1].relpath == P1, err
    rc, _, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path",
                     str(tmp_path / "elsewhere.png"), "--label", "NORMAL", "--reviewer", "a")
    assert rc == 2 and "unknown path" in err


def test_list_of_a_dataset_without_relabels_is_empty(db, root, capsys):
    rc, listed, _ = run(capsys, "relabel", "list", "--dataset", "tiny", "--json")
    assert rc == 0 and listed == {"dataset": "tiny", "count": 0, "relabels": []}


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "nope", "--path", N1, "--label", "NORMAL"], "dataset must name an indexed"),
    (["--dataset", "tiny", "--path", "train/NORMAL/none.png", "--label", "NORMAL"],
     "unknown path 'train/NORMAL/none.png'"),
    (["--dataset", "tiny", "--path", "", "--label", "NORMAL"], "empty path"),
    (["--dataset", "tiny", "--path", N1, "--label", "COVID19"], "label 'COVID19' is not one"),
    # a subtype the data does not have (plain PNEUMONIA is "subtype not stated": allowed)
    (["--dataset", "tiny", "--path", N1, "--label", "PNEUMONIA", "--subtype", "fungal"],
     "label 'PNEUMONIA·fungal' is not"),
    (["--dataset", "tiny", "--path", N1, "--label", "NORMAL", "--subtype", "virus"],
     "label 'NORMAL·virus' is not one"),
    (["--dataset", "tiny", "--path", N1, "--label", "PNEUMONIA·virus", "--subtype", "bacteria"],
     "names subtype 'virus' but subtype is 'bacteria'"),
])
def test_add_errors_are_one_line_and_write_nothing(db, root, capsys, extra, message):
    rc, out, err = run(capsys, "relabel", "add", *extra, "--reviewer", "alice", "--json")
    assert rc == 2 and out is None
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert rows(db) == []


def test_add_with_a_blank_reviewer_is_refused(db, root, capsys):
    rc, out, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path", N1,
                       "--label", "NORMAL", "--reviewer", "  ", "--json")
    assert rc == 2 and out is None and "never a typed name" in err and "'  '" in err
    assert rows(db) == []


def test_label_errors_list_the_datasets_choices(db, root, capsys):
    _, _, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path", N1,
                    "--label", "normal", "--reviewer", "alice")
    assert ("(NORMAL / PNEUMONIA·bacteria / PNEUMONIA·virus / PNEUMONIA (subtype not "
            "stated))") in err


# -- missing images ------------------------------------------------------------------------------

def test_relabel_of_a_missing_image_is_refused_but_its_history_is_kept(db, root, capsys,
                                                                      tmp_path):
    rc, before, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path", N2,
                          "--label", "PNEUMONIA", "--subtype", "virus", "--reviewer", "alice",
                          "--json")
    assert rc == 0, err
    (root / N2).unlink()
    index_dataset(db, root, name="tiny")  # re-index flags the file missing (row kept)
    image = ds_store_image(db, N2)
    assert image is not None and image.missing  # found by path although missing

    rc, out, err = run(capsys, "relabel", "add", "--dataset", "tiny", "--path", N2,
                       "--label", "NORMAL", "--reviewer", "alice", "--json")
    assert rc == 2 and out is None
    assert "is missing from disk" in err and "refused" in err and "unknown" not in err

    csv_path = write_csv(tmp_path, f"path,label,reviewer\n{N2},NORMAL,alice\n{N1},NORMAL,bob\n")
    rc, out, err = run(capsys, "relabel", "import", csv_path, "--dataset", "tiny", "--json")
    assert rc == 2 and out is None and "line 2:" in err and "is missing from disk" in err
    assert "line 3" not in err

    rc, listed, _ = run(capsys, "relabel", "list", "--dataset", "tiny", "--json")
    assert rc == 0 and [r["id"] for r in listed["relabels"]] == [before["id"]]
    assert listed["relabels"][0]["path"] == N2


def test_image_by_path_finds_present_and_missing_rows_only_in_their_dataset(db, root):
    assert ds_store_image(db, N1).relpath == N1 and not ds_store_image(db, N1).missing
    assert ds_store_image(db, "train/NORMAL/nothing.png") is None
    index_dataset(db, root, name="other")
    with db.session() as s:
        other = ds_store.get_dataset(session=s, name_or_id="other")
        assert ds_store.image_by_path(session=s, dataset_id=other.id, relpath=N1).dataset_id \
            == other.id
        assert ds_store.image_by_path(session=s, dataset_id=other.id + 99, relpath=N1) is None


# -- import ----------------------------------------------------------------------------------------

def test_import_of_a_good_csv(db, root, capsys, tmp_path):
    text = ("\ufeffpath,label,subtype,reviewer,note\n"  # a spreadsheet's BOM
            f"{N1},PNEUMONIA,virus,alice,\"says \"\"RLL\"\", maybe\"\n"
            "\n"  # blank lines are skipped
            f"{P1},NORMAL,,,\n"  # reviewer from --reviewer
            f"{P2},PNEUMONIA·bacteria,,carol,second opinion\n")
    rc, out, err = run(capsys, "relabel", "import", write_csv(tmp_path, text), "--dataset",
                       "tiny", "--reviewer", "bob", "--json")
    assert rc == 0, err
    assert out["dataset"] == "tiny" and out["count"] == 3 and len(out["ids"]) == 3
    got = rows(db)
    assert [r.id for r in got] == out["ids"]
    # Every row is the CLI's identity; a reviewer cell is kept only in the note.
    assert out["reviewer"] == "cli:bob"
    assert [(r.relpath, r.old_label, r.new_label, r.new_subtype, r.reviewer, r.note)
            for r in got] == [
        (N1, "NORMAL", "PNEUMONIA", "virus", "cli:bob",
         'says "RLL", maybe (CSV reviewer: alice)'),
        (P1, "PNEUMONIA", "NORMAL", None, "cli:bob", ""),
        (P2, "PNEUMONIA", "PNEUMONIA", "bacteria", "cli:bob",
         "second opinion (CSV reviewer: carol)")]


def test_import_columns_in_any_order_without_optional_ones(db, root, capsys, tmp_path):
    path = write_csv(tmp_path, f"Label,Path\nNORMAL,{P1}\n")
    rc, out, err = run(capsys, "relabel", "import", path, "--dataset", "tiny",
                       "--reviewer", "bob", "--json")
    assert rc == 0 and out["count"] == 1, err


def test_import_with_two_bad_rows_writes_nothing_and_names_both(db, root, capsys, tmp_path):
    text = ("path,label,subtype,reviewer\n"
            f"{N1},PNEUMONIA,virus,alice\n"
            "train/NORMAL/nope.png,NORMAL,,alice\n"  # line 3: unknown path
            f"{N2},NORMAL,,alice\n"
            f"{N3},COVID19,,alice\n")  # line 5: bad label
    rc, out, err = run(capsys, "relabel", "import", write_csv(tmp_path, text), "--dataset",
                       "tiny", "--json")
    assert rc == 2 and out is None and err.count("\n") == 1
    assert "2 bad row(s), nothing was written" in err
    assert "line 3: unknown path 'train/NORMAL/nope.png'" in err
    assert "line 5: label 'COVID19' is not one of this dataset's labels" in err
    assert "line 2" not in err and "line 4" not in err
    assert rows(db) == []


def test_import_names_every_kind_of_bad_row(db, root, capsys, tmp_path):
    text = ("path,label,subtype,reviewer,note\n"
            f"{N1},NORMAL,,alice,\n"  # 2: good
            ",NORMAL,,alice,\n"  # 3: empty path
            f"{N2},NORMAL,,,\n"  # 4: good (recorded as the CLI's identity)
            f"{N1},PNEUMONIA,virus,bob,\n"  # 5: duplicate of line 2
            f"{N3},PNEUMONIA,fungal,alice,\n"  # 6: no such button
            f"{P1},NORMAL,,alice,note,extra\n"  # 7: one cell too many
            f"{P2},,,alice,\n"  # 8: empty label
            f"\"{P2}\nx\",NORMAL,,,\n"  # 9-10: a quoted path over two lines; two problems
            "train/PNEUMONIA/person3_bacteria_3.png,NORMAL,,dave,\n")  # 11: good
    rc, out, err = run(capsys, "relabel", "import", write_csv(tmp_path, text), "--dataset",
                       "tiny", "--json")
    assert rc == 2 and out is None
    problems = err.split("nothing was written. ", 1)[1]
    assert "line 3: empty path" in problems
    assert "line 4" not in problems and "reviewer" not in problems
    assert f"line 5: duplicate path '{N1}' (first on line 2)" in problems
    assert "line 6: label 'PNEUMONIA·fungal' is not one" in problems
    assert "line 7: 1 cell(s) more than the header's 5" in problems
    assert "line 8: empty label" in problems
    assert "line 9: unknown path" in problems
    assert "line 2:" not in problems and "line 11" not in problems
    assert "6 bad row(s)" in err and err.count("\n") == 1
    assert rows(db) == []
    with pytest.raises(relabel_import.RelabelImportError) as info:
        relabel_import.import_relabels(db, dataset="tiny", source=tmp_path / "relabels.csv",
                                       reviewer="cli:x")
    assert [n for n, _ in info.value.problems] == [3, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("text, message", [
    (f"{N1},NORMAL,alice\n", "the first row must be a header"),
    ("path,label,reviwer\n", "unknown=['reviwer']"),
    ("path,label,path\n", "repeated=['path']"),
    ("", "the first row must be a header"),
])
def test_import_header_errors(db, root, capsys, tmp_path, text, message):
    rc, out, err = run(capsys, "relabel", "import", write_csv(tmp_path, text), "--dataset",
                       "tiny", "--reviewer", "bob", "--json")
    assert rc == 2 and out is None and message in err, err
    assert rows(db) == []


def test_import_of_a_header_only_file_writes_nothing(db, root, capsys, tmp_path):
    rc, out, _ = run(capsys, "relabel", "import", write_csv(tmp_path, "path,label\n"),
                     "--dataset", "tiny", "--json")
    assert rc == 0 and {k: out[k] for k in ("dataset", "count", "ids")} == {
        "dataset": "tiny", "count": 0, "ids": []}


def test_import_unknown_dataset_and_file(db, root, capsys, tmp_path):
    path = write_csv(tmp_path, f"path,label\n{N1},NORMAL\n")
    rc, _, err = run(capsys, "relabel", "import", path, "--dataset", "nope", "--reviewer", "b")
    assert rc == 2 and "dataset must name an indexed dataset (known: tiny)" in err
    rc, _, err = run(capsys, "relabel", "import", str(tmp_path / "none.csv"), "--dataset",
                     "tiny", "--reviewer", "b")
    assert rc == 2 and err.startswith("error: ") and "none.csv" in err


def test_import_refuses_text_that_is_not_utf8(db, root, capsys, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(f"path,label,note\n{N1},NORMAL,caf\xe9\n".encode("latin-1"))
    rc, _, err = run(capsys, "relabel", "import", str(path), "--dataset", "tiny",
                     "--reviewer", "b")
    assert rc == 2 and "expected UTF-8" in err
    assert rows(db) == []


def test_import_writes_in_one_transaction(db, root, monkeypatch, tmp_path):
    """A failure at the last INSERT rolls back the rows before it."""
    calls = []
    real = store.add_relabel

    def failing(**kw):
        calls.append(kw["image_id"])
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(**kw)

    monkeypatch.setattr(store, "add_relabel", failing)
    path = write_csv(tmp_path, f"path,label\n{N1},NORMAL\n{N2},NORMAL\n{N3},NORMAL\n")
    with pytest.raises(RuntimeError):
        relabel_import.import_relabels(db, dataset="tiny", source=path, reviewer="bob")
    assert len(calls) == 3 and rows(db) == []


# -- the same rows as the review page ---------------------------------------------------------

def test_page_function_cli_add_and_import_write_identical_rows(db, root, capsys, tmp_path):
    """The page's submit_relabel on one dataset, the CLI on two copies of it: same rows."""
    index_dataset(db, root, name="copy_add")
    index_dataset(db, root, name="copy_import")
    image = ds_store_image(db, P2)
    page_id = review.submit_relabel(db, image_id=image.id,
                                    choice=review.LabelChoice("PNEUMONIA", "bacteria"),
                                    reviewer="cli:Dr Test", note="air bronchograms")
    rc, rec, err = run(capsys, "relabel", "add", "--dataset", "copy_add", "--path", P2,
                       "--label", "PNEUMONIA", "--subtype", "bacteria", "--reviewer", "Dr Test",
                       "--note", "air bronchograms", "--json")
    assert rc == 0, err
    path = write_csv(tmp_path, f"path,label,subtype,note\n{P2},PNEUMONIA,bacteria,"
                               "air bronchograms\n")
    rc, out, err = run(capsys, "relabel", "import", path, "--dataset", "copy_import",
                       "--reviewer", "Dr Test", "--json")
    assert rc == 0, err
    page, by_add, by_import = (stored_row(db, i) for i in (page_id, rec["id"], out["ids"][0]))
    assert page == by_add == by_import
    assert page["image_sha256"] == image.sha256 and page["old_subtype"] == "virus"
    records = [rows(db, name)[0] for name in ("tiny", "copy_add", "copy_import")]
    assert len({(r.relpath, r.old_label, r.new_label, r.new_subtype, r.reviewer, r.note)
                for r in records}) == 1


def test_page_click_and_cli_write_identical_rows(db, root, capsys):
    """The real review page (AppTest) clicks a label; the CLI writes the same row."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    page = str(Path(__file__).resolve().parents[1] / "app_pages" / "review.py")
    index_dataset(db, root, name="zz_copy")  # the page's picker shows "tiny" first
    st.cache_resource.clear()
    st.cache_data.clear()
    try:
        at = AppTest.from_file(page, default_timeout=60).run()
        at.text_input(key="review_name").input("cli:Dr Test").run()
        at.radio(key="review_queue").set_value("class").run()
        assert at.selectbox(key="review_class").value == "NORMAL"
        assert at.button(key="review_label_2").label == "PNEUMONIA·virus"
        at.text_area(key="review_note").input("hazy left base").run()
        at.button(key="review_label_2").click().run()
        assert not at.exception, at.exception
    finally:
        st.cache_resource.clear()
        st.cache_data.clear()
    (clicked,) = rows(db, "tiny")
    rc, rec, err = run(capsys, "relabel", "add", "--dataset", "zz_copy", "--path",
                       clicked.relpath, "--label", "PNEUMONIA·virus", "--reviewer", "Dr Test",
                       "--note", "hazy left base", "--json")
    assert rc == 0, err
    assert stored_row(db, clicked.id) == stored_row(db, rec["id"])
    assert clicked.relpath == rec["path"]


def test_relabel_add_is_the_cli_identity_never_a_typed_name(db, root, capsys, monkeypatch):
    monkeypatch.setenv("CXR_CLI_IDENTITY", "dr.lee@h.org")
    capsys.readouterr()
    assert cli.main(["relabel", "add", "--dataset", "tiny", "--path", N1, "--label",
                     "PNEUMONIA·virus", "--json"]) == 0
    # what a shell on the server did is never the signed-in dr.lee's own (cli: prefix)
    assert json.loads(capsys.readouterr().out)["reviewer"] == "cli:dr.lee@h.org"
    for argv in (["relabel", "add", "--dataset", "tiny", "--path", N2, "--label", "NORMAL"],
                 ["relabel", "import", "-", "--dataset", "tiny"]):
        assert cli.main([*argv, "--reviewer", "mallory", "--json"]) == 2
        assert "never a typed name" in capsys.readouterr().err
    assert [r.reviewer for r in rows(db)] == ["cli:dr.lee@h.org"]
    monkeypatch.setenv("CXR_CLI_ROLES", "admin")
    assert cli.main(["audit", "list", "--action", "relabel", "--json"]) == 0
    [event] = json.loads(capsys.readouterr().out)["events"]
    assert event["actor"] == "cli:dr.lee@h.org" and event["target"].startswith("relabel:")
