"""Who may do what: principals, roles and the policy table (pure: no Streamlit, no storage).

A :class:`Principal` is the identity an action is done as, with its roles. The app builds it
from Streamlit's OIDC user (``st.user``) when ``[auth]`` is configured, else it runs in the
explicit single-user **local mode** (:func:`local_principal`: every role); the CLI acts as a
configured local principal (:func:`cli_principal`). Every gated action is checked against
:data:`POLICY` in ``cxr_core`` (:mod:`cxr_core.auth.gate`), not only by hiding widgets.

Roles (each includes the one before):

* ``viewer``: stakeholder. Every read-only page, Predict (without "send to review"), and the
  view jobs those pages ask a worker for (``compute_view``: split preview, balance tables,
  agreement, comparison intervals, a site-threshold candidate; capped per user).
* ``reviewer``: clinician. + Review, relabel, send to review, undo own relabels.
* ``scientist``: + index datasets, train, cancel/resume own runs, evaluate, operating points,
  site thresholds, presets, export relabels.
* ``admin``: + undo anyone's relabel, cancel anyone's run, replace anyone's preset, manage
  roles, read the audit log.

Beside the ladder, ``adjudicator`` (:data:`EXTRA_ROLES`): resolves conflicting reads of a
double reading on Review. It is granted on its own (usually with ``reviewer``); admin implies
it (the policy lets admins adjudicate), scientist does not.

Mapping an identity to roles (:func:`roles_for`) reads a ``[cxr_roles]`` secrets table, which
sign-in requires (deny by default: without one the app refuses to start)::

    [cxr_roles]
    admin = ["lead@hospital.org"]
    scientist = ["ds@hospital.org", "group:ml-team"]
    reviewer = ["group:radiology"]
    adjudicator = ["senior.rad@hospital.org"]  # optional: beside the ladder (see above)
    claim = "groups"              # optional: a claim listing the user's groups
    default = "viewer"            # optional: the role of an identity without a mapping (none)
    trusted_email_issuers = ["https://login.example.org"]  # optional: emails there need no
                                  # email_verified claim (some providers send none)
    allowed_issuers = ["https://login.example.org"]        # optional: refuse any other issuer
    allowed_domains = ["hospital.org"]                     # optional: refuse other email domains

plus the grants admins store in the database (``user_roles``), which add to it. The identity is
the email only when the provider says it is verified (``email_verified``) or the issuer is
trusted for emails; else ``issuer|subject`` (case kept). Emails are lowercased.
"""
from __future__ import annotations

import getpass
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cxr_core.core.errors import ConfigError, PermissionDenied

ROLES: tuple[str, ...] = ("viewer", "reviewer", "scientist", "admin")  # the ladder
EXTRA_ROLES: tuple[str, ...] = ("adjudicator",)  # beside the ladder: includes no other role
KNOWN_ROLES: tuple[str, ...] = ROLES + EXTRA_ROLES
_ADJ = "adjudicator"

# action -> the roles allowed to do it. Explicit, so a test can check every action x role.
_V, _R, _S, _A = ROLES
POLICY: dict[str, frozenset[str]] = {
    "view": frozenset({_V, _R, _S, _A}),
    "compute_view": frozenset({_V, _R, _S, _A}),  # a worker job computing a read-only view
    "predict": frozenset({_V, _R, _S, _A}),
    "review": frozenset({_R, _S, _A}),
    "relabel": frozenset({_R, _S, _A}),
    "send_to_review": frozenset({_R, _S, _A}),
    "undo_own_relabel": frozenset({_R, _S, _A}),
    "undo_any_relabel": frozenset({_A}),
    "index_dataset": frozenset({_S, _A}),
    "train": frozenset({_S, _A}),
    "cancel_own_run": frozenset({_S, _A}),
    "cancel_any_run": frozenset({_A}),
    "evaluate": frozenset({_S, _A}),
    "set_operating_point": frozenset({_S, _A}),
    "site_calibration": frozenset({_S, _A}),
    "save_preset": frozenset({_S, _A}),
    "overwrite_any_preset": frozenset({_A}),
    "export_relabels": frozenset({_S, _A}),
    "import_relabels": frozenset({_S, _A}),
    "manage_roles": frozenset({_A}),
    "view_audit": frozenset({_A}),
    "backup": frozenset({_A}),  # back up or restore everything (the CLI, on the server)
    "cleanup": frozenset({_A}),  # delete expired uploads nothing refers to, and old exports
    "label_audit": frozenset({_S, _A}),  # K fold runs + confident learning (training/label_audit)
    "review_settings": frozenset({_S, _A}),  # a dataset's reading mode: blind, reads per image
    "adjudicate": frozenset({_ADJ, _A}),  # settle conflicting reads (admin implies it)
    "search": frozenset({_S, _A}),  # create / stop own hyperparameter studies, promote a trial
}
ACTIONS: tuple[str, ...] = tuple(POLICY)
SOURCES = ("oidc", "local", "cli")


@dataclass(frozen=True)
class Principal:
    """An identity and its roles. ``identity`` is what records store (an email when signed in)."""

    identity: str
    roles: frozenset[str] = field(default_factory=frozenset)
    source: str = "oidc"  # oidc | local | cli
    display: str = ""

    def __post_init__(self) -> None:
        if not (self.identity or "").strip():
            raise ConfigError("a principal needs an identity. Received: identity=''")
        bad = sorted(set(self.roles) - set(KNOWN_ROLES))
        if bad:
            raise ConfigError(f"unknown role(s) {bad}. Expected some of {list(KNOWN_ROLES)}")
        if self.source not in SOURCES:
            raise ConfigError(f"unknown principal source {self.source!r}. Expected one of "
                              f"{list(SOURCES)}")

    @property
    def label(self) -> str:
        """What the page shows: the display name and the identity."""
        return f"{self.display} ({self.identity})" if self.display and \
            self.display != self.identity else self.identity

    @property
    def top_role(self) -> str | None:
        return next((r for r in reversed(ROLES) if r in self.roles), None)

    def can(self, action: str) -> bool:
        """Whether any of the principal's roles allows ``action`` (unknown action: error)."""
        return bool(allowed_roles(action) & self.roles)


def allowed_roles(action: str) -> frozenset[str]:
    try:
        return POLICY[action]
    except KeyError:
        raise ConfigError(f"unknown action {action!r}. Expected one of {list(ACTIONS)}") \
            from None


def require(principal: Principal, action: str, *, target: str = "") -> None:
    """Raise :class:`PermissionDenied` unless ``principal`` may do ``action``."""
    if not principal.can(action):
        need = " or ".join(r for r in KNOWN_ROLES if r in allowed_roles(action))
        have = ", ".join(r for r in KNOWN_ROLES if r in principal.roles) or "no role"
        on = f" on {target}" if target else ""
        raise PermissionDenied(f"{principal.identity} may not {action.replace('_', ' ')}{on}: "
                               f"it needs the {need} role (has: {have}). Ask an admin.")


def require_owner_or(principal: Principal, *, owner: str | None, own_action: str,
                     any_action: str, target: str = "") -> None:
    """Own things need ``own_action``; someone else's (or unowned) need ``any_action``."""
    if owner is not None and owner == principal.identity and principal.can(own_action):
        return
    if principal.can(any_action):
        return
    if principal.can(own_action):
        raise PermissionDenied(f"{principal.identity} may not {any_action.replace('_', ' ')}"
                               f"{' on ' + target if target else ''}: it belongs to "
                               f"{owner or 'nobody'}; only an admin may act on it.")
    require(principal, own_action, target=target)


def all_roles() -> frozenset[str]:
    return frozenset(ROLES)


def local_principal(name: str = "") -> Principal:
    """The single-user local mode: no sign-in configured, one local identity with every role.

    ``name`` (typed once per session on Review, local mode only) becomes the identity so a
    shared local instance still tells reviewers apart; it is marked as a local identity.
    """
    name = (name or "").strip()
    return Principal(identity=name or "local", roles=all_roles(), source="local",
                     display=name or "local user")


LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


def local_access_refusal(client_ip: str | None, headers: Mapping[str, str]) -> str | None:
    """Why a request may not use local mode (every role, no sign-in), or None when it may.

    Local mode is for the person at this machine: the client must be on loopback (Streamlit
    reports no IP for ``127.0.0.1``/``::1``), must not come through a proxy (a ``Forwarded``,
    ``X-Forwarded-*`` or ``X-Real-IP`` header: a proxy on this host makes every client look
    local), and must name this machine as localhost (a ``Host`` of another name is a DNS
    rebinding attack or a remote name for this server).
    """
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    if client_ip:
        return f"the client {client_ip} is not on this machine"
    via = [h for h in PROXY_HEADERS if h in lowered]
    if via:
        return f"the request came through a proxy ({', '.join(via)})"
    host = lowered.get("host")
    if host is not None:
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if name.lower() not in LOCAL_HOSTS:
            return f"the request names this server {host!r}, not localhost"
    return None


def cli_principal(env: Mapping[str, str] | None = None) -> Principal:
    """The CLI's principal: ``CXR_CLI_IDENTITY`` (default the OS user) with the roles of
    ``CXR_CLI_ROLES`` (comma-separated, default every role: the CLI runs on the server).

    Its identity always carries the ``cli:`` prefix (``CXR_CLI_IDENTITY=dr.lee@h.org`` records
    ``cli:dr.lee@h.org``): what was done from a shell on the server is never mistaken for what a
    signed-in person did, nor undone as their own."""
    env = os.environ if env is None else env
    raw = (env.get("CXR_CLI_IDENTITY") or "").strip() or _os_user()
    who = raw if raw.startswith("cli:") else f"cli:{raw}"
    roles = [r.strip() for r in (env.get("CXR_CLI_ROLES") or ",".join(ROLES)).split(",")
             if r.strip()]
    return Principal(identity=who, roles=frozenset(roles), source="cli", display=who)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


ROLE_CONFIG_KEYS = ("default", "claim", "trusted_email_issuers", "allowed_issuers",
                    "allowed_domains")


def check_roles_config(config: Mapping[str, Any] | None) -> None:
    """Refuse a ``[cxr_roles]`` table that maps no one (sign-in is deny by default), or has
    unknown keys or roles (a typo must not be ignored)."""
    config = config or {}
    if not any(_as_list(config.get(r)) for r in KNOWN_ROLES) and not config.get("default"):
        raise ConfigError("sign-in is configured ([auth]) but [cxr_roles] gives no identity a "
                          "role: add a [cxr_roles] table to .streamlit/secrets.toml (e.g. "
                          'admin = ["you@example.org"]); an identity without a mapping gets no '
                          "role unless default = \"viewer\" (or another role) is set")
    known = set(KNOWN_ROLES) | set(ROLE_CONFIG_KEYS)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [cxr_roles]: {unknown}. Expected some of "
                          f"{sorted(known)}")
    default = config.get("default", "")
    if default not in ("", *ROLES):
        raise ConfigError(f"[cxr_roles] default must be one of {list(ROLES)} or ''. "
                          f"Received: {default!r}")


def _verified(user: Mapping[str, Any]) -> bool:
    flag = user.get("email_verified")
    return flag is True or str(flag).strip().lower() == "true"


def normalize_identity(identity: str) -> str:
    """An identity as records and grants store it: an email lowercased, an ``issuer|subject``
    (or a ``cli:`` / local identity) exactly as given, only trimmed: subjects are
    case-sensitive, and lowercasing one would lock its owner out of the roles granted to it."""
    text = (identity or "").strip()
    if "|" in text or text.startswith("cli:") or "@" not in text:
        return text
    return text.lower()


def identity_of(user: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> str:
    """The stable identity of an OIDC user: the email (lowercased) when the provider says it is
    verified or the issuer is trusted for emails (``[cxr_roles] trusted_email_issuers``), else
    ``issuer|subject`` (case kept: subjects are case-sensitive)."""
    email = str(user.get("email") or "").strip().lower()
    iss = str(user.get("iss") or "oidc")
    trusted = iss in _as_list((config or {}).get("trusted_email_issuers"))
    if email and (_verified(user) or trusted):
        return email
    sub = str(user.get("sub") or "").strip()
    if not sub:
        raise ConfigError("the signed-in user has neither a verified email nor a subject claim")
    return f"{iss}|{sub}"


def check_allowed(user: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Refuse an issuer or an email domain outside ``allowed_issuers`` / ``allowed_domains``
    when those lists are set.

    Raises:
        PermissionDenied: the account is not one this deployment accepts.
    """
    iss = str(user.get("iss") or "oidc")
    issuers = _as_list(config.get("allowed_issuers"))
    if issuers and iss not in issuers:
        raise PermissionDenied(f"accounts of {iss!r} are not accepted here. Expected one of "
                               f"{issuers}")
    domains = [d.lower().lstrip("@") for d in _as_list(config.get("allowed_domains"))]
    if domains:
        who = identity_of(user, config)
        if "@" not in who or "|" in who or who.rsplit("@", 1)[1] not in domains:
            raise PermissionDenied(f"only verified emails of {domains} are accepted here. "
                                   f"Received: {who!r}")


def roles_for(user: Mapping[str, Any], config: Mapping[str, Any],
              granted: Iterable[str] = ()) -> frozenset[str]:
    """Roles of an OIDC user from ``[cxr_roles]`` (identity or ``group:`` entries) plus the
    database grants; the configured default when nothing matches (none unless set)."""
    check_roles_config(config)
    who = identity_of(user, config)
    groups = set(_as_list(user.get(config.get("claim") or "groups")))

    def matches(entry: str) -> bool:
        if entry.startswith("group:"):
            return entry[6:] in groups
        # an email compares lowercased; an issuer|subject exactly (subjects are case-sensitive)
        return entry == who if "|" in entry else entry.strip().lower() == who
    roles = {r for r in KNOWN_ROLES if any(matches(e) for e in _as_list(config.get(r)))}
    roles |= set(granted) & set(KNOWN_ROLES)
    extra = roles & set(EXTRA_ROLES)  # beside the ladder: kept as they are
    roles -= extra
    if not roles and config.get("default"):
        roles = {config["default"]}
    # A higher role includes the ones below it (an admin can also review, and so on).
    top = max((ROLES.index(r) for r in roles), default=-1)
    return frozenset(ROLES[: top + 1]) | extra


def oidc_principal(user: Mapping[str, Any], config: Mapping[str, Any],
                   granted: Iterable[str] = ()) -> Principal:
    """The principal of a signed-in OIDC user (``st.user`` as a dict)."""
    check_roles_config(config)
    who = identity_of(user, config)
    return Principal(identity=who, roles=roles_for(user, config, granted), source="oidc",
                     display=str(user.get("name") or who))
