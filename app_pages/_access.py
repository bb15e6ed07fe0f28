"""Who is using the app: Streamlit's OIDC sign-in, or the explicit single-user local mode.

With an ``[auth]`` table in ``.streamlit/secrets.toml`` every page needs a signed-in user
(``st.login`` / ``st.user`` / ``st.logout``; Authlib underneath) whose roles come from the
``[cxr_roles]`` table and the admins' grants (:mod:`cxr_core.auth.policy`). Without it the app runs
in **local mode**: one local identity with every role, and a badge that says so.

Pages ask :func:`principal` for the identity they pass to :mod:`cxr_core.auth.gate`; hiding a
widget is a courtesy, the check is in ``cxr_core``. A signed-in principal (its roles include the
admins' grants in the database) is read once per full script run: the entry script calls
:func:`new_script_run` first, so a role an admin revokes takes effect on the user's next run.
"""
from __future__ import annotations

import os
from typing import Any

import streamlit as st

from app_pages._db import get_db
from cxr_core.auth import gate, policy
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import CxrError, PermissionDenied
from cxr_core.core.text_safe import md_escape


def _secrets_table(name: str) -> dict[str, Any] | None:
    try:
        return dict(st.secrets[name]) if name in st.secrets else None
    except Exception:  # noqa: BLE001 - no secrets file: Streamlit raises its own error types
        return None


def auth_on() -> bool:
    """Sign-in is configured (an ``[auth]`` table). Also tells this process's workers."""
    on = _secrets_table("auth") is not None
    os.environ["CXR_AUTH_MODE"] = "oidc" if on else "local"
    return on


def _sign_in_screen() -> None:
    st.title("CXR Workbench")
    st.info("Sign in to continue. Your organisation's identity provider decides who you are; "
            "your roles decide what you may do here.", icon=":material/lock:")
    st.button("Sign in", type="primary", on_click=st.login, icon=":material/login:")
    st.stop()


_RUN = "_cxr_script_run"  # the number of this session's current full run (new_script_run)
_CACHED = "_cxr_principal"  # (run number, st.user as a dict, Principal)


def new_script_run() -> None:
    """Start a full script run: the entry script calls this first, every run (a fragment's
    rerun does not run the entry script, so it reuses the principal of the last full run).
    Pages run without the entry script (a test opening one alone) read it on every call."""
    st.session_state[_RUN] = st.session_state.get(_RUN, 0) + 1


def _request() -> tuple[str | None, dict[str, str]]:
    """The client's address (None on loopback) and the headers of this session's request (a
    test harness without a connection has neither)."""
    ip = st.context.ip_address
    try:
        headers = {str(k): str(v) for k, v in st.context.headers.items()}
    except (AttributeError, TypeError):
        headers = {}
    return (ip if isinstance(ip, str) else None), headers


def _local_only(local: Principal) -> None:
    """Local mode serves the person at this machine only: any other client is refused with a
    page that says what to configure, and the refusal is audited (once per session)."""
    ip, headers = _request()
    why = policy.local_access_refusal(ip, headers)
    if why is None:
        return
    if not st.session_state.get("_cxr_local_refused"):
        st.session_state["_cxr_local_refused"] = True
        gate.record(get_db(), local, "view", "local mode", outcome="denied",
                    detail={"why": why, "client": ip,
                            "host": {k.lower(): v for k, v in headers.items()}.get("host")})
    st.title("CXR Workbench")
    st.error(f"This app runs in local mode (no sign-in, every role), which serves only the "
             f"person at this machine, and {md(why)}. To serve a team, configure sign-in "
             "(an `[auth]` table and `[cxr_roles]` in `.streamlit/secrets.toml`), then set "
             "`server.address` to the address to listen on, behind a TLS proxy (see the "
             "README, *Serving a team*).", icon=":material/lock:")
    st.stop()


def principal() -> Principal:
    """The signed-in principal (stops the page with a sign-in screen when nobody is), or the
    local-mode principal (named by the reviewer name typed once per session, if any).

    The signed-in one is read from the database (its role grants) once per full run: pages
    ask several times per run, and the Train page's fragment every few seconds."""
    if not auth_on():
        local = policy.local_principal(st.session_state.get("review_reviewer", ""))
        _local_only(local)
        return local
    roles_config = _secrets_table("cxr_roles") or {}
    try:  # deny by default: sign-in without a roles mapping does not start
        policy.check_roles_config(roles_config)
    except CxrError as exc:
        st.error(f"Sign-in is misconfigured: {md(exc)}", icon=":material/error:")
        st.stop()
    if not st.user.is_logged_in:
        _sign_in_screen()
    user, run = st.user.to_dict(), st.session_state.get(_RUN)
    cached = st.session_state.get(_CACHED)
    if run is not None and cached is not None and cached[:2] == (run, user):
        return cached[2]
    try:
        p = gate.effective_principal(get_db(), user, roles_config)
    except PermissionDenied as exc:
        st.error(f"Access refused: {md(exc)}", icon=":material/block:")
        st.button("Sign out", on_click=st.logout, icon=":material/logout:", key="refused_out")
        st.stop()
    except CxrError as exc:
        st.error(f"Sign-in is misconfigured: {md(exc)}", icon=":material/error:")
        st.stop()
    if run is not None:
        st.session_state[_CACHED] = (run, user, p)
    return p


def require_page(action: str, what: str) -> Principal:
    """The principal, or a clear refusal that stops the page (the core checks again)."""
    p = principal()
    if not p.can(action):
        need = " or ".join(r for r in policy.KNOWN_ROLES if r in policy.allowed_roles(action))
        st.warning(f"{what} needs the {need} role; you are signed in as {md(p.identity)} "
                   f"({', '.join(sorted(p.roles)) or 'no role'}). Ask an admin for access.",
                   icon=":material/block:")
        st.stop()
    return p


def identity_badge(p: Principal) -> None:
    """Sidebar: who you are (or the local-mode badge) and, when signed in, Sign out."""
    with st.sidebar:
        if p.source == "local":
            st.badge("Local mode: single user, every role", icon=":material/computer:",
                     color="orange")
            st.caption("No sign-in is configured ([auth] in .streamlit/secrets.toml). Anyone "
                       "who reaches this URL acts with every role.")
            return
        st.badge(f"{p.top_role or 'no role'}", icon=":material/badge:", color="blue")
        st.caption(f"Signed in as {md(p.label)}")
        st.button("Sign out", on_click=st.logout, icon=":material/logout:", key="sign_out")


def md(text: Any) -> str:
    """User or file text for markdown: escaped, so it renders literally."""
    return md_escape(str(text))


def acting_as(label: str, key: str, container: Any = None, *, required: bool = True,
              **kw: Any) -> Principal | None:
    """Who an accountable action is recorded as: the signed-in identity (no name field: a
    typed name is never stored when sign-in is on), or in local mode a name typed here
    (None while it is empty, unless not ``required``: then the local identity)."""
    if auth_on():
        return principal()
    name = (container or st).text_input(label, key=key, **kw).strip()
    return policy.local_principal(name) if name or not required else None
