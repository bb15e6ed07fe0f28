"""Page benchmark: a page's first visit (fresh interpreter, import + first render) now vs with
TensorFlow imported at load, as the Train page did before the TF-free configuration layer.

Each side runs the page once per repeat in a new Python process (``streamlit.testing``'s
``AppTest``, the same script run a browser visit triggers) against a database that holds the
indexed ``chest_xray_224/train`` split (5,216 films). Baseline: the same process imports
``tensorflow`` first. The page must not import TensorFlow on its own (checked, and reported).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ("home", "class_balance", "train", "compare", "review")

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
if sys.argv[2] == "tf":
    import tensorflow  # noqa: F401
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("streamlit_app.py", default_timeout=600)
at.switch_page(sys.argv[1]).run()  # the entry point, then the page, as a browser visit runs
print(json.dumps({"s": time.perf_counter() - t0, "tensorflow": "tensorflow" in sys.modules,
                  "title": [t.value for t in at.title][:1],
                  "exceptions": [str(e.value)[:200] for e in at.exception]}))
"""


def first_visit(page: str, side: str, env: dict) -> dict:
    """One visit of ``app_pages/<page>.py`` in a new interpreter (``side`` "tf": TensorFlow
    imported first); returns ``{"s", "tensorflow" (in sys.modules after), "title" (the page's
    first ``st.title``), "exceptions"}``."""
    path = f"app_pages/{page}.py"
    proc = subprocess.run([sys.executable, "-c", _CHILD, path, side], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{page} ({side}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(shared_data: Path, *, repeat: int = 3, pages: tuple[str, ...] = PAGES) -> dict:
    """Time every page's first visit, both sides, ``repeat`` times each (median kept).

    Returns:
        ``{"bench": "pages", "baseline": {page: s}, "ours": {page: s}, "ratio": sum/sum,
        "per_page_ratio": {...}, "tensorflow_at_load": [pages that imported it]}``.
    """
    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import open_db

    train = Path(shared_data) / "chest_xray_224" / "train"
    with tempfile.TemporaryDirectory(prefix="cxr-bench-pages-") as home:
        env = {**os.environ, "CXR_HOME": home, "CXR_DATA_DIR": "", "CXR_WORKER": "off",
               "PYTHONPATH": str(REPO),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
        db = open_db(url=f"sqlite:///{home}/cxr.db")
        images = index_dataset(db, train, name="train").summary["images"]
        db.engine.dispose()
        baseline, ours, loaded_tf = {}, {}, []
        for page in pages:
            runs = {"tf": [], "ours": []}
            for _ in range(repeat):
                for side in ("ours", "tf"):  # alternate, so drift hits both sides alike
                    out = first_visit(page, side, env)
                    if out["exceptions"]:
                        raise RuntimeError(f"{page} raised: {out['exceptions']}")
                    runs[side].append(out["s"])
                    if side == "ours" and out["tensorflow"] and page not in loaded_tf:
                        loaded_tf.append(page)
            baseline[page] = round(statistics.median(runs["tf"]), 3)
            ours[page] = round(statistics.median(runs["ours"]), 3)
    return {"bench": "pages", "images": images, "repeat": repeat,
            "baseline": baseline, "ours": ours,
            "per_page_ratio": {p: round(baseline[p] / ours[p], 2) for p in pages},
            "ratio": round(sum(baseline.values()) / sum(ours.values()), 2),
            "tensorflow_at_load": loaded_tf}


if __name__ == "__main__":
    data = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "CXR_SHARED_DATA", REPO.parent / "shared" / "data"))
    print(json.dumps(run(data)))
