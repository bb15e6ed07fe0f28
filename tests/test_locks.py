"""The lock files with hashes (issue 26 item 8): each agrees with the pins it was made from,
hashes every package, keeps the TensorFlow platform markers, and is what the README's two
commands and CI install."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^([A-Za-z0-9_.\[\]-]+)==([^\s;\\]+)\s*(?:;\s*([^\\#]+?))?\s*(?:\\|#|$)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def pins(path: Path) -> dict[tuple[str, str], str]:
    """(name, marker) -> version of every ``name==version`` line (markers normalised)."""
    out = {}
    for line in path.read_text().splitlines():
        m = _REQ.match(line.strip())
        if m:
            marker = (m.group(3) or "").replace('"', "'").strip()
            out[(_norm(m.group(1)), marker)] = m.group(2)
    return out


def hashed(path: Path) -> dict[str, int]:
    """name -> number of hashes, from a pip-compile / uv lock (``name==v \\`` then hashes)."""
    counts: dict[str, int] = {}
    name = None
    for line in path.read_text().splitlines():
        m = _REQ.match(line.strip())
        if m:
            name = _norm(m.group(1)) + ("" if not m.group(3) else f";{m.group(3).strip()}")
            counts[name] = 0
        elif line.strip().startswith("--hash=sha256:") and name is not None:
            counts[name] += 1
    return counts


@pytest.mark.parametrize("source, lock", [("requirements.txt", "requirements.lock"),
                                          ("requirements-dev.txt", "requirements-dev.lock")])
def test_a_lock_pins_what_its_requirements_pin_with_hashes(source, lock):
    wanted = pins(REPO / source)
    if source == "requirements-dev.txt":
        wanted.update(pins(REPO / "requirements.txt"))  # -r requirements.txt
    locked = pins(REPO / lock)
    for (name, marker), version in wanted.items():
        assert locked.get((name, marker)) == version, (
            f"{lock} has {name}{';' + marker if marker else ''}=={locked.get((name, marker))}"
            f", {source} pins {version}: make the locks again (README, Command line)")
    unhashed = [n for n, k in hashed(REPO / lock).items() if k == 0]
    assert not unhashed, f"{lock}: packages without a hash: {unhashed}"
    assert len(hashed(REPO / lock)) >= len(wanted) + 40  # the transitive ones are there too


def test_the_tensorflow_platform_markers_survive_in_both_locks():
    for lock in ("requirements.lock", "requirements-dev.lock"):
        locked = pins(REPO / lock)
        assert locked[("tensorflow-cpu", "platform_machine == 'x86_64'")] == "2.21.0"
        assert locked[("tensorflow", "platform_machine != 'x86_64'")] == "2.21.0"


def test_the_dev_lock_agrees_with_the_runtime_lock():
    runtime, dev = pins(REPO / "requirements.lock"), pins(REPO / "requirements-dev.lock")
    differ = {k: (v, dev.get(k)) for k, v in runtime.items() if dev.get(k) != v}
    assert not differ, f"requirements-dev.lock differs from requirements.lock: {differ}"


def test_the_readme_commands_and_ci_install_the_locks():
    readme = (REPO / "README.md").read_text()
    first, second = [line for line in readme.splitlines() if line.startswith("python3 -m venv")][:2]
    assert "pip install -r requirements.lock" in first and "streamlit run" in first
    assert "pip install -r requirements-dev.lock" in second and "-m pytest" in second
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q -r requirements-dev.lock && .venv/bin/python -m pytest" in ci
