"""The graph contract every model shares, and the one model loader: layer names, the custom
Keras layers (registered as ``cxr_core>RgbToBgr`` and ``cxr_core>StandardizeIntensity``: saved
models name them so), the backbone / head views and :func:`load_model`.

A leaf of :mod:`cxr_core.models`: the builder (:mod:`cxr_core.models.graph`) and the weight
loaders (:mod:`cxr_core.models.weights`) both import it, never each other in a circle.

Layer naming is part of the contract (training, saliency and model cards rely on it):

* the input is ``"image"``: float32 pixels in [0, 255], 1 or 3 channels;
* preprocessing layers start with ``"pre_"`` (gray to RGB, the family's ``preprocess_input``);
* head layers start with ``"head_"``; the first of them (``"head_pool"`` or ``"head_flatten"``)
  outputs the feature vector, and the last layer is the float32 ``"predictions"`` Dense;
* everything else is the backbone.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import keras

from cxr_core.core.errors import ModelError
from cxr_core.models.h5safe import check_h5, check_keras_archive

INPUT_NAME = "image"
PRE_PREFIX = "pre_"
HEAD_PREFIX = "head_"
PREDICTIONS = "predictions"


@keras.saving.register_keras_serializable(package="cxr_core")
class RgbToBgr(keras.layers.Layer):
    """Reverses the channel axis ("caffe" preprocessing expects BGR).

    A layer instead of a ``Lambda`` so that saved models load with ``safe_mode`` on.
    """

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="cxr_core")
class StandardizeIntensity(keras.layers.Layer):
    """Per-image intensity standardisation: ``128 + 48 * (x - mean) / std``, clipped to [0, 255].

    Each image (each channel) gets zero mean and unit spread, mapped back onto the pixel scale
    the family's preprocessing expects, so a film's overall exposure and contrast (which differ
    between sites and devices) no longer reach the network. 48 grey levels per standard
    deviation keep +-2.6 sd inside [0, 255]. A flat image maps to 128.
    """

    def call(self, inputs):
        mean = keras.ops.mean(inputs, axis=(1, 2), keepdims=True)
        std = keras.ops.std(inputs, axis=(1, 2), keepdims=True)
        out = 128.0 + 48.0 * (inputs - mean) / keras.ops.maximum(std, 1.0)
        return keras.ops.clip(out, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape


CUSTOM_OBJECTS: dict[str, type] = {"RgbToBgr": RgbToBgr,
                                   "StandardizeIntensity": StandardizeIntensity}


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


def load_model(path: str | os.PathLike[str], *, compile: bool = False) -> keras.Model:
    """Loads a saved ``.keras`` model (knows this module's custom layer): the one model loader.

    ``compile=True`` restores the optimizer and its state too (resuming a run's checkpoint);
    inference and weight transfer load without it.

    Raises:
        ModelError: The file is missing or is not a loadable Keras model.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Model file not found; expected a .keras file. Received: {p}")
    if p.suffix == ".keras" and not zipfile.is_zipfile(p):  # Keras says "File not found"
        raise ModelError(f"{p}: not a Keras model file (a .keras file is a zip archive saved "
                         f"by model.save; an .h5 or other file renamed .keras is not one)")
    if p.suffix == ".keras":  # its weights may not read other files nor declare too much
        check_keras_archive(p)
    elif p.suffix in (".h5", ".hdf5"):
        check_h5(p)
    try:
        return keras.models.load_model(p, compile=compile, custom_objects=CUSTOM_OBJECTS)
    except Exception as exc:  # Keras raises many types (ValueError, OSError, TypeError, ...)
        raise ModelError(f"Cannot load model {p}: {exc}") from exc
