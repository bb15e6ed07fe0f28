"""Regenerate the README screenshots from the browser tests' step screenshots.

    .venv/bin/python docs/screenshots.py [--shared-data DIR] [--from-artifacts DIR]

Runs ``tests/e2e`` (Playwright on Debian's Chromium: the demo tour on the embedded demo films,
the real full-resolution sample from ``../shared/data``) with ``CXR_E2E_ARTIFACTS`` set to a temporary folder, then copies a few
step screenshots into ``docs/screenshots/``: the top of each page, as a 256-colour PNG so
that each file stays under about 300 KB. ``--from-artifacts test-artifacts/e2e`` reuses the
screenshots of a test run instead of running the tests again.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"
# step screenshot (tests/e2e/test_browser.py) -> (README picture, height kept in px)
STEPS = {  # the demo tour (tests/e2e/test_demo_tour.py): real films on a first launch
    "demo_02_class_balance": ("class_balance.png", 950),
    "03_augmentation_after": ("augmentation.png", 1200),
    "04_train_curves": ("train.png", 1200),
    "demo_05_compare": ("compare.png", 1150),
    "demo_06_predict": ("predict.png", 1000),
    "demo_07_review": ("review.png", 1000),
    "demo_01_home": ("home.png", 1100),
    "auth_03_reviewer_relabelled": ("sign_in_reviewer.png", 1000),
    "auth_04_train_refused": ("train_refused.png", 700),
}
MAX_BYTES = 300_000


def save_small(src: Path, dst: Path, height: int) -> int:
    """Crop to the top ``height`` px, store as a palette PNG; returns the size in bytes."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.crop((0, 0, im.width, min(im.height, height)))
        im.quantize(256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    return dst.stat().st_size


def run_tests(artifacts: Path, shared: Path | None) -> None:
    env = dict(os.environ, CXR_E2E_ARTIFACTS=str(artifacts), CXR_REQUIRE_BROWSER="1",
               CXR_REQUIRE_DATA="1")
    if shared is not None:
        env["CXR_SHARED_DATA"] = str(shared.resolve())
    subprocess.run([sys.executable, "-m", "pytest", "tests/e2e", "-x", "-q"], cwd=REPO,
                   env=env, check=True)


def copy_steps(artifacts: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for step, (name, height) in STEPS.items():
        size = save_small(artifacts / f"{step}.png", OUT / name, height)
        print(f"{(OUT / name).relative_to(REPO)}: {size / 1000:.0f} KB")
        if size > MAX_BYTES:
            print(f"warning: {name} is over {MAX_BYTES / 1000:.0f} KB", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, help="default: ../shared/data")
    parser.add_argument("--from-artifacts", type=Path,
                        help="step screenshots of an earlier run of tests/e2e")
    args = parser.parse_args()
    if args.from_artifacts is not None:
        copy_steps(args.from_artifacts)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_tests(Path(tmp), args.shared_data)
        copy_steps(Path(tmp))


if __name__ == "__main__":
    main()
