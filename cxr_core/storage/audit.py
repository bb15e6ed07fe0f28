"""The audit log (append-only) and the role grants admins store.

Rows of ``audit_events`` are only ever inserted here; the database refuses UPDATE and DELETE
(migration 0008's triggers).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from cxr_core.storage.runs import as_utc
from db.models import AuditEvent, Relabel, Run, UserIdentity, UserRole


@dataclass(frozen=True)
class AuditRecord:
    id: int
    created_at: datetime
    actor: str
    source: str
    action: str
    target: str
    outcome: str
    detail: dict

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.created_at.isoformat(), "actor": self.actor,
                "source": self.source, "action": self.action, "target": self.target,
                "outcome": self.outcome, "detail": self.detail}


@dataclass(frozen=True)
class RoleGrant:
    identity: str
    roles: tuple[str, ...]
    granted_by: str
    granted_at: datetime


def add_event(*, session: Session, actor: str, source: str, action: str, target: str = "",
              outcome: str = "ok", detail: Mapping[str, Any] | None = None) -> int:
    row = AuditEvent(actor=actor, source=source, action=action, target=target or "",
                     outcome=outcome, detail_json=json.dumps(dict(detail or {}), default=str))
    session.add(row)
    session.flush()
    return row.id


def list_events(*, session: Session, limit: int = 50, before_id: int | None = None,
                actor: str | None = None, action: str | None = None) -> list[AuditRecord]:
    """Newest first, a keyset page: rows with id < ``before_id``."""
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before_id is not None:
        q = q.where(AuditEvent.id < before_id)
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if action:
        q = q.where(AuditEvent.action == action)
    return [AuditRecord(r.id, as_utc(r.created_at), r.actor, r.source, r.action, r.target,
                        r.outcome, json.loads(r.detail_json or "{}"))
            for r in session.scalars(q)]


def count_events(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def bind_identity(*, session: Session, issuer: str, subject: str, identity: str) -> str:
    """The identity an account (issuer, subject) is bound to: ``identity`` the first time,
    else the one bound then (the caller refuses a mismatch)."""
    row = session.get(UserIdentity, (issuer, subject))
    if row is None:
        session.add(UserIdentity(issuer=issuer, subject=subject, identity=identity))
        session.flush()
        return identity
    return row.identity


def granted_roles(*, session: Session, identity: str) -> tuple[str, ...]:
    row = session.get(UserRole, identity)
    return tuple(r for r in (row.roles.split(",") if row else ()) if r)


def set_grant(*, session: Session, identity: str, roles: tuple[str, ...],
              granted_by: str) -> None:
    """Replace an identity's granted roles (no roles: the grant is removed)."""
    row = session.get(UserRole, identity)
    if not roles:
        if row is not None:
            session.delete(row)
        return
    if row is None:
        session.add(UserRole(identity=identity, roles=",".join(roles), granted_by=granted_by))
    else:
        row.roles, row.granted_by = ",".join(roles), granted_by


def list_grants(*, session: Session) -> list[RoleGrant]:
    return [RoleGrant(r.identity, tuple(x for x in r.roles.split(",") if x), r.granted_by,
                      as_utc(r.granted_at))
            for r in session.scalars(select(UserRole).order_by(UserRole.identity))]


def run_owner(*, session: Session, run_id: int) -> str | None:
    return session.scalar(select(Run.created_by).where(Run.id == run_id))


def set_run_owner(*, session: Session, run_id: int, created_by: str) -> None:
    row = session.get(Run, run_id)
    if row is not None:
        row.created_by = created_by


def relabel_owner(*, session: Session, relabel_id: int) -> str | None:
    """Who wrote relabel ``relabel_id`` (None: no such row)."""
    return session.scalar(select(Relabel.reviewer).where(Relabel.id == relabel_id))


def count_active_runs(*, session: Session, created_by: str) -> int:
    """What the per-user run quota counts: ``created_by``'s queued or running runs, one per run
    without a parent plus one per distinct parent (an audit's folds, a search's trials count
    once)."""
    active = (Run.created_by == created_by, Run.status.in_(("queued", "running")))
    alone = session.scalar(select(func.count()).select_from(Run).where(
        *active, Run.parent.is_(None))) or 0
    parents = session.scalar(select(func.count(distinct(Run.parent))).where(
        *active, Run.parent.is_not(None))) or 0
    return int(alone) + int(parents)
