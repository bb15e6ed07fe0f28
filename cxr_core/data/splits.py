"""Validation splits made from the train images: grouped by patient and by identical bytes, so
no patient and no duplicate file is on both sides.

Strategies (:data:`SPLIT_STRATEGIES`, chosen per run as ``TrainConfig.split``):

- ``patient``: a stratified, seeded random share of patient groups (in-distribution);
- ``temporal``: the earliest share of each class by acquisition date, else by the ordered
  patient number of Kermany names (the official test split is the earliest patients: this is
  its proxy, TRIPOD temporal validation);
- ``group``: leave one folder or site out (``split_group``: a path prefix such as a site's
  folder, or ``site:NAME`` from the metadata CSV).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cxr_core.core.errors import ConfigError, DatasetError
from cxr_core.core.records import ImageRecord


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def split_groups(records: Sequence[ImageRecord]) -> np.ndarray:
    """Group ids joining images of one patient AND byte-identical files (so neither straddles)."""
    uf = _UnionFind(len(records))
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(records):
        for key in (("p", r.patient), ("h", r.sha256)):
            if key[1] is None:
                continue
            if key in first:
                uf.union(i, first[key])
            else:
                first[key] = i
    return np.array([uf.find(i) for i in range(len(records))])


@dataclass(frozen=True)
class SplitPlan:
    """Image ids per split; validation is carved from train by patient."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...] = ()
    seed: int = 0
    val_fraction: float = 0.15
    excluded: tuple[int, ...] = field(default=())  # unreadable or without a class in the scheme
    strategy: str = "patient"  # one of SPLIT_STRATEGIES
    unordered: int = 0  # temporal: images with no date and no ordered id (kept in train)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _pool(records: Sequence[ImageRecord], labels: Sequence[str | None], *,
          val_fraction: float | None = None) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """(indices of the labelled, readable images outside the test folder, the ids left out,
    the test-folder ids): what every strategy splits. With ``val_fraction`` it is checked and
    at least 2 images are required.

    Raises:
        ConfigError: ``val_fraction`` outside (0, 0.5].
        DatasetError: fewer than 2 images to split.
    """
    if val_fraction is not None and not 0 < val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must be in (0, 0.5]. Received: val_fraction={val_fraction}")
    keep = [i for i, (r, y) in enumerate(zip(records, labels)) if y is not None and not r.error]
    kept = set(keep)
    excluded = tuple(records[i].id for i in range(len(records)) if i not in kept)
    test = tuple(records[i].id for i in keep if records[i].split == "test")
    pool = [i for i in keep if records[i].split != "test"]
    if val_fraction is not None and len(pool) < 2:
        raise DatasetError(f"need at least 2 labelled images to split. Received: {len(pool)}")
    return pool, excluded, test


def patient_split(records: Sequence[ImageRecord], labels: Sequence[str | None], *,
                  val_fraction: float = 0.15, seed: int = 0) -> SplitPlan:
    """Stratified, patient-grouped, seeded train/validation split made from the train images.

    Images in a ``test`` folder stay test; images in ``train``, ``val`` (Kaggle's 16-image val
    is folded back) or without split folder are re-split. Groups join a patient's images and
    byte-identical files, so 0 patients and 0 duplicate groups are in two splits.

    Args:
        records: indexed images.
        labels: the scheme label of each record (None = excluded, e.g. no subtype).
        val_fraction: share of groups in validation, in (0, 0.5].
        seed: shuffling seed of the grouped stratified folds.

    Returns:
        The split plan.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    pool, excluded, test = _pool(records, labels, val_fraction=val_fraction)
    groups = split_groups([records[i] for i in pool])
    y = np.array([labels[i] for i in pool])
    # k folds give a 1/k validation share; small datasets cap k at the smallest class size.
    smallest = min(Counter(y.tolist()).values())
    n_splits = min(max(2, round(1 / val_fraction)), len(set(groups)), smallest)
    if n_splits < 2:
        raise DatasetError(
            f"cannot make a stratified validation split: need 2+ patient groups and 2+ images "
            f"per class. Received: {len(set(groups))} groups, smallest class {smallest} images")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(sgkf.split(np.zeros(len(pool)), y, groups))
    val_set = set(val_idx.tolist())
    train = tuple(records[pool[i]].id for i in range(len(pool)) if i not in val_set)
    val = tuple(records[pool[i]].id for i in sorted(val_set))
    return SplitPlan(train, val, test, seed, val_fraction, excluded, "patient")


# -- Temporal: hold out the earliest share ---------------------------------------------------

_ORDERED_ID = re.compile(r"^(person|normal2-)?(\d+)$", re.IGNORECASE)


def temporal_key(record: ImageRecord) -> tuple[str, str, int] | None:
    """Where an image sits in time: (``"date"``, its ISO acquisition date, 0) where the index
    has one (DICOM StudyDate, metadata), else (``"id"``, its numbering series, its number)
    from a Kermany patient id (``person1003`` → person 1003, ``0115`` → IM 115,
    ``NORMAL2-1427`` → normal2 1427: each series is numbered in order of acquisition); None
    when neither is known."""
    if record.acquired_date:
        return ("date", str(record.acquired_date), 0)
    m = _ORDERED_ID.match(record.patient or "")
    if m is None:
        return None
    return ("id", (m.group(1) or "im").lower().rstrip("-"), int(m.group(2)))


def temporal_split(records: Sequence[ImageRecord], labels: Sequence[str | None], *,
                   val_fraction: float = 0.15) -> SplitPlan:
    """Validation = the earliest share of each class (TRIPOD temporal validation), grouped by
    patient and identical bytes like :func:`patient_split`.

    Time is the acquisition date where the index has one, else the patient number within its
    numbering series: the official Kermany test split is the earliest-numbered patients of
    each series, so this validation resembles it. Within each (class, series) the groups are
    taken from the earliest until ``val_fraction`` of that bucket's images are held out.
    Groups with no date and no ordered id stay in train (``SplitPlan.unordered`` counts their
    images).

    Raises:
        ConfigError: ``val_fraction`` outside (0, 0.5].
        DatasetError: fewer than 2 labelled images, no image with a date or an ordered id, or
            a class left without validation images.
    """
    pool, excluded, test = _pool(records, labels, val_fraction=val_fraction)
    groups = split_groups([records[i] for i in pool])
    members: dict[int, list[int]] = {}
    for k, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(pool[k])
    buckets: dict[tuple[str, str], list[tuple[tuple, int]]] = {}
    unordered = 0
    for g, idx in members.items():
        keys = [k for k in (temporal_key(records[i]) for i in idx) if k is not None]
        if not keys:
            unordered += len(idx)
            continue
        first = min(keys)
        cls = Counter(labels[i] for i in idx).most_common(1)[0][0]
        buckets.setdefault((str(cls), first[1] if first[0] == "id" else "date"), []).append(
            ((first[1], first[2]), g))
    if not buckets:
        raise DatasetError("a temporal split needs acquisition dates or ordered patient ids "
                           "(Kermany names, DICOM StudyDate or a metadata date column); none of "
                           f"the {len(pool)} images has one: use split='patient'")
    val_groups: set[int] = set()
    for (_, _), items in sorted(buckets.items()):
        total = sum(len(members[g]) for _, g in items)
        taken = 0
        for _, g in sorted(items):
            if taken >= val_fraction * total:
                break
            val_groups.add(g)
            taken += len(members[g])
    val = tuple(sorted(records[i].id for g in val_groups for i in members[g]))
    val_set = set(val)
    train = tuple(records[i].id for i in pool if records[i].id not in val_set)
    missing = sorted({str(labels[i]) for i in pool} - {str(labels[i]) for i in pool
                                                       if records[i].id in val_set})
    if missing:
        raise DatasetError(f"the temporal split left class(es) {missing} without validation "
                           "images (no dated or ordered ids among them): use split='patient'")
    return SplitPlan(train, val, test, 0, val_fraction, excluded, "temporal", unordered)


# -- Group: leave one folder out -------------------------------------------------------------

def group_split(records: Sequence[ImageRecord], labels: Sequence[str | None], *,
                held_out: str) -> SplitPlan:
    """Validation = one group left out, plus every image sharing a patient or bytes with one
    of its images, so the split stays grouped. ``held_out`` is a folder (a relative path prefix
    such as ``train/site_b``) or ``site:NAME`` (the ``site`` column of the metadata CSV).

    Raises:
        ConfigError: no ``held_out`` group given.
        DatasetError: no image in it, or nothing left to train on.
    """
    spec = (held_out or "").strip()
    site = spec[5:].strip() if spec.lower().startswith("site:") else None
    prefix = spec.strip("/")
    if not prefix or site == "":
        raise ConfigError("split='group' needs split_group: the folder to hold out, relative "
                          "to the dataset (e.g. 'train/site_b'), or site:NAME")
    pool, excluded, test = _pool(records, labels)
    groups = split_groups([records[i] for i in pool]).tolist()

    def held(rec: ImageRecord) -> bool:
        if site is not None:
            return rec.site == site
        return (rec.relpath + "/").startswith(prefix + "/")

    inside = {g for k, g in enumerate(groups) if held(records[pool[k]])}
    if not inside:
        what = f"of site {site!r}" if site is not None else f"under the folder {prefix!r}"
        raise DatasetError(f"no labelled train image {what} to hold out. "
                           f"Received: split_group={held_out!r}")
    val = tuple(records[pool[k]].id for k, g in enumerate(groups) if g in inside)
    train = tuple(records[pool[k]].id for k, g in enumerate(groups) if g not in inside)
    if not train:
        raise DatasetError(f"holding out {spec!r} leaves no image to train on")
    return SplitPlan(train, val, test, 0, len(val) / len(pool), excluded, "group")


SPLIT_STRATEGIES = ("patient", "temporal", "group")


# -- K folds: every image held out once (a label audit's out-of-fold predictions) -----------

def grouped_folds(records: Sequence[ImageRecord], labels: Sequence[str | None], *,
                  folds: int = 5, seed: int = 0) -> dict[int, int]:
    """Image id -> fold (0..folds-1): class-stratified, seeded folds grouped by patient and by
    identical bytes (a patient's images and byte-identical files share a fold), over the
    labelled, readable images outside the test folder.

    Args:
        records: indexed images.
        labels: the scheme label of each record (None = left out, e.g. no subtype).
        folds: K >= 2.
        seed: shuffling seed of the grouped stratified folds.

    Raises:
        ConfigError: ``folds`` not an integer >= 2.
        DatasetError: fewer patient groups than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2. Received: folds={folds!r}")
    pool, _, _ = _pool(records, labels)
    groups = split_groups([records[i] for i in pool])
    if len(set(groups.tolist())) < folds:
        raise DatasetError(f"{folds} folds need at least {folds} patient groups. Received: "
                           f"{len(set(groups.tolist()))} groups over {len(pool)} images")
    y = np.array([labels[i] for i in pool])
    sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out: dict[int, int] = {}
    for k, (_, held) in enumerate(sgkf.split(np.zeros(len(pool)), y, groups)):
        out.update({records[pool[i]].id: k for i in held})
    return out


def make_split(strategy: str, records: Sequence[ImageRecord], labels: Sequence[str | None], *,
               val_fraction: float = 0.15, seed: int = 0,
               group: str | None = None) -> SplitPlan:
    """The split of ``strategy`` (one of :data:`SPLIT_STRATEGIES`): what training, the Class
    balance preview and evaluation all call.

    Raises:
        ConfigError: an unknown strategy, or as the strategy's function.
    """
    if strategy == "patient":
        return patient_split(records, labels, val_fraction=val_fraction, seed=seed)
    if strategy == "temporal":
        return temporal_split(records, labels, val_fraction=val_fraction)
    if strategy == "group":
        return group_split(records, labels, held_out=group or "")
    raise ConfigError(f"split must be one of {list(SPLIT_STRATEGIES)}. Received: split={strategy!r}")
