"""The model registry without TensorFlow: names, specs, what to build (:class:`ModelConfig`).

Pages, the CLI and config validation import this cheaply; the Keras graphs are built from a
spec by :mod:`cxr_core.models.graph`, and weights are loaded by :mod:`cxr_core.models.weights`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cxr_core.core.errors import ConfigError

PreprocessMode = Literal["unit", "caffe", "tf", "torch", "none"]

WEIGHT_SUFFIXES = (".keras", ".weights.h5", ".h5", ".hdf5")

# keras.applications.imagenet_utils constants ("caffe" is in BGR order, "torch" in RGB order).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
_KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class ImagenetFile:
    """Where keras.applications keeps one backbone's ImageNet weights (the no-top file).

    Attributes:
        file_name: File name in the Keras cache; may hold ``{rows}`` (MobileNets ship one file
            per input size).
        base_url: URL folder the file is downloaded from.
        md5: Keras' own hash of the file; None where Keras has none (MobileNets).
        rows: Sizes that have their own file; any other size uses the 224 file, as Keras does.
    """

    file_name: str
    base_url: str
    md5: str | None = None
    rows: tuple[int, ...] = ()

    def resolve(self, image_size: int) -> tuple[str, str]:
        """Returns ``(file name, download URL)`` for a model input size."""
        rows = image_size if image_size in self.rows else 224
        name = self.file_name.format(rows=rows)
        return name, self.base_url + name


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build an architecture and what a model card needs about it.

    Attributes:
        name: Registry key.
        description: One line for the UI.
        default_size: Input size of the original recipe (pixels, square).
        min_size: Smallest input the graph accepts (keras.applications minimum or 2**poolings).
        preprocessing: In-model mapping of [0, 255] pixels: ``"unit"`` (to [0, 1]) or the
            keras.applications ``preprocess_input`` mode of the family; ``"none"`` for
            EfficientNet, which rescales inside its own stem.
        rgb: The backbone expects 3 channels (ImageNet weights); a 1-channel input is repeated.
        saliency_layer: Last spatial (4-D) layer: the Grad-CAM target stored in model cards.
        backbone: Key of the builder in :data:`cxr_core.models.graph.BACKBONES` (our own networks);
            ``"keras_application"`` for a keras.applications backbone.
        backbone_args: Keyword arguments of that builder (filters, dropouts, ...).
        head_pool: ``"avg"`` (GlobalAveragePooling2D) or ``"flatten"``.
        head_units: Widths of the ReLU Dense layers between the features and the predictions.
        head_dropout: Default dropout after each Dense (or once after pooling when there is no
            Dense); ``ModelConfig.dropout`` replaces all of them.
        imagenet: The ImageNet weights file, or None where there is none.
        keras_application: The keras.applications function, or None for our own networks.
        imagenet_fixup: Key of a step in :data:`cxr_core.models.weights.IMAGENET_FIXUPS` run
            after loading the ImageNet file (keeps Keras' imagenet graph), or None.
    """

    name: str
    description: str
    default_size: int
    min_size: int
    preprocessing: PreprocessMode
    rgb: bool
    saliency_layer: str
    backbone: str
    head_pool: Literal["avg", "flatten"] = "avg"
    head_units: tuple[int, ...] = ()
    head_dropout: tuple[float, ...] = (0.2,)
    imagenet: ImagenetFile | None = None
    keras_application: str | None = None
    imagenet_fixup: str | None = None
    backbone_args: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


INTENSITY_MODES = ("none", "standardize")

# The head's activations, each with its matching initialiser (seed 004's rule): He for the
# ReLU family, Glorot for sigmoid/tanh, LeCun for SELU (self-normalising: no batch norm after
# it, and AlphaDropout, which keeps its mean and variance, instead of Dropout).
HEAD_ACTIVATIONS: dict[str, str] = {
    "relu": "he_normal", "elu": "he_normal", "selu": "lecun_normal",
    "sigmoid": "glorot_uniform", "tanh": "glorot_uniform",
}
HEAD_MAX_LAYERS = 8
HEAD_MAX_UNITS = 8192


@dataclass(frozen=True)
class HeadConfig:
    """A configurable classifier head: ``layers`` Dense blocks between the pooled (or
    flattened) features and the predictions, each Dense -> [BatchNorm] -> activation ->
    dropout. None in :class:`ModelConfig` keeps the architecture's own head.

    The reports' heads: ``HeadConfig(1, 512)``, ``HeadConfig(2, (256, 128))``,
    ``HeadConfig(3, 32, "selu")``.

    Attributes:
        layers: Dense layers (0: pooled features straight to the predictions, after dropout).
        units: Width of every layer, or one width per layer.
        activation: One of :data:`HEAD_ACTIVATIONS`; picks the kernel initialiser too.
        batch_norm: BatchNorm between each Dense and its activation (the Dense then has no
            bias). Always off after SELU (it would undo the self-normalisation): a SELU head
            asking for it is stored with ``batch_norm=False``.
        dropout: Rate after each block (AlphaDropout for SELU); 0 for none.
    """

    layers: int = 1
    units: int | tuple[int, ...] = 256
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if not _is_int(self.layers) or not 0 <= self.layers <= HEAD_MAX_LAYERS:
            raise ConfigError(f"head.layers must be an integer in [0, {HEAD_MAX_LAYERS}]. "
                              f"Received: head.layers={self.layers!r}")
        units = self.units
        if isinstance(units, list):
            units = tuple(units)
        if _is_int(units):
            units = int(units)
            widths: tuple = (units,) * self.layers
        elif isinstance(units, tuple):
            widths = units
            if len(widths) != self.layers:
                raise ConfigError(f"head.units lists one width per layer ({self.layers}). "
                                  f"Received: head.units={list(units)}")
        else:
            widths = (units,)
        if not all(_is_int(u) and 1 <= u <= HEAD_MAX_UNITS for u in widths):
            raise ConfigError(f"head.units must be integers in [1, {HEAD_MAX_UNITS}] (one, or "
                              f"one per layer). Received: head.units={self.units!r}")
        object.__setattr__(self, "units", units if _is_int(units) else tuple(int(u) for u in units))
        if self.activation not in HEAD_ACTIVATIONS:
            raise ConfigError(f"head.activation must be one of {list(HEAD_ACTIVATIONS)}. "
                              f"Received: head.activation={self.activation!r}")
        if not isinstance(self.batch_norm, bool):
            raise ConfigError("head.batch_norm must be true or false. "
                              f"Received: head.batch_norm={self.batch_norm!r}")
        if self.activation == "selu":
            object.__setattr__(self, "batch_norm", False)
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"head.dropout must be in [0, 1). "
                              f"Received: head.dropout={self.dropout!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        """One width per layer."""
        return (self.units,) * self.layers if _is_int(self.units) else tuple(self.units)

    @property
    def initializer(self) -> str:
        """The Keras kernel initialiser matching the activation."""
        return HEAD_ACTIVATIONS[self.activation]

    @classmethod
    def from_value(cls, value: Any) -> HeadConfig | None:
        """A head from its JSON form (None stays None); unknown keys are an error."""
        if value is None or isinstance(value, HeadConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError('head must be null or {"layers", "units", "activation", '
                              f'"batch_norm", "dropout"}}. Received: head={value!r}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown head keys; expected some of {sorted(known)}. "
                              f"Received: {unknown}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["units"], tuple):
            data["units"] = list(data["units"])
        return data

    def describe(self) -> str:
        """One line for a card or a log, e.g. ``2 x Dense(256, 128) relu (he_normal), batch
        norm, dropout 0.3``."""
        if not self.layers:
            return f"no Dense layer, dropout {self.dropout:g}"
        return (f"{self.layers} x Dense({', '.join(map(str, self.widths))}) {self.activation} "
                f"({self.initializer}){', batch norm' if self.batch_norm else ''}, "
                f"{'alpha ' if self.activation == 'selu' and self.dropout else ''}"
                f"dropout {self.dropout:g}")


@dataclass(frozen=True)
class ModelConfig:
    """What to build. Stored as JSON with each run.

    Attributes:
        name: Registry key (see ``MODELS``).
        image_size: Square input size in pixels; at least the spec's ``min_size``.
        channels: 1 (grayscale, as the films are) or 3.
        dropout: Head dropout; None keeps the recipe's own rates.
        weights: None (random init), ``"imagenet"`` (Keras cache, downloaded if missing), a
            ``.h5`` / ``.weights.h5`` / ``.keras`` path, or ``"run:ID"``, which the caller
            resolves to that run's ``.keras`` path before building.
        freeze_backbone: Stage 1 of transfer learning: train the head only.
        unfreeze_top_k: Top backbone layers made trainable for fine-tuning (stage 2, or at
            once when ``freeze_backbone`` is False); None = all. BatchNorm stays frozen.
        intensity: ``"none"`` or ``"standardize"``: a ``pre_intensity`` layer maps each image
            to zero mean and unit spread (then back to [0, 255]) before the family's own
            preprocessing, so exposure differences between sites are removed in the model
            itself (training, evaluation, Predict and exported models alike).
        head: A configurable head (:class:`HeadConfig`) in place of the spec's own; None keeps
            the spec's head exactly as it always was built. ``dropout`` must then be None
            (the head has its own).
    """

    name: str = "mobilenetv2"
    image_size: int = 224
    channels: int = 3
    dropout: float | None = None
    weights: str | None = None
    freeze_backbone: bool = False
    unfreeze_top_k: int | None = None
    intensity: str = "none"
    head: HeadConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", HeadConfig.from_value(self.head))
        if self.head is not None and self.dropout is not None:
            raise ConfigError("dropout sets the architecture's own head; with a configurable "
                              "head give its rate as head.dropout. Received: "
                              f"dropout={self.dropout!r}, head={self.head.to_dict()}")
        if self.name not in MODELS:
            raise ConfigError(
                f"Unknown model; expected one of {sorted(MODELS)}. Received: name={self.name!r}"
            )
        spec = MODELS[self.name]
        if not _is_int(self.image_size) or not spec.min_size <= self.image_size <= 1024:
            raise ConfigError(
                f"'{self.name}' needs an integer image_size from {spec.min_size} to 1024. "
                f"Received: image_size={self.image_size!r}"
            )
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ConfigError(f"channels must be 1 or 3. Received: channels={self.channels!r}")
        if self.dropout is not None and not (
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(
                f"dropout must be in [0, 1) or None. Received: dropout={self.dropout!r}"
            )
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"intensity must be one of {list(INTENSITY_MODES)}. "
                              f"Received: intensity={self.intensity!r}")
        self._check_weights(spec)
        self._check_freezing()

    def _check_weights(self, spec: ModelSpec) -> None:
        w = self.weights
        if w is None or (isinstance(w, str) and w.startswith("run:") and len(w) > 4):
            return
        if w == "imagenet":
            if spec.imagenet is None:
                raise ConfigError(
                    f"'{self.name}' has no ImageNet weights; use weights=None or a file. "
                    f"Received: weights={w!r}"
                )
            return
        if not isinstance(w, str) or not w.lower().endswith(WEIGHT_SUFFIXES):
            raise ConfigError(
                "weights must be None, 'imagenet', 'run:ID' or a path ending in "
                f"{', '.join(WEIGHT_SUFFIXES)}. Received: weights={w!r}"
            )

    def _check_freezing(self) -> None:
        if not isinstance(self.freeze_backbone, bool):
            raise ConfigError(
                "freeze_backbone must be a bool. "
                f"Received: freeze_backbone={self.freeze_backbone!r}"
            )
        k = self.unfreeze_top_k
        if k is not None and (not _is_int(k) or k < 1):
            raise ConfigError(
                f"unfreeze_top_k must be a positive integer or None. Received: unfreeze_top_k={k!r}"
            )
        # Freezing or partly unfreezing a randomly initialised backbone trains nothing useful.
        if self.weights is None and (self.freeze_backbone or k is not None):
            raise ConfigError(
                "freeze_backbone / unfreeze_top_k need pretrained weights. "
                f"Received: weights=None, freeze_backbone={self.freeze_backbone}, "
                f"unfreeze_top_k={k}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from its JSON form; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown ModelConfig keys; expected {sorted(known)}. Received: {unknown}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with a run."""
        data = dataclasses.asdict(self)
        data["head"] = None if self.head is None else self.head.to_dict()
        return data

    def head_description(self) -> str:
        """The head as built: this config's head, or the spec's own (for the model card)."""
        if self.head is not None:
            return self.head.describe()
        spec = MODELS[self.name]
        rates = ([self.dropout] * len(spec.head_dropout) if self.dropout is not None
                 else list(spec.head_dropout))
        dense = ", ".join(f"Dense({u}) relu, dropout {r:g}"
                          for u, r in zip(spec.head_units, rates))
        return f"the architecture's own: {spec.head_pool} pooling, " + (
            dense or f"dropout {rates[0]:g}")


@dataclass(frozen=True)
class WeightsReport:
    """What a weights load did, for the run log and the model card.

    Attributes:
        source: File the weights came from.
        method: ``"imagenet"``, ``"layer order"`` (keras.applications layout), ``"by name"`` or
            ``"structure"`` (a Keras 3 ``.weights.h5`` of the same graph).
        loaded: Layers (with weights) that received weights.
        total: Layers with weights in the model.
        skipped: Names of the layers with weights that kept their initial values.
    """

    source: str
    method: str
    loaded: int
    total: int
    skipped: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line, e.g. ``loaded 104/105 layers from x.h5 (by name)``."""
        return f"loaded {self.loaded}/{self.total} layers from {self.source} ({self.method})"


def _custom(name: str, description: str, size: int, min_size: int, saliency: str,
            backbone: str, backbone_args: Mapping[str, Any], **kwargs: Any) -> ModelSpec:
    kwargs.setdefault("preprocessing", "unit")
    kwargs.setdefault("rgb", False)
    kwargs.setdefault("head_pool", "flatten")
    return ModelSpec(name=name, description=description, default_size=size, min_size=min_size,
                     saliency_layer=saliency, backbone=backbone,
                     backbone_args=backbone_args, **kwargs)


def _app(name: str, function: str, description: str, preprocessing: PreprocessMode,
         saliency: str, imagenet: ImagenetFile, size: int = 224, min_size: int = 32,
         **kwargs: Any) -> ModelSpec:
    return ModelSpec(name=name, description=description, default_size=size, min_size=min_size,
                     preprocessing=preprocessing, rgb=True, saliency_layer=saliency,
                     backbone="keras_application", imagenet=imagenet,
                     keras_application=function, **kwargs)


def _notop(folder: str, stem: str, md5: str) -> ImagenetFile:
    return ImagenetFile(f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                        f"{_KERAS_APPS_URL}{folder}/", md5)


_VGG16_FILE = _notop("vgg16", "vgg16", "6d6bbae143d832006294945121d1f1fc")

# File names, URLs and hashes as in keras/src/applications/*.py (Keras 3.15).
_SPECS: tuple[ModelSpec, ...] = (
    _custom("cxrnet_224", "Strided-stem BatchNorm CNN (24-256 filters), 224 px; the default "
            "recipe's network", 224, 16, "block4_relu",
            "strided_bn", dict(stem=24, filters=(32, 64, 128, 256)), head_pool="avg",
            head_dropout=(0.3,)),
    _custom("cxrnet_28", "BatchNorm CNN (32-128 filters) for 28 px PneumoniaMNIST; the mnist28 "
            "recipe's network", 28, 8, "block3_relu",
            "strided_bn", dict(stem=32, filters=(64, 128, 128), reduce=False), head_pool="avg",
            head_dropout=(0.3,)),
    _custom("custom5_224", "5-conv custom CNN (16-256 filters), 224 px", 224, 32, "block5_conv",
            "plain_blocks", dict(filters=(16, 32, 64, 128, 256)),
            head_units=(256,), head_dropout=(0.5,)),
    _custom("small3_50", "Small 3-conv CNN with BatchNorm and rising dropout, 50 px", 50, 8,
            "block3_relu", "bn_blocks", dict(filters=(32, 64, 128), dropouts=(0.1, 0.2, 0.3)),
            head_units=(128,), head_dropout=(0.5,)),
    _custom("small4_50", "Small 4-conv CNN with BatchNorm and rising dropout, 50 px", 50, 16,
            "block4_relu", "bn_blocks",
            dict(filters=(32, 64, 128, 256), dropouts=(0.1, 0.2, 0.3, 0.4)),
            head_units=(128,), head_dropout=(0.5,)),
    _custom("small3_128", "Small 3-conv CNN with BatchNorm and rising dropout, 128 px", 128, 8,
            "block3_relu", "bn_blocks", dict(filters=(32, 64, 128), dropouts=(0.1, 0.2, 0.3)),
            head_units=(128,), head_dropout=(0.5,)),
    _custom("cnn1", "CNN_1: 32/64/128 convolutions, 150 px", 150, 8, "block3_conv",
            "plain_blocks", dict(filters=(32, 64, 128)), head_units=(128,), head_dropout=(0.5,)),
    # The original recipe's Flatten + 1024 + 512 head: at 224 px it holds ~103M of the weights.
    _custom("vgg_sep", "VGG16-style, separable blocks + BatchNorm; takes VGG16 block1-2 weights",
            224, 16, "block4_relu3", "vgg_sep", {}, head_units=(1024, 512), head_dropout=(0.7, 0.5),
            preprocessing="caffe", rgb=True, imagenet=_VGG16_FILE),
    _app("mobilenet", "MobileNet", "MobileNet (ImageNet)", "tf", "conv_pw_13_relu",
         ImagenetFile("mobilenet_1_0_{rows}_tf_no_top.h5", f"{_KERAS_APPS_URL}mobilenet/",
                      rows=(128, 160, 192, 224))),
    _app("mobilenetv2", "MobileNetV2", "MobileNetV2 (ImageNet)", "tf", "out_relu",
         ImagenetFile("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
                      f"{_KERAS_APPS_URL}mobilenet_v2/", rows=(96, 128, 160, 192, 224))),
    _app("vgg16", "VGG16", "VGG16 (ImageNet)", "caffe", "block5_conv3", _VGG16_FILE),
    _app("densenet121", "DenseNet121", "DenseNet121 (ImageNet; CheXNet weights load too)",
         "torch", "relu", _notop("densenet", "densenet121", "30ee3e1110167f948a6b9946edeeb738")),
    _app("resnet50", "ResNet50", "ResNet50 (ImageNet)", "caffe", "conv5_block3_out",
         _notop("resnet", "resnet50", "4d473c1dd8becc155b73f8504c6f6626")),
    _app("resnet50v2", "ResNet50V2", "ResNet50V2 (ImageNet)", "tf", "post_relu",
         _notop("resnet", "resnet50v2", "fac2f116257151a9d068a22e544a4917")),
    _app("resnet152v2", "ResNet152V2", "ResNet152V2 (ImageNet)", "tf", "post_relu",
         _notop("resnet", "resnet152v2", "ed17cf2e0169df9d443503ef94b23b33")),
    _app("efficientnetb0", "EfficientNetB0", "EfficientNetB0 (ImageNet)", "none",
         "top_activation",
         ImagenetFile("efficientnetb0_notop.h5",
                      "https://storage.googleapis.com/keras-applications/",
                      "50bc09e76180e00e4465e1a485ddc09d"),
         imagenet_fixup="efficientnet"),
    _app("inceptionv3", "InceptionV3", "InceptionV3 (ImageNet)", "tf", "mixed10",
         _notop("inception_v3", "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63"),
         size=299, min_size=75),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
