"""The calibration slice: part of the validation patients set apart to choose the threshold on.

Model selection (early stopping, the best epoch) and the choice of the operating point are two
uses of held-out data; made on the same images, the reported sensitivity and specificity are
those of the images the threshold was fitted to. :func:`carve_calibration` splits a run's
validation images in two, grouped like the validation split itself (a patient's images and
byte-identical files stay together), stratified by class and seeded:

- the **selection** part: what training monitors (``val_*`` metrics, early stopping, best epoch);
- the **calibration** slice: never seen by training; the threshold is chosen there only.

Pure: no database, no TensorFlow.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxr_core.core.records import ImageRecord
from cxr_core.data.splits import split_groups


@dataclass(frozen=True)
class CalibrationSplit:
    """The validation images split into selection and calibration (image ids)."""

    selection: tuple[int, ...]
    calibration: tuple[int, ...]
    fraction: float  # the asked share of validation images (TrainConfig.calibration_fraction)
    skipped: str | None = None  # why no slice was carved (then calibration is empty)

    @property
    def n_calibration(self) -> int:
        return len(self.calibration)


def carve_calibration(records: Sequence[ImageRecord], labels: Sequence[str], *,
                      fraction: float, seed: int = 0) -> CalibrationSplit:
    """Split validation images into a selection part and a calibration slice.

    Within each class (a group's class is its most common label), the groups are shuffled with
    ``seed`` and taken until ``fraction`` of that class's images are in the slice, at least one
    group, always leaving one for selection. A class with fewer than two groups cannot be in
    both parts: then no slice is carved and ``skipped`` says why (the threshold is chosen on
    validation, as with ``fraction`` 0, and the run's card says so).

    Args:
        records: the validation images.
        labels: the class name of each.
        fraction: share of the validation images for the slice, in [0, 1).
        seed: the shuffling seed (the run's ``split_seed``): the same seed, the same slice.

    Returns:
        The split; ``calibration`` is empty when ``fraction`` is 0 or nothing could be carved.
    """
    ids = tuple(int(r.id) for r in records)
    if not fraction:
        return CalibrationSplit(ids, (), 0.0, "calibration_fraction is 0")
    groups = split_groups(records)
    members: dict[int, list[int]] = {}
    for k, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(k)
    by_class: dict[str, list[int]] = {}
    for g, idx in sorted(members.items(), key=lambda kv: min(ids[k] for k in kv[1])):
        cls = Counter(labels[k] for k in idx).most_common(1)[0][0]
        by_class.setdefault(str(cls), []).append(g)
    few = {c: len(gs) for c, gs in sorted(by_class.items()) if len(gs) < 2}
    if few or len(by_class) < 2:
        return CalibrationSplit(ids, (), float(fraction), (
            "the validation split is too small to set a calibration slice apart: each class "
            "needs 2+ patient groups (one for selection, one for the slice). Received: "
            f"{ {c: len(gs) for c, gs in sorted(by_class.items())} } groups per class"))
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for cls in sorted(by_class):
        order = [by_class[cls][i] for i in rng.permutation(len(by_class[cls]))]
        total = sum(len(members[g]) for g in order)
        taken = 0
        for g in order[:-1]:  # the last group stays for selection
            if taken and taken >= fraction * total:
                break
            chosen.add(g)
            taken += len(members[g])
    calib = {k for g in chosen for k in members[g]}
    return CalibrationSplit(tuple(sorted(ids[k] for k in range(len(ids)) if k not in calib)),
                            tuple(sorted(ids[k] for k in calib)), float(fraction))
