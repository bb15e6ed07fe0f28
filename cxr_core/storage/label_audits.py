"""Label audits as stored records: the audit, its fold runs (``runs.parent`` ``"audit:ID"``: the
audit is their parent) and one row per image with its fold, the label it was given (the audit's
label snapshot), its out-of-fold probabilities and, once the audit is done, its
self-confidence and issue rank.

The statistics are :mod:`cxr_core.stats.confident_learning`; the folds are trained by
:mod:`cxr_core.training.label_audit`; Review reads the flagged images through
:mod:`cxr_core.storage.review_queue` (the ``mislabelled`` queue) and :func:`get_audit`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from cxr_core.core.errors import ConfigError
from cxr_core.storage.runs import as_utc
from db.models import ImageRow, LabelAudit, LabelAuditImage, Run

AUDIT_STATUSES = ("running", "finished", "failed")


def parent_of(audit_id: int) -> str:
    """The ``runs.parent`` an audit's fold runs carry (indexed; caps count a parent once)."""
    return f"audit:{int(audit_id)}"


@dataclass(frozen=True)
class LabelAuditRecord:
    """A label audit as the rest of the package sees it."""

    id: int
    dataset_id: int
    status: str  # running | finished | failed
    label_scheme: str
    label_source: str  # current | original
    labels: tuple[str, ...]  # class names in probability-column order
    folds: int
    seed: int
    config: dict  # the fold runs' config (every field but the fold)
    snapshot_hash: str
    snapshot_relabel_id: int | None
    n_images: int
    result: dict | None  # thresholds, noise matrix, counts (once finished)
    error: str | None
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None

    @property
    def title(self) -> str:
        done = f"{self.result.get('n_issues', 0)} flagged" if self.result else self.status
        return f"audit #{self.id} · {self.label_scheme} · {self.folds} folds · {done}"


@dataclass(frozen=True)
class FoldRun:
    """One fold run of an audit."""

    run_id: int
    fold: int
    status: str
    epochs_done: int
    error: str | None


@dataclass(frozen=True)
class AuditImage:
    """One image of an audit."""

    image_id: int
    relpath: str
    patient: str | None
    fold: int
    given: int  # class index of the label it was given
    probs: tuple[float, ...] | None  # out of fold (None: its fold has not finished, or unreadable)
    self_confidence: float | None = None
    suggested: int | None = None
    issue_rank: int | None = None
    run_id: int | None = None  # the fold run that scored it (never trained on it)


def _image(r: LabelAuditImage, relpath: str, patient: str | None) -> AuditImage:
    return AuditImage(r.image_id, relpath, patient, r.fold, r.given,
                      tuple(json.loads(r.probs_json)) if r.probs_json else None,
                      r.self_confidence, r.suggested, r.issue_rank, r.run_id)


def _record(row: LabelAudit) -> LabelAuditRecord:
    return LabelAuditRecord(
        row.id, row.dataset_id, row.status, row.label_scheme, row.label_source,
        tuple(json.loads(row.labels_json)), row.folds, row.seed, json.loads(row.config_json),
        row.label_snapshot_hash, row.label_snapshot_relabel_id, row.n_images,
        json.loads(row.result_json) if row.result_json else None, row.error, row.created_by,
        as_utc(row.created_at), as_utc(row.finished_at))


def create_audit(*, session: Session, dataset_id: int, label_scheme: str, label_source: str,
                 labels: Sequence[str], folds: int, seed: int, config: Mapping,
                 snapshot_hash: str, snapshot_relabel_id: int | None,
                 assignments: Iterable[tuple[int, int, int]],
                 created_by: str | None = None) -> int:
    """Insert an audit and its images: ``assignments`` are (image id, fold, given class index).

    Returns:
        The audit id.
    """
    rows = [(int(i), int(f), int(g)) for i, f, g in assignments]
    audit = LabelAudit(dataset_id=dataset_id, status="running", label_scheme=label_scheme,
                       label_source=label_source, labels_json=json.dumps(list(labels)),
                       folds=folds, seed=seed, config_json=json.dumps(dict(config)),
                       label_snapshot_hash=snapshot_hash,
                       label_snapshot_relabel_id=snapshot_relabel_id, n_images=len(rows),
                       created_by=created_by)
    session.add(audit)
    session.flush()
    values = [{"audit_id": audit.id, "image_id": i, "fold": f, "given": g} for i, f, g in rows]
    for start in range(0, len(values), 1000):
        session.execute(insert(LabelAuditImage), values[start:start + 1000])
    return audit.id


def get_audit(*, session: Session, audit_id: int) -> LabelAuditRecord | None:
    row = session.get(LabelAudit, audit_id)
    return None if row is None else _record(row)


def require_audit(*, session: Session, audit_id: int) -> LabelAuditRecord:
    """The audit, or ConfigError naming the id."""
    audit = get_audit(session=session, audit_id=audit_id)
    if audit is None:
        raise ConfigError(f"no label audit with this id. Received: audit_id={audit_id}")
    return audit


def list_audits(*, session: Session, dataset_id: int | None = None,
                status: str | None = None, limit: int = 50) -> list[LabelAuditRecord]:
    """Audits, newest first."""
    q = select(LabelAudit).order_by(LabelAudit.id.desc()).limit(limit)
    if dataset_id is not None:
        q = q.where(LabelAudit.dataset_id == dataset_id)
    if status is not None:
        q = q.where(LabelAudit.status == status)
    return [_record(r) for r in session.scalars(q)]


def fold_runs(*, session: Session, audit_id: int) -> list[FoldRun]:
    """The audit's fold runs, by fold (the fold is in each run's config)."""
    rows = session.execute(select(Run.id, Run.config_json, Run.status, Run.epochs_done,
                                  Run.error).where(Run.parent == parent_of(audit_id))
                           .order_by(Run.id)).all()
    out = [FoldRun(rid, int(json.loads(cfg).get("holdout", {}).get("fold", -1)), status,
                   int(epochs or 0), error) for rid, cfg, status, epochs, error in rows]
    return sorted(out, key=lambda f: (f.fold, f.run_id))


def audit_images(*, session: Session, audit_id: int,
                 fold: int | None = None) -> list[AuditImage]:
    """The audit's images (one fold's with ``fold``), by image id."""
    q = (select(LabelAuditImage, ImageRow.relpath, ImageRow.patient)
         .join(ImageRow, ImageRow.id == LabelAuditImage.image_id)
         .where(LabelAuditImage.audit_id == audit_id).order_by(LabelAuditImage.image_id))
    if fold is not None:
        q = q.where(LabelAuditImage.fold == fold)
    return [_image(r, relpath, patient) for r, relpath, patient in session.execute(q)]


def set_fold_probs(*, session: Session, audit_id: int, run_id: int,
                   probs: Mapping[int, Sequence[float]]) -> int:
    """Store out-of-fold probabilities (image id -> one per class) from a fold run; returns
    the rows written. Only rows of that run's fold are written."""
    n = 0
    for image_id, p in probs.items():
        n += session.execute(update(LabelAuditImage).where(
            LabelAuditImage.audit_id == audit_id, LabelAuditImage.image_id == int(image_id))
            .values(probs_json=json.dumps([float(x) for x in p]), run_id=run_id)).rowcount
    return n


def count_with_probs(*, session: Session, audit_id: int) -> int:
    return int(session.scalar(select(func.count()).select_from(LabelAuditImage).where(
        LabelAuditImage.audit_id == audit_id, LabelAuditImage.probs_json.is_not(None))) or 0)


def finish_audit(*, session: Session, audit_id: int, result: Mapping,
                 scores: Mapping[int, tuple[float, int, int | None]]) -> bool:
    """Mark a running audit finished with its result, and each image's (self-confidence,
    suggested class index, issue rank or None); False when it was not running (another worker
    finished it first: nothing is written)."""
    done = session.execute(update(LabelAudit).where(LabelAudit.id == audit_id,
                                                    LabelAudit.status == "running")
                           .values(status="finished", result_json=json.dumps(dict(result)),
                                   finished_at=func.now(), error=None)).rowcount == 1
    if not done:
        return False
    for image_id, (conf, suggested, rank) in scores.items():
        session.execute(update(LabelAuditImage).where(
            LabelAuditImage.audit_id == audit_id, LabelAuditImage.image_id == int(image_id))
            .values(self_confidence=float(conf), suggested=int(suggested), issue_rank=rank))
    return True


def set_audit_error(*, session: Session, audit_id: int, error: str | None) -> None:
    """Note why a running audit cannot finish yet (a fold failed: resume it), or clear it."""
    session.execute(update(LabelAudit).where(LabelAudit.id == audit_id)
                    .values(error=error))


def audit_images_by_id(*, session: Session, audit_id: int,
                       image_ids: Sequence[int]) -> dict[int, AuditImage]:
    """These images' rows of an audit (the review page's "why it was flagged")."""
    q = (select(LabelAuditImage, ImageRow.relpath, ImageRow.patient)
         .join(ImageRow, ImageRow.id == LabelAuditImage.image_id)
         .where(LabelAuditImage.audit_id == audit_id,
                LabelAuditImage.image_id.in_([int(i) for i in image_ids])))
    return {r.image_id: _image(r, relpath, patient) for r, relpath, patient in session.execute(q)}


def issues(*, session: Session, audit_id: int, limit: int | None = None,
           offset: int = 0) -> list[AuditImage]:
    """The flagged images, most likely mislabelled first (issue rank 1, 2, ...)."""
    q = (select(LabelAuditImage, ImageRow.relpath, ImageRow.patient)
         .join(ImageRow, ImageRow.id == LabelAuditImage.image_id)
         .where(LabelAuditImage.audit_id == audit_id, LabelAuditImage.issue_rank.is_not(None))
         .order_by(LabelAuditImage.issue_rank).offset(offset))
    if limit is not None:
        q = q.limit(limit)
    return [_image(r, relpath, patient) for r, relpath, patient in session.execute(q)]
