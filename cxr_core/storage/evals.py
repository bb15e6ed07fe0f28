"""Evaluations, their per-image outputs, and run operating points (threshold history).

The ``operating_points`` table is append-only: the newest row of a run is its operating
point; older rows are its history (who changed it, when, why).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from cxr_core.core.records import scoped_patient
from db.models import Dataset, EvalPrediction, Evaluation, ImageRow, Run, RunImage
from db.models import OperatingPoint as OperatingPointRow


@dataclass(frozen=True)
class EvaluationInfo:
    """One stored evaluation (without its per-image outputs)."""

    id: int
    run_id: int | None
    run_name: str | None  # the run's name, when the evaluation belongs to a run
    model_ref: str  # "run:ID", "default" or a .keras path
    dataset_id: int | None
    split: str
    source: str  # the path evaluated
    labels: tuple[str, ...]
    images_key: str  # equal keys = the same images in the same order (comparable)
    metrics: dict  # EvalReport.to_dict() at the operating point of the time
    n: int
    created_at: datetime
    dataset_name: str | None = None
    # Label provenance (None on evaluations stored before it was recorded):
    label_source: str | None = None  # "original" | "current": the labels y_true came from
    label_scheme: str | None = None  # how folder labels map to ``labels``
    label_hash: str | None = None  # sha256 of those labels over the evaluated images
    label_relabel_id: int | None = None  # the dataset's newest relabel then (None: none)
    overlap: dict | None = None  # evaluated images the run trained / selected on
    dataset_external: bool = False  # the dataset is flagged as another site or period

    @property
    def labels_text(self) -> str:
        """e.g. ``current labels (relabels ≤ #57, 3f2a9c…)`` or ``labels not recorded``."""
        if self.label_source is None:
            return "labels not recorded"
        upto = "" if self.label_source == "original" else (
            f"relabels ≤ #{self.label_relabel_id}, " if self.label_relabel_id else "no relabels, ")
        return f"{self.label_source} labels ({upto}{(self.label_hash or '')[:8]}…)"

    @property
    def title(self) -> str:
        """A short human name: run name/ref, split and id."""
        who = self.run_name or self.model_ref
        split = f" [{self.split}]" if self.split else ""
        return f"#{self.id} {who}{split}"


@dataclass(frozen=True, eq=False)
class EvalPredictions:
    """Per-image outputs of one evaluation, in stored (evaluation) order."""

    evaluation_id: int
    labels: tuple[str, ...]
    image_ids: tuple[int | None, ...]
    paths: tuple[str, ...]
    y_true: np.ndarray  # (N,) class indices
    probs: np.ndarray  # (N, C)


@dataclass(frozen=True)
class OperatingPoint:
    """One row of a model's threshold history, global or for one site (the newest row of a
    scope is in force there)."""

    id: int
    run_id: int | None  # None for a model without a run (the shipped "default")
    threshold: float
    method: str  # sensitivity | youden | manual
    target: float | None
    sensitivity: float | None  # on the data it was chosen on, when known
    specificity: float | None
    changed_by: str
    note: str
    created_at: datetime
    model_ref: str = ""  # "run:ID" | "default"
    dataset_id: int | None = None  # None: the model's global operating point; else a site's
    dataset_name: str | None = None
    sample_n: int | None = None  # images of the sample it was chosen on, when known
    details: dict = field(default_factory=dict)  # intervals, labels, the split chosen on

    @property
    def is_site(self) -> bool:
        """True for a site threshold (a dataset's own operating point)."""
        return self.dataset_id is not None

    @property
    def chosen_on(self) -> str | None:
        """The split or sample it was chosen on ("calibration", "val", "site", ...)."""
        return self.details.get("chosen_on")


@dataclass(frozen=True)
class RunBrief:
    """What the evaluation pages need to name a run."""

    id: int
    name: str
    status: str
    artifact_dir: str | None


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; the stored values are UTC."""
    return value.replace(tzinfo=timezone.utc) if value and value.tzinfo is None else value


# -- Evaluations ----------------------------------------------------------------------------

def prediction_columns(probs: Sequence[float], labels: Sequence[str],
                       threshold: float | None = None) -> dict:
    """The SQL-sortable columns of one probability vector: ``score`` (P(pneumonia): column 1
    of a binary model, else 1 - P(NORMAL), else the top probability), ``pred_index`` (argmax;
    with a ``threshold`` on three or more classes, the hierarchical reading's decision: class
    0 unless 1 - p[0] reaches it, then the most probable other class) and ``top2_margin``
    (top-2 gap). Migration 0005 backfills old rows the same way."""
    p = [float(v) for v in probs]
    if len(p) == 1 and len(labels) == 2:
        p = [1.0 - p[0], p[0]]  # a sigmoid model's single P(positive)
    if len(p) < 2:
        return {"score": None, "pred_index": None, "top2_margin": None}
    top = sorted(p, reverse=True)
    if len(p) == 2:
        score = p[1]
    elif "NORMAL" in labels:
        score = 1.0 - p[list(labels).index("NORMAL")]
    else:
        score = top[0]
    pred = p.index(top[0])
    if threshold is not None and len(p) > 2:
        rest = p[1:]
        pred = 1 + rest.index(max(rest)) if 1.0 - p[0] >= threshold else 0
    return {"score": score, "pred_index": pred, "top2_margin": top[0] - top[1]}


def add_evaluation(*, session: Session, run_id: int | None, model_ref: str,
                   dataset_id: int | None, split: str, source: str, labels: Sequence[str],
                   images_key: str, metrics: dict, image_ids: Sequence[int | None],
                   paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                   label_source: str | None = None, label_scheme: str | None = None,
                   label_hash: str | None = None, label_relabel_id: int | None = None,
                   overlap: dict | None = None) -> int:
    """Store an evaluation (with the labels it was scored against) and one prediction row per
    image; returns the evaluation id."""
    row = Evaluation(run_id=run_id, model_ref=model_ref, dataset_id=dataset_id, split=split,
                     source=source, labels_json=json.dumps(list(labels)),
                     images_key=images_key, metrics_json=json.dumps(metrics),
                     label_source=label_source, label_scheme=label_scheme,
                     label_snapshot_hash=label_hash, label_snapshot_relabel_id=label_relabel_id,
                     overlap_json=None if overlap is None else json.dumps(overlap),
                     n_predictions=len(image_ids))
    session.add(row)
    session.flush()
    rows = [{"evaluation_id": row.id, "image_id": None if i is None else int(i), "path": str(p),
             "y_true": int(y), "probs_json": json.dumps([float(v) for v in pr]),
             **prediction_columns(np.atleast_1d(pr), labels, metrics.get("threshold")
                                  if len(labels) > 2 else None)}
            for i, p, y, pr in zip(image_ids, paths, np.asarray(y_true), np.asarray(probs))]
    for start in range(0, len(rows), 1000):
        session.execute(insert(EvalPrediction), rows[start:start + 1000])
    return row.id


def _info(row: Evaluation, run_name: str | None, n: int,
          dataset_name: str | None, with_metrics: bool = True,
          external: bool | None = False) -> EvaluationInfo:
    return EvaluationInfo(row.id, row.run_id, run_name or (f"run {row.run_id}" if row.run_id
                                                           else None),
                          row.model_ref, row.dataset_id, row.split, row.source,
                          tuple(json.loads(row.labels_json)), row.images_key,
                          json.loads(row.metrics_json or "{}") if with_metrics else {}, n,
                          _utc(row.created_at), dataset_name, row.label_source, row.label_scheme,
                          row.label_snapshot_hash, row.label_snapshot_relabel_id,
                          json.loads(row.overlap_json) if row.overlap_json else None,
                          bool(external))


def _n_predictions(session: Session, row: Evaluation) -> int:
    if row.n_predictions is not None:
        return row.n_predictions
    return session.scalar(select(func.count()).where(EvalPrediction.evaluation_id == row.id)) or 0


def list_evaluations(*, session: Session, run_id: int | None = None,
                     images_key: str | None = None, with_metrics: bool = True,
                     limit: int | None = None, offset: int = 0) -> list[EvaluationInfo]:
    """Stored evaluations, newest first, optionally of one run or on one image set; a page of
    them with ``limit``/``offset``. ``with_metrics=False`` leaves ``metrics`` empty (a list
    need not parse every evaluation's stored curves)."""
    q = (select(Evaluation, Run.name, Dataset.name, Dataset.external)
         .outerjoin(Run, Run.id == Evaluation.run_id)
         .outerjoin(Dataset, Dataset.id == Evaluation.dataset_id)
         .order_by(Evaluation.id.desc()))
    if run_id is not None:
        q = q.where(Evaluation.run_id == run_id)
    if images_key is not None:
        q = q.where(Evaluation.images_key == images_key)
    if limit is not None:
        q = q.limit(limit).offset(offset)
    return [_info(row, name, _n_predictions(session, row), ds, with_metrics, external)
            for row, name, ds, external in session.execute(q)]


def get_evaluation(*, session: Session, evaluation_id: int) -> EvaluationInfo | None:
    """One evaluation, or None."""
    row = session.get(Evaluation, evaluation_id)
    if row is None:
        return None
    name = session.scalar(select(Run.name).where(Run.id == row.run_id)) if row.run_id else None
    ds, external = (session.execute(select(Dataset.name, Dataset.external).where(
        Dataset.id == row.dataset_id)).one_or_none() or (None, False)) if row.dataset_id else (
        None, False)
    return _info(row, name, _n_predictions(session, row), ds, external=external)


def get_predictions(*, session: Session, evaluation_id: int) -> EvalPredictions | None:
    """Per-image outputs of an evaluation in stored order, or None if there is no such one."""
    labels_json = session.scalar(select(Evaluation.labels_json).where(
        Evaluation.id == evaluation_id))
    if labels_json is None:
        return None
    q = (select(EvalPrediction.image_id, EvalPrediction.path, EvalPrediction.y_true,
                EvalPrediction.probs_json)
         .where(EvalPrediction.evaluation_id == evaluation_id).order_by(EvalPrediction.id))
    rows = session.connection().execute(q).all()  # Core rows: no ORM bookkeeping
    labels = tuple(json.loads(labels_json))
    # One parse of all rows (a JSON array of the stored arrays), not one per row.
    probs = (np.array(json.loads("[" + ",".join(r[3] for r in rows) + "]"), dtype=float)
             if rows else np.zeros((0, len(labels))))
    return EvalPredictions(evaluation_id, labels, tuple(r[0] for r in rows),
                           tuple(r[1] for r in rows),
                           np.array([r[2] for r in rows], dtype=np.int64), probs)


# -- Runs (read-only here: names and artifact folders for the evaluation pages) -------------

def get_run_brief(*, session: Session, run_id: int) -> RunBrief | None:
    """A run's id, name, status and artifact folder, or None."""
    row = session.get(Run, run_id)
    if row is None:
        return None
    return RunBrief(row.id, row.name or f"run {row.id}", row.status, row.artifact_dir)


def list_run_briefs(*, session: Session, status: str | None = None) -> list[RunBrief]:
    """Runs, newest first, optionally with one status (e.g. "finished")."""
    q = select(Run.id, Run.name, Run.status, Run.artifact_dir).order_by(Run.id.desc())
    if status is not None:
        q = q.where(Run.status == status)
    return [RunBrief(i, n or f"run {i}", s, a) for i, n, s, a in session.execute(q)]


# -- Operating points -----------------------------------------------------------------------
# A row's scope is (model_ref, dataset_id): dataset NULL is the model's global operating point,
# a dataset id that site's (a site threshold). The newest row of a scope is in force.

def _op(row: OperatingPointRow, dataset_name: str | None = None) -> OperatingPoint:
    return OperatingPoint(row.id, row.run_id, row.threshold, row.method, row.target,
                          row.sensitivity, row.specificity, row.changed_by, row.note,
                          _utc(row.created_at), row.model_ref, row.dataset_id, dataset_name,
                          row.sample_n, json.loads(row.details_json) if row.details_json else {})


def add_operating_point(*, session: Session, run_id: int | None, threshold: float, method: str,
                        target: float | None, sensitivity: float | None,
                        specificity: float | None, changed_by: str, note: str = "",
                        model_ref: str | None = None, dataset_id: int | None = None,
                        sample_n: int | None = None,
                        details: dict | None = None) -> OperatingPoint:
    """Append a row to a model's threshold history (global, or for ``dataset_id``); it becomes
    the operating point of that scope. ``model_ref`` defaults to ``"run:<run_id>"``."""
    if model_ref is None and run_id is None:
        raise ValueError("an operating point needs a run id or a model_ref")
    row = OperatingPointRow(run_id=run_id, model_ref=model_ref or f"run:{run_id}",
                            dataset_id=dataset_id, threshold=float(threshold), method=method,
                            target=target, sensitivity=sensitivity, specificity=specificity,
                            changed_by=changed_by, note=note, sample_n=sample_n,
                            details_json=json.dumps(details) if details else None)
    session.add(row)
    session.flush()
    name = session.scalar(select(Dataset.name).where(Dataset.id == dataset_id)) \
        if dataset_id is not None else None
    return _op(row, name)


def latest_operating_point(*, session: Session, run_id: int) -> OperatingPoint | None:
    """The run's global operating point (its newest row without a dataset), or None."""
    row = session.scalar(select(OperatingPointRow).where(
        OperatingPointRow.run_id == run_id, OperatingPointRow.dataset_id.is_(None))
        .order_by(OperatingPointRow.id.desc()).limit(1))
    return None if row is None else _op(row)


def operating_points(*, session: Session, run_id: int) -> list[OperatingPoint]:
    """The run's global threshold history, newest first (site thresholds: :func:`site_points`)."""
    rows = session.scalars(select(OperatingPointRow).where(
        OperatingPointRow.run_id == run_id, OperatingPointRow.dataset_id.is_(None))
        .order_by(OperatingPointRow.id.desc())).all()
    return [_op(r) for r in rows]


def site_operating_point(*, session: Session, model_ref: str,
                         dataset_id: int) -> OperatingPoint | None:
    """The newest site threshold of ``model_ref`` for one dataset, or None."""
    found = session.execute(
        select(OperatingPointRow, Dataset.name).join(Dataset, Dataset.id ==
                                                     OperatingPointRow.dataset_id)
        .where(OperatingPointRow.model_ref == model_ref,
               OperatingPointRow.dataset_id == dataset_id)
        .order_by(OperatingPointRow.id.desc()).limit(1)).first()
    return None if found is None else _op(*found)


def site_points(*, session: Session, model_ref: str | None = None,
                dataset_id: int | None = None, limit: int = 100) -> list[OperatingPoint]:
    """Site thresholds (rows with a dataset), newest first, optionally of one model and/or
    one dataset; at most ``limit`` rows."""
    q = (select(OperatingPointRow, Dataset.name)
         .join(Dataset, Dataset.id == OperatingPointRow.dataset_id)
         .order_by(OperatingPointRow.id.desc()).limit(limit))
    if model_ref is not None:
        q = q.where(OperatingPointRow.model_ref == model_ref)
    if dataset_id is not None:
        q = q.where(OperatingPointRow.dataset_id == dataset_id)
    return [_op(row, name) for row, name in session.execute(q)]


@dataclass(frozen=True)
class RunOverlap:
    """Evaluated images that the evaluated run trained on ("train"), selected on ("val") or
    chose its threshold on ("calib", the calibration slice)."""

    recorded: bool  # False: the run's images were not recorded (a run from before 0003)
    train_images: int = 0
    val_images: int = 0
    train_patients: int = 0  # patients of the evaluated images among the training patients
    val_patients: int = 0
    same_content: int = 0  # evaluated images byte-identical to a training image elsewhere
    # None: the run has no calibration slice (its threshold was chosen on "val").
    calib_images: int | None = None
    calib_patients: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_patients(*, session: Session, run_id: int) -> dict[str, list[str]]:
    """The patients of a run's train, val and calib images, sorted (what a shipped model's
    card keeps so an evaluation anywhere can say which evaluated patients it has seen)."""
    rows = session.execute(
        select(RunImage.role, ImageRow.patient).join(ImageRow, ImageRow.id == RunImage.image_id)
        .where(RunImage.run_id == run_id, ImageRow.patient.is_not(None)).distinct()).all()
    return {role: sorted({p for r, p in rows if r == role})
            for role in ("train", "val", "calib")}


def run_image_hashes(*, session: Session, run_id: int, prefix: int = 16) -> list[str]:
    """The content hashes (first ``prefix`` hex digits) of every image a run trained, selected
    or chose its threshold on, sorted: what a shipped model's card keeps so an evaluation
    anywhere can leave out byte-identical films."""
    rows = session.scalars(
        select(ImageRow.sha256).join(RunImage, RunImage.image_id == ImageRow.id)
        .where(RunImage.run_id == run_id, ImageRow.sha256.is_not(None)).distinct())
    return sorted({h[:prefix] for h in rows})


def patient_overlap(seen: dict[str, list[str]], patients: Sequence[str | None], *,
                    same_dataset: bool = False) -> RunOverlap:
    """:func:`run_overlap` for a model known only by its card: how many of the evaluated
    images' patients it trained, selected or chose its threshold on (images are not known).

    Patients are scoped by dataset (:func:`cxr_core.core.records.scoped_patient`): a file-name
    patient counts only when the evaluated dataset is the card's own training folder
    (``same_dataset``); a metadata or DICOM patient (a salted hash) counts anywhere."""
    def key(p: str) -> tuple | str | None:
        return scoped_patient(0 if same_dataset else None, p)

    evaluated = {key(p) for p in patients if p}
    counts = {role: len(evaluated & {scoped_patient(0, q) for q in seen.get(role) or ()})
              for role in ("train", "val", "calib")}
    return RunOverlap(True, train_patients=counts["train"], val_patients=counts["val"],
                      calib_patients=counts["calib"] if seen.get("calib") else None)


def run_overlap(*, session: Session, run_id: int, image_ids: Sequence[int]) -> RunOverlap:
    """How many of ``image_ids`` (and their patients) the run trained on, selected on or
    chose its threshold on (its calibration slice).

    Images are the same row (dataset, path) or the same bytes (sha256, e.g. the same file
    indexed as another dataset); patients are compared scoped by dataset unless a metadata CSV
    or DICOM links them (:func:`cxr_core.core.records.scoped_patient`).
    """
    rows = session.execute(
        select(RunImage.role, ImageRow.id, ImageRow.dataset_id, ImageRow.patient,
               ImageRow.sha256).join(ImageRow, ImageRow.id == RunImage.image_id)
        .where(RunImage.run_id == run_id)).all()
    if not rows:
        return RunOverlap(False)
    ids = [int(i) for i in image_ids]
    evaluated = []
    for i in range(0, len(ids), 500):
        evaluated += session.execute(select(ImageRow.id, ImageRow.dataset_id, ImageRow.patient,
                                            ImageRow.sha256).where(
            ImageRow.id.in_(ids[i:i + 500]))).all()
    out: dict[str, int | None] = {}
    seen_sha = {r.sha256 for r in rows if r.sha256}
    for role in ("train", "val", "calib"):
        mine = [r for r in rows if r.role == role]
        by_id = {r.id for r in mine}
        patients = {scoped_patient(r.dataset_id, r.patient) for r in mine if r.patient}
        out[f"{role}_images"] = sum(e.id in by_id for e in evaluated)
        out[f"{role}_patients"] = len({scoped_patient(e.dataset_id, e.patient) for e in evaluated
                                       if e.patient
                                       and scoped_patient(e.dataset_id, e.patient) in patients})
    if not any(r.role == "calib" for r in rows):
        out["calib_images"] = out["calib_patients"] = None
    train_ids = {r.id for r in rows}
    out["same_content"] = sum(e.id not in train_ids and e.sha256 in seen_sha for e in evaluated)
    return RunOverlap(True, **out)


def run_seen_images(*, session: Session, run_id: int, image_ids: Sequence[int]) -> list[bool] | None:
    """Per image of ``image_ids``: did the run train, select or choose its threshold on it (the
    same image row, the same bytes, or the same patient, scoped as in :func:`run_overlap`)?
    None when the run's images were not recorded (then nothing can be called unseen)."""
    rows = session.execute(
        select(RunImage.image_id, ImageRow.dataset_id, ImageRow.patient, ImageRow.sha256)
        .join(ImageRow, ImageRow.id == RunImage.image_id)
        .where(RunImage.run_id == run_id)).all()
    if not rows:
        return None
    seen_ids = {r.image_id for r in rows}
    seen_sha = {r.sha256 for r in rows if r.sha256}
    seen_patients = {scoped_patient(r.dataset_id, r.patient) for r in rows if r.patient}
    info: dict[int, tuple] = {}
    ids = [int(i) for i in image_ids]
    for i in range(0, len(ids), 500):
        for r in session.execute(select(ImageRow.id, ImageRow.dataset_id, ImageRow.patient,
                                        ImageRow.sha256).where(ImageRow.id.in_(ids[i:i + 500]))):
            info[r.id] = (r.dataset_id, r.patient, r.sha256)
    out = []
    for i in ids:
        ds_id, patient, sha = info.get(i, (None, None, None))
        out.append(i in seen_ids or (sha is not None and sha in seen_sha)
                   or (patient is not None and scoped_patient(ds_id, patient) in seen_patients))
    return out
