"""Class balance in SQL: every aggregate equals the same count made in Python over the
records (labels derived by the one Python rule, relabels, undo and "as of" included), on
SQLite and PostgreSQL; the split preview is a job whose result is kept per label version."""
from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import pytest
from conftest import write_image
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core.data import balance_report
from cxr_core.data import indexing
from cxr_core.jobs import queue
from cxr_core.review import queues as review
from cxr_core.jobs import launcher
from cxr_core.data.datasets import cross_split_patients, find_duplicates
from cxr_core.core.labels import scheme_label
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core import app


@pytest.fixture(params=["sqlite", "postgresql"])
def ds(request, cxr_home, tmp_path):
    """A Kaggle-layout set with subtypes, a duplicate across splits, a patient in two split
    folders, an unreadable file and three relabels (one undone)."""
    root = tmp_path / "ds"
    for i in range(6):
        write_image(root / "train" / "NORMAL" / f"IM-{i + 1:04d}-0001.png", seed=i)
    for i in range(8):
        kind = "bacteria" if i % 2 else "virus"
        write_image(root / "train" / "PNEUMONIA" / f"person{i // 2 + 1}_{kind}_{i}.png",
                    seed=50 + i)
    write_image(root / "test" / "PNEUMONIA" / "person1_virus_99.png", seed=99)  # leaked
    write_image(root / "test" / "NORMAL" / "IM-0100-0001.png", seed=100)
    shutil.copy(root / "train" / "NORMAL" / "IM-0001-0001.png",
                root / "test" / "NORMAL" / "IM-0101-0001.png")  # duplicate across splits
    write_image(root / "train" / "PNEUMONIA" / "person9_0.png", seed=9)  # no subtype
    (root / "train" / "NORMAL" / "IM-0999-0001.png").write_bytes(b"broken")
    db = open_db() if request.param == "sqlite" else open_db(url=request.getfixturevalue("pg_url"))
    dataset_id = index_dataset(db, root, name="ds").dataset_id
    recs = sorted(indexing.indexed_records(db, dataset_id), key=lambda r: r.relpath)
    normal = [r for r in recs if r.label == "NORMAL" and not r.error]
    ids = [review.submit_relabel(db, image_id=normal[0].id, reviewer="a",
                                 choice=review.LabelChoice("PNEUMONIA", "virus")),
           review.submit_relabel(db, image_id=normal[1].id, reviewer="a",
                                 choice=review.LabelChoice("PNEUMONIA", "bacteria"))]
    ids.append(review.submit_undo(db, relabel_id=ids[1], reviewer="a"))
    return db, dataset_id, ids


def python_tables(records, scheme):
    ok = [r for r in records if not r.error]
    labels = [scheme_label(r.label, r.subtype, scheme) for r in ok]
    counts = Counter((r.split or "(none)", y or "(no class)", r.subtype or "—")
                     for r, y in zip(ok, labels))
    pats = defaultdict(set)
    for r, y in zip(ok, labels):
        if y:
            pats[y].add(r.patient or f"img:{r.id}")
    return counts, {c: len(p) for c, p in pats.items()}, sum(y is None for y in labels), ok


@pytest.mark.parametrize("scheme", ["binary", "three_class", "folders"])
def test_sql_aggregates_equal_python_counts(ds, scheme):
    db, dataset_id, (r1, r2, undo) = ds
    versions = [(False, None, indexing.indexed_records(db, dataset_id))]
    for as_of in (r1, r2, undo, None):  # every label version, "as of now" last
        versions.append((True, as_of, indexing.current_records(db, dataset_id,
                                                               as_of_relabel_id=as_of)))
    for current, as_of, records in versions:
        t = balance_report.balance_tables(db, dataset_id, scheme, current=current,
                                          as_of_relabel_id=as_of)
        counts, patients, unlabelled, ok = python_tables(records, scheme)
        assert {(c["split"], c["class"], c["subtype"]): c["images"] for c in t.counts} == counts
        assert {p["class"]: p["patients"] for p in t.patients} == patients
        assert t.unlabelled == unlabelled and t.images == len(ok)
        assert t.duplicate_groups == len(find_duplicates(ok)) == 1
        assert {d["relpath"] for d in t.duplicates} == {"train/NORMAL/IM-0001-0001.png",
                                                        "test/NORMAL/IM-0101-0001.png"}
        assert {p["patient"]: p["splits"] for p in t.leaked_patients} == {
            p: ", ".join(s) for p, s in cross_split_patients(ok).items()} and t.n_leaked == 1
        assert sum(s["images"] for s in t.sizes) == len(ok)


def test_current_counts_follow_relabel_and_undo(ds):
    db, dataset_id, (r1, r2, undo) = ds

    def normals(**kw):
        t = balance_report.balance_tables(db, dataset_id, "binary", **kw)
        return sum(c["images"] for c in t.counts if c["class"] == "NORMAL")

    orig = normals()
    assert normals(current=True, as_of_relabel_id=r1) == orig - 1
    assert normals(current=True, as_of_relabel_id=r2) == orig - 2
    assert normals(current=True, as_of_relabel_id=undo) == orig - 1 == normals(current=True)
    assert indexing.relabel_position(db, dataset_id) == (3, undo)


def test_samples_and_server_side_search(ds):
    db, dataset_id, _ = ds
    samples = indexing.sample_images(db, dataset_id, per_class=3)
    assert sorted(samples) == ["NORMAL", "PNEUMONIA"]
    assert [len(v) for v in samples.values()] == [3, 3]  # spread: every (n // 3)th path
    assert [rel for rel, _, _ in samples["NORMAL"]] == [
        "test/NORMAL/IM-0100-0001.png", "train/NORMAL/IM-0001-0001.png",
        "train/NORMAL/IM-0003-0001.png"]  # 8 readable normals: paths 1, 3, 5
    assert all("IM-0999" not in rel for v in samples.values() for rel, _, _ in v)  # unreadable
    found = indexing.search_images(db, dataset_id, "VIRUS")
    assert found and all("virus" in p for _, p in found)  # case-insensitive
    assert indexing.search_images(db, dataset_id, "%") == []  # LIKE wildcards are literal
    assert len(indexing.search_images(db, dataset_id, "_")) == 10  # the pneumonia names
    assert len(indexing.search_images(db, dataset_id, "", limit=4)) == 4
    normal = indexing.search_images(db, dataset_id, "", label="NORMAL", limit=100)
    assert {p.split("/")[1] for _, p in normal} == {"NORMAL"} and len(normal) == 8
    image_id, relpath = normal[0]
    assert indexing.get_images(db, [image_id])[0].relpath == relpath


def test_split_preview_is_a_job_kept_per_label_version(ds, monkeypatch):
    db, dataset_id, (r1, _, undo) = ds
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    params = dict(dataset_id=dataset_id, scheme="binary", val_fraction=0.25, seed=3,
                  labels="current", as_of_relabel_id=undo, indexed_at="t")
    job_id = queue.submit_once(db, "split_preview", params)
    assert queue.latest_job(db, "split_preview", dict(reversed(params.items()))).id == job_id
    job = app.run_job(db, job_id)
    assert job.status == "finished", job.error
    direct = balance_report.split_preview(db, dataset_id, "binary", val_fraction=0.25, seed=3,
                                          as_of_relabel_id=undo, current=True)
    assert job.result == direct.to_json() and direct.split_overlap == 0
    assert sum(c["images"] for c in direct.split_counts) == 18  # every readable one (binary)
    assert queue.latest_job(db, "split_preview", {**params, "as_of_relabel_id": r1}) is None


def test_label_version_of_some_images_equals_the_dataset_derivation(ds):
    """What Compare re-scores with (SQL over the evaluated images only) agrees with the one
    Python derivation over the whole dataset, as of every relabel id."""
    from cxr_core.storage import relabels

    db, dataset_id, ids = ds
    for as_of in (None, 0, *ids):
        with db.session() as s:
            whole = relabels.label_version(session=s, dataset_id=dataset_id,
                                           as_of_relabel_id=as_of, include_missing=True)
            some = sorted(whole.labels)[::2]
            part = relabels.image_label_version(session=s, image_ids=some,
                                                as_of_relabel_id=as_of)
        assert part.labels == {i: whole.labels[i] for i in some}
        assert (part.newest_relabel_id, part.n_relabels) == (whole.newest_relabel_id,
                                                             whole.n_relabels)


def test_current_tables_job_keeps_the_same_tables(ds, monkeypatch):
    db, dataset_id, (_, _, undo) = ds
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    params = dict(dataset_id=dataset_id, scheme="three_class", as_of_relabel_id=undo,
                  indexed_at="t")
    job = app.run_job(db, queue.submit_once(db, "balance_tables", params))
    assert job.status == "finished", job.error
    direct = balance_report.balance_tables(db, dataset_id, "three_class", current=True,
                                           as_of_relabel_id=undo)
    assert balance_report.Aggregates(**job.result) == direct  # through JSON and back
