"""Explaining a prediction: the one saliency entry point of Predict, Review and the CLI.

Pages and the CLI call this module, never :mod:`cxr_core.predict.saliency` directly: that module imports
Keras and TensorFlow at load, this one only when an explainer is made. The flow:

    model reference -(model_store.load_model_ref)-> LoadedModel -(make_explainer)-> explainer
    image -(saliency_map: resized as the model's input)-> (S, S) map in [0, 1]
    map + the picture shown (display_pixels) -(overlay_png)-> PNG bytes

Compute returns arrays; drawing and the shortcut warning are :mod:`cxr_core.predict.render`.
:func:`saliency_unavailable` says why a model reference cannot be explained without loading it.

An ensemble (:mod:`cxr_core.models.ensembles`) gets an :class:`EnsembleExplainer`: the class is the
ensemble's decision, each member explains it on its own view of the image, and the map is the
mean of the members' [0, 1] maps at the ensemble's size (not re-stretched: a region every
member points at reaches 1, one only some members point at stays lower). :func:`method_title`
labels it so. A hierarchical three-class model (:mod:`cxr_core.models.hierarchy`) gets a
:class:`StepExplainer`: NORMAL is explained by its pneumonia step (that model's NORMAL map),
BACTERIA and VIRUS by its subtype step (that model's map of the subtype), each on its own view.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cxr_core.core.errors import ModelError
from cxr_core.data import images as image_io
from cxr_core.data import sandbox
from cxr_core.models import ensembles, hierarchy
from cxr_core.models.refs import load_model_ref
from cxr_core.models.store import LoadedModel, decide, model_file, predict_probs
from cxr_core.predict.inference import DISPLAY_SIZE, ImageInput, Prediction, png_bytes
from cxr_core.predict.render import overlay, resize_maps
# cxr_core.predict.saliency.METHODS with display names (kept here so importing this module, and the
# pages, does not import keras before a model is needed).
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++",
                "scorecam": "Score-CAM (faster)", "smoothgrad": "SmoothGrad"}


# -- Explainers -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class EnsembleExplainer:
    """Explains an ensemble: the ensemble decides the class, each member's explainer maps it."""

    loaded: LoadedModel
    members: tuple[Any, ...]  # one SaliencyExplainer per member, in ``loaded.members`` order


@dataclass(frozen=True, eq=False)
class StepExplainer:
    """Explains the hierarchical reading: the step that decided a class maps it."""

    loaded: LoadedModel
    pneumonia: Any  # the pneumonia step's SaliencyExplainer
    subtype: Any  # the subtype step's SaliencyExplainer

    def step_for(self, class_index: int) -> tuple[Any, int, str]:
        """(the explainer, its class index, which step) for a three-class index."""
        if class_index == 0:
            return self.pneumonia, 0, "pneumonia step"
        return self.subtype, class_index - 1, "subtype step"


def make_explainer(loaded: LoadedModel) -> Any:
    """A :class:`cxr_core.predict.saliency.SaliencyExplainer` on the model's recorded saliency layer
    (an :class:`EnsembleExplainer` of one per member for an ensemble).

    Raises:
        ModelError: the model (or a member) has no convolutional feature map to explain.
    """
    from cxr_core.predict.saliency import SaliencyExplainer

    if loaded.is_hierarchical:
        return StepExplainer(loaded, *(make_explainer(m) for m in loaded.members))
    if loaded.members:
        return EnsembleExplainer(loaded, tuple(make_explainer(m) for m in loaded.members))
    if loaded.saliency_layer is None:
        raise ModelError(f"{loaded.ref}: the model has no convolutional layer to explain; "
                         "expected a saliency_layer in its model card")
    return SaliencyExplainer(loaded.model, loaded.saliency_layer)


def load_explainer(ref: str) -> Any:
    """An explainer for a model reference (loads keras: call it only when needed).

    Raises:
        ModelError: the model cannot be loaded or explained.
    """
    return make_explainer(load_model_ref(ref))


def saliency_unavailable(ref: str | None,
                         artifact_dirs: dict[str, str | None] | None = None) -> str | None:
    """Why saliency cannot be shown for ``ref`` (None when it can).

    Args:
        ref: the model reference shown with the image ("run:ID", "default", a path) or None.
        artifact_dirs: "run:ID" -> the run's artifact folder (where it keeps its model file).
    """
    if ref is None:
        return "no model output is shown for this image, so there is no model to explain"
    if ensembles.is_ensemble_ref(ref):
        return ensembles.unavailable(ref, artifact_dirs)
    if hierarchy.is_hierarchical_ref(ref):
        return hierarchy.unavailable(ref, artifact_dirs)
    if model_file(ref, (artifact_dirs or {}).get(ref)) is None:
        return f"{ref} has no model file (.keras) on disk"
    return None


# -- Maps -----------------------------------------------------------------------------------

def class_choices(labels: Sequence[str], prediction: Prediction) -> list[tuple[int, str]]:
    """(class index, text) pairs to explain: the predicted class first, then the others."""
    first = (prediction.class_index, f"{labels[prediction.class_index]} (predicted)")
    return [first] + [(i, c) for i, c in enumerate(labels) if i != prediction.class_index]


def saliency_map(explainer: Any, image: np.ndarray, method: str = "gradcam",
                 class_index: int | None = None, *, threshold: float | None = None,
                 fast: bool = False) -> np.ndarray:
    """An (S, S) float32 map in [0, 1] explaining one image, at the model's input size S
    (an ensemble: the mean of its members' maps at its largest member's size).

    Args:
        explainer: from :func:`make_explainer` or :func:`load_explainer` (cached by the caller).
        image: uint8 (H, W) or (H, W, C): the model-size pixels a prediction saw
            (:attr:`cxr_core.predict.inference.Prediction.pixels`, used as they are) or a film at any
            size (resized and converted as :func:`cxr_core.data.images.to_array` does for the model).
        method: one of :data:`cxr_core.predict.saliency.METHODS`.
        class_index: index into the model's labels (binary: 1 = positive class); None: the
            class the model predicts at ``threshold``.
        threshold: the binary operating point used when ``class_index`` is None (None: 0.5).
        fast: fewer SmoothGrad samples / Score-CAM channels (CLI batches, tests).

    Raises:
        ConfigError: unknown method or class index.
    """
    if isinstance(explainer, EnsembleExplainer):
        return _ensemble_map(explainer, image, method, class_index, threshold, fast)
    if isinstance(explainer, StepExplainer):
        if class_index is None:
            class_index = _decided(explainer.loaded, image, threshold)
        step, index, _ = explainer.step_for(int(class_index))
        return saliency_map(step, image, method, index, fast=fast)
    _, size, _, channels = explainer.model.input_shape
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]  # PIL takes a gray image as (H, W)
    # At the model's size and channels to_array returns the pixels unchanged.
    pixels = image_io.to_array(Image.fromarray(arr), int(size), int(channels))
    options = {"smooth_samples": 8, "scorecam_max_n": 16} if fast else {}
    return explainer.explain(pixels.astype(np.float32), method,
                             None if class_index is None else int(class_index),
                             threshold=0.5 if threshold is None else threshold, **options)[0]


def _ensemble_map(explainer: EnsembleExplainer, image: np.ndarray, method: str,
                  class_index: int | None, threshold: float | None, fast: bool) -> np.ndarray:
    """The mean of the members' maps of the ensemble's class (its decision when None)."""
    loaded = explainer.loaded
    if class_index is None:
        class_index = _decided(loaded, image, threshold)
    maps = [saliency_map(m, image, method, class_index, fast=fast) for m in explainer.members]
    size = loaded.image_size
    stacked = np.stack([resize_maps(m[None], size, size)[0] for m in maps])
    return np.clip(stacked.mean(axis=0), 0.0, 1.0).astype(np.float32)


def _decided(loaded: LoadedModel, image: np.ndarray, threshold: float | None) -> int:
    """The class a composite model decides on one image (at ``threshold`` when given)."""
    arr = np.asarray(image)
    pixels = image_io.to_array(Image.fromarray(arr[..., 0] if arr.ndim == 3
                                               and arr.shape[-1] == 1 else arr),
                               loaded.image_size, loaded.channels)
    at = loaded if threshold is None else _with(loaded, threshold)
    return loaded.labels.index(decide(at, predict_probs(loaded, pixels[None]))[0])


def _with(loaded: LoadedModel, threshold: float) -> LoadedModel:
    from dataclasses import replace

    return replace(loaded, threshold=float(threshold)) if loaded.is_binary \
        or loaded.is_hierarchical else loaded


def method_title(explainer: Any, method: str) -> str:
    """The method's display name; for an ensemble, says the map is its members' mean."""
    name = METHOD_NAMES.get(method, method)
    if isinstance(explainer, EnsembleExplainer):
        return f"mean of {len(explainer.members)} members' normalised {name} maps"
    if isinstance(explainer, StepExplainer):
        return f"{name} of the step that decided the class (pneumonia, then subtype)"
    return name


# -- Pictures -------------------------------------------------------------------------------

def display_pixels(item: ImageInput | Prediction, max_side: int = DISPLAY_SIZE) -> np.ndarray:
    """The image as uint8 (H, W) or (H, W, 3) at most ``max_side`` a side, aspect kept.

    A prediction of an upload already holds it (decoded in its child process); another
    upload is decoded in a child process (:func:`cxr_core.data.sandbox.load_upload`), a file on
    disk here.

    Raises:
        ImageLoadError: the file cannot be read.
    """
    if isinstance(item, Prediction):
        if item.display is not None and max_side == DISPLAY_SIZE:
            return item.display
        item = item.source
    if item.is_upload:
        return sandbox.load_upload(item.read(), item.name, display_side=max_side).display
    img = image_io.load_image(item.read(), name=item.name, draft=max_side)
    img.thumbnail((max_side, max_side))
    return np.asarray(img)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4,
                colormap: str = "jet") -> bytes:
    """PNG bytes of the heatmap blended over the image (the map is resized to the image)."""
    return png_bytes(overlay(image, heatmap, alpha=alpha, colormap=colormap))
