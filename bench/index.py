"""Index benchmark: first scan of a dataset vs opening it again once indexed.

Baseline: a first scan into a fresh database (headers + content hashes of every file).
Ours: opening the indexed dataset again (records from the DB), and an incremental re-index
(directory walk + stat, no file read) — both measured in the same run. Target ratio ≥ 50×.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(shared_data: Path, *, repeat: int = 3) -> dict:
    """Measure on the full shared train split (5,216 images).

    Returns:
        {"bench": "index", "baseline": {...}, "ours": {...}, "ratio": first_scan / open}
    """
    from cxr_core.data.indexing import index_dataset, open_dataset
    from cxr_core.storage import open_db

    path = Path(shared_data) / "chest_xray_224" / "train"
    scans = []
    for _ in range(repeat):  # each first scan into its own fresh database
        with tempfile.TemporaryDirectory() as tmp:
            db = open_db(url=f"sqlite:///{tmp}/bench.db")
            t0 = time.perf_counter()
            rep = index_dataset(db, path, name="bench")
            scans.append(time.perf_counter() - t0)
            db.engine.dispose()
    with tempfile.TemporaryDirectory() as tmp:
        db = open_db(url=f"sqlite:///{tmp}/bench.db")
        index_dataset(db, path, name="bench")
        open_s = _time(lambda: open_dataset(db, "bench"), repeat * 3)
        rescan_s = _time(lambda: index_dataset(db, path, name="bench"), repeat * 3)
        db.engine.dispose()
    first = min(scans)
    return {"bench": "index", "images": rep.summary["images"],
            "baseline": {"first_scan_s": round(first, 4)},
            "ours": {"open_s": round(open_s, 4), "incremental_reindex_s": round(rescan_s, 4),
                     "reindex_ratio": round(first / rescan_s, 1)},
            "ratio": round(first / open_s, 1), "target": 50}


if __name__ == "__main__":
    data = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    print(json.dumps(run(data)))
