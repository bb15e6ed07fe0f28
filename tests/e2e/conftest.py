"""Real-browser fixtures: one Streamlit server and one Chromium per test module.

Never downloads a browser: Playwright drives Debian's Chromium (``apt-get install chromium``).
Without it the tests skip, or fail when ``CXR_REQUIRE_BROWSER=1``.

Each test gets a fresh browser tab (a new Streamlit session) on the module's server. The
server's state lives in a temporary ``CXR_HOME``, set in this process too, so a test can
prepare or check the same database with the core API (``e2e_db``). Step screenshots (``shot``),
the server log and the training worker's log go to ``$CXR_E2E_ARTIFACTS`` (default
``<repo>/test-artifacts/e2e``); a failing test also leaves ``FAILED_<test>.png`` there.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_FILES, write_image
from e2e.oidc import oidc_provider, write_auth_secrets  # noqa: F401 - fixture, sign-in harness

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 90
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SHOT_HEIGHT = 3000


@dataclass(frozen=True)
class AppServer:
    """A running ``streamlit run streamlit_app.py`` and the state folder it uses."""

    url: str
    home: Path


def _require(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CXR_REQUIRE_BROWSER") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so the page fixture knows a test failed."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


# -- State: CXR_HOME, database, tiny dataset -------------------------------------------------

@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots and logs go ($CXR_E2E_ARTIFACTS, default test-artifacts/e2e)."""
    path = Path(os.environ.get("CXR_E2E_ARTIFACTS") or REPO / "test-artifacts" / "e2e")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("FAILED_*.png"):  # from an earlier session
        stale.unlink()
    return path


@pytest.fixture(scope="module")
def e2e_home(tmp_path_factory) -> Iterator[Path]:
    """The module's CXR_HOME, also set in this process: core calls here and the server agree."""
    home = tmp_path_factory.mktemp("e2e") / "cxr_home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_HOME", str(home))
        mp.delenv("CXR_DB_URL", raising=False)
        mp.delenv("CXR_DATA_DIR", raising=False)
        yield home


@pytest.fixture(scope="module")
def e2e_db(e2e_home):
    """The server's database, opened from the test process (the same SQLite file)."""
    from cxr_core.storage import open_db

    db = open_db()
    yield db
    db.engine.dispose()


@pytest.fixture(scope="module")
def e2e_tiny(tmp_path_factory, e2e_db) -> Path:
    """The 18-image tiny dataset of tests/conftest.py, indexed as "tiny" before the server runs."""
    from cxr_core.data.indexing import index_dataset

    root = tmp_path_factory.mktemp("tiny") / "chest_xray"
    for seed, (folder, name) in enumerate(((f, n) for f, ns in TINY_FILES.items() for n in ns), 1):
        write_image(root / folder / name, seed=seed)
    index_dataset(e2e_db, root, name="tiny")
    return root


# -- Servers ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(home: Path, log_path: Path, *, script: Path = REPO / "streamlit_app.py",
          secrets: Path | None = None, env_extra: dict | None = None) -> Iterator[AppServer]:
    """``streamlit run streamlit_app.py`` on 127.0.0.1 with ``home`` as CXR_HOME.

    ``secrets``: the only secrets file the server reads (``--secrets.files``), e.g. an
    ``[auth]`` table from tests/e2e/oidc.py; ``script``: another app (harness checks);
    ``env_extra``: more environment for the server (e.g. ``CXR_DEMO=on``).
    """
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CXR_DB_URL", "CXR_DATA_DIR")}
    env.update(CXR_HOME=str(home), PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("CXR_DEMO", "off")  # the first-launch demo only where a module asks for it
    env.update(env_extra or {})
    with open(log_path, "wb") as log:  # a file: a full pipe would block the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(script),
             "--server.address", "127.0.0.1", "--server.port", str(port),
             "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false",
             *(["--secrets.files", str(secrets)] if secrets is not None else [])],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("streamlit did not start: " + log_path.read_text()[-2000:])
                    time.sleep(0.3)
            yield AppServer(url, home)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def chromium() -> str:
    _require(Path(CHROMIUM).exists(),
             f"Debian's chromium is required at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def app_server(chromium, e2e_home, e2e_db, e2e_tiny, artifacts) -> Iterator[AppServer]:
    """The module's server; training workers it launched are stopped with it."""
    with serve(e2e_home, artifacts / "streamlit.log") as server:
        try:
            yield server
        finally:
            _stop_workers(e2e_home, e2e_db, artifacts)


@pytest.fixture(scope="module")
def auth_app_server(chromium, e2e_home, e2e_db, e2e_tiny, artifacts, oidc_provider,
                    request) -> Iterator[AppServer]:
    """The module's server with sign-in on: ``[auth]`` pointing at ``oidc_provider``, plus the
    test module's ``AUTH_SECRETS_EXTRA`` TOML (e.g. ``[cxr_roles]``). Sign in with
    ``e2e.oidc.sign_in(page, oidc_provider, email, groups)``."""
    secrets = write_auth_secrets(e2e_home.parent / "secrets.toml", oidc_provider,
                                 getattr(request.module, "AUTH_SECRETS_EXTRA", ""))
    with serve(e2e_home, artifacts / "streamlit_auth.log", secrets=secrets) as server:
        try:
            yield server
        finally:
            _stop_workers(e2e_home, e2e_db, artifacts)


@pytest.fixture()
def fresh_server(chromium, e2e_home, e2e_tiny, artifacts) -> Iterator[AppServer]:
    """A server no browser has visited yet (first-request behaviour), on the module's home."""
    with serve(e2e_home, artifacts / "streamlit_fresh.log") as server:
        yield server


def _stop_workers(home: Path, db, artifacts: Path) -> None:
    """SIGTERM the worker processes the app launched on ``home`` (checked by their env)."""
    from sqlalchemy import text

    with db.engine.connect() as conn:
        pids = {int(p) for (p,) in conn.execute(text("SELECT pid FROM workers"))}
    marker = home / "worker.pid"  # launched, maybe not registered yet
    if marker.is_file():
        pids.add(int(json.loads(marker.read_text())["pid"]))
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone already
            continue
        if b"cxr_core worker" in cmdline and f"CXR_HOME={home}".encode() in environ:
            os.kill(pid, signal.SIGTERM)
    if (home / "logs" / "worker.log").is_file():
        shutil.copyfile(home / "logs" / "worker.log", artifacts / "worker.log")


# -- Browser, tabs, screenshots --------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(chromium) -> Iterator:
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=chromium, headless=True,
                                      args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _box(locator, attempts: int = 20) -> dict:
    """``locator``'s bounding box, retried: a fragment that redraws (Train's live chart every
    2 s) can detach the element between the lookup and the measurement, and Playwright then
    answers ``None``."""
    for _ in range(attempts):
        locator.wait_for(state="visible")
        box = locator.bounding_box()
        if box is not None:
            return box
        locator.page.wait_for_timeout(250)
    raise AssertionError(f"{locator} never had a bounding box")


def screenshot(page, path: Path, *, start=None, end=None) -> None:
    """The whole page, or the band from locator ``start`` to locator ``end``.

    Streamlit scrolls inside ``stMain``, so a full-page screenshot only shows the window:
    the window grows to the content's height (up to MAX_SHOT_HEIGHT) for the picture.
    """
    size = page.viewport_size
    main = page.get_by_test_id("stMain")
    height = main.evaluate("el => el.scrollHeight") if main.count() else size["height"]
    page.set_viewport_size({"width": size["width"],
                            "height": min(max(height, size["height"]), MAX_SHOT_HEIGHT)})
    try:
        clip = None
        if start is not None:
            top, bottom = _box(start), _box(end or start)
            y0 = max(top["y"] - 16, 0)
            clip = {"x": 0, "y": y0, "width": size["width"],
                    "height": bottom["y"] + bottom["height"] + 16 - y0}
        page.screenshot(path=str(path), clip=clip, animations="disabled")
    finally:
        page.set_viewport_size(size)


@pytest.fixture()
def shot(artifacts):
    """``shot(page, "04_train_running")`` saves ``04_train_running.png`` in the artifacts."""
    return lambda page, name, **band: screenshot(page, artifacts / f"{name}.png", **band)


@pytest.fixture()
def page(browser, artifacts, request) -> Iterator:
    """A fresh tab (a new Streamlit session); a screenshot is kept when the test fails."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    tab = context.new_page()
    yield tab
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        name = request.node.name.replace("/", "_").replace("[", "_").rstrip("]")
        try:
            screenshot(tab, artifacts / f"FAILED_{name}.png")
        except Exception as exc:  # the screenshot is a courtesy; keep the real failure
            print(f"could not save the failure screenshot: {exc}")
    context.close()
