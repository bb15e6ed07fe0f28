"""What :func:`cxr_core.training.fit.train` takes and gives: prepared data, sinks, the result.

No TensorFlow here: the worker builds these without importing Keras.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_core.core.errors import ConfigError

# The metric keys a run's sinks write: per epoch (and the runner's log line), and the running
# training metrics within an epoch. The live chart (cxr_core.training.service) reads the same.
EPOCH_KEYS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")
BATCH_KEYS = ("loss", "accuracy", "auc")


@dataclass(frozen=True, eq=False)
class TrainData:
    """A run's images, labels and split, prepared from the index (by the worker).

    Attributes:
        dataset_key: names the dataset in cache keys.
        classes: class names in model-output order.
        image_ids: DB id per image (None for unindexed sources).
        paths: file path per image ("npz:<split>:<i>" for array datasets).
        file_ids: stable per-image ids for the cache key (id and content hash).
        labels: (N,) class index per image.
        is_val: (N,) True for validation images, False for training images.
        label_snapshot: hash of the labels used (part of the cache key).
        arrays: (N, H, W[, C]) uint8 pixels for array datasets (PneumoniaMNIST), else None.
        weights_path: ``weights`` resolved to a file ("run:ID" → that run's best.keras).
        train_repeat: (N,) times each training image enters an epoch (an extra dataset's
            ``repeat``: oversampling a small site sample); None: once each.
    """

    dataset_key: str
    classes: tuple[str, ...]
    image_ids: tuple[int | None, ...]
    paths: tuple[str, ...]
    file_ids: tuple[str, ...]
    labels: np.ndarray
    is_val: np.ndarray
    label_snapshot: str = ""
    arrays: np.ndarray | None = None
    weights_path: str | None = None
    train_repeat: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if not (len(self.image_ids) == len(self.file_ids) == len(self.labels)
                == len(self.is_val) == n) or (self.arrays is not None and len(self.arrays) != n):
            raise ConfigError(f"TrainData needs one id, path, label and split flag per image. "
                              f"Received: {len(self.image_ids)} ids, {n} paths, "
                              f"{len(self.labels)} labels, {len(self.is_val)} flags")
        if self.train_repeat is not None and (len(self.train_repeat) != n
                                              or np.any(np.asarray(self.train_repeat) < 1)):
            raise ConfigError("train_repeat needs one count >= 1 per image. Received: "
                              f"{len(self.train_repeat)} counts for {n} images")
        if len(self.classes) < 2:
            raise ConfigError(f"need at least 2 classes. Received: classes={list(self.classes)}")
        if not np.any(self.is_val) or np.all(self.is_val):
            raise ConfigError("need both training and validation images. Received: "
                              f"{int(np.sum(~self.is_val))} train, {int(np.sum(self.is_val))} val")


@dataclass(frozen=True)
class TrainSinks:
    """Where training reports to (the worker writes these to the DB; tests collect them).

    Attributes:
        on_epoch_end: (epoch number from 1, metrics) after the epoch's checkpoint is saved.
        on_batch_end: (global batch number, running metrics), at most every
            ``batch_interval_s`` seconds.
        should_cancel: polled after every batch; True stops the run within that batch.
        log: (level, message) lines for the run log.
        batch_interval_s: throttle of ``on_batch_end``.
    """

    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    on_batch_end: Callable[[int, dict[str, float]], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    log: Callable[[str, str], None] | None = None
    batch_interval_s: float = 2.0

    def say(self, message: str, level: str = "info") -> None:
        if self.log is not None:
            self.log(level, message)


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What a run produced (validation outputs for the worker to store)."""

    status: str  # finished | cancelled
    epochs_done: int
    history: tuple[dict[str, float], ...]  # one dict of metrics per epoch of this call
    best_epoch: int | None
    stopped_early: bool
    model_path: Path | None  # best.keras
    classes: tuple[str, ...]
    saliency_layer: str | None
    val_image_ids: tuple[int | None, ...] = ()
    val_paths: tuple[str, ...] = ()
    val_y: np.ndarray | None = None
    val_probs: np.ndarray | None = None  # (N, C)
    n_train: int = 0  # training images per epoch (after balancing)
    n_val: int = 0
    skipped: int = 0  # unreadable images left out
    images_per_s: float | None = None  # mean training throughput over this call's epochs
    feature_cache: bool = False  # a frozen stage trained on cached features
    weights_report: str | None = None
    parameters: dict | None = None  # {"total", "trainable", "non_trainable"} of the run's model


class RunCancelled(Exception):
    """Raised from a batch callback when the cancel flag is set."""
