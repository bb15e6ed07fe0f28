"""Paired comparison of runs on the same images: McNemar's test and the images they disagree on.

Predictions are class-index arrays (N,) in the same image order for every run (see
:mod:`cxr_core.stats.metrics` for the conventions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from cxr_core.core.errors import ConfigError
from cxr_core.core.json_safe import jsonable
from cxr_core.stats.metrics import as_labels

_EXACT_BELOW = 25  # McNemar: exact binomial test when b + c < 25, chi-square otherwise


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test between two classifiers on the same images.

    ``b``: images A gets right and B gets wrong; ``c``: A wrong, B right.
    ``method == "exact"``: two-sided binomial test of b ~ Bin(b + c, 1/2),
    ``statistic = min(b, c)``.
    ``method == "chi2_cc"``: ``statistic = max(|b - c| - 1, 0)^2 / (b + c)`` (Edwards'
    continuity correction), p from chi-square with 1 degree of freedom.
    """

    b: int
    c: int
    statistic: float
    p_value: float
    method: Literal["exact", "chi2_cc"]
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return jsonable(vars(self))


def _same_length(y: np.ndarray, preds: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {name: as_labels(pred, f"predictions of {name!r}") for name, pred in preds.items()}
    for name, pred in out.items():
        if pred.size != y.size:
            raise ConfigError(f"predictions of {name!r} must have one entry per image "
                              f"(N={y.size}). Received: {pred.size}")
    return out


def mcnemar(y_true: Any, pred_a: Any, pred_b: Any) -> McNemarResult:
    """McNemar's test: do two runs make different numbers of errors on the same images?

    Uses the exact two-sided binomial test when the discordant count ``b + c < 25`` and the
    chi-square test with continuity correction otherwise (see :class:`McNemarResult`).

    Args:
        y_true: true class indices (N,).
        pred_a: predictions of run A (N,).
        pred_b: predictions of run B (N,), on the same images in the same order.

    Returns:
        A :class:`McNemarResult`; ``b + c == 0`` gives p = 1.

    Raises:
        ConfigError: arrays of different lengths or not integer class indices.
    """
    y = as_labels(y_true)
    preds = _same_length(y, {"A": pred_a, "B": pred_b})
    right_a, right_b = preds["A"] == y, preds["B"] == y
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    if b + c < _EXACT_BELOW:
        p_value = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        return McNemarResult(b, c, float(min(b, c)), float(p_value), "exact", int(y.size))
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    p_value = float(stats.chi2.sf(statistic, df=1))
    return McNemarResult(b, c, float(statistic), p_value, "chi2_cc", int(y.size))


def disagreements(y_true: Any, preds: dict[str, Any], *, with_truth: bool = False) -> np.ndarray:
    """Indices of images on which runs disagree.

    Args:
        y_true: true class indices (N,); used for the length check and ``with_truth``.
        preds: run name → predictions (N,) on the same images in the same order.
        with_truth: False (default): images where the runs do not all predict the same
            class. True: also images where they all agree but are wrong, i.e. where
            {truth, run predictions} holds more than one class.

    Returns:
        Sorted int array of image indices.

    Raises:
        ConfigError: no runs (or one run without ``with_truth``), or lengths differ.
    """
    y = as_labels(y_true)
    if len(preds) < (1 if with_truth else 2):
        raise ConfigError("need at least 2 runs to compare (or 1 with with_truth=True). "
                          f"Received: {len(preds)} run(s): {list(preds)}")
    stack = np.vstack(list(_same_length(y, preds).values()))
    if with_truth:
        stack = np.vstack([stack, y])
    return np.flatnonzero(np.any(stack != stack[0], axis=0))
