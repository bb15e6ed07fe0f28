"""How many GPUs this host shows, without importing TensorFlow (the Train page's default recipe).

The NVIDIA driver lists one folder per GPU under ``/proc/driver/nvidia/gpus``; ``CUDA_VISIBLE_DEVICES``
narrows that the way CUDA does (``""`` or ``-1``: none). It is a hint for a form default: the
worker reports the devices TensorFlow really uses in each run's log
(:func:`cxr_core.training.runtime.gpu_count`).
"""
from __future__ import annotations

import os
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def visible_gpu_count(driver_dir: Path = NVIDIA_GPUS) -> int:
    """GPUs the NVIDIA driver lists, limited by ``CUDA_VISIBLE_DEVICES``; 0 without a driver."""
    try:
        present = sum(1 for _ in driver_dir.iterdir())
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    ids = [v for v in (part.strip() for part in visible.split(",")) if v]
    kept = []
    for v in ids:  # CUDA stops at the first invalid entry
        if v.startswith("-"):
            break
        kept.append(v)
    return min(present, len(kept))
