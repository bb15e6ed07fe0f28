"""Evaluations and operating points as user actions: compute, store, read back.

:mod:`cxr_core.evaluation` computes (pure numpy); this module ties it to the database
(:mod:`cxr_core.storage.evals`), to models (:mod:`cxr_core.model_store`) and to datasets
(the one tf.data pipeline). Pages and the CLI call these functions.

Operating points: a run's threshold is chosen on validation outputs
(:func:`set_operating_point`, usually by training) or set by a person
(:func:`set_manual_threshold`, an explicit, recorded action). Both append a row; the newest
row is the run's operating point, used by Compare, Predict and :func:`model_store.decide`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core import evaluation as ev
from cxr_core import eval_tables, metrics, paired
from cxr_core import provenance
from cxr_core.errors import ConfigError, DatasetError, RunError
from cxr_core.storage import Database
from cxr_core.storage import evals as store
from cxr_core.thresholds import choose_threshold, matched_thresholds
from cxr_core.storage.evals import EvalPredictions, EvaluationInfo, OperatingPoint, RunBrief

__all__ = [
    "ComparableGroup",
    "Comparison",
    "EvalPredictions",
    "EvaluationInfo",
    "OperatingPoint",
    "RunBrief",
    "compare_evaluations",
    "comparable_groups",
    "EvalOutcome",
    "evaluate_cli",
    "evaluate_dataset",
    "evaluate_model",
    "get_operating_point",
    "images_key",
    "list_evaluations",
    "list_runs",
    "load_predictions",
    "operating_point_history",
    "record_evaluation",
    "send_disagreement_to_review",
    "set_manual_threshold",
    "set_operating_point",
]

Progress = Callable[[int, int], None]
CLI_N_BOOT = 1000  # bootstrap resamples for the 95% intervals


# -- Recording ------------------------------------------------------------------------------

def images_key(image_ids: Sequence[int | None], paths: Sequence[str]) -> str:
    """sha256 of the ordered images: the DB id where indexed, else the path.

    Two evaluations with the same key ran on the same images in the same order, so their
    per-image outputs can be compared (McNemar, disagreements).
    """
    ids = [f"id:{int(i)}" if i is not None else f"path:{p}" for i, p in zip(image_ids, paths)]
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()


def _check_outputs(labels: Sequence[str], image_ids: Sequence[int | None], paths: Sequence[str],
                   y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    n = len(y)
    if not (len(image_ids) == len(paths) == n == len(p)) or p.shape[1] != len(labels):
        raise ConfigError(
            f"need one image id, path, label and probability row per image and {len(labels)} "
            f"probability columns (one per label). Received: {len(image_ids)} ids, "
            f"{len(paths)} paths, {n} labels, probs shape {p.shape}")
    return y, p


def record_evaluation(db: Database, *, run_id: int | None, model_ref: str,
                      dataset_id: int | None, split: str, labels: list[str],
                      image_ids: list[int | None], paths: list[str], y_true: np.ndarray,
                      probs: np.ndarray, threshold: float | None = None, source: str = "",
                      n_boot: int = CLI_N_BOOT, truth: provenance.Truth | None = None,
                      groups: Sequence[str | None] | None = None,
                      overlap: dict | None = None) -> int:
    """Compute and store an evaluation with its per-image outputs.

    The stored metrics are at the run's operating point when it has one (else at
    ``threshold``, else 0.5 for binary; multi-class uses the argmax).

    Args:
        db: the database.
        run_id: the run evaluated, or None for a file/default model.
        model_ref: "run:ID", "default" or a .keras path.
        dataset_id: the indexed dataset, or None.
        split: the split evaluated ("" for all).
        labels: class names in probability-column order.
        image_ids: DB image id per image (None when not indexed).
        paths: file path (or ``npz:split:i``) per image.
        y_true: (N,) class indices.
        probs: (N, C) probabilities (or (N,) positive-class probabilities).
        threshold: binary threshold when the run has no stored operating point.
        source: the path evaluated, when known.
        n_boot: bootstrap resamples for the intervals in the metrics.
        truth: the label version ``y_true`` comes from (stored as the evaluation's label
            provenance); None when the labels came from elsewhere (not re-derivable).
        groups: patient per image: the intervals resample patients (else images).
        overlap: :meth:`RunOverlap.to_dict` of the evaluated images with the run's own.

    Returns:
        The evaluation id.

    Raises:
        ConfigError: inconsistent lengths/shapes or invalid probabilities.
    """
    return _record(db, run_id=run_id, model_ref=model_ref, dataset_id=dataset_id, split=split,
                   labels=labels, image_ids=image_ids, paths=paths, y_true=y_true, probs=probs,
                   threshold=threshold, source=source, n_boot=n_boot, truth=truth,
                   groups=groups, overlap=overlap)[0]


def _record(db: Database, *, run_id: int | None, model_ref: str, dataset_id: int | None,
            split: str, labels: list[str], image_ids: list[int | None], paths: list[str],
            y_true: np.ndarray, probs: np.ndarray, threshold: float | None, source: str,
            n_boot: int, truth: provenance.Truth | None = None,
            groups: Sequence[str | None] | None = None,
            overlap: dict | None = None) -> tuple[int, ev.EvalReport]:
    y, p = _check_outputs(labels, image_ids, paths, y_true, probs)
    if truth is not None and not np.array_equal(truth.y, y):
        raise ConfigError("y_true does not match the label version it is said to come from "
                          f"({truth.text})")
    if run_id is not None and len(labels) == 2:
        op = get_operating_point(db, run_id)
        threshold = op.threshold if op is not None else threshold
    report = ev.evaluate(y, p, list(labels), threshold=threshold if len(labels) == 2 else None,
                         n_boot=n_boot, groups=groups)
    key = images_key(image_ids, paths)
    prov = {} if truth is None else dict(
        label_source=truth.source, label_scheme=truth.scheme, label_hash=truth.hash,
        label_relabel_id=truth.relabel_id)

    def write(s) -> int:
        return store.add_evaluation(session=s, run_id=run_id, model_ref=model_ref,
                                    dataset_id=dataset_id, split=split or "", source=source,
                                    labels=labels, images_key=key, metrics=report.to_dict(),
                                    image_ids=image_ids, paths=paths, y_true=y, probs=p,
                                    overlap=overlap, **prov)
    return db.write(write), report


def patients_of(db: Database, image_ids: Sequence[int | None]) -> list[str | None] | None:
    """The patient of each image (None where unknown), or None when no image has one: the
    bootstrap then resamples images."""
    from cxr_core.storage import datasets as ds_store

    ids = [i for i in image_ids if i is not None]
    with db.session() as s:
        found = {r.id: r.patient for r in ds_store.get_images(session=s, image_ids=ids)}
    patients = [found.get(i) if i is not None else None for i in image_ids]
    return patients if any(patients) else None


# -- Operating points -----------------------------------------------------------------------

def _require_run(db: Database, run_id: int) -> None:
    with db.session() as s:
        if store.get_run_brief(session=s, run_id=run_id) is None:
            raise RunError(f"no run with id {run_id}. Received: run_id={run_id}")


def set_operating_point(db: Database, *, run_id: int, y_true: Any, p_pos: Any,
                        method: str = "sensitivity", target: float = 0.95,
                        changed_by: str = "system", note: str = "") -> OperatingPoint:
    """Choose a threshold on validation outputs and make it the run's operating point.

    Args:
        db: the database.
        run_id: the run.
        y_true: binary validation labels (1 = positive).
        p_pos: positive-class probabilities (N,) or (N, 2).
        method: "sensitivity" (highest threshold reaching ``target``) or "youden".
        target: target sensitivity for method "sensitivity".
        changed_by: who (or what) set it.
        note: why.

    Returns:
        The stored operating point (sensitivity/specificity reached on these data).

    Raises:
        ConfigError: bad inputs, multi-class probabilities or unknown method.
        RunError: no such run.
    """
    chosen = choose_threshold(y_true, p_pos, method=method,  # type: ignore[arg-type]
                              target_sensitivity=target)
    _require_run(db, run_id)
    return db.write(lambda s: store.add_operating_point(
        session=s, run_id=run_id, threshold=chosen.threshold, method=chosen.method,
        target=chosen.target, sensitivity=chosen.sensitivity, specificity=chosen.specificity,
        changed_by=changed_by or "system", note=note))


def set_manual_threshold(db: Database, *, run_id: int, threshold: float, changed_by: str,
                         note: str = "", evaluation_id: int | None = None) -> OperatingPoint:
    """A person sets the run's threshold by hand: recorded with who, when and why.

    Args:
        db: the database.
        run_id: the run.
        threshold: the new binary threshold (positive iff p >= threshold), in [0, 1].
        changed_by: the person's name (required: this is an accountable action).
        note: the reason.
        evaluation_id: optionally, a stored binary evaluation of this run on which the
            sensitivity/specificity at the new threshold are computed and recorded.

    Returns:
        The new operating point.

    Raises:
        ConfigError: empty name, threshold outside [0, 1], or an evaluation that is not
            a binary evaluation of this run.
        RunError: no such run.
    """
    if not (changed_by or "").strip():
        raise ConfigError("changing a run's threshold needs the name of who changes it. "
                          f"Received: changed_by={changed_by!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    _require_run(db, run_id)
    sens = spec = None
    if evaluation_id is not None:
        sens, spec = _sens_spec_at(db, run_id, evaluation_id, float(threshold))
    return db.write(lambda s: store.add_operating_point(
        session=s, run_id=run_id, threshold=float(threshold), method="manual", target=None,
        sensitivity=sens, specificity=spec, changed_by=changed_by.strip(), note=note))


def _sens_spec_at(db: Database, run_id: int, evaluation_id: int,
                  threshold: float) -> tuple[float, float]:
    with db.session() as s:
        info = store.get_evaluation(session=s, evaluation_id=evaluation_id)
        preds = store.get_predictions(session=s, evaluation_id=evaluation_id)
    if info is None or preds is None or info.run_id != run_id or len(info.labels) != 2:
        raise ConfigError(f"evaluation {evaluation_id} is not a binary evaluation of run "
                          f"{run_id}. Received: evaluation_id={evaluation_id}")
    pred = (preds.probs[:, metrics.POSITIVE] >= threshold).astype(np.int64)
    y = preds.y_true
    pos, neg = y == metrics.POSITIVE, y != metrics.POSITIVE
    sens = float(np.mean(pred[pos] == 1)) if pos.any() else float("nan")
    spec = float(np.mean(pred[neg] == 0)) if neg.any() else float("nan")
    return sens, spec


def get_operating_point(db: Database, run_id: int) -> OperatingPoint | None:
    """The run's operating point (the newest history row), or None when it has none."""
    with db.session() as s:
        return store.latest_operating_point(session=s, run_id=run_id)


def operating_point_history(db: Database, run_id: int) -> list[OperatingPoint]:
    """Every threshold the run has had, newest first (the first one is in force)."""
    with db.session() as s:
        return store.operating_points(session=s, run_id=run_id)


# -- Reading evaluations back ---------------------------------------------------------------

def list_evaluations(db: Database, *, run_id: int | None = None,
                     images_key: str | None = None) -> list[EvaluationInfo]:
    """Stored evaluations, newest first."""
    with db.session() as s:
        return store.list_evaluations(session=s, run_id=run_id, images_key=images_key)


def load_predictions(db: Database, evaluation_id: int) -> EvalPredictions:
    """Per-image outputs of an evaluation.

    Raises:
        DatasetError: no such evaluation.
    """
    with db.session() as s:
        preds = store.get_predictions(session=s, evaluation_id=evaluation_id)
    if preds is None:
        raise DatasetError(f"no evaluation with id {evaluation_id}")
    return preds


def list_runs(db: Database, *, status: str | None = "finished") -> list[store.RunBrief]:
    """Runs that can be evaluated (finished ones by default), newest first."""
    with db.session() as s:
        return store.list_run_briefs(session=s, status=status)


@dataclass(frozen=True)
class ComparableGroup:
    """Evaluations of different models on the same images in the same order."""

    images_key: str
    evaluations: tuple[EvaluationInfo, ...]  # newest first, one per model

    @property
    def labels(self) -> tuple[str, ...]:
        return self.evaluations[0].labels

    @property
    def label(self) -> str:
        """e.g. ``chest_xray [test] · 624 images · 3 models``."""
        e = self.evaluations[0]
        where = e.dataset_name or Path(e.source).name or "images"
        return (f"{where} [{e.split or 'all'}] · {e.n} images · "
                f"{len(self.evaluations)} models")


def comparable_groups(db: Database, *, min_size: int = 2) -> list[ComparableGroup]:
    """Evaluations grouped by image set (same images, same order), largest group first.

    Within a group the newest evaluation of each model is kept (re-evaluating a run on the
    same images replaces the older result for comparison).
    """
    groups: dict[str, list[EvaluationInfo]] = {}
    for e in list_evaluations(db):  # newest first
        group = groups.setdefault(e.images_key, [])
        if all(g.model_ref != e.model_ref for g in group):
            group.append(e)
    out = [ComparableGroup(k, tuple(g)) for k, g in groups.items() if len(g) >= min_size]
    return sorted(out, key=lambda g: (-len(g.evaluations), -g.evaluations[0].id))


# -- Evaluating a model on a dataset --------------------------------------------------------

@dataclass(frozen=True)
class EvalOutcome:
    """What :func:`evaluate_dataset` did (``evaluate_model`` returns the first two)."""

    evaluation_id: int
    report: ev.EvalReport
    model_ref: str
    threshold_source: str
    dataset: str
    split: str
    skipped: int  # images left out: unreadable, or no class under the model's label scheme
    truth: provenance.Truth | None = None  # the labels it was scored against
    overlap: dict | None = None  # evaluated images / patients the run trained or selected on

    @property
    def warnings(self) -> list[str]:
        warning = provenance.overlap_warning(self.overlap, self.report.n)
        return [warning] if warning else []

def _split_of(data: str, split: str | None) -> tuple[str, str | None]:
    """A path to one split folder (``.../test``) means its dataset, that split.

    The dataset is opened at the parent folder: indexing the split folder itself would
    index only that split and drop the other splits' rows from an existing index.
    """
    from cxr_core.datasets import SPLIT_NAMES

    path = Path(data).expanduser()
    if path.is_dir() and path.name.lower() in SPLIT_NAMES:
        if split not in (None, path.name.lower()):
            raise DatasetError(f"--data names the {path.name!r} split folder but split={split!r} "
                               f"was asked. Received: {data}")
        return str(path.parent), path.name.lower()
    return data, split


def _targets(records: list, labels: tuple[str, ...], scheme: str,
             current: dict[int, tuple[str, str | None]]) -> tuple[list, list[int]]:
    """Records that map to one of the model's classes, with their class indices."""
    from cxr_core.datasets import scheme_label

    kept, y = [], []
    for r in records:
        label, subtype = current.get(r.id, (r.label, r.subtype))
        name = scheme_label(label, subtype, scheme)
        if name in labels:
            kept.append(r)
            y.append(labels.index(name))
    return kept, y


def _cache(info: Any, records: list, y: list[int], loaded: Any, progress: Progress | None):
    """The resized uint8 cache of the images (the one pipeline), and the records kept."""
    from cxr_core import pipeline
    from cxr_core.config import get_settings

    root = get_settings().cache_dir
    if info.layout == "npz":
        images = pipeline.npz_record_images(info.root, records)
        cache = pipeline.build_cache_from_arrays(
            images, np.array(y), dataset_key=f"dataset:{info.id}", image_size=loaded.image_size,
            channels=loaded.channels, cache_root=root, progress=progress)
        return cache, records
    items = [pipeline.CacheItem(str(Path(info.root) / r.relpath), yi, f"{r.id}:{r.sha256}")
             for r, yi in zip(records, y)]
    cache = pipeline.build_cache(items, dataset_key=f"dataset:{info.id}",
                                 image_size=loaded.image_size, channels=loaded.channels,
                                 cache_root=root, progress=progress)
    bad = {item.id for item, _ in cache.skipped}
    return cache, [r for r, it in zip(records, items) if it.id not in bad]


def _predict_cache(loaded: Any, cache: Any, progress: Progress | None,
                   batch_size: int = 32) -> np.ndarray:
    from cxr_core import model_store, pipeline

    ds = pipeline.make_dataset(cache, batch_size=batch_size, shuffle=False, seed=0,
                               channels=loaded.channels)
    out, done = [], 0
    for x, _ in ds:
        out.append(np.asarray(loaded.model.predict_on_batch(x)))
        done += int(x.shape[0])
        if progress is not None:
            progress(done, cache.n)
    return model_store.to_probs(np.concatenate(out))


def evaluate_dataset(db: Database, model_ref: str, data: str, *, split: str | None = None,
                     progress: Progress | None = None, n_boot: int = CLI_N_BOOT,
                     labels: str = "current") -> EvalOutcome:
    """:func:`evaluate_model` with the details the CLI prints (see there)."""
    from cxr_core import model_store
    from cxr_core.indexing import open_dataset

    loaded = model_store.load_model_ref(model_ref, db=db)
    where, split = _split_of(str(data), split)
    info, records = open_dataset(db, where)
    usable = [r for r in records if not r.error and (split is None or r.split == split)]
    if not usable and split is None:  # "for split None" said nothing
        raise DatasetError(f"no readable images in {info.name!r} ({info.root}): all "
                           f"{len(records)} files are unreadable")
    if not usable:
        splits = sorted({r.split or '""' for r in records})
        raise DatasetError(f"no readable images in {info.name!r} for split {split!r}. "
                           f"Expected one of the splits {splits}")
    provenance.check_source(labels)
    with db.session() as s:
        label_map, relabel_id = provenance.dataset_labels(s, info.id, labels)
    kept, y = _targets(usable, loaded.labels, loaded.label_scheme, label_map)
    if not kept:
        raise DatasetError(f"no image of {info.name!r} has one of the model's classes "
                           f"{list(loaded.labels)} (label scheme {loaded.label_scheme!r}). "
                           f"Received classes: {sorted({r.label for r in usable})}")
    cache, kept = _cache(info, kept, y, loaded, progress)
    probs = _predict_cache(loaded, cache, progress)
    y_true = cache.labels()
    paths = [r.relpath if info.layout == "npz" else str(Path(info.root) / r.relpath) for r in kept]
    ids = [r.id for r in kept]
    truth = provenance.make_truth(label_map, ids, loaded.labels, loaded.label_scheme, labels,
                                  relabel_id)
    overlap = None
    if loaded.run_id is not None:
        with db.session() as s:
            overlap = store.run_overlap(session=s, run_id=loaded.run_id, image_ids=ids).to_dict()
    patients = [r.patient for r in kept]
    eval_id, report = _record(
        db, run_id=loaded.run_id, model_ref=loaded.ref, dataset_id=info.id, split=split or "",
        labels=list(loaded.labels), image_ids=ids, paths=paths, y_true=y_true,
        probs=probs, threshold=loaded.threshold, source=str(data), n_boot=n_boot, truth=truth,
        groups=patients if any(patients) else None, overlap=overlap)
    return EvalOutcome(eval_id, report, loaded.ref, loaded.threshold_source, info.name,
                       split or "", len(usable) - len(kept), truth, overlap)


def evaluate_model(db: Database, model_ref: str, data: str, *, split: str | None = None,
                   progress: Progress | None = None,
                   labels: str = "current") -> tuple[int, ev.EvalReport]:
    """Evaluate a model on a dataset and store the result with per-image outputs.

    Args:
        db: the database.
        model_ref: "run:ID", "ID", "default" or a .keras path.
        data: an indexed dataset name, or a path (any supported folder layout or a
            PneumoniaMNIST .npz); a path not yet indexed is indexed first. A path to one
            split folder (``.../test``) evaluates that split.
        split: evaluate only this split ("train", "val", "test"); all images when None.
        progress: ``progress(done, total)`` while decoding, then while predicting.
        labels: score against the "current" labels (relabels applied; default) or the
            "original" folder labels; stored with the evaluation either way.

    Returns:
        (evaluation id, report at the model's stored operating point; its intervals resample
        patients where the images have them).

    Raises:
        ModelError: the model cannot be found or loaded.
        DatasetError: no such dataset, or no usable image for the split / label scheme.
        ConfigError: a class of the model has no image (AUC needs every class).
    """
    out = evaluate_dataset(db, model_ref, data, split=split, progress=progress, labels=labels)
    return out.evaluation_id, out.report


def evaluate_cli(model_ref: str, data_path: str, split: str | None = None,
                 progress: Progress | None = None, labels: str = "current") -> dict:
    """``python -m cxr_core evaluate``: evaluate, store, and return the JSON summary.

    Returns:
        ``{"n", "auc", "accuracy", "sensitivity", "specificity", "threshold",
        "confusion_matrix", "labels"}`` plus ``ci`` (95% bootstrap intervals as [low, high]),
        ``evaluation_id``, ``model``, ``threshold_source``, ``dataset``, ``split``, ``skipped``,
        ``ci_unit`` ("patient" or "image") and ``n_clusters``, ``label_source``,
        ``label_snapshot`` ({hash, relabel_id}), ``overlap`` and ``warnings``.
    """
    from cxr_core.storage import open_db

    out = evaluate_dataset(open_db(), model_ref, data_path, split=split, progress=progress,
                           labels=labels)
    full = out.report.to_dict()
    keys = ("n", "auc", "accuracy", "sensitivity", "specificity", "threshold",
            "confusion_matrix", "labels")
    return {**{k: full[k] for k in keys},
            "ci": {k: [v["low"], v["high"]] for k, v in full["ci"].items()},
            "evaluation_id": out.evaluation_id, "model": out.model_ref,
            "threshold_source": out.threshold_source, "dataset": out.dataset,
            "split": out.split, "skipped": out.skipped, "ci_unit": full.get("ci_unit"),
            "n_clusters": full.get("n_clusters"), "label_source": out.truth.source,
            "label_snapshot": {"hash": out.truth.hash, "relabel_id": out.truth.relabel_id},
            "overlap": out.overlap, "warnings": out.warnings}


# -- Comparing evaluations on the same images -----------------------------------------------

@dataclass(frozen=True, eq=False)
class Comparison:
    """2–4 evaluations on the same images, evaluated at comparable thresholds.

    Every dict is keyed by the evaluation's display name (``names`` order).
    """

    names: tuple[str, ...]
    evaluations: dict[str, EvaluationInfo]
    labels: tuple[str, ...]
    mode: str  # "operating_point" | "matched"
    target: float | None  # matched sensitivity, for mode "matched"
    thresholds: dict[str, float | None]  # None = argmax (multi-class)
    threshold_sources: dict[str, str]
    reports: dict[str, ev.EvalReport]
    predictions: dict[str, np.ndarray]  # (N,) predicted class indices
    probs: dict[str, np.ndarray]  # (N, C)
    y_true: np.ndarray
    image_ids: tuple[int | None, ...]
    paths: tuple[str, ...]
    truth_source: str = "stored"  # "current" | "original" | "stored" (not re-derivable)
    truth_text: str = ""  # which labels every number of the comparison uses
    dropped: int = 0  # images left out: no class under the chosen labels
    ci_unit: str | None = None  # "patient" | "image"

    @property
    def provenance_rows(self) -> list[dict]:
        """Per evaluation: the labels it was stored with, and what Compare scores it against."""
        return [{"evaluation": n, "stored against": e.labels_text,
                 "compared against": self.truth_text,
                 "warning": provenance.overlap_warning(e.overlap, e.n) or ""}
                for n, e in self.evaluations.items()]

    def mcnemar_rows(self) -> list[dict]:
        """McNemar's test for every pair of runs (one row for two runs)."""
        rows = []
        for i, a in enumerate(self.names):
            for b in self.names[i + 1:]:
                res = paired.mcnemar(self.y_true, self.predictions[a], self.predictions[b])
                rows.append({"run A": a, "run B": b, "A right, B wrong": res.b,
                             "A wrong, B right": res.c, "statistic": res.statistic,
                             "p_value": res.p_value, "test": res.method})
        return rows

    def disagreement_rows(self, *, with_truth: bool = False) -> list[dict]:
        """Images on which the runs disagree: truth, each run's prediction and P(class)."""
        idx = paired.disagreements(self.y_true, self.predictions, with_truth=with_truth)
        rows = []
        for i in idx:
            row = {"index": int(i), "image_id": self.image_ids[i], "path": self.paths[i],
                   "truth": self.labels[int(self.y_true[i])]}
            for name in self.names:
                row[name] = self.labels[int(self.predictions[name][i])]
                row[f"{name} probs"] = [float(v) for v in self.probs[name][i]]
            row["summary"] = " · ".join([f"truth **{row['truth']}**"] + [
                f"{n}: {row[n]}" for n in self.names])  # markdown caption for the image grid
            rows.append(row)
        return rows

    def metrics_rows(self) -> list[dict]:
        """Top-level metrics with their 95% intervals, one row per (run, metric)."""
        return [r for r in eval_tables.metrics_table(self.reports) if r["class"] == "all"]

    def metrics_text(self) -> list[dict]:
        """One row per metric, one column per run: ``"0.912 (0.880–0.940)"`` for display."""
        table: dict[str, dict] = {}
        for r in self.metrics_rows():
            ci = f" ({r['low']:.3f}–{r['high']:.3f})" if r["low"] is not None else ""
            value = "n/a" if r["value"] is None or np.isnan(r["value"]) else f"{r['value']:.3f}"
            table.setdefault(r["metric"], {"metric": r["metric"]})[r["run"]] = value + ci
        return list(table.values())

    def review_payload(self, row: dict) -> dict:
        """What Compare sends to review for a disagreement row: the first run that is wrong
        on the image (else the first run), with its prediction and probabilities."""
        name = next((n for n in self.names if row[n] != row["truth"]), self.names[0])
        return {"image_id": row["image_id"], "run_ref": self.evaluations[name].model_ref,
                "predicted": row[name], "probs": row[f"{name} probs"]}


def _display_names(infos: list[EvaluationInfo]) -> list[str]:
    names = [e.run_name or Path(e.model_ref).name for e in infos]
    return [n if names.count(n) == 1 else f"{n} (#{e.id})" for n, e in zip(names, infos)]


def _stored_threshold(db: Database, info: EvaluationInfo) -> tuple[float | None, str]:
    if len(info.labels) != 2:
        return None, "argmax"
    if info.run_id is not None:
        op = get_operating_point(db, info.run_id)
        if op is not None:
            return op.threshold, f"operating point ({op.method}, {op.changed_by})"
    stored = info.metrics.get("threshold")
    return (float(stored), "at evaluation") if stored is not None else (0.5, "none (0.5)")


def _comparison_truth(db: Database, infos: list[EvaluationInfo], preds: list[EvalPredictions],
                      truth: str) -> tuple[np.ndarray, str, str]:
    """(y, source, text): the truth every compared number uses.

    Indexed images: re-derived from the chosen label version, for every evaluation alike.
    Otherwise the stored truths must be identical (same labels), and are used as stored.
    """
    provenance.check_source(truth)
    labels = infos[0].labels
    if all(i is not None for i in preds[0].image_ids):
        schemes = {e.label_scheme or provenance.infer_scheme(labels) for e in infos}
        if len(schemes) != 1:
            raise ConfigError("these evaluations map folder labels to classes differently "
                              f"(label schemes {sorted(schemes)}); compare one scheme at a time")
        with db.session() as s:
            t = provenance.truth_of(s, preds[0].image_ids, labels, schemes.pop(), truth)
        return t.y, truth, t.text
    hashes = {e.label_hash for e in infos}
    if any(not np.array_equal(p.y_true, preds[0].y_true) for p in preds) or len(hashes) > 1:
        got = [(e.id, e.labels_text) for e in infos]
        raise ConfigError("these evaluations were scored against different labels and their "
                          "images are not indexed, so the labels cannot be re-derived; "
                          f"compare evaluations scored against the same labels. Received: {got}")
    return preds[0].y_true, "stored", ("labels stored with the evaluations (images not "
                                       f"indexed: {infos[0].labels_text})")


def compare_evaluations(db: Database, evaluation_ids: Sequence[int], *,
                        mode: str = "operating_point", target: float = 0.95,
                        n_boot: int = 500, truth: str = "current") -> Comparison:
    """Evaluate 2–4 stored evaluations of the same images at comparable thresholds.

    Args:
        db: the database.
        evaluation_ids: 2 to 4 evaluations with the same ``images_key`` and labels.
        mode: "operating_point" (each run's stored operating point) or "matched" (each run
            at the threshold reaching the same sensitivity ``target`` on these images; binary).
        target: the matched sensitivity, in (0, 1].
        n_boot: bootstrap resamples for the 95% intervals (patients where known).
        truth: score every evaluation against the "current" labels (relabels up to now) or
            the "original" folder labels, re-derived per image; evaluations of images that
            are not indexed must have been scored against identical labels.

    Returns:
        The comparison; ``truth_text`` says which labels every number uses.

    Raises:
        ConfigError: fewer than 2 or more than 4 evaluations, different images or labels,
            an unknown mode or label version, or "matched" for a multi-class comparison.
    """
    ids = list(dict.fromkeys(int(i) for i in evaluation_ids))
    if not 2 <= len(ids) <= 4:
        raise ConfigError(f"compare 2 to 4 evaluations. Received: {len(ids)} ({ids})")
    if mode not in ("operating_point", "matched"):
        raise ConfigError(f"mode must be 'operating_point' or 'matched'. Received: mode={mode!r}")
    with db.session() as s:
        infos = [store.get_evaluation(session=s, evaluation_id=i) for i in ids]
        preds = [store.get_predictions(session=s, evaluation_id=i) for i in ids]
    if any(i is None for i in infos):
        missing = [i for i, e in zip(ids, infos) if e is None]
        raise ConfigError(f"no evaluation with id(s) {missing}. Received: {ids}")
    if len({e.images_key for e in infos}) != 1 or len({e.labels for e in infos}) != 1:
        got = [(e.id, e.images_key[:8], e.labels) for e in infos]
        raise ConfigError("evaluations can only be compared on the same images with the same "
                          f"labels. Received (id, images key, labels): {got}")
    labels = infos[0].labels
    if mode == "matched" and len(labels) != 2:
        raise ConfigError("matched sensitivity needs binary models; multi-class compares at "
                          f"the argmax. Received: labels={list(labels)}")
    names = _display_names(infos)
    y, source, text = _comparison_truth(db, infos, preds, truth)
    keep = y >= 0  # images with no class under the chosen labels are left out of every run
    y = y[keep]
    probs = {n: p.probs[keep] for n, p in zip(names, preds)}
    image_ids = tuple(i for i, k in zip(preds[0].image_ids, keep) if k)
    paths = tuple(p for p, k in zip(preds[0].paths, keep) if k)
    groups = patients_of(db, image_ids)
    if mode == "matched":
        thresholds: dict[str, float | None] = dict(matched_thresholds(y, probs, target))
        sources = {n: f"matched sensitivity {target:.2f}" for n in names}
    else:
        pairs = {n: _stored_threshold(db, e) for n, e in zip(names, infos)}
        thresholds = {n: t for n, (t, _) in pairs.items()}
        sources = {n: src for n, (_, src) in pairs.items()}
    reports = {n: ev.evaluate(y, probs[n], list(labels), threshold=thresholds[n], n_boot=n_boot,
                              groups=groups) for n in names}
    predictions = {n: metrics.predict(probs[n], threshold=thresholds[n]) for n in names}
    return Comparison(tuple(names), dict(zip(names, infos)), labels, mode,
                      target if mode == "matched" else None, thresholds, sources, reports,
                      predictions, probs, y, image_ids, paths, source, text,
                      int((~keep).sum()), "patient" if groups else "image")


def send_disagreement_to_review(db: Database, *, image_id: int, run_ref: str, predicted: str,
                                probs: Sequence[float], sent_by: str) -> int:
    """Queue an image the compared runs disagree on for clinician review (source "compare").

    Returns:
        The review item id.
    """
    from cxr_core.storage import reviews

    return db.write(lambda s: reviews.send_to_review(
        session=s, image_id=int(image_id), upload_sha256=None, source="compare",
        run_ref=run_ref, predicted=predicted, probs=list(probs), sent_by=sent_by))
