"""Agreement between reviewers: each reviewer's newest label, Cohen's kappa per pair, Fleiss'
kappa when images have three or more readers, conflicts.

Computed from the append-only relabel rows (undone rows left out), for dataset images (by id)
and uploads (by sha256) alike: :func:`agreement` aggregates them in SQL;
:func:`labels_by_reviewer` reads the rows of one image.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.review.queues import format_label
from cxr_core.storage import Database
from cxr_core.storage import review_queue as queue_store
from cxr_core.storage.relabels import READ_KINDS, RelabelRecord, active_relabels


def _latest_by_reviewer(
        relabels: Iterable[RelabelRecord]) -> dict[str, dict[int | str, RelabelRecord]]:
    """reviewer -> key (image id or upload sha256) -> that reviewer's newest active relabel or
    read (a consensus or an adjudication is no reader's own answer)."""
    latest: dict[str, dict[int | str, RelabelRecord]] = defaultdict(dict)
    for r in active_relabels(relabels):  # id order: newer rows overwrite older ones
        if r.kind in READ_KINDS:
            latest[r.reviewer][r.key] = r
    return latest


def labels_by_reviewer(relabels: Iterable[RelabelRecord],
                       image_id: int | str) -> list[tuple[str, str]]:
    """(reviewer, label) of every reviewer who labelled the image (id) or upload (sha256)."""
    return [(who, format_label(rows[image_id].new_label, rows[image_id].new_subtype))
            for who, rows in sorted(_latest_by_reviewer(relabels).items()) if image_id in rows]


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of two reviewers over the images both labelled."""

    reviewer_a: str
    reviewer_b: str
    n_images: int
    agreement: float  # observed fraction of equal labels
    kappa: float | None  # Cohen's kappa; None when undefined (one label used by both)


@dataclass(frozen=True)
class Conflict:
    """An image (or upload) whose reviewers' newest labels differ."""

    image_id: int | str  # an upload's sha256
    relpath: str
    labels: tuple[tuple[str, str], ...]  # (reviewer, label) pairs


@dataclass(frozen=True)
class GroupAgreement:
    """Fleiss' kappa over the images read by three or more readers."""

    n_images: int
    n_readers: int  # distinct readers of the dataset's films
    ratings_per_image: float  # mean readers per image
    kappa: float | None  # None when undefined (every rating one label)


@dataclass(frozen=True)
class Agreement:
    """Every reviewer pair's agreement, Fleiss' kappa for three or more readers, and the
    images they disagree on."""

    pairs: tuple[PairAgreement, ...]
    conflicts: tuple[Conflict, ...]  # a page of them
    n_conflicts: int = 0  # all of them
    fleiss: GroupAgreement | None = None  # None: no image has three readers

    def to_json(self) -> dict:
        return {"pairs": [p.__dict__ for p in self.pairs],
                "conflicts": [{"image_id": c.image_id, "relpath": c.relpath,
                               "labels": [list(x) for x in c.labels]} for c in self.conflicts],
                "n_conflicts": self.n_conflicts,
                "fleiss": None if self.fleiss is None else self.fleiss.__dict__}

    @classmethod
    def from_json(cls, d: dict) -> Agreement:
        return cls(tuple(PairAgreement(**p) for p in d["pairs"]),
                   tuple(Conflict(c["image_id"], c["relpath"],
                                  tuple(tuple(x) for x in c["labels"])) for c in d["conflicts"]),
                   int(d["n_conflicts"]),
                   GroupAgreement(**d["fleiss"]) if d.get("fleiss") else None)


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two label sequences (sklearn); None when chance agreement is 1."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) != len(b):
        raise ConfigError(f"expected two equally long label lists. Received: {len(a)} and {len(b)}")
    if not a or len(set(a) | set(b)) < 2:
        return None
    k = float(cohen_kappa_score(list(a), list(b)))
    return None if math.isnan(k) else k


def kappa_from_counts(cells: Sequence[tuple[str, str, int]]) -> float | None:
    """Cohen's kappa from (label of a, label of b, count) cells: (p_o - p_e) / (1 - p_e), the
    formula :func:`cohen_kappa` (sklearn) computes from the label lists; None when chance
    agreement is 1 (one label used by both)."""
    n = sum(c for _, _, c in cells)
    if not n:
        return None
    observed = sum(c for x, y, c in cells if x == y) / n
    row: dict[str, int] = defaultdict(int)
    col: dict[str, int] = defaultdict(int)
    for x, y, c in cells:
        row[x] += c
        col[y] += c
    chance = sum(row[k] * col.get(k, 0) for k in row) / (n * n)
    if math.isclose(chance, 1.0):
        return None
    return (observed - chance) / (1.0 - chance)


def agreement(db: Database, dataset_id: int, *, conflicts_limit: int = 50,
              conflicts_offset: int = 0) -> Agreement:
    """Per-reviewer-pair Cohen's kappa and a page of the conflicting images, aggregated in SQL
    (:mod:`cxr_core.storage.review_queue`): no relabel table is read into Python.

    Each reviewer's label of an image (or upload) is their newest active relabel of it.
    """
    with db.session() as s:
        cells, (n_conflicts, page) = queue_store.agreement_tables(
            session=s, dataset_id=dataset_id, limit=conflicts_limit, offset=conflicts_offset)
        ratings = queue_store.rating_counts(session=s, dataset_id=dataset_id, min_readers=3)
    tables: dict[tuple[str, str], list[tuple[str, str, int]]] = defaultdict(list)
    for a, b, la, lb, n in cells:
        tables[(a, b)].append((la, lb, n))
    pairs = []
    for (a, b), rows in sorted(tables.items()):
        n = sum(c for _, _, c in rows)
        agree = sum(c for x, y, c in rows if x == y) / n
        pairs.append(PairAgreement(a, b, n, agree, kappa_from_counts(rows)))
    conflicts = tuple(Conflict(int(k) if k.isdigit() else k, relpath, tuple(labels))
                      for k, relpath, labels in page)
    readers = {r for a, b, *_ in cells for r in (a, b)}
    return Agreement(tuple(pairs), conflicts, n_conflicts,
                     group_agreement(ratings, len(readers)))


def group_agreement(ratings: Sequence[tuple[str, str, int]],
                    n_readers: int) -> GroupAgreement | None:
    """Fleiss' kappa from (image key, label, readers) rows (:mod:`cxr_core.stats.agreement`);
    None without an image read by three or more readers."""
    from cxr_core.stats.agreement import fleiss_kappa

    keys = sorted({k for k, _, _ in ratings})
    if not keys:
        return None
    labels = sorted({label for _, label, _ in ratings})
    row, col = {k: i for i, k in enumerate(keys)}, {c: j for j, c in enumerate(labels)}
    table = np.zeros((len(keys), len(labels)), dtype=np.int64)
    for k, label, n in ratings:
        table[row[k], col[label]] += n
    return GroupAgreement(len(keys), n_readers, float(table.sum(axis=1).mean()),
                          fleiss_kappa(table))
