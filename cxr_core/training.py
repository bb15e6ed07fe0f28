"""TrainConfig → a fitted model, with callbacks. No database code here.

:func:`train` takes prepared inputs (:class:`TrainData`: images, labels, split) and a set of
sinks (:class:`TrainSinks`: ``on_epoch_end``, ``on_batch_end``, ``should_cancel``, ``log``);
:mod:`cxr_core.worker` connects those to the database. Everything a run writes to disk lives
under its run folder::

    <CXR_HOME>/runs/<id>/
      config.json                 the resolved TrainConfig
      best.keras                  the run's model: best epoch by `monitor` (restore_best),
                                  else the last epoch; what Predict/Evaluate load
      model_card.json             labels, size, saliency layer, operating point, val metrics, ...
      checkpoints/epoch_NNN.keras per-epoch checkpoints incl. optimizer state (newest kept)
      checkpoints/state.json      best value/epoch, so a resumed run keeps early stopping
      tensorboard/                keras.callbacks.TensorBoard logs

Cancel: ``should_cancel`` is polled after every batch; when it says yes, :class:`RunCancelled`
is raised from ``on_train_batch_end``. Keras 3.15's TF trainer does check
``model.stop_training`` after each batch, but then still runs the epoch's validation and
``on_epoch_end`` (which would checkpoint a half epoch); older Keras 2 versions checked it only
per epoch. Raising stops inside the same batch on every version, and the last checkpoint
stays the last complete epoch.

Frozen backbone stages (``freeze_epochs``): with no augmentation the backbone's features are
computed once (``models.feature_extractor``) and only the head (``models.head_model``, sharing
the weights) is trained on them, which makes those epochs far cheaper (``bench/features.py``).
With augmentation every epoch sees different pixels, so cached features would be wrong: the
stage then trains the full graph with the backbone frozen (features recomputed each batch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cxr_core import models as registry
from cxr_core import pipeline
from cxr_core.augment import PRESETS, AugmentConfig
from cxr_core.datasets import LABEL_SCHEMES
from cxr_core.errors import ConfigError, RunError

DEFAULT_RECIPE = "default224"
OPTIMIZERS = ("adam", "nadam", "rmsprop", "sgd")
LR_SCHEDULES = ("none", "plateau", "cosine")
LABEL_SOURCES = ("original", "current")
DISTRIBUTIONS = ("auto", "default", "mirrored")
MONITORS = ("val_loss", "val_auc", "val_accuracy")
DATA_LICENCE = "Kermany et al., Cell 2018, CC BY 4.0"
BEST_MODEL = "best.keras"
MODEL_CARD = "model_card.json"
CHECKPOINTS = "checkpoints"

# Recipes: a run config names one and gives only what it changes (DESIGN.md).
RECIPES: dict[str, dict[str, Any]] = {
    # The three recipes below were chosen by experiments on the patient-grouped validation
    # split of the real train folder (docs/experiments.md has every run, its numbers and time).
    # 224 px, trained from scratch (works offline): strided-stem BatchNorm CNN, zoom/shift
    # augmentation, class weights, plateau LR schedule, best epoch by validation AUC.
    "default224": dict(model="cxrnet_224", image_size=224, channels=1, augment="zoom_shift",
                       balancing="class_weights", optimizer="adam", learning_rate=1e-3,
                       lr_schedule="plateau", batch_size=32, epochs=12, patience=4,
                       monitor="val_auc"),
    # For a CPU-only user: the reports' 5-conv CNN at 128 px (the shipped demo model's recipe
    # until the 224 px one replaced it).
    "cpu128": dict(model="custom5_224", image_size=128, channels=1, augment="zoom_shift",
                   balancing="class_weights", optimizer="adam", learning_rate=1e-3,
                   lr_schedule="plateau", batch_size=32, epochs=12, patience=4,
                   monitor="val_auc"),
    # PneumoniaMNIST (28 px .npz): a BatchNorm CNN without downsampling stem.
    "mnist28": dict(model="cxrnet_28", image_size=28, channels=1, augment="none",
                    balancing="class_weights", optimizer="adam", learning_rate=1e-3,
                    lr_schedule="plateau", batch_size=128, epochs=20, patience=5,
                    monitor="val_auc"),
    # Small 50 px CNN, three classes, oversampled to NORMAL:BACTERIA:VIRUS = 2:1:2.
    "small50_3class": dict(model="small4_50", image_size=50, channels=1,
                           label_scheme="three_class", balancing="oversample",
                           target_ratio=(2.0, 1.0, 2.0), augment="rot10_shift_flip",
                           optimizer="adam", learning_rate=1e-3, lr_schedule="plateau",
                           batch_size=64, epochs=30, patience=6),
    # Transfer learning, two stages: frozen backbone (cached features), then fine-tune all.
    "mobilenet_transfer": dict(model="mobilenet", weights="imagenet", image_size=224,
                               channels=1, augment="none", balancing="class_weights",
                               freeze_epochs=5, unfreeze_top_k=None, finetune_lr_factor=0.1,
                               optimizer="adam", learning_rate=1e-3, lr_schedule="none",
                               batch_size=32, epochs=15, patience=4),
    "densenet121_transfer": dict(model="densenet121", weights="imagenet", image_size=224,
                                 channels=1, augment="none", balancing="class_weights",
                                 freeze_epochs=3, unfreeze_top_k=60, finetune_lr_factor=0.1,
                                 optimizer="adam", learning_rate=1e-3, lr_schedule="none",
                                 batch_size=16, epochs=12, patience=4),
    # COVID-19 folder datasets (COVID19|NORMAL|PNEUMONIA): undersample to the smallest class.
    "covid_undersample": dict(model="cnn1", image_size=150, channels=1, label_scheme="folders",
                              balancing="undersample", augment="rot30_zoom_shift_flip",
                              optimizer="adam", learning_rate=1e-3, lr_schedule="plateau",
                              batch_size=32, epochs=25, patience=5),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; stored as JSON with the run.

    Build it with :meth:`from_dict` (recipe defaults merged in). Field comments say what is
    not obvious; every invalid value raises ConfigError naming it.
    """

    recipe: str = DEFAULT_RECIPE  # the recipe whose defaults this config started from
    name: str = ""  # run name shown in the UI (default "run <id>")
    dataset: str = ""  # an indexed dataset's name, or a path (indexed on first use)
    label_scheme: str = "binary"
    label_source: str = "original"  # "current": labels as of now, clinician relabels included
    split_seed: int = 0
    val_fraction: float = 0.15  # share of patient groups carved from train for validation
    max_images: int | None = None  # stratified seeded subsample before splitting (quick runs)
    image_size: int = 224
    channels: int = 1  # films are grayscale; RGB backbones repeat the channel in-model
    augment: str | dict = "none"  # a PRESETS name, or an AugmentConfig as a dict
    balancing: str = "none"  # none | class_weights | oversample | undersample
    target_ratio: tuple[float, ...] | None = None  # class ratio for over/undersampling
    model: str = "custom5_224"  # a models.MODELS name
    weights: str | None = None  # None | "imagenet" | a file path | "run:ID"
    dropout: float | None = None  # head dropout; None keeps the architecture's own
    freeze_epochs: int = 0  # stage 1: epochs with the backbone frozen (needs weights)
    unfreeze_top_k: int | None = None  # stage 2: unfreeze the top K backbone layers (None: all)
    finetune_lr_factor: float = 0.1  # stage 2 learning rate = learning_rate * this
    cache_features: bool = True  # frozen stage without augmentation: compute features once
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "none"  # none | plateau (ReduceLROnPlateau) | cosine (per stage)
    batch_size: int = 32
    epochs: int = 10
    early_stopping: bool = True  # stop after `patience` epochs without a better `monitor`
    patience: int = 5
    monitor: str = "val_loss"
    restore_best: bool = True  # the run's model is the best epoch by `monitor`
    seed: int = 0
    deterministic: bool | None = None  # op determinism; None: on without a GPU, off with one
    mixed_precision: bool = False  # mixed_float16 (GPU speed; runs, slowly, on CPU)
    xla: bool | None = None  # jit_compile; None: Keras' "auto" (XLA on GPU only)
    distribution: str = "auto"  # auto (Mirrored with >1 GPU) | default | mirrored
    keep_checkpoints: int = 2  # newest per-epoch checkpoints kept (resume needs the last)
    target_sensitivity: float = 0.95  # operating point chosen on validation (binary)

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        self._check_stages()
        self.model_config()  # the model registry validates model, size, channels, weights
        aug = self.augment_config()
        if self.balancing == "oversample" and (aug is None or not aug.enabled_ops):
            raise ConfigError("balancing='oversample' repeats images and needs augmentation so "
                              f"the copies differ. Received: augment={self.augment!r}")

    def _check_choices(self) -> None:
        for name, allowed in (("recipe", tuple(RECIPES)), ("label_scheme", LABEL_SCHEMES),
                              ("label_source", LABEL_SOURCES), ("balancing", pipeline.BALANCING),
                              ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                              ("monitor", MONITORS), ("distribution", DISTRIBUTIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}. "
                                  f"Received: {name}={value!r}")
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string. Received: name={self.name!r}")
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError("dataset is required: an indexed dataset's name or a folder/.npz "
                              f"path. Received: dataset={self.dataset!r}")
        if self.monitor == "val_auc" and self.label_scheme != "binary":
            raise ConfigError("monitor='val_auc' is only tracked for binary runs. "
                              f"Received: monitor='val_auc', label_scheme={self.label_scheme!r}")
        for name in ("early_stopping", "restore_best", "cache_features", "mixed_precision"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false. "
                                  f"Received: {name}={getattr(self, name)!r}")
        for name in ("deterministic", "xla"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true, false or null. "
                                  f"Received: {name}={getattr(self, name)!r}")

    def _check_numbers(self) -> None:
        ints = {"split_seed": (0, None), "seed": (0, None), "batch_size": (1, 4096),
                "epochs": (1, 10_000), "patience": (1, 10_000), "freeze_epochs": (0, 10_000),
                "keep_checkpoints": (1, 1000)}
        for name, (lo, hi) in ints.items():
            value = getattr(self, name)
            if not _is_int(value) or value < lo or (hi is not None and value > hi):
                span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ConfigError(f"{name} must be an integer {span}. Received: {name}={value!r}")
        if self.max_images is not None and (not _is_int(self.max_images) or self.max_images < 4):
            raise ConfigError(f"max_images must be null or an integer >= 4. "
                              f"Received: max_images={self.max_images!r}")
        floats = {"val_fraction": (0.0, 0.5), "learning_rate": (0.0, 10.0),
                  "finetune_lr_factor": (0.0, 1.0), "target_sensitivity": (0.0, 1.0)}
        for name, (lo, hi) in floats.items():
            value = getattr(self, name)
            if not _is_num(value) or not lo < value <= hi:
                raise ConfigError(f"{name} must be a number in ({lo:g}, {hi:g}]. "
                                  f"Received: {name}={value!r}")
        if self.target_ratio is not None:
            ratio = self.target_ratio
            if not isinstance(ratio, (tuple, list)) or not ratio or not all(
                    _is_num(r) and r > 0 for r in ratio):
                raise ConfigError("target_ratio must be null or positive numbers, one per "
                                  f"class (e.g. [2, 1, 2]). Received: target_ratio={ratio!r}")
            object.__setattr__(self, "target_ratio", tuple(float(r) for r in ratio))

    def _check_stages(self) -> None:
        if self.freeze_epochs > self.epochs:
            raise ConfigError(f"freeze_epochs must be at most epochs ({self.epochs}). "
                              f"Received: freeze_epochs={self.freeze_epochs}")
        if self.freeze_epochs and self.weights is None:
            raise ConfigError("a frozen-backbone stage needs pretrained weights (imagenet, a "
                              f"file or run:ID). Received: freeze_epochs={self.freeze_epochs}, "
                              "weights=None")

    # -- Views ------------------------------------------------------------------------------

    def augment_config(self) -> AugmentConfig | None:
        """The augmentation (None for the "none" preset)."""
        if isinstance(self.augment, dict):
            return AugmentConfig.from_dict(self.augment)
        if not isinstance(self.augment, str) or self.augment not in PRESETS:
            raise ConfigError(f"augment must be one of {sorted(PRESETS)} or an augmentation "
                              f"dict. Received: augment={self.augment!r}")
        cfg = PRESETS[self.augment]
        return cfg if cfg.enabled_ops else None

    @property
    def augmenting(self) -> bool:
        aug = self.augment_config()
        return aug is not None and bool(aug.enabled_ops)

    def model_config(self, weights_path: str | None = None) -> registry.ModelConfig:
        """The models.ModelConfig; ``weights_path`` replaces a "run:ID" reference."""
        return registry.ModelConfig(
            name=self.model, image_size=self.image_size, channels=self.channels,
            dropout=self.dropout, weights=weights_path or self.weights,
            freeze_backbone=self.freeze_epochs > 0, unfreeze_top_k=self.unfreeze_top_k)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with the run (every field, recipe defaults resolved)."""
        data = dataclasses.asdict(self)
        if data["target_ratio"] is not None:
            data["target_ratio"] = list(data["target_ratio"])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config from a run config file: the recipe's defaults, then the given keys.

        Args:
            data: JSON object; ``recipe`` picks the defaults (``DEFAULT_RECIPE`` if absent).

        Raises:
            ConfigError: unknown recipe or key, or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("a run config must be a JSON object. "
                              f"Received: {type(data).__name__}")
        recipe = data.get("recipe") or DEFAULT_RECIPE
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {sorted(RECIPES)}. "
                              f"Received: recipe={recipe!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown run config keys; expected some of {sorted(known)}. "
                              f"Received: {unknown}")
        merged = {**RECIPES[recipe], **data, "recipe": recipe}
        if ("monitor" not in data and merged.get("monitor") == "val_auc"
                and merged.get("label_scheme", "binary") != "binary"):
            # A binary recipe's val_auc monitor has no multi-class counterpart tracked;
            # an explicit monitor='val_auc' with three classes still fails validation.
            merged["monitor"] = "val_loss"
        if isinstance(merged.get("target_ratio"), list):
            merged["target_ratio"] = tuple(merged["target_ratio"])
        return cls(**merged)


# -- Inputs and outputs ---------------------------------------------------------------------

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

    def __post_init__(self) -> None:
        n = len(self.paths)
        if not (len(self.image_ids) == len(self.file_ids) == len(self.labels)
                == len(self.is_val) == n) or (self.arrays is not None and len(self.arrays) != n):
            raise ConfigError(f"TrainData needs one id, path, label and split flag per image. "
                              f"Received: {len(self.image_ids)} ids, {n} paths, "
                              f"{len(self.labels)} labels, {len(self.is_val)} flags")
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


class RunCancelled(Exception):
    """Raised from a batch callback when the cancel flag is set."""


# -- Global state: seeds, determinism, precision, strategy ----------------------------------

def gpu_count() -> int:
    return len(tf.config.list_physical_devices("GPU"))


@contextmanager
def _run_globals(cfg: TrainConfig) -> Iterator[None]:
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


def _strategy(cfg: TrainConfig) -> tf.distribute.Strategy:
    if cfg.distribution == "mirrored" or (cfg.distribution == "auto" and gpu_count() > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# -- Data -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Inputs:
    cache: pipeline.ImageCache
    train_rows: np.ndarray  # cache rows
    val_rows: np.ndarray
    row_image: np.ndarray  # cache row → index into TrainData
    skipped: int


def _build_inputs(cfg: TrainConfig, data: TrainData, cache_root: Path,
                  sinks: TrainSinks) -> _Inputs:
    """Decode once into the pixel cache (or reuse it) and map the split onto cache rows."""
    progress = _cache_progress(sinks)
    common = dict(dataset_key=data.dataset_key, image_size=cfg.image_size,
                  channels=cfg.channels, cache_root=cache_root,
                  label_snapshot=data.label_snapshot, progress=progress)
    if data.arrays is not None:
        cache = pipeline.build_cache_from_arrays(data.arrays, data.labels, **common)
        kept = np.arange(len(data.paths))
    else:
        items = [pipeline.CacheItem(p, int(y), f) for p, y, f in
                 zip(data.paths, data.labels, data.file_ids)]
        cache = pipeline.build_cache(items, **common)
        bad = {item.id for item, _ in cache.skipped}
        kept = np.array([i for i, it in enumerate(items) if it.id not in bad], dtype=np.int64)
        for item, message in cache.skipped[:10]:
            sinks.say(f"left out unreadable image {item.path}: {message}", "warning")
    is_val = data.is_val[kept]
    rows = np.arange(len(kept))
    inputs = _Inputs(cache, rows[~is_val], rows[is_val], kept, len(data.paths) - len(kept))
    if not len(inputs.train_rows) or not len(inputs.val_rows):
        raise ConfigError("no readable training or validation image is left. Received: "
                          f"{len(inputs.train_rows)} train, {len(inputs.val_rows)} val")
    return inputs


def _cache_progress(sinks: TrainSinks) -> Callable[[int, int], None]:
    state = {"t": 0.0, "logged": -1}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        quarter = 4 * done // max(total, 1)
        if quarter != state["logged"]:
            state["logged"] = quarter
            sinks.say(f"image cache: {done}/{total}")
        if sinks.should_cancel is not None and now - state["t"] >= 1.0:
            state["t"] = now
            if sinks.should_cancel():
                raise RunCancelled("cancelled while caching images")
    return progress


# -- Model, optimizer, callbacks ------------------------------------------------------------

def _loss_and_metrics(n_classes: int) -> tuple[Any, list]:
    if n_classes == 2:
        return keras.losses.BinaryCrossentropy(), [keras.metrics.BinaryAccuracy(name="accuracy"),
                                                   keras.metrics.AUC(name="auc")]
    return keras.losses.SparseCategoricalCrossentropy(), [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def _optimizer(cfg: TrainConfig, lr: float, total_steps: int) -> keras.optimizers.Optimizer:
    rate: Any = lr
    if cfg.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps),
                                                      alpha=0.01)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(rate)
    if cfg.optimizer == "nadam":
        return keras.optimizers.Nadam(rate)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate)
    return keras.optimizers.SGD(rate, momentum=0.9)


def _compile(model: keras.Model, cfg: TrainConfig, n_classes: int,
             optimizer: keras.optimizers.Optimizer) -> None:
    loss, metrics = _loss_and_metrics(n_classes)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                  jit_compile="auto" if cfg.xla is None else cfg.xla)


def tensorboard_available() -> bool:
    """keras.callbacks.TensorBoard needs the ``tensorboard`` package (not a TF dependency)."""
    return importlib.util.find_spec("tensorboard") is not None


def _current_lr(model: keras.Model) -> float | None:
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return None
    try:
        return float(keras.ops.convert_to_numpy(opt.learning_rate))
    except (TypeError, ValueError, AttributeError):
        return None


def _floats(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return out


class _Checkpoints:
    """Per-epoch checkpoints, the best model and their state file (atomic writes)."""

    def __init__(self, run_dir: Path, monitor: str, keep: int):
        self.run_dir, self.monitor, self.keep = run_dir, monitor, keep
        self.folder = run_dir / CHECKPOINTS
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        self.best: float | None = state.get("best")
        self.best_epoch: int | None = state.get("best_epoch")

    @property
    def best_path(self) -> Path:
        return self.run_dir / BEST_MODEL

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:03d}.keras"

    def _read_state(self) -> dict:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.monitor == "val_loss" else value > self.best

    def save(self, model: keras.Model, epoch: int, logs: Mapping[str, float]) -> bool:
        """Checkpoint ``epoch``; copy it to best.keras if ``monitor`` improved."""
        path = self.path(epoch)
        _save_atomic(model, path)
        value = logs.get(self.monitor)
        improved = value is not None and math.isfinite(value) and self._better(value)
        if improved or (value is None and self.best is None):
            tmp = self.run_dir / f".tmp-{BEST_MODEL}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.best_path)
            self.best, self.best_epoch = (value, epoch) if improved else (None, epoch)
        (self.folder / "state.json").write_text(json.dumps(
            {"epoch": epoch, "monitor": self.monitor, "best": self.best,
             "best_epoch": self.best_epoch}))
        for old in sorted(self.folder.glob("epoch_*.keras"))[:-self.keep]:
            old.unlink(missing_ok=True)
        return improved

    def forget_after(self, epoch: int) -> None:
        """A resume from ``epoch`` re-trains later epochs: their best value no longer counts."""
        if self.best_epoch is not None and self.best_epoch > epoch:
            self.best, self.best_epoch = None, None

    def epochs_since_best(self, epoch: int) -> int:
        return epoch - (self.best_epoch or 0)


def _save_atomic(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")  # Keras wants the .keras suffix
    model.save(tmp)
    os.replace(tmp, path)


class _RunCallback(keras.callbacks.Callback):
    """Sinks, cancel checks, checkpoints and early stopping, in that order per event."""

    def __init__(self, *, full_model: keras.Model, ckpts: _Checkpoints, sinks: TrainSinks,
                 batch_size: int, n_train: int, first_step: int, patience: int | None):
        super().__init__()
        self.full_model, self.ckpts, self.sinks = full_model, ckpts, sinks
        self.batch_size, self.n_train, self.patience = batch_size, n_train, patience
        self.step = first_step
        self.history: list[dict[str, float]] = []
        self.stopped_early = False
        self._last_emit = -math.inf
        self._t0 = self._t_last = time.perf_counter()
        self._seen = 0

    def on_epoch_begin(self, epoch: int, logs: Mapping | None = None) -> None:
        self._t0 = self._t_last = time.perf_counter()
        self._seen = 0

    def on_train_batch_end(self, batch: int, logs: Mapping | None = None) -> None:
        self.step += 1
        self._seen = min(self._seen + self.batch_size, self.n_train)
        self._t_last = time.perf_counter()
        now = time.monotonic()
        if self.sinks.on_batch_end is not None and (
                now - self._last_emit >= self.sinks.batch_interval_s):
            self._last_emit = now
            self.sinks.on_batch_end(self.step, _floats(logs))
        if self.sinks.should_cancel is not None and self.sinks.should_cancel():
            raise RunCancelled(f"cancel requested; stopped after batch {self.step}")

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        values = _floats(logs)
        seconds = max(self._t_last - self._t0, 1e-9)
        values["lr"] = _current_lr(self.model)
        values["epoch_time_s"] = time.perf_counter() - self._t0
        values["images_per_s"] = self._seen / seconds
        values = {k: v for k, v in values.items() if v is not None}
        self.ckpts.save(self.full_model, epoch + 1, values)
        self.history.append(values)
        if self.sinks.on_epoch_end is not None:
            self.sinks.on_epoch_end(epoch + 1, values)
        if self.patience is not None and self.ckpts.epochs_since_best(epoch + 1) >= self.patience:
            self.model.stop_training = True
            self.stopped_early = True
            self.sinks.say(f"early stopping after epoch {epoch + 1}: no better "
                           f"{self.ckpts.monitor} for {self.patience} epochs", "info")


# -- Stages ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Stage:
    name: str  # frozen | finetune | train
    start: int  # first epoch index (0-based)
    end: int  # epochs after the stage
    lr: float
    frozen: bool


def _stages(cfg: TrainConfig) -> list[_Stage]:
    stages = []
    if cfg.freeze_epochs:
        stages.append(_Stage("frozen", 0, cfg.freeze_epochs, cfg.learning_rate, True))
    if cfg.epochs > cfg.freeze_epochs:
        lr = cfg.learning_rate * (cfg.finetune_lr_factor if cfg.freeze_epochs else 1.0)
        stages.append(_Stage("finetune" if cfg.weights else "train", cfg.freeze_epochs,
                             cfg.epochs, lr, False))
    return stages


@dataclass
class _Fit:
    """Mutable state of one train() call shared by the stage helpers."""

    cfg: TrainConfig
    data: TrainData
    inputs: _Inputs
    run_dir: Path
    sinks: TrainSinks
    ckpts: _Checkpoints
    model: keras.Model
    n_classes: int
    n_train: int
    steps_per_epoch: int
    history: list = field(default_factory=list)
    stopped_early: bool = False
    feature_cache: bool = False
    rates: list = field(default_factory=list)


def _callbacks(fit: _Fit, stage: _Stage, start: int, last: bool) -> tuple[_RunCallback, list]:
    cfg = fit.cfg
    run_cb = _RunCallback(full_model=fit.model, ckpts=fit.ckpts, sinks=fit.sinks,
                          batch_size=cfg.batch_size, n_train=fit.n_train,
                          first_step=start * fit.steps_per_epoch,
                          patience=cfg.patience if (cfg.early_stopping and last) else None)
    cbs: list = [run_cb]
    if tensorboard_available():
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(fit.run_dir / "tensorboard"),
                                               write_graph=False, profile_batch=0))
    if cfg.lr_schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(
            monitor=cfg.monitor, mode="min" if cfg.monitor == "val_loss" else "max",
            factor=0.5, patience=max(1, cfg.patience // 2), min_lr=stage.lr * 1e-3))
    return run_cb, cbs


def _run_fit(fit: _Fit, trainee: keras.Model, train_ds: Any, val_ds: Any, stage: _Stage,
             start: int, last: bool) -> None:
    """One ``fit`` call; a cancel still closes TensorBoard's writers."""
    run_cb, cbs = _callbacks(fit, stage, start, last)
    weights = (pipeline.class_weights(fit.inputs.cache.labels()[fit.inputs.train_rows],
                                      fit.n_classes)
               if fit.cfg.balancing == "class_weights" else None)
    try:
        trainee.fit(train_ds, validation_data=val_ds, epochs=stage.end, initial_epoch=start,
                    callbacks=cbs, class_weight=weights, shuffle=False, verbose=0)
    except BaseException:
        # Keras skips on_train_end when fit raises: close TensorBoard's writers ourselves.
        for cb in cbs:
            if isinstance(cb, keras.callbacks.TensorBoard):
                with contextlib.suppress(Exception):  # a writer never opened: nothing to close
                    cb.on_train_end()
        raise
    finally:
        fit.history.extend(run_cb.history)
        fit.rates.extend(h["images_per_s"] for h in run_cb.history if "images_per_s" in h)
    fit.stopped_early = run_cb.stopped_early


@contextmanager
def _float32_policy() -> Iterator[None]:
    """Build input pipelines in float32: the augmenter's layers must not pick up
    mixed_float16 (pixels in [0, 255] lose precision in float16; the model casts itself)."""
    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _image_datasets(fit: _Fit, start: int) -> tuple[Any, Any]:
    cfg, inputs = fit.cfg, fit.inputs
    with _float32_policy():
        return _make_image_datasets(cfg, inputs, start)


def _make_image_datasets(cfg: TrainConfig, inputs: _Inputs, start: int) -> tuple[Any, Any]:
    train_ds = pipeline.make_dataset(
        inputs.cache, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed + start,
        indices=inputs.train_rows, augment=cfg.augment_config(), balancing=cfg.balancing
        if cfg.balancing != "class_weights" else "none", target_ratio=cfg.target_ratio,
        channels=cfg.channels)
    val_ds = pipeline.make_dataset(inputs.cache, batch_size=cfg.batch_size, shuffle=False,
                                   seed=0, indices=inputs.val_rows, channels=cfg.channels)
    return train_ds, val_ds


def _fit_images(fit: _Fit, stage: _Stage, start: int, last: bool) -> None:
    train_ds, val_ds = _image_datasets(fit, start)
    _run_fit(fit, fit.model, train_ds, val_ds, stage, start, last)


def _features(extractor: keras.Model, fit: _Fit, rows: np.ndarray) -> np.ndarray:
    ds = pipeline.make_dataset(fit.inputs.cache, batch_size=fit.cfg.batch_size, shuffle=False,
                               seed=0, indices=rows, channels=fit.cfg.channels)
    return np.asarray(extractor.predict(ds, verbose=0), dtype=np.float32)


def _fit_features(fit: _Fit, stage: _Stage, start: int, last: bool, keep_optimizer: bool) -> None:
    """Frozen stage on cached features: backbone forward once, then head-only epochs."""
    cfg, inputs = fit.cfg, fit.inputs
    labels = inputs.cache.labels()
    rows = inputs.train_rows
    if cfg.balancing == "undersample":  # a fixed subset: same images every epoch
        rows = rows[pipeline.balance_indices(labels[rows], "undersample",
                                             target_ratio=cfg.target_ratio, seed=cfg.seed)]
    t0 = time.perf_counter()
    extractor = registry.feature_extractor(fit.model)
    f_train, f_val = _features(extractor, fit, rows), _features(extractor, fit, inputs.val_rows)
    fit.sinks.say(f"computed backbone features once ({len(rows)} train + {len(f_val)} val "
                  f"images, {time.perf_counter() - t0:.1f} s); training the head on them")
    head = registry.head_model(fit.model)
    if keep_optimizer:
        optimizer = fit.model.optimizer
    else:
        optimizer = _optimizer(cfg, stage.lr, fit.steps_per_epoch * (stage.end - stage.start))
    _compile(head, cfg, fit.n_classes, optimizer)
    if not keep_optimizer:
        # The full model shares the optimizer, so its checkpoints carry the head's state.
        _compile(fit.model, cfg, fit.n_classes, head.optimizer)
    train_ds = (tf.data.Dataset.from_tensor_slices((f_train, labels[rows].astype(np.int32)))
                .shuffle(len(rows), seed=cfg.seed + start, reshuffle_each_iteration=True)
                .batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE))
    val_ds = tf.data.Dataset.from_tensor_slices(
        (f_val, labels[inputs.val_rows].astype(np.int32))).batch(cfg.batch_size)
    fit.feature_cache = True
    _run_fit(fit, head, train_ds, val_ds, stage, start, last)


def _prepare_stage(fit: _Fit, stage: _Stage, keep_optimizer: bool) -> None:
    """Set which layers train and compile a fresh optimizer for the stage."""
    cfg = fit.cfg
    if stage.frozen:
        registry.set_backbone_trainable(fit.model, False)
    elif cfg.weights is not None:
        registry.set_backbone_trainable(fit.model, True, cfg.unfreeze_top_k)
    if not keep_optimizer:
        steps = fit.steps_per_epoch * (stage.end - stage.start)
        _compile(fit.model, cfg, fit.n_classes, _optimizer(cfg, stage.lr, steps))


def _start_model(cfg: TrainConfig, data: TrainData, ckpts: _Checkpoints, initial_epoch: int,
                 sinks: TrainSinks) -> tuple[keras.Model, bool, str | None]:
    """A fresh model, or the checkpoint of ``initial_epoch`` with its optimizer state."""
    if initial_epoch:
        path = ckpts.path(initial_epoch)
        if not path.is_file():
            raise RunError(f"cannot resume: expected the checkpoint of epoch {initial_epoch} at "
                           f"{path}. Received: no such file")
        model = keras.models.load_model(path, custom_objects=registry.CUSTOM_OBJECTS)
        restored = getattr(model, "optimizer", None) is not None
        sinks.say(f"resumed from {path.name} (optimizer state "
                  f"{'restored' if restored else 'not saved: fresh optimizer'})")
        return model, restored, None
    built = registry.build_model_with_report(cfg.model_config(data.weights_path),
                                             len(data.classes))
    summary = built.weights_report.summary() if built.weights_report else None
    if summary:
        sinks.say(f"weights: {summary}")
    return built.model, False, summary


# -- The run --------------------------------------------------------------------------------

def train(cfg: TrainConfig, data: TrainData, run_dir: str | Path, *, cache_root: str | Path,
          sinks: TrainSinks | None = None, initial_epoch: int = 0) -> TrainResult:
    """Train (or resume) one run and predict its validation images with the run's model.

    Args:
        cfg: the run's config.
        data: prepared images, labels and split.
        run_dir: the run folder (created); see the module docstring for its layout.
        cache_root: folder of the decoded-pixel caches (``<CXR_HOME>/cache``).
        sinks: where metrics, logs and cancel checks go.
        initial_epoch: epochs already done (resume from that epoch's checkpoint).

    Returns:
        The result; ``status`` is "cancelled" when ``should_cancel`` stopped it.

    Raises:
        ConfigError, ModelError, DatasetError: bad config, weights or data.
        RunError: a resume without its checkpoint.
    """
    sinks = sinks or TrainSinks()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    spec = registry.MODELS[cfg.model]
    with _run_globals(cfg):
        try:
            inputs = _build_inputs(cfg, data, Path(cache_root), sinks)
        except RunCancelled:
            return _cancelled(cfg, data, initial_epoch, spec.saliency_layer)
        n_train = len(pipeline.balance_indices(
            inputs.cache.labels()[inputs.train_rows],
            cfg.balancing if cfg.balancing != "class_weights" else "none",
            target_ratio=cfg.target_ratio, seed=cfg.seed))
        ckpts = _Checkpoints(run_dir, cfg.monitor, cfg.keep_checkpoints)
        ckpts.forget_after(initial_epoch)
        sinks.say(f"{n_train} training images per epoch, {len(inputs.val_rows)} validation "
                  f"images, classes {list(data.classes)}; {gpu_count()} GPU(s)")
        if not tensorboard_available():
            sinks.say("TensorBoard logs skipped: the tensorboard package is not installed "
                      "(pip install tensorboard)", "warning")
        with _strategy(cfg).scope():
            model, restored, report = _start_model(cfg, data, ckpts, initial_epoch, sinks)
            fit = _Fit(cfg, data, inputs, run_dir, sinks, ckpts, model, len(data.classes),
                       n_train, math.ceil(n_train / cfg.batch_size))
            try:
                _fit_stages(fit, initial_epoch, restored)
            except RunCancelled as exc:
                sinks.say(str(exc), "warning")
                return _cancelled(cfg, data, initial_epoch + len(fit.history), spec.saliency_layer,
                                  fit)
        return _finish(fit, initial_epoch, report, spec.saliency_layer)


def resume_epoch(run_dir: str | Path, recorded: int) -> int:
    """The epoch a resumed run starts from.

    ``recorded`` (the DB's epochs done) when its checkpoint is on disk: its metrics are
    stored, so the curves stay continuous (a worker killed between saving a checkpoint and
    recording it re-trains that one epoch). Otherwise the newest checkpoint on disk.
    """
    if recorded == 0 or (Path(run_dir) / CHECKPOINTS / f"epoch_{recorded:03d}.keras").is_file():
        return recorded
    return last_checkpoint_epoch(run_dir)


def last_checkpoint_epoch(run_dir: str | Path) -> int:
    """The newest epoch with a checkpoint on disk (0: none)."""
    folder = Path(run_dir) / CHECKPOINTS
    try:
        epoch = int(json.loads((folder / "state.json").read_text()).get("epoch", 0))
    except (OSError, ValueError):
        epoch = 0
    if epoch and (folder / f"epoch_{epoch:03d}.keras").is_file():
        return epoch
    found = sorted(folder.glob("epoch_*.keras"))
    return int(found[-1].stem.split("_")[1]) if found else 0


def _fit_stages(fit: _Fit, initial_epoch: int, restored: bool) -> None:
    stages = _stages(fit.cfg)
    for i, stage in enumerate(stages):
        if stage.end <= initial_epoch:
            continue
        start = max(stage.start, initial_epoch)
        keep = restored and stage.start < initial_epoch  # resuming inside this stage
        last = i == len(stages) - 1
        use_features = stage.frozen and fit.cfg.cache_features and not fit.cfg.augmenting
        fit.sinks.say(f"stage '{stage.name}': epochs {start + 1}-{stage.end}, "
                      f"learning rate {stage.lr:g}"
                      + (", head on cached features" if use_features else ""))
        if use_features:
            if not keep:
                registry.set_backbone_trainable(fit.model, False)
            _fit_features(fit, stage, start, last, keep)
        else:
            _prepare_stage(fit, stage, keep)
            _fit_images(fit, stage, start, last)
        if fit.stopped_early:
            break


def _cancelled(cfg: TrainConfig, data: TrainData, epochs_done: int, saliency: str | None,
               fit: _Fit | None = None) -> TrainResult:
    return TrainResult("cancelled", epochs_done, tuple(fit.history if fit else ()), None, False,
                       None, data.classes, saliency)


def _to_probs(raw: np.ndarray) -> np.ndarray:
    out = np.asarray(raw, dtype=np.float64)
    if out.shape[-1] == 1:
        p = np.clip(out[:, 0], 0.0, 1.0)
        return np.column_stack([1.0 - p, p])
    return out


def _finish(fit: _Fit, initial_epoch: int, report: str | None, saliency: str) -> TrainResult:
    """Make best.keras the run's model and predict the validation images with it."""
    cfg, ckpts, inputs = fit.cfg, fit.ckpts, fit.inputs
    done = initial_epoch + len(fit.history)  # epochs checkpointed (early stopping: fewer)
    if not cfg.restore_best or not ckpts.best_path.is_file():
        _save_atomic(fit.model, ckpts.best_path)
    model = registry.load_model(ckpts.best_path)
    val_ds = pipeline.make_dataset(inputs.cache, batch_size=cfg.batch_size, shuffle=False,
                                   seed=0, indices=inputs.val_rows, channels=cfg.channels)
    probs = _to_probs(model.predict(val_ds, verbose=0))
    idx = inputs.row_image[inputs.val_rows]
    data = fit.data
    fit.sinks.say(f"finished after {done} epochs; best epoch "
                  f"{ckpts.best_epoch if cfg.restore_best else done}")
    return TrainResult(
        "finished", done, tuple(fit.history), ckpts.best_epoch if cfg.restore_best else done,
        fit.stopped_early, ckpts.best_path, data.classes, saliency,
        tuple(data.image_ids[i] for i in idx), tuple(data.paths[i] for i in idx),
        np.asarray(data.labels)[idx].astype(np.int64), probs, fit.n_train,
        len(inputs.val_rows), inputs.skipped,
        float(np.mean(fit.rates)) if fit.rates else None, fit.feature_cache, report)


# -- Model card -----------------------------------------------------------------------------

def write_model_card(run_dir: str | Path, *, name: str, cfg: TrainConfig,
                     classes: tuple[str, ...], saliency_layer: str | None,
                     operating_point: Mapping[str, Any] | None, val_metrics: Mapping[str, Any],
                     dataset: Mapping[str, Any], label_snapshot: Mapping[str, Any],
                     extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_card.json`` beside the run's model (what Predict/Evaluate read).

    Returns:
        The card's path.
    """
    card = {
        "name": name, "model": cfg.model, "model_file": BEST_MODEL, "labels": list(classes),
        "label_scheme": cfg.label_scheme, "image_size": cfg.image_size,
        "channels": cfg.channels, "saliency_layer": saliency_layer,
        "operating_point": dict(operating_point) if operating_point else None,
        "val_metrics": dict(val_metrics), "training_config": cfg.to_dict(),
        "dataset": dict(dataset), "label_snapshot": dict(label_snapshot),
        "data_licence": DATA_LICENCE, **dict(extra or {}),
    }
    path = Path(run_dir) / MODEL_CARD
    tmp = path.with_name(f".tmp-{MODEL_CARD}")
    tmp.write_text(json.dumps(card, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
