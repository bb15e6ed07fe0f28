"""Loading weights into built models: ImageNet files (Keras cache or download), earlier runs'
``.keras`` files, Keras 3 ``.weights.h5`` and legacy Keras 2 ``.h5`` files (CheXNet, ...).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import h5py
import keras
import numpy as np

from cxr_core.core.errors import ModelError
from cxr_core.models.h5safe import check_h5
from cxr_core.models.layers import head_layers, load_model
from cxr_core.models.specs import TORCH_STD, WEIGHT_SUFFIXES, ModelConfig, ModelSpec, WeightsReport

log = logging.getLogger(__name__)


def _efficientnet_fixup(base: keras.Model) -> None:
    """Reproduces Keras' EfficientNet ImageNet graph in a model built with ``weights=None``.

    With ``weights="imagenet"`` Keras adds ``Rescaling(1/sqrt(std))`` after the stem
    Normalization (tensorflow#49930). Scaling that layer's variance by ``std`` is the same map,
    (x - mean) / sqrt(var * std), without a layer that only exists for ImageNet weights.
    """
    norm = next(layer for layer in base.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance, count = norm.get_weights()
    norm.set_weights([mean, variance * np.asarray(TORCH_STD, variance.dtype), count])
    norm.finalize_state()  # the layer caches mean/variance tensors; refresh them


IMAGENET_FIXUPS: dict[str, Callable[[keras.Model], None]] = {"efficientnet": _efficientnet_fixup}


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    """The Keras cache folder for weights: ``$KERAS_HOME/models`` (default ``~/.keras/models``).

    Read at call time: Keras itself reads ``KERAS_HOME`` once, at import.
    """
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "models"


def imagenet_weights_path(spec: ModelSpec, image_size: int) -> Path:
    """The ImageNet weights file for ``spec``, from the Keras cache or downloaded into it.

    A file already in the cache is used as is (no download, no hash check). A missing one is
    downloaded with ``keras.utils.get_file`` (the download keras.applications does, hash
    checked). There is no random-weights fallback.

    Raises:
        ModelError: The spec has no ImageNet weights, or the file is missing and the download
            failed; the message names the file, its URL and the folder to put it in.
    """
    if spec.imagenet is None:
        raise ModelError(f"'{spec.name}' has no ImageNet weights. Received: weights='imagenet'")
    file_name, url = spec.imagenet.resolve(image_size)
    folder = keras_cache_dir()
    cached = folder / file_name
    if cached.is_file():
        return cached
    # No socket pre-check: it would ignore HTTP(S)_PROXY, which urllib (get_file) honours.
    try:
        got = keras.utils.get_file(
            file_name, url, cache_dir=str(folder.parent), cache_subdir="models",
            file_hash=spec.imagenet.md5,
        )
    except Exception as exc:  # get_file re-raises network failures as bare Exception
        raise ModelError(
            f"ImageNet weights for '{spec.name}' are not in the Keras cache and could not be "
            f"downloaded ({exc}). Expected file: {file_name}. Download it from {url} and put it "
            f"in {folder} (set KERAS_HOME to use another cache folder), or use weights=None."
        ) from exc
    return Path(got)


def weights_file(spec: ModelSpec, cfg: ModelConfig) -> Path | None:
    """The file ``cfg.weights`` names (ImageNet: from the Keras cache or downloaded)."""
    w = cfg.weights
    if w is None:
        return None
    if w.startswith("run:"):
        raise ModelError(
            f"weights={w!r} must be resolved to that run's .keras file by the caller before "
            "building (cxr_core.models.graph cannot see runs)."
        )
    if w == "imagenet":
        return imagenet_weights_path(spec, cfg.image_size)
    from cxr_core.core.data_roots import check_weights

    check_weights(w)  # restricted data roots: a file under them, models/ or CXR_HOME only
    path = Path(w).expanduser()
    if not path.is_file():
        raise ModelError(
            f"Weights file not found; expected an existing file. Received: weights={w}"
        )
    return path


def load_weights_file(
    model: keras.Model, base: keras.Model | None, spec: ModelSpec, image_size: int, path: Path
) -> WeightsReport:
    # The family's ImageNet file counts as "imagenet" wherever it lies (same graph fix-ups).
    if spec.imagenet is not None and path.name == spec.imagenet.resolve(image_size)[0]:
        if base is None:  # vgg_sep: only its VGG16-compatible blocks can take the file
            return load_vgg16_first_blocks(model, path)
        return _load_imagenet_file(model, base, spec, path)
    return load_weights(model, path, base=base)


def _load_imagenet_file(
    model: keras.Model, base: keras.Model, spec: ModelSpec, path: Path
) -> WeightsReport:
    """Loads a keras.applications no-top file the way keras.applications does (layer order)."""
    check_h5(path)
    try:
        base.load_weights(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"{path} does not fit '{spec.name}' (expected the keras.applications no-top file "
            f"{path.name}; a partial download? delete it and try again): {exc}"
        ) from exc
    if spec.imagenet_fixup is not None:
        IMAGENET_FIXUPS[spec.imagenet_fixup](base)
    n = len(_weighted(base.layers))
    return WeightsReport(str(path), "imagenet", n, len(_weighted(model.layers)),
                         tuple(layer.name for layer in head_layers(model) if layer.weights))


def load_weights(
    model: keras.Model, path: str | os.PathLike[str], *, base: keras.Model | None = None
) -> WeightsReport:
    """Loads weights from a file into a built model, layer by layer where they fit.

    * ``.keras`` (a previous run): copied by layer name where shapes match (transfer).
    * legacy ``.h5`` / ``.hdf5`` (keras.applications files, CheXNet, Keras 2 saves): in layer
      order into ``base`` when the layouts agree, otherwise by layer name (Keras 2 ``a/b``
      names match our ``a_b``) where shapes match; a mismatching head (e.g. CheXNet's 14
      outputs) is skipped, so the backbone is taken.
    * ``.weights.h5`` (Keras 3): the same graph as is, else with mismatching layers skipped.

    Args:
        model: A built model.
        path: The weights file.
        base: The keras.applications part of ``model``, if any (for layer-order files).

    Returns:
        What was loaded.

    Raises:
        ModelError: The file is missing, unreadable, or no layer matches.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Weights file not found; expected an existing file. Received: {p}")
    name = p.name.lower()
    if name.endswith(".keras"):
        src = load_model(p)
        report = _assign_by_name(model, _model_weights(src), str(p), match_classes=True)
    elif name.endswith(".weights.h5"):
        report = _load_keras3_weights(model, p, base)
    elif name.endswith((".h5", ".hdf5")):
        report = _load_legacy_h5(model, p, base)
    else:
        raise ModelError(f"Unknown weights file type; expected {WEIGHT_SUFFIXES}. Received: {p}")
    if report.loaded == 0:
        raise ModelError(
            f"No layer of '{model.name}' matched {p}: expected weights of the same architecture "
            "(layer names and shapes), a keras.applications file or a previous run's .keras."
        )
    return report


def load_vgg16_first_blocks(
    model: keras.Model, vgg16_weights_path: str | os.PathLike[str]
) -> WeightsReport:
    """Copies VGG16's ``block1_conv1..block2_conv2`` weights into the same-named layers.

    Args:
        model: A model with those four layers (``vgg_sep``).
        vgg16_weights_path: A VGG16 legacy ``.h5`` (the keras.applications file, with or
            without top) or a ``.keras`` VGG16 model.

    Returns:
        What was loaded (4 layers).

    Raises:
        ModelError: The file lacks one of the four layers or their shapes differ.
    """
    wanted = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")
    p = Path(vgg16_weights_path)
    if not p.is_file():
        raise ModelError(f"VGG16 weights file not found. Received: {p}")
    if p.name.lower().endswith(".keras"):
        source = _model_weights(load_model(p))
    else:
        source = dict(_read_legacy_h5(p))
    for name in wanted:
        target = _get_layer(model, name)
        arrays = source.get(name, [])
        if target is None or not _shapes_match(target, arrays):
            raise ModelError(
                f"{p} cannot fill '{name}': expected VGG16 weights with {name} shapes "
                f"{[tuple(w.shape) for w in target.weights] if target else 'n/a'}; "
                f"received {[a.shape for a in arrays] or 'no such layer'}."
            )
    for name in wanted:
        _set_layer_weights(_get_layer(model, name), source[name])
    return WeightsReport(str(p), "by name (VGG16 blocks 1-2)", len(wanted),
                         len(_weighted(model.layers)),
                         tuple(layer.name for layer in _weighted(model.layers)
                               if layer.name not in wanted))


def _load_legacy_h5(model: keras.Model, p: Path, base: keras.Model | None) -> WeightsReport:
    entries = _read_legacy_h5(p)
    if base is not None and _assign_in_order(base, entries):
        return WeightsReport(str(p), "layer order", len(_weighted(base.layers)),
                             len(_weighted(model.layers)),
                             tuple(layer.name for layer in head_layers(model) if layer.weights))
    # Keras 2 named nested layers "conv1/conv"; Keras 3 names them "conv1_conv".
    by_name = {name.replace("/", "_"): arrays for name, arrays in entries}
    return _assign_by_name(model, {k: (None, v) for k, v in by_name.items()}, str(p))


def _load_keras3_weights(model: keras.Model, p: Path, base: keras.Model | None) -> WeightsReport:
    check_h5(p)  # Keras reads every dataset through h5py: nothing outside the file
    total = len(_weighted(model.layers))
    # Taken first: a failed strict load has already assigned every layer that fitted.
    before = {layer.name: layer.get_weights() for layer in _weighted(model.layers)}
    # Keras 3 keys these files by graph position and layer type, not by layer name.
    for target in (model, base):
        if target is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Keras warns per layer before it raises
                target.load_weights(str(p))
        except (ValueError, KeyError) as exc:
            log.debug("strict load of %s into %s failed: %s", p, target.name, exc)
            continue
        return WeightsReport(str(p), "structure", len(_weighted(target.layers)), total)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per skipped layer; we report them
            model.load_weights(str(p), skip_mismatch=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"Cannot read {p} as Keras 3 weights for '{model.name}': {exc}") from exc
    # Counted by change: values equal to a fresh build's (e.g. untrained BatchNorm) count as
    # skipped, so this undercounts for never-trained sources.
    skipped = tuple(
        layer.name
        for layer in _weighted(model.layers)
        if all(np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))
    )
    return WeightsReport(
        str(p), "structure, mismatches skipped", total - len(skipped), total, skipped
    )


def _read_legacy_h5(path: Path) -> list[tuple[str, list[np.ndarray]]]:
    """``[(layer name, arrays)]`` in file order from a Keras 2-layout ``.h5`` (weights or model).

    The file is checked first (:func:`cxr_core.models.h5safe.check_h5`): no external storage,
    virtual dataset or link, declared sizes capped.
    """
    check_h5(path)
    try:
        with h5py.File(path, "r") as f:
            # A full-model .h5 (model.save) nests the weights under "model_weights".
            full_model = "layer_names" not in f.attrs and "model_weights" in f
            group = f["model_weights"] if full_model else f
            out = []
            for name in _h5_attr_list(group, "layer_names"):
                g = group[name]
                out.append((name, [np.asarray(g[w]) for w in _h5_attr_list(g, "weight_names")]))
            return out
    except (OSError, KeyError) as exc:
        raise ModelError(
            f"Cannot read {path} as a Keras .h5 weights file (expected 'layer_names'): {exc}"
        ) from exc


def _h5_attr_list(group: h5py.Group, name: str) -> list[str]:
    """An h5 string-list attribute; Keras splits long ones into ``name0``, ``name1``, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
        if not values and name == "layer_names":  # weight_names may be legitimately empty
            raise KeyError(f"no '{name}' attribute")
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _assign_in_order(base: keras.Model, entries: list[tuple[str, list[np.ndarray]]]) -> bool:
    """keras.applications' own layout: weighted layers in order. Loads only if all shapes fit."""
    targets = _weighted(base.layers)
    sources = [arrays for _, arrays in entries if arrays]
    if len(targets) != len(sources):
        return False
    if not all(_shapes_match(t, s) for t, s in zip(targets, sources)):
        return False
    for target, arrays in zip(targets, sources):
        _set_layer_weights(target, arrays)
    return True


def _model_weights(src: keras.Model) -> dict[str, tuple[str | None, list[np.ndarray]]]:
    return {
        layer.name: (type(layer).__name__, layer.get_weights()) for layer in _weighted(src.layers)
    }


def _assign_by_name(
    model: keras.Model,
    source: Mapping[str, tuple[str | None, list[np.ndarray]]],
    label: str,
    *,
    match_classes: bool = False,
) -> WeightsReport:
    """Copies weights by layer name where shapes match.

    With ``match_classes``, layers left over on both sides are then paired when exactly one
    layer of a type and weight shapes remains on each side: auto-named keras.applications
    layers (EfficientNet's stem ``normalization_N``) get a new number in every build.
    """
    targets = _weighted(model.layers)
    used, matched, left = set(), [], []
    for layer in targets:
        entry = source.get(layer.name)
        if entry is not None and _shapes_match(layer, entry[1]):
            _set_layer_weights(layer, entry[1])
            used.add(layer.name)
            matched.append(layer.name)
        else:
            left.append(layer)
    if match_classes and left:
        rest = {k: v for k, v in source.items() if k not in used}
        for layer in list(left):
            key = _layer_signature(layer)
            mine = [t for t in left if _layer_signature(t) == key]
            theirs = [k for k, (cls, arr) in rest.items()
                      if _signature(cls, [a.shape for a in arr]) == key]
            if len(mine) == 1 and len(theirs) == 1:
                _set_layer_weights(layer, rest.pop(theirs[0])[1])
                matched.append(layer.name)
                left.remove(layer)
    return WeightsReport(label, "by name", len(matched), len(targets), tuple(t.name for t in left))


def _signature(cls: str | None, shapes: Sequence[tuple[int, ...]]) -> tuple:
    return (cls, tuple(tuple(int(d) for d in s) for s in shapes))


def _layer_signature(layer: keras.layers.Layer) -> tuple:
    return _signature(type(layer).__name__, [tuple(w.shape) for w in layer.weights])


def _weighted(layers: Sequence[keras.layers.Layer]) -> list[keras.layers.Layer]:
    return [layer for layer in layers if layer.weights and not isinstance(layer, keras.Model)]


def _shapes_match(layer: keras.layers.Layer, arrays: Sequence[np.ndarray]) -> bool:
    shapes = [tuple(w.shape) for w in layer.weights]
    return len(shapes) == len(arrays) and all(s == tuple(a.shape) for s, a in zip(shapes, arrays))


def _set_layer_weights(layer: keras.layers.Layer, arrays: Sequence[np.ndarray]) -> None:
    layer.set_weights(list(arrays))
    if hasattr(layer, "finalize_state"):  # Normalization caches tensors made from its variables
        layer.finalize_state()


def _get_layer(model: keras.Model, name: str) -> keras.layers.Layer | None:
    return next((layer for layer in model.layers if layer.name == name), None)
