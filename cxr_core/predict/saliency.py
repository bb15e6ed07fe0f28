"""Saliency maps for Keras classifiers, computed with tf-keras-vis.

Computation returns data: ``(N, H, W)`` float32 maps in [0, 1], one per input image, at the
input's size. Rendering is separate (:mod:`cxr_core.predict.render`: the overlay and the
shortcut warning), and so is the entry point the pages and the CLI call
(:mod:`cxr_core.predict.explain`: an explainer per loaded model, one map per image).

Models follow the package convention: a flat functional graph, one float32 image input in
[0, 255] (preprocessing inside the model), and one output layer ``predictions`` that is either
a 1-unit sigmoid (binary, class 1 = PNEUMONIA) or an n-unit softmax.

:class:`SaliencyExplainer` holds one linear-output clone of the model and the tf-keras-vis
visualizers built on it, so repeated calls on a warm model do not clone again; the UI side keeps
one per model with ``st.cache_resource``. Its Grad-CAM also keeps the penultimate-output model
and a traced gradient step (:class:`_CachedGradcam`): the first call traces, later ones are
about 6x faster than tf-keras-vis's own eager call. :func:`compute_saliency` is the one-shot form.
"""
from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy.ndimage import zoom
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
from tf_keras_vis.saliency import Saliency
from tf_keras_vis.scorecam import Scorecam
from tf_keras_vis.utils import is_mixed_precision, normalize, zoom_factor
from tf_keras_vis.utils.model_modifiers import ExtractIntermediateLayerForGradcam, ReplaceToLinear
from tf_keras_vis.utils.scores import BinaryScore, CategoricalScore

from cxr_core.core.errors import ConfigError, ModelError
from cxr_core.models import graph
from cxr_core.predict.render import resize_maps

METHODS = ("gradcam", "gradcam++", "scorecam", "smoothgrad")
_SMOOTH_BATCH = 32  # images per SmoothGrad gradient pass: bounds memory at 224 px
# tf-keras-vis Gradcam's own default CAM activation (ReLU), taken from its signature so the
# cached Grad-CAM below cannot drift from it.
_GRADCAM_ACTIVATION = inspect.signature(Gradcam.__call__).parameters["activation_modifier"].default


# Layers


def _layer_rank(layer: keras.layers.Layer) -> int | None:
    """Rank of a layer's (single) output tensor, or None when it has no single output."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # shared layers or layers never called
        return None


# Validation


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"Expected method to be one of {METHODS}. Received: method={method!r}")


def _check_options(smooth_samples: int, smooth_noise: float, scorecam_max_n: int | None) -> None:
    if int(smooth_samples) < 1:
        raise ConfigError(
            f"Expected smooth_samples >= 1. Received: smooth_samples={smooth_samples}"
        )
    if not 0.0 <= float(smooth_noise) <= 1.0:
        raise ConfigError(f"Expected smooth_noise in [0, 1]. Received: smooth_noise={smooth_noise}")
    if scorecam_max_n is not None and int(scorecam_max_n) < 0:
        raise ConfigError(
            "Expected scorecam_max_n >= 0 (0 or None = full Score-CAM). "
            f"Received: scorecam_max_n={scorecam_max_n}"
        )


def _check_model(model: keras.Model) -> int:
    """Check the single image input / single class output convention; return the unit count."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        shapes = [tuple(t.shape) for t in model.inputs]
        raise ModelError(f"Expected one (H, W, C) image input. Received: inputs={shapes}")
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        shapes = [tuple(t.shape) for t in model.outputs]
        raise ModelError(f"Expected one (classes,) output. Received: outputs={shapes}")
    return int(model.outputs[0].shape[-1])


def _as_batch(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Return images as a float32 (N, H, W, C) batch matching the model input."""
    expected = tuple(model.inputs[0].shape[1:])
    batch = np.asarray(images, dtype=np.float32)
    if batch.ndim == len(expected):
        batch = batch[None]
    fits = batch.ndim == 4 and all(e is None or e == r for e, r in zip(expected, batch.shape[1:]))
    if not fits or batch.shape[0] == 0:
        raise ConfigError(
            f"Expected images of shape (N, {', '.join(map(str, expected))}) or a single image. "
            f"Received: images.shape={np.shape(images)}"
        )
    return batch


# Map post-processing


def _normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max normalize each map to [0, 1]; flat, all-zero or non-finite maps become zeros."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    flat = span <= 1e-12
    out = np.where(flat, 0.0, (maps - low) / np.where(flat, 1.0, span))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# Grad-CAM with a cached graph


class _CachedGradcam(Gradcam):
    """tf-keras-vis Grad-CAM for one fixed layer, its gradient step built and traced once.

    Why a subclass: tf-keras-vis 0.8.7 ``Gradcam.__call__`` rebuilds the penultimate-output model
    (``ExtractIntermediateLayerForGradcam(...)(self.model)``, a new ``keras.Model``) on every
    call and runs the forward and backward passes eagerly: about 50 ms for one 128 px film of the
    shipped model on CPU, against about 8 ms for the same step as a ``tf.function``. Here the
    library's own modifier builds that model once and the tape step is a ``tf.function`` fixed on
    ``(None, H, W, C)``; the CAM is still the library's (``_calculate_cam``, ``zoom_factor``,
    ``normalize``), so maps match plain ``Gradcam`` up to float rounding.

    The step is traced once whatever the targets: the score's gradient with respect to the
    model output, taken on a zero output, is the upstream gradient of the backward pass. That is
    exact for scores linear in the output (``BinaryScore``, ``CategoricalScore``). Any other
    score, layer or option falls back to the library's ``__call__``.

    It overrides ``Gradcam.__call__`` and calls the library's private ``_calculate_cam``,
    ``_calculate_scores``, ``_get_scores_for_multiple_outputs`` and
    ``_get_seed_inputs_for_multiple_inputs``: ``tests/test_saliency.py`` fails, naming the
    tf-keras-vis version and the method, when an upgrade changes any of their signatures.

    Args:
        model: A single-input, single-output model (already linear-output where wanted).
        penultimate_layer: Name of the layer whose feature maps are explained.
    """

    def __init__(self, model: keras.Model, penultimate_layer: str) -> None:
        super().__init__(model, clone=False)
        self.penultimate_layer = penultimate_layer
        self._extracted = ExtractIntermediateLayerForGradcam(
            penultimate_layer, seek_conv_layer=False
        )(self.model)
        self._mixed = is_mixed_precision(self._extracted)
        seed, output = self.model.inputs[0], self.model.outputs[0]
        self._step = tf.function(self._gradient_step, input_signature=[
            tf.TensorSpec((None, *seed.shape[1:]), seed.dtype),
            tf.TensorSpec((None, *output.shape[1:]), output.dtype),
        ])

    def _gradient_step(self, seed: tf.Tensor, upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(d score / d feature maps, feature maps), as in ``Gradcam.__call__``'s tape."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(seed)
            output, penultimate = self._extracted([seed], training=False)
        grads = tape.gradient(output, penultimate, output_gradients=upstream)
        if self._mixed:
            dtype = self._extracted.variable_dtype
            grads, penultimate = tf.cast(grads, dtype), tf.cast(penultimate, dtype)
        return grads, penultimate

    def _upstream(self, scores: list, batch_size: int) -> tf.Tensor:
        """d score / d model output, through the library's own score reduction."""
        output = self.model.outputs[0]
        zeros = tf.zeros((batch_size, *output.shape[1:]), output.dtype)
        with tf.GradientTape() as tape:
            tape.watch(zeros)
            values = self._calculate_scores([zeros], scores)
        return tape.gradient(values, zeros, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def __call__(
        self,
        score,
        seed_input,
        penultimate_layer=None,
        seek_penultimate_conv_layer=True,
        gradient_modifier=None,
        activation_modifier=_GRADCAM_ACTIVATION,
        training=False,
        expand_cam=True,
        normalize_cam=True,
        unconnected_gradients=tf.UnconnectedGradients.NONE,
    ) -> np.ndarray | list:
        """Grad-CAM as ``Gradcam.__call__`` (same arguments and result), on the cached step."""
        scores = self._get_scores_for_multiple_outputs(score)
        cached = (
            penultimate_layer == self.penultimate_layer
            and not seek_penultimate_conv_layer
            and not training
            and unconnected_gradients == tf.UnconnectedGradients.NONE
            and all(isinstance(s, (BinaryScore, CategoricalScore)) for s in scores)
        )
        if not cached:
            return super().__call__(
                score, seed_input, penultimate_layer, seek_penultimate_conv_layer,
                gradient_modifier, activation_modifier, training, expand_cam, normalize_cam,
                unconnected_gradients,
            )
        seeds = self._get_seed_inputs_for_multiple_inputs(seed_input)
        seed = tf.cast(seeds[0], self._step.input_signature[0].dtype)
        grads, penultimate = self._step(seed, self._upstream(scores, int(seed.shape[0])))
        cam = self._calculate_cam(grads, penultimate, gradient_modifier, activation_modifier)
        if not expand_cam:
            return normalize(cam) if normalize_cam else cam
        cam = [zoom(cam, zoom_factor(cam.shape, x.shape), order=1) for x in seeds]
        if normalize_cam:
            cam = [normalize(x) for x in cam]
        return cam[0] if not isinstance(seed_input, list) else cam


# Explainer


class SaliencyExplainer:
    """Saliency maps for one model, reusing its linear clone and visualizers between calls.

    The model is cloned once (on first use) and the clone's output activation replaced by a
    linear one (tf-keras-vis ``ReplaceToLinear``): gradients of logits rather than of saturated
    probabilities. The caller's model is never modified.

    Args:
        model: A flat functional classifier following the package convention.
        layer: Name of the layer CAM methods explain; None = the package's one rule,
            :func:`cxr_core.models.graph.saliency_layer_name`.

    Raises:
        ModelError: When the model does not follow the convention.
        ConfigError: When ``layer`` is not a 4-D layer of the model.
    """

    def __init__(self, model: keras.Model, layer: str | None = None) -> None:
        self.model = model
        self.num_units = _check_model(model)
        self.layer = layer if layer is not None else graph.saliency_layer_name(model)
        self._check_layer()
        self._linear: keras.Model | None = None
        self._visualizers: dict[str, Any] = {}
        self._lock = threading.Lock()  # the UI may share one explainer between sessions

    @property
    def binary(self) -> bool:
        """Whether the model has a single sigmoid unit (class 1 = PNEUMONIA)."""
        return self.num_units == 1

    @property
    def num_classes(self) -> int:
        """Number of classes: 2 for a binary model."""
        return 2 if self.binary else self.num_units

    def _check_layer(self) -> None:
        names = [layer.name for layer in self.model.layers]
        if self.layer not in names or _layer_rank(self.model.get_layer(self.layer)) != 4:
            raise ConfigError(
                "Expected layer to name a layer of the model with a 4-D output. "
                f"Received: layer={self.layer!r}"
            )

    def predicted_classes(self, images: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
        """Predicted class index per image (binary: 1 when p(pneumonia) >= threshold).

        Args:
            images: (N, H, W, C) or (H, W, C) float images in [0, 255].
            threshold: Operating point of a binary model; pass the run's stored threshold.

        Returns:
            (N,) int array of class indices.
        """
        batch = _as_batch(self.model, images)
        # predict_on_batch reuses the model's traced predict function (an eager call is ~3x slower).
        probs = np.asarray(self.model.predict_on_batch(batch))
        if self.binary:
            return (probs[:, 0] >= threshold).astype(int)
        return probs.argmax(axis=-1).astype(int)

    def _targets(self, batch: np.ndarray, class_index: int | None, threshold: float) -> list[int]:
        if class_index is None:
            return self.predicted_classes(batch, threshold=threshold).tolist()
        integral = isinstance(class_index, (int, np.integer)) and not isinstance(class_index, bool)
        if not integral or not 0 <= class_index < self.num_classes:
            raise ConfigError(
                f"Expected class_index in [0, {self.num_classes - 1}] or None. "
                f"Received: class_index={class_index!r}"
            )
        return [int(class_index)] * len(batch)

    def _score(self, targets: list[int], method: str) -> BinaryScore | CategoricalScore:
        # Score-CAM always sees a categorical output (see _scorecam_model).
        if self.binary and method != "scorecam":
            return BinaryScore([bool(t) for t in targets])  # False = 1 - p, via -logit
        return CategoricalScore(targets)

    def _linear_model(self) -> keras.Model:
        if self._linear is None:
            clone = keras.models.clone_model(self.model)
            clone.set_weights(self.model.get_weights())
            ReplaceToLinear()(clone)
            self._linear = clone
        return self._linear

    def _list_input_model(self) -> keras.Model:
        """The linear clone re-wrapped to take a list of one input.

        tf-keras-vis calls models with a list of inputs; a Keras 3 model built on a single
        input tensor then warns that the input structure does not match.
        """
        linear = self._linear_model()
        return keras.Model(linear.inputs, linear.outputs, name=f"{self.model.name}_linear")

    def _scorecam_model(self) -> keras.Model:
        """The linear clone with an output Score-CAM can use.

        tf-keras-vis Score-CAM applies softmax to the model output before scoring. On a 1-unit
        output that softmax is always 1, so every channel gets the same weight
        (tf-keras-vis#78, #103). Outputting logits [0, z] makes that softmax [1 - p, p];
        for softmax models the linear logits make it the class probabilities.
        """
        linear = self._linear_model()
        logits = linear.outputs[0]
        if self.binary:
            logits = keras.ops.concatenate([keras.ops.zeros_like(logits), logits], axis=-1)
        model = keras.Model(linear.inputs, logits, name=f"{self.model.name}_scorecam")
        # Score-CAM calls model.predict on every masked batch; keep the console quiet.
        model.predict = functools.partial(model.predict, verbose=0)
        return model

    def _visualizer(self, method: str) -> Any:
        with self._lock:
            if method not in self._visualizers:
                # The clone is made here once, so the visualizers do not clone again.
                if method == "scorecam":
                    made = Scorecam(self._scorecam_model(), clone=False)
                elif method == "gradcam":
                    made = _CachedGradcam(self._list_input_model(), self.layer)
                else:
                    kind = {"gradcam++": GradcamPlusPlus, "smoothgrad": Saliency}[method]
                    made = kind(self._list_input_model(), clone=False)
                self._visualizers[method] = made
            return self._visualizers[method]

    def explain(
        self,
        images: np.ndarray,
        method: str,
        class_index: int | None = None,
        *,
        threshold: float = 0.5,
        smooth_samples: int = 20,
        smooth_noise: float = 0.2,
        scorecam_max_n: int | None = 32,
        seed: int = 0,
    ) -> np.ndarray:
        """Compute one saliency map per image.

        Args:
            images: (N, H, W, C) or (H, W, C) float images in [0, 255], matching the model input.
            method: One of :data:`METHODS`.
            class_index: Class to explain; None = each image's predicted class. For a binary
                model 1 = PNEUMONIA (score p) and 0 = NORMAL (score 1 - p).
            threshold: Binary operating point used when ``class_index`` is None.
            smooth_samples: Noisy copies averaged by SmoothGrad.
            smooth_noise: SmoothGrad noise sigma as a fraction of each image's value range.
            scorecam_max_n: Faster Score-CAM: keep the N feature maps of highest variance;
                None or 0 = full Score-CAM (one forward pass per channel: slow).
            seed: Seed of the SmoothGrad noise.

        Returns:
            (N, H, W) float32 maps in [0, 1]; a map with no signal is all zeros.

        Raises:
            ConfigError: On an unknown method, a bad class index, option or image shape.
        """
        _check_method(method)
        _check_options(smooth_samples, smooth_noise, scorecam_max_n)
        batch = _as_batch(self.model, images)
        targets = self._targets(batch, class_index, threshold)
        if method == "smoothgrad":
            raw = self._smoothgrad(batch, targets, int(smooth_samples), float(smooth_noise), seed)
        elif method == "scorecam":
            raw = self._scorecam(batch, self._score(targets, method), scorecam_max_n)
        else:
            raw = self._visualizer(method)(
                self._score(targets, method), batch, penultimate_layer=self.layer,
                seek_penultimate_conv_layer=False, normalize_cam=False,
            )
        raw = resize_maps(np.asarray(raw, dtype=np.float32), *batch.shape[1:3])
        return _normalize_maps(raw)

    def _scorecam(self, batch: np.ndarray, score: CategoricalScore, max_n: int | None) -> Any:
        visualizer = self._visualizer("scorecam")
        channels = int(self.model.get_layer(self.layer).output.shape[-1])
        max_n = None if not max_n else min(int(max_n), channels)
        return visualizer(
            score, batch, penultimate_layer=self.layer, seek_penultimate_conv_layer=False,
            max_N=max_n, normalize_cam=False,
        )

    def _smoothgrad(
        self, batch: np.ndarray, targets: list[int], samples: int, noise: float, seed: int
    ) -> np.ndarray:
        """SmoothGrad with a private seeded generator and batched noisy copies.

        tf-keras-vis's own ``smooth_samples`` draws its noise from the global ``np.random``
        (seeding it would mutate process-wide state shared by Streamlit sessions) and runs one
        pass per copy. So the noise is drawn here with the same recipe (sigma = noise * each
        image's value range; mean |gradient|; max over channels) and tf-keras-vis computes the
        plain gradients of up to ``_SMOOTH_BATCH`` noisy images per pass (about 3x faster on CPU).
        """
        visualizer = self._visualizer("smoothgrad")
        rng = np.random.default_rng(seed)
        axes = tuple(range(1, batch.ndim))
        sigma = noise * (batch.max(axis=axes, keepdims=True) - batch.min(axis=axes, keepdims=True))
        per_pass = max(1, _SMOOTH_BATCH // len(batch))  # noisy copies of the batch per pass
        total, done = np.zeros_like(batch), 0
        while done < samples:
            copies = min(per_pass, samples - done)
            noisy = batch + rng.standard_normal((copies, *batch.shape)) * sigma  # copy-major
            grads = visualizer(
                self._score(targets * copies, "smoothgrad"),
                noisy.reshape(-1, *batch.shape[1:]).astype(np.float32),
                keepdims=True, normalize_map=False,
            )
            total += np.asarray(grads).reshape(copies, *batch.shape).sum(axis=0)
            done += copies
        return (total / samples).max(axis=-1)


def compute_saliency(
    model: keras.Model,
    images: np.ndarray,
    *,
    method: str,
    class_index: int | None = None,
    layer: str | None = None,
    threshold: float = 0.5,
    smooth_samples: int = 20,
    smooth_noise: float = 0.2,
    scorecam_max_n: int | None = 32,
    seed: int = 0,
) -> np.ndarray:
    """One-shot saliency maps; clones the model each call (keep a SaliencyExplainer to reuse).

    Args:
        model: A flat functional classifier following the package convention.
        images: (N, H, W, C) or (H, W, C) float images in [0, 255].
        method: One of :data:`METHODS`.
        class_index: Class to explain; None = predicted class (binary: 1 = PNEUMONIA, 0 = NORMAL).
        layer: Layer CAM methods explain; None = :func:`cxr_core.models.graph.saliency_layer_name`.
        threshold: Binary operating point used when ``class_index`` is None.
        smooth_samples: Noisy copies averaged by SmoothGrad.
        smooth_noise: SmoothGrad noise sigma as a fraction of each image's value range.
        scorecam_max_n: Faster Score-CAM channel count; None or 0 = full Score-CAM.
        seed: Seed of the SmoothGrad noise.

    Returns:
        (N, H, W) float32 maps in [0, 1].

    Raises:
        ConfigError: On an unknown method, a bad class index, layer, option or image shape.
        ModelError: When the model does not follow the convention.
    """
    _check_method(method)  # fail before the model is analysed
    return SaliencyExplainer(model, layer=layer).explain(
        images, method, class_index, threshold=threshold, smooth_samples=smooth_samples,
        smooth_noise=smooth_noise, scorecam_max_n=scorecam_max_n, seed=seed,
    )
