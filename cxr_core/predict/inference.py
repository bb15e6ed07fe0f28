"""Predict on uploaded or indexed images: decode each file, run the model, decide.

The one predict path of the Predict page, ``python -m cxr_core predict`` and the benchmark:

    bytes or path -(the ONE image loader)-> model-size uint8 -(model_store)-> probabilities
        -(decide at the model's stored operating point)-> label

Each file is decoded on its own: a bad file (not an image, empty, truncated, animated,
a decompression bomb, DICOM without pixels, too many bytes) becomes a :class:`PredictError`
with a one-line message and the rest of the batch still runs. Uploads (bytes a client sent)
are decoded in a child process with a memory limit (:mod:`cxr_core.data.sandbox`), so one
hostile file cannot take the web process down, and one request is capped in files and bytes
(``CXR_MAX_UPLOAD_FILES``, ``CXR_MAX_UPLOAD_MB``: :func:`check_upload_request`).

Models are loaded by reference with :func:`cxr_core.models.refs.load_model_ref` (the UI caches
its result). Next to this module: :mod:`cxr_core.predict.explain` explains a prediction (saliency),
:mod:`cxr_core.predict.uploads` stores an upload and sends it to review, :mod:`cxr_core.predict.cli` is
the command line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_core.core import limits
from cxr_core.core.csv_safe import safe_cell
from cxr_core.core.errors import ConfigError, ImageLoadError
from cxr_core.core.settings import get_settings
from cxr_core.core.text_safe import md_escape
from cxr_core.data import images as image_io
from cxr_core.data import sandbox
from cxr_core.models import store as model_store
from cxr_core.models.store import (
    NO_THRESHOLD,
    RUN_MODEL_NAME,
    LoadedModel,
    decide,
)
from cxr_core.storage import Database

# Same limit as .streamlit/config.toml's maxUploadSize (50 MB): also applied to CLI paths.
MAX_UPLOAD_BYTES = 50 * 2**20
DISPLAY_SIZE = 512  # longest side of the picture an overlay is drawn on (decoded with uploads)
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

    @property
    def is_upload(self) -> bool:
        """Bytes a client sent (not a file on disk, nor an indexed image such as an ``.npz``
        record): capped per request and decoded in a child process."""
        return self.data is not None and self.image_id is None

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

        pixels = dict(zip((r.relpath for r in arrays), image_io.npz_record_images(root, arrays)))
    out = []
    for rec in records:
        if str(rec.relpath).startswith("npz:"):
            out.append(ImageInput(rec.relpath, data=png_bytes(pixels[rec.relpath]),
                                  image_id=rec.id))
        else:
            out.append(ImageInput(rec.relpath, path=str(Path(root) / rec.relpath),
                                  image_id=rec.id))
    return out


def png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of an image or a uint8 array ((H, W), (H, W, 1) or (H, W, 3))."""
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
        pixels: (S, S, C) uint8: exactly what the model saw (an ensemble: its largest
            member).
        dicom: whether the file was DICOM.
        display: an upload's picture (at most :data:`DISPLAY_SIZE` a side), decoded with it
            in its child process; None for files on disk (decoded when shown).
    """

    index: int
    source: ImageInput
    label: str
    probabilities: dict[str, float]
    class_index: int
    sha256: str
    pixels: np.ndarray
    dicom: bool = False
    display: np.ndarray | None = None


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

def check_upload_request(sizes: Sequence[int]) -> None:
    """Refuse one upload request over the per-request caps (number of files, total bytes),
    before any file is decoded: ``CXR_MAX_UPLOAD_FILES``, ``CXR_MAX_UPLOAD_MB``.

    Raises:
        QuotaExceeded: the message says the cap and what was received.
    """
    limits.check_uploads([int(n) for n in sizes], limits.Limits.from_env())


def upload_decoder() -> sandbox.UploadDecoder:
    """A child process that decodes uploads under the decode budget's memory limit (use it
    as a context manager around one request)."""
    budget = image_io.decode_budget()
    return sandbox.UploadDecoder(memory_bytes=sandbox.decode_limit(budget), budget=budget)


def decode(item: ImageInput, size: int, channels: int, *,
           max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[np.ndarray, str, bool]:
    """Read and decode one input to what a model of ``size`` and ``channels`` sees.

    Returns:
        ((size, size, channels) uint8 pixels, sha256 of the bytes, whether it is DICOM).

    Raises:
        ImageLoadError: with a one-line message naming the file and the problem.
    """
    views, sha, dicom = decode_views(item, ((size, channels),), max_bytes=max_bytes)
    return views[0], sha, dicom


def decode_views(item: ImageInput, specs: Sequence[tuple[int, int]], *,
                 max_bytes: int = MAX_UPLOAD_BYTES,
                 decoder: sandbox.UploadDecoder | None = None,
                 ) -> tuple[list[np.ndarray], str, bool]:
    """:func:`decode` for several (size, channels) views of one file, read once: each view
    decoded as that model alone would (an ensemble's members, :func:`model_store.input_specs`).
    With ``decoder``, the decoding happens in its child process.

    Raises:
        ImageLoadError: with a one-line message naming the file and the problem.
    """
    views, sha, dicom, _ = _decode(item, specs, max_bytes=max_bytes, decoder=decoder)
    return views, sha, dicom


def _decode(item: ImageInput, specs: Sequence[tuple[int, int]], *, max_bytes: int,
            decoder: sandbox.UploadDecoder | None,
            ) -> tuple[list[np.ndarray], str, bool, np.ndarray | None]:
    data = item.read(max_bytes)
    sha = hashlib.sha256(data).hexdigest()
    if decoder is not None:  # an upload: decoded in the child, with its picture
        out = decoder.decode(data, name=item.name, specs=specs, display_side=DISPLAY_SIZE)
        return list(out.views), sha, out.dicom, out.display
    try:
        views = [image_io.to_array(image_io.load_image(data, name=item.name, draft=size),
                                   size, channels) for size, channels in specs]
    except ImageLoadError:
        raise
    except Exception as exc:  # a decoder bug on one hostile file must not end the batch
        raise ImageLoadError(f"{item.name}: cannot decode image ({type(exc).__name__}: {exc})") \
            from exc
    return views, sha, image_io.is_dicom(data), None


def predict_batch(loaded: LoadedModel, items: Sequence[ImageInput], *,
                  max_bytes: int = MAX_UPLOAD_BYTES, batch_size: int = 32,
                  progress: _Progress | None = None) -> BatchResult:
    """Predict every readable input; each unreadable one becomes an error, the rest go on.

    Uploads (inputs holding bytes) are checked against the per-request caps first, then
    decoded in a child process with a memory limit (one for the batch, replaced if a file
    ends it); files on disk are decoded here, within the decode budget.

    Args:
        loaded: from :func:`cxr_core.models.refs.load_model_ref` (carries the labels and the
            operating point).
        items: the inputs, in display order.
        max_bytes: larger files are refused before they are read.
        batch_size: images per forward pass.
        progress: called as ``progress(done, total)`` after each decoded file.

    Returns:
        The predictions (decided at the model's stored operating point) and the errors. An
        ensemble's members each read their own decode of a file; the prediction keeps the
        largest member's pixels.

    Raises:
        QuotaExceeded: the uploads are over the per-request caps (nothing was decoded).
    """
    start = time.perf_counter()
    uploads = [item for item in items if item.is_upload]
    if uploads:
        check_upload_request([len(item.data) for item in uploads])
    specs = model_store.input_specs(loaded)
    decoded, errors = [], []
    with upload_decoder() as decoder:
        for i, item in enumerate(items):
            try:
                decoded.append((i, item, *_decode(item, specs, max_bytes=max_bytes,
                                                  decoder=decoder if item.is_upload
                                                  else None)))
            except ImageLoadError as exc:
                errors.append(PredictError(i, item, str(exc)))
            if progress is not None:
                progress(i + 1, len(items))
    predictions: list[Prediction] = []
    if decoded:
        views = {spec: np.stack([d[2][k] for d in decoded]) for k, spec in enumerate(specs)}
        probs = model_store.predict_views(loaded, views, batch_size=batch_size)
        for (i, item, pixels, sha, dicom, shown), p, label in zip(decoded, probs,
                                                                  decide(loaded, probs)):
            predictions.append(Prediction(
                i, item, label, {k: float(v) for k, v in zip(loaded.labels, p)},
                loaded.labels.index(label), sha, pixels[0], dicom, shown))
    return BatchResult(loaded.ref, loaded.labels, loaded.threshold, loaded.threshold_source,
                       tuple(predictions), tuple(errors), time.perf_counter() - start)


def decision_text(result: BatchResult, prediction: Prediction) -> str:
    """One line of markdown saying how the label was decided (operating point and where it
    came from); class names and the source text are escaped."""
    if result.threshold is None:
        return (f"**{md_escape(prediction.label)}**: the most probable of {len(result.labels)} "
                "classes.")
    if len(result.labels) > 2:  # the two-step reading: pneumonia first, then the subtype
        from cxr_core.models.hierarchy import describe_steps

        return describe_steps(result.threshold, prediction.probabilities,
                              result.threshold_source)
    pos = result.labels[1]
    p = prediction.probabilities[pos]
    sign = "≥" if p >= result.threshold else "<"
    return (f"**{md_escape(prediction.label)}**: P({md_escape(pos)}) = {p:.3f} {sign} operating "
            f"point {result.threshold:.3f} ({md_escape(result.threshold_source)}).")


def no_operating_point(result: BatchResult) -> bool:
    """True when a binary model has no stored operating point (decisions use 0.5)."""
    return result.threshold_source == NO_THRESHOLD


# -- Model choice ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelOption:
    """A model the Predict page can use."""

    ref: str  # "default", "run:ID" or "ensemble:NAME"
    title: str


def model_options(db: Database) -> list[ModelOption]:
    """The shipped default (when present), finished runs with a model file (newest first), the
    other shipped models (the three-class one), then named ensembles
    (:mod:`cxr_core.models.ensembles`)."""
    from cxr_core.models.ensembles import list_ensembles
    from cxr_core.storage import evals

    from cxr_core.models.refs import shipped_models

    out = []
    shipped = shipped_models()
    if "default" in shipped:
        out.append(ModelOption("default", "Shipped demo model (default)"))
    runs_dir = get_settings().runs_dir
    with db.session() as s:
        briefs = evals.list_run_briefs(session=s, status="finished")
    for b in briefs:
        folders = [runs_dir / str(b.id)] + ([Path(b.artifact_dir)] if b.artifact_dir else [])
        if any((f / RUN_MODEL_NAME).is_file() for f in folders):
            out.append(ModelOption(f"run:{b.id}", f"{b.name} (run:{b.id})"))
    out += [ModelOption(r, t) for r, t in shipped.items() if r != "default"]
    return out + [ModelOption(e.ref, e.title) for e in list_ensembles()]
