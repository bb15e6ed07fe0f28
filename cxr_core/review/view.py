"""What the review page shows of one entry: its facts, its file, the windowed picture.

An entry is a dataset image or an upload sent from Predict. :func:`render_view` applies
window/level, an optional saliency overlay (:mod:`cxr_core.predict.render`) and zoom; the map
itself comes from :func:`cxr_core.predict.explain.saliency_map`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.core.settings import get_settings
from cxr_core.data import sandbox
from cxr_core.data.images import load_image
from cxr_core.predict.render import overlay
from cxr_core.predict.uploads import upload_path
from cxr_core.review.agreement import labels_by_reviewer
from cxr_core.review.queues import QueueEntry, ReviewState, format_label
from cxr_core.storage import Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import relabels as rel_store

VIEW_SIZE = 1024  # decode full-resolution films at about this many pixels a side for viewing
UPLOAD_VIEW_SIDE = 4 * VIEW_SIZE  # an upload is shown at most this large (decoded in a sandbox)


@dataclass(frozen=True)
class EntryInfo:
    """What the page states about the entry under review."""

    title: str  # the image's path, or "Upload <sha256 prefix>"
    facts: tuple[tuple[str, str], ...]  # (name, label) pairs: original/model, current
    reviewers: tuple[tuple[str, str], ...]  # (reviewer, label) of everyone who labelled it
    warning: str | None = None  # "image changed since it was relabelled", when it did


def describe_entry(db: Database, state: ReviewState, entry: QueueEntry) -> EntryInfo:
    """Title, labels and reviewers' labels of a queue entry (an image or an upload), read for
    that one entry (its relabel rows only)."""
    with db.session() as s:
        if entry.upload_sha256 is not None:
            rows = rel_store.list_upload_relabels(session=s, upload_sha256s=[entry.upload_sha256])
            upload_label = rel_store.upload_labels(session=s,
                                                   upload_sha256s=[entry.upload_sha256])
            rec = None
        else:
            rows = rel_store.list_relabels(session=s, dataset_id=state.dataset_id,
                                           image_ids=[entry.image_id])
            (rec,) = ds_store.get_images(session=s, image_ids=[entry.image_id])
    reviewers = tuple(labels_by_reviewer(rows, entry.key))
    active = rel_store.counting(rows)  # the label that counts (a read alone does not)
    if rec is None:
        probs = " / ".join(f"{p:.3f}" for p in entry.probs or ())
        model = f"{entry.predicted or '—'}" + (f" ({probs})" if probs else "")
        current = upload_label.get(entry.upload_sha256, (entry.predicted or "", None))
        return EntryInfo(f"Upload {entry.upload_sha256[:12]}…",
                         (("Model", model), ("Current", format_label(*current) or "—")), reviewers)
    current = (active[-1].new_label, active[-1].new_subtype) if active else (rec.label,
                                                                             rec.subtype)
    changed = state.changed_since_relabel.get(entry.image_id)
    warning = None if changed is None else (
        f"Image changed since it was relabelled: relabel {changed.relabel_id} was made on "
        f"content {str(changed.relabelled_sha256)[:12]}…, the file now holds "
        f"{str(changed.current_sha256)[:12]}…. The relabel is kept; confirm or correct it.")
    return EntryInfo(rec.relpath, (("Original", format_label(rec.label, rec.subtype)),
                                   ("Current", format_label(*current))), reviewers, warning)


def entry_image(db: Database, entry: QueueEntry,
                root: str | Path) -> tuple[str | None, str | None]:
    """The file to show for an entry and its content hash (keys cached saliency).

    Args:
        db: the database.
        entry: a dataset image (under ``root``, the dataset's folder) or an upload (stored by
            :func:`cxr_core.predict.uploads.store_upload` under the settings' uploads folder).
        root: the dataset's root folder.

    Returns:
        (path, sha256); the path is None when an upload's stored file is missing.
    """
    if entry.upload_sha256 is None:
        with db.session() as s:
            (rec,) = ds_store.get_images(session=s, image_ids=[entry.image_id])
        return str(Path(root) / rec.relpath), rec.sha256
    path = upload_path(entry.upload_sha256)
    return (None if path is None else str(path)), entry.upload_sha256


def render_view(image: np.ndarray, *, level: float = 128.0, window: float = 256.0,
                zoom: float = 1.0, center: tuple[float, float] = (0.5, 0.5),
                heat: np.ndarray | None = None, alpha: float = 0.4) -> np.ndarray:
    """Window/level, optional saliency overlay, then zoom: the picture the reviewer sees.

    Args:
        image: (H, W) or (H, W, 3) uint8 image.
        level: grey value at the middle of the window (contrast centre).
        window: width of the grey range stretched to black..white (smaller = more contrast).
        zoom: magnification >= 1 (a crop of 1/zoom of each side).
        center: (x, y) of the crop centre as fractions of width and height.
        heat: optional (h, w) saliency map in [0, 1] blended over the windowed image.
        alpha: heatmap weight.

    Returns:
        uint8 (h, w) or (h, w, 3) array.

    Raises:
        ConfigError: on a window <= 0 or a zoom < 1.
    """
    if window <= 0 or zoom < 1:
        raise ConfigError("expected window > 0 and zoom >= 1. "
                          f"Received: window={window}, zoom={zoom}")
    lo = level - window / 2.0
    out = np.clip((np.asarray(image, dtype=np.float32) - lo) * (255.0 / window), 0, 255)
    out = np.rint(out).astype(np.uint8)
    if heat is not None:
        out = overlay(out, heat, alpha=alpha)
    h, w = out.shape[:2]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    y0 = int(np.clip(round(center[1] * h - ch / 2), 0, h - ch))
    x0 = int(np.clip(round(center[0] * w - cw / 2), 0, w - cw))
    return out[y0:y0 + ch, x0:x0 + cw]


def view_pixels(path: str | Path) -> np.ndarray:
    """The image to review as uint8 (H, W) or (H, W, 3), decoded at about 1024 px a side.

    A stored upload (a file a client sent, under the uploads folder) is decoded in a child
    process with a memory limit (:func:`cxr_core.data.sandbox.load_upload`), at most
    :data:`UPLOAD_VIEW_SIDE` a side; a dataset's film here.

    Raises:
        ImageLoadError: the file cannot be read.
    """
    p = Path(path)
    if get_settings().uploads_dir.resolve() in p.resolve().parents:
        return sandbox.load_upload(p.read_bytes(), p.name, display_side=UPLOAD_VIEW_SIDE).display
    return np.asarray(load_image(path, draft=VIEW_SIZE))
