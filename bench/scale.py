"""Scale benchmark: every page's data at 100,000 images against the same at 5,000.

Each level is built in a temp dir by its own process (``build``): tiny distinct generated PNGs
in the Kaggle layout with Kermany file names (several images per patient), indexed with the
real indexer, then relabel rows (several reviewers per image, ~5% undos) and evaluations of
the test split with per-image outputs (one comparable image group, an operating point per
run), stored the way the app stores them. A second, fresh process per level plays the web
process (``measure``, ``CXR_WORKER=off``): it renders each page through the entry point with
``AppTest`` (first render with empty data caches; the jobs the render queued, e.g. a split
preview, are then run by a real ``worker --once`` process and timed apart; then the median of
a few reruns = clicks), times the cxr_core calls each page makes (:data:`DATA_CALLS`) and
reads its peak RSS. A render or call over ``CXR_BENCH_SCALE_TIMEOUT`` s (120) is reported as
a timeout and a fresh measuring process does the rest.

Goals (the issue): every page under 1.5 s at 100k, time growing at most 3× from 5k to 100k,
peak RSS of the web process under 1.5 GB. ``ratio`` is the growth of the slowest page.

Run: ``python -m cxr_core bench scale --json``; ``CXR_BENCH_SCALE_LEVELS=2000,10000`` for a
quick check at other sizes. The shared data folder is not used (the images are generated).
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LEVELS = (5_000, 100_000)
GOAL_PAGE_S, GOAL_GROWTH, GOAL_RSS_MB = 1.5, 3.0, 1536.0
REVIEWERS = ("bench", "dr_adams", "dr_baker", "dr_chen", "dr_diaz", "dr_evans", "dr_fox",
             "dr_gupta")
REVIEWER = "bench"  # the name the Review page is rendered with (one of REVIEWERS)
DATASET = "scale"


def _m(name: str):
    """``cxr_core.<name>``, imported when a call runs (a renamed module is that call's error)."""
    return importlib.import_module(f"cxr_core.{name}")


def _keep(c: dict, key: str, value):
    c[key] = value
    return value


# ===================================================================================== #
# DATA_CALLS: the cxr_core functions each page calls, in page order. EDIT HERE when the  #
# services are renamed/refactored. Each entry is (label, fn(db, ctx)); ``ctx`` holds      #
# "dataset" (the DatasetInfo), "reviewer", and whatever earlier calls of the page kept    #
# with _keep(ctx, key, value). A call that raises is reported with its error string.      #
# A "page:variant" key lists the calls a toggle adds to the page's own (see PAGES).       #
# ===================================================================================== #
DATA_CALLS: dict[str, list[tuple[str, Callable[[Any, dict], Any]]]] = {
    "home": [
        ("indexing.list_datasets", lambda db, c: _m("data.indexing").list_datasets(db)),
    ],
    "class_balance": [
        ("indexing.list_datasets", lambda db, c: _m("data.indexing").list_datasets(db)),
        ("indexing.relabel_position", lambda db, c: _keep(
            c, "position", _m("data.indexing").relabel_position(db, c["dataset"].id))),
        ("balance_report.balance_tables(original)", lambda db, c: _m(
            "data.balance_report").balance_tables(db, c["dataset"].id, "binary",
                                             as_of_relabel_id=None, current=False)),
        ("jobs.latest_job(split_preview)", lambda db, c: _m("jobs.queue").latest_job(
            db, "split_preview", {"dataset_id": c["dataset"].id, "scheme": "binary",
                                  "val_fraction": 0.15, "seed": 0, "labels": "original",
                                  "as_of_relabel_id": None,
                                  "indexed_at": str(c["dataset"].indexed_at)})),
        ("indexing.sample_images", lambda db, c: _m("data.indexing").sample_images(
            db, c["dataset"].id, per_class=8)),
    ],
    "class_balance:current": [  # the "Use current labels" toggle on: these calls besides
        # The current-label tables are a worker job ("balance_tables", timed with the jobs);
        # the page reads the kept result.
        ("jobs.latest_job(balance_tables)", lambda db, c: _m("jobs.queue").latest_job(
            db, "balance_tables", {"dataset_id": c["dataset"].id, "scheme": "binary",
                                   "as_of_relabel_id": _m("data.indexing").relabel_position(
                                       db, c["dataset"].id)[1],
                                   "indexed_at": str(c["dataset"].indexed_at)})),
    ],
    "augmentation": [
        ("presets.all_presets", lambda db, c: _m("data.presets").all_presets(db)),
        ("indexing.search_images", lambda db, c: _keep(c, "found", _m(
            "data.indexing").search_images(db, c["dataset"].id, "", label="NORMAL", limit=50))),
        ("indexing.get_images", lambda db, c: _m("data.indexing").get_images(
            db, [i for i, _ in c["found"][:1]])),
    ],
    "train": [
        ("training_service.refresh", lambda db, c: _m("training.service").refresh(db)),
        ("training_service.list_runs", lambda db, c: _keep(
            c, "runs", _m("training.service").list_runs(db, limit=50))),
        ("training_service.count_runs", lambda db, c: _m("training.service").count_runs(db)),
        ("training_service.live_curves", lambda db, c: _m("training.service").live_curves(
            db, [r.id for r in c["runs"]][:3])),
        ("training_service.run_progress", lambda db, c: _m("training.service").run_progress(
            db, [r.id for r in c["runs"]][:3])),
        ("training_service.run_logs", lambda db, c: _m("training.service").run_logs(
            db, c["runs"][0].id)),
        ("presets.all_presets", lambda db, c: _m("data.presets").all_presets(db)),
    ],
    "compare": [
        ("evaluation.evaluable_runs", lambda db, c: _m("evaluation.evaluate").evaluable_runs(db)),
        ("compare_service.comparable_groups", lambda db, c: _keep(
            c, "groups", _m("evaluation.compare").comparable_groups(db))),
        ("evaluation_service.newest_relabel_for", lambda db, c: _keep(
            c, "as_of", _m("evaluation.evaluate").newest_relabel_for(
                db, min(e.id for e in c["groups"][0].evaluations[:4])))),
        ("compare_service.compare_evaluations(n_boot=0)", lambda db, c: _keep(
            c, "cmp", _m("evaluation.compare").compare_evaluations(
                db, tuple(sorted(e.id for e in c["groups"][0].evaluations[:4])),
                mode="operating_point", target=0.95, truth="current", n_boot=0,
                as_of_relabel_id=c["as_of"]))),
        ("Comparison.disagreement_rows", lambda db, c: c["cmp"].disagreement_rows()),
        ("Comparison.metrics_text", lambda db, c: c["cmp"].metrics_text()),
        ("Comparison.mcnemar_rows", lambda db, c: c["cmp"].mcnemar_rows()),
        ("operating_point_service.operating_point_history", lambda db, c: _m(
            "evaluation.operating_points").operating_point_history(
                db, next(e.run_id for e in c["cmp"].evaluations.values()))),
    ],
    "predict": [
        ("predict.model_options", lambda db, c: _m("predict.inference").model_options(db)),
        ("indexing.search_images", lambda db, c: _m("data.indexing").search_images(
            db, c["dataset"].id, "person1", limit=50)),
        ("indexing.random_images (Sample 8)", lambda db, c: _keep(
            c, "drawn", _m("data.indexing").random_images(db, c["dataset"].id, 8, seed=1))),
        ("indexing.get_images", lambda db, c: _m("data.indexing").get_images(
            db, [i for i, _ in c["drawn"]])),
    ],
    "review": [
        ("review.load_state", lambda db, c: _keep(
            c, "state", _m("review.queues").load_state(db, c["dataset"].id, None))),
        ("review.next_in_queue(disagreement)", lambda db, c: _keep(
            c, "view", _m("review.queues").next_in_queue(db, c["state"], "disagreement",
                                                  c["reviewer"], seed=0))),
        ("review.next_in_queue(uncertain)", lambda db, c: _m("review.queues").next_in_queue(
            db, c["state"], "uncertain", c["reviewer"], seed=0)),
        ("review.next_in_queue(random)", lambda db, c: _m("review.queues").next_in_queue(
            db, c["state"], "random", c["reviewer"], seed=0)),
        ("review.next_in_queue(class)", lambda db, c: _m("review.queues").next_in_queue(
            db, c["state"], "class", c["reviewer"], class_name="NORMAL", seed=0)),
        ("review_view.describe_entry", lambda db, c: _m("review.view").describe_entry(
            db, c["state"], c["view"].current)),
    ],
    "review:agreement": [  # the agreement toggle on: these calls besides
        ("review.newest_relabel_id", lambda db, c: _m("review.queues").newest_relabel_id(
            db, c["dataset"].id)),
        # Kappa and conflicts are a worker job ("agreement", timed with the jobs).
        ("jobs.latest_job(agreement)", lambda db, c: _m("jobs.queue").latest_job(
            db, "agreement", {"dataset_id": c["dataset"].id,
                              "newest_relabel_id": _m("review.queues").newest_relabel_id(
                                  db, c["dataset"].id), "limit": 25, "offset": 0})),
    ],
}
# ============================ end of DATA_CALLS ======================================== #

# Page renders: name -> (page file, session state set before the first render). The ":"
# variants are the same page with a toggle on that reads more data.
PAGES: dict[str, tuple[str, dict]] = {
    "home": ("app_pages/home.py", {}),
    "class_balance": ("app_pages/class_balance.py", {}),
    "class_balance:current": ("app_pages/class_balance.py", {"balance_current": True}),
    "augmentation": ("app_pages/augmentation.py", {}),
    "train": ("app_pages/train.py", {}),
    "compare": ("app_pages/compare.py", {}),
    "predict": ("app_pages/predict.py", {"predict_source": "From a dataset"}),
    "review": ("app_pages/review.py", {"review_reviewer": REVIEWER}),
    "review:agreement": ("app_pages/review.py", {"review_reviewer": REVIEWER,
                                                 "review_agreement": True}),
}


# -- Building one level ---------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


_PNG_HEAD = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
_PNG_TAIL = _chunk(b"IEND", b"")


def tiny_png(i: int) -> bytes:
    """An 8×8 grayscale PNG whose first row spells ``i`` (every file's sha256 differs)."""
    rows = [i.to_bytes(8, "little")] + [bytes((r * 32 + c * 4 + i % 7 * 3) & 255
                                               for c in range(8)) for r in range(1, 8)]
    raw = b"".join(b"\x00" + row for row in rows)
    return _PNG_HEAD + _chunk(b"IDAT", zlib.compress(raw, 6)) + _PNG_TAIL


def write_images(root: Path, n_images: int, seed: int = 0) -> dict:
    """``n_images`` tiny PNGs in ``train|test/NORMAL|PNEUMONIA`` with Kermany names.

    Patients hold 1–4 images each and sit in one split (~10% of them in test); ~27% are
    normal (``IM-<p>-<k>.png`` or ``NORMAL2-IM-<p>-<k>.png``), the rest
    ``person<p>_bacteria|virus_<n>.png`` (~65% bacteria).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
    i = patients = 0
    while i < n_images:
        patients += 1
        k = int(rng.integers(1, 5))
        split = "test" if rng.random() < 0.1 else "train"
        normal = rng.random() < 0.27
        subtype = "bacteria" if rng.random() < 0.65 else "virus"
        for j in range(min(k, n_images - i)):
            if normal:
                name = (f"NORMAL2-IM-{patients:04d}-{j + 1:04d}.png" if patients % 3 == 0
                        else f"IM-{patients:04d}-{j + 1:04d}.png")
            else:
                name = f"person{patients}_{subtype}_{i + 1}.png"
            (root / split / ("NORMAL" if normal else "PNEUMONIA") / name).write_bytes(tiny_png(i))
            i += 1
    return {"images": i, "patients": patients}


def _relabel_rows(images: list, n_relabels: int, seed: int = 1) -> list[dict]:
    """``n_relabels`` relabel rows (ids 1..n, time order) over ``images`` ((id, sha, label,
    subtype) tuples): a quarter as many images as rows are relabelled (half the images at 2
    rows per image), about 4 rows each by random reviewers of :data:`REVIEWERS`; ~5% are undo
    rows of the image's newest standing relabel; old labels are the labels at each write."""
    from datetime import datetime, timedelta, timezone

    import numpy as np

    rng = np.random.default_rng(seed)
    choices = (("NORMAL", None), ("PNEUMONIA", "bacteria"), ("PNEUMONIA", "virus"))
    n_targets = max(1, min(len(images), n_relabels // 4))
    targets = rng.choice(len(images), size=n_targets, replace=False)
    counts = np.ones(n_targets, dtype=np.int64)
    extra = rng.choice(n_targets, size=max(0, n_relabels - n_targets))  # the rest, spread
    np.add.at(counts, extra, 1)
    events = np.repeat(targets, counts)[:n_relabels]
    rng.shuffle(events)
    undo_draw, who, pick, keep = (rng.random(len(events)), rng.integers(0, len(REVIEWERS),
                                  len(events)), rng.integers(0, 3, len(events)),
                                  rng.random(len(events)))
    t0 = datetime.now(timezone.utc) - timedelta(seconds=5 * len(events))
    stacks: dict[int, list[tuple[int, tuple]]] = {}  # image index -> standing (id, old label)
    rows = []
    for k, idx in enumerate(events.tolist()):
        image_id, sha, label, subtype = images[idx]
        stack = stacks.setdefault(idx, [])
        current = rows[stack[-1][0] - 1]["new"] if stack else (label, subtype)
        rid = k + 1
        if stack and undo_draw[k] < 0.066:  # ~5% of all rows (the first row of an image is none)
            undone, old = stack.pop()
            new, undo_of = old, undone
        else:
            new = (label, subtype) if keep[k] < 0.6 else choices[int(pick[k])]
            undo_of = None
            stack.append((rid, current))
        rows.append({"id": rid, "image_id": image_id, "image_sha256": sha,
                     "old_label": current[0], "old_subtype": current[1], "new_label": new[0],
                     "new_subtype": new[1], "reviewer": REVIEWERS[int(who[k])], "note": "",
                     "run_ref": None, "score": None, "undo_of": undo_of,
                     "created_at": t0 + timedelta(seconds=5 * k), "new": new})
    return rows


def _add_runs_and_evaluations(db, dataset_id: int, root: Path, n_evals: int,
                              seed: int = 2) -> dict:
    """``n_evals`` finished runs with epoch/batch metrics, logs and an operating point, each
    evaluated on the test split (same images, same order: one Compare group) through
    :func:`cxr_core.evaluation.evaluate.record_evaluation`, current labels as truth."""
    import numpy as np
    from sqlalchemy import insert

    from cxr_core.core.labels import BINARY_CLASSES
    from cxr_core.data import provenance
    from cxr_core.evaluation import evaluate as es
    from cxr_core.evaluation import operating_points as ops
    from cxr_core.storage import datasets as ds_store
    from cxr_core.storage import relabels as rel_store
    from cxr_core.storage import runs as runs_store
    from db.models import Metric

    rng = np.random.default_rng(seed)
    with db.session() as s:
        records = [r for r in ds_store.list_images(session=s, dataset_id=dataset_id)
                   if r.split == "test" and not r.error]
        version = rel_store.label_version(session=s, dataset_id=dataset_id)
    records.sort(key=lambda r: r.id)
    ids = [r.id for r in records]
    paths = [str(root / r.relpath) for r in records]
    groups = [r.patient for r in records]
    truth = provenance.make_truth(version.labels, ids, BINARY_CLASSES, "binary", "current",
                                  version.newest_relabel_id)
    y = truth.y
    t_eval = 0.0
    for n in range(n_evals):
        quality = 0.8 + 1.6 * n / max(1, n_evals - 1)
        config = {"dataset": DATASET, "recipe": "cpu128", "model": "small_cnn",
                  "label_scheme": "binary", "epochs": 10, "batch_size": 32, "seed": n}

        def make(s, n=n, quality=quality, config=config) -> int:
            run_id = runs_store.create_run(session=s, name=f"scale-{n:02d}", config=config)
            rows = []
            for epoch in range(1, 11):
                for key in ("loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc"):
                    rows.append({"run_id": run_id, "kind": "epoch", "step": epoch, "key": key,
                                 "value": float(rng.random())})
                for b in range(30):
                    step = (epoch - 1) * 30 + b + 1
                    for key, v in (("loss", rng.random()), ("accuracy", rng.random()),
                                   ("auc", rng.random()), ("epoch_progress", step / 30),
                                   ("eta_s", 300 - step)):
                        rows.append({"run_id": run_id, "kind": "batch", "step": step,
                                     "key": key, "value": float(v)})
                runs_store.add_log(session=s, run_id=run_id, message=f"epoch {epoch}/10")
            s.execute(insert(Metric), rows)
            runs_store.set_epochs_done(session=s, run_id=run_id, epochs_done=10)
            runs_store.finish_run(session=s, run_id=run_id, status="finished",
                                  summary={"val": {"auc": 0.8 + 0.01 * n}})
            return run_id
        run_id = db.write(make)
        yv = (rng.random(1000) < 0.7).astype(int)  # the run's own validation outputs
        pv = 1 / (1 + np.exp(-(quality * (2 * yv - 1) + rng.normal(size=1000))))
        ops.set_operating_point(db, run_id=run_id, y_true=yv, p_pos=pv)
        p = 1 / (1 + np.exp(-(quality * (2 * y - 1) + rng.normal(size=len(y)))))
        t1 = time.perf_counter()
        es.record_evaluation(db, run_id=run_id, model_ref=f"run:{run_id}", dataset_id=dataset_id,
                             split="test", labels=list(BINARY_CLASSES), image_ids=ids,
                             paths=paths, y_true=y, probs=np.column_stack([1 - p, p]),
                             source=str(root), truth=truth,
                             groups=groups if any(groups) else None)
        t_eval += time.perf_counter() - t1
        _log(f"evaluation {n + 1}/{n_evals} stored ({len(ids)} images)")
    return {"test_images": len(ids), "record_evaluation_s": round(t_eval, 2)}


def build(root: Path, home: Path, n_images: int, n_relabels: int, n_evals: int) -> dict:
    """Build one level: images under ``root``, state in ``home`` (``CXR_HOME`` is set to it).

    Returns:
        Times of each step (``write_s``, ``index_s`` (the real indexer), ``relabels_s``,
        ``evals_s``, ``total_s``) and the counts read back from the database.
    """
    os.environ["CXR_HOME"] = str(home)
    for var in ("CXR_DB_URL", "CXR_DATA_DIR", "CXR_ARTIFACTS"):
        os.environ.pop(var, None)
    from sqlalchemy import func, insert, select

    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import open_db
    from db.models import EvalPrediction, Evaluation, ImageRow, OperatingPoint, Relabel, Run

    out: dict[str, Any] = {"n_images": n_images, "n_relabels": n_relabels, "n_evals": n_evals}
    t0 = time.perf_counter()
    out["generated"] = write_images(Path(root), n_images)
    out["write_s"] = round(time.perf_counter() - t0, 2)
    _log(f"{n_images} PNGs written in {out['write_s']} s")
    db = open_db()
    t1 = time.perf_counter()
    report = index_dataset(db, root, name=DATASET)
    out["index_s"] = round(time.perf_counter() - t1, 2)
    _log(f"indexed in {out['index_s']} s: {report.summary['images']} images, "
         f"{report.summary['patients']} patients")
    t1 = time.perf_counter()
    with db.session() as s:
        images = s.execute(select(ImageRow.id, ImageRow.sha256, ImageRow.label, ImageRow.subtype)
                           .where(ImageRow.dataset_id == report.dataset_id)
                           .order_by(ImageRow.id)).all()
    rows = _relabel_rows([tuple(r) for r in images], n_relabels)
    for r in rows:
        del r["new"]
    for start in range(0, len(rows), 5000):
        with db.session() as s:
            s.execute(insert(Relabel), rows[start:start + 5000])
    out["relabels_s"] = round(time.perf_counter() - t1, 2)
    _log(f"{len(rows)} relabels inserted in {out['relabels_s']} s")
    t1 = time.perf_counter()
    out.update(_add_runs_and_evaluations(db, report.dataset_id, Path(report.root), n_evals))
    out["evals_s"] = round(time.perf_counter() - t1, 2)
    out["total_s"] = round(time.perf_counter() - t0, 2)
    with db.session() as s:
        count = lambda model, *where: int(s.scalar(  # noqa: E731
            select(func.count()).select_from(model).where(*where)) or 0)
        out["counts"] = {
            "images": count(ImageRow), "relabels": count(Relabel),
            "undo_rows": count(Relabel, Relabel.undo_of.is_not(None)),
            "relabelled_images": int(s.scalar(select(func.count(func.distinct(
                Relabel.image_id)))) or 0),
            "runs": count(Run), "evaluations": count(Evaluation),
            "eval_predictions": count(EvalPrediction), "operating_points": count(OperatingPoint),
            "comparable_groups": int(s.scalar(select(func.count(func.distinct(
                Evaluation.images_key)))) or 0)}
    db.engine.dispose()
    out["db_mb"] = round(sum(f.stat().st_size for f in Path(home).glob("cxr.db*")) / 2**20, 1)
    _log(f"built in {out['total_s']} s: {out['counts']}")
    return out


# -- Measuring one level (the web process) --------------------------------------------------

# Imported before timing, so a page's first render is not its imports' time. cxr_core.data.augment
# (the Augmentation page) imports TensorFlow: the web process holds it once that page is seen.
_WARM_IMPORTS = ("pandas", "plotly.express", "sklearn.metrics", "cxr_core.data.balance_report",
                 "cxr_core.data.balancing", "cxr_core.data.indexing", "cxr_core.data.presets", "cxr_core.data.augment",
                 "cxr_core.data.images", "cxr_core.training.service", "cxr_core.models.specs",
                 "cxr_core.training.config", "cxr_core.evaluation.compare", "cxr_core.stats.tables",
                 "cxr_core.evaluation.evaluate", "cxr_core.evaluation.operating_points",
                 "cxr_core.jobs.queue", "cxr_core.data.provenance", "cxr_core.predict.explain",
                 "cxr_core.models.store", "cxr_core.predict.inference", "cxr_core.predict.uploads",
                 "cxr_core.predict.render", "cxr_core.review.agreement", "cxr_core.review.queues",
                 "cxr_core.review.view")


def _rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _render(page: str, state: dict, reruns: int, watch: Callable[[], Any]) -> dict:
    """First render of a page (data caches emptied first), the jobs it queued run by a worker,
    then the median of ``reruns`` (clicks: the page with the jobs' results). ``watch()``
    starts the watchdog of the renders (the jobs have their own time limit)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()  # the page's own data, cold; the database (cache_resource) stays
    _run_queued_jobs()  # left by a page whose measuring process was ended: not this page's
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=24 * 3600)
    for k, v in state.items():
        at.session_state[k] = v
    out: dict[str, Any] = {}
    timer = watch()
    try:
        t0 = time.perf_counter()
        at.switch_page(page).run()
        out["first_s"] = round(time.perf_counter() - t0, 3)
        timer.cancel()
        jobs = _run_queued_jobs()  # what a worker does for the page, then its result is shown
        if jobs:
            out["jobs"] = jobs
        timer = watch()
        times = []
        for _ in range(reruns):
            t0 = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t0)
        out["rerun_s"] = round(statistics.median(times), 3) if times else None
    except Exception as exc:  # noqa: BLE001 — a crash of the harness is reported
        out["harness_error"] = _err(exc)
    finally:
        timer.cancel()
    out["title"] = next((t.value for t in at.title), None)
    out["exceptions"] = [str(e.value)[:300] for e in at.exception]
    out["errors"] = [str(e.value)[:300] for e in at.error]
    return out


def _run_queued_jobs() -> list[dict] | None:
    """Jobs a render queued (e.g. Class balance's split preview), run by a real worker process
    (``worker --once --kinds jobs``, as the app's worker would): [{kind, status, s}] from the
    jobs' own start/finish times, and the worker process's wall time."""
    from sqlalchemy import select

    from cxr_core.storage import open_db
    from db.models import Job

    db = open_db()
    try:
        with db.session() as s:
            queued = list(s.scalars(select(Job.id).where(Job.status == "queued")))
        if not queued:
            return None
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cxr_core", "worker", "--once", "--kinds",
                               "jobs", "--json"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=3600)
        wall = round(time.perf_counter() - t0, 2)
        with db.session() as s:
            rows = s.execute(select(Job.kind, Job.status, Job.started_at, Job.finished_at,
                                    Job.error).where(Job.id.in_(queued))).all()
        return [{"kind": k, "status": st, "worker_exit": proc.returncode, "worker_wall_s": wall,
                 "s": round((f - b).total_seconds(), 2) if f and b else None,
                 **({"error": str(e)[:300]} if e else {})} for k, st, b, f, e in rows]
    finally:
        db.engine.dispose()


SLOW_CALL_S = 5.0  # a call slower than this is not repeated


def _timeout_s() -> float:
    """Longest a render or a data call may take before it is reported as timed out (the
    measuring process is then ended and a fresh one does the rest)."""
    return float(os.environ.get("CXR_BENCH_SCALE_TIMEOUT", "120"))


class _Partial:
    """The measuring process's results, saved after every page and call in ``path``, so a
    process ended by the watchdog (a render or call over :func:`_timeout_s`) loses nothing
    and the next process does only what is left."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {"pages": {}, "calls": {}, "processes": 0}
        if path is not None and path.exists():
            self.data = json.loads(path.read_text())

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, default=str))
            os.replace(tmp, self.path)

    def watch(self, what: str, on_timeout: Callable[[float], None]):
        """A started watchdog: after the timeout, ``on_timeout(seconds)`` records the item,
        the results are saved and the process exits (the item's thread cannot be stopped)."""
        import threading

        limit = _timeout_s()

        def fire() -> None:
            on_timeout(limit)
            self.save()
            _log(f"{what} took over {limit:g} s: ending this measuring process")
            os._exit(3)
        timer = threading.Timer(limit, fire)
        timer.daemon = True
        timer.start()
        return timer


def _time_calls(db, page: str, ctx: dict, repeat: int, done: dict, partial: _Partial) -> None:
    """Each data call of a page into ``done``: the first call and the median of up to
    ``repeat`` (the first included; one only when it took over :data:`SLOW_CALL_S`). Calls
    already in ``done`` (an earlier process) are only re-run for what later calls need."""
    calls = DATA_CALLS.get(page, [])
    if all(label in done for label, _ in calls):
        return
    for label, fn in calls:
        if label in done:
            if "error" not in done[label]:
                try:
                    fn(db, ctx)  # the context later calls read
                except Exception:  # noqa: BLE001
                    pass
            continue
        times: list[float] = []

        def timed_out(limit: float, label=label) -> None:
            done[label] = {"error": f"timeout: over {limit:g} s", "timeout_s": limit}
        timer = partial.watch(f"{page}: {label}", timed_out)
        try:
            while len(times) < max(1, repeat) and sum(times) < SLOW_CALL_S:
                t0 = time.perf_counter()
                fn(db, ctx)
                times.append(time.perf_counter() - t0)
            done[label] = {"s": round(statistics.median(times), 4),
                           "first_s": round(times[0], 4), "n": len(times)}
        except Exception as exc:  # noqa: BLE001 — a renamed / failing call is reported
            done[label] = {"error": _err(exc)}
        finally:
            timer.cancel()
        partial.save()


def measure_here(*, reruns: int = 3, repeat: int = 3, pages: tuple[str, ...] | None = None,
                 out_file: Path | None = None) -> dict:
    """The web process's side (run in a fresh process with the level's ``CXR_HOME``): renders,
    then data calls; with ``out_file``, results so far are kept there and skipped."""
    os.environ["CXR_WORKER"] = "off"
    partial = _Partial(out_file)
    out = partial.data
    out["processes"] += 1
    t0 = time.perf_counter()
    for name in _WARM_IMPORTS:  # import cost is not page time
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    import pandas as pd
    import plotly.express as px
    import plotly.io as pio

    pio.to_json(px.bar(pd.DataFrame({"a": [1, 2]}), x="a"))  # plotly's first-figure setup
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=24 * 3600)
    at.run()  # opens the database once, as the app process does
    out.setdefault("cold_start_s", round(time.perf_counter() - t0, 3))
    out.setdefault("rss_mb_after_warmup", _rss_mb())
    for name in pages or tuple(PAGES):
        if name in out["pages"]:
            continue
        path, state = PAGES[name]

        def timed_out(limit: float, name=name) -> None:
            out["pages"][name] = {"first_s": None, "timeout_s": limit,
                                  "harness_error": f"timeout: a render took over {limit:g} s",
                                  "exceptions": [], "errors": []}
        out["pages"][name] = _render(path, state, reruns, lambda name=name, t=timed_out:
                                     partial.watch(f"rendering {name}", t))
        out["rss_mb"] = max(out.get("rss_mb") or 0, _rss_mb())
        partial.save()
        r = out["pages"][name]
        _log(f"rendered {name}: {r.get('first_s')} s first, {r.get('rerun_s')} s rerun"
             + "".join(f", job {j['kind']} {j['s']} s ({j['status']})" for j in r.get("jobs", []))
             + (f" EXCEPTION {r['exceptions']}" if r["exceptions"] else "")
             + (f" HARNESS {r['harness_error']}" if r.get("harness_error") else ""))
    out["rss_mb"] = max(out.get("rss_mb") or 0, _rss_mb())
    from cxr_core.data import indexing
    from cxr_core.storage import open_db

    db = open_db()
    info = next((d for d in indexing.list_datasets(db) if d.name == DATASET), None)
    wanted = None if pages is None else {p.split(":")[0] for p in pages} | set(pages)
    for page in DATA_CALLS:
        if wanted is not None and page not in wanted:
            continue
        done = out["calls"].setdefault(page, {})
        _time_calls(db, page, {"dataset": info, "reviewer": REVIEWER}, repeat, done, partial)
        _log(f"timed the data calls of {page}: " + ", ".join(
            f"{k} {v.get('s', v.get('error'))}" for k, v in done.items()))
    out["rss_mb_after_calls"] = max(out.get("rss_mb_after_calls") or 0, _rss_mb())
    partial.save()
    return out


def _child_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CXR_DB_URL", "CXR_DATA_DIR", "CXR_ARTIFACTS")}
    env.update(CXR_HOME=str(home), CXR_WORKER="off", PYTHONPATH=str(REPO),
               TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _child(args: list[str], home: Path, timeout: float, *,
           ok_codes: tuple[int, ...] = (0,)) -> tuple[int, dict]:
    """Run ``python -m bench.scale ARGS`` for one level: (exit code, its JSON line or {})."""
    proc = subprocess.run([sys.executable, "-m", "bench.scale", *args], cwd=REPO,
                          env=_child_env(home), stdout=subprocess.PIPE, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in ok_codes or (proc.returncode == 0 and not lines):
        raise RuntimeError(f"bench.scale {args[0]} failed (exit {proc.returncode})")
    return proc.returncode, (json.loads(lines[-1]) if proc.returncode == 0 else {})


def measure(home: Path, *, reruns: int = 3, repeat: int = 3,
            pages: tuple[str, ...] | None = None, timeout: float = 7200) -> dict:
    """:func:`measure_here` in a fresh process with ``CXR_HOME=home`` and ``CXR_WORKER=off``
    (its peak RSS is the web process's alone). A process ended by the watchdog (a render or a
    call over ``CXR_BENCH_SCALE_TIMEOUT`` s, reported as a timeout) is followed by a fresh one
    for what is left (``processes`` counts them; the RSS figures are their largest)."""
    out_file = Path(home) / "bench-scale-measure.json"
    out_file.unlink(missing_ok=True)
    args = ["measure", "--reruns", str(reruns), "--repeat", str(repeat), "--out", str(out_file)]
    if pages:
        args += ["--pages", ",".join(pages)]
    for _ in range(len(PAGES) + sum(len(c) for c in DATA_CALLS.values()) + 1):
        code, _ = _child(args, Path(home), timeout, ok_codes=(0, 3))
        if code == 0:
            break
    return json.loads(out_file.read_text())


# -- The benchmark --------------------------------------------------------------------------

def _levels_from_env() -> tuple[int, ...] | None:
    raw = os.environ.get("CXR_BENCH_SCALE_LEVELS", "").strip()
    return tuple(int(x) for x in raw.split(",") if x.strip()) if raw else None


def _page_time(level: dict, page: str) -> float | None:
    """The first render's time; a render that timed out counts as its limit (a lower bound)."""
    r = level["pages"].get(page, {})
    return r.get("first_s") if r.get("first_s") is not None else r.get("timeout_s")


def _data_time(level: dict, page: str) -> float | None:
    """Sum of the page's data calls (a variant: the page's and the variant's); None when one
    of them failed."""
    keys = [page.split(":")[0]] + ([page] if ":" in page else [])
    calls = [c for k in keys for c in level["calls"].get(k, {}).values()]
    if not calls or any("error" in c and "timeout_s" not in c for c in calls):
        return None
    return round(sum(c.get("s", c.get("timeout_s", 0)) for c in calls), 4)


def run(shared_data: Path | None = None, *, levels: tuple[int, ...] | None = None,
        relabels_per_image: int = 2, evals: int = 20, reruns: int = 3,
        repeat: int = 3) -> dict:
    """Build and measure each level (smallest first); ``shared_data`` is not used.

    Returns:
        ``{"bench": "scale", "levels": {n: {"build", "pages": {page: {first_s, rerun_s,
        exceptions, errors}}, "calls": {page: {label: {s, first_s} | {error}}}, "data_s":
        {page: sum of its calls}, "rss_mb", ...}}, "slowest_page", "slowest_page_s",
        "slowest_rerun_s", "slowest_data_s", "growth": {page: first render t_big / t_small},
        "data_growth", "max_growth", "ratio" (growth of the slowest page), "goals"}``.
    """
    levels = tuple(sorted(levels or _levels_from_env() or LEVELS))
    results: dict[str, dict] = {}
    for n in levels:
        with tempfile.TemporaryDirectory(prefix=f"cxr-bench-scale-{n}-") as tmp:
            home, root = Path(tmp) / "home", Path(tmp) / "chest_xray_scale"
            home.mkdir()
            _log(f"level {n:,}: building in {tmp}")
            _, built = _child(["build", str(root), str(home), str(n),
                               str(relabels_per_image * n), str(evals)], home, timeout=7200)
            _log(f"level {n:,}: measuring")
            results[str(n)] = {"build": built, **measure(home, reruns=reruns, repeat=repeat)}
    return summarize(results)


def summarize(results: dict[str, dict]) -> dict:
    """The benchmark's result from ``{str(n_images): {"build": build(...), **measure(...)}}``
    (see :func:`run`): the smallest level against the largest."""
    levels = sorted(results, key=int)
    for level in results.values():
        level["data_s"] = {p: _data_time(level, p) for p in PAGES}
    small, big = results[levels[0]], results[levels[-1]]
    timed = {p: _page_time(big, p) for p in PAGES if _page_time(big, p) is not None}
    slowest = max(timed, key=timed.get) if timed else None

    def growth(fn) -> dict:
        out = {}
        for p in PAGES:
            a, b = fn(small, p), fn(big, p)
            out[p] = round(b / a, 2) if a and b is not None else None
        return out
    page_growth, data_growth = growth(_page_time), growth(_data_time)
    finite = [g for g in page_growth.values() if g is not None]
    failed = {f"{n}/{p}": r["exceptions"] or r.get("harness_error")
              for n, lv in results.items() for p, r in lv["pages"].items()
              if r["exceptions"] or r.get("harness_error")}
    call_errors = {f"{n}/{p}/{label}": c["error"] for n, lv in results.items()
                   for p, calls in lv["calls"].items() for label, c in calls.items()
                   if "error" in c}
    data_big = [v for v in big["data_s"].values() if v is not None]
    rss = max(big["rss_mb"], big.get("rss_mb_after_calls") or 0)
    return {
        "bench": "scale", "sizes": [int(n) for n in levels], "levels": results,
        "slowest_page": slowest, "slowest_page_s": timed.get(slowest),
        "slowest_rerun_s": max((r.get("rerun_s") or 0 for r in big["pages"].values()),
                               default=None),
        "slowest_data_s": max(data_big, default=None),
        "growth": page_growth, "data_growth": data_growth,
        "max_growth": max(finite, default=None),
        "ratio": page_growth.get(slowest) if slowest else None,
        "rss_mb": rss, "page_exceptions": failed, "call_errors": call_errors,
        "goals": {"page_under_1_5s": bool(timed) and max(timed.values()) < GOAL_PAGE_S,
                  "data_under_1_5s": bool(data_big) and max(data_big) < GOAL_PAGE_S,
                  "growth_at_most_3x": bool(finite) and max(finite) <= GOAL_GROWTH,
                  "rss_under_1_5gb": rss < GOAL_RSS_MB},
    }


def _main(argv: list[str]) -> int:
    """``build ROOT HOME N RELABELS EVALS`` | ``measure [--reruns --repeat --pages]`` (the
    two child processes), else the whole benchmark (``[DATA]``, unused)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    if argv[:1] == ["build"]:
        for name in ("root", "home"):
            parser.add_argument(name)
        for name in ("n_images", "n_relabels", "n_evals"):
            parser.add_argument(name, type=int)
        a = parser.parse_args(argv[1:])
        out = build(Path(a.root), Path(a.home), a.n_images, a.n_relabels, a.n_evals)
    elif argv[:1] == ["measure"]:
        parser.add_argument("--reruns", type=int, default=3)
        parser.add_argument("--repeat", type=int, default=3)
        parser.add_argument("--pages", default=None)
        parser.add_argument("--out", default=None)
        a = parser.parse_args(argv[1:])
        out = measure_here(reruns=a.reruns, repeat=a.repeat,
                           pages=tuple(a.pages.split(",")) if a.pages else None,
                           out_file=Path(a.out) if a.out else None)
    else:
        parser.add_argument("data", nargs="?", default=None)
        a = parser.parse_args(argv)
        out = run(Path(a.data) if a.data else None)
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
