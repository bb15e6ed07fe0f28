"""Access and audit (admins): who did which gated action when, and the roles admins grant."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app_pages._access import md, require_page
from app_pages._db import get_db
from cxr_core.auth import admin as actions
from cxr_core.auth import policy
from cxr_core.core.errors import CxrError

PAGE = 50

st.title(":material/admin_panel_settings: Access and audit")
user = require_page("view_audit", "The audit log")

st.subheader("Audit log")
c1, c2 = st.columns(2)
actor = c1.text_input("Identity", key="audit_actor", placeholder="everyone").strip()
action = c2.selectbox("Action", ["(all)", *policy.ACTIONS], key="audit_action")
cursor = st.session_state.setdefault("audit_before", [])
events = actions.audit_log(get_db(), user, limit=PAGE, before_id=cursor[-1] if cursor else None,
                           actor=policy.normalize_identity(actor) or None,
                           action=None if action == "(all)" else action)
st.dataframe(pd.DataFrame([{"#": e.id, "when (UTC)": f"{e.created_at:%Y-%m-%d %H:%M:%S}",
                            "who": e.actor, "via": e.source, "action": e.action,
                            "target": e.target, "outcome": e.outcome,
                            "detail": ", ".join(f"{k}={v}" for k, v in e.detail.items())}
                           for e in events]), hide_index=True, width="stretch")
b1, b2, _ = st.columns([1, 1, 4])
if b1.button("Newer", disabled=not cursor, key="audit_newer", icon=":material/arrow_back:"):
    cursor.pop()
    st.rerun()
if b2.button("Older", disabled=len(events) < PAGE, key="audit_older",
             icon=":material/arrow_forward:"):
    cursor.append(events[-1].id)
    st.rerun()
st.caption("Append-only: the database refuses to change or delete these rows. The CLI lists "
           "them too: `python -m cxr_core audit list`.")

st.subheader("Role grants")
st.caption("Added to the roles the [cxr_roles] table of secrets.toml gives; a higher role "
           "includes the lower ones.")
if user.can("manage_roles"):
    grants = actions.role_grants(get_db(), user)
    st.dataframe(pd.DataFrame([{"identity": g.identity, "roles": ", ".join(g.roles),
                                "granted by": g.granted_by,
                                "when (UTC)": f"{g.granted_at:%Y-%m-%d %H:%M}"}
                               for g in grants]), hide_index=True)
    with st.form("grant_form"):
        who = st.text_input("Identity (email, or issuer|subject)", key="grant_identity")
        roles = st.multiselect("Roles (none: remove the grant)", list(policy.KNOWN_ROLES),
                               key="grant_roles")
        if st.form_submit_button("Save grant", icon=":material/save:"):
            try:
                actions.grant_roles(get_db(), user, who, roles)
                st.success(f"Roles of {md(policy.normalize_identity(who))}: "
                           f"{', '.join(roles) or 'grant removed'}", icon=":material/done:")
            except CxrError as exc:
                st.error(md(exc))
