"""Training as user actions: queue, start, cancel, resume, and read runs back.

The Train page and the CLI call these. Starting a run from the app = a queued run row +
:func:`cxr_core.jobs.launcher.ensure_worker`; the CLI's ``train`` runs the same claim + train +
evaluate code (:func:`cxr_core.training.runner.process_run`) in its own process.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.core import data_roots
from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.data import presets
from cxr_core.data.augment_config import PRESETS
from cxr_core.jobs import launcher, loop
from cxr_core.storage import AndThen, Database
from cxr_core.storage import datasets as dataset_store
from cxr_core.storage import label_audits as audit_store
from cxr_core.storage import runs as store
from cxr_core.storage.runs import LogLine, RunRecord
from cxr_core.training import label_audit, runner
from cxr_core.training.config import DEFAULT_RECIPE, RECIPES, TrainConfig
from cxr_core.training.interface import BATCH_KEYS, EPOCH_KEYS

Progress = Callable[[int, int], None]






BATCH_POINTS = 300  # batch rows per run and key the live chart draws at most


def host_recipe(layout: str | None = None) -> str:
    """The recipe the page proposes: ``mnist28`` for a PneumoniaMNIST ``.npz`` (dataset
    ``layout`` "npz"), else the default (``robust128``: chosen on the external sample, about
    15 min on two CPU cores, so it needs no GPU)."""
    if layout == "npz":
        return "mnist28"
    return DEFAULT_RECIPE


def recipe_defaults(recipe: str) -> dict[str, Any]:
    """Every field of a recipe's config (the page's form defaults); dataset left empty.

    Raises:
        ConfigError: unknown recipe.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of {sorted(RECIPES)}. Received: recipe={recipe!r}")
    cfg = TrainConfig.from_dict({"recipe": recipe, "dataset": "-"})
    return {**cfg.to_dict(), "dataset": ""}


def resolve_dataset(db: Database, dataset: str, base_dir: str | Path | None = None) -> str:
    """An indexed dataset's name as is; a path made absolute (so a worker finds it).

    A relative path is tried against the current folder, then ``base_dir`` (the config
    file's folder).

    Raises:
        DatasetError: neither an indexed dataset (by name or folder) nor an existing path, so
            the run is refused before it is queued instead of failing in the launcher.
        PathNotAllowed: a folder not indexed yet that lies outside the data roots.
    """
    with db.session() as s:
        if dataset_store.get_dataset(session=s, name_or_id=dataset) is not None:
            return dataset
        roots = {d.root for d in dataset_store.list_datasets(session=s)}
    for base in (Path.cwd(), Path(base_dir) if base_dir else None):
        if base is None:
            continue
        path = (base / Path(dataset).expanduser())
        if str(path.resolve()) in roots:
            return str(path.resolve())
        if path.exists():  # to be indexed by the worker: refused now if outside the roots
            return str(data_roots.check_path(path, what="dataset folder"))
    raise DatasetError(f"dataset {dataset!r} is neither an indexed dataset's name nor an existing "
                       f"folder or .npz file; index it first (python -m cxr_core index PATH) or "
                       f"fix the path. Received: dataset={dataset!r}")


def make_config(db: Database, data: Mapping[str, Any],
                base_dir: str | Path | None = None) -> TrainConfig:
    """Validate a run config (recipe defaults merged) with its dataset path resolved.

    An ``augment`` naming a preset saved on the augmentation page is replaced by that preset's
    settings, so the run's stored config reproduces it even if the preset changes later. A
    ``weights`` file must lie under the data roots when they are restricted
    (:func:`cxr_core.core.data_roots.check_weights`; PathNotAllowed otherwise).
    """
    data = dict(data)
    aug = data.get("augment")
    if isinstance(aug, str) and aug not in PRESETS:
        data["augment"] = presets.resolve(aug, db).to_dict()
    cfg = TrainConfig.from_dict(data)
    data_roots.check_weights(cfg.weights)  # a weights file under the data roots only
    return TrainConfig.from_dict({
        **cfg.to_dict(), "dataset": resolve_dataset(db, cfg.dataset, base_dir),
        "external": [_external_dataset(db, e, base_dir) for e in cfg.external],
        "extra": [{**e.__dict__, "dataset": resolve_dataset(db, e.dataset, base_dir)}
                  for e in cfg.extra]})


def _external_dataset(db: Database, dataset: str, base_dir: str | Path | None) -> str:
    """An external dataset of a run config, resolved; an indexed one must be flagged external
    (a folder not indexed yet is indexed as external by the worker)."""
    resolved = resolve_dataset(db, dataset, base_dir)
    with db.session() as s:
        info = dataset_store.get_dataset(session=s, name_or_id=resolved)
        if info is None:
            info = next((d for d in dataset_store.list_datasets(session=s)
                         if d.root == resolved), None)
    if info is not None and not info.external:
        raise ConfigError(f"external: dataset {info.name!r} is not flagged as external "
                          "validation data; flag it on Home (or index it with --external) if "
                          f"it comes from another site or period. Received: {dataset!r}")
    return resolved


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A run config JSON file.

    Raises:
        ConfigError: not readable or not a JSON object.
    """
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"run config file not found. Received: {p}") from exc
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested
        raise ConfigError(f"cannot read run config {p}: expected a JSON object ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"run config {p} must be a JSON object. Received: {type(data).__name__}")
    return data


def queue_run(db: Database, cfg: TrainConfig, *, name: str | None = None,
              created_by: str | None = None, and_then: AndThen | None = None,
              parent: str | None = None) -> int:
    """Write a queued run (a worker will claim it); returns its id. Pages and the CLI go
    through :func:`cxr_core.training.actions.start_run` (role, limits, quota, audit: ``and_then``,
    in the run row's transaction). ``parent`` names what the run belongs to (an audit's
    fold, a search's trial): the user's quota counts a parent once."""
    return db.write(lambda s: store.create_run(session=s, name=name or cfg.name,
                                               config=cfg.to_dict(), created_by=created_by,
                                               parent=parent),
                    and_then=and_then)


def run_in_process(db: Database, cfg: TrainConfig, *, name: str | None = None,
                   progress: Progress | None = None, created_by: str | None = None,
                   and_then: AndThen | None = None) -> runner.RunOutcome:
    """Train a run in this process: the worker's claim + train + evaluate, run to its end.

    The run is created already claimed by this process (registered as a worker with a
    heartbeat), so a detached worker never takes it. ``and_then`` runs in the run row's
    transaction (:func:`cxr_core.training.actions.train_here`'s audit row).
    """
    worker_id, beat = loop.register(db)
    try:
        run_id = db.write(lambda s: store.create_run(session=s, name=name or cfg.name,
                                                     config=cfg.to_dict(), worker_id=worker_id,
                                                     created_by=created_by),
                          and_then=and_then)
        beat.run_id = run_id
        return runner.process_run(db, run_id, progress=progress)
    finally:
        loop.unregister(db, worker_id, beat)


def cancel_run(db: Database, run_id: int, *, and_then: AndThen | None = None) -> str:
    """Cancel: queued runs at once, running ones within one batch. Returns the new status.
    ``and_then(session, status)`` runs in the same transaction (an audit row)."""
    return db.write(lambda s: store.request_cancel(session=s, run_id=run_id), and_then=and_then)


def resume_run(db: Database, run_id: int, *, start_worker: bool = True,
               and_then: AndThen | None = None) -> int | None:
    """Queue a failed/cancelled run to continue from its last checkpoint; returns the worker pid.
    ``and_then(session, None)`` runs in the resume's transaction; the worker starts after."""
    db.write(lambda s: store.request_resume(session=s, run_id=run_id), and_then=and_then)
    return launcher.ensure_worker(db) if start_worker else None


def refresh(db: Database) -> list[int]:
    """Mark dead workers' runs failed (the page calls this on load)."""
    return launcher.reap_dead_runs(db)


def count_runs(db: Database) -> int:
    with db.session() as s:
        return store.count_runs(session=s)


def list_runs(db: Database, *, limit: int = 100, offset: int = 0) -> list[RunRecord]:
    with db.session() as s:
        return store.list_runs(session=s, limit=limit, offset=offset)


def get_run(db: Database, run_id: int) -> RunRecord | None:
    with db.session() as s:
        return store.get_run(session=s, run_id=run_id)


def run_logs(db: Database, run_id: int, *, limit: int = 300) -> list[LogLine]:
    with db.session() as s:
        return store.get_logs(session=s, run_id=run_id, limit=limit)


@dataclass(frozen=True)
class RunProgress:
    """Where a running run is, from its newest batch row."""

    epoch_progress: float  # epochs done, as a fraction (1.4 = 40% into the second epoch)
    eta_s: float  # seconds left at the current epoch's pace (an estimate)


def live_curves(db: Database, run_ids: Sequence[int], *,
                max_batch_points: int = BATCH_POINTS) -> list[dict]:
    """The live chart's rows ``{run, run_id, kind, epoch, key, value}``: one row per epoch end
    (``kind`` "epoch end") and, thinned in SQL, the running training metrics within epochs
    (``kind`` "during epoch", ``epoch`` fractional), so a long first epoch shows progress."""
    ids = list(run_ids)
    with db.session() as s:
        names = {i: r.display_name for i in ids
                 if (r := store.get_run(session=s, run_id=i)) is not None}
        epochs = store.get_metrics(session=s, run_ids=ids, kind="epoch", keys=EPOCH_KEYS)
        batches = store.get_metrics_thinned(session=s, run_ids=ids, kind="batch",
                                            keys=(*BATCH_KEYS, "epoch_progress"),
                                            max_points=max_batch_points)
    where = {(r.run_id, r.step): r.value for r in batches if r.key == "epoch_progress"}
    label = {i: f"{names.get(i, i)} (#{i})" for i in ids}
    rows = [dict(run=label[r.run_id], run_id=r.run_id, kind="epoch end", epoch=r.step,
                 key=r.key, value=r.value) for r in epochs]
    rows += [dict(run=label[r.run_id], run_id=r.run_id, kind="during epoch",
                  epoch=where[(r.run_id, r.step)], key=r.key, value=r.value)
             for r in batches if r.key != "epoch_progress" and (r.run_id, r.step) in where]
    return rows


def run_progress(db: Database, run_ids: Sequence[int]) -> dict[int, RunProgress]:
    """Each run's newest position and ETA (runs without batch rows are left out)."""
    with db.session() as s:
        rows = store.get_metrics_thinned(session=s, run_ids=list(run_ids), kind="batch",
                                         keys=("epoch_progress", "eta_s"), max_points=1)
    newest: dict[int, dict[str, float]] = {}
    for r in rows:
        newest.setdefault(r.run_id, {})[r.key] = r.value
    return {i: RunProgress(v["epoch_progress"], v["eta_s"]) for i, v in newest.items()
            if {"epoch_progress", "eta_s"} <= set(v)}


# -- Label audits: K fold runs (training.label_audit) ----------------------------------

def label_audit_config(db: Database, dataset: str, config: Mapping[str, Any] | None = None,
                       *, label_scheme: str | None = None, label_source: str | None = None,
                       base_dir: str | Path | None = None) -> TrainConfig:
    """The fold runs' config: ``config`` (a run config: recipe, model, epochs, ...; default the
    host's recipe) on ``dataset``, binary and current labels unless told otherwise.

    Raises:
        ConfigError: an invalid config, or one with extra datasets or ``max_images`` (every
            image is predicted once, out of fold, from its own dataset).
        DatasetError: an unknown dataset.
    """
    with db.session() as s:
        info = dataset_store.get_dataset(session=s, name_or_id=dataset)
    if info is None:
        raise DatasetError(f"no indexed dataset {dataset!r}: index it first (python -m cxr_core "
                           f"index PATH --name NAME). Received: --dataset {dataset!r}")
    data = dict(config or {"recipe": host_recipe(info.layout)})
    if data.get("dataset") not in (None, info.name, info.root):
        raise ConfigError("an audit's config trains on the audited dataset; leave its dataset "
                          f"out. Received: dataset={data['dataset']!r}, --dataset {dataset!r}")
    data["dataset"] = info.name
    data["label_scheme"] = label_scheme or data.get("label_scheme") or "binary"
    data["label_source"] = label_source or data.get("label_source") or "current"
    return make_config(db, data, base_dir=base_dir)


def train_audit_folds(db: Database, audit_id: int, *,
                      progress: Callable[[int, int], None] | None = None,
                      poll_s: float = 2.0) -> Any:
    """The CLI without ``--detach``: this process is one more worker for the audit. It
    claims each queued fold run it can (another free worker may take some) and trains it, then
    waits for the folds others train; returns the audit once no fold is queued or running."""
    worker_id, beat = loop.register(db, kinds="runs")
    try:
        while True:
            with db.session() as s:
                runs = audit_store.fold_runs(session=s, audit_id=audit_id)
            queued = [f for f in runs if f.status == "queued"]
            for f in queued:
                if db.write(lambda s, rid=f.run_id: store.claim_run(
                        session=s, run_id=rid, worker_id=worker_id)):
                    beat.run_id = f.run_id
                    runner.process_run(db, f.run_id, progress=progress)
                    beat.run_id = None
            with db.session() as s:
                runs = audit_store.fold_runs(session=s, audit_id=audit_id)
            if not any(f.status in ("queued", "running") for f in runs):
                return label_audit.finalize(db, audit_id)
            if not any(f.status == "queued" for f in runs):
                time.sleep(poll_s)  # the rest are with other workers
    finally:
        loop.unregister(db, worker_id, beat)
