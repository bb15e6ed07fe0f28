"""Agreement between reviewers: each reviewer's newest label, Cohen's kappa per pair, conflicts.

Computed from the append-only relabel rows (undone rows left out), for dataset images (by id)
and uploads (by sha256) alike.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cxr_core.errors import ConfigError
from cxr_core.review import format_label
from cxr_core.storage.relabels import RelabelRecord, active_relabels


def _latest_by_reviewer(
        relabels: Iterable[RelabelRecord]) -> dict[str, dict[int | str, RelabelRecord]]:
    """reviewer -> key (image id or upload sha256) -> that reviewer's newest active relabel."""
    latest: dict[str, dict[int | str, RelabelRecord]] = defaultdict(dict)
    for r in active_relabels(relabels):  # id order: newer rows overwrite older ones
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
class Agreement:
    """Every reviewer pair's agreement and the images they disagree on."""

    pairs: tuple[PairAgreement, ...]
    conflicts: tuple[Conflict, ...]


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two label sequences (sklearn); None when chance agreement is 1."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) != len(b):
        raise ConfigError(f"expected two equally long label lists. Received: {len(a)} and {len(b)}")
    if not a or len(set(a) | set(b)) < 2:
        return None
    k = float(cohen_kappa_score(list(a), list(b)))
    return None if math.isnan(k) else k


def agreement(relabels: Iterable[RelabelRecord]) -> Agreement:
    """Per-reviewer-pair Cohen's kappa and the list of conflicting images.

    Each reviewer's label of an image is their newest active relabel of it.
    """
    rows = _latest_by_reviewer(relabels)
    latest = {who: {i: format_label(r.new_label, r.new_subtype) for i, r in by_image.items()}
              for who, by_image in rows.items()}
    paths = {i: r.relpath for by_image in rows.values() for i, r in by_image.items()}
    pairs = []
    for a, b in itertools.combinations(sorted(latest), 2):
        common = sorted(set(latest[a]) & set(latest[b]), key=str)
        if not common:
            continue
        la, lb = [latest[a][i] for i in common], [latest[b][i] for i in common]
        agree = sum(x == y for x, y in zip(la, lb)) / len(common)
        pairs.append(PairAgreement(a, b, len(common), agree, cohen_kappa(la, lb)))
    by_image: dict[int | str, list[tuple[str, str]]] = defaultdict(list)
    for reviewer in sorted(latest):
        for image_id, label in latest[reviewer].items():
            by_image[image_id].append((reviewer, label))
    conflicts = [Conflict(i, paths[i], tuple(v))  # images (by id) first, then uploads
                 for i, v in sorted(by_image.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
                 if len({label for _, label in v}) > 1]
    return Agreement(tuple(pairs), tuple(conflicts))
