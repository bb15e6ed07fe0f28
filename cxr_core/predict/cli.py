"""``python -m cxr_core predict``: predict image files, optionally writing saliency overlays.

The same calls the Predict page makes: :func:`cxr_core.models.refs.load_model_ref`,
:func:`cxr_core.predict.inference.predict_batch`, then :mod:`cxr_core.predict.explain` for each map; overlays are
written under generated names (never the client's file name).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cxr_core.core.errors import ConfigError
from cxr_core.core.settings import get_settings
from cxr_core.models.refs import load_model_ref
from cxr_core.predict.explain import display_pixels, make_explainer, overlay_png, saliency_map
from cxr_core.predict.inference import ImageInput, predict_batch
from cxr_core.predict.render import shortcut_warning
from cxr_core.storage import Database


def predict_cli(model_ref: str, images: Sequence[str], *, saliency: str | None = None,
                out_dir: str | Path | None = None, db: Database | None = None) -> dict:
    """``python -m cxr_core predict``: predict files, optionally writing saliency overlays.

    Args:
        model_ref: "default", "run:ID", "ID" or a .keras path.
        images: image paths (a bad file is reported in "errors"; the others still run).
        saliency: one of :data:`cxr_core.predict.saliency.METHODS`, or None.
        out_dir: folder for the overlay PNGs (generated names); default
            ``<CXR_HOME>/saliency``.
        db: the database (opened from the settings for run references).

    Returns:
        ``{"predictions": [{"file", "label", "probabilities", "threshold", "saliency",
        "saliency_warning"}], "errors": [{"file", "error"}], ...}``.

    Raises:
        ConfigError: unknown saliency method.
        ModelError: the model cannot be loaded or explained.
    """
    from cxr_core.predict.saliency import METHODS

    if saliency is not None and saliency not in METHODS:
        raise ConfigError(f"saliency must be one of {METHODS}. Received: saliency={saliency!r}")
    loaded = load_model_ref(model_ref, db=db)
    result = predict_batch(loaded, [ImageInput(str(p), path=str(p)) for p in images])
    out = result.to_json()
    if saliency is None:
        return out
    folder = Path(out_dir) if out_dir is not None else get_settings().home / "saliency"
    folder.mkdir(parents=True, exist_ok=True)
    explainer = make_explainer(loaded)
    tag = saliency.replace("+", "p")
    for row, pred in zip(out["predictions"], result.predictions):
        heat = saliency_map(explainer, pred.pixels, saliency, pred.class_index)
        path = folder / f"{pred.index:04d}-{pred.sha256[:16]}-{tag}.png"
        path.write_bytes(overlay_png(display_pixels(pred.source), heat))
        row["saliency"], row["saliency_warning"] = str(path), shortcut_warning(heat)
    return out
