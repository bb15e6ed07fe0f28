"""The label vocabulary every layer shares: split names, label schemes, class names, how a
folder label and subtype map to a scheme's class, and the identity (hash) of a label set.

Pure and tiny: storage stores labels in these terms and data, training and review read them.
Imports nothing of ours but :mod:`cxr_core.core.errors`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from cxr_core.core.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")
LABEL_SCHEMES = ("binary", "three_class", "folders", "subtype")
BINARY_CLASSES = ("NORMAL", "PNEUMONIA")
THREE_CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
# The second step of the clinicians' hierarchical reading: among pneumonia films only,
# bacterial vs viral (normal films and pneumonia without a stated subtype have no class).
SUBTYPE_CLASSES = ("BACTERIA", "VIRUS")


def scheme_classes(scheme: str, folder_classes: Sequence[str]) -> tuple[str, ...]:
    """Class names (model output order) of a label scheme."""
    if scheme == "binary":
        return BINARY_CLASSES
    if scheme == "three_class":
        return THREE_CLASSES
    if scheme == "subtype":
        return SUBTYPE_CLASSES
    if scheme == "folders":
        return tuple(sorted(folder_classes))
    raise ConfigError(f"label_scheme must be one of {LABEL_SCHEMES}. Received: label_scheme={scheme!r}")


def scheme_of_classes(labels: Sequence[str]) -> str:
    """The label scheme a model's class list belongs to (for models and evaluations stored
    without one): binary, three_class or subtype by their fixed class lists, else folders."""
    for scheme, classes in (("binary", BINARY_CLASSES), ("three_class", THREE_CLASSES),
                            ("subtype", SUBTYPE_CLASSES)):
        if tuple(labels) == classes:
            return scheme
    return "folders"


def scheme_label(label: str, subtype: str | None, scheme: str) -> str | None:
    """Map an (original or current) folder label to the scheme's class, or None if it has none.

    Binary treats every non-NORMAL class as pneumonia (COVID-19 pneumonia included);
    three_class needs the bacteria/virus subtype from the file name; subtype has a class only
    for pneumonia with a stated subtype (normal films are not its question).
    """
    if scheme == "folders":
        return label
    is_normal = label.upper() == "NORMAL"
    if scheme == "binary":
        return "NORMAL" if is_normal else "PNEUMONIA"
    if scheme == "three_class":
        if is_normal:
            return "NORMAL"
        return subtype.upper() if subtype in ("bacteria", "virus") else None
    if scheme == "subtype":
        if is_normal:
            return None
        return subtype.upper() if subtype in ("bacteria", "virus") else None
    raise ConfigError(f"label_scheme must be one of {LABEL_SCHEMES}. Received: label_scheme={scheme!r}")


Label = tuple[str, str | None]  # (folder class, subtype)

# A reviewer may call a film pneumonia without guessing bacterial or viral: the label is
# (PNEUMONIA, None). Binary training uses it; three-class training leaves it out (and says
# how many); nothing invents a subtype for it.
UNSTATED_SUBTYPE_TEXT = "subtype not stated"


def format_label(label: str, subtype: str | None) -> str:
    """``PNEUMONIA·virus`` for a label with a subtype, else the folder class."""
    return f"{label}·{subtype}" if subtype else label


def labels_hash(labels: Mapping[int, Label]) -> str:
    """sha256 over the sorted (image_id, label, subtype) triples: the identity of a label set."""
    h = hashlib.sha256()
    for image_id in sorted(labels):
        label, subtype = labels[image_id]
        h.update(f"{image_id}\t{label}\t{subtype or ''}\n".encode())
    return h.hexdigest()
