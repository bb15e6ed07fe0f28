"""Sign-in for real-browser tests: a local OpenID provider and Streamlit's ``[auth]`` secrets.

``oidc_provider`` runs ``oidc-provider-mock`` (``python -m oidc_provider_mock``) on a free
127.0.0.1 port for the module. It accepts any client id, secret and redirect URI; its
authorization page (``GET/POST /oauth2/authorize``) is one text field ``sub`` and an
"Authorize" button. The claims a subject gets are set beforehand with ``PUT /users/<sub>``
(a JSON object of claims; without it the provider gives ``{"email": sub}``), so ``sign_in``
stores ``email``, ``name`` and ``groups`` for the subject, then fills the form.

``write_auth_secrets`` writes the secrets file a server reads with ``--secrets.files``
(``serve(..., secrets=path)`` in conftest): ``[auth]`` pointing at the provider, with
``redirect_uri = "http://127.0.0.1:{port}/oauth2callback"`` (Streamlit fills in its port)
so the browser, the cookie and the callback all stay on 127.0.0.1, plus any extra TOML
(``[cxr_roles]``, ``[cxr]``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets as _secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 30
CLIENT_ID = "cxr-e2e"
CLIENT_SECRET = "cxr-e2e-secret"


@dataclass(frozen=True)
class OidcProvider:
    """A running oidc-provider-mock: ``url`` is its issuer (``http://127.0.0.1:PORT``)."""

    url: str
    log: Path

    @property
    def metadata_url(self) -> str:
        return self.url + "/.well-known/openid-configuration"

    def set_user(self, sub: str, claims: dict) -> None:
        """The claims the provider will issue for ``sub`` (``PUT /users/<sub>``)."""
        request = urllib.request.Request(
            f"{self.url}/users/{urllib.request.quote(sub, safe='')}", method="PUT",
            data=json.dumps(claims).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204, response.status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def oidc_provider(artifacts) -> Iterator[OidcProvider]:
    """oidc-provider-mock on 127.0.0.1 (a subprocess), up until the module's tests end."""
    if importlib.util.find_spec("oidc_provider_mock") is None:  # runs as a subprocess
        pytest.skip("oidc-provider-mock is not installed (pip install -r requirements-dev.txt)")
    with run_oidc_provider(artifacts / "oidc_provider.log") as provider:
        yield provider


@contextmanager
def run_oidc_provider(log_path: Path) -> Iterator[OidcProvider]:
    """``python -m oidc_provider_mock`` on a free 127.0.0.1 port, its output in ``log_path``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, NO_COLOR="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1",
             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    with urllib.request.urlopen(url + "/.well-known/openid-configuration",
                                                timeout=1) as response:
                        assert json.load(response)["issuer"] == url
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("oidc-provider-mock did not start: "
                                    + log_path.read_text()[-2000:])
                    time.sleep(0.2)
            yield OidcProvider(url, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_auth_secrets(path: Path, provider: OidcProvider, extra: str = "") -> Path:
    """A secrets.toml with ``[auth]`` for ``provider`` (then ``extra`` TOML); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[auth]\n"
        'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
        f'cookie_secret = "{_secrets.token_hex(32)}"\n'
        f'client_id = "{CLIENT_ID}"\n'
        f'client_secret = "{CLIENT_SECRET}"\n'
        f'server_metadata_url = "{provider.metadata_url}"\n'
        + ("\n" + extra.strip() + "\n" if extra.strip() else ""))
    return path


def sign_in(page, provider: OidcProvider, email: str, groups: Iterable[str] = (),
            *, name: str | None = None, timeout: int = 60_000) -> None:
    """Click the app's "Sign in", authorize ``email`` (subject = email) with ``groups`` at the
    provider, and wait until the browser is back on the app. ``page`` shows the app."""
    from playwright.sync_api import expect

    provider.set_user(email, {"email": email, "email_verified": True,
                              "name": name or email.split("@")[0], "groups": list(groups)})
    app_origin = page.url.split("/", 3)[:3]
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(provider.url + "/oauth2/authorize**", timeout=timeout)
    page.locator("input[name=sub]").fill(email)
    page.get_by_role("button", name="Authorize", exact=True).click()
    # /oauth2callback sets the auth cookie and redirects to the app's root.
    page.wait_for_url(lambda url: url.split("/", 3)[:3] == app_origin
                      and "/oauth2callback" not in url, timeout=timeout)
    expect(page.get_by_role("button", name="Sign in", exact=True)).to_have_count(
        0, timeout=timeout)
