"""Benchmark: frozen-backbone epochs on cached features vs recomputing the backbone each epoch.

Both sides are the real training code (:func:`cxr_core.training.fit.train`) on the same real
films (``chest_xray_224/train``, a class-balanced slice), the same frozen MobileNetV2 at 96 px
and the same epochs; only ``cache_features`` differs:

* baseline (``cache_features=False``): every epoch runs the frozen backbone on every image;
* ours (``cache_features=True``): the backbone runs once per image (``feature_extractor``),
  then the epochs train only the head (``head_model``) on the stored features.

The backbone's weights come from a saved random-init model: no ImageNet file can be had
offline, and the timing does not depend on the weight values. A 1-epoch warm-up run first
builds the pixel cache both sides share. ``ratio`` is baseline wall time / ours for the whole
``train`` call (one-off feature pass, checkpoints, final validation prediction included);
``epoch_ratio`` compares one steady epoch (training + validation, epochs 2+). With more
images or epochs the whole-run ratio approaches the epoch ratio (fixed costs are amortised).

Run: ``python -m bench.features [SHARED_DATA]`` or ``python -m cxr_core bench features --json``.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import default_shared_data, real_slice
from cxr_core.models import graph as models
from cxr_core.models.specs import ModelConfig
from cxr_core.training import fit
from cxr_core.training.config import TrainConfig
from cxr_core.training.interface import TrainData, TrainResult

MODEL, SIZE, BATCH = "mobilenetv2", 96, 32


def _timed(cfg: TrainConfig, data: TrainData, run_dir: Path,
           cache_root: Path) -> tuple[float, TrainResult]:
    start = time.perf_counter()
    result = fit.train(cfg, data, run_dir, cache_root=cache_root)
    return time.perf_counter() - start, result


def run(shared_data: Path, *, epochs: int = 5, per_class: int = 200) -> dict:
    """Time both sides and return the bench JSON object.

    Args:
        shared_data: the shared data folder (holding ``chest_xray_224``).
        epochs: frozen-backbone epochs of each side.
        per_class: images per class in the slice (80% train, 20% validation).

    Returns:
        ``{"bench": "features", "baseline": {...}, "ours": {...}, "ratio": x, ...}``.
    """
    data = real_slice(shared_data, per_class, "bench:features")
    with tempfile.TemporaryDirectory(prefix="cxr-bench-features-") as tmp:
        root = Path(tmp)
        weights = root / "backbone.keras"
        models.build_model(ModelConfig(MODEL, SIZE, 1), 2).save(weights)
        base = dict(dataset="bench", model=MODEL, image_size=SIZE, channels=1,
                    weights=str(weights), augment="none", balancing="none", batch_size=BATCH,
                    early_stopping=False, lr_schedule="none")
        warm = TrainConfig.from_dict({**base, "epochs": 1, "freeze_epochs": 1,
                                               "cache_features": False})
        _timed(warm, data, root / "warm", root / "cache")  # pixel cache + first tracing
        spans = {}
        for name, cached in (("baseline", False), ("ours", True)):
            cfg = TrainConfig.from_dict({**base, "epochs": epochs,
                                                  "freeze_epochs": epochs,
                                                  "cache_features": cached})
            seconds, result = _timed(cfg, data, root / name, root / "cache")
            epoch_s = [h["epoch_time_s"] for h in result.history]
            spans[name] = {"seconds": round(seconds, 2), "epochs": result.epochs_done,
                           "epoch_s": [round(t, 2) for t in epoch_s],
                           "steady_epoch_s": round(float(np.median(epoch_s[1:])), 3),
                           "val_auc": round(float(result.history[-1].get("val_auc", 0)), 4)}
    b, o = spans["baseline"], spans["ours"]
    return {"bench": "features", "baseline": b, "ours": o,
            "ratio": round(b["seconds"] / o["seconds"], 2),
            "epoch_ratio": round(b["steady_epoch_s"] / o["steady_epoch_s"], 1),
            "model": MODEL, "image_size": SIZE, "batch_size": BATCH,
            "train_images": int((~data.is_val).sum()), "val_images": int(data.is_val.sum()),
            "epochs": epochs}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else default_shared_data())))
