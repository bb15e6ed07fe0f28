"""The ONE augmentation builder: the preview page and training both call :func:`build_augmenter`.

Image convention: float32 pixel values in [0, 255] (never [0, 1]); shape (H, W, C) or
(B, H, W, C), channels last. Every op keeps that range and the last layer clips to it, so the
model's own preprocessing (part of the model, per architecture) always sees [0, 255].

Every random op is a Keras 3 preprocessing layer (or a small custom layer where Keras has no
equivalent) seeded from ``AugmentConfig.seed``: a fresh augmenter built from the same config
gives the same images for the same inputs. The layers hold a random state that advances on
each call, so consecutive batches (and epochs) differ; rebuild the augmenter to start over.

Chest-X-ray-safe defaults: no vertical flip (films have one orientation) and rotations,
zooms and shifts fill the uncovered border with black instead of Keras' default mirror
(a mirrored border shows a second set of ribs that no real film has).
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.data.augment_config import AugmentConfig

PIXEL_MAX = 255.0
# Seed offsets per op, so two ops of one config never draw the same random stream.
_SEED_STRIDE = 7919


def _batched(images: Any) -> tuple[Any, bool]:
    """Give a rank-3 image a batch axis; say whether one was added."""
    if len(images.shape) == 3:
        return keras.ops.expand_dims(images, 0), True
    return images, False


def _per_image(batch: Any, lo: float, hi: float, generator: Any) -> Any:
    """One uniform draw in [lo, hi] per image, shaped (B, 1, 1, 1)."""
    return keras.random.uniform((keras.ops.shape(batch)[0], 1, 1, 1), lo, hi,
                                seed=generator, dtype=batch.dtype)


class _Seeded(keras.layers.Layer):
    """A training-only random op with one seeded stream; subclasses implement ``_augment``
    on a (B, H, W, C) batch."""

    def __init__(self, amount: float, seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.amount = float(amount)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        if not training:
            return images
        batch, squeeze = _batched(images)
        out = self._augment(batch)
        return keras.ops.squeeze(out, 0) if squeeze else out

    def _augment(self, batch: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "amount": self.amount, "seed": self.seed}


@keras.saving.register_keras_serializable(package="cxr")
class RandomBrightnessFactor(_Seeded):
    """Multiply each image by one factor drawn uniformly in [lo, hi], then clip to [0, 255].

    Keras' RandomBrightness adds an offset; the reports used imgaug's multiplicative
    brightness (x1.2-1.5), which also keeps black borders black.
    """

    def __init__(self, factor: tuple[float, float], seed: int | None = None, **kwargs: Any):
        super().__init__(0.0, seed, **kwargs)
        self.factor = (float(factor[0]), float(factor[1]))

    def _augment(self, batch: Any) -> Any:
        scale = _per_image(batch, self.factor[0], self.factor[1], self.generator)
        return keras.ops.clip(batch * scale, 0.0, PIXEL_MAX)

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "factor": self.factor}
        config.pop("amount")
        return config


@keras.saving.register_keras_serializable(package="cxr")
class RandomResizedCrop(_Seeded):
    """Crop a box with sides in [1-amount, 1] of the image's at a random place; resize back.

    One affine transform per image (``keras.ops.image.affine_transform``), so the output keeps
    the input's size and the box never leaves the image (no fill is ever seen).
    """

    def _augment(self, batch: Any) -> Any:
        n = keras.ops.shape(batch)[0]
        h = keras.ops.cast(keras.ops.shape(batch)[1] - 1, batch.dtype)
        w = keras.ops.cast(keras.ops.shape(batch)[2] - 1, batch.dtype)
        lo = 1.0 - self.amount
        sw = keras.random.uniform((n,), lo, 1.0, seed=self.generator, dtype=batch.dtype)
        sh = keras.random.uniform((n,), lo, 1.0, seed=self.generator, dtype=batch.dtype)
        ox = keras.random.uniform((n,), 0.0, 1.0, seed=self.generator, dtype=batch.dtype)
        oy = keras.random.uniform((n,), 0.0, 1.0, seed=self.generator, dtype=batch.dtype)
        zero = keras.ops.zeros_like(sw)
        # output (x, y) reads input (sw*x + ox*(1-sw)*w, sh*y + oy*(1-sh)*h)
        transform = keras.ops.stack([sw, zero, ox * (1.0 - sw) * w, zero, sh,
                                     oy * (1.0 - sh) * h, zero, zero], axis=1)
        return keras.ops.image.affine_transform(batch, transform, interpolation="bilinear",
                                                fill_mode="nearest")


@keras.saving.register_keras_serializable(package="cxr")
class RandomGamma(_Seeded):
    """``255 * (x / 255) ** y``, y log-uniform in [1/(1+amount), 1+amount] per image."""

    def _augment(self, batch: Any) -> Any:
        span = float(np.log1p(self.amount))
        gamma = keras.ops.exp(_per_image(batch, -span, span, self.generator))
        unit = keras.ops.clip(batch / PIXEL_MAX, 0.0, 1.0)
        return PIXEL_MAX * keras.ops.power(unit, gamma)


@keras.saving.register_keras_serializable(package="cxr")
class RandomBlur(_Seeded):
    """Blend each image with its Gaussian blur (sigma ``amount`` px) by a weight in [0, 1].

    One fixed separable kernel for the batch and a per-image blend: variable sharpness at the
    cost of one blur, where a kernel per image would cost one convolution per image.
    """

    def _augment(self, batch: Any) -> Any:
        radius = max(1, int(np.ceil(2.5 * self.amount)))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.amount) ** 2)
        taps = (taps / taps.sum()).astype("float32")
        channels = batch.shape[-1]
        row = keras.ops.convert_to_tensor(
            np.tile(taps.reshape(1, -1, 1, 1), (1, 1, channels, 1)), dtype=batch.dtype)
        col = keras.ops.convert_to_tensor(
            np.tile(taps.reshape(-1, 1, 1, 1), (1, 1, channels, 1)), dtype=batch.dtype)
        padded = keras.ops.pad(batch, [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                               mode="reflect")
        blurred = keras.ops.depthwise_conv(keras.ops.depthwise_conv(padded, row), col)
        weight = _per_image(batch, 0.0, 1.0, self.generator)
        return batch + weight * (blurred - batch)


@keras.saving.register_keras_serializable(package="cxr")
class RandomNoise(_Seeded):
    """Add zero-mean Gaussian noise with a standard deviation in [0, amount] per image.

    Keras' GaussianNoise takes one fixed deviation below 1 (for [0, 1] inputs); films here
    are [0, 255] and their noise differs between devices.
    """

    def _augment(self, batch: Any) -> Any:
        std = _per_image(batch, 0.0, self.amount, self.generator)
        noise = keras.random.normal(keras.ops.shape(batch), seed=self.generator,
                                    dtype=batch.dtype)
        return batch + std * noise


@keras.saving.register_keras_serializable(package="cxr")
class HorizontalFlip(keras.layers.Layer):
    """Always mirror left-right: the flip branch of a OneOf (a 50% RandomFlip there would
    make "flip" the identity for half of the images that picked it)."""

    def call(self, images: Any, training: bool = True) -> Any:
        return keras.ops.flip(images, axis=-2) if training else images


@keras.saving.register_keras_serializable(package="cxr")
class ClipPixels(keras.layers.Layer):
    """Clip to [0, 255]: bilinear resampling and contrast can overshoot by a little."""

    def call(self, images: Any) -> Any:
        return keras.ops.clip(images, 0.0, PIXEL_MAX)


@keras.saving.register_keras_serializable(package="cxr")
class OneOf(keras.layers.Layer):
    """Apply exactly one of ``branches`` to each image, chosen uniformly per image.

    Per image, not per batch: every branch runs on the whole batch and a one-hot mask keeps
    one result per image. This costs len(branches) x the compute of one op, which is cheap
    for the 2-4 light ops of a preset and avoids per-image control flow in tf.data graphs.
    """

    def __init__(self, branches: list[keras.layers.Layer], seed: int | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if not branches:
            raise ConfigError("OneOf needs at least one branch. Received: branches=[]")
        self.branches = list(branches)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        if not training:
            return images
        batch, squeeze = _batched(images)
        n = len(self.branches)
        choice = keras.random.randint(
            (keras.ops.shape(batch)[0],), 0, n, seed=self.generator)
        mask = keras.ops.one_hot(choice, n, dtype=batch.dtype)
        out = keras.ops.zeros_like(batch)
        for k, branch in enumerate(self.branches):
            # 0/1 weights: the chosen branch's pixels pass through exactly.
            out = out + mask[:, k, None, None, None] * branch(batch, training=True)
        return keras.ops.squeeze(out, 0) if squeeze else out

    def get_config(self) -> dict[str, Any]:
        branches = [keras.saving.serialize_keras_object(b) for b in self.branches]
        return {**super().get_config(), "branches": branches, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OneOf:
        config = dict(config)
        config["branches"] = [keras.saving.deserialize_keras_object(b)
                              for b in config["branches"]]
        return cls(**config)


def _op_layers(cfg: AugmentConfig, in_one_of: bool) -> list[keras.layers.Layer]:
    """One seeded layer per enabled op, in ``cfg.enabled_ops`` order."""
    fill = {"fill_mode": cfg.fill_mode, "fill_value": 0.0}
    layers: list[keras.layers.Layer] = []
    for k, op in enumerate(cfg.enabled_ops):
        seed = cfg.seed + _SEED_STRIDE * (k + 1)
        if op == "hflip":
            layers.append(HorizontalFlip(name="hflip") if in_one_of
                          else keras.layers.RandomFlip("horizontal", seed=seed, name="hflip"))
        elif op == "vflip":
            layers.append(keras.layers.RandomFlip("vertical", seed=seed, name="vflip"))
        elif op == "rotation":
            # Keras takes the angle as a fraction of a full turn.
            layers.append(keras.layers.RandomRotation(
                cfg.rotation / 360.0, seed=seed, name="rotation", **fill))
        elif op == "zoom":
            layers.append(keras.layers.RandomZoom(cfg.zoom, seed=seed, name="zoom", **fill))
        elif op == "shift":
            layers.append(keras.layers.RandomTranslation(
                cfg.height_shift, cfg.width_shift, seed=seed, name="shift", **fill))
        elif op == "brightness":
            layers.append(RandomBrightnessFactor(cfg.brightness, seed=seed, name="brightness"))
        elif op == "contrast":
            layers.append(keras.layers.RandomContrast(
                cfg.contrast, value_range=(0, PIXEL_MAX), seed=seed, name="contrast"))
        elif op in _AMOUNT_OPS:
            layer_cls, field = _AMOUNT_OPS[op]
            layers.append(layer_cls(getattr(cfg, field), seed=seed, name=op))
    return layers


_AMOUNT_OPS: dict[str, tuple[type, str]] = {
    "crop": (RandomResizedCrop, "crop"), "gamma": (RandomGamma, "gamma"),
    "blur": (RandomBlur, "blur"), "noise": (RandomNoise, "noise")}


def build_augmenter(cfg: AugmentConfig | None) -> keras.Sequential:
    """Build the augmentation model for a config (the one builder: preview and training).

    Call it as ``augmenter(images, training=True)`` on float32 [0, 255] images of shape
    (H, W, C) or (B, H, W, C); it works eagerly and inside ``tf.data`` maps. Random draws
    are per image. Build a fresh one per dataset/preview to restart the seeded streams.

    Args:
        cfg: the config; None or a config with no op gives a clip-only model.

    Returns:
        A ``keras.Sequential`` of seeded preprocessing layers ending in a clip to [0, 255].
    """
    cfg = cfg or AugmentConfig()
    ops = _op_layers(cfg, in_one_of=cfg.one_of)
    if cfg.one_of and ops:
        ops = [OneOf(ops, seed=cfg.seed, name="one_of")]
    return keras.Sequential([*ops, ClipPixels(name="clip")], name="augment")


def augment_preview(image: np.ndarray, cfg: AugmentConfig, n: int) -> list[np.ndarray]:
    """Return ``n`` augmented variants of one image, deterministic for ``cfg.seed``.

    Args:
        image: uint8 (or [0, 255] float) array of shape (H, W) or (H, W, C).
        cfg: the augmentation to preview.
        n: how many variants.

    Returns:
        ``n`` uint8 arrays with the input's shape.

    Raises:
        ConfigError: ``n`` < 1 or the image is not 2-D/3-D.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1. Received: n={n}")
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ConfigError(f"image must be HxW or HxWxC. Received: shape={arr.shape}")
    batch = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float32)
    batch = np.repeat(batch[None], n, axis=0)
    out = keras.ops.convert_to_numpy(build_augmenter(cfg)(batch, training=True))
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return [variant.reshape(arr.shape) for variant in out]
