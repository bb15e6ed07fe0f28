"""Retention of review uploads and exports (issue 26 item 8): the setting, what the cleanup may
and may never delete, the job, the CLI and the worker's daily schedule."""
from __future__ import annotations

import io
import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_core import app
from cxr_core.core.errors import ConfigError
from cxr_core.jobs import queue
from cxr_core.predict.inference import ImageInput
from cxr_core.predict.uploads import store_upload, upload_path
from cxr_core.review import queues as review
from cxr_core.review import retention
from cxr_core.storage import open_db
from cxr_core.storage import reviews as review_store
from sqlalchemy import update

DAY = 24 * 3600


@pytest.fixture()
def db(cxr_home, monkeypatch):
    for var in retention.ENV.values():
        monkeypatch.delenv(var, raising=False)
    return open_db()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _age(path: Path, days: float) -> None:
    when = time.time() - days * DAY
    os.utime(path, (when, when))


def _upload(db, value: int, *, sent: bool = True, days_old: float = 40) -> tuple[str, Path]:
    """An upload stored by hash, sent to review (an open item) unless ``sent`` is False, with
    its file and its item dated ``days_old`` ago."""
    sha = store_upload(ImageInput(f"scan{value}.png", data=_png(value)))
    if sent:
        item = db.write(lambda s: review_store.send_to_review(
            session=s, image_id=None, upload_sha256=sha, source="predict", run_ref="default",
            predicted="NORMAL", probs=[0.9, 0.1], sent_by="dr.a@h.org"))
        old = datetime.now(timezone.utc) - timedelta(days=days_old)
        from db.models import ReviewItem

        db.write(lambda s: s.execute(update(ReviewItem).where(ReviewItem.id == item)
                                     .values(created_at=old)))
    path = upload_path(sha)
    _age(path, days_old)
    return sha, path


def _relabel(db, sha: str) -> int:
    return review.submit_relabel(db, upload_sha256=sha, choice=review.LabelChoice("PNEUMONIA", None),
                                 reviewer="dr.b@h.org")


# -- The setting ------------------------------------------------------------------------------

@pytest.mark.parametrize("env, want", [
    ({}, (30, 30)),
    ({"CXR_RETENTION_DAYS": "7"}, (7, 7)),
    ({"CXR_RETENTION_DAYS": "7", "CXR_RETENTION_DAYS_EXPORTS": "1"}, (7, 1)),
    ({"CXR_RETENTION_DAYS_UPLOADS": "0"}, (0, 30)),
    ({"CXR_RETENTION_DAYS": "0"}, (0, 0)),
])
def test_retention_from_the_environment(env, want):
    got = retention.Retention.from_env(env)
    assert (got.uploads_days, got.exports_days) == want
    assert got.enabled is (want != (0, 0))


@pytest.mark.parametrize("raw", ["a week", "-1", "2.5"])
def test_a_bad_retention_names_its_variable(raw):
    with pytest.raises(ConfigError, match=r"CXR_RETENTION_DAYS_EXPORTS must be .*Received: "
                       r"CXR_RETENTION_DAYS_EXPORTS="):
        retention.Retention.from_env({"CXR_RETENTION_DAYS_EXPORTS": raw})


# -- What may be deleted ----------------------------------------------------------------------

def test_clinicians_evidence_is_never_deleted_and_the_rest_expires(db, cxr_home):
    open_item, _ = _upload(db, 1)  # sent, not reviewed yet
    relabelled, _ = _upload(db, 2)
    _relabel(db, relabelled)  # resolved by a relabel: evidence
    undone, _ = _upload(db, 3)
    review.submit_undo(db, relabel_id=_relabel(db, undone), reviewer="dr.b@h.org")
    orphan, orphan_path = _upload(db, 4, sent=False)  # its item never committed
    resolved, resolved_path = _upload(db, 5)  # resolved without a relabel (e.g. dismissed)
    from db.models import ReviewItem

    db.write(lambda s: s.execute(update(ReviewItem).where(ReviewItem.upload_sha256 == resolved)
                                 .values(done=True)))
    recent, _ = _upload(db, 6, sent=False, days_old=3)
    uploads = cxr_home / "uploads"
    partial = uploads / ".upload-abc123"
    partial.write_bytes(b"half")
    _age(partial, 2)
    foreign = uploads / "README.txt"  # not ours: never touched
    foreign.write_text("kept")
    _age(foreign, 400)
    exports = cxr_home / "exports"
    exports.mkdir()
    (exports / "relabels-job1.csv").write_text("old")
    _age(exports / "relabels-job1.csv", 31)
    (exports / "relabels-job2.csv").write_text("new")

    dry = retention.cleanup(db, dry_run=True)
    assert sorted(dry.uploads_deleted) == sorted([orphan_path.name, resolved_path.name])
    assert orphan_path.exists() and (exports / "relabels-job1.csv").exists()  # nothing gone

    report = retention.cleanup(db)
    assert sorted(report.uploads_deleted) == sorted(dry.uploads_deleted)
    assert (report.uploads_kept_referenced, report.uploads_kept_recent) == (3, 1)
    assert report.exports_deleted == ["relabels-job1.csv"] and report.exports_kept == 1
    assert report.bytes_freed > 0 and not partial.exists() and foreign.exists()
    for sha in (open_item, relabelled, undone, recent):  # still shown on Review
        assert upload_path(sha) is not None
    assert upload_path(orphan) is None and upload_path(resolved) is None
    json.dumps(report.to_json())


def test_a_resend_refreshes_an_old_upload(db, cxr_home):
    """Sending the same image again writes (touches) its file under the write lock, so its
    age restarts: the cleanup never removes a file being sent."""
    from cxr_core.predict.inference import Prediction
    from cxr_core.predict.uploads import send_to_review

    sha, path = _upload(db, 7, sent=False)
    assert retention.cleanup(db, dry_run=True).uploads_deleted == [path.name]
    item = ImageInput("again.png", data=_png(7))
    pred = Prediction(0, item, "NORMAL", {"NORMAL": 0.8, "PNEUMONIA": 0.2}, 0, "x",
                      np.zeros((8, 8, 1), np.uint8))
    send_to_review(db, pred, model_ref="default", sent_by="dr.a@h.org")
    assert time.time() - path.stat().st_mtime < 60
    review.submit_relabel(db, upload_sha256=sha, choice=review.LabelChoice("NORMAL", None),
                          reviewer="dr.b@h.org")
    _age(path, 400)
    assert retention.cleanup(db).uploads_deleted == []  # relabelled: kept however old


def test_zero_keeps_everything(db, cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_RETENTION_DAYS", "0")
    _upload(db, 8, sent=False, days_old=4000)
    report = retention.cleanup(db)
    assert report.uploads_deleted == [] and report.uploads_kept_recent == 0
    assert app.scheduled_jobs() == {}


# -- The job, the CLI and the schedule --------------------------------------------------------

def test_cleanup_is_a_job_kind_with_an_admin_action(db):
    from cxr_core.auth import policy

    assert queue.KINDS["cleanup"] == "cleanup"
    assert policy.POLICY["cleanup"] == frozenset({"admin"})
    assert "cleanup" in app.job_handlers()


def test_the_cli_runs_it_now_as_an_audited_admin_action(db, cxr_home, capsys, monkeypatch):
    from cxr_core.auth import admin, policy
    from cxr_core.cli import main

    _, path = _upload(db, 9, sent=False)
    assert main(["cleanup", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["uploads_deleted"] == [path.name]
    assert path.exists()
    assert main(["cleanup", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["uploads_deleted"] == [path.name] and not path.exists()
    events = admin.audit_log(db, policy.Principal("x", frozenset(policy.ROLES)), limit=10)
    assert [(e.action, e.outcome) for e in events][:2] == [("cleanup", "ok"),
                                                          ("cleanup", "started")]
    monkeypatch.setenv("CXR_CLI_ROLES", "scientist")
    assert main(["cleanup", "--json"]) == 2
    assert "needs the admin role" in capsys.readouterr().err


def test_workers_queue_it_once_a_day_and_run_it(db, cxr_home):
    _, path = _upload(db, 10, sent=False)
    out = app.run_worker(idle_exit_s=0.2, poll_s=0.05, db=db, kinds="jobs")
    [job] = queue.recent_jobs(db, "cleanup")
    assert out["jobs"] == [job.id] and job.status == "finished" and job.created_by is None
    assert job.result["uploads_deleted"] == [path.name]
    app.run_worker(idle_exit_s=0.2, poll_s=0.05, db=db, kinds="jobs")  # not due within a day
    assert len(queue.recent_jobs(db, "cleanup")) == 1
    app.run_worker(once=True, db=db, kinds="jobs")  # a one-shot drain schedules nothing
    assert queue.submit_if_due(db, "cleanup", 0.0) is not None  # due at once with 0 s
    assert len(queue.recent_jobs(db, "cleanup")) == 2
