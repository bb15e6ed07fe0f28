"""Process-wide TensorFlow state for one run: seeds, op determinism, the dtype policy and the
distribution strategy (one device, or ``MirroredStrategy`` over the GPUs).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import keras
import tensorflow as tf

from cxr_core.training.config import TrainConfig


def gpu_count() -> int:
    return len(tf.config.list_physical_devices("GPU"))


@contextmanager
def run_globals(cfg: TrainConfig) -> Iterator[None]:
    """Seeds, op determinism and the dtype policy for one run; restored afterwards."""
    policy = keras.mixed_precision.global_policy().name
    deterministic = cfg.deterministic if cfg.deterministic is not None else gpu_count() == 0
    det_cfg = _determinism_module()
    was_deterministic = bool(det_cfg and det_cfg.is_op_determinism_enabled())
    keras.utils.set_random_seed(cfg.seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
        if deterministic and not was_deterministic and det_cfg is not None:
            det_cfg.disable_op_determinism()


def _determinism_module() -> Any:
    # TF has no public switch back; without it determinism simply stays on in this process.
    try:
        from tensorflow.python.framework import config as tf_config
    except ImportError:  # pragma: no cover - other TF layouts
        return None
    ok = hasattr(tf_config, "disable_op_determinism") and hasattr(
        tf_config, "is_op_determinism_enabled")
    return tf_config if ok else None


def strategy(cfg: TrainConfig) -> tf.distribute.Strategy:
    if cfg.distribution == "mirrored" or (cfg.distribution == "auto" and gpu_count() > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


@contextmanager
def float32_policy() -> Iterator[None]:
    """Build input pipelines in float32: the augmenter's layers must not pick up
    mixed_float16 (pixels in [0, 255] lose precision in float16; the model casts itself)."""
    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)
