"""Validation splits made from the train images: grouped by patient and by identical bytes, so
no patient and no duplicate file is on both sides; stratified by class and seeded.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cxr_core.datasets import ImageRecord
from cxr_core.errors import ConfigError, DatasetError


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

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


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

    if not 0 < val_fraction <= 0.5:
        raise ConfigError(f"val_fraction must be in (0, 0.5]. Received: val_fraction={val_fraction}")
    keep = [i for i, (r, y) in enumerate(zip(records, labels)) if y is not None and not r.error]
    kept = set(keep)
    excluded = tuple(records[i].id for i in range(len(records)) if i not in kept)
    test = tuple(records[i].id for i in keep if records[i].split == "test")
    pool = [i for i in keep if records[i].split != "test"]
    if len(pool) < 2:
        raise DatasetError(f"need at least 2 labelled images to split. Received: {len(pool)}")
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
    return SplitPlan(train, val, test, seed, val_fraction, excluded)
