"""Each gated action and its ``ok`` audit row commit in one transaction: when the audit row
cannot be written the action is rolled back, and on the normal path both are there."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from cxr_core.auth import admin
from cxr_core.data import actions as data_actions
from cxr_core.evaluation import actions as evaluation_actions
from cxr_core.jobs import actions as jobs_actions
from cxr_core.review import actions as review_actions
from cxr_core.training import actions
from cxr_core.auth import policy
from cxr_core.data import presets
from cxr_core.review import queues as review
from cxr_core.data.augment_config import AugmentConfig
from cxr_core.storage import audit as audit_store
from cxr_core.training.config import TrainConfig
from db.models import (AuditEvent, Job, OperatingPoint, Relabel, ReviewItem, Run,
                       UserRole)
from tests.test_auth import image_id  # noqa: F401 - fixture: one image
from tests.test_review import db, ds  # noqa: F401 - fixtures: the database, six images

ADMIN = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))


class AuditDown(RuntimeError):
    pass


@pytest.fixture()
def audit_fails(monkeypatch):
    """The ``ok`` audit insert raises (as a full disk or a dropped connection would); refusals
    are still written."""
    real = audit_store.add_event

    def add_event(**kw):
        if kw.get("outcome", "ok") == "ok":
            raise AuditDown("audit insert failed")
        return real(**kw)
    monkeypatch.setattr(audit_store, "add_event", add_event)


def count(db, model, *where) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)))


def ok_rows(db, action):
    return [(e.actor, e.target) for e in admin.audit_log(db, ADMIN, limit=100, action=action)
            if e.outcome == "ok"]


def queued_run(db, owner="lead@h.org") -> int:
    with db.session() as s:
        run = Run(name="r", status="queued", config_json="{}", created_by=owner)
        s.add(run)
        s.flush()
        return run.id


def cfg() -> TrainConfig:
    return TrainConfig(dataset="tiny", model="custom5_224", image_size=64, epochs=1)


NORMAL = review.LabelChoice("NORMAL", None)


def test_relabel_is_rolled_back_without_its_audit_row(db, image_id, audit_fails):
    with pytest.raises(AuditDown):
        review_actions.relabel(db, ADMIN, image_id=image_id, choice=NORMAL)
    assert count(db, Relabel) == 0 and count(db, AuditEvent) == 0


def test_undo_is_rolled_back_without_its_audit_row(db, image_id, monkeypatch):
    rid = review_actions.relabel(db, ADMIN, image_id=image_id, choice=NORMAL)
    monkeypatch.setattr(audit_store, "add_event", lambda **kw: (_ for _ in ()).throw(AuditDown()))
    with pytest.raises(AuditDown):
        review_actions.undo_relabel(db, ADMIN, relabel_id=rid)
    assert count(db, Relabel) == 1  # only the relabel, no undo row


def test_start_run_is_rolled_back_without_its_audit_row(db, audit_fails, monkeypatch):
    from cxr_core.jobs import launcher

    started = []
    monkeypatch.setattr(launcher, "ensure_worker", lambda *a, **k: started.append(1))
    with pytest.raises(AuditDown):
        actions.start_run(db, ADMIN, cfg(), start_worker=True)
    assert count(db, Run) == 0 and count(db, AuditEvent) == 0
    assert not started  # no worker for a run that was never committed


def test_save_preset_is_rolled_back_without_its_audit_row(db, audit_fails):
    with pytest.raises(AuditDown):
        data_actions.save_preset(db, ADMIN, "mine", AugmentConfig())
    assert presets.owner(db, "mine") == (False, None)


def test_manual_threshold_is_rolled_back_without_its_audit_row(db, audit_fails):
    run_id = queued_run(db)
    with pytest.raises(AuditDown):
        evaluation_actions.set_manual_threshold(db, ADMIN, run_id=run_id, threshold=0.3, note="why")
    assert count(db, OperatingPoint) == 0


def test_cancel_grant_send_and_jobs_are_rolled_back_without_their_audit_rows(db, image_id,
                                                                             audit_fails):
    run_id = queued_run(db)
    with pytest.raises(AuditDown):
        actions.cancel_run(db, ADMIN, run_id)
    assert count(db, Run, Run.status == "queued") == 1
    with pytest.raises(AuditDown):
        admin.grant_roles(db, ADMIN, "new@h.org", ["reviewer"])
    assert count(db, UserRole) == 0
    with pytest.raises(AuditDown):
        jobs_actions.submit_job(db, ADMIN, "export_relabels", {"dataset_id": None}, once=False)
    assert count(db, Job) == 0
    with pytest.raises(AuditDown):
        evaluation_actions.send_disagreement(db, ADMIN, image_id=image_id, run_ref=f"run:{run_id}",
                                  predicted="NORMAL", probs=[0.6, 0.4])
    assert count(db, ReviewItem) == 0 and count(db, AuditEvent) == 0


def test_a_refusal_is_still_recorded_on_its_own(db, image_id):
    viewer = policy.Principal(identity="cfo@h.org", roles=frozenset({"viewer"}))
    with pytest.raises(policy.PermissionDenied):
        review_actions.relabel(db, viewer, image_id=image_id, choice=NORMAL)
    (ev,) = admin.audit_log(db, ADMIN, action="relabel")
    assert (ev.actor, ev.outcome) == ("cfo@h.org", "denied") and count(db, Relabel) == 0


def test_the_normal_path_writes_the_action_and_its_row(db, image_id, monkeypatch):
    from cxr_core.jobs import launcher

    seen = []  # when the worker is started, the run and its audit row are already committed
    monkeypatch.setattr(launcher, "ensure_worker",
                        lambda *a, **k: seen.append((count(db, Run), count(db, AuditEvent))))
    rid = review_actions.relabel(db, ADMIN, image_id=image_id, choice=NORMAL)
    assert ok_rows(db, "relabel") == [("lead@h.org", f"relabel:{rid}")]
    undo = review_actions.undo_relabel(db, ADMIN, relabel_id=rid)
    (ev,) = admin.audit_log(db, ADMIN, action="undo_own_relabel")
    assert ev.detail == {"undo_row": undo, "owner": "lead@h.org"}

    run_id, _ = actions.start_run(db, ADMIN, cfg(), start_worker=True)
    assert seen == [(1, 3)]
    with db.session() as s:
        assert s.get(Run, run_id).created_by == "lead@h.org"
    assert ok_rows(db, "train") == [("lead@h.org", f"run:{run_id}")]
    assert actions.cancel_run(db, ADMIN, run_id) == "cancelled"
    (ev,) = admin.audit_log(db, ADMIN, action="cancel_own_run")
    assert ev.detail == {"status": "cancelled", "what": "cancel"}

    data_actions.save_preset(db, ADMIN, "mine", AugmentConfig())
    assert presets.owner(db, "mine") == (True, "lead@h.org")
    assert ok_rows(db, "save_preset") == [("lead@h.org", "preset:mine")]

    op = evaluation_actions.set_manual_threshold(db, ADMIN, run_id=run_id, threshold=0.3, note="why")
    assert op.threshold == 0.3 and op.changed_by == "lead@h.org"
    assert ok_rows(db, "set_operating_point") == [("lead@h.org", f"run:{run_id}")]

    admin.grant_roles(db, ADMIN, "new@h.org", ["reviewer"])
    assert count(db, UserRole) == 1 and ok_rows(db, "manage_roles") == [("lead@h.org",
                                                                         "new@h.org")]
    job = jobs_actions.submit_job(db, ADMIN, "export_relabels", {"dataset_id": None})
    again = jobs_actions.submit_job(db, ADMIN, "export_relabels", {"dataset_id": None})
    assert again == job and count(db, Job) == 1  # the open job is returned, recorded again
    rows = admin.audit_log(db, ADMIN, action="export_relabels")
    assert [(e.target, e.detail.get("existing")) for e in rows] == [(f"job:{job}", True),
                                                                   (f"job:{job}", None)]
