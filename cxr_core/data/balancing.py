"""Class balancing strategies (pure numpy, no TensorFlow: the class-balance page imports it).

none; class weights (total / (n_classes * count), the reports' formula); oversample minority
classes up to a target ratio (e.g. 2:1:2, through augmentation so copies differ); undersample
to the smallest class (or to a ratio).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxr_core.core.errors import ConfigError

BALANCING = ("none", "class_weights", "oversample", "undersample")


def _check_strategy(strategy: str) -> None:
    if strategy not in BALANCING:
        raise ConfigError(f"balancing must be one of {BALANCING}. Received: balancing={strategy!r}")


def _target_counts(counts: Sequence[int], strategy: str,
                   target_ratio: Sequence[float] | None) -> list[int]:
    """Per-class counts after balancing (the arithmetic shared by indices and summary).

    oversample keeps every image and adds copies until the counts follow ``target_ratio``
    (default 1:1:...); undersample keeps a subset down to that ratio (default: all classes
    at the smallest count). Classes without images stay at 0: nothing can be drawn from them.
    """
    _check_strategy(strategy)
    counts = [int(c) for c in counts]
    if strategy in ("none", "class_weights"):
        return counts
    ratio = [1.0] * len(counts) if target_ratio is None else [float(r) for r in target_ratio]
    if len(ratio) != len(counts) or any(r <= 0 for r in ratio):
        raise ConfigError(f"target_ratio must have one positive value per class ({len(counts)}). "
                          f"Received: target_ratio={target_ratio}")
    present = [c / r for c, r in zip(counts, ratio) if c > 0]
    if not present:
        return counts
    scale = max(present) if strategy == "oversample" else min(present)
    bound = max if strategy == "oversample" else min
    # round(): scale * ratio is the exact count of the class that sets the scale, up to
    # float error.
    return [bound(c, round(scale * r)) if c > 0 else 0 for c, r in zip(counts, ratio)]


def balance_indices(labels: np.ndarray, strategy: str, *,
                    target_ratio: Sequence[float] | None = None, seed: int) -> np.ndarray:
    """Indices into ``labels`` after balancing (repeated for oversample, a subset for undersample).

    Oversampled copies are only useful when augmentation makes them differ: use them
    through :func:`make_dataset`, which requires an augment config for "oversample".

    Args:
        labels: (N,) integer class labels.
        strategy: one of ``BALANCING``; "none" and "class_weights" keep every index.
        target_ratio: relative class sizes, e.g. (2, 1, 2); default equal.
        seed: seeds which images are repeated or kept.

    Returns:
        int64 indices in ascending order (shuffling is the dataset's job).

    Raises:
        ConfigError: unknown strategy, bad ratio or negative labels.
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if labels.size and labels.min() < 0:
        raise ConfigError(f"labels must be non-negative. Received: min label={labels.min()}")
    n_classes = len(target_ratio) if target_ratio is not None else int(labels.max(initial=-1)) + 1
    if labels.size and labels.max() >= n_classes:
        raise ConfigError(
            f"target_ratio has {n_classes} classes but labels go up to {labels.max()}")
    counts = np.bincount(labels, minlength=n_classes)
    targets = _target_counts(counts.tolist(), strategy, target_ratio)
    rng = np.random.default_rng(seed)
    picked = []
    for c, target in enumerate(targets):
        members = np.flatnonzero(labels == c)
        if target <= len(members):
            picked.append(rng.choice(members, target, replace=False) if target < len(members)
                          else members)
            continue
        # Whole copies first, then a random remainder: every image is repeated at most once more
        # than any other.
        whole, rest = divmod(target, len(members))
        picked += [members] * whole + [rng.choice(members, rest, replace=False)]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else labels[:0]


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Keras ``class_weight`` as in the reports: total / (n_classes * count).

    Classes without images get 1.0 (Keras wants every class; the value is never used).
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if n_classes < 1:
        raise ConfigError(f"n_classes must be at least 1. Received: n_classes={n_classes}")
    counts = np.bincount(labels, minlength=n_classes)
    total = len(labels)
    return {c: (total / (n_classes * int(n)) if n else 1.0) for c, n in enumerate(counts)}


def balance_summary(counts: dict[str, int], strategy: str,
                    target_ratio: Sequence[float] | None = None) -> dict[str, int]:
    """Class counts a training run would see after balancing (for the class-balance page).

    Args:
        counts: images per class name, in class-index order.
        strategy: one of ``BALANCING``.
        target_ratio: as for :func:`balance_indices`, in the same order as ``counts``.

    Returns:
        Images per class name after balancing ("class_weights" changes weights, not counts).
    """
    return dict(zip(counts, _target_counts(list(counts.values()), strategy, target_ratio)))
