"""Evaluations as user actions: evaluate a model on a dataset, record the result with its
per-image outputs, read stored evaluations back.

:mod:`cxr_core.stats.reports` computes (pure numpy); this module ties it to the database
(:mod:`cxr_core.storage.evals`), to models (:mod:`cxr_core.models.store`) and to datasets
(the one tf.data pipeline, imported only when a model is evaluated). The stored metrics are
at the run's operating point (:mod:`cxr_core.evaluation.operating_points`); comparing stored
evaluations is :mod:`cxr_core.evaluation.compare`. Pages, the CLI and the worker call these.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.data import images as image_io
from cxr_core.data import provenance
from cxr_core.evaluation.operating_points import get_operating_point
from cxr_core.models.store import REPO
from cxr_core.stats import reports as ev
from cxr_core.storage import Database, relabels
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import evals as store
from cxr_core.storage.evals import EvalPredictions, EvaluationInfo, RunBrief

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
    ``threshold``, else 0.5 for binary; multi-class uses the argmax). A binary run's
    ``model_card.json`` is then rewritten with its ``measured`` list
    (:func:`cxr_core.evaluation.card_measured.refresh_run_card`), so the card names every split the run
    was measured on.

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
    # A threshold on three classes is the hierarchical reading (its pneumonia step).
    report = ev.evaluate(y, p, list(labels), threshold=threshold,
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
    evaluation_id = db.write(write)
    if run_id is not None and len(labels) == 2:  # the run's card measures every split
        from cxr_core.evaluation.card_measured import refresh_run_card

        refresh_run_card(db, run_id)
    return evaluation_id, report


def patients_of(db: Database, image_ids: Sequence[int | None]) -> list[str | None] | None:
    """The patient of each image (None where unknown), or None when no image has one: the
    bootstrap then resamples images."""
    with db.session() as s:
        return ds_store.image_patients(session=s, image_ids=image_ids)


def newest_relabel_for(db: Database, evaluation_id: int) -> int | None:
    """The newest relabel row of the dataset an evaluation scored (None: none, or not an
    indexed dataset): labels "as of now" are the labels as of this id."""
    from cxr_core.storage import relabels

    with db.session() as s:
        info = store.get_evaluation(session=s, evaluation_id=evaluation_id)
        if info is None or info.dataset_id is None:
            return None
        return relabels.newest_relabel_id(session=s, dataset_id=info.dataset_id,
                                          include_uploads=False)


# -- Reading evaluations back ---------------------------------------------------------------

def list_evaluations(db: Database, *, run_id: int | None = None,
                     images_key: str | None = None, with_metrics: bool = True,
                     limit: int | None = None, offset: int = 0) -> list[EvaluationInfo]:
    """Stored evaluations, newest first (a page with ``limit``/``offset``)."""
    with db.session() as s:
        return store.list_evaluations(session=s, run_id=run_id, images_key=images_key,
                                      with_metrics=with_metrics, limit=limit, offset=offset)


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


def evaluable_runs(db: Database, *, status: str | None = "finished") -> list[RunBrief]:
    """Runs that can be evaluated (finished ones by default), newest first."""
    with db.session() as s:
        return store.list_run_briefs(session=s, status=status)


def two_step_options(db: Database) -> tuple[dict[str, str], dict[str, str]]:
    """The models a hierarchical three-class reading can be made of (reference -> title):
    binary runs (and the shipped default) for the pneumonia step, ``subtype`` runs for the
    subtype step; finished runs, newest first."""
    from cxr_core.models.store import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
    from cxr_core.storage import runs as run_store

    with db.session() as s:
        runs = run_store.list_runs(session=s, statuses=["finished"])
    pneumonia = {f"run:{r.id}": f"{r.name} (run:{r.id})" for r in runs
                 if (r.config or {}).get("label_scheme", "binary") == "binary"}
    if (DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME).is_file():
        pneumonia["default"] = "Shipped default model"
    subtype = {f"run:{r.id}": f"{r.name} (run:{r.id})" for r in runs
               if (r.config or {}).get("label_scheme") == "subtype"}
    return pneumonia, subtype


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
    from cxr_core.core.labels import SPLIT_NAMES

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
    from cxr_core.core.labels import scheme_label

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
    from cxr_core.core.settings import get_settings
    from cxr_core.data import pipeline

    root = get_settings().cache_dir
    if info.layout == "npz":
        images = image_io.npz_record_images(info.root, records)
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
    from cxr_core.data import pipeline
    from cxr_core.models import store as model_store

    ds = pipeline.make_dataset(cache, batch_size=batch_size, shuffle=False, seed=0,
                               channels=loaded.channels)
    out, done = [], 0
    for x, _ in ds:
        out.append(np.asarray(loaded.model.predict_on_batch(x)))
        done += int(x.shape[0])
        if progress is not None:
            progress(done, cache.n)
    return model_store.outputs(loaded, np.concatenate(out))


def _outputs(info: Any, records: list, y: list[int], loaded: Any,
             progress: Progress | None) -> tuple[np.ndarray, np.ndarray, list]:
    """(probs, y_true, records kept) of a model, or of an ensemble: each member through its
    own cache (its input size and channels), then combined (an ensemble's mean, the
    hierarchical reading's product) over the images every member read."""
    from cxr_core.models import store as model_store

    if not loaded.members:
        cache, kept = _cache(info, records, y, loaded, progress)
        return _predict_cache(loaded, cache, progress), cache.labels(), kept
    outputs = []
    for member in loaded.members:
        cache, kept = _cache(info, records, y, member, progress)
        outputs.append(dict(zip((r.id for r in kept), _predict_cache(member, cache, progress))))
    both = [(r, yi) for r, yi in zip(records, y) if all(r.id in o for o in outputs)]
    probs = model_store.combine_members(loaded, [np.array([o[r.id] for r, _ in both])
                                                 .reshape(len(both), -1) for o in outputs])
    return (probs.reshape(len(both), len(loaded.labels)), np.array([yi for _, yi in both]),
            [r for r, _ in both])


def _same_folder(card: dict, root: str) -> bool:
    """Whether ``root`` is the folder the card says its model was trained on (a relative card
    root is relative to the repository, as the shipped card writes it)."""
    card_root = ((card or {}).get("dataset") or {}).get("root")
    if not card_root:
        return False
    path = Path(card_root)
    path = path if path.is_absolute() else REPO / path
    return path.resolve() == Path(root).resolve()


def _overlap(db: Database, loaded: Any, ids: list[int], patients: list[str | None],
             root: str) -> dict | None:
    """Evaluated images the model (an ensemble: any run member) trained or selected on."""
    from cxr_core.models.ensembles import combined_overlap

    runs = [m.run_id for m in (loaded.members or (loaded,)) if m.run_id is not None]
    if not runs:
        seen = (loaded.card or {}).get("training_patients")
        if not (seen or (loaded.card or {}).get("training_sha256")) or loaded.members:
            return None
        seen = seen or {}
        # a shipped model: its card names the patients it has seen (by id)
        overlap = store.patient_overlap(seen, patients,
                                        same_dataset=_same_folder(loaded.card, root)).to_dict()
        hashes = set((loaded.card or {}).get("training_sha256") or ())
        if hashes:  # byte-identical films are the same films, whatever the dataset
            with db.session() as s:
                recs = ds_store.get_images(session=s, image_ids=ids)
            overlap["same_content"] = sum(1 for r in recs if r.sha256 and r.sha256[:16] in hashes)
        return overlap
    with db.session() as s:
        found = [store.run_overlap(session=s, run_id=r, image_ids=ids).to_dict() for r in runs]
    return found[0] if not loaded.members and found else combined_overlap(found)


def evaluate_dataset(db: Database, model_ref: Any, data: str, *, split: str | None = None,
                     progress: Progress | None = None, n_boot: int = CLI_N_BOOT,
                     labels: str = "current") -> EvalOutcome:
    """:func:`evaluate_model` with the details the CLI prints (see there); ``model_ref`` may
    also be a model already loaded (a :class:`cxr_core.models.store.LoadedModel`)."""
    from cxr_core.data.indexing import open_dataset
    from cxr_core.models import refs

    loaded = (refs.load_model_ref(model_ref, db=db) if isinstance(model_ref, str)
              else model_ref)
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
    as_of = provenance.as_of_relabel_id(labels)
    with db.session() as s:
        version = relabels.label_version(session=s, dataset_id=info.id, as_of_relabel_id=as_of)
    kept, y = _targets(usable, loaded.labels, loaded.label_scheme, version.labels)
    if not kept:
        raise DatasetError(f"no image of {info.name!r} has one of the model's classes "
                           f"{list(loaded.labels)} (label scheme {loaded.label_scheme!r}). "
                           f"Received classes: {sorted({r.label for r in usable})}")
    probs, y_true, kept = _outputs(info, kept, y, loaded, progress)
    paths = [r.relpath if info.layout == "npz" else str(Path(info.root) / r.relpath) for r in kept]
    ids = [r.id for r in kept]
    truth = provenance.make_truth(version.labels, ids, loaded.labels, loaded.label_scheme, labels,
                                  version.newest_relabel_id)
    patients = [r.patient for r in kept]
    overlap = _overlap(db, loaded, ids, patients, info.root)
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
        model_ref: "run:ID", "ID", "default", a .keras path or an ensemble ("ensemble:...",
            scored on the mean of its members' probabilities at its own operating point).
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


def evaluate_loaded(db: Database, loaded: Any, data: str, *,
                    labels: str = "current") -> tuple[int, ev.EvalReport]:
    """:func:`evaluate_model` of a model already loaded (e.g. one about to be shipped)."""
    out = evaluate_dataset(db, loaded, data, labels=labels)
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
