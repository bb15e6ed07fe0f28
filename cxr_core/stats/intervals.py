"""Bootstrap confidence intervals: the stratified percentile bootstrap of AUC, sensitivity and
specificity, over images or over whole patient clusters.

Images of one patient are correlated; resampling them one by one makes the intervals too
narrow, so when a patient id per image is known the bootstrap draws whole patients
(:func:`cluster_ids`, then :func:`bootstrap_intervals` with ``clusters``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.stats.metrics import summary


@dataclass(frozen=True)
class Interval:
    """A bootstrap percentile interval around a point estimate."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    n_boot: int = 0


def _is_missing_group(value: Any) -> bool:
    """None, a blank string or a float nan (pandas' missing value) means "no patient id"."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def cluster_ids(groups: Any, n: int) -> np.ndarray:
    """Int cluster id (N,) per image, numbered by first occurrence.

    Equal ids share a cluster; every missing id (see :func:`_is_missing_group`) is a cluster
    of its own.

    Raises:
        ConfigError: ``groups`` is not a sequence of ``n`` hashable ids (or None).
    """
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__"):
        raise ConfigError("groups must be a sequence with one patient id (or None) per image. "
                          f"Received: {type(groups).__name__}")
    if len(groups) != n:
        raise ConfigError(f"groups must have one patient id (or None) per image (N={n}, the "
                          f"length of y_true). Received: {len(groups)} entries")
    values = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    seen: dict[Any, int] = {}
    ids = np.empty(n, dtype=np.int64)
    for i, value in enumerate(values):
        if _is_missing_group(value):
            ids[i] = len(seen)
            seen[object()] = ids[i]  # a fresh key: never shared
            continue
        try:
            ids[i] = seen.setdefault(value, len(seen))
        except TypeError:
            raise ConfigError("groups must hold hashable patient ids (str) or None. "
                              f"Received: {type(value).__name__} at index {i}") from None
    return ids


def cluster_strata(y: np.ndarray, clusters: np.ndarray, n_classes: int
                    ) -> tuple[list[np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Strata of cluster ids and the map from drawn cluster ids to their image indices.

    Clusters are stratified by the set of classes among their images: first the clusters
    holding class 0 only, 1 only, ... (in class order), then mixed clusters by class set. A
    resample keeps each stratum's cluster count, so every class stays present; when every
    image is its own cluster the strata and draws are exactly those of the image bootstrap.
    """
    n_clusters = int(clusters.max()) + 1
    present = np.zeros((n_clusters, n_classes), dtype=bool)
    present[clusters, y] = True
    code = present.astype(np.int64) @ (np.int64(1) << np.arange(n_classes, dtype=np.int64))
    pure = [1 << k for k in range(n_classes)]
    mixed = sorted(set(np.unique(code).tolist()) - set(pure))
    strata = [np.flatnonzero(code == c) for c in pure + mixed]
    strata = [s for s in strata if s.size]

    order = np.argsort(clusters, kind="stable")  # images grouped by cluster, in index order
    sizes = np.bincount(clusters, minlength=n_clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def expand(drawn: np.ndarray) -> np.ndarray:
        size = sizes[drawn]
        ends = np.cumsum(size)
        # position j of the output belongs to draw d(j); its offset into the cluster is
        # j - (ends[d] - size[d]); add the cluster's start in `order`.
        shift = np.repeat(starts[drawn] - ends + size, size)
        return order[shift + np.arange(int(ends[-1]))]

    return strata, expand


def bootstrap_intervals(y: np.ndarray, p: np.ndarray, pred: np.ndarray, n_boot: int,
                        seed: int, point: dict[str, float],
                        clusters: np.ndarray | None = None) -> dict[str, Interval]:
    """Stratified percentile bootstrap (95%) of AUC, sensitivity and specificity.

    Without ``clusters`` each class is resampled with replacement to its own size, so every
    resample keeps every class (no resample has to be skipped for AUC) and the prevalence is
    fixed. With ``clusters`` (a cluster id per image) whole clusters are resampled instead,
    stratified by their class set (see :func:`cluster_strata`): each replicate draws as many
    clusters as there are, with all their images. A replicate lacking a class would be
    skipped (nan, ignored by the percentiles); the stratification prevents that.

    Args:
        y: validated class indices (N,).
        p: validated (N, C) probabilities.
        pred: predicted class indices (N,) at the report's operating point.
        n_boot: resamples.
        seed: seed of the resampling; same seed, same intervals.
        point: the point estimates, keyed like :func:`cxr_core.stats.metrics.summary`.
        clusters: cluster id per image from :func:`cluster_ids`, or None for images.

    Returns:
        Metric name → :class:`Interval`.
    """
    rng = np.random.default_rng(seed)
    n_classes = p.shape[1]
    if clusters is None:
        strata = [np.flatnonzero(y == k) for k in range(n_classes)]
        expand: Callable[[np.ndarray], np.ndarray] = lambda drawn: drawn  # noqa: E731
    else:
        strata, expand = cluster_strata(y, clusters, n_classes)
    draws: dict[str, list[float]] = {key: [] for key in point}
    for _ in range(n_boot):
        idx = expand(np.concatenate([s[rng.integers(0, s.size, s.size)] for s in strata]))
        y_b = y[idx]
        if np.bincount(y_b, minlength=n_classes).min() == 0:
            continue
        for key, value in summary(y_b, p[idx], pred[idx]).items():
            draws[key].append(value)
    out = {}
    for key, values in draws.items():
        low, high = (np.nanpercentile(values, [2.5, 97.5]) if values
                     else (math.nan, math.nan))
        out[key] = Interval(point[key], float(low), float(high), 0.95, n_boot)
    return out
