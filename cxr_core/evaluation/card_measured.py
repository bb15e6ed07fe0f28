"""What a model card says the model measured: a ``measured`` list, one entry per split it was
scored on, at the threshold of that evaluation, with patient-clustered 95% intervals.

An entry is derived from a stored evaluation (:mod:`cxr_core.storage.evals`), never typed in:

    {"split", "dataset", "evaluation_id", "role", "validation", "n", "n_patients", "ci_unit",
     "auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci",
     "threshold", "chosen_on", "threshold_chosen_here", "label_source", "measured_at"}

An evaluation on a dataset flagged external (another site or period) gives an entry with role
``external`` instead (:func:`cxr_core.evaluation.external.external_entry`: only images the
model never saw, the stored threshold's figures and the cross-fitted site threshold's).

``role`` is what the images were to the run: ``selection`` (its validation images: early
stopping and the best epoch), ``calibration`` (its calibration slice: the threshold), ``seen``
(some images or patients it trained or selected on) or ``independent``. ``validation`` is the
run's split strategy for its own held-out images (``temporal``, ``patient`` = in-distribution,
``group``), else None. ``threshold_chosen_here`` marks a number scored on the images its
threshold was chosen on: never a headline (:func:`cxr_core.models.card.headline`).

The run's ``model_card.json`` is rewritten (:func:`refresh_run_card`) at the end of training and
whenever an evaluation of the run is recorded, so the card stays true as the run is measured on
more data; :func:`run_measured` derives the same list on demand.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxr_core.evaluation.external import external_entry
from cxr_core.models.card import CARD_NAME
from cxr_core.stats import reports
from cxr_core.storage import Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import evals as store
from cxr_core.storage import runs as run_store
from cxr_core.storage.evals import EvaluationInfo, OperatingPoint


def _ci(metrics: Mapping[str, Any], key: str) -> list[float | None] | None:
    ci = (metrics.get("ci") or {}).get(key)
    return None if not ci else [ci.get("low"), ci.get("high")]


def _role(info: EvaluationInfo) -> str:
    ov = info.overlap or {}
    if not ov.get("recorded"):
        return "independent"
    if ov.get("calib_images") and ov["calib_images"] == info.n:
        return "calibration"
    if ov.get("val_images") and ov["val_images"] == info.n:
        return "selection"
    seen = ("train_images", "val_images", "calib_images", "train_patients", "val_patients",
            "calib_patients", "same_content")
    return "seen" if any(ov.get(k) for k in seen) else "independent"


def _chosen_on(threshold: float | None, history: list[OperatingPoint]) -> str | None:
    """Where the threshold of an evaluation was chosen: the newest global operating point
    with that threshold ("calibration", "val", "manual"; older rows without details: "val"
    when set by training)."""
    if threshold is None:
        return None
    for op in history:
        if abs(op.threshold - threshold) < 1e-9:
            if op.chosen_on:
                return op.chosen_on
            return "manual" if op.method == "manual" else "val"
    return "unknown"


def measured_entry(info: EvaluationInfo, *, split_strategy: str | None,
                   history: list[OperatingPoint]) -> dict:
    """One ``measured`` entry from a stored binary evaluation of a run."""
    m = info.metrics
    role = _role(info)
    chosen_on = _chosen_on(m.get("threshold"), history)
    here = (role == "calibration" and chosen_on == "calibration") or (
        role == "selection" and chosen_on == "val")
    return {
        "split": info.split or "(all)", "dataset": info.dataset_name,
        "evaluation_id": info.id, "role": role,
        "validation": split_strategy if role in ("selection", "calibration") else None,
        "n": info.n, "n_patients": m.get("n_clusters"), "ci_unit": m.get("ci_unit"),
        "auc": m.get("auc"), "auc_ci": _ci(m, "auc"),
        "sensitivity": m.get("sensitivity"), "sensitivity_ci": _ci(m, "sensitivity"),
        "specificity": m.get("specificity"), "specificity_ci": _ci(m, "specificity"),
        "threshold": m.get("threshold"), "chosen_on": chosen_on,
        "threshold_chosen_here": here, "label_source": info.label_source,
        "measured_at": info.created_at.isoformat() if info.created_at else None,
    }


def run_measured(db: Database, run_id: int) -> list[dict]:
    """The run's ``measured`` list: its newest evaluation per (dataset, split, images, labels),
    oldest first (binary runs; [] otherwise)."""
    with db.session() as s:
        infos = store.list_evaluations(session=s, run_id=run_id)
        history = store.operating_points(session=s, run_id=run_id)
        run = run_store.get_run(session=s, run_id=run_id)
    strategy = ((run.config or {}).get("split") or "patient") if run is not None else None
    newest: dict[tuple, EvaluationInfo] = {}
    for info in infos:  # newest first
        if len(info.labels) == 2:
            newest.setdefault((info.dataset_id, info.split, info.images_key,
                               info.label_source), info)
    return [external_entry(db, i) if i.dataset_external else
            measured_entry(i, split_strategy=strategy, history=history)
            for i in sorted(newest.values(), key=lambda e: e.id)]


def refresh_run_card(db: Database, run_id: int) -> list[dict] | None:
    """Rewrite ``measured`` in the run's ``model_card.json`` from the database.

    Returns:
        The list written, or None when the run has no card on this host (nothing written).
    """
    with db.session() as s:
        run = run_store.get_run(session=s, run_id=run_id)
    if run is None or not run.artifact_dir:
        return None
    path = Path(run.artifact_dir) / CARD_NAME
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    card["measured"] = run_measured(db, run_id)
    tmp = path.with_name(f".tmp-measured-{CARD_NAME}")
    tmp.write_text(json.dumps(card, indent=2, default=str))
    os.replace(tmp, path)
    return card["measured"]


def at_threshold(db: Database, measured: list[dict], threshold: float, *,
                 chosen_on: str, dataset: str | None = None, n_boot: int = 200) -> list[dict]:
    """A ``measured`` list re-scored at another stored threshold (a model exported with an
    operating point it was not evaluated at, e.g. a site threshold): each entry's sensitivity
    and specificity recomputed from its evaluation's stored outputs, with patient-clustered
    intervals. An external entry on ``dataset`` (where that threshold was chosen) keeps only its
    AUC and cross-fitted figures. Entries without a stored evaluation are dropped."""
    out = []
    for entry in measured:
        with db.session() as s:
            info = store.get_evaluation(session=s, evaluation_id=entry.get("evaluation_id"))
            preds = store.get_predictions(session=s, evaluation_id=info.id) if info else None
        if info is None or preds is None:
            continue
        if entry.get("role") == "external":
            out.append(external_entry(db, info, threshold=threshold, n_boot=n_boot,
                                      chosen_here=info.dataset_name == dataset))
            continue
        ids = [i for i in preds.image_ids if i is not None]
        with db.session() as s:
            groups = ds_store.image_patients(session=s, image_ids=ids) \
                if len(ids) == len(preds.image_ids) else None
        rep = reports.evaluate(preds.y_true, preds.probs, list(info.labels),
                               threshold=threshold, n_boot=n_boot, groups=groups)
        ci = rep.ci or {}
        out.append({**entry, "threshold": threshold, "chosen_on": chosen_on,
                    "threshold_chosen_here": False,
                    "sensitivity": rep.sensitivity, "specificity": rep.specificity,
                    "sensitivity_ci": [ci["sensitivity"].low, ci["sensitivity"].high]
                    if "sensitivity" in ci else None,
                    "specificity_ci": [ci["specificity"].low, ci["specificity"].high]
                    if "specificity" in ci else None})
    return out
