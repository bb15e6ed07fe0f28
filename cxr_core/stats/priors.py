"""Class priors: the decision follows the priors of the data a model is applied to.

A network trained with class weights, over- or under-sampling learns the posterior under the
*effective* training prior (balanced classes, or the sampling ratio), not the prior of any
site. Its probabilities are moved to a target prior by Bayes' rule (logit adjustment; Saerens,
Latinne & Decaestecker, Neural Computation 2002; Menon et al., ICLR 2021):

    p_target(k | x)  ∝  p_train(k | x) · π_target(k) / π_train(k)

The target prior is the training data's natural class frequencies by default, or estimated from
a site's labelled sample (:func:`estimate_prior`), or from its unlabelled outputs by EM
(:func:`em_prior`). For two classes the correction is a threshold (:func:`bayes_threshold`).

Pure numpy: no database, no TensorFlow.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxr_core.core.errors import ConfigError

BALANCINGS = ("none", "class_weights", "oversample", "undersample")


def _prior(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(values, dtype=np.float64)
    if p.ndim != 1 or p.size < 2 or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ConfigError(f"{what} must be two or more positive numbers (one per class). "
                          f"Received: {what}={list(np.atleast_1d(p))}")
    return p / p.sum()


def effective_prior(counts: Sequence[int], balancing: str,
                    target_ratio: Sequence[float] | None = None) -> np.ndarray:
    """The class prior a network effectively trained under.

    Args:
        counts: training images per class (model output order).
        balancing: "none" (the natural frequencies), "class_weights" or "undersample"
            (balanced: every class weighs the same), "oversample" (``target_ratio`` when given,
            else balanced).
        target_ratio: the over-sampling ratio, one number per class (e.g. 2:1:2).

    Raises:
        ConfigError: unknown balancing, a class with no images, or a ratio of the wrong length.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if balancing not in BALANCINGS:
        raise ConfigError(f"balancing must be one of {BALANCINGS}. Received: {balancing!r}")
    natural = _prior(counts, "counts")
    if balancing == "none":
        return natural
    if balancing == "oversample" and target_ratio:
        if len(target_ratio) != counts.size:
            raise ConfigError(f"target_ratio needs one number per class ({counts.size}). "
                              f"Received: target_ratio={list(target_ratio)}")
        return _prior(target_ratio, "target_ratio")
    return np.full(counts.size, 1.0 / counts.size)


def adjust(probs: np.ndarray, train_prior: Sequence[float],
           target_prior: Sequence[float]) -> np.ndarray:
    """Probabilities learned under ``train_prior`` moved to ``target_prior`` (rows sum to 1).

    Args:
        probs: (N, C) class probabilities.
        train_prior: the effective training prior (C,).
        target_prior: the prior of the data the model is applied to (C,).
    """
    p = np.asarray(probs, dtype=np.float64)
    tr, tg = _prior(train_prior, "train_prior"), _prior(target_prior, "target_prior")
    if p.ndim != 2 or p.shape[1] != tr.size or tg.size != tr.size:
        raise ConfigError(f"probabilities with {tr.size} columns are needed for priors of "
                          f"{tr.size} classes. Received: shape={p.shape}, "
                          f"target classes={tg.size}")
    w = p * (tg / tr)[None, :]
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)


def bayes_threshold(train_prior: Sequence[float], target_prior: Sequence[float]) -> float:
    """For two classes: the threshold on the second class's (uncorrected) probability at which
    the corrected decision flips (second class iff p >= threshold)."""
    tr, tg = _prior(train_prior, "train_prior"), _prior(target_prior, "target_prior")
    if tr.size != 2 or tg.size != 2:
        raise ConfigError(f"a prior threshold needs two classes. Received: {tr.size} and "
                          f"{tg.size}")
    a, b = tg[0] / tr[0], tg[1] / tr[1]
    return float(a / (a + b))


def estimate_prior(y: Sequence[int], n_classes: int, *, smoothing: float = 1.0) -> np.ndarray:
    """A site's class prior from its labelled sample: add-``smoothing`` class frequencies (a
    class the sample lacks keeps a small share instead of vanishing).

    Raises:
        ConfigError: an empty sample or labels outside 0..n_classes-1.
    """
    y = np.asarray(y, dtype=np.int64)
    if y.size == 0:
        raise ConfigError("estimating a prior needs labelled images. Received: 0 images")
    if y.min() < 0 or y.max() >= n_classes:
        raise ConfigError(f"labels must be 0..{n_classes - 1}. Received: {sorted(set(y))}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64) + smoothing
    return counts / counts.sum()


def em_prior(probs: np.ndarray, train_prior: Sequence[float], *, max_iter: int = 200,
             tol: float = 1e-8) -> np.ndarray:
    """A site's prior from its unlabelled outputs (Saerens et al. 2002): alternately correct
    the posteriors to the current prior and re-estimate the prior as their mean."""
    p = np.asarray(probs, dtype=np.float64)
    tr = _prior(train_prior, "train_prior")
    if p.ndim != 2 or p.shape[1] != tr.size or p.shape[0] == 0:
        raise ConfigError(f"EM needs (N, {tr.size}) probabilities with N > 0. "
                          f"Received: shape={p.shape}")
    prior = tr.copy()
    for _ in range(max_iter):
        new = adjust(p, tr, prior).mean(axis=0)
        new = np.clip(new, 1e-6, None)
        new /= new.sum()
        if np.max(np.abs(new - prior)) < tol:
            return new
        prior = new
    return prior
