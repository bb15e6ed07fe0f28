"""Administration, admins only: role grants (added to the configured ``[cxr_roles]``) and the
audit log, checked and recorded through :mod:`cxr_core.auth.gate`.
"""
from __future__ import annotations

from collections.abc import Sequence

from cxr_core.auth import policy
from cxr_core.auth.gate import audited, authorize
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import ConfigError
from cxr_core.storage import Database
from cxr_core.storage import audit as store


def grant_roles(db: Database, p: Principal, identity: str, roles: Sequence[str]) -> None:
    """An admin sets the roles granted to ``identity`` (added to the configured ones): an email
    is stored lowercased, an ``issuer|subject`` exactly (:func:`policy.normalize_identity`)."""
    identity = policy.normalize_identity(identity)
    if not identity:
        raise ConfigError("a grant needs an identity (an email or issuer|subject). "
                          "Received: ''")
    bad = sorted(set(roles) - set(policy.KNOWN_ROLES))
    if bad:
        raise ConfigError(f"unknown role(s) {bad}. Expected some of {list(policy.KNOWN_ROLES)}")
    authorize(db, p, "manage_roles", identity)
    ordered = tuple(r for r in policy.KNOWN_ROLES if r in set(roles))
    db.write(lambda s: store.set_grant(session=s, identity=identity, roles=ordered,
                                       granted_by=p.identity),
             and_then=audited(p, "manage_roles", identity, {"roles": list(ordered)}))


def role_grants(db: Database, p: Principal) -> list[store.RoleGrant]:
    authorize(db, p, "manage_roles")
    with db.session() as s:
        return store.list_grants(session=s)


def audit_log(db: Database, p: Principal, *, limit: int = 50, before_id: int | None = None,
              actor: str | None = None, action: str | None = None) -> list[store.AuditRecord]:
    """A page of the audit log, newest first (admins only)."""
    authorize(db, p, "view_audit")
    with db.session() as s:
        return store.list_events(session=s, limit=limit, before_id=before_id, actor=actor,
                                 action=action)
