"""Jobs a worker runs for the pages: indexing (also CXR_DATA_DIR at start) and CSV export."""
from __future__ import annotations

import csv
import io

import pytest

from cxr_core import app
from cxr_core.data import indexing
from cxr_core.jobs import queue
from cxr_core.review import export as review_export
from cxr_core.jobs import launcher
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage import relabels as rel_store


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """The test plays the worker (``run_job``); no process is launched."""
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)


def test_index_job_indexes_in_the_worker_and_reports(cxr_home, tiny_dataset):
    db = open_db()
    job_id = queue.submit(db, "index", {"path": str(tiny_dataset), "name": "tiny"})
    assert indexing.list_datasets(db) == []  # queued only: nothing read yet
    job = app.run_job(db, job_id)
    assert job.status == "finished", job.error
    assert job.result["dataset"] == "tiny" and job.result["images"] == 18
    assert job.result["scanned"] == 18 and job.result["warnings"] == []
    assert (job.done, job.total) == (18, 18)
    (info,) = indexing.list_datasets(db)
    assert info.id == job.result["dataset_id"] and info.n_images == 18


def test_an_index_job_on_a_bad_path_fails_with_its_message(cxr_home, tmp_path):
    db = open_db()
    job = app.run_job(db, queue.submit(db, "index", {"path": str(tmp_path / "nope"),
                                                     "name": None}))
    assert job.status == "failed" and "nope" in job.error


def test_submit_once_reuses_a_queued_or_running_job(cxr_home, tiny_dataset):
    db = open_db()
    params = {"path": str(tiny_dataset), "name": None}
    first = queue.submit_once(db, "index", params)
    assert queue.submit_once(db, "index", params) == first  # two tabs, one job
    assert queue.submit_once(db, "index", {**params, "name": "other"}) != first
    app.run_job(db, first)
    assert queue.submit_once(db, "index", params) != first  # done: a new index is a new job
    assert [j.kind for j in queue.recent_jobs(db, "index")] == ["index"] * 3


def test_app_start_queues_one_index_job_per_data_dir(cxr_home, tiny_dataset, tmp_path,
                                                     monkeypatch):
    other = tmp_path / "other"
    (other / "NORMAL").mkdir(parents=True)
    from conftest import write_image
    write_image(other / "NORMAL" / "IM-0001-0001.png")
    monkeypatch.setenv("CXR_DATA_DIR", f"{tiny_dataset}:{other}")
    db, job_ids = app.open_app_db()
    assert len(job_ids) == 2 and indexing.list_datasets(db) == []  # the web process reads none
    assert app.open_app_db()[1] == job_ids  # a second app process: the same jobs
    assert app.run_worker(once=True, kinds="jobs")["jobs"] == job_ids  # the queue, in order
    assert sorted(d.n_images for d in indexing.list_datasets(db)) == [1, 18]


def test_export_job_writes_every_relabel_page_by_page(cxr_home, tiny_dataset, monkeypatch):
    db = open_db()
    dataset_id = index_dataset(db, tiny_dataset, name="tiny").dataset_id
    with db.session() as s:
        ids = sorted(rel_store.original_labels(session=s, dataset_id=dataset_id))
    for n, image_id in enumerate(ids[:5]):
        db.write(lambda s: rel_store.add_relabel(session=s, image_id=image_id,
                                                 new_label="PNEUMONIA", new_subtype="virus",
                                                 reviewer=f"=HYPERLINK(r{n})", note=""))
    db.write(lambda s: rel_store.undo_relabel(session=s, relabel_id=1, reviewer="a"))
    monkeypatch.setattr(review_export, "EXPORT_PAGE", 2)  # three pages and a half
    job = app.run_job(db, queue.submit(db, "export_relabels", {"dataset_id": dataset_id}))
    assert job.status == "finished", job.error
    assert job.result["rows"] == 6 and (job.done, job.total) == (6, 6)
    text = open(job.result["path"], encoding="utf-8").read()
    assert text == review_export.export_relabels_csv(db, dataset_id)  # the same CSV, streamed
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["id"]) for r in rows] == list(range(1, 7))
    assert rows[0]["reviewer"].startswith("'=")  # formula-injection guarded
    assert str(cxr_home) in job.result["path"] and not list(cxr_home.rglob("*.part"))


def test_unknown_job_kind_is_refused(cxr_home):
    from cxr_core.core.errors import ConfigError

    with pytest.raises(ConfigError, match="job kind"):
        queue.submit(open_db(), "mine_bitcoin", {})
