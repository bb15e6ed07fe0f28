"""External validation: what a model measures on a dataset flagged as another site or period.

A validation split carved from the training folder is in-distribution and flatters (AUC 0.998
there against about 0.94 on the official test period of the Kermany data); the figure that says
whether a model holds where it is used is measured on an **external dataset**
(``datasets.external``, ``index PATH --external``).

A model's **external figures** on such a dataset use only the images it never trained on,
selected on (early stopping, best epoch) or had a threshold chosen on: images, byte-identical
files and patients (scoped by dataset, :func:`cxr_core.core.records.scoped_patient`) of its
training, validation and calibration parts are left out and counted. The figures are:

- AUC with a patient-clustered 95% interval;
- sensitivity and specificity at the model's **stored** threshold, unless that threshold was
  chosen on this very dataset (a site threshold): then they are not reported;
- sensitivity and specificity at a **site threshold** chosen for sensitivity >= 0.95 on the
  site's own labelled images, always **cross-fitted** (:mod:`cxr_core.stats.crossfit`): chosen
  on four patient-grouped folds, scored on the fifth, pooled, 20 fold draws, the median with a
  patient-clustered interval. A sample with fewer than 10 images of a class is refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.core.records import scoped_patient
from cxr_core.stats import reports
from cxr_core.stats.crossfit import cross_fitted_threshold
from cxr_core.storage import Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import evals as store
from cxr_core.storage.evals import EvaluationInfo

N_BOOT = 500  # patient resamples of the intervals


def _ci(iv: Any) -> list[float] | None:
    return None if iv is None else [iv.low, iv.high]


def _seen_by_card(db: Database, card: Mapping[str, Any], image_ids: list[int],
                  same_folder: bool) -> list[bool]:
    """Per image: seen by a model known only by its card (its training patients, scoped by
    dataset, and the content hashes of its training images)."""
    patients = {scoped_patient(0, p) for role in ("train", "val", "calib")
                for p in (card.get("training_patients") or {}).get(role) or ()}
    hashes = set(card.get("training_sha256") or ())
    with db.session() as s:
        recs = {r.id: r for r in ds_store.get_images(session=s, image_ids=image_ids)}
    out = []
    for i in image_ids:
        r = recs.get(i)
        if r is None:
            out.append(False)
            continue
        key = scoped_patient(0 if same_folder else r.dataset_id, r.patient)
        out.append((key is not None and key in patients)
                   or (r.sha256 is not None and r.sha256[:16] in hashes))
    return out


def _seen(db: Database, info: EvaluationInfo, image_ids: list[int], *,
          card: Mapping[str, Any] | None, same_folder: bool) -> list[bool]:
    if info.run_id is not None:
        with db.session() as s:
            mask = store.run_seen_images(session=s, run_id=info.run_id, image_ids=image_ids)
        if mask is not None:
            return mask
    if card:
        return _seen_by_card(db, card, image_ids, same_folder)
    return [False] * len(image_ids)


def stored_threshold_chosen_here(db: Database, info: EvaluationInfo,
                                 card: Mapping[str, Any] | None = None) -> bool:
    """Whether the threshold this evaluation was scored at was chosen on its own dataset: a
    site threshold recorded for (model, dataset), or a shipped card's operating point chosen
    on a dataset of that name, or of the name its folder gets when indexed without one (the
    same films indexed here under another name, e.g. by a benchmark)."""
    from cxr_core.data.indexing import default_name

    thr = info.metrics.get("threshold")
    if thr is None or info.dataset_id is None:
        return False
    with db.session() as s:
        op = store.site_operating_point(session=s, model_ref=info.model_ref,
                                        dataset_id=info.dataset_id)
        dataset = ds_store.get_dataset(session=s, name_or_id=info.dataset_id)
    if op is not None and abs(op.threshold - float(thr)) < 1e-9:
        return True
    op_card = (card or {}).get("operating_point") or {}
    if op_card.get("chosen_on") != "site" or not op_card.get("dataset"):
        return False
    names = {info.dataset_name, default_name(dataset.root) if dataset is not None else None}
    return op_card["dataset"] in names


def external_entry(db: Database, info: EvaluationInfo, *,
                   card: Mapping[str, Any] | None = None, same_folder: bool = False,
                   n_boot: int = N_BOOT, threshold: float | None = None,
                   chosen_here: bool | None = None) -> dict:
    """A model card's ``measured`` entry (role ``external``) for a stored binary evaluation on
    an external dataset (see the module docstring).

    Args:
        db: the database.
        info: the evaluation (binary, on a dataset flagged external).
        card: the model's card, for a model without recorded run images (the shipped one).
        same_folder: the dataset is the card's own training folder (its file-name patients
            then compare).
        n_boot: patient resamples for the intervals.
        threshold: score the stored-threshold figures at this threshold instead of the one
            the evaluation was stored at (a model exported with another operating point).
        chosen_here: whether that threshold was chosen on this dataset (None: look it up).

    Returns:
        ``{"role": "external", "dataset", "split", "evaluation_id", "n", "n_patients",
        "excluded_seen", "auc", "auc_ci", "threshold", "stored_threshold_chosen_here",
        "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "site_threshold",
        "label_source", "measured_at", "threshold_chosen_here": False}``; the stored-threshold
        figures are None when that threshold was chosen here, ``site_threshold`` is
        :meth:`~cxr_core.stats.crossfit.CrossFit.to_json` or ``{"refused": why}``, and
        ``auc`` is None when no unseen image of each class is left.
    """
    with db.session() as s:
        preds = store.get_predictions(session=s, evaluation_id=info.id)
    if preds is None or len(info.labels) != 2:
        raise ConfigError(f"external figures need a stored binary evaluation. Received: "
                          f"evaluation {info.id}")
    ids = [int(i) if i is not None else -1 for i in preds.image_ids]
    seen = np.array(_seen(db, info, ids, card=card, same_folder=same_folder), dtype=bool)
    keep = ~seen
    y, p = preds.y_true[keep], preds.probs[keep]
    with db.session() as s:
        recs = {r.id: r for r in ds_store.get_images(session=s, image_ids=[i for i in ids if i >= 0])}
    groups = [recs[i].patient if i in recs else None for i, k in zip(ids, keep) if k]
    if chosen_here is None:
        chosen_here = stored_threshold_chosen_here(db, info, card)
    thr = info.metrics.get("threshold") if threshold is None else float(threshold)
    entry: dict[str, Any] = {
        "role": "external", "dataset": info.dataset_name, "split": info.split or "(all)",
        "evaluation_id": info.id, "n": int(keep.sum()),
        "n_patients": len({g for g in groups if g}) + sum(1 for g in groups if not g),
        "excluded_seen": int(seen.sum()), "threshold": thr,
        "stored_threshold_chosen_here": chosen_here, "threshold_chosen_here": False,
        "label_source": info.label_source,
        "measured_at": info.created_at.isoformat() if info.created_at else None,
        "auc": None, "auc_ci": None, "sensitivity": None, "sensitivity_ci": None,
        "specificity": None, "specificity_ci": None, "site_threshold": None,
    }
    if y.size == 0 or np.bincount(y, minlength=2).min() == 0:
        entry["site_threshold"] = {"refused": "no unseen image of each class"}
        return entry
    rep = reports.evaluate(y, p, list(info.labels), threshold=thr if thr is not None else 0.5,
                           n_boot=n_boot, groups=groups)
    ci = rep.ci or {}
    entry.update(auc=rep.auc, auc_ci=_ci(ci.get("auc")))
    if not chosen_here and thr is not None:
        entry.update(sensitivity=rep.sensitivity, sensitivity_ci=_ci(ci.get("sensitivity")),
                     specificity=rep.specificity, specificity_ci=_ci(ci.get("specificity")))
    try:
        entry["site_threshold"] = cross_fitted_threshold(y, p[:, 1], groups,
                                                         n_boot=n_boot).to_json()
    except ConfigError as exc:
        entry["site_threshold"] = {"refused": str(exc)}
    return entry
