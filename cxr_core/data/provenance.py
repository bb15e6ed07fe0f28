"""Which labels a number was scored against, and whether the model had seen the images.

Every evaluation stores the label version it used (:class:`Truth`: "original" folder labels
or "current" labels with relabels up to a relabel id, and their hash over the evaluated
images). Compare re-derives the truth of stored per-image outputs from one chosen version, so
runs evaluated before and after a round of relabelling are scored against the same labels.

The rules only, no database: the labels of a version are read by
:func:`cxr_core.storage.relabels.label_version` (up to :func:`as_of_relabel_id`), which hashes
them with :func:`labels_hash` as here. TF-free: pages import it at load.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.core.labels import Label, labels_hash, scheme_label, scheme_of_classes

LABEL_SOURCES = ("current", "original")
LABEL_SOURCE_TEXT = {"current": "current labels (relabels applied)",
                     "original": "original labels (as indexed from the folders)"}


def check_source(source: str) -> str:
    """``source`` if it is a label source ("current" or "original"), else ConfigError."""
    if source not in LABEL_SOURCES:
        raise ConfigError(f"labels must be one of {LABEL_SOURCES}. Received: labels={source!r}")
    return source


def as_of_relabel_id(source: str, relabel_id: int | None = None) -> int | None:
    """The newest relabel id a label version reads: 0 (no relabel) for "original"; for
    "current" ``relabel_id`` (None: every relabel up to now).

    Raises:
        ConfigError: an unknown label source.
    """
    return 0 if check_source(source) == "original" else relabel_id


def infer_scheme(labels: Sequence[str]) -> str:
    """The label scheme of a model's classes (for evaluations stored without one)."""
    return scheme_of_classes(labels)


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


def make_truth(label_map: Mapping[int, Label], image_ids: Sequence[int],
               labels: Sequence[str], scheme: str, source: str,
               relabel_id: int | None) -> Truth:
    """:class:`Truth` of ``image_ids`` from an image id -> (label, subtype) map."""
    y = np.full(len(image_ids), -1, dtype=np.int64)
    scoped: dict[int, Label] = {}
    for k, image_id in enumerate(image_ids):
        if image_id not in label_map:
            continue
        label, subtype = scoped[image_id] = label_map[image_id]
        name = scheme_label(label, subtype, scheme)
        if name in labels:
            y[k] = list(labels).index(name)
    return Truth(source, scheme, relabel_id if source == "current" else None,
                 labels_hash(scoped), y)


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
                     "and the best epoch were chosen on them"
                     + ("" if overlap.get("calib_images") is not None else ", and the threshold")
                     + ")")
    if overlap.get("calib_images"):
        parts.append(f"{overlap['calib_images']} were its calibration slice (its threshold "
                     "was chosen on them)")
    if overlap.get("same_content"):
        parts.append(f"{overlap['same_content']} are byte-identical to images it trained or "
                     "selected on")
    if overlap.get("train_patients"):
        parts.append(f"{overlap['train_patients']} patients are shared with its training set")
    if overlap.get("val_patients") and not overlap.get("val_images"):
        parts.append(f"{overlap['val_patients']} patients are shared with its validation set")
    if overlap.get("calib_patients") and not overlap.get("calib_images"):
        parts.append(f"{overlap['calib_patients']} patients are shared with its calibration "
                     "slice")
    if not parts:
        return None
    return "Scored on data the model has seen: " + "; ".join(parts) + \
        ". These figures are optimistic and do not estimate performance on new patients."
