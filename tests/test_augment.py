"""Tests for cxr_core.data.augment: config validation, presets, determinism, and op ranges."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from cxr_core.data.augment import augment_preview, build_augmenter
from cxr_core.data.augment_config import PRESETS, AugmentConfig, get_preset
from cxr_core.core.errors import ConfigError

SIZE = 48


def _asym(seed: int = 0, lo: int = 20, hi: int = 100) -> np.ndarray:
    """A random image whose mirror differs from itself, with values that never clip when
    multiplied by up to 1.5."""
    return np.random.default_rng(seed).integers(lo, hi, (SIZE, SIZE), dtype=np.uint8)


def _centroid(img: np.ndarray) -> np.ndarray:
    weights = img.astype(np.float64)
    ys, xs = np.indices(img.shape)
    return np.array([(ys * weights).sum(), (xs * weights).sum()]) / weights.sum()


def _line_angle(img: np.ndarray) -> float:
    """Angle in degrees of the principal axis of the bright pixels (0 = horizontal)."""
    ys, xs = np.nonzero(img > 64)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    vals, vecs = np.linalg.eigh(cov)
    vx, vy = vecs[:, np.argmax(vals)]
    angle = np.degrees(np.arctan2(vy, vx))
    return (angle + 90.0) % 180.0 - 90.0  # an axis, not a direction: fold into [-90, 90)


@pytest.mark.parametrize("kwargs", [
    {"rotation": 200}, {"rotation": -1}, {"zoom": 1.0}, {"width_shift": -0.1},
    {"height_shift": 1.5}, {"contrast": 1.0}, {"brightness": (1.5, 1.2)},
    {"brightness": (0.0, 1.2)}, {"brightness": (1.2,)}, {"fill_mode": "mirror"}, {"seed": 1.5},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError, match="Received"):
        AugmentConfig(**kwargs)


def test_config_json_round_trip_for_every_preset():
    for name, cfg in PRESETS.items():
        back = AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg, name
        hash(back)  # frozen and hashable after JSON turned the tuple into a list


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown"):
        AugmentConfig.from_dict({"rotation": 10, "shear": 0.2})


def test_vflip_is_off_by_default_and_in_every_preset():
    assert AugmentConfig().vflip is False
    assert not any(cfg.vflip for cfg in PRESETS.values())


@pytest.mark.parametrize(("name", "ops"), [
    ("none", ()),
    ("zoom_shift", ("zoom", "shift")),
    ("rot30_zoom_shift_flip", ("hflip", "rotation", "zoom", "shift")),
    ("hflip", ("hflip",)),
    ("rot10_shift_flip", ("hflip", "rotation", "shift")),
    ("oneof_flip_rot20_bright", ("hflip", "rotation", "brightness")),
])
def test_presets_match_the_reports(name, ops):
    assert get_preset(name).enabled_ops == ops
    assert get_preset("oneof_flip_rot20_bright").one_of


def test_unknown_preset_raises():
    with pytest.raises(ConfigError, match="preset"):
        get_preset("mixup")


def test_same_seed_same_images_different_seed_different():
    cfg = PRESETS["rot30_zoom_shift_flip"]
    first = augment_preview(_asym(), cfg, 4)
    again = augment_preview(_asym(), cfg, 4)
    other = augment_preview(_asym(), AugmentConfig(**{**cfg.to_dict(), "seed": 1}), 4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_preview_shapes_and_dtype():
    gray = augment_preview(_asym(), PRESETS["hflip"], 3)
    rgb = augment_preview(np.stack([_asym()] * 3, -1), PRESETS["hflip"], 2)
    assert [v.shape for v in gray] == [(SIZE, SIZE)] * 3 and gray[0].dtype == np.uint8
    assert [v.shape for v in rgb] == [(SIZE, SIZE, 3)] * 2
    with pytest.raises(ConfigError, match="n must be"):
        augment_preview(_asym(), PRESETS["hflip"], 0)


def test_inference_mode_is_identity():
    x = _asym()[None, ..., None].astype(np.float32)
    out = np.asarray(build_augmenter(PRESETS["rot30_zoom_shift_flip"])(x, training=False))
    np.testing.assert_array_equal(out, x)


def test_hflip_only_mirrors():
    img = _asym()
    outs = augment_preview(img, AugmentConfig(hflip=True), 16)
    mirrored = [np.array_equal(o, img[:, ::-1]) for o in outs]
    assert all(m or np.array_equal(o, img) for m, o in zip(mirrored, outs))
    assert 0 < sum(mirrored) < len(outs)


def test_rotation_stays_within_bound():
    img = np.zeros((65, 65), np.uint8)
    img[31:34, 8:57] = 255  # a horizontal bar through the centre
    angles = [_line_angle(o) for o in augment_preview(img, AugmentConfig(rotation=20), 24)]
    assert max(abs(a) for a in angles) <= 20 + 1.5
    assert max(abs(a) for a in angles) > 8  # it really rotates


def test_brightness_factor_in_range_on_flat_gray():
    flat = np.full((16, 16), 100, np.uint8)
    outs = augment_preview(flat, AugmentConfig(brightness=(1.2, 1.5)), 24)
    factors = np.array([o.mean() / 100.0 for o in outs])
    assert all(o.std() < 0.5 for o in outs)  # one factor per image
    assert factors.min() >= 1.2 - 0.01 and factors.max() <= 1.5 + 0.01
    assert factors.max() - factors.min() > 0.1


def test_outputs_are_clipped_to_255():
    outs = augment_preview(np.full((8, 8), 250, np.uint8), AugmentConfig(brightness=(1.5, 1.5)), 2)
    assert all(o.max() == 255 for o in outs)


def test_zoom_scales_within_range():
    img = np.zeros((64, 64), np.uint8)
    img[22:42, 22:42] = 255  # a 20 px square at the centre
    z = 0.2
    outs = augment_preview(img, AugmentConfig(zoom=z), 16)
    scales = np.array([np.sqrt((o > 127).sum()) / 20.0 for o in outs])
    assert scales.min() >= 1 / (1 + z) - 0.06 and scales.max() <= 1 / (1 - z) + 0.06
    assert scales.max() - scales.min() > 0.1


def test_shift_moves_within_range():
    img = np.zeros((64, 64), np.uint8)
    img[31:34, 31:34] = 255
    outs = augment_preview(img, AugmentConfig(width_shift=0.1, height_shift=0.1), 16)
    moves = np.array([_centroid(o) - _centroid(img) for o in outs])
    assert np.abs(moves).max() <= 0.1 * 64 + 1
    assert np.abs(moves[:, 0]).max() > 1 and np.abs(moves[:, 1]).max() > 1


def test_contrast_keeps_mean_and_scales_spread():
    img = np.tile(np.array([80, 160], np.uint8), (16, 8))
    outs = augment_preview(img, AugmentConfig(contrast=0.3), 16)
    ratios = np.array([o.std() / img.std() for o in outs])
    assert ratios.min() >= 0.7 - 0.02 and ratios.max() <= 1.3 + 0.02
    assert all(abs(o.mean() - img.mean()) < 1.0 for o in outs)


def test_one_of_applies_exactly_one_op():
    img = _asym()
    cfg = AugmentConfig(hflip=True, brightness=(1.2, 1.5), one_of=True, seed=3)
    flips = brights = 0
    for out in augment_preview(img, cfg, 24):
        if np.array_equal(out, img[:, ::-1]):
            flips += 1  # the flip branch always flips and leaves brightness alone
            continue
        factor = out.astype(np.float64) / img
        assert np.ptp(factor) < 0.05 and 1.19 <= factor.mean() <= 1.51  # brightened, unflipped
        brights += 1
    assert flips and brights


def test_one_of_preset_builds_a_single_choice_layer():
    names = [layer.name for layer in build_augmenter(PRESETS["oneof_flip_rot20_bright"]).layers]
    assert names == ["one_of", "clip"]


def test_augmenter_config_round_trips():
    for name in ("oneof_flip_rot20_bright", "rot30_zoom_shift_flip"):
        model = build_augmenter(PRESETS[name])
        model(np.zeros((1, 8, 8, 1), np.float32))
        clone = keras.Sequential.from_config(model.get_config())
        assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
