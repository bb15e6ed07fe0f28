"""A run's inputs read from the index: its images, the labels it trains on (original, or
current as of a relabel id, with the label snapshot's hash) and the patient-grouped
train/validation split. Test-folder images are never used. No TensorFlow here.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.core import labels as ds
from cxr_core.core.errors import ConfigError, DatasetError, RunError
from cxr_core.core.settings import get_settings
from cxr_core.data import images as image_io
from cxr_core.data import provenance
from cxr_core.data.calibration import carve_calibration
from cxr_core.data.indexing import find_dataset, open_dataset
from cxr_core.data.splits import make_split
from cxr_core.models.store import RUN_MODEL_NAME
from cxr_core.storage import Database, review_queue
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import label_audits as audit_store
from cxr_core.storage import runs as store
from cxr_core.storage.relabels import LabelSnapshot, label_version


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A run's inputs and where they came from (for the run row and the model card)."""

    data: Any  # train_io.TrainData
    dataset_id: int
    dataset_name: str
    dataset_root: str
    snapshot: LabelSnapshot
    counts: dict[str, dict[str, int]]  # split -> class -> images
    excluded: int  # unreadable, test-split, unlabelled or subsampled-out images
    # The calibration slice (cxr_core.data.calibration): validation images kept out of training
    # and model selection, predicted after training to choose the threshold on.
    calibration: tuple = ()  # ImageRecords
    calibration_skipped: str | None = None  # why there is none (fraction 0, too small a val)
    # Per extra dataset (cfg.extra): its name, images taken per part, label snapshot, repeat.
    extra: tuple[dict, ...] = ()
    # A label audit's fold run (cfg.holdout): the fold it holds out, predicted after training.
    holdout: tuple = ()  # ImageRecords
    # Images the scheme gives no class, by why (e.g. PNEUMONIA without a stated subtype in a
    # three-class run): left out, and the run's log says how many.
    unlabelled: dict[str, int] = field(default_factory=dict)


def _subsample(idx: list[int], labels: list[str], n: int, seed: int) -> list[int]:
    """A stratified, seeded subset of about ``n`` indices (at least 2 per class)."""
    if n >= len(idx):
        return idx
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        by_class[labels[i]].append(i)
    out: list[int] = []
    for members in by_class.values():
        k = min(len(members), max(2, round(n * len(members) / len(idx))))
        out.extend(rng.choice(members, k, replace=False).tolist())
    return sorted(out)


def _read_labels(db: Database, cfg: Any, info: Any,
                 relabel_id: int | None) -> tuple[LabelSnapshot, dict]:
    """The label snapshot and image_id -> (label, subtype) the run trains on, derived once
    (labels and hash from the same relabel rows)."""
    with db.session() as s:
        version = label_version(session=s, dataset_id=info.id,
                                as_of_relabel_id=provenance.as_of_relabel_id(
                                    cfg.label_source, relabel_id))
    return version.snapshot(), version.labels


def _usable(cfg: Any, info: Any, records: list, label_map: dict) -> tuple[list[int], list[str],
                                                                         list[str]]:
    """(indices of the records a run draws its split from, every record's label under the
    run's scheme, the scheme's classes): labelled, readable, outside the test folder, then the
    ``max_images`` subsample."""
    classes = ds.scheme_classes(cfg.label_scheme, info.classes)
    names = [ds.scheme_label(*label_map.get(r.id, (r.label, r.subtype)), cfg.label_scheme)
             for r in records]
    usable = [i for i, (r, y) in enumerate(zip(records, names))
              if y in classes and not r.error and r.split != "test"]
    if cfg.max_images is not None:
        usable = _subsample(usable, names, cfg.max_images, cfg.split_seed)
    return usable, names, classes


def unlabelled_reasons(cfg: Any, info: Any, records: list, label_map: dict) -> dict[str, int]:
    """Images outside the test folder that the run's scheme gives no class, counted by why:
    a three-class (or subtype) run leaves out pneumonia whose subtype nobody stated (a
    reviewer's "PNEUMONIA (subtype not stated)", or a file name without one): nothing guesses
    it."""
    out: Counter = Counter()
    for r in records:
        if r.error or r.split == "test":
            continue
        label, subtype = label_map.get(r.id, (r.label, r.subtype))
        if ds.scheme_label(label, subtype, cfg.label_scheme) is not None:
            continue
        if cfg.label_scheme in ("three_class", "subtype") and label.upper() != "NORMAL" \
                and subtype is None:
            out[f"{label} (subtype not stated)"] += 1
        else:
            out[ds.format_label(label, subtype) + " (no class in this scheme)"] += 1
    return dict(out)


def _audit_fold(db: Database, cfg: Any, info: Any, records: list, usable: list[int],
                names: list[str], classes: tuple) -> tuple[list[int], tuple]:
    """(the usable indices a fold run trains on: the audit's images of the other folds, the
    ImageRecords of the fold it holds out). The folds and labels are the audit's."""
    fold = cfg.holdout
    with db.session() as s:
        audit = audit_store.require_audit(session=s, audit_id=fold.audit)
        rows = {r.image_id: r for r in audit_store.audit_images(session=s, audit_id=fold.audit)}
    if audit.dataset_id != info.id or audit.folds != fold.folds:
        raise RunError(f"holdout names audit {fold.audit} of dataset {audit.dataset_id} with "
                       f"{audit.folds} folds. Received: dataset {info.id}, folds={fold.folds}")
    keep, changed = [], 0
    for i in usable:
        row = rows.get(records[i].id)
        if row is None or row.fold == fold.fold:
            continue
        changed += classes[row.given] != names[i]
        keep.append(i)
    if changed:
        raise RunError(f"{changed} image(s) have labels other than audit {fold.audit}'s snapshot "
                       f"{audit.snapshot_hash[:12]}; a fold run trains on the audit's labels")
    held = tuple(r for r in records if r.id in rows and rows[r.id].fold == fold.fold)
    return keep, held


def count_training_images(db: Database, cfg: Any) -> int | None:
    """How many images a run of ``cfg`` would take its train/validation split from, read from
    the index as :func:`prepare_data` will (what ``CXR_MAX_TRAIN_IMAGES`` limits). None when
    the dataset is a folder not indexed yet (the worker indexes it first); nothing is indexed
    or decoded here."""
    info = find_dataset(db, cfg.dataset)
    if info is None:
        return None
    with db.session() as s:
        records = ds_store.list_images(session=s, dataset_id=info.id)
    _, label_map = _read_labels(db, cfg, info, None)
    return len(_usable(cfg, info, records, label_map)[0])


def _weights_path(db: Database, weights: str | None) -> str | None:
    if not weights or not weights.startswith("run:"):
        return None
    try:
        run_id = int(weights[4:])
    except ValueError as exc:
        raise ConfigError("weights 'run:ID' needs a numeric id. "
                          f"Received: weights={weights!r}") from exc
    with db.session() as s:
        run = store.require_run(session=s, run_id=run_id)
    path = Path(run.artifact_dir or get_settings().runs_dir / str(run_id)) / RUN_MODEL_NAME
    if not path.is_file():
        raise RunError(f"weights {weights!r}: that run has no model file (is it finished?). "
                       f"Expected: {path}")
    return str(path)


@dataclass(frozen=True, eq=False)
class _ExtraPart:
    """One extra dataset's images split on their own: train / val / calibration records."""

    name: str
    root: str
    train: list
    val: list
    calib: list
    names: dict  # image id -> class name under the run's scheme
    snapshot: LabelSnapshot
    repeat: int
    duplicates: int  # left out: byte-identical to an image of the run's own dataset

    def to_json(self) -> dict:
        return {"dataset": self.name, "train": len(self.train), "val": len(self.val),
                "calibration": len(self.calib), "repeat": self.repeat,
                "left_out_duplicates": self.duplicates, "label_hash": self.snapshot.hash,
                "relabel_id": self.snapshot.newest_relabel_id}


def _extra_part(db: Database, cfg: Any, extra: Any, classes: tuple,
                main_sha: set[str]) -> _ExtraPart:
    """An extra dataset's images for this run: current labels (relabels applied), only those
    confirmed on Review for ``images="reviewed"``, none byte-identical to the run's own images,
    split by patient (scoped to their dataset) and content into train / validation /
    calibration with the run's fractions, so no site patient is in two parts."""
    info, records = open_dataset(db, extra.dataset)
    with db.session() as s:
        version = label_version(session=s, dataset_id=info.id, as_of_relabel_id=None)
        ids = [r.id for r in records]
        wanted = set(ids) if extra.images == "all" else review_queue.reviewed_among(
            session=s, reviewer=None, image_ids=ids)
    names = {r.id: ds.scheme_label(*version.labels.get(r.id, (r.label, r.subtype)),
                                   cfg.label_scheme) for r in records}
    usable = [r for r in records if r.id in wanted and names[r.id] in classes and not r.error
              and not r.missing and r.split != "test"]
    kept = [r for r in usable if not (r.sha256 and r.sha256 in main_sha)]
    if len(kept) < 2:
        raise DatasetError(f"extra dataset {info.name!r} gives {len(kept)} usable "
                           f"{extra.images} image(s): confirm some on Review (the new-site "
                           "queue) or use images='all'")
    plan = make_split("patient", kept, [names[r.id] for r in kept],
                      val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    val_ids = set(plan.val)
    val = [r for r in kept if r.id in val_ids]
    carve = carve_calibration(val, [names[r.id] for r in val],
                              fraction=cfg.calibration_fraction, seed=cfg.split_seed)
    calib_ids = set(carve.calibration)
    return _ExtraPart(info.name, info.root, [r for r in kept if r.id not in val_ids],
                      [r for r in val if r.id not in calib_ids],
                      [r for r in val if r.id in calib_ids], names, version.snapshot(),
                      extra.repeat, len(usable) - len(kept))


def prepare_data(db: Database, cfg: Any, *, as_of_relabel_id: int | None = None) -> PreparedData:
    """Images, labels and the patient-grouped train/validation split of a run.

    Test-folder images are never used. Validation is carved from the rest, grouped by patient,
    with the run's split strategy (:func:`cxr_core.data.splits.make_split`: ``patient`` with
    ``split_seed``, ``temporal`` or ``group``); its calibration slice
    (``calibration_fraction`` of it, :func:`cxr_core.data.calibration.carve_calibration`) is kept
    out of the training data altogether and returned apart.

    Args:
        db: the database.
        cfg: the run's TrainConfig.
        as_of_relabel_id: for ``label_source="current"``: labels as of this relabel id
            (a resumed run passes its stored id; 0 = originals); None = as of now.

    Returns:
        The prepared data.

    Raises:
        DatasetError: unknown dataset, or too few labelled images to split.
    """
    from cxr_core.training.interface import TrainData

    info, records = open_dataset(db, cfg.dataset)
    snap, label_map = _read_labels(db, cfg, info, as_of_relabel_id)
    usable, names, classes = _usable(cfg, info, records, label_map)
    held: tuple = ()
    if cfg.holdout is not None:
        usable, held = _audit_fold(db, cfg, info, records, usable, names, tuple(classes))
    recs = [records[i] for i in usable]
    plan = make_split(cfg.split, recs, [names[i] for i in usable],
                      val_fraction=cfg.val_fraction, seed=cfg.split_seed, group=cfg.split_group)
    val_ids = set(plan.val)
    by_id = {r.id: (r, names[i]) for r, i in zip(recs, usable)}
    val_recs = [by_id[i] for i in plan.val]
    carve = carve_calibration([r for r, _ in val_recs], [y for _, y in val_recs],
                              fraction=cfg.calibration_fraction, seed=cfg.split_seed)
    calib_ids = set(carve.calibration)
    if calib_ids:  # out of training and model selection alike
        val_ids -= calib_ids
        keep = [k for k, r in enumerate(recs) if r.id not in calib_ids]
        usable, recs = [usable[k] for k in keep], [recs[k] for k in keep]
    labels = np.array([classes.index(names[i]) for i in usable], dtype=np.int64)
    is_val = np.array([r.id in val_ids for r in recs])
    arrays = image_io.npz_record_images(info.root, recs) if info.layout == "npz" else None
    paths = tuple(r.relpath if arrays is not None else str(Path(info.root) / r.relpath)
                  for r in recs)
    main_sha = {r.sha256 for r in records if r.sha256}
    parts = [_extra_part(db, cfg, e, tuple(classes), main_sha) for e in cfg.extra]
    if parts and arrays is not None:
        raise ConfigError("extra datasets add image files; a PneumoniaMNIST (.npz) run takes "
                          f"none. Received: dataset={info.name!r}, extra={len(parts)}")
    repeat = np.ones(len(recs), dtype=np.int64)
    key, snap_hash = f"dataset:{info.id}", snap.hash
    calib_extra = []
    for part in parts:
        both = part.train + part.val
        recs = recs + both
        paths = paths + tuple(str(Path(part.root) / r.relpath) for r in both)
        labels = np.r_[labels, [classes.index(part.names[r.id]) for r in both]].astype(np.int64)
        is_val = np.r_[is_val, [False] * len(part.train) + [True] * len(part.val)]
        repeat = np.r_[repeat, [part.repeat] * len(part.train) + [1] * len(part.val)]
        calib_extra += [(r, part.names[r.id]) for r in part.calib]
        key += f"+{part.train[0].dataset_id if part.train else part.val[0].dataset_id}"
        snap_hash = hashlib.sha256(f"{snap_hash}+{part.snapshot.hash}".encode()).hexdigest()
    data = TrainData(key, tuple(classes), tuple(r.id for r in recs), paths,
                     tuple(f"{r.id}:{r.sha256}" for r in recs), labels, is_val, snap_hash,
                     arrays, _weights_path(db, cfg.weights),
                     repeat if parts else None)
    counts: dict[str, dict[str, int]] = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        c = Counter(labels[mask].tolist())
        counts[split] = {name: int(c.get(k, 0)) for k, name in enumerate(classes)}
    calib = tuple(by_id[i][0] for i in carve.calibration) + tuple(r for r, _ in calib_extra)
    if calib:
        c = Counter([by_id[i][1] for i in carve.calibration] + [y for _, y in calib_extra])
        counts["calibration"] = {name: int(c.get(name, 0)) for name in classes}
    own = len(recs) - sum(len(p.train) + len(p.val) for p in parts)
    return PreparedData(data, info.id, info.name, info.root, snap, counts,
                        len(records) - own - len(carve.calibration), calib,
                        carve.skipped, tuple(p.to_json() for p in parts), held,
                        unlabelled_reasons(cfg, info, records, label_map))
