"""Benchmark: our cached tf.data pipeline vs keras.utils.image_dataset_from_directory.

Both run in the same process over the same full-resolution films
(``chest_xray_fullres_sample/train``, 265 JPEGs) for several epochs. The baseline decodes and
resizes every file every epoch; ours decodes once into the cache and then gathers batches
from a memory map. The ratio uses epoch 2 on (epoch 1 of both includes tracing/warm-up;
our one-off decode is reported separately as ``cache_build_s``).

``input_bound`` answers "would training a small CNN wait for data?": the training step
rate on in-memory tensors vs the rate when the same model is fed through our pipeline.

Run: ``python -m bench.pipeline [SHARED_DATA]`` (prints one JSON object).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cxr_core.data.augment_config import PRESETS
from cxr_core.data.pipeline import ImageCache, build_cache, make_dataset

BATCH = 32
CLASSES = ("NORMAL", "PNEUMONIA")
# Training slower than this fraction of the in-memory rate counts as input-bound.
INPUT_BOUND_FRACTION = 0.8


def _epoch_rate(ds: tf.data.Dataset) -> float:
    """Images per second for one full pass over ``ds``."""
    start, n = time.perf_counter(), 0
    for _, labels in ds:
        n += int(labels.shape[0])
    return n / (time.perf_counter() - start)


def _interleaved_rates(first: tf.data.Dataset, second: tf.data.Dataset,
                       epochs: int) -> tuple[list[float], list[float]]:
    """Alternate epochs of the two pipelines, so both see the same machine load (the CPU
    may be shared with other work while the bench runs)."""
    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(epochs):
        rates[0].append(_epoch_rate(first))
        rates[1].append(_epoch_rate(second))
    return rates


def _small_cnn(image_size: int) -> keras.Model:
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def _fit_rate(model: keras.Model, ds: tf.data.Dataset, steps: int) -> float:
    """Images per second of ``model.fit`` over ``steps`` batches (after a traced warm-up)."""
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * BATCH / (time.perf_counter() - start)


def _input_bound(cache: ImageCache, image_size: int, steps: int = 8) -> dict:
    """Training rate of a small CNN on one in-memory batch vs fed through the pipeline.

    Both go through the same ``fit`` loop; only the data source differs, so the gap is
    the time the model waits for input.
    """
    model = _small_cnn(image_size)
    ds = make_dataset(cache, batch_size=BATCH, shuffle=True, seed=0, channels=3, repeat=True)
    in_memory = tf.data.Dataset.from_tensors(next(iter(ds))).repeat()
    step_rate = _fit_rate(model, in_memory, steps)
    fed_rate = _fit_rate(model, ds, steps)
    return {"step_images_per_s": step_rate, "fed_images_per_s": fed_rate,
            "input_bound": fed_rate < INPUT_BOUND_FRACTION * step_rate}


def _build(folder: Path, cache_root: Path, image_size: int,
           channels: int) -> tuple[ImageCache, float]:
    items = [(str(p), label) for label, cls in enumerate(CLASSES)
             for p in sorted((folder / cls).iterdir()) if p.is_file()]
    start = time.perf_counter()
    cache = build_cache(items, dataset_key="bench-fullres", image_size=image_size,
                        channels=channels, cache_root=cache_root)
    return cache, time.perf_counter() - start


def run(shared_data: Path, *, epochs: int = 3, image_size: int = 224) -> dict:
    """Measure both pipelines and return the bench JSON object.

    Args:
        shared_data: the shared data folder (holding ``chest_xray_fullres_sample``).
        epochs: passes over the data for each pipeline (at least 2 for a steady ratio).
        image_size: square side of the images both pipelines produce.

    Returns:
        ``{"bench": "pipeline", "baseline": {...}, "ours": {...}, "ratio": x,
        "input_bound": bool, "step_images_per_s": x, ...}``.
    """
    folder = Path(shared_data) / "chest_xray_fullres_sample" / "train"
    baseline_ds = keras.utils.image_dataset_from_directory(
        folder, image_size=(image_size, image_size), batch_size=BATCH, shuffle=True, seed=0,
        verbose=False)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as cache_root:
        # RGB like the baseline's color_mode="rgb": the cache holds exactly what the model
        # gets, and a batch is one contiguous copy plus a cast.
        cache, build_s = _build(folder, Path(cache_root), image_size, channels=3)
        ours_ds = make_dataset(cache, batch_size=BATCH, shuffle=True, seed=0, channels=3)
        baseline, ours = _interleaved_rates(baseline_ds, ours_ds, epochs)
        # With augmentation a grayscale cache is the better choice: the augmenter works on
        # one channel and the pipeline repeats it to RGB afterwards.
        gray, _ = _build(folder, Path(cache_root), image_size, channels=1)
        augmented = make_dataset(gray, batch_size=BATCH, shuffle=True, seed=0, channels=3,
                                 augment=PRESETS["rot10_shift_flip"])
        augmented_rate = max(_epoch_rate(augmented) for _ in range(2))
        bound = _input_bound(cache, image_size)
    steady = slice(1, None) if epochs > 1 else slice(None)
    return {
        "bench": "pipeline",
        "baseline": {"images_per_s": baseline, "images": cache.n + len(cache.skipped)},
        "ours": {"images_per_s": ours, "cache_build_s": build_s, "images": cache.n,
                 "skipped": len(cache.skipped), "augmented_images_per_s": augmented_rate},
        "ratio": float(np.mean(ours[steady]) / np.mean(baseline[steady])),
        "input_bound": bound["input_bound"],
        "step_images_per_s": bound["step_images_per_s"],
        "fed_images_per_s": bound["fed_images_per_s"],
        "epochs": epochs, "image_size": image_size, "batch_size": BATCH,
    }


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else default)))
