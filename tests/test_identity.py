"""Stable image identity: re-indexing never loses a relabel, review item or prediction.

An image is (dataset, relpath); its hash is an attribute. These are the cases a user hits:
``touch``, a copy without mtimes, a re-export that changes the bytes, a file that goes away
and comes back, and a database made by the old schema.
"""
from __future__ import annotations

from pathlib import Path

import os
import shutil
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, delete, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from conftest import write_image
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)
from cxr_core.review import queues as review
from cxr_core.review.view import describe_entry
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage import datasets as dstore
from cxr_core.storage import evals as eval_store
from cxr_core.storage import relabels as rel_store, reviews as rstore
from db import models
from db.engine import make_engine, upgrade

NORMAL = "train/NORMAL/IM-0001-0001.jpeg"


def _ids(db, dataset_id):
    with db.session() as s:
        return {r.relpath: r.id for r in dstore.list_images(session=s, dataset_id=dataset_id,
                                                            include_missing=True)}


def _relabels(db, dataset_id):
    with db.session() as s:
        return rel_store.list_relabels(session=s, dataset_id=dataset_id)


def _current(db, dataset_id, image_id):
    with db.session() as s:
        return rel_store.current_labels(session=s, dataset_id=dataset_id).get(image_id)


@pytest.fixture()
def relabelled(tiny_dataset, cxr_home):
    """The tiny dataset indexed, one NORMAL image relabelled PNEUMONIA and sent to review."""
    db = open_db()
    rep = index_dataset(db, tiny_dataset)
    ids = _ids(db, rep.dataset_id)
    image_id = ids[NORMAL]
    rid = review.submit_relabel(db, image_id=image_id, reviewer="alice",
                                choice=review.LabelChoice("PNEUMONIA", "virus"))
    with db.session() as s:
        rstore.send_to_review(session=s, image_id=image_id, upload_sha256=None,
                              source="predict", sent_by="bob", run_ref=None,
                              predicted="PNEUMONIA", probs=[0.3, 0.7])
    return db, rep.dataset_id, image_id, rid, tiny_dataset


def test_touch_keeps_the_relabel_and_the_row(relabelled):
    db, dataset_id, image_id, rid, root = relabelled
    os.utime(root / NORMAL, ns=(10**18, 10**18))  # touch: new mtime, same bytes
    rep = index_dataset(db, root)
    assert rep.scanned == 1 and rep.content_changed == () and rep.changed_since_relabel == ()
    assert _ids(db, dataset_id)[NORMAL] == image_id
    assert [r.id for r in _relabels(db, dataset_id)] == [rid]
    assert _current(db, dataset_id, image_id) == ("PNEUMONIA", "virus")
    with db.session() as s:
        assert [i.image_id for i in rstore.list_review_items(session=s, dataset_id=dataset_id)] \
            == [image_id]


def test_copy_without_mtimes_keeps_everything(relabelled, tmp_path):
    db, dataset_id, image_id, rid, root = relabelled
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # like cp -r: new mtimes
    shutil.rmtree(root)
    copy.rename(root)  # the same dataset path, every file rewritten
    rep = index_dataset(db, root)
    assert rep.scanned == 18 and rep.removed == 0 and rep.content_changed == ()
    assert rep.summary["images"] == 18 and rep.warnings == []
    assert _ids(db, dataset_id)[NORMAL] == image_id
    assert _current(db, dataset_id, image_id) == ("PNEUMONIA", "virus")


def test_changed_bytes_keep_the_relabel_and_are_flagged(relabelled):
    db, dataset_id, image_id, rid, root = relabelled
    with db.session() as s:
        before = s.get(models.ImageRow, image_id).sha256
    write_image(root / NORMAL, seed=777)  # a re-export: other bytes under the same name
    rep = index_dataset(db, root)
    assert rep.content_changed == (NORMAL,)
    assert rep.changed_since_relabel == (NORMAL,)
    assert any("changed since they were relabelled" in w for w in rep.warnings)
    assert rep.to_json()["changed_since_relabel"] == [NORMAL]
    assert _ids(db, dataset_id)[NORMAL] == image_id
    assert _current(db, dataset_id, image_id) == ("PNEUMONIA", "virus")  # kept, not dropped
    with db.session() as s:
        row = s.get(models.ImageRow, image_id)
        assert row.previous_sha256 == before and row.sha256 != before
        assert row.content_changed_at is not None
        flagged = rel_store.changed_since_relabel(session=s, dataset_id=dataset_id)
    assert [(c.image_id, c.relabel_id, c.relabelled_sha256) for c in flagged] == \
        [(image_id, rid, before)]
    # The Review state shows it; a new relabel made on the new bytes clears the flag.
    state = review.load_state(db, dataset_id)
    assert image_id in state.changed_since_relabel
    review.submit_relabel(db, image_id=image_id, reviewer="alice",
                          choice=review.LabelChoice("NORMAL", None))
    assert review.load_state(db, dataset_id).changed_since_relabel == {}


def test_gone_file_is_marked_missing_and_comes_back_with_its_history(relabelled):
    db, dataset_id, image_id, rid, root = relabelled
    moved = root.parent / "aside.jpeg"
    (root / NORMAL).rename(moved)
    rep = index_dataset(db, root)
    assert rep.removed == 1 and rep.missing == 1 and rep.summary["images"] == 17
    assert any("missing from disk" in w for w in rep.warnings)
    with db.session() as s:
        row = s.get(models.ImageRow, image_id)
        assert row.missing and row.missing_since is not None
        present = {r.id for r in dstore.list_images(session=s, dataset_id=dataset_id)}
        assert image_id not in present  # left out of training, evaluation and label sets
        assert image_id not in rel_store.current_labels(session=s, dataset_id=dataset_id)
        assert dstore.get_dataset(session=s, name_or_id=dataset_id).n_images == 17
    assert [r.id for r in _relabels(db, dataset_id)] == [rid]  # the relabel is still there
    moved.rename(root / NORMAL)
    rep = index_dataset(db, root)
    assert rep.restored == 1 and rep.missing == 0 and rep.summary["images"] == 18
    assert _ids(db, dataset_id)[NORMAL] == image_id
    assert _current(db, dataset_id, image_id) == ("PNEUMONIA", "virus")


def test_no_cascade_can_remove_a_relabel(relabelled):
    db, dataset_id, image_id, rid, root = relabelled
    for table in ("relabels", "review_items"):
        for fk in models.Base.metadata.tables[table].foreign_keys:
            assert fk.ondelete is None, (table, fk)
    insp = inspect(db.engine)
    for table in ("relabels", "review_items"):
        for fk in insp.get_foreign_keys(table):
            assert (fk.get("options") or {}).get("ondelete") is None, (table, fk)
    with pytest.raises(IntegrityError):  # deleting the image (or its dataset) is refused
        with db.session() as s:
            s.execute(delete(models.ImageRow).where(models.ImageRow.id == image_id))
    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.execute(delete(models.Dataset).where(models.Dataset.id == dataset_id))
    assert [r.id for r in _relabels(db, dataset_id)] == [rid]


def _old_schema_db(url):
    """A DB made by schema 0002 with a dataset, relabels (one undone), an upload relabel,
    review items, a run with an evaluation and its predictions."""
    engine = make_engine(url)
    upgrade(engine, "0002")
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    with engine.begin() as c:
        c.execute(text("INSERT INTO datasets (id, name, root, layout, classes_json, created_at) "
                       "VALUES (1, 'kermany', '/data', 'kaggle', '[\"NORMAL\",\"PNEUMONIA\"]', "
                       ":t)"), {"t": now})
        for i, (rel, label) in enumerate([("train/NORMAL/a.jpeg", "NORMAL"),
                                          ("train/PNEUMONIA/b.jpeg", "PNEUMONIA")], 1):
            c.execute(text("INSERT INTO images (id, dataset_id, relpath, split, label, sha256) "
                           "VALUES (:i, 1, :r, 'train', :l, :h)"),
                      {"i": i, "r": rel, "l": label, "h": f"{i:064x}"})
        rel = ("INSERT INTO relabels (id, image_id, upload_sha256, old_label, new_label, "
               "reviewer, note, created_at, undo_of) VALUES (:id, :img, :up, :o, :n, :who, "
               "'', :t, :undo)")
        for row in [dict(id=1, img=1, up=None, o="NORMAL", n="PNEUMONIA", who="alice", undo=None),
                    dict(id=2, img=1, up=None, o="PNEUMONIA", n="NORMAL", who="bob", undo=1),
                    dict(id=3, img=2, up=None, o="PNEUMONIA", n="NORMAL", who="alice", undo=None),
                    dict(id=4, img=None, up="f" * 64, o="", n="NORMAL", who="carol", undo=None)]:
            c.execute(text(rel), dict(row, t=now))
        c.execute(text("INSERT INTO review_items (id, image_id, source, sent_by, created_at, "
                       "done) VALUES (1, 2, 'predict', 'dave', :t, :no)"), {"t": now, "no": False})
        c.execute(text("INSERT INTO runs (id, name, status, config_json, created_at, "
                       "cancel_requested, resume_requested, epochs_done) VALUES "
                       "(1, 'r', 'finished', '{}', :t, :no, :no, 3)"), {"t": now, "no": False})
        c.execute(text("INSERT INTO evaluations (id, run_id, model_ref, split, source, "
                       "labels_json, images_key, metrics_json, created_at) VALUES "
                       "(1, 1, 'run:1', 'val', '/data', '[]', 'k', '{}', :t)"), {"t": now})
        c.execute(text("INSERT INTO eval_predictions (id, evaluation_id, image_id, path, y_true, "
                       "probs_json) VALUES (1, 1, 2, 'b.jpeg', 1, '[0.2,0.8]')"))
        for threshold in (0.4, 0.7):  # the run's threshold history (ids from the sequence)
            c.execute(text("INSERT INTO operating_points (run_id, threshold, method, "
                           "changed_by, note, created_at) VALUES (1, :t, 'sensitivity', "
                           "'training', '', :at)"), {"t": threshold, "at": now})
    engine.dispose()
    return url


TABLES = ("datasets", "images", "relabels", "review_items", "runs", "evaluations",
          "eval_predictions", "operating_points")


@pytest.fixture(params=["sqlite", "postgresql"])
def old_db_url(request, tmp_path):
    """An empty database URL: a SQLite file, or the CI PostgreSQL (a clean schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return request.getfixturevalue("pg_url")


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[1] / "db" /
                                               "migrations"))
    return ScriptDirectory.from_config(cfg).get_current_head()


HEAD = _head()


def test_old_schema_database_upgrades_without_loss(old_db_url):
    url = _old_schema_db(old_db_url)
    raw = create_engine(url)
    with raw.connect() as c:
        before = {t: c.execute(text(f"SELECT * FROM {t} ORDER BY id")).mappings().all()
                  for t in TABLES}
    raw.dispose()
    db = open_db(url=url)  # migrates to head
    with db.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == HEAD
        for t in TABLES:
            after = c.execute(text(f"SELECT * FROM {t} ORDER BY id")).mappings().all()
            assert len(after) == len(before[t]), t
            for old, new in zip(before[t], after):  # every old column keeps its value
                assert {k: new[k] for k in old} == dict(old), t
        sha = dict(c.execute(text("SELECT id, image_sha256 FROM relabels")).all())
        # 0005: the model output as SQL columns, from the stored probabilities.
        (score, pred, margin), = c.execute(text(
            "SELECT score, pred_index, top2_margin FROM eval_predictions")).all()
        assert c.execute(text("SELECT n_predictions FROM evaluations")).scalar() == 1
        # 0007: every old operating point is its run's global one.
        scoped = c.execute(text("SELECT id, model_ref, dataset_id, sample_n FROM "
                                "operating_points ORDER BY id")).all()
        # 0008: runs from before sign-in have no owner; the audit log starts empty.
        owners = c.execute(text("SELECT created_by FROM runs")).scalars().all()
        n_audit = c.execute(text("SELECT COUNT(*) FROM audit_events")).scalar()
        # 0009: jobs name who asked for them (none from before).
        assert c.execute(text("SELECT COUNT(*) FROM jobs WHERE created_by IS NOT NULL")
                         ).scalar() == 0
    assert (score, pred, margin) == pytest.approx((0.8, 1, 0.6))
    assert owners and set(owners) == {None} and n_audit == 0
    assert sha == {1: "1".zfill(64), 2: "1".zfill(64), 3: "2".zfill(64), 4: None}
    assert [tuple(r) for r in scoped] == [(1, "run:1", None, None), (2, "run:1", None, None)]
    with db.session() as s:
        assert eval_store.latest_operating_point(session=s, run_id=1).threshold == 0.7
        site = eval_store.add_operating_point(  # the shipped model, calibrated for a site
            session=s, run_id=None, model_ref="default", dataset_id=1, threshold=0.9,
            method="sensitivity", target=0.95, sensitivity=1.0, specificity=0.5,
            changed_by="dr site", sample_n=2, details={"chosen_on": "site"})
        assert eval_store.latest_operating_point(session=s, run_id=1).threshold == 0.7
        assert eval_store.site_operating_point(session=s, model_ref="default",
                                               dataset_id=1) == site
    with db.session() as s:
        assert rel_store.current_labels(session=s, dataset_id=1) == {1: ("NORMAL", None),
                                                                    2: ("NORMAL", None)}
        assert s.scalar(select(func.count()).select_from(models.ImageRow).where(
            models.ImageRow.missing.is_(False))) == 2
    with pytest.raises(IntegrityError):  # the old cascade is gone
        with db.session() as s:
            s.execute(delete(models.ImageRow).where(models.ImageRow.id == 2))
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(models.Relabel)) == 4
    db.engine.dispose()


def test_review_queue_of_changed_images_empties_when_relabelled(relabelled):
    db, dataset_id, image_id, rid, root = relabelled
    write_image(root / NORMAL, seed=778)
    index_dataset(db, root)
    state = review.load_state(db, dataset_id)
    view = review.next_in_queue(db, state, "changed", reviewer="alice")  # alice made the old one
    assert view.current is not None and view.current.image_id == image_id
    info = describe_entry(db, state, view.current)
    assert info.warning and "changed since it was relabelled" in info.warning
    review.submit_relabel(db, image_id=image_id, reviewer="bob",
                          choice=review.LabelChoice("PNEUMONIA", "virus"))
    state = review.load_state(db, dataset_id)
    assert review.next_in_queue(db, state, "changed", reviewer="alice").current is None
    assert describe_entry(db, state, review.QueueEntry(image_id, None, None, None)).warning \
        is None
