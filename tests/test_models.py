"""Tests for cxr_core.models.graph: registry, flat graphs, heads, preprocessing, weights, saliency.

Weight files are generated here in the layouts Keras writes (nothing is downloaded); training
steps run eagerly because tracing big graphs costs far more than one step on tiny input.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
from tf_keras_vis.utils.scores import BinaryScore, CategoricalScore

from cxr_core.models import specs
from cxr_core.models import weights as W
from cxr_core.models import graph as M
from cxr_core.models import layers
from cxr_core.core.errors import ConfigError, ModelError

SMALL = ["cxrnet_224", "cxrnet_28", "custom5_224", "small3_50", "small4_50", "small3_128", "cnn1", "vgg_sep"]
FAST_APPS = ["mobilenet", "mobilenetv2", "vgg16", "densenet121", "efficientnetb0"]
SLOW_APPS = ["resnet50", "resnet50v2", "resnet152v2", "inceptionv3"]


def _tiny(name: str) -> int:
    return max(specs.MODELS[name].min_size, 32)


def _cfg(name: str, **kw) -> specs.ModelConfig:
    kw.setdefault("image_size", _tiny(name))
    kw.setdefault("channels", 1)
    return specs.ModelConfig(name=name, **kw)


def _images(size: int, channels: int = 1, n: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, size, size, channels)).astype("float32")


def _run(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Inference without ``predict``: tracing a predict function costs seconds per big graph."""
    return np.asarray(model(x, training=False))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _write_keras2_h5(model: keras.Model, path: Path, rename=lambda n: n) -> None:
    """Writes weights in the legacy (Keras 2 ``save_weights``) layout: keras.applications files,
    CheXNet. Every layer is listed, weightless ones with empty ``weight_names``."""
    with h5py.File(path, "w") as f:
        names = [rename(layer.name) for layer in model.layers]
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer, name in zip(model.layers, names):
            g = f.create_group(name)
            weight_names = [f"{name}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = [w.encode() for w in weight_names]
            for w_name, value in zip(weight_names, layer.get_weights()):
                g.create_dataset(w_name, data=value)


def _randomize(model: keras.Model, seed: int = 1) -> None:
    """Non-default values everywhere (BatchNorm stats too), so loads are visible."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            values = [np.asarray(w) for w in layer.weights]
            layer.set_weights([rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
                               if np.issubdtype(v.dtype, np.floating) else v for v in values])
            if hasattr(layer, "finalize_state"):
                layer.finalize_state()


def _offline(monkeypatch) -> list[str]:
    """Makes every download fail like a machine without network; returns the attempted URLs."""
    attempts: list[str] = []

    def fail(fname, origin=None, **kwargs):
        attempts.append(origin)
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name not known")

    monkeypatch.setattr(keras.utils, "get_file", fail)
    return attempts


@pytest.fixture()
def keras_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


# ----------------------------------------------------------------------------------------------
# Registry: every model builds flat, trains a step, has its saliency layer
# ----------------------------------------------------------------------------------------------


def _params():
    out = []
    for name in SMALL + FAST_APPS + SLOW_APPS:
        for n in (2, 3):
            slow = name in SLOW_APPS or (n == 3 and name in FAST_APPS[2:])
            out.append(pytest.param(name, n, marks=[pytest.mark.slow] if slow else [],
                                    id=f"{name}-{n}"))
    return out


@pytest.mark.parametrize(("name", "num_classes"), _params())
def test_model_builds_flat_and_trains_one_step(name, num_classes):
    spec = specs.MODELS[name]
    size = _tiny(name)
    built = M.build_model_with_report(_cfg(name), num_classes)
    model = built.model

    assert not any(isinstance(layer, keras.Model) for layer in model.layers), "nested model"
    assert model.get_layer(spec.saliency_layer) is not None
    assert M.saliency_layer_name(model) == spec.saliency_layer
    assert model.input.shape[1:] == (size, size, 1)
    pred = model.get_layer("predictions")
    assert pred.units == (1 if num_classes == 2 else num_classes)
    assert built.weights_report is None

    loss_name = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer="adam", loss=loss_name, run_eagerly=True)
    y = np.array([[0.0], [1.0]]) if num_classes == 2 else np.array([0, 2])
    loss = model.train_on_batch(_images(size), y)
    assert np.isfinite(loss)
    out = _run(model, _images(size))
    assert out.shape == (2, pred.units)
    if num_classes > 2:
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_registry_names_and_spec_fields():
    assert set(SMALL + FAST_APPS + SLOW_APPS) == set(specs.MODELS)
    for name, spec in specs.MODELS.items():
        assert spec.name == name
        assert spec.min_size <= spec.default_size
        assert spec.preprocessing in ("unit", "caffe", "tf", "torch", "none")
        assert (spec.keras_application is None) == (name in SMALL)
        if spec.keras_application:
            assert spec.imagenet is not None and spec.rgb


def test_graph_mode_training_step():
    # The other tests run eagerly; one traced step checks that the graph compiles.
    model = M.build_model(_cfg("small3_50"), 2)
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=False)
    assert np.isfinite(model.train_on_batch(_images(32), np.array([[0.0], [1.0]])))


def test_rgb_to_bgr_traces_in_graph_mode():
    inp = keras.Input((8, 8, 3))
    x = M._preprocessing(inp, specs.MODELS["vgg16"], 3)
    names = [layer.name for layer in keras.Model(inp, x).layers[1:]]
    assert names == ["pre_rgb_to_bgr", "pre_rescale"]
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=False)
    assert np.isfinite(model.train_on_batch(_images(8, 3), np.array([[0.0], [1.0]])))


def test_predictions_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = M.build_model(_cfg("small3_50"), 3)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("block1_conv").compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert _run(model, _images(32)).dtype == np.float32


def test_dropout_override_and_head_names():
    model = M.build_model(_cfg("vgg_sep", dropout=0.25), 2)
    assert [layer.name for layer in layers.head_layers(model)] == [
        "head_flatten", "head_dense1", "head_dropout1",
        "head_dense2", "head_dropout2", "predictions",
    ]
    assert model.get_layer("head_dropout1").rate == 0.25
    default = M.build_model(_cfg("vgg_sep"), 2)
    assert default.get_layer("head_dropout1").rate == 0.7


# ----------------------------------------------------------------------------------------------
# Preprocessing inside the model matches keras.applications preprocess_input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("vgg16", keras.applications.vgg16.preprocess_input),
        ("resnet50", keras.applications.resnet50.preprocess_input),
        ("mobilenetv2", keras.applications.mobilenet_v2.preprocess_input),
        ("mobilenet", keras.applications.mobilenet.preprocess_input),
        ("resnet50v2", keras.applications.resnet_v2.preprocess_input),
        ("inceptionv3", keras.applications.inception_v3.preprocess_input),
        ("densenet121", keras.applications.densenet.preprocess_input),
        ("small3_50", lambda x: x / 255.0),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_preprocessing_matches_keras(name, reference, channels):
    inp = keras.Input((8, 8, channels))
    pre = keras.Model(inp, M._preprocessing(inp, specs.MODELS[name], channels))
    x = _images(8, channels, seed=3)
    rgb = np.repeat(x, 3, axis=-1) if (channels == 1 and specs.MODELS[name].rgb) else x
    expected = reference(rgb.copy())
    np.testing.assert_allclose(_run(pre, x), expected, rtol=1e-5, atol=1e-4)


def test_efficientnet_has_no_outer_preprocessing():
    model = M.build_model(_cfg("efficientnetb0", channels=3), 2)
    assert not [layer.name for layer in model.layers if layer.name.startswith("pre_")]


# ----------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "resnet9"}, "name='resnet9'"),
        ({"name": "inceptionv3", "image_size": 74}, "image_size=74"),
        ({"name": "mobilenetv2", "image_size": 16}, "image_size=16"),
        ({"name": "small3_50", "image_size": True}, "image_size=True"),
        ({"name": "small3_50", "image_size": 4096}, "image_size=4096"),
        ({"name": "small3_50", "channels": 2}, "channels=2"),
        ({"name": "small3_50", "dropout": 1.0}, "dropout=1.0"),
        ({"name": "small3_50", "dropout": -0.1}, "dropout=-0.1"),
        ({"name": "small3_50", "weights": "imagenet"}, "weights='imagenet'"),
        ({"name": "mobilenetv2", "weights": "weights.txt"}, "weights='weights.txt'"),
        ({"name": "mobilenetv2", "weights": "run:"}, "weights='run:'"),
        ({"name": "mobilenetv2", "freeze_backbone": True}, "weights=None"),
        ({"name": "mobilenetv2", "weights": "imagenet", "freeze_backbone": "yes"},
         "freeze_backbone='yes'"),
        ({"name": "mobilenetv2", "weights": "imagenet", "unfreeze_top_k": 0}, "unfreeze_top_k=0"),
        ({"name": "mobilenetv2", "weights": "imagenet", "unfreeze_top_k": 2.5},
         "unfreeze_top_k=2.5"),
    ],
)
def test_invalid_config_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(".", r"\.")):
        specs.ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"name": "inceptionv3", "image_size": 75},
        {"name": "mobilenetv2", "weights": "imagenet", "freeze_backbone": True,
         "unfreeze_top_k": 20},
        {"name": "small3_50", "weights": "run:42"},
        {"name": "small3_50", "weights": "/x/model.keras", "dropout": 0.0},
        {"name": "vgg_sep", "weights": "imagenet"},
    ],
)
def test_valid_configs_round_trip_through_dict(kwargs):
    cfg = specs.ModelConfig(**kwargs)
    assert specs.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="img_size"):
        specs.ModelConfig.from_dict({"name": "small3_50", "img_size": 50})


@pytest.mark.parametrize("num_classes", [1, 0, 2.0, True])
def test_build_rejects_bad_class_count(num_classes):
    with pytest.raises(ConfigError, match="num_classes="):
        M.build_model(_cfg("small3_50"), num_classes)


def test_unresolved_run_and_missing_file_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="run:7"):
        M.build_model(_cfg("small3_50", weights="run:7"), 2)
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(ModelError, match="nope.weights.h5"):
        M.build_model(_cfg("small3_50", weights=str(missing)), 2)


# ----------------------------------------------------------------------------------------------
# Trainability, feature extractor / head
# ----------------------------------------------------------------------------------------------


def test_set_backbone_trainable_freezes_and_unfreezes_top_k_keeping_batchnorm_frozen():
    model = M.build_model(_cfg("mobilenetv2"), 2)
    backbone = layers.backbone_layers(model)
    M.set_backbone_trainable(model, False)
    assert not any(layer.trainable for layer in backbone)
    assert all(layer.trainable for layer in layers.head_layers(model))

    M.set_backbone_trainable(model, True, top_k=10)
    top, rest = backbone[-10:], backbone[:-10]
    assert not any(layer.trainable for layer in rest)
    bn = keras.layers.BatchNormalization
    assert all(layer.trainable != isinstance(layer, bn) for layer in top)
    assert any(isinstance(layer, bn) for layer in top)

    M.set_backbone_trainable(model, True, freeze_batchnorm=False)
    assert all(layer.trainable for layer in backbone)
    with pytest.raises(ConfigError, match="top_k=0"):
        M.set_backbone_trainable(model, True, top_k=0)


def test_backbone_and_head_partition_the_layers():
    model = M.build_model(_cfg("densenet121"), 2)
    pre = [layer for layer in model.layers if layer.name.startswith("pre_")]
    parts = layers.backbone_layers(model) + layers.head_layers(model) + pre
    assert len(parts) + 1 == len(model.layers)  # + the input layer
    assert model.layers[0].name == "image"


@pytest.mark.parametrize("name", ["mobilenetv2", "small3_50"])
def test_feature_extractor_and_head_model_share_weights(name):
    model = M.build_model(_cfg(name), 3)
    features = M.feature_extractor(model)
    head = M.head_model(model)
    x = _images(_tiny(name))
    np.testing.assert_allclose(
        _run(head, _run(features, x)), _run(model, x),
        rtol=1e-5, atol=1e-6,
    )
    assert head.get_layer("predictions") is model.get_layer("predictions")
    # Training the head alone changes the full model's head.
    before = model.get_layer("predictions").get_weights()
    head.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", run_eagerly=True)
    head.train_on_batch(_run(features, x), np.array([0, 1]))
    assert not _same(before, model.get_layer("predictions").get_weights())


def test_feature_extractor_rejects_foreign_model():
    inp = keras.Input((4,))
    with pytest.raises(ModelError, match="head_"):
        M.feature_extractor(keras.Model(inp, keras.layers.Dense(1)(inp)))


# ----------------------------------------------------------------------------------------------
# Grad-CAM runs on the flat graphs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "num_classes"), [("custom5_224", 2), ("small3_50", 3),
                                                   ("mobilenetv2", 2)])
def test_gradcam_runs(name, num_classes):
    model = M.build_model(_cfg(name), num_classes)
    size = _tiny(name)
    gradcam = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    score = BinaryScore([1.0, 0.0]) if num_classes == 2 else CategoricalScore([0, 2])
    cam = gradcam(score, _images(size), penultimate_layer=specs.MODELS[name].saliency_layer)
    assert cam.shape == (2, size, size)
    assert np.isfinite(cam).all()
    # clone=True leaves the model's own head activation alone.
    assert model.get_layer("predictions").activation.__name__ in ("sigmoid", "softmax")


# ----------------------------------------------------------------------------------------------
# Weights: files generated in Keras layouts, no network
# ----------------------------------------------------------------------------------------------


def test_weights_h5_round_trip_same_graph(tmp_path):
    source = M.build_model(_cfg("mobilenetv2"), 2)
    _randomize(source)
    path = tmp_path / "mnv2.weights.h5"
    source.save_weights(path)

    built = M.build_model_with_report(_cfg("mobilenetv2", weights=str(path)), 2)
    for a, b in zip(source.weights, built.model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    report = built.weights_report
    assert report.method == "structure" and report.loaded == report.total
    x = _images(32)
    np.testing.assert_allclose(_run(built.model, x), _run(source, x),
                               rtol=1e-5)


def test_weights_h5_other_head_loads_backbone_and_skips_head(tmp_path):
    source = M.build_model(_cfg("small3_50"), 3)
    _randomize(source)
    path = tmp_path / "small.weights.h5"
    source.save_weights(path)

    built = M.build_model_with_report(_cfg("small3_50", weights=str(path)), 2)
    model, report = built.model, built.weights_report
    assert report.skipped == ("predictions",)
    assert report.loaded == report.total - 1
    for layer in layers.backbone_layers(model) + [model.get_layer("head_dense1")]:
        assert _same(layer.get_weights(), source.get_layer(layer.name).get_weights())


def test_chexnet_like_h5_loads_densenet_backbone(tmp_path):
    # CheXNet Keras weights: DenseNet121 (Keras 2 names such as "conv1/conv") + a 14-way Dense.
    base = keras.applications.DenseNet121(include_top=False, weights=None,
                                          input_shape=(32, 32, 3), pooling="avg")
    out = keras.layers.Dense(14, activation="sigmoid", name="predictions")(base.output)
    chexnet = keras.Model(base.input, out)
    _randomize(chexnet)
    path = tmp_path / "brucechou1983_CheXNet_Keras_0.3.0_weights.h5"
    keras2 = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "conv1_relu": "conv1/relu"}
    _write_keras2_h5(chexnet, path, rename=lambda n: keras2.get(n, n))

    built = M.build_model_with_report(
        _cfg("densenet121", weights=str(path), freeze_backbone=True), 2
    )
    model, report = built.model, built.weights_report
    assert report.method == "by name"
    assert report.skipped == ("predictions",)
    for layer in layers.backbone_layers(model):
        if layer.weights:
            source = chexnet.get_layer(layer.name).get_weights()
            assert _same(layer.get_weights(), source), layer.name
    assert not any(layer.trainable for layer in layers.backbone_layers(model))


def test_keras_applications_layout_loads_in_layer_order(tmp_path):
    # A no-top file as keras.applications ships it; layer names need not match ours.
    source = keras.applications.MobileNetV2(include_top=False, weights=None,
                                            input_shape=(32, 32, 3))
    _randomize(source)
    path = tmp_path / "my_mobilenet.h5"
    _write_keras2_h5(source, path, rename=lambda n: f"x_{n}")

    built = M.build_model_with_report(_cfg("mobilenetv2", weights=str(path)), 2)
    assert built.weights_report.method == "layer order"
    src = [layer for layer in source.layers if layer.weights]
    dst = [layer for layer in layers.backbone_layers(built.model) if layer.weights]
    assert all(_same(a.get_weights(), b.get_weights()) for a, b in zip(src, dst))


def test_previous_run_keras_transfer(tmp_path):
    source = M.build_model(_cfg("small3_50", channels=3), 3)
    _randomize(source)
    path = tmp_path / "run.keras"
    source.save(path)

    built = M.build_model_with_report(_cfg("small3_50", channels=3, weights=str(path)), 2)
    report = built.weights_report
    assert report.skipped == ("predictions",)
    assert report.loaded == report.total - 1
    for layer in layers.backbone_layers(built.model):
        assert _same(layer.get_weights(), source.get_layer(layer.name).get_weights())


def test_keras_transfer_pairs_auto_named_layers(tmp_path):
    # EfficientNet's stem Normalization is auto-named ("normalization_N") and renumbered on
    # every build; it must still be transferred.
    source = M.build_model(_cfg("efficientnetb0"), 2)
    _randomize(source)
    path = tmp_path / "effnet.keras"
    source.save(path)
    built = M.build_model_with_report(_cfg("efficientnetb0", weights=str(path)), 2)
    assert built.weights_report.loaded == built.weights_report.total
    x = _images(32)
    np.testing.assert_allclose(_run(built.model, x), _run(source, x),
                               rtol=1e-4, atol=1e-5)


def test_saved_model_with_custom_layer_loads(tmp_path):
    model = M.build_model(_cfg("vgg16", channels=3), 2)
    path = tmp_path / "vgg.keras"
    model.save(path)
    loaded = layers.load_model(path)
    x = _images(32, 3)
    np.testing.assert_allclose(_run(loaded, x), _run(model, x), rtol=1e-5)
    assert M.saliency_layer_name(loaded) == "block5_conv3"
    with pytest.raises(ModelError, match="missing.keras"):
        layers.load_model(tmp_path / "missing.keras")


def test_file_matching_nothing_raises_model_error(tmp_path):
    other = M.build_model(_cfg("custom5_224"), 2)  # block1_conv: 16 filters with bias
    path = tmp_path / "custom5.h5"
    _write_keras2_h5(other, path)
    with pytest.raises(ModelError, match="custom5.h5"):
        M.build_model(_cfg("small3_50", weights=str(path)), 3)  # block1_conv: 32, no bias
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ModelError, match="junk.h5"):
        M.build_model(_cfg("small3_50", weights=str(junk)), 3)


# ImageNet: the Keras cache, and a clear error when the file is missing and cannot be fetched.


def test_imagenet_offline_raises_model_error_naming_file_url_and_folder(keras_home, monkeypatch):
    attempts = _offline(monkeypatch)
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    with pytest.raises(ModelError) as err:
        M.build_model(_cfg("mobilenetv2", weights="imagenet", image_size=64), 2)
    message = str(err.value)
    assert name in message
    url = f"https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/{name}"
    assert url in message
    assert str(keras_home / "models") in message
    assert attempts == [url]


@pytest.mark.parametrize(
    ("name", "size", "file_name"),
    [
        ("mobilenetv2", 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"),
        ("mobilenet", 100, "mobilenet_1_0_224_tf_no_top.h5"),
        ("mobilenet", 128, "mobilenet_1_0_128_tf_no_top.h5"),
        ("vgg16", 224, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("vgg_sep", 224, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("densenet121", 224, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("resnet50", 224, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("resnet50v2", 224, "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("resnet152v2", 224, "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("efficientnetb0", 224, "efficientnetb0_notop.h5"),
        ("inceptionv3", 299, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ],
)
def test_imagenet_file_names(keras_home, monkeypatch, name, size, file_name):
    _offline(monkeypatch)
    with pytest.raises(ModelError, match=file_name.replace(".", r"\.")):
        W.imagenet_weights_path(specs.MODELS[name], size)


def test_imagenet_download_goes_through_keras_get_file(keras_home, monkeypatch):
    calls = []

    def fake_get_file(fname, origin, cache_dir, cache_subdir, file_hash):
        calls.append((fname, origin, cache_dir, cache_subdir, file_hash))
        target = Path(cache_dir) / cache_subdir / fname
        target.write_bytes(b"")
        return str(target)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    path = W.imagenet_weights_path(specs.MODELS["resnet50"], 224)
    assert path == keras_home / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert calls == [("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                      "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
                      "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                      str(keras_home), "models", "4d473c1dd8becc155b73f8504c6f6626")]


def test_imagenet_uses_prefilled_cache_without_downloading(keras_home, monkeypatch):
    attempts = _offline(monkeypatch)
    source = keras.applications.MobileNetV2(include_top=False, weights=None,
                                            input_shape=(32, 32, 3))
    _randomize(source)
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    cached = keras_home / "models" / name
    _write_keras2_h5(source, cached)

    built = M.build_model_with_report(
        _cfg("mobilenetv2", weights="imagenet", freeze_backbone=True), 2
    )
    assert attempts == []
    assert built.weights_report.method == "imagenet"
    assert built.weights_report.source == str(cached)
    src = [layer for layer in source.layers if layer.weights]
    dst = [layer for layer in layers.backbone_layers(built.model) if layer.weights]
    assert len(src) == len(dst)
    assert all(_same(a.get_weights(), b.get_weights()) for a, b in zip(src, dst))


def test_imagenet_efficientnet_matches_keras_imagenet_graph(keras_home, monkeypatch):
    # Keras adds a Rescaling layer to EfficientNet only for weights="imagenet"; our build
    # (weights=None + the file) must compute the same features.
    source = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))
    _randomize(source)
    cached = keras_home / "models" / "efficientnetb0_notop.h5"
    _write_keras2_h5(source, cached)
    _offline(monkeypatch)
    ours = M.build_model(_cfg("efficientnetb0", channels=3, weights="imagenet"), 2)

    from keras.src.utils import file_utils  # what keras.applications calls to download

    monkeypatch.setattr(file_utils, "get_file", lambda *a, **k: str(cached))
    reference = keras.applications.EfficientNetB0(include_top=False, weights="imagenet",
                                                  input_shape=(32, 32, 3), pooling="avg")
    x = _images(32, 3)
    np.testing.assert_allclose(_run(M.feature_extractor(ours), x),
                               _run(reference, x), rtol=1e-4, atol=1e-4)


def test_vgg_sep_takes_vgg16_first_blocks_from_imagenet_cache(keras_home, monkeypatch):
    _offline(monkeypatch)
    vgg16 = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    _randomize(vgg16)
    _write_keras2_h5(vgg16, keras_home / "models" / specs.MODELS["vgg16"].imagenet.file_name)

    built = M.build_model_with_report(_cfg("vgg_sep", weights="imagenet"), 2)
    blocks = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")
    for name in blocks:
        assert _same(built.model.get_layer(name).get_weights(), vgg16.get_layer(name).get_weights())
    assert built.weights_report.loaded == 4

    other = M.build_model(_cfg("small3_50"), 2)
    bad = keras_home / "not_vgg.h5"
    _write_keras2_h5(other, bad)
    with pytest.raises(ModelError, match="block1_conv1"):
        W.load_vgg16_first_blocks(built.model, bad)


def test_batchnorm_layers_forget_their_initial_statistics_within_an_epoch():
    # Keras' default momentum 0.99 kept ~1/3 of the initial variance after a PneumoniaMNIST run
    # (37 steps an epoch) and saturated every inference prediction near 1.
    for name in ("cxrnet_224", "cxrnet_28", "small3_50", "small3_128"):
        model = M.build_model(_cfg(name), 2)
        bns = [layer for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization)]
        assert bns and all(layer.momentum == M.BN_MOMENTUM == 0.9 for layer in bns), name


@pytest.mark.slow
def test_cxrnet_28_inference_is_not_saturated_after_two_epochs_on_pneumoniamnist(shared_data):
    from sklearn.metrics import roc_auc_score

    data = np.load(shared_data / "pneumoniamnist_trainval.npz")
    x = data["train_images"][..., None].astype("float32")
    y = data["train_labels"].ravel().astype("float32")
    model = M.build_model(specs.ModelConfig(name="cxrnet_28", image_size=28, channels=1), 2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    keras.utils.set_random_seed(0)
    model.fit(x, y, batch_size=128, epochs=2, verbose=0)
    p = model.predict(data["val_images"][..., None].astype("float32"), verbose=0).ravel()
    assert roc_auc_score(data["val_labels"].ravel(), p) > 0.95
    assert p.min() < 0.5 < p.max()  # inference-mode outputs span the threshold


def test_load_model_names_a_non_zip_keras_file_instead_of_file_not_found(tmp_path):
    # Keras itself reports "File not found" for an existing file that is not a zip archive;
    # every caller (Predict, Review, weights="file.keras") goes through models.load_model.
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(ModelError, match="not a Keras model file"):
        layers.load_model(fake)
