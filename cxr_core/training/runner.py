"""One training run's lifecycle in a worker: :func:`process_run` takes a claimed run from
start to end.

It prepares the data from the index (label snapshot, patient split, calibration slice;
:mod:`cxr_core.training.inputs`), records the run's images and snapshot, calls
:func:`cxr_core.training.fit.train` with sinks (:func:`db_sinks`) that write long-form metric
rows (per epoch, and per batch at most every 2 s), run log lines, and a cancel check after every
batch, and at the end stores the operating point chosen on the calibration slice, the
validation and calibration evaluations (:mod:`cxr_core.training.outputs`) and
``model_card.json`` with its ``measured`` list. The worker loop gets this function from the
composition root (:func:`cxr_core.app.run_worker`); the CLI's in-process ``train`` calls it too.
"""
from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_core.core.errors import ConfigError, CxrError
from cxr_core.core.settings import get_settings
from cxr_core.data.indexing import find_dataset, index_dataset
from cxr_core.evaluation.card_measured import refresh_run_card, run_measured
from cxr_core.evaluation.evaluate import evaluate_model
from cxr_core.storage import Database
from cxr_core.storage import runs as store
from cxr_core.training import label_audit
from cxr_core.training.config import TrainConfig
from cxr_core.training.inputs import PreparedData, prepare_data
from cxr_core.training.interface import EPOCH_KEYS, TrainSinks
from cxr_core.training.outputs import RunOutputs, record_outputs, run_priors, write_model_card

Progress = Callable[[int, int], None]
# Called after each epoch's rows are written: (epoch, metrics) -> None to go on, or a reason to
# stop the run now (it ends "cancelled" with that reason as its error). A study's pruner
# reports through it (cxr_core.search.trials), so training never imports Optuna.
EpochHook = Callable[[int, dict[str, float]], str | None]


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended (the CLI prints :meth:`to_json`)."""

    run_id: int
    status: str  # finished | failed | cancelled
    epochs: int
    val: dict = field(default_factory=dict)
    error: str | None = None
    external: tuple[dict, ...] = ()  # the run's external figures (cfg.external), in brief

    def to_json(self) -> dict:
        out = {"run_id": self.run_id, "status": self.status, "epochs": self.epochs,
               "val": self.val}
        if self.error:
            out["error"] = self.error
        if self.external:
            out["external"] = list(self.external)
        return out


def _fmt(logs: dict[str, float]) -> str:
    parts = [f"{k} {logs[k]:.4f}" for k in EPOCH_KEYS if k in logs]
    if "lr" in logs:
        parts.append(f"lr {logs['lr']:.2g}")
    if "images_per_s" in logs:
        parts.append(f"{logs['images_per_s']:.0f} img/s")
    return ", ".join(parts)


def db_sinks(db: Database, run_id: int, *, epochs: int, progress: Progress | None = None,
             batch_interval_s: float = 2.0, epoch_hook: EpochHook | None = None,
             stop: list[str] | None = None) -> Any:
    """TrainSinks that write metrics, epochs done and log lines, and read the cancel flag.

    ``epoch_hook`` (see :data:`EpochHook`) may stop the run: its reason is appended to
    ``stop`` and the cancel check then answers True.
    """

    first_batch = [True]
    stop = stop if stop is not None else []

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        def write(s) -> None:
            store.add_metrics(session=s, run_id=run_id, kind="epoch", step=epoch, values=logs)
            store.set_epochs_done(session=s, run_id=run_id, epochs_done=epoch)
            store.add_log(session=s, run_id=run_id, message=f"epoch {epoch}/{epochs}: {_fmt(logs)}")
        db.write(write)
        if progress is not None:
            progress(epoch, epochs)
        if epoch_hook is not None and not stop:
            reason = epoch_hook(epoch, logs)
            if reason:
                stop.append(reason)

    def on_batch_end(step: int, logs: dict[str, float]) -> None:
        def write(s) -> None:
            if first_batch[0]:  # a resumed run rewrites the batches past its checkpoint
                store.truncate_metrics(session=s, run_id=run_id, after_batch_step=step - 1)
            store.add_metrics(session=s, run_id=run_id, kind="batch", step=step, values=logs)
        db.write(write)
        first_batch[0] = False

    def should_cancel() -> bool:
        if stop:
            return True
        with db.session() as s:
            return store.should_stop(session=s, run_id=run_id)

    def log(level: str, message: str) -> None:
        db.write(lambda s: store.add_log(session=s, run_id=run_id, message=message, level=level))

    return TrainSinks(on_epoch_end, on_batch_end, should_cancel, log, batch_interval_s)


def _log(db: Database, run_id: int, message: str, level: str = "info") -> None:
    db.write(lambda s: store.add_log(session=s, run_id=run_id, message=message, level=level))


def _complete(db: Database, run: store.RunRecord, cfg: Any, prepared: PreparedData, result: Any,
              run_dir: Path) -> RunOutcome:
    """Validation and calibration outputs, model card and the run's final row."""
    priors = run_priors(cfg, prepared, list(result.classes))
    try:
        out = record_outputs(db, run, cfg, prepared, result, priors=priors)
    except ConfigError as exc:  # e.g. a validation split missing a class: keep the model
        _log(db, run.id, f"validation metrics not stored: {exc}", "warning")
        out = RunOutputs({}, None, None)
    val, op, eval_id = out.val, out.operating_point, out.evaluation_id
    if op and op.get("calibration_skipped"):
        _log(db, run.id, f"threshold chosen on validation: {op['calibration_skipped']}",
             "warning")
    snap = prepared.snapshot
    write_model_card(
        run_dir, name=run.display_name, cfg=cfg, classes=result.classes,
        saliency_layer=result.saliency_layer, operating_point=op, val_metrics=val,
        dataset={"id": prepared.dataset_id, "name": prepared.dataset_name,
                 "root": prepared.dataset_root, "counts": prepared.counts},
        label_snapshot={"source": cfg.label_source, "hash": snap.hash,
                        "relabel_id": snap.newest_relabel_id, "n_relabels": snap.n_relabels},
        priors=priors,
        extra={"run_id": run.id, "model_ref": f"run:{run.id}", "epochs": result.epochs_done,
               "best_epoch": result.best_epoch, "weights": result.weights_report,
               "evaluation_id": eval_id,
               "calibration_evaluation_id": out.calibration_evaluation_id,
               "extra_data": list(prepared.extra), "per_class": out.per_class,
               "parameters": result.parameters})
    refresh_run_card(db, run.id)  # "measured": every split, with patient-clustered intervals
    if cfg.holdout is not None:  # a label audit's fold: its held-out images, out of fold
        n = label_audit.record_fold(db, run.id, cfg, prepared)
        _log(db, run.id, f"label audit {cfg.holdout.audit}: fold {cfg.holdout.fold + 1}/"
             f"{cfg.holdout.folds} predicted out of fold ({n} of {len(prepared.holdout)} images)")
    external = _evaluate_external(db, run.id, cfg)
    summary = {"val": val, "epochs": result.epochs_done, "best_epoch": result.best_epoch,
               "stopped_early": result.stopped_early, "images_per_s": result.images_per_s,
               "n_train": result.n_train, "n_val": result.n_val, "skipped": result.skipped,
               "feature_cache": result.feature_cache, "evaluation_id": eval_id,
               "operating_point": op, "n_calibration": len(prepared.calibration),
               "calibration_evaluation_id": out.calibration_evaluation_id,
               "external": external, "parameters": result.parameters,
               "per_class": out.per_class, "left_out_unlabelled": prepared.unlabelled}
    db.write(lambda s: store.finish_run(session=s, run_id=run.id, status="finished",
                                        summary=summary, only_if="running"))
    _log(db, run.id, "finished: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()
                                              if isinstance(v, float)))
    if cfg.holdout is not None:  # the last fold to finish runs confident learning
        try:
            audit = label_audit.finalize(db, cfg.holdout.audit)
            if audit.status == "finished":
                _log(db, run.id, f"label audit {audit.id} finished: "
                     f"{(audit.result or {}).get('n_issues')} image(s) flagged")
        except CxrError as exc:  # the fold's outputs are stored; `label-audit show` retries
            _log(db, run.id, f"label audit {cfg.holdout.audit} not finalized: {exc}", "warning")
    return RunOutcome(run.id, "finished", result.epochs_done, val, external=tuple(external))


def _evaluate_external(db: Database, run_id: int, cfg: TrainConfig) -> list[dict]:
    """Evaluate the finished run on each external dataset of its config (a folder not indexed
    yet is indexed as external first); the card's external entries, in brief. A dataset that
    fails is logged and skipped: the trained model is kept."""
    out = []
    for name in cfg.external:
        try:
            if find_dataset(db, name) is None:
                index_dataset(db, name, external=True)
            ev_id, _ = evaluate_model(db, f"run:{run_id}", name)
        except CxrError as exc:
            _log(db, run_id, f"external dataset {name!r} not evaluated: {exc}", "warning")
            continue
        entry = next((e for e in run_measured(db, run_id) if e.get("evaluation_id") == ev_id
                      and e.get("role") == "external"), None)
        if entry is None:  # not flagged external after all: a plain evaluation
            _log(db, run_id, f"dataset {name!r} is not flagged external: evaluation {ev_id} "
                 "is not an external figure", "warning")
            continue
        site = entry.get("site_threshold") or {}
        brief = {"dataset": entry["dataset"], "evaluation_id": ev_id, "n": entry["n"],
                 "auc": entry["auc"], "sensitivity": entry["sensitivity"],
                 "specificity": entry["specificity"],
                 "site_sensitivity": site.get("sensitivity"),
                 "site_specificity": site.get("specificity")}
        out.append(brief)
        auc, spec = entry["auc"], site.get("specificity")
        _log(db, run_id, f"external {entry['dataset']}: AUC "
             f"{'?' if auc is None else f'{auc:.4f}'}, site threshold (cross-fitted) "
             f"specificity {'?' if spec is None else f'{spec:.3f}'} ({entry['n']} images the "
             "model never saw)")
    return out


def _start(db: Database, run: store.RunRecord, cfg: Any, run_dir: Path) -> tuple[PreparedData, int]:
    """Prepare the data, record the snapshot and artifacts; returns (data, initial epoch)."""
    from cxr_core.training.checkpoints import resume_epoch

    resume = run.resume_requested
    initial = resume_epoch(run_dir, run.epochs_done) if resume else 0
    as_of = (run.label_snapshot_relabel_id or 0) if resume and run.label_snapshot_hash else None
    if as_of is None and cfg.holdout is not None:  # a fold trains on its audit's labels
        as_of = label_audit.snapshot_relabel_id(db, cfg.holdout.audit)
    prepared = prepare_data(db, cfg, as_of_relabel_id=as_of)
    snap = prepared.snapshot

    def write(s) -> None:
        store.set_run_artifacts(session=s, run_id=run.id, artifact_dir=str(run_dir),
                                snapshot_hash=snap.hash,
                                snapshot_relabel_id=snap.newest_relabel_id)
        store.set_epochs_done(session=s, run_id=run.id, epochs_done=initial)
        data = prepared.data  # the images it trains, selects and calibrates on (warnings)
        store.set_run_images(session=s, run_id=run.id,
                             train_ids=[i for i, v in zip(data.image_ids, data.is_val)
                                        if i is not None and not v],
                             val_ids=[i for i, v in zip(data.image_ids, data.is_val)
                                      if i is not None and v],
                             calib_ids=[r.id for r in prepared.calibration])
        if resume:
            store.truncate_metrics(session=s, run_id=run.id, after_epoch=initial)
        store.add_log(session=s, run_id=run.id, message=(
            f"{'resuming from epoch ' + str(initial) if resume else 'started'} on "
            f"{socket.gethostname()} (pid {os.getpid()}): dataset {prepared.dataset_name!r}, "
            f"{cfg.label_scheme} labels ({cfg.label_source}, snapshot {snap.hash[:12]}), "
            f"train {prepared.counts['train']}, val {prepared.counts['val']}, calibration "
            f"{prepared.counts.get('calibration') or prepared.calibration_skipped}"
            + "".join(f"; extra {e['dataset']!r}: train {e['train']} x{e['repeat']}, val "
                      f"{e['val']}, calibration {e['calibration']}" for e in prepared.extra)
            + (f"; label audit {cfg.holdout.audit}: holds out fold {cfg.holdout.fold + 1}/"
               f"{cfg.holdout.folds} ({len(prepared.holdout)} images)" if cfg.holdout else "")
            + "".join(f"; left out {n} image(s) labelled {why}"
                      for why, n in sorted(prepared.unlabelled.items()))))
    db.write(write)
    return prepared, initial


def process_run(db: Database, run_id: int, *, progress: Progress | None = None,
                epoch_hook: EpochHook | None = None) -> RunOutcome:
    """Train one claimed (running) run to its end and record everything.

    Never raises for a failing run: it is marked failed with its error (a KeyboardInterrupt
    or SystemExit also marks it failed, then propagates).

    Args:
        db: the database.
        run_id: a run this process has claimed.
        progress: (epochs done, epochs) after each epoch (the CLI prints it).
        epoch_hook: after each epoch; a reason it returns stops the run (:data:`EpochHook`).

    Returns:
        How the run ended.
    """
    from cxr_core.training import fit

    with db.session() as s:
        run = store.require_run(session=s, run_id=run_id)
    epochs = 0
    try:
        cfg = TrainConfig.from_dict(run.config)
        run_dir = Path(run.artifact_dir or get_settings().runs_dir / str(run_id))
        prepared, epochs = _start(db, run, cfg, run_dir)
        stop: list[str] = []
        result = fit.train(cfg, prepared.data, run_dir, cache_root=get_settings().cache_dir,
                           sinks=db_sinks(db, run_id, epochs=cfg.epochs, progress=progress,
                                          epoch_hook=epoch_hook, stop=stop),
                           initial_epoch=epochs)
        epochs = result.epochs_done
        if result.status == "cancelled":
            return _cancelled(db, run_id, epochs, stop[0] if stop else None)
        return _complete(db, run, cfg, prepared, result, run_dir)
    except CxrError as exc:
        return _fail(db, run_id, epochs, str(exc))
    except Exception as exc:  # any training error ends this run, not the worker
        _log(db, run_id, traceback.format_exc(limit=20), "error")
        return _fail(db, run_id, epochs, f"{type(exc).__name__}: {exc}")
    except BaseException:  # KeyboardInterrupt / SystemExit (SIGTERM): record, then stop
        _fail(db, run_id, epochs, "the worker was stopped; resume to continue")
        raise


def _cancelled(db: Database, run_id: int, epochs: int, reason: str | None = None) -> RunOutcome:
    with db.session() as s:
        status = store.require_run(session=s, run_id=run_id).status
    if status != "running":  # reaped meanwhile: keep its reason
        return RunOutcome(run_id, status, epochs, error="stopped: the run was marked " + status)
    msg = reason or f"cancelled on request after {epochs} complete epoch(s)"
    db.write(lambda s: store.finish_run(session=s, run_id=run_id, status="cancelled", error=msg,
                                        only_if="running"))
    _log(db, run_id, msg, "warning")
    return RunOutcome(run_id, "cancelled", epochs, error=msg)


def _fail(db: Database, run_id: int, epochs: int, error: str) -> RunOutcome:
    def write(s) -> None:
        store.finish_run(session=s, run_id=run_id, status="failed", error=error, only_if="running")
        store.add_log(session=s, run_id=run_id, message=f"failed: {error}", level="error")
    db.write(write)
    return RunOutcome(run_id, "failed", epochs, error=error)
