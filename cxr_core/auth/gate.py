"""The gate every checked action goes through: checked against the policy, then recorded.

Pages and the CLI call the domains' checked actions (``cxr_core/<domain>/actions.py``), never
the unchecked writers beneath them (a test of the pages' source holds them to it), so hiding a
widget is never the only guard. Each action:

1. checks :data:`cxr_core.auth.policy.POLICY` (and ownership: own run / own relabel) for the
   principal with :func:`authorize` / :func:`authorize_owned`; a refusal is written to the audit
   log (outcome ``denied``) and raised as :class:`~cxr_core.core.errors.PermissionDenied`;
2. does the action with the principal's identity as the recorded name (reviewer, sender,
   changed_by, created_by): never a typed name when sign-in is on;
3. appends an ``ok`` row to the audit log **in the action's own transaction** (the writers take
   an ``and_then`` hook, :func:`audited`; :meth:`cxr_core.storage.Database.write`): the action
   and its row commit together or not at all. Side effects outside the database (starting a
   worker process) come after that commit.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cxr_core.auth import policy
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import PermissionDenied
from cxr_core.storage import AndThen, Database
from cxr_core.storage import audit as store


def record(db: Database, p: Principal, action: str, target: str = "", *,
           outcome: str = "ok", detail: Mapping[str, Any] | None = None) -> int:
    """Append one audit row (never updated or deleted)."""
    policy.allowed_roles(action)  # an unknown action is a bug, not a row
    return db.write(lambda s: store.add_event(session=s, actor=p.identity, source=p.source,
                                              action=action, target=target, outcome=outcome,
                                              detail=detail))


def audited(p: Principal, action: str, target: str | Callable[[Any], str] = "",
        detail: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None) -> AndThen:
    """The hook that appends the ``ok`` audit row inside the action's transaction; ``target``
    and ``detail`` may be functions of the action's result (the new row's id)."""
    policy.allowed_roles(action)  # an unknown action is a bug, not a row

    def hook(session: Any, result: Any) -> None:
        store.add_event(session=session, actor=p.identity, source=p.source, action=action,
                        target=target(result) if callable(target) else target,
                        detail=detail(result) if callable(detail) else detail)
    return hook


def authorize(db: Database, p: Principal, action: str, target: str = "") -> None:
    """Raise PermissionDenied (and audit the refusal) unless ``p`` may do ``action``."""
    try:
        policy.require(p, action, target=target)
    except PermissionDenied as exc:
        record(db, p, action, target, outcome="denied", detail={"why": str(exc)})
        raise


def authorize_owned(db: Database, p: Principal, *, owner: str | None, own: str, any_: str,
                     target: str) -> str:
    action = own if owner == p.identity else any_
    try:
        policy.require_owner_or(p, owner=owner, own_action=own, any_action=any_, target=target)
    except PermissionDenied as exc:
        record(db, p, action, target, outcome="denied", detail={"why": str(exc), "owner": owner})
        raise
    return action


def effective_principal(db: Database, user: Mapping[str, Any],
                        roles_config: Mapping[str, Any]) -> Principal:
    """The principal of a signed-in OIDC user: configured roles plus the admins' grants.

    The account (issuer, subject) is bound to its identity the first time it signs in; a
    later sign-in resolving to another identity is refused (and audited), never re-keyed.

    Raises:
        ConfigError: the roles table maps no one, or is malformed.
        PermissionDenied: an issuer or domain not accepted, or an identity that changed form.
    """
    policy.check_roles_config(roles_config)
    who = policy.identity_of(user, roles_config)
    unknown = Principal(identity=who, roles=frozenset(), source="oidc")
    try:
        policy.check_allowed(user, roles_config)
        iss, sub = str(user.get("iss") or "oidc"), str(user.get("sub") or "").strip()
        bound = db.write(lambda s: store.bind_identity(session=s, issuer=iss, subject=sub,
                                                       identity=who)) if sub else who
        if bound != who:
            raise PermissionDenied(
                f"this account signed in before as {bound!r} and now resolves to {who!r}; "
                "identities never change silently (records are kept under the first one): an "
                "admin must move the account, or sign in with the same identity as before")
    except PermissionDenied as exc:
        record(db, unknown, "view", "sign-in", outcome="denied", detail={"why": str(exc)})
        raise
    with db.session() as s:
        granted = store.granted_roles(session=s, identity=who)
    return policy.oidc_principal(user, roles_config, granted)
