"""Three-class figures (normal / bacterial / viral): accuracy, macro-F1, per-class recall and
the confusion matrix, at a fixed decision rule or cross-fitted where the rule is chosen on the
sample it is scored on.

Two decision rules (columns NORMAL, BACTERIA, VIRUS):

* **flat**: the argmax of the probabilities, optionally moved to a target prior;
* **hierarchical**: NORMAL unless P(pneumonia) = 1 - P(NORMAL) reaches a threshold, then the
  more probable subtype (:func:`cxr_core.stats.metrics.predict` with a threshold).

Cross-fitting (:func:`cross_fitted`) chooses what a site would choose on its own labelled
films (the pneumonia threshold at the target sensitivity and/or the class prior) on all
patient-grouped folds but one and applies it to that one, pooled, repeated with other fold
draws: every decision is made by a rule that never saw the film. Pure numpy / scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, recall_score
from sklearn.model_selection import StratifiedGroupKFold

from cxr_core.core.errors import ConfigError
from cxr_core.stats.intervals import cluster_ids, cluster_strata
from cxr_core.stats.metrics import predict
from cxr_core.stats.priors import adjust, estimate_prior
from cxr_core.stats.thresholds import DEFAULT_TARGET_SENSITIVITY, threshold_for_sensitivity

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
RULES = ("flat", "hierarchical")


@dataclass(frozen=True)
class ThreeClassReport:
    """Figures of three-class decisions.

    Attributes:
        n: images scored.
        accuracy, macro_f1: point figures (cross-fitted: the median over repeats).
        accuracy_ci, macro_f1_ci: patient-clustered 95% percentile intervals (nan without).
        recall: per-class recall (sensitivity), in :data:`CLASSES` order.
        confusion: rows = true class, columns = decided class (one repeat's pooled decisions
            when cross-fitted).
        rule: "flat" or "hierarchical"; what was chosen on the sample, if anything.
    """

    n: int
    accuracy: float
    macro_f1: float
    accuracy_ci: tuple[float, float]
    macro_f1_ci: tuple[float, float]
    recall: tuple[float, ...]
    confusion: list[list[int]]
    rule: str
    chosen: str = ""

    def to_dict(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "accuracy_ci": list(self.accuracy_ci),
                "macro_f1": self.macro_f1, "macro_f1_ci": list(self.macro_f1_ci),
                "recall": dict(zip(CLASSES, self.recall)), "confusion": self.confusion,
                "labels": list(CLASSES), "rule": self.rule, "chosen": self.chosen}


def _check(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] != y.size or y.size == 0:
        raise ConfigError(f"three-class figures need (N, 3) probabilities and N labels, N > 0. "
                          f"Received: probs {p.shape}, labels {y.shape}")
    if y.min() < 0 or y.max() > 2:
        raise ConfigError(f"labels must be 0, 1, 2 ({', '.join(CLASSES)}). "
                          f"Received: {sorted(set(y.tolist()))}")
    return y, p


def _scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    return (float((pred == y).mean()),
            float(f1_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)))


def decide(probs: np.ndarray, rule: str, *, threshold: float | None = None,
           train_prior=None, target_prior=None) -> np.ndarray:
    """Decisions of one rule (see the module docstring); the subtype (or all classes, flat)
    moved from ``train_prior`` to ``target_prior`` when both are given."""
    p = np.asarray(probs, dtype=np.float64)
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES}. Received: rule={rule!r}")
    if rule == "flat":
        if train_prior is not None and target_prior is not None:
            p = adjust(p, train_prior, target_prior)
        return predict(p)
    if threshold is None:
        raise ConfigError("the hierarchical rule needs the pneumonia threshold")
    if train_prior is not None and target_prior is not None:  # the subtype step's prior
        pneu = 1.0 - p[:, 0]
        sub = adjust(p[:, 1:] / np.maximum(pneu, 1e-12)[:, None], train_prior, target_prior)
        p = np.column_stack([p[:, 0], pneu[:, None] * sub])
    return predict(p, threshold=threshold)


def report(y, probs, rule: str, *, threshold: float | None = None, train_prior=None,
           target_prior=None, groups=None, n_boot: int = 500, seed: int = 0
           ) -> ThreeClassReport:
    """Figures at a fixed rule (nothing chosen on this sample)."""
    y, p = _check(y, probs)
    pred = decide(p, rule, threshold=threshold, train_prior=train_prior,
                  target_prior=target_prior)
    return _report(y, pred[None, :], groups, n_boot, seed, rule, "")


def _report(y: np.ndarray, preds: np.ndarray, groups, n_boot: int, seed: int, rule: str,
            chosen: str) -> ThreeClassReport:
    per = np.array([_scores(y, d) for d in preds])
    acc, f1 = (float(v) for v in np.median(per, axis=0))
    clusters = cluster_ids([None] * y.size if groups is None else list(groups), y.size)
    draws = []
    if n_boot:
        rng = np.random.default_rng(seed)
        strata, expand = cluster_strata(y, clusters, 3)
        for _ in range(n_boot):
            idx = expand(np.concatenate([s[rng.integers(0, s.size, s.size)] for s in strata]))
            draws.append(np.median([_scores(y[idx], d[idx]) for d in preds], axis=0))
    if draws:
        lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        acc_ci, f1_ci = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
    else:
        acc_ci = f1_ci = (float("nan"), float("nan"))
    first = preds[0]
    recall = recall_score(y, first, labels=[0, 1, 2], average=None, zero_division=0)
    cm = confusion_matrix(y, first, labels=[0, 1, 2])
    return ThreeClassReport(int(y.size), acc, f1, acc_ci, f1_ci,
                            tuple(float(r) for r in recall), cm.tolist(), rule, chosen)


def cross_fitted(y, probs, rule: str, *, groups=None, choose_threshold: bool = True,
                 threshold: float | None = None, train_prior=None, choose_prior: bool = False,
                 target: float = DEFAULT_TARGET_SENSITIVITY, folds: int = 5, repeats: int = 20,
                 seed: int = 0, n_boot: int = 500) -> ThreeClassReport:
    """Figures of a rule whose threshold and/or prior a site chooses on its labelled films,
    each film decided by a rule chosen on the other folds' patients.

    Args:
        y: 0/1/2 labels; probs: (N, 3) probabilities (a flat model's, or the hierarchical
            model's ``[1 - p, p q_B, p q_V]``).
        rule: "flat" or "hierarchical".
        groups: patient id per image (folds and the bootstrap keep a patient together).
        choose_threshold: hierarchical: choose the pneumonia threshold on the other folds (the
            highest reaching ``target`` sensitivity for pneumonia vs normal); else ``threshold``.
        train_prior: the prior ``probs`` are at (the subtype's two classes for hierarchical,
            all three for flat); needed with ``choose_prior``.
        choose_prior: estimate the target prior from the other folds' labels.
        target, folds, repeats, seed, n_boot: as :mod:`cxr_core.stats.crossfit`.

    Raises:
        ConfigError: bad inputs, or too few patients of a class for the folds.
    """
    y, p = _check(y, probs)
    if choose_prior and train_prior is None:
        raise ConfigError("choosing a prior needs the prior the probabilities are at "
                          "(train_prior)")
    clusters = cluster_ids([None] * y.size if groups is None else list(groups), y.size)
    n_splits = min(folds, int(np.bincount(y, minlength=3).min()), len(np.unique(clusters)))
    if n_splits < 2:
        raise ConfigError("cross-fitting needs at least 2 images of each class. Received: "
                          f"{np.bincount(y, minlength=3).tolist()}")
    preds = []
    for r in range(repeats):
        pred = np.zeros(y.size, dtype=np.int64)
        split = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + r)
        for fit, score in split.split(p, y, clusters):
            thr, tgt = threshold, None
            if rule == "hierarchical" and choose_threshold:
                thr = threshold_for_sensitivity((y[fit] > 0).astype(np.int64),
                                                1.0 - p[fit, 0], target)
            if choose_prior:
                if rule == "hierarchical":
                    sub = y[fit][y[fit] > 0] - 1
                    tgt = estimate_prior(sub, 2)
                else:
                    tgt = estimate_prior(y[fit], 3)
            pred[score] = decide(p[score], rule, threshold=thr,
                                 train_prior=train_prior if tgt is not None else None,
                                 target_prior=tgt)
        preds.append(pred)
    chosen = ", ".join(w for w, on in (("pneumonia threshold", rule == "hierarchical"
                                        and choose_threshold), ("prior", choose_prior)) if on)
    return _report(y, np.stack(preds), groups, n_boot, seed, rule, chosen)
