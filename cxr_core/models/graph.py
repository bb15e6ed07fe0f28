"""Keras graphs from the registry's specs: every model is one flat functional graph.

Why flat: tf-keras-vis Grad-CAM breaks on ``keras.Sequential`` with ``ReplaceToLinear`` and on
nested backbones (``x = base(inp)``, tf-keras-vis#71). So keras.applications backbones are built
with ``input_tensor=`` set to the output of our own preprocessing layers, and the head is built
on ``base.output``: the backbone's layers become the model's own layers.

Layer names are part of the contract (:mod:`cxr_core.models.layers`): training, saliency and
model cards rely on them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.models import weights as model_weights
from cxr_core.models.layers import (
    HEAD_PREFIX,
    INPUT_NAME,
    PRE_PREFIX,
    PREDICTIONS,
    RgbToBgr,
    StandardizeIntensity,
    backbone_layers,
    head_layers,
)
from cxr_core.models.specs import (
    CAFFE_MEAN_BGR,
    MODELS,
    TORCH_MEAN,
    TORCH_STD,
    HeadConfig,
    ModelConfig,
    ModelSpec,
    WeightsReport,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltModel:
    """A built model with its spec and what its weights load did (None: random init)."""

    model: keras.Model
    spec: ModelSpec
    weights_report: WeightsReport | None


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


def _keras_application(x, function: str):
    """A keras.applications backbone built flat on our preprocessing output."""
    app = getattr(keras.applications, function)
    # weights=None: ImageNet weights are fetched and loaded by us (model_weights) so that a
    # missing file gives a clear error and KERAS_HOME is read at call time.
    base = app(include_top=False, weights=None, input_tensor=x)
    return base.output, base


# ModelSpec.backbone -> builder(x, **spec.backbone_args) -> (output, keras.applications model or
# None). The returned model shares the layers; it is used only to load weights.
BACKBONES: dict[str, Callable[..., tuple[Any, keras.Model | None]]] = {
    "plain_blocks": _plain_blocks,
    "bn_blocks": _bn_blocks,
    "strided_bn": _strided_bn,
    "vgg_sep": _vgg_sep,
}


def _backbone(x, spec: ModelSpec):
    if spec.backbone == "keras_application":
        return _keras_application(x, spec.keras_application)
    return BACKBONES[spec.backbone](x, **spec.backbone_args)


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
    weights_path = model_weights.weights_file(spec, cfg)
    # Entry block: [0, 255] pixels -> the family's input range, inside the model
    inputs = keras.Input((cfg.image_size, cfg.image_size, cfg.channels), name=INPUT_NAME)
    x = inputs
    if cfg.intensity == "standardize":
        x = StandardizeIntensity(name="pre_intensity")(x)
    x = _preprocessing(x, spec, cfg.channels)
    # Backbone: built on our tensor, so its layers are the model's own (flat graph)
    x, base = _backbone(x, spec)
    # Head
    outputs = _head(x, spec, cfg.dropout, num_classes, cfg.head)
    model = keras.Model(inputs, outputs, name=cfg.name)

    report = None
    if weights_path is not None:
        report = model_weights.load_weights_file(model, base, spec, cfg.image_size, weights_path)
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
        scale = [1.0 / (255.0 * s) for s in TORCH_STD]
        offset = [-m / s for m, s in zip(TORCH_MEAN, TORCH_STD)]
        x = L.Rescaling(scale, offset=offset, name="pre_rescale")(x)
    elif mode == "caffe":
        # A repeated gray image is the same in BGR, so the flip is only needed for 3 channels.
        if channels == 3:
            x = RgbToBgr(name="pre_rgb_to_bgr")(x)
        x = L.Rescaling(1.0, offset=[-m for m in CAFFE_MEAN_BGR], name="pre_rescale")(x)
    return x


def _head(x, spec: ModelSpec, dropout: float | None, num_classes: int,
          head: HeadConfig | None = None):
    """Pooled/flattened features -> [Dense-Dropout]* -> float32 ``predictions``.

    ``head`` None builds the spec's own head (exactly as every recipe always had it);
    otherwise :func:`_configured_head`.
    """
    L = keras.layers
    if spec.head_pool == "avg":
        x = L.GlobalAveragePooling2D(name="head_pool")(x)
    else:
        x = L.Flatten(name="head_flatten")(x)
    if head is not None:
        x = _configured_head(x, head)
    else:
        rates = ([dropout] * len(spec.head_dropout) if dropout is not None
                 else list(spec.head_dropout))
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


def _configured_head(x, head: HeadConfig):
    """``head.layers`` blocks of Dense (the activation's initialiser) -> [BatchNorm] ->
    activation -> dropout (AlphaDropout after SELU, which keeps its self-normalisation)."""
    L = keras.layers
    drop = L.AlphaDropout if head.activation == "selu" else L.Dropout
    for i, units in enumerate(head.widths, start=1):
        x = L.Dense(units, use_bias=not head.batch_norm, kernel_initializer=head.initializer,
                    name=f"head_dense{i}")(x)
        if head.batch_norm:  # never for SELU (HeadConfig turns it off)
            x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"head_bn{i}")(x)
        x = L.Activation(head.activation, name=f"head_act{i}")(x)
        if head.dropout:
            x = drop(head.dropout, name=f"head_dropout{i}")(x)
    if not head.layers and head.dropout:
        x = L.Dropout(head.dropout, name="head_dropout")(x)
    return x


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
            "cxr_core.models.graph.build_model."
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


_SPATIAL_END = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
                keras.layers.Flatten)  # the first layer of a classifier's head


def _is_map(layer: keras.layers.Layer, *, min_positions: int = 1) -> bool:
    """Whether a layer outputs a 4-D feature map with at least ``min_positions`` positions."""
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # shared layers or layers never called
        return False
    if len(shape) != 4:
        return False
    return shape[1] is None or shape[2] is None or shape[1] * shape[2] >= min_positions


def _head_start(layers: list) -> int:
    """Index of the global pooling / flatten that starts the head (len(layers): none).

    The last such layer that no map of more than one position follows: a squeeze-excite block
    (EfficientNet, MobileNetV3) pools and then scales a full map again, while a head may keep
    1x1 maps (MobileNet's keepdims pooling and 1x1 ``conv_preds`` classifier).
    """
    for i in range(len(layers) - 1, -1, -1):
        if isinstance(layers[i], _SPATIAL_END):
            return i
        if _is_map(layers[i], min_positions=2):
            break
    return len(layers)


def saliency_layer_name(model: keras.Model) -> str:
    """Name of the layer whose feature maps CAM methods explain (the Grad-CAM target): the one
    rule, used by training (recorded in the model card), Predict, Review and model loading.

    The last layer with a 4-D output before the head's global pooling or flatten, at or after
    the first convolution (else the maps would explain raw pixels), skipping ``pre_*`` and
    ``head_*`` layers, nested models and layers that only resample or regularise a map
    (pooling, padding, dropout): ``out_relu`` in MobileNetV2, ``top_activation`` in
    EfficientNetB0, ``block3_relu`` (not ``block3_dropout``) in the small CNNs. Models from
    elsewhere, without the ``pre_``/``head_`` names, get the same answer.

    Raises:
        ModelError: The model has no convolutional 4-D feature map before its head.
    """
    layers = list(model.layers)
    first_conv = next((i for i, layer in enumerate(layers)
                       if "conv" in type(layer).__name__.lower()), len(layers))
    for layer in reversed(layers[first_conv:_head_start(layers)]):
        if layer.name.startswith((HEAD_PREFIX, PRE_PREFIX)) or layer.name == PREDICTIONS:
            continue
        if isinstance(layer, (_NOT_SALIENCY, keras.Model)):
            continue
        if _is_map(layer):
            return layer.name
    raise ModelError(
        "Expected a model with a convolutional 4-D feature map before global pooling. "
        f"Received: model={model.name!r} with no such layer."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """The model's size: every weight, those training updates and the rest (frozen backbone
    layers, BatchNorm's moving statistics), as Keras' ``model.summary()`` counts them."""
    def size(weights: Sequence[Any]) -> int:
        return int(sum(int(np.prod(w.shape)) for w in weights))

    total = size(model.weights)
    trainable = size(model.trainable_weights)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}
