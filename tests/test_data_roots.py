"""Data roots (issue 15 item 4): what may be indexed, what a scan reads, which weights files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr_core.core import data_roots
from cxr_core.data import datasets
from cxr_core.core.errors import PathNotAllowed
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from conftest import write_image


def real(p: Path) -> Path:
    return Path(os.path.realpath(p))


@pytest.fixture()
def db(cxr_home):
    return open_db()


@pytest.fixture()
def area(tmp_path) -> dict[str, Path]:
    """An allowed root with a two-class dataset, and an outside folder with a private image."""
    root, outside = tmp_path / "data", tmp_path / "private"
    for i, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for j in range(2):
            write_image(root / "ds" / cls / f"IM-{i}{j}-0001.jpeg", seed=10 * i + j)
    write_image(outside / "secret.jpeg", seed=99)
    write_image(outside / "NORMAL" / "other.jpeg", seed=98)
    return {"root": root, "outside": outside, "ds": root / "ds"}


# -- Which roots ------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),  # local mode: unrestricted
    ({"CXR_AUTH_MODE": "oidc"}, ()),  # sign-in on and no data dir: nothing but the demo
    ({"CXR_AUTH_MODE": "oidc", "CXR_DATA_DIR": "{a}"}, ("{a}",)),
    ({"CXR_DATA_ROOTS": "{a}{sep}{b}"}, ("{a}", "{b}")),
    ({"CXR_DATA_ROOTS": " {a} {sep}{sep}", "CXR_AUTH_MODE": "oidc", "CXR_DATA_DIR": "{b}"},
     ("{a}",)),  # explicit roots win over the data dirs; blanks ignored
    ({"CXR_DATA_DIR": "{a}"}, None),  # local mode ignores the data dirs
    # A shared database (issue 26 item 7): every worker and CLI restricts, sign-in or not.
    ({"CXR_DB_URL": "postgresql+psycopg2://cxr@db.h.org/cxr"}, ()),
    ({"CXR_DB_URL": "postgresql+psycopg2://cxr@db.h.org/cxr", "CXR_DATA_DIR": "{a}"},
     ("{a}",)),
    ({"CXR_DB_URL": "sqlite:///{a}/cxr.db"}, None),  # a local SQLite file is not shared
])
def test_allowed_roots_from_the_environment(cxr_home, monkeypatch, tmp_path, env, expected):
    a, b = tmp_path / "a", tmp_path / "b"
    fill = {"a": str(a), "b": str(b), "sep": os.pathsep}
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**fill))
    got = data_roots.allowed_roots()
    # A restricted list always ends with the repository's own demo films (issue 26 item 7).
    want = None if expected is None else tuple(real(Path(e.format(**fill))) for e in expected) \
        + (real(data_roots.DEMO_DIR),)
    assert got == want


def test_the_embedded_demo_films_are_always_an_allowed_root(cxr_home, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_AUTH_MODE", "oidc")
    demo = data_roots.DEMO_DIR / "chest_xray_mini"
    assert data_roots.check_path(demo) == real(demo)
    assert "only the embedded demo films" in data_roots.describe(data_roots.allowed_roots())
    with pytest.raises(PathNotAllowed):
        data_roots.check_path(tmp_path)


def test_auth_on_default_is_the_data_dirs_only(cxr_home, monkeypatch, area):
    monkeypatch.setenv("CXR_AUTH_MODE", "oidc")
    monkeypatch.setenv("CXR_DATA_DIR", str(area["ds"]))
    assert data_roots.check_path(area["ds"] / "NORMAL") == real(area["ds"] / "NORMAL")
    with pytest.raises(PathNotAllowed, match="outside the allowed data roots"):
        data_roots.check_path(area["root"])  # the parent of a data dir is not a root
    with pytest.raises(PathNotAllowed):
        data_roots.check_path("/")


def test_local_mode_is_unrestricted(cxr_home, area):
    assert data_roots.allowed_roots() is None
    assert data_roots.check_path(area["outside"]) == real(area["outside"])
    assert data_roots.check_weights(str(area["outside"] / "w.keras")) == real(
        area["outside"] / "w.keras")


# -- check_path -------------------------------------------------------------------------------

def test_inside_allowed_outside_refused_with_the_roots_named(area):
    roots = (real(area["root"]),)
    assert data_roots.check_path(area["ds"], roots=roots) == real(area["ds"])
    assert data_roots.check_path(area["root"], roots=roots) == real(area["root"])
    with pytest.raises(PathNotAllowed) as exc:
        data_roots.check_path(area["outside"], roots=roots)
    msg = str(exc.value)
    assert str(area["outside"]) in msg and str(real(area["root"])) in msg
    assert "CXR_DATA_ROOTS" in msg
    with pytest.raises(PathNotAllowed, match="no folder"):
        data_roots.check_path(area["ds"], roots=())


def test_a_sibling_with_a_common_prefix_is_not_inside(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(PathNotAllowed):
        data_roots.check_path(tmp_path / "data2", roots=(real(tmp_path / "data"),))
    with pytest.raises(PathNotAllowed):  # .. out of the root
        data_roots.check_path(tmp_path / "data" / ".." / "data2", roots=(real(tmp_path / "data"),))


def test_symlinked_folder_out_of_a_root_is_refused(area):
    link = area["root"] / "escape"
    link.symlink_to(area["outside"], target_is_directory=True)
    with pytest.raises(PathNotAllowed, match="resolves to"):
        data_roots.check_path(link, roots=(real(area["root"]),))


# -- Indexing and the scan --------------------------------------------------------------------

def test_indexing_outside_the_roots_is_refused(db, monkeypatch, area):
    monkeypatch.setenv("CXR_DATA_ROOTS", str(area["root"]))
    rep = index_dataset(db, area["ds"], name="ok")
    assert rep.summary["images"] == 4
    with pytest.raises(PathNotAllowed):
        index_dataset(db, area["outside"], name="private")
    link = area["root"] / "escape"
    link.symlink_to(area["outside"], target_is_directory=True)
    with pytest.raises(PathNotAllowed):
        index_dataset(db, link, name="escape")


def test_symlinked_file_in_a_dataset_pointing_out_is_not_read(db, monkeypatch, area):
    monkeypatch.setenv("CXR_DATA_ROOTS", str(area["root"]))
    (area["ds"] / "NORMAL" / "IM-77-0001.jpeg").symlink_to(area["outside"] / "secret.jpeg")
    (area["ds"] / "PNEUMONIA" / "more").symlink_to(area["outside"] / "NORMAL",
                                                   target_is_directory=True)
    rep = index_dataset(db, area["ds"], name="ds")
    assert rep.summary["images"] == 4  # the two links are rows, but unreadable
    assert rep.summary["unreadable"] == 2
    bad = [p for p in rep.problems if datasets.OUTSIDE_ROOTS in p]
    assert sorted(p.split(":")[0] for p in bad) == ["NORMAL/IM-77-0001.jpeg",
                                                    "PNEUMONIA/more/other.jpeg"]
    from cxr_core.data.indexing import indexed_records
    rows = {r.relpath: r for r in indexed_records(db, rep.dataset_id)}
    assert rows["NORMAL/IM-77-0001.jpeg"].sha256 is None  # never opened: no hash


def test_a_symlink_within_the_roots_is_read(db, monkeypatch, area):
    monkeypatch.setenv("CXR_DATA_ROOTS", str(area["root"]))
    write_image(area["root"] / "shared" / "x.jpeg", seed=5)
    (area["ds"] / "NORMAL" / "IM-88-0001.jpeg").symlink_to(area["root"] / "shared" / "x.jpeg")
    rep = index_dataset(db, area["ds"], name="ds")
    assert rep.summary["images"] == 5 and rep.summary["unreadable"] == 0


def test_local_mode_still_reads_symlinks_out(db, area):
    (area["ds"] / "NORMAL" / "IM-77-0001.jpeg").symlink_to(area["outside"] / "secret.jpeg")
    rep = index_dataset(db, area["ds"], name="ds")
    assert rep.summary["unreadable"] == 0


# -- Weights files ----------------------------------------------------------------------------

def test_weights_path_outside_the_roots_is_refused(cxr_home, monkeypatch, area):
    monkeypatch.setenv("CXR_DATA_ROOTS", str(area["root"]))
    with pytest.raises(PathNotAllowed, match="weights file"):
        data_roots.check_weights(str(area["outside"] / "w.weights.h5"))
    assert data_roots.check_weights(str(area["root"] / "w.keras")) == real(area["root"] / "w.keras")
    home_file = cxr_home / "runs" / "1" / "model.keras"
    assert data_roots.check_weights(str(home_file)) == real(home_file)
    repo_models = Path(data_roots.__file__).resolve().parents[2] / "models" / "x.keras"
    assert data_roots.check_weights(str(repo_models)) == real(repo_models)
    for ref in (None, "", "imagenet", "run:3"):
        assert data_roots.check_weights(ref) is None


def test_make_config_refuses_weights_outside_the_roots(db, monkeypatch, area):
    from cxr_core.training.service import make_config

    monkeypatch.setenv("CXR_DATA_ROOTS", str(area["root"]))
    index_dataset(db, area["ds"], name="ds")
    weights = area["outside"] / "w.weights.h5"
    weights.write_bytes(b"")
    with pytest.raises(PathNotAllowed, match="weights file"):
        make_config(db, {"dataset": "ds", "model": "custom5_224", "weights": str(weights)})
    with pytest.raises(PathNotAllowed, match="dataset folder"):  # a path not indexed yet
        make_config(db, {"dataset": str(area["outside"])})


# -- A shared database: workers and the CLI enforce the roots (issue 26 item 7) ---------------

SHARED = "postgresql+psycopg2://cxr@db.example.org/cxr"


def test_a_worker_on_a_shared_database_refuses_a_job_outside_the_roots(db, monkeypatch, area):
    """A job queued by anyone on the shared database (here written directly, as a remote
    submitter would) is checked again where it runs: the worker's own data roots."""
    from cxr_core import app
    from cxr_core.jobs import queue

    monkeypatch.setenv("CXR_DB_URL", SHARED)  # what the worker's host is configured with
    monkeypatch.setenv("CXR_DATA_DIR", str(area["ds"]))
    monkeypatch.setenv("CXR_PATIENT_SALT", "shared-salt")
    bad = queue.submit(db, "index", {"path": str(area["outside"]), "name": "private"},
                       start_worker=False)
    good = queue.submit(db, "index", {"path": str(area["ds"]), "name": "ok"},
                        start_worker=False)
    done = {j: queue.run_job(db, j, app.job_handlers()) for j in (bad, good)}
    assert done[bad].status == "failed"
    assert "outside the allowed data roots" in done[bad].error
    assert "the database is shared" not in done[bad].error  # a data dir is set: it is named
    assert done[good].status == "finished" and done[good].result["images"] == 4


def test_the_cli_on_a_shared_database_refuses_a_path_outside_the_roots(cxr_home, monkeypatch,
                                                                        area, capsys):
    from cxr_core.cli import main

    monkeypatch.setenv("CXR_DB_URL", SHARED)  # never reached: the path is refused first
    code = main(["index", str(area["outside"]), "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "outside the allowed data roots" in err
    assert "the database is shared and neither CXR_DATA_ROOTS nor CXR_DATA_DIR is set" in err
