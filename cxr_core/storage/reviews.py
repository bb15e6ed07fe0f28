"""Review storage: the items sent to review and the model outputs a review shows beside them.

Relabels and the labels derived from them are in :mod:`cxr_core.storage.relabels`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import String, case, cast, func, literal, select
from sqlalchemy.orm import Session

from cxr_core.core.errors import ConfigError
from db.models import (EvalPrediction, Evaluation, ImageRow, OperatingPoint, Relabel, ReviewItem,
                       Run)

REVIEW_SOURCES = ("predict", "compare", "review")


@dataclass(frozen=True)
class RunOption:
    """A model with stored predictions on a dataset (the review page's model picker): a
    training run, or a model without a run (the shipped ``default``, an ensemble, a file)."""

    run_id: int | None
    name: str
    n_predictions: int
    artifact_dir: str | None
    model_ref: str = ""  # "run:ID", "default", "ensemble:…" or a path

    def __post_init__(self) -> None:
        if not self.model_ref and self.run_id is not None:
            object.__setattr__(self, "model_ref", f"run:{self.run_id}")


@dataclass(frozen=True)
class ReviewItemRecord:
    """An image (or upload) sent to review from Predict or Compare."""

    id: int
    image_id: int | None
    upload_sha256: str | None
    source: str
    run_ref: str | None
    predicted: str | None
    probs: tuple[float, ...] | None
    sent_by: str
    created_at: datetime
    done: bool


# -- Model outputs --------------------------------------------------------------------------

def models_with_predictions(*, session: Session, dataset_id: int) -> list[RunOption]:
    """Models with stored per-image predictions on the dataset (runs by run, other models by
    reference), the most recently evaluated first (from the evaluations' stored sizes: no
    prediction row is counted)."""
    counted = select(func.count()).where(EvalPrediction.evaluation_id == Evaluation.id,
                                         EvalPrediction.image_id.is_not(None)).scalar_subquery()
    n = func.coalesce(Evaluation.n_predictions, counted)  # rows counted only where unknown
    key = case((Evaluation.run_id.is_not(None),
                literal("run:").concat(cast(Evaluation.run_id, String))),
               else_=Evaluation.model_ref)
    q = (select(key.label("ref"), func.max(Evaluation.run_id), func.max(Run.name),
                func.max(Run.artifact_dir), func.sum(n))
         .outerjoin(Run, Run.id == Evaluation.run_id)
         .where(Evaluation.dataset_id == dataset_id, n > 0)
         .group_by(key).order_by(func.max(Evaluation.id).desc()))
    return [RunOption(run_id, name or (f"run {run_id}" if run_id else ref), int(total), art, ref)
            for ref, run_id, name, art, total in session.execute(q)]


def evaluation_threshold(*, session: Session, model_ref: str, dataset_id: int) -> float | None:
    """The threshold of a model's newest evaluation on the dataset (a model without a run has
    its operating point in its card; the evaluation recorded it)."""
    raw = session.scalar(select(Evaluation.metrics_json).where(
        Evaluation.model_ref == model_ref, Evaluation.dataset_id == dataset_id)
        .order_by(Evaluation.id.desc()).limit(1))
    value = json.loads(raw).get("threshold") if raw else None
    return float(value) if isinstance(value, (int, float)) else None


def operating_threshold(*, session: Session, run_id: int) -> float | None:
    """The run's global operating point: threshold of its newest ``operating_points`` row
    without a dataset (site thresholds apply to their own dataset only)."""
    return session.scalar(select(OperatingPoint.threshold).where(
        OperatingPoint.run_id == run_id, OperatingPoint.dataset_id.is_(None))
        .order_by(OperatingPoint.id.desc()).limit(1))


def run_artifact_dir(*, session: Session, run_id: int) -> str | None:
    """Where a run keeps its model file (None when unknown)."""
    return session.scalar(select(Run.artifact_dir).where(Run.id == run_id))


# -- Review items ---------------------------------------------------------------------------

def send_to_review(*, session: Session, image_id: int | None, upload_sha256: str | None,
                   source: str, run_ref: str | None, predicted: str | None,
                   probs: list[float] | None, sent_by: str) -> int:
    """Queue an image (indexed, or an upload stored by its hash) for clinician review.

    Args:
        session: the open session.
        image_id: an indexed image, or None for an upload.
        upload_sha256: the upload's content hash (its file under ``CXR_HOME/uploads``).
        source: "predict" | "compare" | "review".
        run_ref: the model shown, "run:ID" | "default" | a file path.
        predicted: the class the model predicted.
        probs: the class probabilities shown.
        sent_by: who sent it.

    Returns:
        The review item's id.

    Raises:
        ConfigError: neither or both of image_id / upload_sha256, or an unknown source.
    """
    if (image_id is None) == (upload_sha256 is None):
        raise ConfigError("send_to_review needs exactly one of image_id or upload_sha256. "
                          f"Received: image_id={image_id}, upload_sha256={upload_sha256!r}")
    if source not in REVIEW_SOURCES:
        raise ConfigError(f"source must be one of {REVIEW_SOURCES}. Received: source={source!r}")
    row = ReviewItem(image_id=image_id, upload_sha256=upload_sha256, source=source,
                     run_ref=run_ref, predicted=predicted,
                     probs_json=None if probs is None else json.dumps([float(p) for p in probs]),
                     sent_by=sent_by or "")
    session.add(row)
    session.flush()
    return row.id


def list_review_items(*, session: Session, dataset_id: int | None = None,
                      open_only: bool = True) -> list[ReviewItemRecord]:
    """Review items, newest first; with ``dataset_id`` only that dataset's indexed images."""
    q = select(ReviewItem)
    if dataset_id is not None:
        q = q.join(ImageRow, ImageRow.id == ReviewItem.image_id).where(
            ImageRow.dataset_id == dataset_id)
    if open_only:
        q = q.where(ReviewItem.done.is_(False))
    return [_item(r) for r in session.scalars(q.order_by(ReviewItem.id.desc()))]


def _item(r: ReviewItem) -> ReviewItemRecord:
    return ReviewItemRecord(r.id, r.image_id, r.upload_sha256, r.source, r.run_ref, r.predicted,
                            None if r.probs_json is None else tuple(json.loads(r.probs_json)),
                            r.sent_by, r.created_at, r.done)


def list_upload_items(*, session: Session, open_only: bool = True) -> list[ReviewItemRecord]:
    """Review items of uploads (not in any dataset), newest first."""
    q = select(ReviewItem).where(ReviewItem.upload_sha256.is_not(None))
    if open_only:
        q = q.where(ReviewItem.done.is_(False))
    return [_item(r) for r in session.scalars(q.order_by(ReviewItem.id.desc()))]


def count_open_uploads(*, session: Session) -> int:
    """Open review items for uploads (shown in the review page's "sent" queue)."""
    return session.scalar(select(func.count()).select_from(ReviewItem).where(
        ReviewItem.image_id.is_(None), ReviewItem.done.is_(False))) or 0


# -- Retention: what still needs an upload ----------------------------------------------------

@dataclass(frozen=True)
class UploadReferences:
    """What refers to an upload (by content hash): retention keeps it while any does."""

    open_items: int  # review items not resolved yet
    relabels: int  # relabel rows (undo rows and undone ones too): a clinician's evidence
    newest_item_at: datetime | None  # when it was last sent to review


def upload_references(*, session: Session, upload_sha256: str) -> UploadReferences:
    """The review items and relabel rows that name an upload (uses the indexes on
    ``relabels.upload_sha256``; review items of uploads are few)."""
    open_items = session.scalar(select(func.count()).select_from(ReviewItem).where(
        ReviewItem.upload_sha256 == upload_sha256, ReviewItem.done.is_(False))) or 0
    relabels = session.scalar(select(func.count()).select_from(Relabel).where(
        Relabel.upload_sha256 == upload_sha256)) or 0
    newest = session.scalar(select(func.max(ReviewItem.created_at)).where(
        ReviewItem.upload_sha256 == upload_sha256))
    if newest is not None and newest.tzinfo is None:  # SQLite keeps no zone: stored as UTC
        newest = newest.replace(tzinfo=timezone.utc)
    return UploadReferences(int(open_items), int(relabels), newest)
