"""Shared pieces of the benchmarks: a real, class-balanced slice of the shared films."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CLASSES = ("NORMAL", "PNEUMONIA")


def default_shared_data() -> Path:
    """``$CXR_SHARED_DATA`` or the ``../shared/data`` beside the repository."""
    return Path(os.environ.get("CXR_SHARED_DATA")
                or Path(__file__).resolve().parents[2] / "shared" / "data")


def real_slice(shared_data: Path, per_class: int, name: str):
    """``per_class`` films of each class from ``chest_xray_224/train``, every 5th for validation.

    Returns a :class:`cxr_core.training.interface.TrainData` (imported here so that the TF-free benches
    never import TensorFlow).
    """
    from cxr_core.training import interface as train_io

    files = []
    for cls in CLASSES:
        found = sorted((Path(shared_data) / "chest_xray_224" / "train" / cls).glob("*.jpeg"))
        if not found:
            raise FileNotFoundError(f"no films under {shared_data}/chest_xray_224/train/{cls}")
        files += found[::max(1, len(found) // per_class)][:per_class]
    labels = np.array([CLASSES.index(f.parent.name) for f in files])
    is_val = np.arange(len(files)) % 5 == 0
    return train_io.TrainData(name, CLASSES, tuple([None] * len(files)),
                              tuple(str(f) for f in files), tuple(f.name for f in files),
                              labels, is_val)
