"""Benchmark: training throughput of the default recipe, float32 vs mixed precision (GPU).

Both sides are the real training code (:func:`cxr_core.training.fit.train`) with the
``default224`` recipe (its network, 224 px, its augmentation and class weights) on the same
real films (``chest_xray_224/train``, a class-balanced slice) for the same epochs; only
``mixed_precision`` differs:

* baseline: float32 everywhere;
* ours: the ``mixed_float16`` policy (float16 compute, float32 variables and predictions).

Throughput is training images per second of a steady epoch (epochs 2+; the first traces the
graph), as the run's own ``images_per_s`` metric reports it. ``ratio`` = ours / baseline.

Mixed precision only pays on a GPU with tensor cores; on a CPU it is emulated and slower, so
without a GPU the bench measures the float32 baseline, reports ``"ours": null``,
``"ratio": null`` and says why in ``"skipped"`` (pass ``cpu_mixed=True`` to time it anyway).

Run: ``python -m bench.training [SHARED_DATA]`` or ``python -m cxr_core bench training --json``.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import default_shared_data, real_slice

RECIPE = "default224"


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU only"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} x {details.get('device_name', 'GPU')}"


def _side(mixed: bool, data, root: Path, epochs: int, batch_size: int | None) -> dict:
    from cxr_core.training import fit
    from cxr_core.training.config import TrainConfig

    overrides = {"recipe": RECIPE, "dataset": "bench", "epochs": epochs,
                 "early_stopping": False, "lr_schedule": "none", "mixed_precision": mixed}
    if batch_size:
        overrides["batch_size"] = batch_size
    cfg = TrainConfig.from_dict(overrides)
    name = "mixed" if mixed else "fp32"
    start = time.perf_counter()
    result = fit.train(cfg, data, root / name, cache_root=root / "cache")
    seconds = time.perf_counter() - start
    rates = [h["images_per_s"] for h in result.history]
    return {"precision": "mixed_float16" if mixed else "float32",
            "images_per_s": round(float(np.median(rates[1:] or rates)), 1),
            "epoch_images_per_s": [round(r, 1) for r in rates],
            "seconds": round(seconds, 2), "batch_size": cfg.batch_size,
            "model": cfg.model, "image_size": cfg.image_size,
            "val_auc": round(float(result.history[-1].get("val_auc", 0.0)), 4)}


def run(shared_data: Path, *, per_class: int = 160, epochs: int = 3,
        batch_size: int | None = None, cpu_mixed: bool = False) -> dict:
    """Time both sides and return the bench JSON object.

    Args:
        shared_data: the shared data folder (holding ``chest_xray_224``).
        per_class: films per class in the slice (80% train, 20% validation).
        epochs: epochs per side (at least 2: the first one traces the graph).
        batch_size: None keeps the recipe's.
        cpu_mixed: time mixed precision even without a GPU.

    Returns:
        ``{"bench": "training", "baseline": {...}, "ours": {...} | None, "ratio": x | None}``.
    """
    from cxr_core.training.runtime import gpu_count

    if epochs < 2:
        raise ValueError(f"epochs must be at least 2 (the first traces the graph). "
                         f"Received: epochs={epochs}")
    gpus = gpu_count()
    data = real_slice(shared_data, per_class, "bench:training")
    with tempfile.TemporaryDirectory(prefix="cxr-bench-training-") as tmp:
        root = Path(tmp)
        baseline = _side(False, data, root, epochs, batch_size)
        ours = _side(True, data, root, epochs, batch_size) if gpus or cpu_mixed else None
    out = {"bench": "training", "recipe": RECIPE, "device": _device(), "gpus": gpus,
           "baseline": baseline, "ours": ours,
           "ratio": round(ours["images_per_s"] / baseline["images_per_s"], 2) if ours else None,
           "train_images": int((~data.is_val).sum()), "val_images": int(data.is_val.sum()),
           "epochs": epochs}
    if ours is None:
        out["skipped"] = ("no GPU: mixed precision (float16 tensor cores) only speeds up "
                          "training on a GPU; the float32 baseline was measured on the CPU")
    return out


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else default_shared_data())))
