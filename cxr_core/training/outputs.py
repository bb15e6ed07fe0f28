"""What the worker records when a run finishes: the validation and calibration evaluations, the
operating point, and the run's ``model_card.json`` (its ``measured`` list is
:mod:`cxr_core.evaluation.card_measured`'s).

The threshold is chosen on the run's calibration slice (:mod:`cxr_core.data.calibration`): images
that training never saw and model selection never used, predicted here with the run's best
model through the one evaluation pipeline. Without a slice (``calibration_fraction`` 0, or a
validation split too small to carve one) it is chosen on validation as before, and the
operating point says so (``chosen_on: "val"``, with the reason).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.data import provenance
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation.evaluate import patients_of, record_evaluation
from cxr_core.evaluation.operating_points import set_operating_point, set_prior_point
from cxr_core.models import refs
from cxr_core.models.card import CARD_NAME, DATA_ATTRIBUTION
from cxr_core.models.store import RUN_MODEL_NAME
from cxr_core.stats import priors as class_priors
from cxr_core.stats import reports as ev
from cxr_core.storage import Database, relabels
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import evals as evals_store
from cxr_core.training.config import TrainConfig

BOOTSTRAP = 200  # resamples for the stored evaluations' intervals


@dataclass(frozen=True)
class RunOutputs:
    """The finished run's numbers (for its summary and model card)."""
    val: dict  # validation metrics at the operating point
    operating_point: dict | None
    evaluation_id: int | None  # the validation (selection) evaluation
    calibration_evaluation_id: int | None = None
    # Per-class precision, recall, F1 and support at the operating point on validation, with
    # the macro and weighted averages (stats.reports.class_report), for the card and run view.
    per_class: dict | None = None


def _truth(db: Database, cfg: Any, prepared: Any, ids: list[int], classes: list[str]):
    """The labels the run trained and selected on, over ``ids``: its own dataset's as of its
    snapshot, an extra dataset's current ones (as the run read them)."""
    snap = prepared.snapshot
    as_of = provenance.as_of_relabel_id(cfg.label_source, snap.newest_relabel_id or 0)
    with db.session() as s:
        version = relabels.label_version(session=s, dataset_id=prepared.dataset_id,
                                         as_of_relabel_id=as_of)
        labels = dict(version.labels)
        others = [i for i in ids if i not in labels]
        if others:  # extra datasets' images (cfg.extra): current labels
            labels.update(relabels.image_label_version(session=s, image_ids=others).labels)
    return provenance.make_truth(labels, ids, classes, cfg.label_scheme,
                                 cfg.label_source, version.newest_relabel_id)


def _overlap(db: Database, run_id: int, ids: list[int]) -> dict:

    with db.session() as s:
        return evals_store.run_overlap(session=s, run_id=run_id, image_ids=ids).to_dict()


def predict_calibration(db: Database, run_id: int, cfg: Any, prepared: Any,
                        classes: list[str]) -> tuple[list[int], list[str], np.ndarray, np.ndarray,
                                                     Any]:
    """The run's best model on its calibration slice: (ids, paths, y, probs, truth)."""
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    records = list(prepared.calibration)
    ids, paths, probs = [], [], []
    for ds_id in dict.fromkeys(r.dataset_id for r in records):  # its own, then extra datasets
        with db.session() as s:
            info = ds_store.get_dataset(session=s, name_or_id=ds_id)
        group = [r for r in records if r.dataset_id == ds_id]
        truth = _truth(db, cfg, prepared, [r.id for r in group], classes)
        cache, kept = es._cache(info, group, truth.y.tolist(), loaded, None)
        probs.append(es._predict_cache(loaded, cache, None))
        ids += [r.id for r in kept]
        paths += [r.relpath if info.layout == "npz" else str(Path(info.root) / r.relpath)
                  for r in kept]
    truth = _truth(db, cfg, prepared, ids, classes)  # the images the cache could read
    return ids, paths, truth.y, np.concatenate(probs), truth


def _choose(db: Database, run_id: int, cfg: Any, prepared: Any, classes: list[str],
            result: Any) -> tuple[dict, dict | None]:
    """Choose and store the operating point: on the calibration slice when the run has one.

    Returns:
        (the operating point as the card records it, the calibration outputs or None).
    """
    cal = None
    if prepared.calibration:
        ids, paths, y, probs, truth = predict_calibration(db, run_id, cfg, prepared, classes)
        if len(set(y.tolist())) == 2:
            cal = dict(ids=ids, paths=paths, y=y, probs=probs, truth=truth)
    if cal is not None:
        groups = patients_of(db, cal["ids"])
        n_patients = len({g for g in (groups or []) if g}) or None
        details = {"chosen_on": "calibration", "calibration_n": len(cal["ids"]),
                   "calibration_patients": n_patients,
                   "calibration_fraction": cfg.calibration_fraction}
        y_sel, p_sel = cal["y"], cal["probs"][:, 1]
        note = (f"chosen on the calibration slice ({len(cal['ids'])} images) at the end of "
                "training; early stopping and the best epoch used the rest of validation")
    else:
        reason = prepared.calibration_skipped or "the calibration slice lacks a class"
        details = {"chosen_on": "val", "calibration_skipped": reason}
        y_sel, p_sel = result.val_y, result.val_probs[:, 1]
        note = f"chosen on the validation split at the end of training ({reason})"
    chosen = set_operating_point(db, run_id=run_id, y_true=y_sel, p_pos=p_sel,
                                 method="sensitivity", target=cfg.target_sensitivity,
                                 changed_by="training", note=note, details=details)
    op = {"threshold": chosen.threshold, "method": chosen.method, "target": chosen.target,
          "sensitivity": chosen.sensitivity, "specificity": chosen.specificity,
          "sample_n": chosen.sample_n, **details}
    return op, cal


def decides_by_priors(scheme: str, n_classes: int) -> bool:
    """Models decided by the argmax at a target prior (three classes, the subtype step, 3+
    folder classes), not by an operating point chosen at a target sensitivity."""
    return scheme in ("three_class", "subtype") or (scheme == "folders" and n_classes > 2)


def run_priors(cfg: Any, prepared: Any, classes: list[str]) -> dict | None:
    """The priors a multi-class run's card records (issue 30): the effective training prior
    (its balancing: class weights and under-sampling balance the classes, over-sampling has
    its ratio) and the target prior its outputs are moved to, by default the training images'
    own class frequencies. None for models decided at an operating point."""
    if not decides_by_priors(cfg.label_scheme, len(classes)):
        return None
    counts = [int(prepared.counts.get("train", {}).get(c, 0)) for c in classes]
    if min(counts, default=0) <= 0:
        return None
    ratio = cfg.target_ratio if cfg.balancing == "oversample" else None
    train = class_priors.effective_prior(counts, cfg.balancing, ratio)
    natural = np.asarray(counts, dtype=float) / sum(counts)
    return {"classes": list(classes), "train": [round(float(v), 6) for v in train],
            "target": [round(float(v), 6) for v in natural],
            "target_source": "the training images' class frequencies",
            "balancing": cfg.balancing, "train_counts": counts}


def record_outputs(db: Database, run: Any, cfg: Any, prepared: Any, result: Any,
                   priors: dict | None = None) -> RunOutputs:
    """Store the operating point and the validation (and calibration) evaluations of a
    finished run; the stored metrics are at the new operating point. With ``priors`` (a
    multi-class run, :func:`run_priors`) the stored probabilities are those moved to the
    target prior, as the loaded model outputs them.

    Raises:
        ConfigError: e.g. a validation split missing a class (the caller keeps the model).
    """
    classes = list(result.classes)
    val_probs = result.val_probs
    if priors is not None and len(val_probs):
        val_probs = class_priors.adjust(val_probs, priors["train"], priors["target"])
    if priors is not None and len(classes) == 2:
        chosen = set_prior_point(db, run_id=run.id, y_true=result.val_y, p_pos=val_probs,
                                 priors=priors)
        op = {"threshold": chosen.threshold, "method": chosen.method, "target": None,
              "sensitivity": chosen.sensitivity, "specificity": chosen.specificity,
              "sample_n": chosen.sample_n, "chosen_on": "priors"}
        cal = None
    elif len(classes) == 2:
        op, cal = _choose(db, run.id, cfg, prepared, classes, result)
    else:
        op, cal = None, None
    cal_id = None
    if cal is not None:
        cal_id = record_evaluation(
            db, run_id=run.id, model_ref=f"run:{run.id}", dataset_id=prepared.dataset_id,
            split="calibration", labels=classes, image_ids=cal["ids"], paths=cal["paths"],
            y_true=cal["y"], probs=cal["probs"], n_boot=BOOTSTRAP, truth=cal["truth"],
            groups=patients_of(db, cal["ids"]), overlap=_overlap(db, run.id, cal["ids"]))
    val_ids = list(result.val_image_ids)
    truth = overlap = None
    if val_ids and all(i is not None for i in val_ids):
        truth = _truth(db, cfg, prepared, val_ids, classes)
        overlap = _overlap(db, run.id, val_ids)
    eval_id = record_evaluation(
        db, run_id=run.id, model_ref=f"run:{run.id}", dataset_id=prepared.dataset_id,
        split="val", labels=classes, image_ids=val_ids, paths=list(result.val_paths),
        y_true=result.val_y, probs=val_probs, n_boot=BOOTSTRAP, truth=truth,
        groups=patients_of(db, val_ids), overlap=overlap)
    rep = ev.evaluate(result.val_y, val_probs, classes,
                      threshold=op["threshold"] if op else None, n_boot=0)
    val = {"n": rep.n, "auc": rep.auc, "accuracy": rep.accuracy, "sensitivity": rep.sensitivity,
           "specificity": rep.specificity, "average_precision": rep.average_precision,
           "threshold": rep.threshold}
    val = {k: (None if isinstance(v, float) and v != v else v) for k, v in val.items()}  # NaN
    per_class = {"split": "val", "threshold": rep.threshold, "n": rep.n,
                 "rows": ev.class_report(rep.per_class)}
    return RunOutputs(val, op, eval_id, cal_id, per_class)


def write_model_card(run_dir: str | Path, *, name: str, cfg: TrainConfig,
                     classes: tuple[str, ...], saliency_layer: str | None,
                     operating_point: Mapping[str, Any] | None, val_metrics: Mapping[str, Any],
                     dataset: Mapping[str, Any], label_snapshot: Mapping[str, Any],
                     extra: Mapping[str, Any] | None = None,
                     priors: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_card.json`` beside the run's model (what Predict/Evaluate read).

    Returns:
        The card's path.
    """
    card = {
        "name": name, "model": cfg.model, "model_file": RUN_MODEL_NAME, "labels": list(classes),
        "label_scheme": cfg.label_scheme, "image_size": cfg.image_size,
        "channels": cfg.channels, "saliency_layer": saliency_layer,
        "operating_point": dict(operating_point) if operating_point else None,
        "val_metrics": dict(val_metrics), "training_config": cfg.to_dict(),
        "head": {"config": None if cfg.head is None else cfg.head.to_dict(),
                 "built": cfg.model_config().head_description(),
                 "optimizer": cfg.optimizer, "learning_rate": cfg.learning_rate},
        "dataset": dict(dataset), "label_snapshot": dict(label_snapshot),
        "data_licence": DATA_ATTRIBUTION, **dict(extra or {}),
    }
    if priors:
        card["priors"] = dict(priors)
    path = Path(run_dir) / CARD_NAME
    tmp = path.with_name(f".tmp-{CARD_NAME}")
    tmp.write_text(json.dumps(card, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
