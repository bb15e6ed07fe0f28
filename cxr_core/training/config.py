"""What a training run is: :class:`TrainConfig`, the recipes and the run folder's file names.

No TensorFlow or Keras here: the Train page, the CLI and the worker's validation import it
cheaply. :mod:`cxr_core.training.fit` turns a config into a fitted model.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.core.labels import LABEL_SCHEMES
from cxr_core.data.augment_config import PRESETS, AugmentConfig
from cxr_core.data.balancing import BALANCING
from cxr_core.data.provenance import LABEL_SOURCES
from cxr_core.data.splits import SPLIT_STRATEGIES
from cxr_core.models.specs import HeadConfig, ModelConfig
from cxr_core.stats.thresholds import DEFAULT_TARGET_SENSITIVITY

DEFAULT_RECIPE = "robust128"
# The reports' optimisers (cxr_core.training.fit builds them; sgd with momentum 0.9).
OPTIMIZERS = ("adam", "nadam", "rmsprop", "sgd", "adagrad", "adadelta", "adamax")
LR_SCHEDULES = ("none", "plateau", "cosine")
DISTRIBUTIONS = ("auto", "default", "mirrored")
MONITORS = ("val_loss", "val_auc", "val_accuracy")
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
    # Chosen on the external sample (another acquisition period; docs/experiments.md, issue
    # 25): the reports' 5-conv CNN at 128 px, shift-robust augmentation (rotation, shifts,
    # random resized crop, brightness, contrast, gamma, blur, noise), label smoothing 0.1,
    # cosine decay over 30 epochs, best epoch by validation AUC. Trains in about 15 min on two
    # CPU cores; never trained on an external film.
    "robust128": dict(model="custom5_224", image_size=128, channels=1, augment="shift_robust",
                      balancing="class_weights", optimizer="adam", learning_rate=1e-3,
                      lr_schedule="cosine", batch_size=32, epochs=30, patience=10,
                      monitor="val_auc", label_smoothing=0.1),
    # The subtype step of the shipped three-class model (docs/experiments.md, issue 30): bacterial
    # vs viral among pneumonia films only, robust128's network and augmentation, cosine decay
    # over 30 epochs, best epoch by validation loss. The pneumonia step is a binary model (e.g.
    # robust128); `export-three-class` joins the two, and on the external sample the two steps
    # beat a flat three-way head (cross-fitted accuracy 0.866 vs 0.781).
    "subtype128": dict(model="custom5_224", image_size=128, channels=1, label_scheme="subtype",
                       augment="shift_robust", balancing="class_weights", optimizer="adam",
                       learning_rate=1e-3, lr_schedule="cosine", batch_size=32, epochs=30,
                       patience=10, monitor="val_loss"),
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


# Recipes chosen on a sample that is then no longer an independent test of them: the card and
# Home say so next to its external figures there (docs/experiments.md has the candidates).
RECIPE_SELECTED_ON: dict[str, tuple[str, ...]] = {"robust128": ("chest_xray_224_external",),
                                                   "subtype128": ("chest_xray_224_external",)}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


EXTRA_IMAGES = ("reviewed", "all")


@dataclass(frozen=True)
class ExtraImages:
    """Images another dataset adds to a run (the site round's next round): its ``images``
    ("reviewed": those confirmed on Review; "all": every labelled one) with their current
    labels, each repeated ``repeat`` times in training (oversampling a small site sample)."""

    dataset: str  # an indexed dataset's name (or a path, resolved when the run is queued)
    images: str = "reviewed"
    repeat: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError("extra: each entry needs a dataset name. "
                              f"Received: dataset={self.dataset!r}")
        if self.images not in EXTRA_IMAGES:
            raise ConfigError(f"extra: images must be one of {list(EXTRA_IMAGES)}. "
                              f"Received: images={self.images!r}")
        if not _is_int(self.repeat) or not 1 <= self.repeat <= 50:
            raise ConfigError("extra: repeat must be an integer in [1, 50]. "
                              f"Received: repeat={self.repeat!r}")

    @classmethod
    def from_value(cls, value: Any) -> ExtraImages:
        if isinstance(value, ExtraImages):
            return value
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, Mapping):
            raise ConfigError('extra: each entry is {"dataset": NAME, "images": "reviewed", '
                              f'"repeat": 1}}. Received: {value!r}')
        unknown = sorted(set(value) - {"dataset", "images", "repeat"})
        if unknown:
            raise ConfigError(f"extra: unknown keys {unknown}; expected dataset, images, repeat")
        return cls(**value)


@dataclass(frozen=True)
class AuditFold:
    """The fold a label audit's run holds out (:mod:`cxr_core.training.label_audit`): it trains
    on the other folds (its own train / validation / calibration split inside them) and
    predicts this one, out of sample. The folds and the labels (the audit's snapshot) are the
    audit's, stored with it."""

    audit: int  # the label audit's id (the run's parent)
    fold: int  # 0 .. folds - 1
    folds: int

    def __post_init__(self) -> None:
        for name in ("audit", "fold", "folds"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"holdout: {name} must be an integer. "
                                  f"Received: {name}={getattr(self, name)!r}")
        if self.folds < 2 or not 0 <= self.fold < self.folds:
            raise ConfigError("holdout: fold must be in [0, folds) and folds >= 2. "
                              f"Received: fold={self.fold}, folds={self.folds}")

    @classmethod
    def from_value(cls, value: Any) -> AuditFold | None:
        if value is None or isinstance(value, AuditFold):
            return value
        if not isinstance(value, Mapping) or set(value) != {"audit", "fold", "folds"}:
            raise ConfigError('holdout is {"audit": ID, "fold": K, "folds": N} (a label '
                              f"audit's fold run). Received: holdout={value!r}")
        return cls(**value)


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
    split: str = "patient"  # patient | temporal | group (cxr_core.data.splits.SPLIT_STRATEGIES)
    split_group: str | None = None  # split="group": the folder held out (e.g. "train/site_b")
    split_seed: int = 0
    val_fraction: float = 0.15  # share of patient groups carved from train for validation
    # Share of the validation patients set apart as the calibration slice: the threshold is
    # chosen there only, early stopping and the best epoch on the rest. 0: both on validation.
    calibration_fraction: float = 0.3
    max_images: int | None = None  # stratified seeded subsample before splitting (quick runs)
    image_size: int = 224
    channels: int = 1  # films are grayscale; RGB backbones repeat the channel in-model
    augment: str | dict = "none"  # a PRESETS name, or an AugmentConfig as a dict
    balancing: str = "none"  # none | class_weights | oversample | undersample
    target_ratio: tuple[float, ...] | None = None  # class ratio for over/undersampling
    model: str = "custom5_224"  # a models.MODELS name
    weights: str | None = None  # None | "imagenet" | a file path | "run:ID"
    dropout: float | None = None  # head dropout; None keeps the architecture's own
    # A configurable head (HeadConfig as a dict: layers, units, activation, batch_norm,
    # dropout) in place of the architecture's own; None builds the recipe's head unchanged.
    head: HeadConfig | None = None
    intensity: str = "none"  # none | standardize (per-image, a pre_intensity layer in the model)
    label_smoothing: float = 0.0  # binary: targets 0/1 become s/2 and 1 - s/2
    # Weight averaging: the optimizer's exponential moving average of the weights (this
    # momentum, e.g. 0.99), which validation, checkpoints and the final model use. None: off.
    ema: float | None = None
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
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY  # operating point chosen on validation (binary)
    # Datasets flagged external (another site or period) that the worker evaluates the finished
    # run on: the model card's external figures (indexed names, or folders indexed as external).
    external: tuple[str, ...] = ()
    # Images of other datasets added to the run's data, patient-grouped on their own so no
    # site patient is in two of train / validation / calibration (ExtraImages).
    extra: tuple[ExtraImages, ...] = ()
    # A label audit's fold run: the fold it holds out and predicts (AuditFold); None otherwise.
    holdout: AuditFold | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", HeadConfig.from_value(self.head))
        self._check_choices()
        self._check_sources()
        self._check_numbers()
        self._check_stages()
        self.model_config()  # the model registry validates model, size, channels, weights
        aug = self.augment_config()
        if self.balancing == "oversample" and (aug is None or not aug.enabled_ops):
            raise ConfigError("balancing='oversample' repeats images and needs augmentation so "
                              f"the copies differ. Received: augment={self.augment!r}")

    def _check_sources(self) -> None:
        ext = self.external
        if isinstance(ext, str) or not isinstance(ext, (tuple, list)) or not all(
                isinstance(e, str) and e.strip() for e in ext):
            raise ConfigError("external must be a list of dataset names (or folders). "
                              f"Received: external={ext!r}")
        object.__setattr__(self, "external", tuple(ext))
        if isinstance(self.extra, (str, Mapping)) or not isinstance(self.extra, (tuple, list)):
            raise ConfigError('extra must be a list of {"dataset", "images", "repeat"} '
                              f"entries. Received: extra={self.extra!r}")
        object.__setattr__(self, "extra", tuple(ExtraImages.from_value(e) for e in self.extra))
        names = [e.dataset for e in self.extra]
        if len(set(names)) != len(names) or self.dataset in names:
            raise ConfigError("extra: each dataset once, and not the run's own dataset. "
                              f"Received: dataset={self.dataset!r}, extra={names}")
        if self.extra and self.split == "temporal":
            raise ConfigError("extra datasets are split by patient on their own; with "
                              "split='temporal' use split='patient' or no extra. "
                              f"Received: split={self.split!r}")
        object.__setattr__(self, "holdout", AuditFold.from_value(self.holdout))
        if self.holdout is not None and (self.extra or self.max_images is not None):
            raise ConfigError("a label audit's fold run predicts every image of its fold "
                              "from the other folds of its own dataset: no extra datasets and no "
                              f"max_images. Received: extra={len(self.extra)}, "
                              f"max_images={self.max_images}")

    def _check_choices(self) -> None:
        for name, allowed in (("recipe", tuple(RECIPES)), ("label_scheme", LABEL_SCHEMES),
                              ("label_source", LABEL_SOURCES), ("balancing", BALANCING),
                              ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                              ("monitor", MONITORS), ("distribution", DISTRIBUTIONS),
                              ("split", SPLIT_STRATEGIES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}. "
                                  f"Received: {name}={value!r}")
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string. Received: name={self.name!r}")
        if self.split == "group" and not (isinstance(self.split_group, str)
                                          and self.split_group.strip()):
            raise ConfigError("split='group' needs split_group: the folder to hold out, "
                              f"relative to the dataset. Received: split_group={self.split_group!r}")
        if self.split != "group" and self.split_group is not None:
            raise ConfigError(f"split_group is only used with split='group'. Received: "
                              f"split={self.split!r}, split_group={self.split_group!r}")
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
        smooth = self.label_smoothing
        if not _is_num(smooth) or not 0.0 <= smooth < 0.5:
            raise ConfigError("label_smoothing must be a number in [0, 0.5). "
                              f"Received: label_smoothing={smooth!r}")
        if smooth and self.label_scheme != "binary":
            raise ConfigError("label_smoothing is applied to the binary loss only; Keras' "
                              "sparse categorical loss has none: use 0 for "
                              f"label_scheme={self.label_scheme!r}. "
                              f"Received: label_smoothing={smooth}")
        floats = {"val_fraction": (0.0, 0.5), "learning_rate": (0.0, 10.0),
                  "finetune_lr_factor": (0.0, 1.0), "target_sensitivity": (0.0, 1.0)}
        for name, (lo, hi) in floats.items():
            value = getattr(self, name)
            if not _is_num(value) or not lo < value <= hi:
                raise ConfigError(f"{name} must be a number in ({lo:g}, {hi:g}]. "
                                  f"Received: {name}={value!r}")
        if self.ema is not None and (not _is_num(self.ema) or not 0.0 < self.ema < 1.0):
            raise ConfigError("ema must be null or a momentum in (0, 1), e.g. 0.99. "
                              f"Received: ema={self.ema!r}")
        cal = self.calibration_fraction
        if not _is_num(cal) or not 0.0 <= cal <= 0.7:
            raise ConfigError("calibration_fraction must be a number in [0, 0.7] (0: the "
                              "threshold is chosen on the validation split itself). "
                              f"Received: calibration_fraction={cal!r}")
        if cal and self.label_scheme != "binary":
            raise ConfigError("calibration_fraction sets apart images to choose a binary "
                              "threshold on; multi-class runs decide by argmax: use 0. "
                              f"Received: calibration_fraction={cal}, "
                              f"label_scheme={self.label_scheme!r}")
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

    def model_config(self, weights_path: str | None = None) -> ModelConfig:
        """The model_specs.ModelConfig; ``weights_path`` replaces a "run:ID" reference."""
        return ModelConfig(
            name=self.model, image_size=self.image_size, channels=self.channels,
            dropout=self.dropout, weights=weights_path or self.weights,
            freeze_backbone=self.freeze_epochs > 0, unfreeze_top_k=self.unfreeze_top_k,
            intensity=self.intensity, head=self.head)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with the run (every field, recipe defaults resolved)."""
        data = dataclasses.asdict(self)
        if data["target_ratio"] is not None:
            data["target_ratio"] = list(data["target_ratio"])
        data["external"] = list(data["external"])
        data["extra"] = [dict(e) for e in data["extra"]]
        data["head"] = None if self.head is None else self.head.to_dict()
        if data["holdout"] is None:  # a run of its own: its stored config stays as before
            del data["holdout"]
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
        if ("label_smoothing" not in data
                and merged.get("label_scheme", "binary") != "binary"):
            merged["label_smoothing"] = 0.0  # the binary loss's only: none for argmax runs
        if ("calibration_fraction" not in data
                and merged.get("label_scheme", "binary") != "binary"):
            merged["calibration_fraction"] = 0.0  # argmax runs choose no threshold
        if isinstance(merged.get("target_ratio"), list):
            merged["target_ratio"] = tuple(merged["target_ratio"])
        return cls(**merged)
