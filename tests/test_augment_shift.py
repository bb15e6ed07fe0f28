"""The augmentation ops added for robustness under shift (issue 14): crop, gamma, blur, noise."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from cxr_core.data.augment import augment_preview, build_augmenter
from cxr_core.data.augment_config import PRESETS, AugmentConfig
from cxr_core.core.errors import ConfigError

SIZE = 48


def _ramp() -> np.ndarray:
    """A horizontal ramp 0..235: a crop changes where each value lands."""
    return np.tile(np.linspace(0, 235, SIZE), (SIZE, 1)).astype(np.uint8)


@pytest.mark.parametrize("kwargs", [
    {"crop": 1.0}, {"crop": -0.1}, {"gamma": 1.0}, {"blur": 5.5}, {"blur": -1},
    {"noise": 65}, {"noise": "lots"}, {"gamma": True},
])
def test_new_ops_reject_bad_values(kwargs):
    with pytest.raises(ConfigError, match="Received"):
        AugmentConfig(**kwargs)


def test_new_ops_are_appended_so_older_configs_keep_their_seeds():
    cfg = AugmentConfig(hflip=True, contrast=0.2, crop=0.1, gamma=0.2, blur=1.0, noise=2.0)
    assert cfg.enabled_ops == ("hflip", "contrast", "crop", "gamma", "blur", "noise")
    # An older config's images are unchanged by the new fields' existence.
    old = AugmentConfig(rotation=10.0, zoom=0.1, seed=4)
    assert old.enabled_ops == ("rotation", "zoom")


def test_shift_robust_preset_round_trips_and_builds():
    cfg = PRESETS["shift_robust"]
    assert set(cfg.enabled_ops) >= {"crop", "gamma", "blur", "noise", "contrast", "brightness"}
    assert AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = build_augmenter(cfg)
    out = keras.ops.convert_to_numpy(model(np.full((3, SIZE, SIZE, 1), 128, np.float32),
                                           training=True))
    assert out.shape == (3, SIZE, SIZE, 1) and out.min() >= 0 and out.max() <= 255
    clone = keras.Sequential.from_config(model.get_config())
    assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]


def test_crop_is_a_zoom_in_that_never_shows_fill():
    img = _ramp()
    for v in augment_preview(img, AugmentConfig(crop=0.4, seed=1), 8):
        # A crop resized back spreads a sub-range of the ramp over the full width: the
        # columns still increase, and no black (fill) column appears on a ramp starting > 0.
        cols = v.astype(float).mean(axis=0)
        assert np.all(np.diff(cols) >= -1.0)
        span = cols[-1] - cols[0]
        assert 0.6 * 235 - 8 <= span <= 235 + 1
    shifted = augment_preview(img + 20, AugmentConfig(crop=0.4, seed=1), 8)
    assert min(int(v.min()) for v in shifted) >= 19


def test_gamma_keeps_black_and_white_and_bends_the_middle_within_range():
    img = np.zeros((SIZE, SIZE), np.uint8)
    img[:, : SIZE // 3] = 0
    img[:, SIZE // 3: 2 * SIZE // 3] = 128
    img[:, 2 * SIZE // 3:] = 255
    g = 0.5
    lo, hi = 255 * (128 / 255) ** (1 + g), 255 * (128 / 255) ** (1 / (1 + g))
    mids = []
    for v in augment_preview(img, AugmentConfig(gamma=g, seed=2), 12):
        assert v[:, 0].max() == 0 and v[:, -1].min() == 255
        mid = float(v[0, SIZE // 2])
        assert lo - 1 <= mid <= hi + 1
        mids.append(mid)
    assert np.ptp(mids) > 5  # the exponent really varies per image


def test_blur_keeps_the_mean_and_lowers_the_spread_by_varying_amounts():
    img = (np.indices((SIZE, SIZE)).sum(axis=0) % 2 * 200 + 20).astype(np.uint8)  # checker
    outs = augment_preview(img, AugmentConfig(blur=2.0, seed=3), 10)
    spreads = [float(v.std()) for v in outs]
    assert all(s <= img.std() + 0.5 for s in spreads)
    assert min(spreads) < 0.5 * img.std() and np.ptp(spreads) > 5
    assert all(abs(float(v.mean()) - float(img.mean())) < 3 for v in outs)


def test_noise_is_zero_mean_and_within_its_deviation():
    img = np.full((SIZE, SIZE), 128, np.uint8)
    outs = augment_preview(img, AugmentConfig(noise=10.0, seed=4), 10)
    stds = [float(v.astype(float).std()) for v in outs]
    assert all(s <= 10.0 * 1.15 + 0.6 for s in stds) and np.ptp(stds) > 1
    assert abs(np.mean([v.mean() for v in outs]) - 128) < 1.5


def test_new_ops_are_identity_at_inference_and_deterministic_per_seed():
    img = _ramp()
    cfg = AugmentConfig(crop=0.3, gamma=0.4, blur=1.5, noise=5.0, seed=7)
    model = build_augmenter(cfg)
    x = img[None, ..., None].astype(np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x, training=False)), x)
    a, b = augment_preview(img, cfg, 3), augment_preview(img, cfg, 3)
    assert all((u == w).all() for u, w in zip(a, b))
    c = augment_preview(img, AugmentConfig(crop=0.3, gamma=0.4, blur=1.5, noise=5.0, seed=8), 3)
    assert any((u != w).any() for u, w in zip(a, c))


def test_new_ops_in_one_of_apply_one_at_a_time():
    cfg = AugmentConfig(gamma=0.5, noise=8.0, one_of=True, seed=5)
    outs = augment_preview(np.full((SIZE, SIZE), 128, np.uint8), cfg, 12)
    # noise makes a flat image non-flat; gamma alone keeps it flat: both kinds appear
    flat = [v.std() < 0.5 for v in outs]
    assert any(flat) and not all(flat)
