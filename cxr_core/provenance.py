"""Which labels a number was scored against, and whether the model had seen the images.

Every evaluation stores the label version it used (:class:`Truth`: "original" folder labels
or "current" labels with relabels up to a relabel id, and their hash over the evaluated
images). Compare re-derives the truth of stored per-image outputs from one chosen version, so
runs evaluated before and after a round of relabelling are scored against the same labels.

TF-free: pages import it at load.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from cxr_core.datasets import BINARY_CLASSES, THREE_CLASSES, scheme_label
from cxr_core.errors import ConfigError
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import reviews

LABEL_SOURCES = ("current", "original")
LABEL_SOURCE_TEXT = {"current": "current labels (relabels applied)",
                     "original": "original labels (as indexed from the folders)"}


def check_source(source: str) -> str:
    if source not in LABEL_SOURCES:
        raise ConfigError(f"labels must be one of {LABEL_SOURCES}. Received: labels={source!r}")
    return source


def infer_scheme(labels: Sequence[str]) -> str:
    """The label scheme of a model's classes (for evaluations stored without one)."""
    if tuple(labels) == BINARY_CLASSES:
        return "binary"
    if tuple(labels) == THREE_CLASSES:
        return "three_class"
    return "folders"


@dataclass(frozen=True)
class Truth:
    """The class index of each image under one label version (-1: no class under it)."""

    source: str  # "original" | "current"
    scheme: str
    relabel_id: int | None  # newest relabel applied (None: none; always None for original)
    hash: str  # sha256 of the (image id, label, subtype) of the scored images
    y: np.ndarray  # (N,) int64, -1 where the image has no class under the scheme / is unknown

    @property
    def text(self) -> str:
        """e.g. ``current labels (relabels ≤ #57) · 3f2a9c1b``."""
        if self.source == "original":
            what = "original labels"
        else:
            what = ("current labels (relabels ≤ #%d)" % self.relabel_id if self.relabel_id
                    else "current labels (no relabels yet)")
        return f"{what} · {self.hash[:8]}"


def dataset_labels(session: Session, dataset_id: int, source: str, *,
                   as_of_relabel_id: int | None = None, include_missing: bool = False
                   ) -> tuple[dict[int, reviews.Label], int | None]:
    """(image id -> (label, subtype), newest relabel applied) of one label version.

    "current" reads the relabels once and derives the labels from exactly those rows, so a
    relabel committed meanwhile cannot make labels and relabel id disagree.
    """
    check_source(source)
    if source == "original":
        return reviews.original_labels(session=session, dataset_id=dataset_id,
                                       include_missing=include_missing), None
    records = reviews.list_relabels(session=session, dataset_id=dataset_id,
                                    as_of_relabel_id=as_of_relabel_id)
    originals = reviews.original_labels(session=session, dataset_id=dataset_id,
                                        include_missing=include_missing)
    return reviews.derive_labels(originals, records), (records[-1].id if records else None)


def truth_of(session: Session, image_ids: Sequence[int | None], labels: Sequence[str],
             scheme: str, source: str) -> Truth:
    """The truth of indexed images (any datasets) under one label version, as of now.

    Raises:
        ConfigError: an image without a DB id (its labels cannot be re-derived).
    """
    if any(i is None for i in image_ids):
        raise ConfigError("labels can only be re-derived for indexed images; this evaluation "
                          "has images without a database id")
    ids = [int(i) for i in image_ids]  # type: ignore[arg-type]
    datasets = {r.id: r.dataset_id for r in ds_store.get_images(session=session, image_ids=ids)}
    label_map: dict[int, reviews.Label] = {}
    newest: int | None = None
    for dataset_id in sorted(set(datasets.values())):
        found, rid = dataset_labels(session, dataset_id, source, include_missing=True)
        label_map.update(found)
        newest = max(newest or 0, rid or 0) or None
    return make_truth(label_map, ids, labels, scheme, source, newest)


def make_truth(label_map: Mapping[int, reviews.Label], image_ids: Sequence[int],
               labels: Sequence[str], scheme: str, source: str,
               relabel_id: int | None) -> Truth:
    """:class:`Truth` of ``image_ids`` from an image id -> (label, subtype) map."""
    y = np.full(len(image_ids), -1, dtype=np.int64)
    scoped: dict[int, reviews.Label] = {}
    for k, image_id in enumerate(image_ids):
        if image_id not in label_map:
            continue
        label, subtype = scoped[image_id] = label_map[image_id]
        name = scheme_label(label, subtype, scheme)
        if name in labels:
            y[k] = list(labels).index(name)
    return Truth(source, scheme, relabel_id if source == "current" else None,
                 reviews.labels_hash(scoped), y)


def overlap_warning(overlap: Mapping | None, n: int) -> str | None:
    """A sentence for an evaluation scored on images (or patients) its run trained or selected
    on, or None when there is no overlap (or the run's images were not recorded)."""
    if not overlap or not overlap.get("recorded"):
        return None
    parts = []
    if overlap.get("train_images"):
        parts.append(f"{overlap['train_images']} of the {n} images were in its training set")
    if overlap.get("val_images"):
        parts.append(f"{overlap['val_images']} were its validation images (early stopping "
                     "and the threshold were chosen on them)")
    if overlap.get("same_content"):
        parts.append(f"{overlap['same_content']} are byte-identical to images it trained or "
                     "selected on")
    if overlap.get("train_patients"):
        parts.append(f"{overlap['train_patients']} patients are shared with its training set")
    if overlap.get("val_patients") and not overlap.get("val_images"):
        parts.append(f"{overlap['val_patients']} patients are shared with its validation set")
    if not parts:
        return None
    return "Scored on data the model has seen: " + "; ".join(parts) + \
        ". These figures are optimistic and do not estimate performance on new patients."
