"""The CLI contract: one JSON object on stdout, one-line errors with non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXR_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "cxr_core", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_index_json_shape(tiny_dataset, cxr_home):
    out = run_cli("index", str(tiny_dataset), "--name", "tiny", "--json", home=cxr_home)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("dataset", "images", "by_split", "by_class", "by_subtype", "patients",
                "duplicate_groups", "cross_split_duplicates", "unreadable"):
        assert key in data
    assert data["dataset"] == "tiny" and data["images"] == 18
    assert data["by_split"] == {"test": 4, "train": 14}
    assert data["by_subtype"]["PNEUMONIA/virus"] == 4


def test_index_errors_are_one_line(tmp_path, cxr_home):
    out = run_cli("index", str(tmp_path / "missing"), "--json", home=cxr_home)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().startswith("error: dataset path does not exist")
    assert "Traceback" not in out.stderr
