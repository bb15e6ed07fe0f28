"""Per-user caps for every job kind and for runs, with parents counted once; app principals name
models only by reference (issue 26 items 7 and 8)."""
from __future__ import annotations

import pytest

from cxr_core.auth import admin, policy
from cxr_core.core import model_refs
from cxr_core.core.errors import PermissionDenied, QuotaExceeded
from cxr_core.jobs import actions, queue
from cxr_core.storage import audit as audit_store
from cxr_core.storage import jobs as job_store
from cxr_core.storage import open_db
from cxr_core.training import actions as training_actions
from cxr_core.training.config import TrainConfig

ADMIN = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
SCI = policy.Principal(identity="https://idp.h.org|AbC", roles=frozenset(policy.ROLES[:3]))
OTHER = policy.Principal(identity="ds@h.org", roles=frozenset(policy.ROLES[:3]))
CLI = policy.Principal(identity="cli:ops", roles=frozenset(policy.ROLES), source="cli")


@pytest.fixture()
def db(cxr_home, monkeypatch):
    for var in ("CXR_MAX_QUEUED_JOBS_PER_USER", "CXR_MAX_ACTIVE_RUNS_PER_USER",
                "CXR_MAX_QUEUED_VIEW_JOBS"):
        monkeypatch.delenv(var, raising=False)
    return open_db()


def evaluate(n: int) -> dict:
    return {"model_ref": f"run:{n}", "data": "demo", "split": None, "labels": "current"}


def denied(db) -> list[tuple[str, str]]:
    return [(e.actor, e.detail.get("why", "")) for e in admin.audit_log(db, ADMIN, limit=100)
            if e.outcome == "denied"]


# -- One cap per kind, per user ---------------------------------------------------------------

def test_every_kind_is_capped_per_user_and_kind(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_QUEUED_JOBS_PER_USER", "2")
    first = actions.submit_job(db, SCI, "evaluate", evaluate(1))
    actions.submit_job(db, SCI, "evaluate", evaluate(2))
    assert actions.submit_job(db, SCI, "evaluate", evaluate(1)) == first  # the open one
    with pytest.raises(QuotaExceeded, match=r"https://idp.h.org\|AbC already has 2 queued or "
                       r"running 'evaluate' job\(s\); the limit is 2 per user.*"
                       r"CXR_MAX_QUEUED_JOBS_PER_USER"):
        actions.submit_job(db, SCI, "evaluate", evaluate(3))
    assert len(queue.recent_jobs(db, "evaluate")) == 2  # the refused one was rolled back
    [(who, why)] = denied(db)
    assert who == SCI.identity and "'evaluate' job(s)" in why
    # Each kind has its own count, each identity its own cap.
    actions.submit_job(db, SCI, "export_relabels", {"dataset_id": None})
    actions.submit_job(db, SCI, "index", {"path": str(model_refs.REPO_MODELS.parent / "demo"),
                                          "name": None})
    actions.submit_job(db, OTHER, "evaluate", evaluate(3))
    # A finished job frees a place.
    db.write(lambda s: job_store.finish_job(session=s, job_id=first, status="finished",
                                            result={}))
    actions.submit_job(db, SCI, "evaluate", evaluate(3))


def test_zero_turns_the_job_cap_off(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_QUEUED_JOBS_PER_USER", "0")
    for n in range(6):
        actions.submit_job(db, SCI, "evaluate", evaluate(n))
    with db.session() as s:
        assert job_store.count_open_units(session=s, created_by=SCI.identity,
                                          kinds=("evaluate",)) == 6


def test_jobs_of_one_parent_wait_past_the_cap_and_count_once(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_QUEUED_JOBS_PER_USER", "1")
    actions.submit_job(db, SCI, "evaluate", evaluate(1))
    # The folds of an audit the user was admitted for: never refused, counted as one.
    folds = [actions.submit_job(db, SCI, "evaluate", evaluate(10 + k), parent="audit:7")
             for k in range(4)]
    assert len(set(folds)) == 4
    assert [j.parent for j in queue.recent_jobs(db, "evaluate", limit=4)] == ["audit:7"] * 4
    with db.session() as s:
        assert job_store.count_open_units(session=s, created_by=SCI.identity,
                                          kinds=("evaluate",)) == 2  # 1 alone + 1 parent
    with pytest.raises(QuotaExceeded, match="already has 2 queued or running 'evaluate'"):
        actions.submit_job(db, SCI, "evaluate", evaluate(2))
    for job_id in folds:  # the audit ends: its folds no longer count
        db.write(lambda s, j=job_id: job_store.finish_job(session=s, job_id=j,
                                                          status="finished", result={}))
    with db.session() as s:
        assert job_store.count_open_units(session=s, created_by=SCI.identity,
                                          kinds=("evaluate",)) == 1


def test_view_jobs_of_one_parent_count_once_too(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_QUEUED_VIEW_JOBS", "1")
    view = {"dataset_id": 1, "newest_relabel_id": 0, "limit": 50, "offset": 0}
    for k in range(3):
        actions.submit_job(db, SCI, "agreement", {**view, "offset": k}, parent="study:3")
    with db.session() as s:
        assert job_store.count_open_units(session=s, created_by=SCI.identity,
                                          kinds=queue.VIEW_KINDS) == 1
    with pytest.raises(QuotaExceeded, match="view job"):
        actions.submit_job(db, SCI, "agreement", {**view, "offset": 9})


def test_runs_of_one_parent_wait_past_the_quota_and_count_once(db, monkeypatch):
    monkeypatch.setenv("CXR_MAX_ACTIVE_RUNS_PER_USER", "1")
    cfg = TrainConfig(dataset="tiny", model="custom5_224")
    training_actions.start_run(db, SCI, cfg, start_worker=False)
    trials = [training_actions.start_run(db, SCI, cfg, start_worker=False,
                                         parent="study:3")[0] for _ in range(3)]
    with db.session() as s:
        assert audit_store.count_active_runs(session=s, created_by=SCI.identity) == 2
    with pytest.raises(QuotaExceeded, match=r"already has 2 queued or running run\(s\)"):
        training_actions.start_run(db, SCI, cfg, start_worker=False)
    from cxr_core.training import service

    assert [service.get_run(db, r).parent for r in trials] == ["study:3"] * 3


# -- Model references, checked in core for app principals --------------------------------------

@pytest.mark.parametrize("ref, ok", [
    ("run:3", True), ("12", True), ("default", True), ("ensemble:site-a.v2", True),
    ("ensemble:run:3+run:5+default", True), ("/etc/passwd.keras", False),
    ("../runs/7/best.keras", False), ("ensemble:run:3+/data/x.keras", False),
    ("ensemble:x.keras", False), ("run:3; rm", False), (None, False), (["run:3"], False),
    ("hier:run:3+run:4", True), ("hier:default+7", True), ("hier:run:3+/x/s.keras", False),
    ("hier:run:3", False), ("hier:run:1+run:2+run:3", False),
])
def test_what_counts_as_a_model_reference(ref, ok):
    assert model_refs.is_reference(ref) is ok


def test_a_model_shipped_in_its_own_folder_is_a_reference(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.keras").write_bytes(b"zip")
    (tmp_path / "notes").mkdir()
    assert model_refs.shipped_models(tmp_path) == ("base",)
    assert model_refs.is_reference("base", shipped=("base",))
    assert not model_refs.is_reference("base", shipped=())
    assert "default" in model_refs.shipped_models()  # the repository's own


@pytest.mark.parametrize("kind, params", [
    ("evaluate", {"model_ref": "/home/lead/secret.keras", "data": "demo"}),
    ("create_ensemble", {"name": "x", "members": ["run:1", "/tmp/m.keras"]}),
])
def test_an_app_principal_naming_a_model_file_in_a_job_is_refused_and_audited(db, kind,
                                                                            params):
    with pytest.raises(PermissionDenied, match=r"may name a model \((model_ref|members)\) only "
                       r"by reference: 'run:ID', a shipped model \('default'.*Received: '/"):
        actions.submit_job(db, SCI, kind, params)
    assert queue.recent_jobs(db, kind) == []
    [(who, why)] = denied(db)
    assert who == SCI.identity and "by reference" in why
    assert actions.submit_job(db, CLI, kind, params)  # the CLI, on the server, still may


def test_an_app_principal_cannot_make_an_ensemble_of_files(db):
    from cxr_core.models import actions as model_actions

    with pytest.raises(PermissionDenied, match="by reference"):
        model_actions.create_ensemble(db, SCI, "mine", ["run:1", "/tmp/a.keras"],
                                      threshold=0.5)
    assert denied(db)[0][0] == SCI.identity
