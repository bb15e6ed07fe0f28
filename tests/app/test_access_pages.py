"""AppTest of sign-in and roles: local mode, the sign-in screen, and each role's pages with
``st.user`` set as Streamlit's OIDC would (the checks in cxr_core are tested in test_auth)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from app.test_review_page import tiny  # noqa: F401 - fixture: five indexed images

from cxr_core.auth import admin as auth_admin
from cxr_core.auth import gate as actions
from cxr_core.auth import policy
from cxr_core.jobs import queue
from cxr_core.storage import open_db
from cxr_core.storage import audit as audit_store
from cxr_core.storage import relabels as rel_store

REPO = Path(__file__).resolve().parents[2]
AUTH = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "s" * 32,
        "client_id": "cxr", "client_secret": "secret",
        "server_metadata_url": "http://127.0.0.1:9/.well-known/openid-configuration"}
ROLES = {"default": "viewer", "admin": ["lead@h.org"], "scientist": ["ds@h.org"],
         "reviewer": ["group:radiology"]}
USERS = {"viewer": {"email": "cfo@h.org", "name": "CFO"},
         "reviewer": {"email": "rad@h.org", "name": "Dr Rad", "groups": ["radiology"]},
         "scientist": {"email": "ds@h.org"}, "admin": {"email": "lead@h.org"}}
USERS = {k: {**v, "email_verified": True} for k, v in USERS.items()}  # as the provider says


def app(page: str = "streamlit_app.py", role: str | None = None,
        signed_in: bool = True) -> AppTest:
    at = AppTest.from_file(str(REPO / page), default_timeout=60)
    if role is not None:
        at.secrets["auth"] = AUTH
        at.secrets["cxr_roles"] = ROLES
        at.user = {"is_logged_in": signed_in, **(USERS[role] if signed_in else {})}
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest, kind: str) -> str:
    return " | ".join(str(e.value) for e in getattr(at, kind))


def test_local_mode_badge_and_every_page(cxr_home):
    at = app()
    assert "Local mode: single user, every role" in texts(at.sidebar, "markdown")
    assert not [b for b in at.sidebar.button if b.label == "Sign out"]


def test_auth_configured_shows_sign_in_and_nothing_else(cxr_home):
    at = app(role="viewer", signed_in=False)
    assert [b.label for b in at.button] == ["Sign in"]
    assert "Sign in to continue" in texts(at, "info")
    at = app("app_pages/train.py", role="viewer", signed_in=False)
    assert [b.label for b in at.button] == ["Sign in"]  # a page opened alone is gated too


def test_viewer_reads_but_cannot_review_train_or_send(tiny):  # noqa: F811
    at = app(role="viewer")
    assert "Signed in as CFO" in texts(at.sidebar, "caption")
    at = app("app_pages/review.py", role="viewer")
    assert "Review needs the reviewer or scientist or admin role" in texts(at, "warning")
    assert not at.get("progress")
    at = app("app_pages/train.py", role="viewer")
    assert "Starting runs needs the scientist role" in texts(at, "info")
    assert not [b for b in at.button if b.label == "Start training"]
    at = app("app_pages/compare.py", role="reviewer")
    assert "Making an ensemble fixes an operating point" in texts(at, "caption")
    assert not [b for b in at.button if b.label == "Make ensemble"]


def test_reviewer_relabels_as_the_signed_in_identity(tiny):  # noqa: F811
    db, dataset_id = tiny
    at = app("app_pages/review.py", role="reviewer")
    assert not [t for t in at.text_input if t.key == "review_name"]  # the sign-in's identity
    assert not [t for t in at.text_input if t.label.startswith("Dataset folder")]  # no indexing
    at.radio(key="review_queue").set_value("class").run()
    at.button(key="review_label_0").click().run()
    assert not at.exception, at.exception
    with db.session() as s:
        (row,) = rel_store.list_relabels(session=s, dataset_id=dataset_id)
    assert row.reviewer == "rad@h.org"
    admin = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
    assert [(e.actor, e.action, e.outcome) for e in auth_admin.audit_log(db, admin)] == [
        ("rad@h.org", "relabel", "ok")]
    assert "Exporting every relabel needs the scientist role" in texts(at, "caption")


def test_scientist_gets_the_train_form(tiny):  # noqa: F811
    at = app("app_pages/train.py", role="scientist")
    assert [b for b in at.button if b.label == "Start training"]


@pytest.mark.parametrize("role, allowed", [("scientist", False), ("admin", True)])
def test_audit_page_is_for_admins(tiny, role, allowed):  # noqa: F811
    db, _ = tiny
    actions.record(db, policy.Principal(identity="ds@h.org", roles=frozenset({"scientist"})),
                   "train", "run:1")
    at = app("app_pages/admin.py", role=role)
    if allowed:
        table = at.dataframe[0].value
        assert list(table["who"]) == ["ds@h.org"] and list(table["action"]) == ["train"]
        at.text_input(key="grant_identity").input("new@h.org")
        at.multiselect(key="grant_roles").set_value(["reviewer"])
        at.button[-1].click().run()
        assert not at.exception, at.exception
        p = actions.effective_principal(open_db(), {"email": "new@h.org", "email_verified": True}, ROLES)
        assert p.top_role == "reviewer"
    else:
        assert "audit log needs the admin role" in texts(at, "warning")


def count_grant_reads(monkeypatch) -> list[str]:
    """The identities whose role grants were read from the database, one per read."""
    calls: list[str] = []
    real = audit_store.granted_roles

    def counted(**kw):
        calls.append(kw["identity"])
        return real(**kw)
    monkeypatch.setattr(audit_store, "granted_roles", counted)
    return calls


def test_principal_is_read_once_per_run_and_a_revoked_grant_applies_next_run(tiny,  # noqa: F811
                                                                             monkeypatch):
    db, _ = tiny
    lead = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
    auth_admin.grant_roles(db, lead, "cfo@h.org", ["reviewer"])  # a viewer by [cxr_roles]
    calls = count_grant_reads(monkeypatch)
    at = app(role="viewer")
    assert calls == ["cfo@h.org"]  # the entry script, its badge and the Home page: one read
    assert "badge: reviewer]" in texts(at.sidebar, "markdown")
    at.switch_page("app_pages/review.py").run()  # asks principal() several times
    assert not at.exception, at.exception
    assert len(calls) == 2 and "Review needs" not in texts(at, "warning")
    at.radio(key="review_queue").set_value("class").run()  # a widget: one more full run
    assert len(calls) == 3

    auth_admin.grant_roles(db, lead, "cfo@h.org", [])  # revoked while cfo has Review open
    at.run()
    assert not at.exception, at.exception
    assert len(calls) == 4
    assert "badge: viewer]" in texts(at.sidebar, "markdown")
    assert not [r for r in at.radio if r.key == "review_queue"]  # Review is gone: Home


def test_a_page_run_alone_reads_the_principal_on_each_call(tiny, monkeypatch):  # noqa: F811
    calls = count_grant_reads(monkeypatch)  # no entry script: nothing to key a cache on
    app("app_pages/review.py", role="reviewer")
    assert len(calls) >= 2 and set(calls) == {"rad@h.org"}


def test_view_jobs_are_asked_as_the_user_and_refused_without_a_role(tiny):  # noqa: F811
    db, _ = tiny
    at = app("app_pages/class_balance.py", role="viewer")
    (job,) = queue.recent_jobs(db, "split_preview")
    assert job.created_by == "cfo@h.org"
    admin = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
    assert auth_admin.audit_log(db, admin) == []  # a view job is not an audit row

    at = AppTest.from_file(str(REPO / "app_pages/class_balance.py"), default_timeout=60)
    at.secrets["auth"], at.secrets["cxr_roles"] = AUTH, {**ROLES, "default": ""}
    at.user = {"is_logged_in": True, "email": "nobody@h.org", "email_verified": True}
    at.run()
    assert not at.exception, at.exception
    assert "may not compute view" in texts(at, "warning") and "no role" in texts(at, "warning")
    assert len(queue.recent_jobs(db, "split_preview")) == 1
    assert [(e.actor, e.action, e.outcome) for e in auth_admin.audit_log(db, admin)] == [
        ("nobody@h.org", "compute_view", "denied")]


# -- Local mode serves this machine only (issue 26 item 1) ------------------------------------

@pytest.mark.parametrize("ip, headers, refused", [
    (None, {}, None),
    (None, {"Host": "localhost:8501"}, None),
    (None, {"Host": "127.0.0.1:8501"}, None),
    (None, {"Host": "[::1]:8501"}, None),
    ("10.1.2.3", {"Host": "localhost:8501"}, "the client 10.1.2.3 is not on this machine"),
    (None, {"Host": "localhost:8501", "X-Forwarded-For": "10.1.2.3"}, "through a proxy"),
    (None, {"Host": "localhost", "Forwarded": "for=10.1.2.3"}, "through a proxy"),
    (None, {"host": "evil.example:8501"}, "names this server 'evil.example:8501'"),
    (None, {"Host": "lab-server.local:8501"}, "not localhost"),
])
def test_local_mode_refuses_anything_but_this_machine(ip, headers, refused):
    why = policy.local_access_refusal(ip, headers)
    assert (why is None) if refused is None else (refused in why)


def test_a_remote_client_gets_a_refusal_page_and_an_audit_row(cxr_home, monkeypatch):
    from app_pages import _access

    monkeypatch.setattr(_access, "_request",
                        lambda: ("10.1.2.3", {"Host": "lab-server:8501"}))
    at = app()
    error = texts(at, "error").replace("\\", "")  # markdown-escaped
    assert "serves only the person at this machine" in error
    assert "the client 10.1.2.3 is not on this machine" in error and "Serving a team" in error
    assert not at.get("page_link") and not at.sidebar.button  # nothing of the app runs
    events = auth_admin.audit_log(open_db(), policy.local_principal(""), action="view")
    assert [(e.outcome, e.detail["client"], e.detail["host"]) for e in events] == [
        ("denied", "10.1.2.3", "lab-server:8501")]
    at.run()  # audited once per session
    assert len(auth_admin.audit_log(open_db(), policy.local_principal(""), action="view")) == 1


def test_the_shipped_streamlit_config_listens_on_loopback_only():
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"


def test_sign_in_without_a_roles_mapping_does_not_start(cxr_home):
    """Deny by default (issue 26 item 3): [auth] and no [cxr_roles] mapping is refused before
    anyone signs in, with what to add."""
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    at.secrets["auth"] = AUTH
    at.run()
    assert not at.exception, at.exception
    error = texts(at, "error").replace("\\\\", "")
    assert "Sign-in is misconfigured" in error and "gives no identity a role" in error
    assert not [b for b in at.button if b.label == "Sign in"]


def test_an_account_refused_by_issuer_sees_why_and_can_sign_out(cxr_home):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60)
    at.secrets["auth"] = AUTH
    at.secrets["cxr_roles"] = {**ROLES, "allowed_issuers": ["https://idp.h.org"]}
    at.user = {"is_logged_in": True, "email": "lead@h.org", "email_verified": True,
               "iss": "https://elsewhere", "sub": "1"}
    at.run()
    assert not at.exception, at.exception
    assert "Access refused" in texts(at, "error") and "are not accepted here" in texts(at, "error")
    assert [b.label for b in at.button] == ["Sign out"]
