"""Regenerate the README screenshots with the real data (Playwright on Debian's Chromium).

    .venv/bin/python docs/screenshots.py [SHARED_DATA]

Starts the app on a temporary CXR_HOME with the Kermany train split registered, then visits
Class balance, Augmentation and Predict (uploading one real film, Grad-CAM on) and saves PNGs
under docs/screenshots/.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(shared: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    port, home = _port(), tempfile.mkdtemp()
    env = dict(os.environ, CXR_HOME=home, PYTHONPATH=str(REPO),
               CXR_DATA_DIR=str(shared / "chest_xray_224" / "train"))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py",
                             "--server.port", str(port)], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        OUT.mkdir(parents=True, exist_ok=True)
        film = next((shared / "chest_xray_fullres_sample" / "train" / "PNEUMONIA").glob("*.jpeg"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{url}/class_balance", wait_until="domcontentloaded")
            expect(page.get_by_text("Images per split").first).to_be_visible(timeout=180_000)
            time.sleep(3)
            page.screenshot(path=str(OUT / "class_balance.png"))
            page.goto(f"{url}/augmentation", wait_until="domcontentloaded")
            expect(page.get_by_text("original").first).to_be_visible(timeout=120_000)
            time.sleep(3)
            page.screenshot(path=str(OUT / "augmentation.png"))
            page.goto(f"{url}/predict", wait_until="domcontentloaded")
            page.locator("input[type=file]").first.set_input_files(str(film), timeout=120_000)
            expect(page.get_by_text("PNEUMONIA").first).to_be_visible(timeout=180_000)
            time.sleep(8)
            page.screenshot(path=str(OUT / "predict.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else REPO.parent / "shared" / "data"))
