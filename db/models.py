"""Typed SQLAlchemy 2.0 models: the whole schema of the product.

Only ``cxr_core.storage`` imports these; everything else sees dataclasses.
Schema changes go through Alembic (``db/migrations``); never ``create_all`` in production code.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        MetaData, String, Text, UniqueConstraint, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Dataset(Base):
    """A dataset on disk (folder tree or .npz) registered by path."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    root: Mapped[str] = mapped_column(Text)
    layout: Mapped[str] = mapped_column(String(20))  # kaggle | folders | npz
    classes_json: Mapped[str] = mapped_column(Text, default="[]")  # folder classes, sorted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    indexed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    scan_seconds: Mapped[float | None] = mapped_column(Float)
    summary_json: Mapped[str | None] = mapped_column(Text)  # counts of the last index run
    # Another site or acquisition period: external validation data (migration 0010).
    external: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ImageRow(Base):
    """One image of a dataset, from its header only. Original labels are never overwritten."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "relpath"),
                      Index("ix_images_dataset_sha", "dataset_id", "sha256"),
                      Index("ix_images_dataset_label", "dataset_id", "label", "subtype"),
                      Index("ix_images_dataset_patient", "dataset_id", "patient"),
                      Index("ix_images_dataset_changed", "dataset_id", "content_changed_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    relpath: Mapped[str] = mapped_column(Text)  # path under root; "npz:<split>:<i>" for arrays
    split: Mapped[str] = mapped_column(String(20))  # train | val | test | "" (no split folder)
    label: Mapped[str] = mapped_column(String(100))  # original folder class, e.g. PNEUMONIA
    subtype: Mapped[str | None] = mapped_column(String(50))  # bacteria | virus | None
    patient: Mapped[str | None] = mapped_column(String(100))
    sha256: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    mode: Mapped[str | None] = mapped_column(String(20))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)  # why it is unreadable, else None
    acquired_date: Mapped[str | None] = mapped_column(String(10))  # ISO date (DICOM, metadata)
    # Identity is (dataset, relpath): a row is never deleted by re-indexing. A file gone from
    # disk is flagged missing; a file whose bytes changed keeps its row (and its relabels).
    missing: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    missing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    previous_sha256: Mapped[str | None] = mapped_column(String(64))  # before the last change
    content_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # From the dataset's metadata CSV (cxr_core.data.metadata); None where it says nothing.
    site: Mapped[str | None] = mapped_column(String(100))
    sex: Mapped[str | None] = mapped_column(String(1))
    age_years: Mapped[float | None] = mapped_column(Float)
    view: Mapped[str | None] = mapped_column(String(100))


class AugPreset(Base):
    """A named augmentation config (AugmentConfig JSON)."""

    __tablename__ = "aug_presets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config_json: Mapped[str] = mapped_column(Text)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))  # identity of the last saver


class Run(Base):
    """A training run: queued → running → finished | failed | cancelled."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_created", "created_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(20), index=True, default="queued")
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    resume_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    artifact_dir: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    label_snapshot_hash: Mapped[str | None] = mapped_column(String(64))
    label_snapshot_relabel_id: Mapped[int | None] = mapped_column(Integer)
    summary_json: Mapped[str | None] = mapped_column(Text)  # final val metrics etc.
    created_by: Mapped[str | None] = mapped_column(String(200), index=True)  # who queued it
    # What it belongs to ("audit:7", "study:3"): per-user caps count a parent once (0013).
    parent: Mapped[str | None] = mapped_column(String(100), index=True)
    # A hyperparameter study's trial (migration 0015): the study is the run's parent (quotas
    # count a study once), the trial number is Optuna's. NULL for an ordinary run.
    study_id: Mapped[int | None] = mapped_column(Integer, index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer)


class Study(Base):
    """A hyperparameter study (cxr_core.search): its Optuna study lives in its own store
    (``optuna_url``, never this database: Optuna keeps its own ``alembic_version``); its trials
    are ordinary runs carrying ``study_id`` and ``trial_number`` (migration 0015)."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | finished | stopped
    config_json: Mapped[str] = mapped_column(Text)  # the StudyConfig (space, objective, ...)
    optuna_study: Mapped[str] = mapped_column(String(300))  # the study's name in its store
    optuna_url: Mapped[str] = mapped_column(Text)  # the store, password left out
    trials_queued: Mapped[int] = mapped_column(Integer, default=0)  # asked of Optuna so far
    best_run_id: Mapped[int | None] = mapped_column(Integer)
    best_value: Mapped[float | None] = mapped_column(Float)
    promoted_run_id: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str | None] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(Text)  # why it stopped, warnings


class Job(Base):
    """Heavy work a page asks for (an evaluation, ...), run by a worker, never by the web
    process: queued → running → finished | failed, with progress the page polls."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_id", "status", "id"),
                      Index("ix_jobs_kind_params", "kind", "params_json"),
                      Index("ix_jobs_created_by_status", "created_by", "status"))
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    params_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    result_json: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Who submitted it through cxr_core.auth.gate (NULL: the app itself, or before 0009).
    created_by: Mapped[str | None] = mapped_column(String(200))
    # What it belongs to ("audit:7", "study:3"): per-user caps count a parent once (0013).
    parent: Mapped[str | None] = mapped_column(String(100), index=True)


class Worker(Base):
    """A training worker process and its heartbeat."""

    __tablename__ = "workers"
    id: Mapped[int] = mapped_column(primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    kinds: Mapped[str] = mapped_column(String(100), default="all")  # "all", or "jobs", "runs"


class Metric(Base):
    """Long-form metrics: (run, kind, step, key, value), so pages call px.line(color=...)."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_kind_step", "run_id", "kind", "step"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(10))  # epoch | batch
    step: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunLog(Base):
    """Log lines of a run, shown on the training page."""

    __tablename__ = "run_logs"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)


class Evaluation(Base):
    """One evaluation of a model on a set of images; per-image outputs in EvalPrediction."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_run_dataset", "run_id", "dataset_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    model_ref: Mapped[str] = mapped_column(Text)  # "run:ID", "default" or a file path
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    split: Mapped[str] = mapped_column(String(20), default="")
    source: Mapped[str] = mapped_column(Text, default="")  # path evaluated, when not indexed
    labels_json: Mapped[str] = mapped_column(Text)  # class names, index order of probs
    images_key: Mapped[str] = mapped_column(String(64))  # hash of the ordered image ids/paths
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Label provenance: which labels y_true was scored against ("original" | "current"), and
    # the hash of those labels over the evaluated images and the dataset's newest relabel id
    # then (None on evaluations made before 0003).
    label_source: Mapped[str | None] = mapped_column(String(20))
    label_scheme: Mapped[str | None] = mapped_column(String(20))  # binary | three_class | folders
    label_snapshot_hash: Mapped[str | None] = mapped_column(String(64))
    label_snapshot_relabel_id: Mapped[int | None] = mapped_column(Integer)
    overlap_json: Mapped[str | None] = mapped_column(Text)  # evaluated ∩ the run's own images
    n_predictions: Mapped[int | None] = mapped_column(Integer)  # its eval_predictions rows


class RunImage(Base):
    """The images a run trained on (role "train"), selected on (role "val") and chose its
    threshold on (role "calib", the calibration slice)."""

    __tablename__ = "run_images"
    __table_args__ = (UniqueConstraint("run_id", "image_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    role: Mapped[str] = mapped_column(String(10))  # train | val | calib (threshold chosen on)


class EvalPrediction(Base):
    """Per-image probabilities of an evaluation."""

    __tablename__ = "eval_predictions"
    __table_args__ = (Index("ix_eval_predictions_image", "image_id", "evaluation_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(Text, default="")
    y_true: Mapped[int] = mapped_column(Integer)
    probs_json: Mapped[str] = mapped_column(Text)
    # From probs, for SQL sorting and filtering (review queues): P(pneumonia) as the review
    # page shows it, the argmax class index and the top-2 gap (storage.evals.prediction_columns).
    score: Mapped[float | None] = mapped_column(Float)
    pred_index: Mapped[int | None] = mapped_column(Integer)
    top2_margin: Mapped[float | None] = mapped_column(Float)


def _run_ref(context) -> str | None:
    """A row inserted with only a run id thresholds that run."""
    run_id = context.get_current_parameters().get("run_id")
    return None if run_id is None else f"run:{run_id}"


class OperatingPoint(Base):
    """Threshold history of a model, global or for one dataset (site); append-only.

    The newest row of (model_ref, dataset NULL) is the model's operating point; the newest
    row of (model_ref, dataset) is that site's (site calibration, migration 0007).
    """

    __tablename__ = "operating_points"
    __table_args__ = (Index("ix_operating_points_scope", "model_ref", "dataset_id", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    # None for a model without a run (the shipped "default"): model_ref names it.
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"),
                                               index=True)
    model_ref: Mapped[str] = mapped_column(String(300), default=_run_ref)  # "run:ID" | "default"
    # None: the model's global operating point; else the site it was calibrated for.
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    sample_n: Mapped[int | None] = mapped_column(Integer)  # images it was chosen on
    details_json: Mapped[str | None] = mapped_column(Text)  # CIs, labels, split chosen on
    threshold: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(30))  # sensitivity | youden | manual
    target: Mapped[float | None] = mapped_column(Float)
    sensitivity: Mapped[float | None] = mapped_column(Float)
    specificity: Mapped[float | None] = mapped_column(Float)
    changed_by: Mapped[str] = mapped_column(String(200), default="system")
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReviewItem(Base):
    """An image sent to the review queue (from Predict or Compare) with the model output shown."""

    __tablename__ = "review_items"
    __table_args__ = (Index("ix_review_items_image", "image_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    # No ON DELETE CASCADE: nothing a reviewer queued may vanish with an image row.
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"))
    upload_sha256: Mapped[str | None] = mapped_column(String(64))  # uploads: stored by hash
    source: Mapped[str] = mapped_column(String(30))  # predict | compare
    run_ref: Mapped[str | None] = mapped_column(String(200))  # "run:ID" | "default"
    predicted: Mapped[str | None] = mapped_column(String(100))
    probs_json: Mapped[str | None] = mapped_column(Text)
    sent_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class Relabel(Base):
    """Append-only relabel history. Undo is a new row pointing at the row it undoes.

    A row labels either an indexed image or an upload (by content hash), never both.
    """

    __tablename__ = "relabels"
    __table_args__ = (CheckConstraint("(image_id IS NULL) <> (upload_sha256 IS NULL)",
                                      name="one_target"),
                      Index("ix_relabels_image_reviewer", "image_id", "reviewer"),
                      Index("ix_relabels_undo_of", "undo_of"))
    id: Mapped[int] = mapped_column(primary_key=True)
    # No ON DELETE CASCADE: a relabel can never be removed by removing its image row.
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), index=True)
    upload_sha256: Mapped[str | None] = mapped_column(String(64), index=True)  # uploads: by hash
    image_sha256: Mapped[str | None] = mapped_column(String(64))  # the image's bytes when relabelled
    old_label: Mapped[str] = mapped_column(String(100))
    old_subtype: Mapped[str | None] = mapped_column(String(50))
    new_label: Mapped[str] = mapped_column(String(100))
    new_subtype: Mapped[str | None] = mapped_column(String(50))
    reviewer: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")
    run_ref: Mapped[str | None] = mapped_column(String(200))  # model shown to the reviewer
    score: Mapped[float | None] = mapped_column(Float)  # model probability shown
    undo_of: Mapped[int | None] = mapped_column(ForeignKey("relabels.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What the row is (migration 0016): "label" (a reading that counts at once: single
    # reading), "read" (one reader's answer under double reading: counts only through a
    # "consensus" row, written when enough readers agree, or an "adjudication" row, written by
    # an adjudicator over conflicting reads). An undo row has the kind of the row it undoes.
    kind: Mapped[str] = mapped_column(String(20), default="label", server_default="label")
    reads_required: Mapped[int | None] = mapped_column(Integer)  # a read: readers needed then
    basis_json: Mapped[str | None] = mapped_column(Text)  # consensus/adjudication: read ids


class ReviewSetting(Base):
    """How a dataset is read on Review, append-only (migration 0016): the newest row of a
    dataset is in force (none: open single reading)."""

    __tablename__ = "review_settings"
    __table_args__ = (Index("ix_review_settings_dataset", "dataset_id", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    # Blind: no model score, no other reader's label and no folder label until one answers.
    blind: Mapped[bool] = mapped_column(Boolean, default=False)
    reads_per_image: Mapped[int] = mapped_column(Integer, default=1)  # 2: double reading
    changed_by: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LabelAudit(Base):
    """A label audit (migration 0016): K patient-grouped folds trained as ordinary runs
    (``runs.parent`` "audit:ID"), every image's out-of-fold probabilities in
    ``label_audit_images`` with the label it was given, then confident learning over them."""

    __tablename__ = "label_audits"
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"),
                                            index=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running|finished|failed
    label_scheme: Mapped[str] = mapped_column(String(20))
    label_source: Mapped[str] = mapped_column(String(20))  # current | original
    labels_json: Mapped[str] = mapped_column(Text)  # class names, probability column order
    folds: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    config_json: Mapped[str] = mapped_column(Text)  # the fold runs' config (without the fold)
    label_snapshot_hash: Mapped[str] = mapped_column(String(64))
    label_snapshot_relabel_id: Mapped[int | None] = mapped_column(Integer)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    result_json: Mapped[str | None] = mapped_column(Text)  # thresholds, noise matrix, counts
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LabelAuditImage(Base):
    """One image of a label audit: its fold, the label it was given (the audit's snapshot),
    its out-of-fold probabilities (NULL until its fold run finishes) and, once the audit is
    done, its self-confidence and its rank among the flagged issues (NULL: not flagged)."""

    __tablename__ = "label_audit_images"
    __table_args__ = (UniqueConstraint("audit_id", "image_id"),
                      Index("ix_label_audit_images_rank", "audit_id", "issue_rank"),
                      Index("ix_label_audit_images_fold", "audit_id", "fold"))
    id: Mapped[int] = mapped_column(primary_key=True)
    audit_id: Mapped[int] = mapped_column(ForeignKey("label_audits.id", ondelete="CASCADE"))
    # No ON DELETE CASCADE: a stored audit keeps its images' rows.
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    fold: Mapped[int] = mapped_column(Integer)
    given: Mapped[int] = mapped_column(Integer)  # class index of the given label
    probs_json: Mapped[str | None] = mapped_column(Text)  # out-of-fold, labels_json order
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    self_confidence: Mapped[float | None] = mapped_column(Float)  # P(given label), out of fold
    suggested: Mapped[int | None] = mapped_column(Integer)  # class index confident learning puts
    issue_rank: Mapped[int | None] = mapped_column(Integer)  # 1 = most likely mislabelled


class AuditEvent(Base):
    """Append-only record of every gated action: who did (or was refused) what, when.

    Never updated or deleted: migration 0008 adds triggers that refuse UPDATE and DELETE.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_actor", "actor", "id"),
                      Index("ix_audit_events_action", "action", "id"))
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))  # the principal's identity
    source: Mapped[str] = mapped_column(String(10))  # oidc | local | cli
    action: Mapped[str] = mapped_column(String(50))  # a key of cxr_core.auth.policy.POLICY
    target: Mapped[str] = mapped_column(Text, default="")  # e.g. "run:3", "relabel:17"
    outcome: Mapped[str] = mapped_column(String(10))  # ok | denied
    detail_json: Mapped[str] = mapped_column(Text, default="{}")


class UserRole(Base):
    """Roles an admin granted an identity (added to those of the [cxr_roles] secrets table)."""

    __tablename__ = "user_roles"
    identity: Mapped[str] = mapped_column(String(200), primary_key=True)
    roles: Mapped[str] = mapped_column(String(200))  # comma-separated, from cxr_core.auth.policy.ROLES
    granted_by: Mapped[str] = mapped_column(String(200))
    granted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UserIdentity(Base):
    """The identity an OIDC account (issuer, subject) was first seen under: a later sign-in
    resolving to another identity is refused, never silently re-keyed (migration 0011)."""

    __tablename__ = "user_identities"
    issuer: Mapped[str] = mapped_column(String(500), primary_key=True)
    subject: Mapped[str] = mapped_column(String(500), primary_key=True)
    identity: Mapped[str] = mapped_column(String(200))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InstallFact(Base):
    """A fact about the deployment that must not drift (migration 0012), e.g. the fingerprint
    of the patient salt stored patient ids were hashed with."""

    __tablename__ = "install_facts"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
