"""Uploads kept for review: stored by content hash, and a prediction sent to the review queue.

Privacy: a client's file name is only ever shown, never used as a storage path. An upload sent
to review is stored as ``<uploads_dir>/<sha256><suffix>``; a DICOM upload is stored as a PNG of
its pixels only (decoded in a child process with a memory limit, :mod:`cxr_core.data.sandbox`),
so no DICOM header field (patient data) is written anywhere. The Review page finds the stored
file again with :func:`upload_path`.

Retention (:mod:`cxr_core.review.retention`) may delete an upload no review item or relabel
needs any more. So that it can never delete one that is being sent at that moment,
:func:`send_to_review` writes (or refreshes) the file inside the review item's write
transaction, under the database's write lock (:func:`cxr_core.storage.lock_for_write`), and the
cleanup checks the references and deletes under the same lock.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from cxr_core.core.errors import ImageLoadError
from cxr_core.core.settings import get_settings
from cxr_core.data import images as image_io
from cxr_core.data import sandbox
from cxr_core.predict.inference import ImageInput, Prediction
from cxr_core.storage import AndThen, Database, lock_for_write, reviews


def prepare_upload(item: ImageInput) -> tuple[bytes, str, str]:
    """What :func:`store_upload` writes: (bytes, sha256, suffix). DICOM becomes a PNG of its
    pixels, decoded in a child process; other formats are kept as sent (only their header is
    read, to name the suffix).

    Raises:
        ImageLoadError: the upload cannot be read or decoded.
    """
    data = item.read()
    if image_io.is_dicom(data):
        data, suffix = sandbox.load_upload(data, item.name).png or b"", ".png"
    else:
        suffix = _suffix(data, item.name)
    return data, hashlib.sha256(data).hexdigest(), suffix


def _write(folder: Path, data: bytes, sha: str, suffix: str) -> Path:
    """Write ``<sha><suffix>`` atomically, or refresh its time when it is there (retention
    counts a file's age from its newest send)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha}{suffix}"
    if target.is_file():
        os.utime(target)
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)
    return target


def store_upload(item: ImageInput, *, uploads_dir: str | Path | None = None) -> str:
    """Store an upload by content hash; returns the hash (the review item's ``upload_sha256``).

    The file is ``<uploads_dir>/<sha256><suffix>``, never the client's name. DICOM is stored
    as a PNG of its decoded pixels only (no header field, so no patient data); the hash is
    that PNG's. Writing is atomic and idempotent.

    Raises:
        ImageLoadError: the upload cannot be read or decoded.
    """
    data, sha, suffix = prepare_upload(item)
    _write(_folder(uploads_dir), data, sha, suffix)
    return sha


def _folder(uploads_dir: str | Path | None) -> Path:
    return Path(uploads_dir) if uploads_dir is not None else get_settings().uploads_dir


def upload_path(sha256: str, *, uploads_dir: str | Path | None = None) -> Path | None:
    """The stored file of an upload hash, or None."""
    folder = _folder(uploads_dir)
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
    upload = None if image_id is not None else prepare_upload(prediction.source)

    def write(s: Any) -> int:
        sha = None
        if upload is not None:  # the file and its item commit under one write lock
            lock_for_write(s)
            data, sha, suffix = upload
            _write(_folder(uploads_dir), data, sha, suffix)
        return reviews.send_to_review(
            session=s, image_id=image_id, upload_sha256=sha, source="predict",
            run_ref=model_ref, predicted=prediction.label,
            probs=list(prediction.probabilities.values()), sent_by=sent_by)
    return db.write(write, and_then=and_then)
