"""Uploads kept for review: stored by content hash, and a prediction sent to the review queue.

Privacy: a client's file name is only ever shown, never used as a storage path. An upload sent
to review is stored as ``<uploads_dir>/<sha256><suffix>``; a DICOM upload is stored as a PNG of
its pixels only, so no DICOM header field (patient data) is written anywhere. The Review page
finds the stored file again with :func:`upload_path`.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from cxr_core.core.errors import ImageLoadError
from cxr_core.core.settings import get_settings
from cxr_core.data import images as image_io
from cxr_core.predict.inference import ImageInput, Prediction, png_bytes
from cxr_core.storage import AndThen, Database, reviews


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
        data, suffix = png_bytes(image_io.load_image(data, name=item.name)), ".png"
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
                   uploads_dir: str | Path | None = None, and_then: AndThen | None = None) -> int:
    """Queue a predicted image with the model's output for clinician review.

    Indexed images are queued by id; uploads are first stored by content hash.

    Args:
        db: the database.
        prediction: the prediction shown.
        model_ref: the model that made it ("default", "run:ID" or a file path).
        sent_by: who sent it.
        uploads_dir: where uploads are stored (default: the settings' uploads folder).
        and_then: ``and_then(session, item_id)`` in the review item's transaction (an audit
            row). The upload's file is stored first: the row names it by content hash.

    Returns:
        The review item's id.
    """
    image_id = prediction.source.image_id
    sha = None if image_id is not None else store_upload(prediction.source,
                                                         uploads_dir=uploads_dir)
    return db.write(lambda s: reviews.send_to_review(
        session=s, image_id=image_id, upload_sha256=sha, source="predict", run_ref=model_ref,
        predicted=prediction.label, probs=list(prediction.probabilities.values()),
        sent_by=sent_by), and_then=and_then)
