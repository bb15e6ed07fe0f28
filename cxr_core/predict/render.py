"""Saliency maps rendered for people: colored overlays and the shortcut warning.

Keras-free (numpy and PIL only), so pages and the CLI can draw and check maps without importing
TensorFlow. :mod:`cxr_core.predict.saliency` computes the maps: (H, W) float32 arrays in [0, 1].

* :func:`overlay` blends a colored map over an image (the picture; :func:`resize_maps` fits the
  map to it).
* :func:`heat_outside_center`, :func:`heat_density_outside` and :func:`shortcut_warning` flag
  maps whose heat lies on markers, text or borders rather than the chest (a known shortcut in the
  Kermany dataset).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from cxr_core.core.errors import ConfigError

COLORMAPS = ("jet", "inferno")
# matplotlib's inferno sampled at 11 evenly spaced stops (0, 0.1, ..., 1), RGB 0-255.
_INFERNO_STOPS = np.array(
    [
        (0, 0, 4), (22, 11, 57), (66, 10, 104), (106, 23, 110), (147, 38, 103), (188, 55, 84),
        (221, 81, 58), (243, 120, 25), (252, 165, 10), (246, 215, 70), (252, 255, 164),
    ],
    dtype=np.float32,
)


# Resizing


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps; a no-op when the size already matches."""
    if maps.shape[1:] == (height, width):
        return maps
    bilinear = Image.Resampling.BILINEAR
    # A 2-D float32 array becomes a PIL "F" image: resizing keeps the float values.
    resized = [
        np.asarray(Image.fromarray(m.astype(np.float32)).resize((width, height), bilinear))
        for m in maps
    ]
    return np.stack(resized).astype(np.float32)


# Rendering


def _colorize(heatmap: np.ndarray, colormap: str) -> np.ndarray:
    """Map [0, 1] values to RGB floats in [0, 255] with a numpy lookup (no matplotlib)."""
    if colormap == "jet":
        # The classic piecewise-linear jet: blue -> cyan -> yellow -> red.
        rgb = [np.clip(1.5 - np.abs(4.0 * heatmap - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
        return np.stack(rgb, axis=-1) * 255.0
    stops = np.linspace(0.0, 1.0, len(_INFERNO_STOPS))
    return np.stack([np.interp(heatmap, stops, _INFERNO_STOPS[:, c]) for c in range(3)], axis=-1)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """An (H, W), (H, W, 1) or (H, W, 3) image as float RGB in [0, 255]."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ConfigError(
            "Expected an (H, W), (H, W, 1) or (H, W, 3) image. "
            f"Received: image.shape={np.shape(image)}"
        )
    return np.clip(np.nan_to_num(img.astype(np.float32)), 0.0, 255.0)


def overlay(
    image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, colormap: str = "jet"
) -> np.ndarray:
    """Blend a colored heatmap over an image.

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3) image, uint8 or float in [0, 255].
        heatmap: 2-D map in [0, 1]; resized (bilinear) to the image when the sizes differ.
        alpha: Heatmap weight: 0 returns the image, 1 the colored map.
        colormap: One of :data:`COLORMAPS`.

    Returns:
        (H, W, 3) uint8 RGB picture.

    Raises:
        ConfigError: On a bad alpha, colormap or array shape.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"Expected alpha in [0, 1]. Received: alpha={alpha}")
    if colormap not in COLORMAPS:
        raise ConfigError(f"Expected colormap in {COLORMAPS}. Received: colormap={colormap!r}")
    rgb = _as_rgb(image)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ConfigError(f"Expected a 2-D heatmap. Received: heatmap.shape={np.shape(heatmap)}")
    heat = resize_maps(heat[None], *rgb.shape[:2])[0]
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    blended = (1.0 - alpha) * rgb + alpha * _colorize(heat, colormap)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)



# Shortcut checks
#
# Defaults tuned on real films (100 from chest_xray_224/train, maps of the predicted class from
# the shipped 128 px demo model). The lungs reach well beyond the central 60% of these films, and
# the outer ring of a 60% box is 64% of the area, so "more than half the heat outside the
# central 60%" fired on 97-100% of the real maps and on a uniform one. The chest region is
# therefore the central 75% of width and height, and the warning compares heat *density*
# outside vs inside: a uniform map scores 0.5 and never warns; SHORTCUT_THRESHOLD = 0.7 means
# the outer ring is more than 2.3x as dense as the centre (then about two thirds of all heat lies
# in a ring that is 44% of the image). On those films it fired for 1 of 100 Grad-CAM maps and
# for none of the Grad-CAM++ (100), Score-CAM (40) or SmoothGrad (40) maps.
CENTER_FRACTION = 0.75
SHORTCUT_THRESHOLD = 0.7


def _clean_heat(heatmap: np.ndarray, center_fraction: float) -> np.ndarray:
    if not 0.0 < center_fraction <= 1.0:
        raise ConfigError(
            f"Expected center_fraction in (0, 1]. Received: center_fraction={center_fraction}"
        )
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2:
        raise ConfigError(f"Expected a 2-D heatmap. Received: heatmap.shape={np.shape(heatmap)}")
    return np.clip(np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)


def _inside_outside(heat: np.ndarray, center_fraction: float) -> tuple[float, float, int, int]:
    """(heat inside, heat outside, pixels inside, pixels outside) of the central box."""
    (top, bottom), (left, right) = (_center_span(n, center_fraction) for n in heat.shape)
    inside = float(heat[top:bottom, left:right].sum())
    n_inside = (bottom - top) * (right - left)
    return inside, float(heat.sum()) - inside, n_inside, heat.size - n_inside


def heat_outside_center(
    heatmap: np.ndarray, *, center_fraction: float = CENTER_FRACTION
) -> float:
    """Fraction of a map's total heat that lies outside the central chest region.

    The central region is a centered box covering ``center_fraction`` of the width and of the
    height. A uniform map gives ``1 - center_fraction**2`` (0.4375 at the default).

    Args:
        heatmap: 2-D non-negative map (negative and non-finite values count as 0).
        center_fraction: Box side as a fraction of the image side, in (0, 1].

    Returns:
        A value in [0, 1]; 0.0 for a map with no heat.

    Raises:
        ConfigError: On a bad fraction or a map that is not 2-D.
    """
    inside, outside, _, _ = _inside_outside(_clean_heat(heatmap, center_fraction), center_fraction)
    total = inside + outside
    return 0.0 if total <= 0.0 else float(np.clip(outside / total, 0.0, 1.0))


def heat_density_outside(
    heatmap: np.ndarray, *, center_fraction: float = CENTER_FRACTION
) -> float:
    """Heat density outside the central region relative to inside, as a share in [0, 1].

    ``d_out / (d_out + d_in)`` with ``d`` the mean heat per pixel of each region: 0.5 for a
    uniform map whatever the box size, 1.0 when all heat is outside, 0.0 when all is inside.

    Args:
        heatmap: 2-D non-negative map (negative and non-finite values count as 0).
        center_fraction: Box side as a fraction of the image side, in (0, 1].

    Returns:
        A value in [0, 1]; 0.0 for a map with no heat or a box covering the whole map.

    Raises:
        ConfigError: On a bad fraction or a map that is not 2-D.
    """
    heat = _clean_heat(heatmap, center_fraction)
    inside, outside, n_inside, n_outside = _inside_outside(heat, center_fraction)
    if n_outside == 0 or inside + outside <= 0.0:
        return 0.0
    d_in, d_out = inside / n_inside, outside / n_outside
    return float(np.clip(d_out / (d_in + d_out), 0.0, 1.0))


def _center_span(size: int, fraction: float) -> tuple[int, int]:
    """Start and end of a centered span covering ``fraction`` of ``size`` (at least 1 pixel)."""
    length = max(1, int(round(size * fraction)))
    start = (size - length) // 2
    return start, start + length


def shortcut_warning(
    heatmap: np.ndarray,
    threshold: float = SHORTCUT_THRESHOLD,
    *,
    center_fraction: float = CENTER_FRACTION,
) -> str | None:
    """A warning when most of a map's heat lies outside the central chest region.

    Warns when :func:`heat_density_outside` exceeds ``threshold``, so a uniform map (0.5)
    never warns and a map on a corner marker (1.0) always does.

    Args:
        heatmap: 2-D map in [0, 1].
        threshold: Density share above which to warn, in [0, 1] (0.7: the outside is more than
            2.3x as dense as the inside).
        center_fraction: See :func:`heat_outside_center`.

    Returns:
        The message, or None when the heat is mostly central.

    Raises:
        ConfigError: On a bad threshold or fraction.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"Expected threshold in [0, 1]. Received: threshold={threshold}")
    share = heat_density_outside(heatmap, center_fraction=center_fraction)
    if share <= threshold:
        return None
    outside = heat_outside_center(heatmap, center_fraction=center_fraction)
    ratio = share / (1.0 - share) if share < 1.0 else None
    dense = "with none inside" if ratio is None else f"{ratio:.1f}x as dense as inside"
    return (
        f"{outside:.0%} of the saliency lies outside the central {center_fraction:.0%} of the "
        f"image ({dense}; warning above {threshold / (1.0 - threshold):.1f}x). The model may be "
        "looking at markers, text or borders instead of the lungs, a known shortcut in this "
        "dataset: check the image and consider cropping or masking before trusting this "
        "prediction."
    )
