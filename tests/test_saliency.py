"""Tests for cxr_core.predict.saliency and saliency_render: tf-keras-vis maps (and the private
tf-keras-vis methods they rely on), the saliency layer rule, rendering and the shortcut check."""
from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tf_keras_vis

from cxr_core.predict import saliency
from cxr_core.core.errors import ConfigError, ModelError
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.utils import model_modifiers
from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
from tf_keras_vis.utils.scores import BinaryScore, CategoricalScore

from cxr_core.models.graph import saliency_layer_name as find_saliency_layer
from cxr_core.predict.saliency import METHODS, SaliencyExplainer, compute_saliency
from cxr_core.predict.render import (
    COLORMAPS,
    heat_density_outside,
    heat_outside_center,
    overlay,
    shortcut_warning,
)

FAST = {"smooth_samples": 3, "scorecam_max_n": 8}


# Tiny flat functional models (the package convention: [0, 255] input, head named "predictions")


def _head(x, units: int):
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    activation = "sigmoid" if units == 1 else "softmax"
    return keras.layers.Dense(units, activation=activation, name="predictions")(x)


def _cnn(units: int, size: int = 32, kernel_initializer: str = "glorot_uniform") -> keras.Model:
    # Entry block
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    # Conv + BatchNorm + ReLU blocks
    for i, filters in enumerate((8, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                kernel_initializer=kernel_initializer, name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
        if i == 1:
            x = keras.layers.MaxPooling2D(name="block1_pool")(x)
    return keras.Model(inputs, _head(x, units), name=f"cnn{units}")


def _mobilenet(units: int, size: int = 64) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, weights=None,
                                          alpha=0.35)
    return keras.Model(inputs, _head(base.output, units), name=f"mobilenet{units}")


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {"cnn_binary": _cnn(1), "cnn_3class": _cnn(3),
            "mobilenet_binary": _mobilenet(1), "mobilenet_3class": _mobilenet(3)}


@pytest.fixture(scope="module")
def explainers(models) -> dict[str, SaliencyExplainer]:
    return {name: SaliencyExplainer(model) for name, model in models.items()}


def _images(model: keras.Model, n: int = 2, seed: int = 0) -> np.ndarray:
    shape = (n, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


# Layer discovery


@pytest.mark.parametrize(("name", "layer"), [("cnn_binary", "block2_relu"),
                                             ("mobilenet_3class", "out_relu")])
def test_find_saliency_layer_is_last_4d_layer_before_pooling(models, name, layer):
    assert find_saliency_layer(models[name]) == layer


def test_find_saliency_layer_without_conv_raises():
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    with pytest.raises(ModelError, match="convolutional"):
        find_saliency_layer(keras.Model(inputs, outputs))


# Maps


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["cnn_binary", "cnn_3class", "mobilenet_binary",
                                  "mobilenet_3class"])
def test_maps_have_input_size_and_are_in_unit_range(models, explainers, name, method):
    images = _images(models[name])
    maps = explainers[name].explain(images, method, **FAST)
    assert maps.shape == images.shape[:3]
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0


@pytest.mark.parametrize(("name", "method"), [
    ("cnn_binary", "gradcam"), ("cnn_binary", "gradcam++"), ("cnn_binary", "scorecam"),
    ("cnn_3class", "gradcam"), ("cnn_3class", "gradcam++"), ("cnn_3class", "scorecam"),
    ("cnn_3class", "smoothgrad"),
])
def test_other_class_gives_a_different_map(models, explainers, name, method):
    explainer = explainers[name]
    image = _images(models[name], n=1)
    predicted = int(explainer.predicted_classes(image)[0])
    other = (predicted + 1) % explainer.num_classes
    own_map = explainer.explain(image, method, predicted, **FAST)
    other_map = explainer.explain(image, method, other, **FAST)
    assert np.abs(own_map - other_map).max() > 1e-3
    np.testing.assert_allclose(explainer.explain(image, method, None, **FAST), own_map)


def _bright_patch_model() -> keras.Model:
    """A hand-set binary model whose pneumonia logit is the mean area of bright pixels."""
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    conv = keras.layers.Conv2D(1, 3, padding="same", name="bright_conv")
    x = keras.layers.ReLU(name="bright_relu")(conv(x))
    dense = keras.layers.Dense(1, activation="sigmoid", name="predictions")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(x)))
    conv.set_weights([np.full((3, 3, 1, 1), 1 / 9, np.float32), np.array([-0.5], np.float32)])
    dense.set_weights([np.array([[10.0]], np.float32), np.array([-1.0], np.float32)])
    return model


@pytest.mark.parametrize("method", METHODS)
def test_maps_find_a_planted_corner_marker_and_warn(method):
    image = np.full((1, 32, 32, 1), 10.0, np.float32)
    image[0, 0:5, 0:5] = 255.0  # a bright "marker" in the top-left corner, outside the chest box
    heat = compute_saliency(_bright_patch_model(), image, method=method, class_index=1, **FAST)[0]
    assert heat[0:7, 0:7].sum() / heat.sum() > 0.8
    assert shortcut_warning(heat) is not None


def test_binary_prediction_uses_the_given_threshold(models, explainers):
    images = _images(models["cnn_binary"])
    explainer = explainers["cnn_binary"]
    np.testing.assert_array_equal(explainer.predicted_classes(images, threshold=0.0), [1, 1])
    np.testing.assert_array_equal(explainer.predicted_classes(images, threshold=1.01), [0, 0])
    np.testing.assert_allclose(explainer.explain(images, "gradcam", threshold=0.0),
                               explainer.explain(images, "gradcam", 1))


def test_smoothgrad_is_deterministic_for_a_seed(models, explainers):
    images = _images(models["cnn_3class"])
    explain = explainers["cnn_3class"].explain
    first = explain(images, "smoothgrad", seed=1, smooth_samples=4)
    np.testing.assert_array_equal(explain(images, "smoothgrad", seed=1, smooth_samples=4), first)
    assert not np.array_equal(explain(images, "smoothgrad", seed=2, smooth_samples=4), first)


def test_single_image_gives_one_map(models, explainers):
    image = _images(models["cnn_binary"], n=1)[0]
    assert explainers["cnn_binary"].explain(image, "gradcam").shape == (1, 32, 32)


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_feature_maps_give_zero_maps_not_nan(method):
    model = _cnn(3, size=16, kernel_initializer="zeros")
    maps = compute_saliency(model, _images(model), method=method, class_index=0, **FAST)
    np.testing.assert_array_equal(maps, np.zeros((2, 16, 16), np.float32))


def test_explainer_clones_once_and_keeps_the_model_intact(monkeypatch):
    clones = []
    real_clone = keras.models.clone_model
    monkeypatch.setattr(keras.models, "clone_model",
                        lambda model, *a, **k: clones.append(model) or real_clone(model, *a, **k))
    model = _cnn(1, size=16)
    images = _images(model)
    before = np.asarray(model(images))
    explainer = SaliencyExplainer(model)
    for method in ("gradcam", "gradcam", "gradcam++", "smoothgrad", "scorecam", "scorecam"):
        explainer.explain(images, method, **FAST)
    assert len(clones) == 1
    assert explainer._visualizer("gradcam") is explainer._visualizer("gradcam")
    assert model.get_layer("predictions").activation is keras.activations.sigmoid
    np.testing.assert_allclose(np.asarray(model(images)), before)


# Grad-CAM on the cached graph against plain tf-keras-vis


def _score(model: keras.Model, targets: list[int]):
    if model.outputs[0].shape[-1] == 1:
        return BinaryScore([bool(t) for t in targets])
    return CategoricalScore(targets)


@pytest.mark.parametrize(("name", "targets"), [
    ("cnn_binary", [1, 1]), ("cnn_binary", [0, 1]), ("cnn_3class", [2, 0]),
    ("mobilenet_binary", [0, 0]), ("mobilenet_3class", [1, 2]),
])
def test_cached_gradcam_matches_plain_tf_keras_vis(models, explainers, name, targets):
    model, explainer = models[name], explainers[name]
    images, score = _images(model), _score(model, targets)
    options = {"penultimate_layer": explainer.layer, "seek_penultimate_conv_layer": False}
    plain = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    cached = explainer._visualizer("gradcam")
    for normalize_cam in (False, True):
        expected = plain(score, images, normalize_cam=normalize_cam, **options)
        got = cached(score, images, normalize_cam=normalize_cam, **options)
        scale = max(1.0, float(np.abs(expected).max()))  # raw CAMs are not in [0, 1]
        assert np.abs(got - expected).max() / scale < 1e-4
    index = targets[0] if len(set(targets)) == 1 else None
    if index is not None:  # explain() is the library map, min-max normalized
        expected = plain(score, images, normalize_cam=False, **options)
        maps = explainer.explain(images, "gradcam", index)
        np.testing.assert_allclose(maps, saliency._normalize_maps(expected), atol=1e-4)


def test_cached_gradcam_builds_the_feature_model_once_and_traces_once(monkeypatch):
    calls = []
    real_call = model_modifiers.ExtractIntermediateLayerForGradcam.__call__
    monkeypatch.setattr(model_modifiers.ExtractIntermediateLayerForGradcam, "__call__",
                        lambda self, model: calls.append(model) or real_call(self, model))
    model = _cnn(3, size=16)
    explainer = SaliencyExplainer(model)
    for n, class_index in ((1, 0), (2, 1), (3, None), (1, 2)):
        maps = explainer.explain(_images(model, n=n), "gradcam", class_index)
        assert maps.shape == (n, 16, 16)
    assert len(calls) == 1
    assert explainer._visualizer("gradcam")._step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("options", [
    {"seek_penultimate_conv_layer": True},          # another layer: the library's own path
    {"score": lambda output: output[:, 1] ** 2},    # a non-linear score: likewise
])
def test_cached_gradcam_falls_back_to_the_library(models, explainers, options):
    model, explainer = models["cnn_3class"], explainers["cnn_3class"]
    images = _images(model)
    options = {"score": CategoricalScore([1, 1]), "seek_penultimate_conv_layer": False,
               "penultimate_layer": explainer.layer, "normalize_cam": False, **options}
    score = options.pop("score")
    expected = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)(score, images,
                                                                            **options)
    got = explainer._visualizer("gradcam")(score, images, **options)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# The tf-keras-vis API _CachedGradcam overrides or calls. Its private methods can change in any
# release without a deprecation, so an upgrade must fail here, loudly, before maps go wrong.

# (owner, attribute, parameter names in the order _CachedGradcam passes them)
TF_KERAS_VIS_CALLS = [
    (Gradcam, "__init__", ("self", "model", "model_modifier", "clone")),
    (Gradcam, "_get_scores_for_multiple_outputs", ("self", "score")),
    (Gradcam, "_get_seed_inputs_for_multiple_inputs", ("self", "seed_input")),
    (Gradcam, "_calculate_scores", ("self", "outputs", "score_functions")),
    (Gradcam, "_calculate_cam",
     ("self", "grads", "penultimate_output", "gradient_modifier", "activation_modifier")),
    (model_modifiers.ExtractIntermediateLayerForGradcam, "__init__",
     ("self", "penultimate_layer", "seek_conv_layer", "include_model_outputs")),
]


def _changed(what: str, expected: object, received: object) -> str:
    return (f"tf-keras-vis {tf_keras_vis.__version__}: {what} changed, and "
            f"cxr_core.predict.saliency._CachedGradcam relies on it. Expected: {expected}. "
            f"Received: {received}. Update _CachedGradcam for this tf-keras-vis (its Grad-CAM "
            "fallback is the plain library call) or pin the version it was written for "
            "(tf-keras-vis==0.8.7, requirements.txt).")


@pytest.mark.parametrize(("owner", "name", "expected"), TF_KERAS_VIS_CALLS,
                         ids=[f"{o.__name__}.{n}" for o, n, _ in TF_KERAS_VIS_CALLS])
def test_tf_keras_vis_still_has_the_private_methods_we_call(owner, name, expected):
    what = f"{owner.__module__}.{owner.__qualname__}.{name}"
    method = getattr(owner, name, None)
    if not callable(method):
        pytest.fail(_changed(what, f"a method {name}{expected}", "no such method"))
    received = tuple(inspect.signature(method).parameters)
    if received != expected:
        pytest.fail(_changed(f"the signature of {what}", expected, received))


def test_cached_gradcam_call_keeps_the_signature_of_gradcam_call():
    def params(function) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind.name, p.default)
                for p in inspect.signature(function).parameters.values()]

    parent, ours = params(Gradcam.__call__), params(saliency._CachedGradcam.__call__)
    if parent != ours:
        pytest.fail(_changed("the signature of tf_keras_vis.gradcam.Gradcam.__call__ (which "
                             "_CachedGradcam.__call__ overrides)", ours, parent))


def test_compute_saliency_matches_the_explainer(models, explainers):
    images = _images(models["cnn_3class"])
    np.testing.assert_allclose(
        compute_saliency(models["cnn_3class"], images, method="gradcam", class_index=2),
        explainers["cnn_3class"].explain(images, "gradcam", 2), atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "lime"}, "method='lime'"),
    ({"method": "gradcam", "class_index": 2}, "class_index=2"),
    ({"method": "gradcam", "class_index": -1}, "class_index=-1"),
    ({"method": "gradcam", "class_index": 0.5}, "class_index=0.5"),
    ({"method": "gradcam", "layer": "nope"}, "layer='nope'"),
    ({"method": "gradcam", "layer": "avg_pool"}, "layer='avg_pool'"),
    ({"method": "smoothgrad", "smooth_samples": 0}, "smooth_samples=0"),
    ({"method": "scorecam", "scorecam_max_n": -1}, "scorecam_max_n=-1"),
])
def test_bad_arguments_raise_config_error(models, kwargs, match):
    images = _images(models["cnn_binary"])
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        compute_saliency(models["cnn_binary"], images, **kwargs)


def test_wrong_image_shape_raises_config_error(explainers):
    with pytest.raises(ConfigError, match=r"Received: images.shape=\(2, 32, 32, 3\)"):
        explainers["cnn_binary"].explain(np.zeros((2, 32, 32, 3), np.float32), "gradcam")


# Rendering


@pytest.mark.parametrize("shape", [(24, 20), (24, 20, 1), (24, 20, 3)])
@pytest.mark.parametrize("colormap", COLORMAPS)
def test_overlay_is_uint8_rgb_of_the_image_size(shape, colormap):
    image = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    heat = np.random.default_rng(1).random((6, 5)).astype(np.float32)
    out = overlay(image, heat, colormap=colormap)
    assert out.shape == (24, 20, 3) and out.dtype == np.uint8


def test_overlay_alpha_zero_returns_the_image_and_alpha_one_the_colormap():
    image = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
    heat = np.zeros((8, 8), np.float32)
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), np.stack([image] * 3, -1))
    assert tuple(overlay(image, heat, alpha=1.0)[0, 0]) == (0, 0, 128)  # jet at 0: dark blue
    assert tuple(overlay(image, heat + 1.0, alpha=1.0)[0, 0]) == (128, 0, 0)  # jet at 1: dark red
    assert tuple(overlay(image, heat + 1.0, alpha=1.0, colormap="inferno")[0, 0]) == (
        252, 255, 164)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": 1.5}, "alpha=1.5"), ({"colormap": "viridis"}, "colormap='viridis'")])
def test_overlay_bad_arguments_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        overlay(np.zeros((4, 4)), np.zeros((4, 4)), **kwargs)


# Shortcut checks


def _map_with_block(rows: slice, cols: slice, size: int = 100) -> np.ndarray:
    heat = np.zeros((size, size), np.float32)
    heat[rows, cols] = 1.0
    return heat


@pytest.mark.parametrize(("heat", "expected"), [
    (_map_with_block(slice(0, 10), slice(0, 10)), 1.0),       # a corner marker
    (_map_with_block(slice(40, 60), slice(40, 60)), 0.0),     # the centre of the chest
    (np.ones((100, 100), np.float32), 1.0 - 0.75 ** 2),       # uniform
    (np.zeros((100, 100), np.float32), 0.0),                  # no heat at all
])
def test_heat_outside_center(heat, expected):
    assert heat_outside_center(heat) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("heat", "expected"), [
    (_map_with_block(slice(0, 10), slice(0, 10)), 1.0),       # a corner marker
    (_map_with_block(slice(40, 60), slice(40, 60)), 0.0),     # the centre of the chest
    (np.ones((100, 100), np.float32), 0.5),                   # uniform: equal density
    (np.zeros((100, 100), np.float32), 0.0),                  # no heat at all
])
def test_heat_density_outside(heat, expected):
    assert heat_density_outside(heat) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.75, 0.9])
def test_uniform_and_noisy_uniform_maps_never_warn(fraction):
    noisy = np.random.default_rng(0).uniform(0.4, 0.6, (100, 100))
    for heat in (np.ones((100, 100)), noisy):
        assert heat_density_outside(heat, center_fraction=fraction) == pytest.approx(0.5, abs=0.02)
        assert shortcut_warning(heat, center_fraction=fraction) is None
    assert heat_density_outside(np.ones((10, 10)), center_fraction=1.0) == 0.0  # no outside


def test_shortcut_warning_names_the_fraction_outside():
    message = shortcut_warning(_map_with_block(slice(90, 100), slice(0, 100)))
    assert message is not None
    assert message.startswith("100% of the saliency lies outside the central 75%")
    assert "with none inside" in message and "warning above 2.3x" in message
    assert "markers" in message
    assert shortcut_warning(_map_with_block(slice(30, 70), slice(30, 70))) is None


def test_shortcut_warning_threshold_is_on_density():
    # A border ring 2x as dense as the centre: noticeable but below the default 2.3x.
    heat = np.full((100, 100), 2.0)
    heat[12:87, 12:87] = 1.0
    assert heat_density_outside(heat) == pytest.approx(2 / 3, abs=1e-6)
    assert shortcut_warning(heat) is None
    message = shortcut_warning(heat, threshold=0.6)
    assert message is not None and "2.0x as dense as inside" in message


@pytest.mark.parametrize(("call", "match"), [
    (lambda: heat_outside_center(np.ones((4, 4)), center_fraction=0.0), "center_fraction=0.0"),
    (lambda: heat_outside_center(np.ones((2, 4, 4))), r"heatmap.shape=\(2, 4, 4\)"),
    (lambda: shortcut_warning(np.ones((4, 4)), threshold=2), "threshold=2"),
])
def test_shortcut_checks_bad_arguments_raise(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_module_does_not_import_streamlit():
    assert "streamlit" not in saliency.__dict__
    assert "import streamlit" not in open(saliency.__file__).read()


# The model registry (cxr_core.models.graph), when present: its recorded layer is the one found here


@pytest.mark.parametrize(("name", "size", "channels"), [
    ("small3_50", 16, 1), ("custom5_224", 32, 1), ("mobilenetv2", 32, 3)])
def test_registry_models_agree_on_the_saliency_layer(name, size, channels):
    models_module = pytest.importorskip("cxr_core.models.graph")
    if not hasattr(models_module, "MODELS") or name not in models_module.MODELS:
        pytest.skip(f"registry has no {name!r}")
    cfg = models_module.ModelConfig(name=name, image_size=size, channels=channels)
    model = models_module.build_model(cfg, num_classes=2)
    assert find_saliency_layer(model) == models_module.MODELS[name].saliency_layer
    maps = compute_saliency(model, _images(model), method="gradcam")
    assert maps.shape == (2, size, size) and np.isfinite(maps).all()
