"""Confident learning (Northcutt, Jiang & Chuang, JAIR 70, 2021): which given labels are likely
wrong, from **out-of-sample** predicted probabilities (each image scored by a model that never
trained on it: :mod:`cxr_core.training.label_audit` gets them from K patient-grouped folds).

Written here in numpy/scikit-learn (``cleanlab`` implements the same method but is AGPL-3.0;
a dev-only test checks these functions against ``cleanlab.filter.find_label_issues(...,
filter_by="confident_learning")`` on the same probabilities):

1. **Per-class thresholds** ``t_k``: the mean probability of class ``k`` over the images given
   label ``k`` (its mean self-confidence).
2. **Confident joint** ``C[i, j]``: images given label ``i`` whose probability of ``j`` reaches
   ``t_j`` (where several classes reach theirs, the most probable class counts). Calibrated
   so that each row sums to the number of images given that label and the whole to ``n``.
3. **Estimated noise matrix** ``P(given = i | true = j)``: the calibrated joint with each
   column normalised (rows = given label, columns = estimated true label).
4. **Issues**: the images counted off the diagonal of the (uncalibrated) confident joint,
   except those whose most probable class is the given one anyway, ranked by self-confidence
   ``p[given]`` (lower = more likely wrong).

Pure: no database, no TensorFlow, no files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix

from cxr_core.core.errors import ConfigError

TOLERANCE = 1e-6  # "reaches its threshold" allows this much below it (as cleanlab does)


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2 or y.ndim != 1 or len(y) != len(p):
        raise ConfigError("expected one given label per row of an (N, K >= 2) probability "
                          f"matrix. Received: labels shape {y.shape}, probs shape {p.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or \
            y.max(initial=0) >= p.shape[1]:
        raise ConfigError(f"given labels must be class indices in [0, {p.shape[1] - 1}]. "
                          f"Received: {sorted(set(y.tolist()))[:10]}")
    if len(y) == 0 or not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1 or \
            not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ConfigError("probabilities must be finite, in [0, 1], one row per image summing "
                          f"to 1. Received: {len(y)} rows, min {p.min(initial=0):.3g}, "
                          f"max {p.max(initial=0):.3g}")
    return y.astype(np.int64), p


def class_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class thresholds: the mean self-confidence of each class (its mean probability over
    the images given it); 2.0 (unreachable) for a class no image is given.

    Args:
        labels: (N,) given class indices.
        probs: (N, K) out-of-sample probabilities.

    Returns:
        (K,) thresholds.
    """
    y, p = _check(labels, probs)
    return np.array([p[y == k, k].mean() if np.any(y == k) else 2.0
                     for k in range(p.shape[1])])


def _confident_guess(p: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which images reach at least one class's threshold, the class each is counted in)."""
    reached = p >= thresholds - TOLERANCE
    n_reached = reached.sum(axis=1)
    guess = np.where(n_reached > 1, p.argmax(axis=1), reached.argmax(axis=1))
    return n_reached > 0, guess


def confident_joint(labels: np.ndarray, probs: np.ndarray,
                    thresholds: np.ndarray | None = None) -> np.ndarray:
    """The (uncalibrated) confident joint: ``C[i, j]`` images given ``i`` confidently ``j``.

    The diagonal is at least 1 (as in the paper's implementation: a class is never estimated
    to vanish).
    """
    y, p = _check(labels, probs)
    t = class_thresholds(y, p) if thresholds is None else np.asarray(thresholds, dtype=float)
    confident, guess = _confident_guess(p, t)
    k = p.shape[1]
    # Built as the transpose of (guess x given), as the paper's implementation does: the float
    # sums of the calibration then add up in the same order and break .5 ties the same way.
    cj = confusion_matrix(guess[confident], y[confident], labels=range(k)).T \
        if confident.any() else np.zeros((k, k), dtype=np.int64)
    np.fill_diagonal(cj, np.maximum(cj.diagonal(), 1))
    return cj


def calibrate_joint(cj: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rescale the confident joint so that row ``i`` sums to the number of images given ``i``
    and the whole to N (float counts, then rounded keeping the row totals)."""
    k = cj.shape[0]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k).astype(float)
    rows = cj.sum(axis=1).astype(float)
    # The order of operations of the paper's implementation: ties at .5 round the same way.
    out = (cj.T / np.clip(rows, 1e-12, None) * counts).T
    out = out / np.clip(np.sum(out), 1e-12, None) * counts.sum()
    return _round_rows(out)


def _round_rows(m: np.ndarray) -> np.ndarray:
    """Round each row to integers keeping its (rounded) total: round every entry, then move
    the difference onto the entries rounding moved farthest the other way."""
    out = np.rint(m).astype(np.int64)
    for i, row in enumerate(m):
        short = int(np.rint(row.sum())) - int(out[i].sum())
        if short:
            order = np.argsort(row - out[i])  # most rounded-up first
            pick = order[::-1][:short] if short > 0 else order[:-short]
            out[i, pick] += int(np.sign(short))
    return out


def noise_matrix(joint: np.ndarray) -> np.ndarray:
    """``P(given = i | true = j)`` from a (calibrated) joint: each column normalised; a column
    of zeros (a class never estimated true) is the identity column."""
    j = np.asarray(joint, dtype=float)
    cols = j.sum(axis=0)
    out = np.where(cols > 0, j / np.where(cols > 0, cols, 1.0), 0.0)
    for c in np.flatnonzero(cols == 0):
        out[c, c] = 1.0
    return out


def issue_mask(labels: np.ndarray, probs: np.ndarray,
               thresholds: np.ndarray | None = None) -> np.ndarray:
    """Which images confident learning flags: counted off the diagonal of the confident joint,
    except where the given class is (within :data:`TOLERANCE`) the most probable one."""
    y, p = _check(labels, probs)
    t = class_thresholds(y, p) if thresholds is None else np.asarray(thresholds, dtype=float)
    confident, guess = _confident_guess(p, t)
    flagged = confident & (guess != y)
    lifted = p.copy()
    lifted[np.arange(len(y)), y] += TOLERANCE
    return flagged & (lifted.argmax(axis=1) != y)


@dataclass(frozen=True, eq=False)
class LabelIssues:
    """Confident learning over one set of out-of-sample probabilities."""

    thresholds: np.ndarray  # (K,) per-class thresholds (mean self-confidence)
    joint: np.ndarray  # (K, K) calibrated confident joint (rows: given, columns: true)
    noise: np.ndarray  # (K, K) P(given = row | true = column)
    self_confidence: np.ndarray  # (N,) p[given]
    suggested: np.ndarray  # (N,) the class confident learning counts each image in (else argmax)
    flagged: np.ndarray  # (N,) bool
    ranked: np.ndarray  # indices of the flagged images, lowest self-confidence first

    @property
    def n_issues(self) -> int:
        return int(self.flagged.sum())

    def rank_of(self) -> np.ndarray:
        """(N,) 1-based issue rank of each image; 0 where not flagged."""
        out = np.zeros(len(self.flagged), dtype=np.int64)
        out[self.ranked] = np.arange(1, len(self.ranked) + 1)
        return out


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """Thresholds, confident joint, noise matrix and the ranked issues (see the module).

    Args:
        labels: (N,) given class indices.
        probs: (N, K) out-of-sample probabilities (rows sum to 1).

    Returns:
        The :class:`LabelIssues`; issues are ranked by self-confidence (ties by index).

    Raises:
        ConfigError: shapes disagree, labels out of range, or probabilities are not rows of
            a distribution.
    """
    y, p = _check(labels, probs)
    t = class_thresholds(y, p)
    joint = calibrate_joint(confident_joint(y, p, t), y)
    confident, guess = _confident_guess(p, t)
    suggested = np.where(confident, guess, p.argmax(axis=1))
    conf = p[np.arange(len(y)), y]
    flagged = issue_mask(y, p, t)
    idx = np.flatnonzero(flagged)
    ranked = idx[np.lexsort((idx, conf[idx]))]
    return LabelIssues(t, joint, noise_matrix(joint), conf, suggested, flagged, ranked)


def detection_scores(is_noisy: np.ndarray, self_confidence: np.ndarray,
                     flagged: np.ndarray) -> dict[str, float]:
    """How well issues find known wrong labels (the label-noise benchmark): AUROC of
    ``1 - self-confidence``, precision and recall of the flagged set, precision at k = the
    number of wrong labels (the k lowest self-confidences).

    Raises:
        ConfigError: lengths differ, or no (or only) wrong labels.
    """
    from sklearn.metrics import roc_auc_score

    noisy = np.asarray(is_noisy, dtype=bool)
    conf = np.asarray(self_confidence, dtype=float)
    flag = np.asarray(flagged, dtype=bool)
    if not (len(noisy) == len(conf) == len(flag)) or noisy.all() or not noisy.any():
        raise ConfigError("need one flag and score per image and both wrong and right labels. "
                          f"Received: {len(noisy)} labels ({int(noisy.sum())} wrong), "
                          f"{len(conf)} scores, {len(flag)} flags")
    k = int(noisy.sum())
    top = np.argsort(conf, kind="stable")[:k]
    tp = int((flag & noisy).sum())
    return {"auroc": float(roc_auc_score(noisy, 1.0 - conf)),
            "precision": tp / int(flag.sum()) if flag.any() else 0.0,
            "recall": tp / k, "precision_at_k": float(noisy[top].mean()), "k": k,
            "n_flagged": int(flag.sum())}
