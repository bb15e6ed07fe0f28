"""Predict on uploaded or indexed images, explain the decision, send images to review.

The one predict path of the Predict page, ``python -m cxr_core predict`` and the benchmark:

    bytes or path -(the ONE image loader)-> model-size uint8 -(model_store)-> probabilities
        -(decide at the model's stored operating point)-> label

Each file is decoded on its own: a bad file (not an image, empty, truncated, animated,
a decompression bomb, DICOM without pixels, too many bytes) becomes a :class:`PredictError`
with a one-line message and the rest of the batch still runs. Saliency returns arrays
(:func:`saliency_map`); rendering is separate (:func:`overlay_png`).

Privacy: a client's file name is only ever shown, never used as a storage path. An upload sent
to review is stored as ``<uploads_dir>/<sha256><suffix>``; a DICOM upload is stored as a PNG of
its pixels only, so no DICOM header field (patient data) is written anywhere.

The default model is exported from a finished training run by :func:`export_default`
(``python -m cxr_core.predict export-default RUN_ID``; see ``models/default/README.md``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_core.csv_safe import safe_cell
from cxr_core import images as image_io
from cxr_core.config import get_settings
from cxr_core.errors import ConfigError, CxrError, ImageLoadError, ModelError
from cxr_core import model_store
from cxr_core.model_store import (CARD_NAME, DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, NO_THRESHOLD,
                                  RUN_MODEL_NAME, LoadedModel, decide)
from cxr_core.storage import Database

# Same limit as .streamlit/config.toml's maxUploadSize (50 MB): also applied to CLI paths.
MAX_UPLOAD_BYTES = 50 * 2**20
DISPLAY_SIZE = 512  # longest side of the picture an overlay is drawn on
# cxr_core.saliency.METHODS with display names (kept here so importing this module, and the
# page, does not import keras before a model is needed).
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++",
                "scorecam": "Score-CAM (faster)", "smoothgrad": "SmoothGrad"}
DEFAULT_MAX_MB = 15.0  # the shipped demo model must stay small enough for the repository
DATA_LICENCE = {
    "dataset": "Chest X-Ray Images (Pneumonia), Guangzhou Women and Children's Medical Center",
    "citation": "Kermany DS, Goldbaum M, Cai W, et al. Identifying Medical Diagnoses and "
                "Treatable Diseases by Image-Based Deep Learning. Cell 172(5):1122-1131, 2018. "
                "doi:10.1016/j.cell.2018.02.010",
    "source": "Mendeley Data, doi:10.17632/rscbjbr9sj.2",
    "licence": "CC BY 4.0",
}
_Progress = Callable[[int, int], None]


# -- Inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: holds raw bytes
class ImageInput:
    """One image to predict: uploaded bytes, a file on disk, or an indexed dataset image.

    Attributes:
        name: what the user called it (client file name or path); shown, never stored as a path.
        data: the raw bytes (uploads), or None to read ``path``.
        path: a file on disk, or None.
        image_id: the indexed image's id when picked from a dataset (for the review queue).
    """

    name: str
    data: bytes | None = None
    path: str | None = None
    image_id: int | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.path is None):
            raise ConfigError("an ImageInput needs exactly one of data or path. "
                              f"Received: name={self.name!r}, data and path both "
                              f"{'set' if self.data is not None else 'missing'}")

    def read(self, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
        """The file's bytes, refusing files over ``max_bytes`` before reading them.

        Raises:
            ImageLoadError: the file cannot be read or is too large.
        """
        try:
            size = len(self.data) if self.data is not None else os.stat(self.path).st_size
            if size > max_bytes:
                raise ImageLoadError(f"{self.name}: file too large ({size / 2**20:.1f} MB; "
                                     f"at most {max_bytes / 2**20:.0f} MB)")
            return self.data if self.data is not None else Path(self.path).read_bytes()
        except OSError as exc:
            raise ImageLoadError(f"{self.name}: cannot read file ({exc.strerror or exc})") from exc


def dataset_inputs(root: str | Path, records: Iterable[Any]) -> list[ImageInput]:
    """Inputs for indexed images (``ImageRecord``s of one dataset rooted at ``root``).

    Array datasets (PneumoniaMNIST ``.npz``, relpath ``"npz:<split>:<i>"``) become PNG bytes.
    """
    records = list(records)
    arrays = [r for r in records if str(r.relpath).startswith("npz:")]
    if arrays:
        from cxr_core.pipeline import npz_record_images

        pixels = dict(zip((r.relpath for r in arrays), npz_record_images(root, arrays)))
    out = []
    for rec in records:
        if str(rec.relpath).startswith("npz:"):
            out.append(ImageInput(rec.relpath, data=_png_bytes(pixels[rec.relpath]),
                                  image_id=rec.id))
        else:
            out.append(ImageInput(rec.relpath, path=str(Path(root) / rec.relpath),
                                  image_id=rec.id))
    return out


def _png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.squeeze(pixels))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- Results --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: holds arrays
class Prediction:
    """The model's output for one image.

    Attributes:
        index: position in the batch.
        source: the input it came from.
        label: the decided class (threshold on P(positive) for binary models, else argmax).
        probabilities: class name → probability, in the model's label order.
        class_index: index of ``label`` in the model's labels (the class saliency explains).
        sha256: hash of the file's bytes.
        pixels: (S, S, C) uint8: exactly what the model saw.
        dicom: whether the file was DICOM.
    """

    index: int
    source: ImageInput
    label: str
    probabilities: dict[str, float]
    class_index: int
    sha256: str
    pixels: np.ndarray
    dicom: bool = False


@dataclass(frozen=True)
class PredictError:
    """A file that could not be predicted, with a one-line reason."""

    index: int
    source: ImageInput
    error: str


@dataclass(frozen=True, eq=False)
class BatchResult:
    """Predictions and per-file errors of one batch, with the model's operating point."""

    model_ref: str
    labels: tuple[str, ...]
    threshold: float | None  # binary operating point on P(labels[1]); None: argmax
    threshold_source: str
    predictions: tuple[Prediction, ...]
    errors: tuple[PredictError, ...]
    seconds: float

    def rows(self) -> list[dict]:
        """One row per input, in input order: file, label, one probability per class, error."""
        rows = {p.index: {"file": p.source.name, "label": p.label,
                          **{f"p_{k}": round(v, 6) for k, v in p.probabilities.items()},
                          "threshold": self.threshold, "error": ""} for p in self.predictions}
        rows.update({e.index: {"file": e.source.name, "label": "",
                               **{f"p_{k}": None for k in self.labels},
                               "threshold": self.threshold, "error": e.error}
                     for e in self.errors})
        return [rows[i] for i in sorted(rows)]

    def to_csv(self) -> str:
        """The rows as CSV (cells that a spreadsheet would run as a formula are quoted)."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: safe_cell(v) for k, v in row.items()})
        return buf.getvalue()

    def to_json(self) -> dict:
        """The CLI's object (without saliency paths)."""
        return {"model": self.model_ref, "labels": list(self.labels),
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "predictions": [{"file": p.source.name, "label": p.label,
                                 "probabilities": p.probabilities, "threshold": self.threshold,
                                 "saliency": None} for p in self.predictions],
                "errors": [{"file": e.source.name, "error": e.error} for e in self.errors]}


# -- Predicting -----------------------------------------------------------------------------

def load_model(ref: str, db: Database | None = None) -> LoadedModel:
    """Load a model by reference ("default", "run:ID", "ID" or a .keras path).

    A thin name for :func:`cxr_core.model_store.load_model_ref` (the UI caches its result).

    Raises:
        ModelError: unknown reference or unreadable model.
    """
    return model_store.load_model_ref(ref, db=db)


def decode(item: ImageInput, size: int, channels: int, *,
           max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[np.ndarray, str, bool]:
    """Read and decode one input to what a model of ``size`` and ``channels`` sees.

    Returns:
        ((size, size, channels) uint8 pixels, sha256 of the bytes, whether it is DICOM).

    Raises:
        ImageLoadError: with a one-line message naming the file and the problem.
    """
    data = item.read(max_bytes)
    try:
        img = image_io.load_image(data, name=item.name, draft=size)
        pixels = image_io.to_array(img, size, channels)
    except ImageLoadError:
        raise
    except Exception as exc:  # a decoder bug on one hostile file must not end the batch
        raise ImageLoadError(f"{item.name}: cannot decode image ({type(exc).__name__}: {exc})") \
            from exc
    return pixels, hashlib.sha256(data).hexdigest(), image_io.is_dicom(data)


def predict_batch(loaded: LoadedModel, items: Sequence[ImageInput], *,
                  max_bytes: int = MAX_UPLOAD_BYTES, batch_size: int = 32,
                  progress: _Progress | None = None) -> BatchResult:
    """Predict every readable input; each unreadable one becomes an error, the rest go on.

    Args:
        loaded: from :func:`load_model` (carries the labels and the operating point).
        items: the inputs, in display order.
        max_bytes: larger files are refused before they are read.
        batch_size: images per forward pass.
        progress: called as ``progress(done, total)`` after each decoded file.

    Returns:
        The predictions (decided at the model's stored operating point) and the errors.
    """
    start = time.perf_counter()
    decoded, errors = [], []
    for i, item in enumerate(items):
        try:
            decoded.append((i, item, *decode(item, loaded.image_size, loaded.channels,
                                             max_bytes=max_bytes)))
        except ImageLoadError as exc:
            errors.append(PredictError(i, item, str(exc)))
        if progress is not None:
            progress(i + 1, len(items))
    predictions: list[Prediction] = []
    if decoded:
        probs = model_store.predict_probs(loaded, np.stack([d[2] for d in decoded]),
                                          batch_size=batch_size)
        for (i, item, pixels, sha, dicom), p, label in zip(decoded, probs,
                                                           decide(loaded, probs)):
            predictions.append(Prediction(
                i, item, label, {k: float(v) for k, v in zip(loaded.labels, p)},
                loaded.labels.index(label), sha, pixels, dicom))
    return BatchResult(loaded.ref, loaded.labels, loaded.threshold, loaded.threshold_source,
                       tuple(predictions), tuple(errors), time.perf_counter() - start)


def decision_text(result: BatchResult, prediction: Prediction) -> str:
    """One line saying how the label was decided (operating point and where it came from)."""
    if result.threshold is None:
        return f"**{prediction.label}**: the most probable of {len(result.labels)} classes."
    pos = result.labels[1]
    p = prediction.probabilities[pos]
    sign = "≥" if p >= result.threshold else "<"
    return (f"**{prediction.label}**: P({pos}) = {p:.3f} {sign} operating point "
            f"{result.threshold:.3f} ({result.threshold_source}).")


def no_operating_point(result: BatchResult) -> bool:
    """True when a binary model has no stored operating point (decisions use 0.5)."""
    return result.threshold_source == NO_THRESHOLD


# -- Saliency -------------------------------------------------------------------------------

def make_explainer(loaded: LoadedModel) -> Any:
    """A :class:`cxr_core.saliency.SaliencyExplainer` on the model's recorded saliency layer.

    Raises:
        ModelError: the model has no convolutional feature map to explain.
    """
    from cxr_core.saliency import SaliencyExplainer

    if loaded.saliency_layer is None:
        raise ModelError(f"{loaded.ref}: the model has no convolutional layer to explain; "
                         "expected a saliency_layer in its model card")
    return SaliencyExplainer(loaded.model, loaded.saliency_layer)


def class_choices(labels: Sequence[str], prediction: Prediction) -> list[tuple[int, str]]:
    """(class index, text) pairs to explain: the predicted class first, then the others."""
    first = (prediction.class_index, f"{labels[prediction.class_index]} (predicted)")
    return [first] + [(i, c) for i, c in enumerate(labels) if i != prediction.class_index]


def saliency_map(explainer: Any, pixels: np.ndarray, method: str, class_index: int, *,
                 fast: bool = False) -> np.ndarray:
    """A (S, S) float32 map in [0, 1] explaining ``class_index`` for one model-size image.

    Args:
        explainer: from :func:`make_explainer` (cached by the caller).
        pixels: (S, S, C) uint8 as in :attr:`Prediction.pixels`.
        method: one of :data:`cxr_core.saliency.METHODS`.
        class_index: index into the model's labels (binary: 1 = positive class).
        fast: fewer SmoothGrad samples / Score-CAM channels (CLI batches, tests).

    Raises:
        ConfigError: unknown method or class index.
    """
    options = {"smooth_samples": 8, "scorecam_max_n": 16} if fast else {}
    return explainer.explain(np.asarray(pixels, np.float32)[None], method, int(class_index),
                             **options)[0]


def display_pixels(item: ImageInput, max_side: int = DISPLAY_SIZE) -> np.ndarray:
    """The image as uint8 (H, W) or (H, W, 3) at most ``max_side`` a side, aspect kept.

    Raises:
        ImageLoadError: the file cannot be read.
    """
    img = image_io.load_image(item.read(), name=item.name, draft=max_side)
    img.thumbnail((max_side, max_side))
    return np.asarray(img)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4,
                colormap: str = "jet") -> bytes:
    """PNG bytes of the heatmap blended over the image (the map is resized to the image)."""
    from cxr_core.saliency_render import overlay

    return _png_bytes(overlay(image, heatmap, alpha=alpha, colormap=colormap))


def saliency_warning(heatmap: np.ndarray) -> str | None:
    """The shortcut warning of :func:`cxr_core.saliency_render.shortcut_warning` at its defaults."""
    from cxr_core.saliency_render import shortcut_warning

    return shortcut_warning(heatmap)


# -- Review ---------------------------------------------------------------------------------

def store_upload(item: ImageInput, *, uploads_dir: str | Path | None = None) -> str:
    """Store an upload by content hash; returns the hash (the review item's ``upload_sha256``).

    The file is ``<uploads_dir>/<sha256><suffix>``, never the client's name. DICOM is stored
    as a PNG of its decoded pixels only (no header field, so no patient data); the hash is
    that PNG's. Writing is atomic and idempotent.

    Raises:
        ImageLoadError: the upload cannot be read or decoded.
    """
    data = item.read()
    if image_io.is_dicom(data):
        data, suffix = _png_bytes(image_io.load_image(data, name=item.name)), ".png"
    else:
        suffix = _suffix(data, item.name)
    sha = hashlib.sha256(data).hexdigest()
    folder = Path(uploads_dir) if uploads_dir is not None else get_settings().uploads_dir
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha}{suffix}"
    if not target.is_file():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    return sha


def upload_path(sha256: str, *, uploads_dir: str | Path | None = None) -> Path | None:
    """The stored file of an upload hash, or None."""
    folder = Path(uploads_dir) if uploads_dir is not None else get_settings().uploads_dir
    return next(iter(sorted(folder.glob(f"{sha256}.*"))), None) if folder.is_dir() else None


def _suffix(data: bytes, name: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({exc})") from exc
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}" if fmt else ".img")


def send_to_review(db: Database, prediction: Prediction, *, model_ref: str, sent_by: str,
                   uploads_dir: str | Path | None = None) -> int:
    """Queue a predicted image with the model's output for clinician review.

    Indexed images are queued by id; uploads are first stored by content hash.

    Args:
        db: the database.
        prediction: the prediction shown.
        model_ref: the model that made it ("default", "run:ID" or a file path).
        sent_by: who sent it.
        uploads_dir: where uploads are stored (default: the settings' uploads folder).

    Returns:
        The review item's id.
    """
    from cxr_core.storage import reviews

    image_id = prediction.source.image_id
    sha = None if image_id is not None else store_upload(prediction.source,
                                                         uploads_dir=uploads_dir)
    return db.write(lambda s: reviews.send_to_review(
        session=s, image_id=image_id, upload_sha256=sha, source="predict", run_ref=model_ref,
        predicted=prediction.label, probs=list(prediction.probabilities.values()),
        sent_by=sent_by))


# -- Model choice ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelOption:
    """A model the Predict page can use."""

    ref: str  # "default" or "run:ID"
    title: str


def model_options(db: Database) -> list[ModelOption]:
    """The shipped default (when present), then finished runs with a model file, newest first."""
    from cxr_core.storage import evals

    out = []
    if (DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME).is_file():
        out.append(ModelOption("default", "Shipped demo model (default)"))
    runs_dir = get_settings().runs_dir
    with db.session() as s:
        briefs = evals.list_run_briefs(session=s, status="finished")
    for b in briefs:
        folders = [runs_dir / str(b.id)] + ([Path(b.artifact_dir)] if b.artifact_dir else [])
        if any((f / RUN_MODEL_NAME).is_file() for f in folders):
            out.append(ModelOption(f"run:{b.id}", f"{b.name} (run:{b.id})"))
    return out


# -- Command line ---------------------------------------------------------------------------

def predict_cli(model_ref: str, images: Sequence[str], *, saliency: str | None = None,
                out_dir: str | Path | None = None, db: Database | None = None) -> dict:
    """``python -m cxr_core predict``: predict files, optionally writing saliency overlays.

    Args:
        model_ref: "default", "run:ID", "ID" or a .keras path.
        images: image paths (a bad file is reported in "errors"; the others still run).
        saliency: one of :data:`cxr_core.saliency.METHODS`, or None.
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
    from cxr_core.saliency import METHODS

    if saliency is not None and saliency not in METHODS:
        raise ConfigError(f"saliency must be one of {METHODS}. Received: saliency={saliency!r}")
    loaded = load_model(model_ref, db)
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
        row["saliency"], row["saliency_warning"] = str(path), saliency_warning(heat)
    return out


# -- Exporting the shipped default model ----------------------------------------------------

def export_default(run_id: int, *, db: Database | None = None,
                   out_dir: str | Path = DEFAULT_MODELS_DIR,
                   max_mb: float = DEFAULT_MAX_MB) -> dict:
    """Export a finished run as the shipped demo model (``models/default``).

    Re-saves the run's ``best.keras`` without optimizer state as ``model.keras`` and writes
    ``model_card.json`` (the run's card with the data licence, the run's newest operating
    point, validation metrics, training time, and paths made relative to the repository) and
    ``README.md`` (the card for people).

    Args:
        run_id: a finished run with ``best.keras`` and ``model_card.json`` in its artifacts.
        db: the database of the run (for its status, timing and operating point).
        out_dir: destination folder.
        max_mb: refuse models larger than this (the repository's limit).

    Returns:
        The written card.

    Raises:
        ModelError: the run is not finished, has no model or card, or the model is too large.
    """
    from cxr_core.storage import open_db
    from cxr_core.storage import runs as run_store

    db = db or open_db()
    with db.session() as s:
        run = run_store.get_run(session=s, run_id=run_id)
    if run is None or run.status != "finished":
        raise ModelError(f"only a finished run can be exported. Received: run {run_id} is "
                         f"{'unknown' if run is None else run.status}")
    loaded = model_store.load_model_ref(f"run:{run_id}", db=db)
    if not loaded.card:
        raise ModelError(f"run {run_id} has no {CARD_NAME} in its artifacts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{DEFAULT_MODEL_NAME}"
    loaded.model.save(tmp)  # loaded with compile=False: no optimizer state (smaller file)
    size_mb = tmp.stat().st_size / 2**20
    if size_mb > max_mb:
        tmp.unlink()
        raise ModelError(f"run {run_id}'s model is {size_mb:.1f} MB; the shipped default must "
                         f"be at most {max_mb} MB")
    os.replace(tmp, out / DEFAULT_MODEL_NAME)
    card = _export_card(loaded, run, size_mb)
    (out / CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "README.md").write_text(card_markdown(card))
    return card


def _export_card(loaded: LoadedModel, run: Any, size_mb: float) -> dict:
    """The run's card made shippable: local ids moved under "exported_from", paths relative."""
    card = {k: v for k, v in loaded.card.items()
            if k not in ("run_id", "model_ref", "evaluation_id", "model_file")}
    op = dict(card.get("operating_point") or {})
    if loaded.threshold is not None:
        op["threshold"] = loaded.threshold
    seconds = (run.finished_at - run.started_at).total_seconds() \
        if run.started_at and run.finished_at else None
    cfg = dict(card.get("training_config") or {})
    if cfg.get("dataset"):
        cfg["dataset"] = _repo_relative(cfg["dataset"])
    dataset = dict(card.get("dataset") or {})
    if dataset.get("root"):
        dataset["root"] = _repo_relative(dataset["root"])
    dataset.pop("id", None)
    card.update(
        model_file=DEFAULT_MODEL_NAME, labels=list(loaded.labels),
        label_scheme=loaded.label_scheme, image_size=loaded.image_size,
        channels=loaded.channels, saliency_layer=loaded.saliency_layer, operating_point=op,
        recipe=cfg.get("recipe"), training_config=cfg, dataset=dataset,
        data_licence=DATA_LICENCE,
        exported_from={"run_id": run.id, "run_name": run.name,
                       "evaluation_id": loaded.card.get("evaluation_id"),
                       "training_wall_s": None if seconds is None else round(seconds),
                       "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "file_mb": round(size_mb, 2)})
    return card


def _repo_relative(path: str) -> str:
    """A path relative to the repository when it is absolute (the card is shipped)."""
    p = Path(path)
    return os.path.relpath(p, DEFAULT_MODELS_DIR.parents[1]) if p.is_absolute() else path


def card_markdown(card: dict) -> str:
    """A short human-readable model card (``models/default/README.md``)."""
    val = card.get("val_metrics") or {}
    op = card.get("operating_point") or {}
    lic = card.get("data_licence") or DATA_LICENCE
    cfg = card.get("training_config") or {}
    exp = card.get("exported_from") or {}
    counts = (card.get("dataset") or {}).get("counts") or {}
    minutes = f"{exp['training_wall_s'] / 60:.1f} min" if exp.get("training_wall_s") else "?"
    positive = (card.get("labels") or ["", "PNEUMONIA"])[-1]
    lines = [
        "# Demo model card (`models/default`)", "",
        "A small pneumonia classifier shipped so Predict works on a fresh clone. **Not a medical "
        "device**: a demo model trained from scratch on one public pediatric dataset.", "",
        "| | |", "|---|---|",
        f"| Labels | {', '.join(card.get('labels', []))} ({card.get('label_scheme', '?')}) |",
        f"| Architecture | `{card.get('model', '?')}` from the registry, {card.get('image_size')} "
        f"px, {card.get('channels')} channel(s), random init (no ImageNet weights) |",
        f"| Training | recipe `{cfg.get('recipe', '?')}` overridden by `train_config.json`: "
        f"{cfg.get('epochs', '?')} epochs max (best epoch {card.get('best_epoch', '?')}), "
        f"augment `{cfg.get('augment', '?')}`, balancing `{cfg.get('balancing', '?')}`, "
        f"monitor `{cfg.get('monitor', '?')}`; {minutes} wall on 2 shared CPU cores |",
        f"| Data | `{cfg.get('dataset', '?')}`: train {_counts(counts.get('train'))}, "
        f"validation {_counts(counts.get('val'))} (split by patient, seed "
        f"{cfg.get('split_seed', '?')}) |",
        f"| Operating point | {positive} iff P({positive}) >= {_fmt(op.get('threshold'))} "
        f"(chosen on validation for sensitivity >= {_fmt(op.get('target'))}) |",
        f"| Saliency layer | `{card.get('saliency_layer')}` |",
        f"| File | `model.keras`, {exp.get('file_mb', '?')} MB (exported from run "
        f"{exp.get('run_id', '?')}) |", "",
        "## Validation metrics", "",
        "| AUC | sensitivity | specificity | accuracy | average precision | n |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(val.get('auc'))} | {_fmt(val.get('sensitivity'))} | "
        f"{_fmt(val.get('specificity'))} | {_fmt(val.get('accuracy'))} | "
        f"{_fmt(val.get('average_precision'))} | {val.get('n', '?')} |", "",
        "Sensitivity and specificity are at the operating point above, on the patient-grouped "
        "validation split carved from the official train folder. For reference, Kermany et al. "
        "report AUC 0.968, sensitivity 0.932 and specificity 0.901 on their held-out test set "
        "(ImageNet-pretrained Inception V3). Validation images come from the same distribution "
        "as the training images while the official test set does not, so expect lower numbers "
        "there (`python -m cxr_core evaluate --model default --data PATH --split test`).", "",
        "## Data licence", "",
        f"{lic['dataset']}. {lic['citation']}. {lic['source']}. Licence: {lic['licence']} "
        "(attribution required wherever the model or its outputs are shown or shipped).", "",
        "## Reproduce", "",
        "From the repository root (state goes to `CXR_HOME`, default `~/.cxr`):",
        "", "```bash",
        "python -m cxr_core train --config models/default/train_config.json --json",
        "# prints {\"run_id\": ID, \"status\": \"finished\", ...}",
        "python -m cxr_core.predict export-default ID   # writes model.keras, model_card.json, "
        "README.md here", "```", "",
    ]
    return "\n".join(lines)


def _counts(counts: dict | None) -> str:
    if not counts:
        return "?"
    return " + ".join(f"{v:,} {k}" for k, v in counts.items())


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxr_core.predict export-default RUN_ID``: export a run as the demo model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxr_core.predict")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export-default", help="export a finished run to models/default")
    p.add_argument("run_id", type=int)
    p.add_argument("--out", default=str(DEFAULT_MODELS_DIR))
    args = parser.parse_args(argv)
    try:
        card = export_default(args.run_id, out_dir=args.out)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(Path(args.out) / DEFAULT_MODEL_NAME),
                      "val_metrics": card.get("val_metrics"),
                      "operating_point": card.get("operating_point")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
