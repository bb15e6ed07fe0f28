"""View jobs (split preview, balance tables, agreement, intervals, a site-calibration
candidate): every role may ask for them (``compute_view``), a principal without a role is
refused, and one identity has at most CXR_MAX_QUEUED_VIEW_JOBS queued or running."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import inspect, text

from cxr_core.auth import admin
from cxr_core.jobs import actions
from cxr_core.auth import policy
from cxr_core.jobs import queue
from cxr_core.core.errors import ConfigError, PermissionDenied, QuotaExceeded
from cxr_core.storage import jobs as job_store
from cxr_core.storage import open_db
from db.engine import MIGRATIONS, make_engine, upgrade
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

ADMIN = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
VIEWER = policy.Principal(identity="cfo@h.org", roles=frozenset({"viewer"}))


@pytest.fixture()
def db(cxr_home, monkeypatch):
    monkeypatch.delenv("CXR_MAX_QUEUED_VIEW_JOBS", raising=False)
    return open_db()


def view(n: int) -> dict:
    """Distinct params of one view kind (the jobs are never run here)."""
    return {"dataset_id": 1, "newest_relabel_id": n, "limit": 50, "offset": 0}


def audit(db):
    return admin.audit_log(db, ADMIN, limit=100)


def test_every_job_kind_names_its_action():
    assert set(queue.VIEW_KINDS) == {"split_preview", "compare_ci", "balance_tables",
                                     "agreement", "site_calibration"}
    assert all(queue.KINDS[k] in policy.POLICY for k in queue.KINDS)


@pytest.mark.parametrize("kind", ["split_preview", "compare_ci", "balance_tables", "agreement",
                                  "site_calibration"])
def test_a_viewer_asks_for_each_view_job_unaudited_and_recorded_as_the_submitter(db, kind):
    job_id = actions.submit_job(db, VIEWER, kind, {"k": 1})
    job = queue.get_job(db, job_id)
    assert (job.kind, job.status, job.created_by) == (kind, "queued", "cfo@h.org")
    assert audit(db) == []  # read-only: a success is not a row


def test_a_principal_without_a_role_is_refused_and_that_is_audited(db):
    nobody = policy.oidc_principal({"email": "x@h.org", "email_verified": True},
                                   {"admin": ["lead@h.org"]})
    with pytest.raises(PermissionDenied, match="may not compute view"):
        actions.submit_job(db, nobody, "agreement", view(1))
    assert queue.recent_jobs(db, "agreement") == []
    (ev,) = audit(db)
    assert (ev.actor, ev.action, ev.outcome, ev.target) == ("x@h.org", "compute_view",
                                                            "denied", "agreement")


def test_unknown_kind_is_a_config_error(db):
    with pytest.raises(ConfigError, match="job kind must be one of"):
        actions.submit_job(db, ADMIN, "mine_bitcoin", {})


def test_the_per_user_cap_counts_new_open_view_jobs_only(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_QUEUED_VIEW_JOBS", "2")
    first = actions.submit_job(db, VIEWER, "agreement", view(1))
    actions.submit_job(db, VIEWER, "split_preview", view(2))
    # The same params again: the open job, not a new one (and not refused at the cap).
    assert actions.submit_job(db, VIEWER, "agreement", view(1)) == first
    with pytest.raises(QuotaExceeded, match=r"cfo@h.org already has 2 queued or running view "
                                            r"job\(s\).*limit is 2 per user.*"
                                            r"CXR_MAX_QUEUED_VIEW_JOBS"):
        actions.submit_job(db, VIEWER, "agreement", view(3))
    with pytest.raises(QuotaExceeded):  # "try again" (once=False) is a new job too
        actions.submit_job(db, VIEWER, "agreement", view(1), once=False)
    assert len(queue.recent_jobs(db, "agreement")) == 1  # the refused ones were rolled back
    assert [(e.actor, e.action, e.outcome) for e in audit(db)] == [
        ("cfo@h.org", "compute_view", "denied")] * 2
    # Another identity has its own cap; state-changing jobs do not count against it.
    actions.submit_job(db, ADMIN, "export_relabels", {"dataset_id": None})
    actions.submit_job(db, ADMIN, "agreement", view(3))
    # A finished job frees a place.
    db.write(lambda s: job_store.finish_job(session=s, job_id=first, status="finished",
                                            result={}))
    actions.submit_job(db, VIEWER, "agreement", view(4))


def test_zero_turns_the_cap_off(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_QUEUED_VIEW_JOBS", "0")
    for n in range(6):
        actions.submit_job(db, VIEWER, "agreement", view(n))
    with db.session() as s:
        assert job_store.count_open_jobs(session=s, created_by="cfo@h.org",
                                         kinds=queue.VIEW_KINDS) == 6


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return request.getfixturevalue("pg_url")


def _columns(engine):
    insp = inspect(engine)
    return ({c["name"] for c in insp.get_columns("jobs")},
            {i["name"] for i in insp.get_indexes("jobs")})


def test_migration_0009_adds_the_submitter_and_goes_back(empty_url):
    from alembic import command
    from alembic.config import Config

    engine = make_engine(empty_url)
    upgrade(engine, "0008")
    with engine.begin() as c:
        c.execute(text("INSERT INTO jobs (kind, params_json, status, done, total, "
                       "created_at) VALUES ('agreement', '{}', 'queued', 0, 0, :t)"),
                  {"t": datetime(2026, 12, 1, tzinfo=timezone.utc)})
    upgrade(engine)  # head
    cols, idx = _columns(engine)
    assert "created_by" in cols and "ix_jobs_created_by_status" in idx
    with engine.connect() as c:
        assert c.execute(text("SELECT kind, status, created_by FROM jobs")).all() == [
            ("agreement", "queued", None)]  # from before 0009: nobody's, counted for no one
    db = open_db(url=empty_url)
    actions.submit_job(db, VIEWER, "agreement", view(1))
    with db.session() as s:
        assert job_store.count_open_jobs(session=s, created_by="cfo@h.org",
                                         kinds=queue.VIEW_KINDS) == 1
    db.engine.dispose()
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0008")
    cols, idx = _columns(engine)
    assert "created_by" not in cols and "ix_jobs_created_by_status" not in idx
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM jobs")).scalar() == 2
    engine.dispose()
