"""Model registry and builders: every model is one flat functional graph.

Why flat: tf-keras-vis Grad-CAM breaks on ``keras.Sequential`` with ``ReplaceToLinear`` and on
nested backbones (``x = base(inp)``, tf-keras-vis#71). So keras.applications backbones are built
with ``input_tensor=`` set to the output of our own preprocessing layers, and the head is built
on ``base.output``: the backbone's layers become the model's own layers.

Layer naming is part of the contract (training, saliency and model cards rely on it):

* the input is ``"image"``: float32 pixels in [0, 255], 1 or 3 channels;
* preprocessing layers start with ``"pre_"`` (gray to RGB, the family's ``preprocess_input``);
* head layers start with ``"head_"``; the first of them (``"head_pool"`` or ``"head_flatten"``)
  outputs the feature vector, and the last layer is the float32 ``"predictions"`` Dense;
* everything else is the backbone.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import keras
import numpy as np

from cxr_core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

PreprocessMode = Literal["unit", "caffe", "tf", "torch", "none"]

INPUT_NAME = "image"
PRE_PREFIX = "pre_"
HEAD_PREFIX = "head_"
PREDICTIONS = "predictions"
WEIGHT_SUFFIXES = (".keras", ".weights.h5", ".h5", ".hdf5")

# keras.applications.imagenet_utils constants ("caffe" is in BGR order, "torch" in RGB order).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


# ----------------------------------------------------------------------------------------------
# Registry types
# ----------------------------------------------------------------------------------------------


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


BackboneFn = Callable[[Any], "tuple[Any, keras.Model | None]"]


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
        backbone: Builds the backbone on a tensor; returns ``(output, keras.applications model
            or None)``. The returned model shares the layers; it is used only to load weights.
        head_pool: ``"avg"`` (GlobalAveragePooling2D) or ``"flatten"``.
        head_units: Widths of the ReLU Dense layers between the features and the predictions.
        head_dropout: Default dropout after each Dense (or once after pooling when there is no
            Dense); ``ModelConfig.dropout`` replaces all of them.
        imagenet: The ImageNet weights file, or None where there is none.
        keras_application: The keras.applications function, or None for our own networks.
        imagenet_fixup: Run after loading the ImageNet file (keeps Keras' imagenet graph).
    """

    name: str
    description: str
    default_size: int
    min_size: int
    preprocessing: PreprocessMode
    rgb: bool
    saliency_layer: str
    backbone: BackboneFn = field(repr=False, compare=False)
    head_pool: Literal["avg", "flatten"] = "avg"
    head_units: tuple[int, ...] = ()
    head_dropout: tuple[float, ...] = (0.2,)
    imagenet: ImagenetFile | None = None
    keras_application: str | None = None
    imagenet_fixup: Callable[[keras.Model], None] | None = field(
        default=None, repr=False, compare=False
    )


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
    """

    name: str = "mobilenetv2"
    image_size: int = 224
    channels: int = 3
    dropout: float | None = None
    weights: str | None = None
    freeze_backbone: bool = False
    unfreeze_top_k: int | None = None

    def __post_init__(self) -> None:
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
        return dataclasses.asdict(self)


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


@dataclass(frozen=True)
class BuiltModel:
    """A built model with its spec and what its weights load did (None: random init)."""

    model: keras.Model
    spec: ModelSpec
    weights_report: WeightsReport | None


# ----------------------------------------------------------------------------------------------
# Custom layer: the only one; everything else is a built-in layer so saved models load anywhere
# ----------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="cxr_core")
class RgbToBgr(keras.layers.Layer):
    """Reverses the channel axis ("caffe" preprocessing expects BGR).

    A layer instead of a ``Lambda`` so that saved models load with ``safe_mode`` on.
    """

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape


CUSTOM_OBJECTS: dict[str, type] = {"RgbToBgr": RgbToBgr}


# ----------------------------------------------------------------------------------------------
# Our own networks (the reports' recipes)
# ----------------------------------------------------------------------------------------------


# Keras' default 0.99 leaves a third of the initial variance (1.0) in the moving statistics
# after ~100 steps, which is a whole run on PneumoniaMNIST (37 steps an epoch): inference then
# saw mis-scaled activations and every prediction saturated near 1. 0.9 (PyTorch's 0.1)
# forgets the initial value within an epoch.
BN_MOMENTUM = 0.9


def _plain_blocks(x, filters: Sequence[int]):
    """Conv-ReLU-MaxPool blocks (the 5-conv custom CNN and CNN_1)."""
    for i, f in enumerate(filters, start=1):
        x = keras.layers.Conv2D(f, 3, padding="same", activation="relu", name=f"block{i}_conv")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return x, None


def _bn_blocks(x, filters: Sequence[int], dropouts: Sequence[float]):
    """Conv-BN-ReLU-MaxPool-Dropout blocks with rising dropout (the small 50 px CNNs)."""
    for i, (f, rate) in enumerate(zip(filters, dropouts), start=1):
        # No conv bias: the BatchNorm beta right after it does the same job.
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"block{i}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        x = keras.layers.Dropout(rate, name=f"block{i}_dropout")(x)
    return x, None


def _strided_bn(x, stem: int, filters: Sequence[int], convs: int = 1, reduce: bool = True):
    """A stem, then Conv-BN-ReLU blocks with max pooling between them (the recipes' networks).

    With ``reduce`` the stem is a stride-2 5x5 convolution and a max pool, so a 224 px film
    costs about what a 56 px one does in the blocks while the stem still sees full detail;
    without it (28 px inputs) the stem is a plain 3x3 convolution. No dropout sits between
    the BatchNorm layers: dropout before BatchNorm shifts the variance between training and
    inference (Li et al., CVPR 2019), which saturated the reports' small CNNs in our runs.
    """
    L = keras.layers
    x = L.Conv2D(stem, 5 if reduce else 3, strides=2 if reduce else 1, padding="same",
                 use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = L.Activation("relu", name="stem_relu")(x)
    if reduce:
        x = L.MaxPooling2D(2, name="stem_pool")(x)
    for i, f in enumerate(filters, start=1):
        for j in range(1, convs + 1):
            tag = f"block{i}" if convs == 1 else f"block{i}_{j}"
            x = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"{tag}_conv")(x)
            x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{tag}_bn")(x)
            x = L.Activation("relu", name=f"{tag}_relu")(x)
        if i < len(filters):
            x = L.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return x, None


def _vgg_sep(x):
    """VGG16-style net: VGG16's own first two blocks, then depthwise-separable blocks with BN.

    Blocks 1-2 are plain convolutions named exactly as in VGG16 so that they can take VGG16
    ImageNet weights (``load_vgg16_first_blocks``); the later blocks are cheaper separable ones.
    """
    # Entry blocks: VGG16-compatible
    for block, filters in ((1, 64), (2, 128)):
        for i in (1, 2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"block{block}_conv{i}"
            )(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    # Separable blocks: names differ from VGG16's so by-name loading never touches them
    for block, filters in ((3, 256), (4, 512)):
        for i in (1, 2, 3):
            x = keras.layers.SeparableConv2D(
                filters, 3, padding="same", use_bias=False, name=f"block{block}_sepconv{i}"
            )(x)
            x = keras.layers.BatchNormalization(name=f"block{block}_bn{i}")(x)
            x = keras.layers.Activation("relu", name=f"block{block}_relu{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return x, None


def _keras_backbone(function: str, **kwargs: Any) -> BackboneFn:
    """A keras.applications backbone built flat on our preprocessing output."""

    def build(x):
        app = getattr(keras.applications, function)
        # weights=None: ImageNet weights are fetched and loaded by us (see _imagenet_path) so
        # that a missing file gives a clear error and KERAS_HOME is read at call time.
        base = app(include_top=False, weights=None, input_tensor=x, **kwargs)
        return base.output, base

    return build


def _efficientnet_fixup(base: keras.Model) -> None:
    """Reproduces Keras' EfficientNet ImageNet graph in a model built with ``weights=None``.

    With ``weights="imagenet"`` Keras adds ``Rescaling(1/sqrt(std))`` after the stem
    Normalization (tensorflow#49930). Scaling that layer's variance by ``std`` is the same map,
    (x - mean) / sqrt(var * std), without a layer that only exists for ImageNet weights.
    """
    norm = next(layer for layer in base.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance, count = norm.get_weights()
    norm.set_weights([mean, variance * np.asarray(_TORCH_STD, variance.dtype), count])
    norm.finalize_state()  # the layer caches mean/variance tensors; refresh them


def _custom(name: str, description: str, size: int, min_size: int, saliency: str,
            backbone: BackboneFn, **kwargs: Any) -> ModelSpec:
    kwargs.setdefault("preprocessing", "unit")
    kwargs.setdefault("rgb", False)
    kwargs.setdefault("head_pool", "flatten")
    return ModelSpec(name=name, description=description, default_size=size, min_size=min_size,
                     saliency_layer=saliency, backbone=backbone, **kwargs)


def _app(name: str, function: str, description: str, preprocessing: PreprocessMode,
         saliency: str, imagenet: ImagenetFile, size: int = 224, min_size: int = 32,
         **kwargs: Any) -> ModelSpec:
    return ModelSpec(name=name, description=description, default_size=size, min_size=min_size,
                     preprocessing=preprocessing, rgb=True, saliency_layer=saliency,
                     backbone=_keras_backbone(function), imagenet=imagenet,
                     keras_application=function, **kwargs)


def _notop(folder: str, stem: str, md5: str) -> ImagenetFile:
    return ImagenetFile(f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                        f"{_KERAS_APPS_URL}{folder}/", md5)


_VGG16_FILE = _notop("vgg16", "vgg16", "6d6bbae143d832006294945121d1f1fc")

# File names, URLs and hashes as in keras/src/applications/*.py (Keras 3.15).
_SPECS: tuple[ModelSpec, ...] = (
    _custom("cxrnet_224", "Strided-stem BatchNorm CNN (24-256 filters), 224 px; the default "
            "recipe's network", 224, 16, "block4_relu",
            lambda x: _strided_bn(x, 24, (32, 64, 128, 256)), head_pool="avg",
            head_dropout=(0.3,)),
    _custom("cxrnet_28", "BatchNorm CNN (32-128 filters) for 28 px PneumoniaMNIST; the mnist28 "
            "recipe's network", 28, 8, "block3_relu",
            lambda x: _strided_bn(x, 32, (64, 128, 128), reduce=False), head_pool="avg",
            head_dropout=(0.3,)),
    _custom("custom5_224", "5-conv custom CNN (16-256 filters), 224 px", 224, 32, "block5_conv",
            lambda x: _plain_blocks(x, (16, 32, 64, 128, 256)),
            head_units=(256,), head_dropout=(0.5,)),
    _custom("small3_50", "Small 3-conv CNN with BatchNorm and rising dropout, 50 px", 50, 8,
            "block3_relu", lambda x: _bn_blocks(x, (32, 64, 128), (0.1, 0.2, 0.3)),
            head_units=(128,), head_dropout=(0.5,)),
    _custom("small4_50", "Small 4-conv CNN with BatchNorm and rising dropout, 50 px", 50, 16,
            "block4_relu", lambda x: _bn_blocks(x, (32, 64, 128, 256), (0.1, 0.2, 0.3, 0.4)),
            head_units=(128,), head_dropout=(0.5,)),
    _custom("small3_128", "Small 3-conv CNN with BatchNorm and rising dropout, 128 px", 128, 8,
            "block3_relu", lambda x: _bn_blocks(x, (32, 64, 128), (0.1, 0.2, 0.3)),
            head_units=(128,), head_dropout=(0.5,)),
    _custom("cnn1", "CNN_1: 32/64/128 convolutions, 150 px", 150, 8, "block3_conv",
            lambda x: _plain_blocks(x, (32, 64, 128)), head_units=(128,), head_dropout=(0.5,)),
    # The original recipe's Flatten + 1024 + 512 head: at 224 px it holds ~103M of the weights.
    _custom("vgg_sep", "VGG16-style, separable blocks + BatchNorm; takes VGG16 block1-2 weights",
            224, 16, "block4_relu3", _vgg_sep, head_units=(1024, 512), head_dropout=(0.7, 0.5),
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
         imagenet_fixup=_efficientnet_fixup),
    _app("inceptionv3", "InceptionV3", "InceptionV3 (ImageNet)", "tf", "mixed10",
         _notop("inception_v3", "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63"),
         size=299, min_size=75),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, num_classes: int) -> keras.Model:
    """Builds a flat functional classifier for ``cfg`` (weights loaded, layers frozen as asked).

    Args:
        cfg: What to build.
        num_classes: 2 gives one sigmoid unit; more give a softmax over ``num_classes``.

    Returns:
        An uncompiled ``keras.Model`` taking float32 [0, 255] images.

    Raises:
        ConfigError: ``num_classes`` is below 2.
        ModelError: Weights cannot be found, downloaded or matched to the model.
    """
    return build_model_with_report(cfg, num_classes).model


def build_model_with_report(cfg: ModelConfig, num_classes: int) -> BuiltModel:
    """Like :func:`build_model`, also returning the spec and what the weights load did."""
    if not _is_int(num_classes) or num_classes < 2:
        raise ConfigError(
            f"num_classes must be an integer >= 2. Received: num_classes={num_classes!r}"
        )
    spec = MODELS[cfg.name]
    # Find the weights file first: a missing download should fail before a long build.
    weights_path = _weights_file(spec, cfg)
    # Entry block: [0, 255] pixels -> the family's input range, inside the model
    inputs = keras.Input((cfg.image_size, cfg.image_size, cfg.channels), name=INPUT_NAME)
    x = _preprocessing(inputs, spec, cfg.channels)
    # Backbone: built on our tensor, so its layers are the model's own (flat graph)
    x, base = spec.backbone(x)
    # Head
    outputs = _head(x, spec, cfg.dropout, num_classes)
    model = keras.Model(inputs, outputs, name=cfg.name)

    report = None
    if weights_path is not None:
        report = _load_weights_file(model, base, spec, cfg.image_size, weights_path)
        log.info("%s: %s", cfg.name, report.summary())
    if cfg.freeze_backbone:
        set_backbone_trainable(model, False)
    elif report is not None:
        # Pretrained without a frozen stage: fine-tune at once, BatchNorm kept frozen.
        set_backbone_trainable(model, True, cfg.unfreeze_top_k)
    return BuiltModel(model, spec, report)


def _preprocessing(x, spec: ModelSpec, channels: int):
    """Adds the ``pre_*`` layers: gray to RGB, then the family's ``preprocess_input``."""
    L = keras.layers
    if spec.rgb and channels == 1:
        x = L.Concatenate(axis=-1, name="pre_gray_to_rgb")([x, x, x])
    mode = spec.preprocessing
    if mode == "unit":
        x = L.Rescaling(1.0 / 255.0, name="pre_rescale")(x)
    elif mode == "tf":
        x = L.Rescaling(1.0 / 127.5, offset=-1.0, name="pre_rescale")(x)
    elif mode == "torch":
        scale = [1.0 / (255.0 * s) for s in _TORCH_STD]
        offset = [-m / s for m, s in zip(_TORCH_MEAN, _TORCH_STD)]
        x = L.Rescaling(scale, offset=offset, name="pre_rescale")(x)
    elif mode == "caffe":
        # A repeated gray image is the same in BGR, so the flip is only needed for 3 channels.
        if channels == 3:
            x = RgbToBgr(name="pre_rgb_to_bgr")(x)
        x = L.Rescaling(1.0, offset=[-m for m in _CAFFE_MEAN_BGR], name="pre_rescale")(x)
    return x


def _head(x, spec: ModelSpec, dropout: float | None, num_classes: int):
    """Pooled/flattened features -> [Dense-Dropout]* -> float32 ``predictions``."""
    L = keras.layers
    if spec.head_pool == "avg":
        x = L.GlobalAveragePooling2D(name="head_pool")(x)
    else:
        x = L.Flatten(name="head_flatten")(x)
    rates = [dropout] * len(spec.head_dropout) if dropout is not None else list(spec.head_dropout)
    for i, units in enumerate(spec.head_units, start=1):
        x = L.Dense(units, activation="relu", name=f"head_dense{i}")(x)
        x = L.Dropout(rates[i - 1], name=f"head_dropout{i}")(x)
    if not spec.head_units:
        x = L.Dropout(rates[0], name="head_dropout")(x)
    binary = num_classes == 2
    # float32 so that a mixed-precision policy never yields float16 probabilities.
    return L.Dense(
        1 if binary else num_classes,
        activation="sigmoid" if binary else "softmax",
        dtype="float32",
        name=PREDICTIONS,
    )(x)


# ----------------------------------------------------------------------------------------------
# Backbone / head views and trainability
# ----------------------------------------------------------------------------------------------


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone layers in graph order: not the input, ``pre_*``, ``head_*`` or predictions."""
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
        and not layer.name.startswith((PRE_PREFIX, HEAD_PREFIX))
        and layer.name != PREDICTIONS
    ]


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The ``head_*`` layers and ``predictions``, in graph order."""
    return [
        layer
        for layer in model.layers
        if layer.name.startswith(HEAD_PREFIX) or layer.name == PREDICTIONS
    ]


def set_backbone_trainable(
    model: keras.Model,
    trainable: bool,
    top_k: int | None = None,
    *,
    freeze_batchnorm: bool = True,
) -> None:
    """Freezes the backbone, or unfreezes its top ``top_k`` layers for fine-tuning.

    The head stays trainable. Recompile the model afterwards for the change to take effect.

    Args:
        model: A model built by :func:`build_model` (or loaded from one).
        trainable: False freezes every backbone layer; True unfreezes the top ``top_k``.
        top_k: Backbone layers, counted from the top in graph order (weightless ones included,
            as in the Keras fine-tuning guide), to unfreeze; None = all.
        freeze_batchnorm: Keep BatchNorm layers frozen (inference mode) when unfreezing, so
            small fine-tuning batches do not wreck their pretrained statistics.

    Raises:
        ConfigError: ``top_k`` is not a positive integer.
    """
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer or None. Received: top_k={top_k!r}")
    layers = backbone_layers(model)
    start = max(0, len(layers) - top_k) if (trainable and top_k is not None) else 0
    for i, layer in enumerate(layers):
        on = trainable and i >= start
        if on and freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization):
            on = False
        layer.trainable = on
    for layer in head_layers(model):
        layer.trainable = True


def _features_layer(model: keras.Model) -> keras.layers.Layer:
    heads = head_layers(model)
    if not heads or heads[0].name == PREDICTIONS:
        raise ModelError(
            f"Model '{model.name}' has no 'head_*' layers; expected a model built by "
            "cxr_core.models.build_model."
        )
    return heads[0]


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to its pooled/flattened features (for caching frozen-backbone features).

    Shares layers and weights with ``model``.

    Raises:
        ModelError: The model was not built by :func:`build_model`.
    """
    feat = _features_layer(model)
    return keras.Model(model.input, feat.output, name=f"{model.name}_features")


def head_model(model: keras.Model) -> keras.Model:
    """The head alone: features (as from :func:`feature_extractor`) -> predictions.

    Shares layers and weights with ``model``, so training it trains ``model``'s head.

    Raises:
        ModelError: The model was not built by :func:`build_model`.
    """
    feat = _features_layer(model)
    inputs = keras.Input(tuple(feat.output.shape[1:]), name="features")
    x = inputs
    # The head is a chain, so re-applying its layers in order rebuilds it.
    for layer in head_layers(model)[1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


_NOT_SALIENCY = (
    keras.layers.InputLayer,
    keras.layers.Dropout,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.ZeroPadding2D,
)


def saliency_layer_name(model: keras.Model) -> str:
    """Name of the last 4-D conv/activation layer before the head (the Grad-CAM target).

    Raises:
        ModelError: The model has no such layer.
    """
    for layer in reversed(model.layers):
        if layer.name.startswith((HEAD_PREFIX, PRE_PREFIX)) or layer.name == PREDICTIONS:
            continue
        if isinstance(layer, _NOT_SALIENCY) or isinstance(layer, keras.Model):
            continue
        output = getattr(layer, "output", None)
        if output is not None and len(output.shape) == 4:
            return layer.name
    raise ModelError(f"Model '{model.name}' has no 4-D conv/activation layer for saliency.")


def load_model(path: str | os.PathLike[str]) -> keras.Model:
    """Loads a saved ``.keras`` model (knows this module's custom layer).

    Raises:
        ModelError: The file is missing or is not a loadable Keras model.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Model file not found; expected a .keras file. Received: {p}")
    if p.suffix == ".keras" and not zipfile.is_zipfile(p):  # Keras says "File not found"
        raise ModelError(f"{p}: not a Keras model file (a .keras file is a zip archive saved "
                         f"by model.save; an .h5 or other file renamed .keras is not one)")
    try:
        return keras.models.load_model(p, compile=False, custom_objects=CUSTOM_OBJECTS)
    except Exception as exc:  # Keras raises many types (ValueError, OSError, TypeError, ...)
        raise ModelError(f"Cannot load model {p}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    """The Keras cache folder for weights: ``$KERAS_HOME/models`` (default ``~/.keras/models``).

    Read at call time: Keras itself reads ``KERAS_HOME`` once, at import.
    """
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def imagenet_weights_path(spec: ModelSpec, image_size: int) -> Path:
    """The ImageNet weights file for ``spec``, from the Keras cache or downloaded into it.

    A file already in the cache is used as is (no download, no hash check). A missing one is
    downloaded with ``keras.utils.get_file`` (the download keras.applications does, hash
    checked). There is no random-weights fallback.

    Raises:
        ModelError: The spec has no ImageNet weights, or the file is missing and the download
            failed; the message names the file, its URL and the folder to put it in.
    """
    if spec.imagenet is None:
        raise ModelError(f"'{spec.name}' has no ImageNet weights. Received: weights='imagenet'")
    file_name, url = spec.imagenet.resolve(image_size)
    folder = keras_cache_dir()
    cached = folder / file_name
    if cached.is_file():
        return cached
    # No socket pre-check: it would ignore HTTP(S)_PROXY, which urllib (get_file) honours.
    try:
        got = keras.utils.get_file(
            file_name, url, cache_dir=str(folder.parent), cache_subdir="models",
            file_hash=spec.imagenet.md5,
        )
    except Exception as exc:  # get_file re-raises network failures as bare Exception
        raise ModelError(
            f"ImageNet weights for '{spec.name}' are not in the Keras cache and could not be "
            f"downloaded ({exc}). Expected file: {file_name}. Download it from {url} and put it "
            f"in {folder} (set KERAS_HOME to use another cache folder), or use weights=None."
        ) from exc
    return Path(got)


def _weights_file(spec: ModelSpec, cfg: ModelConfig) -> Path | None:
    """The file ``cfg.weights`` names (ImageNet: from the Keras cache or downloaded)."""
    w = cfg.weights
    if w is None:
        return None
    if w.startswith("run:"):
        raise ModelError(
            f"weights={w!r} must be resolved to that run's .keras file by the caller before "
            "building (cxr_core.models cannot see runs)."
        )
    if w == "imagenet":
        return imagenet_weights_path(spec, cfg.image_size)
    path = Path(w).expanduser()
    if not path.is_file():
        raise ModelError(
            f"Weights file not found; expected an existing file. Received: weights={w}"
        )
    return path


def _load_weights_file(
    model: keras.Model, base: keras.Model | None, spec: ModelSpec, image_size: int, path: Path
) -> WeightsReport:
    # The family's ImageNet file counts as "imagenet" wherever it lies (same graph fix-ups).
    if spec.imagenet is not None and path.name == spec.imagenet.resolve(image_size)[0]:
        if base is None:  # vgg_sep: only its VGG16-compatible blocks can take the file
            return load_vgg16_first_blocks(model, path)
        return _load_imagenet_file(model, base, spec, path)
    return load_weights(model, path, base=base)


def _load_imagenet_file(
    model: keras.Model, base: keras.Model, spec: ModelSpec, path: Path
) -> WeightsReport:
    """Loads a keras.applications no-top file the way keras.applications does (layer order)."""
    try:
        base.load_weights(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"{path} does not fit '{spec.name}' (expected the keras.applications no-top file "
            f"{path.name}; a partial download? delete it and try again): {exc}"
        ) from exc
    if spec.imagenet_fixup is not None:
        spec.imagenet_fixup(base)
    n = len(_weighted(base.layers))
    return WeightsReport(str(path), "imagenet", n, len(_weighted(model.layers)),
                         tuple(layer.name for layer in head_layers(model) if layer.weights))


def load_weights(
    model: keras.Model, path: str | os.PathLike[str], *, base: keras.Model | None = None
) -> WeightsReport:
    """Loads weights from a file into a built model, layer by layer where they fit.

    * ``.keras`` (a previous run): copied by layer name where shapes match (transfer).
    * legacy ``.h5`` / ``.hdf5`` (keras.applications files, CheXNet, Keras 2 saves): in layer
      order into ``base`` when the layouts agree, otherwise by layer name (Keras 2 ``a/b``
      names match our ``a_b``) where shapes match; a mismatching head (e.g. CheXNet's 14
      outputs) is skipped, so the backbone is taken.
    * ``.weights.h5`` (Keras 3): the same graph as is, else with mismatching layers skipped.

    Args:
        model: A built model.
        path: The weights file.
        base: The keras.applications part of ``model``, if any (for layer-order files).

    Returns:
        What was loaded.

    Raises:
        ModelError: The file is missing, unreadable, or no layer matches.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Weights file not found; expected an existing file. Received: {p}")
    name = p.name.lower()
    if name.endswith(".keras"):
        src = load_model(p)
        report = _assign_by_name(model, _model_weights(src), str(p), match_classes=True)
    elif name.endswith(".weights.h5"):
        report = _load_keras3_weights(model, p, base)
    elif name.endswith((".h5", ".hdf5")):
        report = _load_legacy_h5(model, p, base)
    else:
        raise ModelError(f"Unknown weights file type; expected {WEIGHT_SUFFIXES}. Received: {p}")
    if report.loaded == 0:
        raise ModelError(
            f"No layer of '{model.name}' matched {p}: expected weights of the same architecture "
            "(layer names and shapes), a keras.applications file or a previous run's .keras."
        )
    return report


def load_vgg16_first_blocks(
    model: keras.Model, vgg16_weights_path: str | os.PathLike[str]
) -> WeightsReport:
    """Copies VGG16's ``block1_conv1..block2_conv2`` weights into the same-named layers.

    Args:
        model: A model with those four layers (``vgg_sep``).
        vgg16_weights_path: A VGG16 legacy ``.h5`` (the keras.applications file, with or
            without top) or a ``.keras`` VGG16 model.

    Returns:
        What was loaded (4 layers).

    Raises:
        ModelError: The file lacks one of the four layers or their shapes differ.
    """
    wanted = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")
    p = Path(vgg16_weights_path)
    if not p.is_file():
        raise ModelError(f"VGG16 weights file not found. Received: {p}")
    if p.name.lower().endswith(".keras"):
        source = _model_weights(load_model(p))
    else:
        source = dict(_read_legacy_h5(p))
    for name in wanted:
        target = _get_layer(model, name)
        arrays = source.get(name, [])
        if target is None or not _shapes_match(target, arrays):
            raise ModelError(
                f"{p} cannot fill '{name}': expected VGG16 weights with {name} shapes "
                f"{[tuple(w.shape) for w in target.weights] if target else 'n/a'}; "
                f"received {[a.shape for a in arrays] or 'no such layer'}."
            )
    for name in wanted:
        _set_layer_weights(_get_layer(model, name), source[name])
    return WeightsReport(str(p), "by name (VGG16 blocks 1-2)", len(wanted),
                         len(_weighted(model.layers)),
                         tuple(layer.name for layer in _weighted(model.layers)
                               if layer.name not in wanted))


def _load_legacy_h5(model: keras.Model, p: Path, base: keras.Model | None) -> WeightsReport:
    entries = _read_legacy_h5(p)
    if base is not None and _assign_in_order(base, entries):
        return WeightsReport(str(p), "layer order", len(_weighted(base.layers)),
                             len(_weighted(model.layers)),
                             tuple(layer.name for layer in head_layers(model) if layer.weights))
    # Keras 2 named nested layers "conv1/conv"; Keras 3 names them "conv1_conv".
    by_name = {name.replace("/", "_"): arrays for name, arrays in entries}
    return _assign_by_name(model, {k: (None, v) for k, v in by_name.items()}, str(p))


def _load_keras3_weights(model: keras.Model, p: Path, base: keras.Model | None) -> WeightsReport:
    total = len(_weighted(model.layers))
    # Taken first: a failed strict load has already assigned every layer that fitted.
    before = {layer.name: layer.get_weights() for layer in _weighted(model.layers)}
    # Keras 3 keys these files by graph position and layer type, not by layer name.
    for target in (model, base):
        if target is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras warns per layer before it raises
                target.load_weights(str(p))
        except (ValueError, KeyError) as exc:
            log.debug("strict load of %s into %s failed: %s", p, target.name, exc)
            continue
        return WeightsReport(str(p), "structure", len(_weighted(target.layers)), total)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per skipped layer; we report them
            model.load_weights(str(p), skip_mismatch=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"Cannot read {p} as Keras 3 weights for '{model.name}': {exc}") from exc
    # Counted by change: values equal to a fresh build's (e.g. untrained BatchNorm) count as
    # skipped, so this undercounts for never-trained sources.
    skipped = tuple(
        layer.name
        for layer in _weighted(model.layers)
        if all(np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))
    )
    return WeightsReport(
        str(p), "structure, mismatches skipped", total - len(skipped), total, skipped
    )


def _read_legacy_h5(path: Path) -> list[tuple[str, list[np.ndarray]]]:
    """``[(layer name, arrays)]`` in file order from a Keras 2-layout ``.h5`` (weights or model)."""
    try:
        with h5py.File(path, "r") as f:
            # A full-model .h5 (model.save) nests the weights under "model_weights".
            full_model = "layer_names" not in f.attrs and "model_weights" in f
            group = f["model_weights"] if full_model else f
            out = []
            for name in _h5_attr_list(group, "layer_names"):
                g = group[name]
                out.append((name, [np.asarray(g[w]) for w in _h5_attr_list(g, "weight_names")]))
            return out
    except (OSError, KeyError) as exc:
        raise ModelError(
            f"Cannot read {path} as a Keras .h5 weights file (expected 'layer_names'): {exc}"
        ) from exc


def _h5_attr_list(group: h5py.Group, name: str) -> list[str]:
    """An h5 string-list attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
        if not values and name == "layer_names":  # weight_names may be legitimately empty
            raise KeyError(f"no '{name}' attribute")
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _assign_in_order(base: keras.Model, entries: list[tuple[str, list[np.ndarray]]]) -> bool:
    """keras.applications' own layout: weighted layers in order. Loads only if all shapes fit."""
    targets = _weighted(base.layers)
    sources = [arrays for _, arrays in entries if arrays]
    if len(targets) != len(sources):
        return False
    if not all(_shapes_match(t, s) for t, s in zip(targets, sources)):
        return False
    for target, arrays in zip(targets, sources):
        _set_layer_weights(target, arrays)
    return True


def _model_weights(src: keras.Model) -> dict[str, tuple[str | None, list[np.ndarray]]]:
    return {
        layer.name: (type(layer).__name__, layer.get_weights()) for layer in _weighted(src.layers)
    }


def _assign_by_name(
    model: keras.Model,
    source: Mapping[str, tuple[str | None, list[np.ndarray]]],
    label: str,
    *,
    match_classes: bool = False,
) -> WeightsReport:
    """Copies weights by layer name where shapes match.

    With ``match_classes``, layers left over on both sides are then paired when exactly one
    layer of a type and weight shapes remains on each side: auto-named keras.applications
    layers (EfficientNet's stem ``normalization_N``) get a new number in every build.
    """
    targets = _weighted(model.layers)
    used, matched, left = set(), [], []
    for layer in targets:
        entry = source.get(layer.name)
        if entry is not None and _shapes_match(layer, entry[1]):
            _set_layer_weights(layer, entry[1])
            used.add(layer.name)
            matched.append(layer.name)
        else:
            left.append(layer)
    if match_classes and left:
        rest = {k: v for k, v in source.items() if k not in used}
        for layer in list(left):
            key = _layer_signature(layer)
            mine = [t for t in left if _layer_signature(t) == key]
            theirs = [k for k, (cls, arr) in rest.items()
                      if _signature(cls, [a.shape for a in arr]) == key]
            if len(mine) == 1 and len(theirs) == 1:
                _set_layer_weights(layer, rest.pop(theirs[0])[1])
                matched.append(layer.name)
                left.remove(layer)
    return WeightsReport(label, "by name", len(matched), len(targets), tuple(t.name for t in left))


def _signature(cls: str | None, shapes: Sequence[tuple[int, ...]]) -> tuple:
    return (cls, tuple(tuple(int(d) for d in s) for s in shapes))


def _layer_signature(layer: keras.layers.Layer) -> tuple:
    return _signature(type(layer).__name__, [tuple(w.shape) for w in layer.weights])


def _weighted(layers: Sequence[keras.layers.Layer]) -> list[keras.layers.Layer]:
    return [layer for layer in layers if layer.weights and not isinstance(layer, keras.Model)]


def _shapes_match(layer: keras.layers.Layer, arrays: Sequence[np.ndarray]) -> bool:
    shapes = [tuple(w.shape) for w in layer.weights]
    return len(shapes) == len(arrays) and all(s == tuple(a.shape) for s, a in zip(shapes, arrays))


def _set_layer_weights(layer: keras.layers.Layer, arrays: Sequence[np.ndarray]) -> None:
    layer.set_weights(list(arrays))
    if hasattr(layer, "finalize_state"):  # Normalization caches tensors made from its variables
        layer.finalize_state()


def _get_layer(model: keras.Model, name: str) -> keras.layers.Layer | None:
    return next((layer for layer in model.layers if layer.name == name), None)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
