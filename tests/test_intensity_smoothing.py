"""Per-image intensity standardisation (a layer in the model) and label smoothing (issue 14)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from cxr_core.core.errors import ConfigError
from cxr_core.models.specs import ModelConfig
from cxr_core.models.graph import build_model, saliency_layer_name
from cxr_core.models.layers import load_model
from cxr_core.training.config import TrainConfig
from cxr_core.training.fit import _loss_and_metrics


def test_standardize_layer_removes_exposure_and_contrast_differences(tmp_path):
    model = build_model(ModelConfig(name="custom5_224", image_size=64, channels=1,
                                    intensity="standardize"), 2)
    assert model.layers[1].name == "pre_intensity"
    pre = keras.Model(model.input, model.get_layer("pre_intensity").output)
    base = np.random.default_rng(0).uniform(40, 120, (1, 64, 64, 1)).astype(np.float32)
    darker_flatter = 0.5 * base + 10.0  # another site's exposure and contrast
    a, b = (keras.ops.convert_to_numpy(pre(x)) for x in (base, darker_flatter))
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert abs(float(a.mean()) - 128) < 1 and 0 <= a.min() and a.max() <= 255
    flat = keras.ops.convert_to_numpy(pre(np.full((1, 64, 64, 1), 77, np.float32)))
    np.testing.assert_allclose(flat, 128.0)
    # predictions survive a save/load (the layer is registered) and Grad-CAM skips it
    path = tmp_path / "m.keras"
    model.save(path)
    back = load_model(path)
    np.testing.assert_allclose(back.predict(base, verbose=0), model.predict(base, verbose=0),
                               rtol=1e-5)
    assert not saliency_layer_name(back).startswith("pre_")


def test_intensity_default_is_none_and_bad_values_are_refused():
    model = build_model(ModelConfig(name="custom5_224", image_size=64, channels=1), 2)
    assert "pre_intensity" not in [layer.name for layer in model.layers]
    with pytest.raises(ConfigError, match="intensity"):
        ModelConfig(name="custom5_224", image_size=64, channels=1, intensity="clahe")


def test_train_config_passes_intensity_and_validates_smoothing():
    cfg = TrainConfig(dataset="d", intensity="standardize", label_smoothing=0.1)
    assert cfg.model_config().intensity == "standardize"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (0.5, -0.1, "x"):
        with pytest.raises(ConfigError, match="label_smoothing"):
            TrainConfig(dataset="d", label_smoothing=bad)
    with pytest.raises(ConfigError, match="binary"):
        TrainConfig(dataset="d", label_scheme="three_class", label_smoothing=0.1,
                    calibration_fraction=0.0, monitor="val_loss")


def test_label_smoothing_reaches_the_binary_loss():
    loss, _ = _loss_and_metrics(2, 0.2)
    y, p = np.array([[1.0]]), np.array([[0.999]])
    smoothed = float(loss(y, p))
    plain = float(_loss_and_metrics(2, 0.0)[0](y, p))
    expected = -(0.9 * np.log(0.999) + 0.1 * np.log(0.001))
    assert smoothed == pytest.approx(expected, rel=1e-3) and smoothed > plain
