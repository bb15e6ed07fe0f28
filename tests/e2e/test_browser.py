"""One real-browser path: Streamlit server + Playwright driving Debian's Chromium.

Never downloads a browser: it uses /usr/bin/chromium (``apt-get install chromium``).
Set CXR_SCREENSHOTS=DIR to save the page screenshots used in the README.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def app_server(tmp_path, tiny_dataset):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CXR_REQUIRE_BROWSER") == "1":
            pytest.fail("Debian's chromium is required (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    port = _free_port()
    env = dict(os.environ, CXR_HOME=str(tmp_path / "home"), CXR_DATA_DIR=str(tiny_dataset),
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"),
         "--server.port", str(port), "--server.headless", "true"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + proc.stdout.read().decode()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_browser_home_and_class_balance(app_server):
    from playwright.sync_api import expect, sync_playwright

    shots = os.environ.get("CXR_SCREENSHOTS")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # A deep link on a freshly started server must get our navigation, not Streamlit's
        # legacy pages/ auto-discovery (which would list helper modules as pages).
        page.goto(app_server + "/class_balance", wait_until="domcontentloaded")
        nav = page.get_by_test_id("stSidebarNav")
        expect(nav.get_by_text("Augmentation")).to_be_visible(timeout=60_000)
        expect(nav.get_by_text("shared")).to_have_count(0)
        page.goto(app_server, wait_until="domcontentloaded")
        expect(page.get_by_text("CXR Workbench").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Explore class balance").first).to_be_visible(timeout=60_000)
        if shots:
            page.screenshot(path=f"{shots}/home.png")
        page.get_by_role("link", name="Class balance").first.click()
        expect(page.get_by_text("Images per split").first).to_be_visible(timeout=90_000)
        expect(page.get_by_text("patients in both train and validation").first).to_be_visible()
        if shots:
            page.screenshot(path=f"{shots}/class_balance.png", full_page=True)
        browser.close()
