"""Agreement between readers beyond chance: Fleiss' kappa for three or more readers (Cohen's
kappa for a pair is scikit-learn's ``cohen_kappa_score``, used by :mod:`cxr_core.review.agreement`).

Pure numpy.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxr_core.core.errors import ConfigError


def rating_table(ratings: Sequence[Sequence[str]],
                 categories: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-subject category counts from each subject's list of ratings.

    Args:
        ratings: for each image, the labels its readers gave (one per reader).
        categories: the label order (default: sorted labels seen).

    Returns:
        ((subjects, categories) counts, the categories).
    """
    cats = tuple(categories) if categories is not None else tuple(
        sorted({r for row in ratings for r in row}))
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(ratings), len(cats)), dtype=np.int64)
    for s, row in enumerate(ratings):
        for r in row:
            if r not in index:
                raise ConfigError(f"rating {r!r} is not one of the categories {list(cats)}")
            table[s, index[r]] += 1
    return table, cats


def fleiss_kappa(table: np.ndarray) -> float | None:
    """Fleiss' kappa (Fleiss 1971) of a (subjects, categories) table of rating counts.

    Subjects may have different numbers of ratings (each needs at least 2): the per-subject
    agreement is ``sum n_ij (n_ij - 1) / (n_i (n_i - 1))`` and the chance agreement uses the
    category shares over all ratings; with the same number of ratings per subject this is the
    textbook formula exactly.

    Returns:
        Kappa, or None when chance agreement is 1 (every rating in one category).

    Raises:
        ConfigError: not a 2-D table of non-negative counts, or a subject rated fewer than twice.
    """
    t = np.asarray(table, dtype=float)
    if t.ndim != 2 or t.shape[0] == 0 or np.any(t < 0):
        raise ConfigError(f"expected a (subjects, categories) table of counts. Received: shape "
                          f"{t.shape}")
    n_i = t.sum(axis=1)
    if np.any(n_i < 2):
        raise ConfigError("every subject needs at least 2 ratings for Fleiss' kappa. Received: "
                          f"{int((n_i < 2).sum())} subject(s) with fewer")
    p_i = (t * (t - 1)).sum(axis=1) / (n_i * (n_i - 1))
    p_j = t.sum(axis=0) / t.sum()
    p_bar, p_e = float(p_i.mean()), float((p_j ** 2).sum())
    if np.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1.0 - p_e)
