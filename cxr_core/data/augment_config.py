"""What augmentation a run applies (:class:`AugmentConfig`) and the built-in presets.

No TensorFlow or Keras here: pages, the CLI and config validation import it cheaply. The Keras
layers that apply a config live in :mod:`cxr_core.data.augment`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError

_FILL_MODES = ("constant", "nearest", "reflect", "wrap")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class AugmentConfig:
    """What augmentation a run (or the preview) applies. All ranges are symmetric.

    Attributes:
        hflip: mirror left-right with probability 1/2 (always, when chosen by ``one_of``).
        vflip: mirror top-bottom; off by default because films have one orientation.
        rotation: maximum rotation in degrees, drawn uniformly in [-rotation, rotation].
        zoom: zoom fraction z: the content is scaled by a factor in [1/(1+z), 1/(1-z)],
            as ImageDataGenerator's ``zoom_range=z`` did in the reports.
        width_shift: maximum horizontal shift as a fraction of the width.
        height_shift: maximum vertical shift as a fraction of the height.
        brightness: (lo, hi) multiplicative factor range, e.g. (1.2, 1.5); None = off.
        contrast: c: contrast factor in [1-c, 1+c] around each image's mean; 0 = off.
        crop: random resized crop c: a box whose sides are each a fraction in [1-c, 1] of
            the image's, placed uniformly at random, is resized back to the full size; 0 = off.
        gamma: g: gamma correction ``255 * (x / 255) ** y`` with y log-uniform in
            [1/(1+g), 1+g] (exposure and detector response differ between sites); 0 = off.
        blur: sigma s (pixels): each image is blended with its Gaussian blur of sigma s by a
            weight drawn uniformly in [0, 1] (sharpness differs between devices); 0 = off.
        noise: n (pixel units, 0-255 scale): zero-mean Gaussian noise whose standard
            deviation is drawn uniformly in [0, n] per image; 0 = off.
        one_of: apply exactly ONE of the enabled ops per image, picked uniformly
            (imgaug's OneOf); the two shifts count as one op.
        fill_mode: how rotations/zooms/shifts fill uncovered pixels ("constant" = black).
        seed: seeds every random op.
    """

    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0
    zoom: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    brightness: tuple[float, float] | None = None
    contrast: float = 0.0
    crop: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    one_of: bool = False
    fill_mode: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if not 0.0 <= self.rotation <= 180.0:
            raise ConfigError(f"rotation must be in [0, 180]. Received: rotation={self.rotation}")
        for name in ("zoom", "width_shift", "height_shift", "contrast", "crop", "gamma"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1). Received: {name}={value}")
        if not 0.0 <= self.blur <= 5.0:
            raise ConfigError(f"blur must be a sigma in [0, 5] pixels. Received: blur={self.blur}")
        if not 0.0 <= self.noise <= 64.0:
            raise ConfigError("noise must be a standard deviation in [0, 64] (pixel units, "
                              f"0-255). Received: noise={self.noise}")
        if self.brightness is not None:
            self._check_brightness()
        if self.fill_mode not in _FILL_MODES:
            raise ConfigError(
                f"fill_mode must be one of {_FILL_MODES}. Received: fill_mode={self.fill_mode!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer. Received: seed={self.seed!r}")

    def _check_types(self) -> None:
        """Wrong JSON types (e.g. ``"rotation": "lots"``) name the field, not a TypeError."""
        for name in ("hflip", "vflip", "one_of"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} must be true or false. "
                                  f"Received: {name}={getattr(self, name)!r}")
        for name in ("rotation", "zoom", "width_shift", "height_shift", "contrast", "crop",
                     "gamma", "blur", "noise"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a number. "
                                  f"Received: {name}={getattr(self, name)!r}")

    def _check_brightness(self) -> None:
        value = self.brightness
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not all(_is_number(v) for v in value) or not 0.0 < value[0] <= value[1]):
            raise ConfigError(
                "brightness must be a (lo, hi) factor range with 0 < lo <= hi. "
                f"Received: brightness={value}")
        # JSON brings lists back; keep the field hashable (the UI caches on configs).
        object.__setattr__(self, "brightness", (float(value[0]), float(value[1])))

    @property
    def enabled_ops(self) -> tuple[str, ...]:
        """Names of the ops this config turns on, in the order they are applied."""
        on = {
            "hflip": self.hflip,
            "vflip": self.vflip,
            "rotation": self.rotation > 0,
            "zoom": self.zoom > 0,
            "shift": self.width_shift > 0 or self.height_shift > 0,
            "brightness": self.brightness is not None,
            "contrast": self.contrast > 0,
            # Added later: appended so older configs keep their ops' seeds (stride per index).
            "crop": self.crop > 0,
            "gamma": self.gamma > 0,
            "blur": self.blur > 0,
            "noise": self.noise > 0,
        }
        return tuple(name for name, flag in on.items() if flag)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stored with each run)."""
        data = asdict(self)
        data["brightness"] = list(self.brightness) if self.brightness else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown augmentation keys {unknown}. Expected some of {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "zoom_shift": AugmentConfig(zoom=0.1, width_shift=0.1, height_shift=0.1),
    "rot30_zoom_shift_flip": AugmentConfig(
        rotation=30.0, zoom=0.2, width_shift=0.1, height_shift=0.1, hflip=True),
    "hflip": AugmentConfig(hflip=True),
    "rot10_shift_flip": AugmentConfig(rotation=10.0, width_shift=0.1, height_shift=0.1, hflip=True),
    "oneof_flip_rot20_bright": AugmentConfig(
        hflip=True, rotation=20.0, brightness=(1.2, 1.5), one_of=True),
    # Under shift (issue 14): geometry plus the photometric spread between sites and devices.
    "shift_robust": AugmentConfig(
        rotation=10.0, width_shift=0.05, height_shift=0.05, crop=0.2, brightness=(0.8, 1.2),
        contrast=0.3, gamma=0.4, blur=1.5, noise=6.0),
}


def get_preset(name: str) -> AugmentConfig:
    """Look up a built-in preset by name.

    Raises:
        ConfigError: the name is not a preset.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown augmentation preset. Expected one of {sorted(PRESETS)}. "
                          f"Received: augment={name!r}")
    return PRESETS[name]
