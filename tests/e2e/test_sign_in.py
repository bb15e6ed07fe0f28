"""Sign-in through a real OpenID provider (issue 15 item 6), in a real browser.

The module's server runs streamlit_app.py with ``[auth]`` pointing at ``oidc-provider-mock``
on 127.0.0.1 (tests/e2e/oidc.py, ``auth_app_server`` in conftest) and ``[cxr_roles]`` below:
the radiology group are reviewers. A test signs in with ``sign_in(page, oidc_provider, email,
groups)``: the app's "Sign in" button, the provider's form, back on the app with the cookie.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from e2e.oidc import sign_in
from e2e.test_browser import choose

pytestmark = pytest.mark.e2e
expect = pytest.importorskip("playwright.sync_api").expect

SLOW_MS = 180_000  # first TensorFlow import on a busy host

AUTH_SECRETS_EXTRA = """
[cxr_roles]
default = "viewer"
claim = "groups"
reviewer = ["group:radiology"]
"""

REVIEWER = "rev@hospital.org"
REPO = Path(__file__).resolve().parents[2]


def _app_has_sign_in() -> bool:
    sources = [REPO / "streamlit_app.py", *sorted((REPO / "app_pages").glob("*.py"))]
    return any("st.login" in path.read_text() for path in sources if path.is_file())


if not _app_has_sign_in():
    pytest.skip("app sign-in not wired yet", allow_module_level=True)


def settle(page, timeout: int = SLOW_MS) -> None:
    expect(page.get_by_test_id("stApp")).to_have_attribute(
        "data-test-script-state", "notRunning", timeout=timeout)
    expect(page.get_by_test_id("stException")).to_have_count(0)


def test_sign_in_screen_when_auth_is_configured(auth_app_server, page, shot):
    page.goto(auth_app_server.url, wait_until="domcontentloaded")
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible(
        timeout=SLOW_MS)
    settle(page)
    expect(page.get_by_text("Local mode")).to_have_count(0)
    shot(page, "auth_01_sign_in_screen")


def test_reviewer_signs_in_through_the_provider(auth_app_server, oidc_provider, page, shot,
                                                e2e_db):
    page.goto(auth_app_server.url, wait_until="domcontentloaded")
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_be_visible(
        timeout=SLOW_MS)
    sign_in(page, oidc_provider, REVIEWER, ["radiology"], name="Rita Reviewer")
    settle(page)
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text(REVIEWER)).to_be_visible()  # "Signed in as Rita Reviewer (...)"
    expect(sidebar.get_by_text(re.compile(r"(^|\W)reviewer$"))).to_be_visible()  # role badge
    expect(sidebar.get_by_role("link", name=re.compile(r"Review$"))).to_be_visible()
    expect(sidebar.get_by_role("button", name="Sign out")).to_be_visible()
    shot(page, "auth_02_signed_in_reviewer")

    # The reviewer relabels: stored with the signed-in identity, no name typed anywhere.
    sidebar.get_by_role("link", name=re.compile(r"Review$")).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Review", timeout=SLOW_MS)
    settle(page)
    expect(page.get_by_role("textbox", name="Your name (stored with each label)")
           ).to_have_count(0)
    choose(page, "Dataset", "tiny")
    sidebar.get_by_text("By class", exact=True).click()
    choose(page, "Class", "NORMAL")
    target = page.locator(".st-key-review_label_0 button")
    expect(target).to_be_visible(timeout=SLOW_MS)
    settle(page)
    target.click()
    settle(page)
    from cxr_core.storage import relabels as rel_store

    deadline = time.monotonic() + 30
    while True:
        with e2e_db.session() as s:
            rows = rel_store.list_relabels(session=s)
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [r.reviewer for r in rows] == [REVIEWER]
    shot(page, "auth_03_reviewer_relabelled")

    # Train is refused: the form is not offered, and no run can be queued.
    sidebar.get_by_role("link", name=re.compile(r"Train$")).click()
    expect(page.get_by_text("Starting runs needs the scientist role")).to_be_visible(
        timeout=SLOW_MS)
    settle(page)
    expect(page.get_by_role("button", name="Start training")).to_have_count(0)
    with e2e_db.session() as s:
        from cxr_core.storage import runs as run_store
        assert run_store.list_runs(session=s) == []
    shot(page, "auth_04_train_refused")

