"""Review queues as SQL: the next image of a queue and its counts, without reading the dataset.

Each queue is one SELECT over indexed columns (images by dataset/label, the run's newest
prediction per image with its score columns, a reviewer's active relabels by image and
reviewer), so a click costs a few indexed queries at any dataset size:

- ``random``: readable images in a seeded hash order (stable per seed, any size);
- ``class``: readable images of one original folder class, by id;
- ``disagreement`` / ``uncertain``: the model's newest prediction of each image, ordered by the
  distance to the decision (binary: ``|score - threshold|``; multi-class: the top-2 gap),
  disagreement keeping those whose predicted class differs from the original label;
- ``new_site``: ordered for learning at a new site: the most uncertain film of each patient
  first (one film per patient before any patient's second), then by the distance to the
  decision, so one patient's films do not fill the first reviews;
- ``mislabelled``: the images a stored label audit flagged (out-of-fold confident learning,
  :mod:`cxr_core.storage.label_audits`), most likely wrong first;
- ``conflicts``: images whose readers' newest reads differ (double reading), for an
  adjudicator, by id.

Under double reading (``reads_per_image`` N >= 2) an image leaves a reader's queue once N
readers have read it or it was adjudicated.

The "sent" and "changed" queues are short lists (what people sent, what changed on disk) and
are built by :mod:`cxr_core.review.queues` from their own tables.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.orm import Session, aliased

from cxr_core.core.labels import scheme_label, scheme_of_classes
from cxr_core.storage.aggregates import materialize
from cxr_core.storage.relabels import COUNTING_KINDS, READ_KINDS
from db.models import EvalPrediction, Evaluation, ImageRow, LabelAuditImage, Relabel

SQL_QUEUES = ("disagreement", "uncertain", "new_site", "random", "class", "mislabelled",
              "conflicts")
MODEL_QUEUES = ("disagreement", "uncertain", "new_site")  # need a model's scores
_HASH_P = 4294967291  # a prime above 2**31: the random queue's order is a hash mod P


@dataclass(frozen=True)
class RunScores:
    """Where a model queue reads its scores: a model's predictions on a dataset (a run's, or
    a model's without a run: the shipped ``default``, an ensemble, a file)."""

    model_ref: str  # "run:ID" or another model reference
    labels: tuple[str, ...]  # class names of the newest evaluation
    threshold: float | None  # binary operating point (None: 0.5)

    @property
    def run_id(self) -> int | None:
        ref = self.model_ref
        return int(ref[4:]) if ref.startswith("run:") and ref[4:].isdigit() else None


@dataclass(frozen=True)
class QueueRow:
    """One image of a queue, with the model output when the queue has one."""

    image_id: int
    score: float | None = None
    predicted: str | None = None


def active_relabel_by(reviewer: str, image_id: ColumnElement) -> ColumnElement[bool]:
    """True where ``reviewer`` has a relabel (or confirmation) of the image that still
    stands: not an undo row, and not undone (uses ix_relabels_image_reviewer, ix_relabels_undo_of)."""
    r, u = aliased(Relabel), aliased(Relabel)
    return exists().where(r.image_id == image_id, r.reviewer == reviewer, r.undo_of.is_(None),
                          ~exists().where(u.undo_of == r.id))


def _standing(r) -> ColumnElement[bool]:
    """``r`` (an aliased relabel) is not an undo row and was not undone."""
    u = aliased(Relabel)
    return and_(r.undo_of.is_(None), ~exists().where(u.undo_of == r.id))


def enough_reads(reads_per_image: int, image_id: ColumnElement) -> ColumnElement[bool]:
    """True where the image needs no more readers: ``reads_per_image`` distinct readers have a
    standing read of it, or a standing adjudication settled it."""
    r, a = aliased(Relabel), aliased(Relabel)
    readers = select(func.count(func.distinct(r.reviewer))).where(
        r.image_id == image_id, r.kind == "read", _standing(r)).scalar_subquery()
    adjudicated = exists().where(a.image_id == image_id, a.kind == "adjudication", _standing(a))
    return or_(readers >= reads_per_image, adjudicated)


def _conflicting(dataset_id: int):
    """Subquery (image_id) of the dataset's images whose readers' newest standing reads since
    the newest standing adjudication differ (the rule of
    :func:`cxr_core.storage.relabels.reading_round`)."""
    a = aliased(Relabel)
    last_adj = select(func.coalesce(func.max(a.id), 0)).where(
        a.image_id == Relabel.image_id, a.kind == "adjudication", _standing(a)).scalar_subquery()
    label = Relabel.new_label + func.coalesce("·" + Relabel.new_subtype, "")
    ranked = (select(Relabel.image_id.label("image_id"), label.label("label"),
                     func.row_number().over(partition_by=(Relabel.image_id, Relabel.reviewer),
                                            order_by=Relabel.id.desc()).label("rn"))
              .join(ImageRow, ImageRow.id == Relabel.image_id)
              .where(ImageRow.dataset_id == dataset_id, Relabel.kind == "read",
                     _standing(Relabel), Relabel.id > last_adj)
              .subquery())
    return (select(ranked.c.image_id).where(ranked.c.rn == 1).group_by(ranked.c.image_id)
            .having(func.count(func.distinct(ranked.c.label)) > 1))


def count_conflicts(*, session: Session, dataset_id: int) -> int:
    """Images of the dataset waiting for an adjudication."""
    return int(session.scalar(select(func.count()).select_from(
        _conflicting(dataset_id).subquery())) or 0)


def _readable(dataset_id: int):
    return and_(ImageRow.dataset_id == dataset_id, ImageRow.error.is_(None),
                ImageRow.missing.is_(False))


def _of_model(model_ref: str) -> ColumnElement[bool]:
    """Evaluations of a model: a run's by run id (whatever reference they were stored under),
    another model's by its reference."""
    if model_ref.startswith("run:") and model_ref[4:].isdigit():
        return Evaluation.run_id == int(model_ref[4:])
    return and_(Evaluation.run_id.is_(None), Evaluation.model_ref == model_ref)


def latest_prediction_ids(model_ref: str, dataset_id: int) -> Select:
    """The id of the model's newest prediction row of each image of the dataset."""
    return (select(func.max(EvalPrediction.id).label("pid"))
            .join(Evaluation, Evaluation.id == EvalPrediction.evaluation_id)
            .where(_of_model(model_ref), Evaluation.dataset_id == dataset_id,
                   EvalPrediction.image_id.is_not(None))
            .group_by(EvalPrediction.image_id))


def run_scores(*, session: Session, model_ref: str, dataset_id: int,
               threshold: float | None) -> RunScores | None:
    """The class names of the model's newest evaluation on the dataset (None: no evaluation)."""
    import json

    labels = session.scalar(select(Evaluation.labels_json).where(
        _of_model(model_ref), Evaluation.dataset_id == dataset_id)
        .order_by(Evaluation.id.desc()).limit(1))
    return None if labels is None else RunScores(model_ref, tuple(json.loads(labels)),
                                                 threshold)


def _truth_index(session: Session, dataset_id: int, labels: Sequence[str]) -> ColumnElement:
    """The image's original label as a class index of ``labels`` (NULL: no class there)."""
    scheme = scheme_of_classes(labels)
    pairs = session.execute(select(ImageRow.label, ImageRow.subtype).where(
        ImageRow.dataset_id == dataset_id).distinct()).all()
    whens = []
    for label, subtype in pairs:
        cls = scheme_label(label, subtype, scheme)
        if cls in labels:
            sub = ImageRow.subtype.is_(None) if subtype is None else ImageRow.subtype == subtype
            whens.append((and_(ImageRow.label == label, sub), list(labels).index(cls)))
    return case(*whens, else_=None) if whens else literal(None)


def _model_query(session: Session, dataset_id: int, kind: str, scores: RunScores):
    """(select of image_id, score, predicted index, margin; the ORDER BY) of a model queue."""
    binary = len(scores.labels) == 2
    t = 0.5 if scores.threshold is None else float(scores.threshold)
    predicted = case((EvalPrediction.score >= t, 1), else_=0) if binary \
        else EvalPrediction.pred_index
    margin = func.abs(EvalPrediction.score - t) if binary else EvalPrediction.top2_margin
    latest = latest_prediction_ids(scores.model_ref, dataset_id).subquery()
    q = (select(ImageRow.id, EvalPrediction.score, predicted.label("predicted"))
         .select_from(latest)
         .join(EvalPrediction, EvalPrediction.id == latest.c.pid)
         .join(ImageRow, ImageRow.id == EvalPrediction.image_id)
         .where(_readable(dataset_id), EvalPrediction.score.is_not(None)))
    if kind == "disagreement":
        truth = _truth_index(session, dataset_id, scores.labels)
        q = q.where(truth.is_not(None), predicted != truth)
        return q, (margin.desc(), ImageRow.id)
    if kind == "new_site":  # rank within the patient over every film (reviewed ones too)
        patient = func.coalesce(ImageRow.patient, literal("#").concat(cast(ImageRow.id, String)))
        ranked = q.add_columns(margin.label("margin"), func.row_number().over(
            partition_by=patient, order_by=(margin.asc(), ImageRow.id)).label("nth")).subquery()
        q = (select(ranked.c.id, ranked.c.score, ranked.c.predicted)
             .select_from(ranked).join(ImageRow, ImageRow.id == ranked.c.id))
        return q, (ranked.c.nth, ranked.c.margin, ranked.c.id)
    return q, (margin.asc(), ImageRow.id)


def _queue_query(session: Session, dataset_id: int, kind: str, *, class_name: str | None,
                 seed: int, scores: RunScores | None, audit_id: int | None = None):
    """(select whose first columns are image_id[, score, predicted index]; the ORDER BY)."""
    if kind in MODEL_QUEUES:
        if scores is None:
            return None, ()
        return _model_query(session, dataset_id, kind, scores)
    if kind == "mislabelled":
        if audit_id is None:
            return None, ()
        q = (select(ImageRow.id).join(LabelAuditImage, LabelAuditImage.image_id == ImageRow.id)
             .where(_readable(dataset_id), LabelAuditImage.audit_id == audit_id,
                    LabelAuditImage.issue_rank.is_not(None)))
        return q, (LabelAuditImage.issue_rank, ImageRow.id)
    if kind == "conflicts":
        return (select(ImageRow.id).where(_readable(dataset_id),
                                          ImageRow.id.in_(_conflicting(dataset_id))),
                (ImageRow.id,))
    q = select(ImageRow.id).where(_readable(dataset_id))
    if kind == "class":
        return q.where(ImageRow.label == class_name), (ImageRow.id,)
    return q, (_seeded_order(seed), ImageRow.id)


def _seeded_order(seed: int) -> ColumnElement:
    """``(id * m + c) mod P``: a bijection of the ids for each seed, with the multiplier and
    offset drawn from the seed's hash (so seeds 7 and 8 give unrelated orders)."""
    h = int.from_bytes(hashlib.sha256(str(int(seed)).encode()).digest()[:8], "big")
    m = 2 + h % (_HASH_P - 2)
    c = (h >> 32) % _HASH_P
    return (cast(ImageRow.id, BigInteger) * m + c) % _HASH_P  # 64-bit (PostgreSQL ints are 32)


def _row(scores: RunScores | None, row) -> QueueRow:
    if len(row) == 1 or scores is None:
        return QueueRow(int(row[0]))
    return QueueRow(int(row[0]), None if row[1] is None else float(row[1]),
                    scores.labels[int(row[2])] if row[2] is not None else None)


def _done_for(kind: str, reviewer: str, reads_per_image: int,
              image_id: ColumnElement) -> ColumnElement[bool] | None:
    """When an image of a queue counts as done for ``reviewer``: reviewed by them, or (double
    reading) read by enough readers; the conflicts queue empties itself (None)."""
    if kind == "conflicts":
        return None
    mine = active_relabel_by(reviewer, image_id)
    return or_(mine, enough_reads(reads_per_image, image_id)) if reads_per_image > 1 else mine


def queue_counts(*, session: Session, dataset_id: int, kind: str, reviewer: str,
                 class_name: str | None = None, scores: RunScores | None = None,
                 audit_id: int | None = None, reads_per_image: int = 1) -> tuple[int, int]:
    """(images in the queue, of them done for ``reviewer``: reviewed by them or, under double
    reading, read by enough readers)."""
    q, _ = _queue_query(session, dataset_id, kind, class_name=class_name, seed=0, scores=scores,
                        audit_id=audit_id)
    if q is None:
        return 0, 0
    sub = q.subquery()
    total = session.scalar(select(func.count()).select_from(sub)) or 0
    done_when = _done_for(kind, reviewer, reads_per_image, sub.c.id)
    done = 0 if done_when is None else session.scalar(
        select(func.count()).select_from(sub).where(done_when)) or 0
    return int(total), int(done)


def queue_next(*, session: Session, dataset_id: int, kind: str, reviewer: str,
               class_name: str | None = None, seed: int = 0, scores: RunScores | None = None,
               skipped: Sequence[int] = (), audit_id: int | None = None,
               reads_per_image: int = 1) -> QueueRow | None:
    """The first image of the queue not done for ``reviewer``; skipped images come back
    (in the order they were skipped) once the rest is done."""
    q, order = _queue_query(session, dataset_id, kind, class_name=class_name, seed=seed,
                            scores=scores, audit_id=audit_id)
    if q is None:
        return None
    done_when = _done_for(kind, reviewer, reads_per_image, ImageRow.id)
    if done_when is not None:
        q = q.where(~done_when)
    skipped_ids = [int(i) for i in skipped if isinstance(i, int)]
    if skipped_ids:
        row = session.execute(q.where(ImageRow.id.not_in(skipped_ids)).order_by(*order)
                              .limit(1)).first()
        if row is not None:
            return _row(scores, row)
        left = {int(r[0]): r for r in session.execute(q.where(ImageRow.id.in_(skipped_ids)))}
        first = next((i for i in skipped_ids if i in left), None)
        return None if first is None else _row(scores, left[first])
    row = session.execute(q.order_by(*order).limit(1)).first()
    return None if row is None else _row(scores, row)


def queue_page(*, session: Session, dataset_id: int, kind: str, class_name: str | None = None,
               seed: int = 0, scores: RunScores | None = None, offset: int = 0,
               limit: int = 50, audit_id: int | None = None) -> list[QueueRow]:
    """A page of the queue in review order (reviewed images included)."""
    q, order = _queue_query(session, dataset_id, kind, class_name=class_name, seed=seed,
                            scores=scores, audit_id=audit_id)
    if q is None:
        return []
    return [_row(scores, r) for r in session.execute(q.order_by(*order).offset(offset)
                                                     .limit(limit))]


def image_score(*, session: Session, dataset_id: int, image_id: int,
                scores: RunScores) -> QueueRow:
    """The run's newest output on one image (no score when it has none)."""
    binary = len(scores.labels) == 2
    t = 0.5 if scores.threshold is None else float(scores.threshold)
    predicted = case((EvalPrediction.score >= t, 1), else_=0) if binary \
        else EvalPrediction.pred_index
    row = session.execute(
        select(EvalPrediction.image_id, EvalPrediction.score, predicted)
        .join(Evaluation, Evaluation.id == EvalPrediction.evaluation_id)
        .where(EvalPrediction.image_id == image_id, Evaluation.run_id == scores.run_id,
               Evaluation.dataset_id == dataset_id, EvalPrediction.score.is_not(None))
        .order_by(EvalPrediction.id.desc()).limit(1)).first()
    return QueueRow(image_id) if row is None else _row(scores, row)


def reviewed_among(*, session: Session, reviewer: str | None, image_ids: Iterable[int] = (),
                   upload_sha256s: Iterable[str] = ()) -> set[int | str]:
    """Which of these images (ids) and uploads (sha256) ``reviewer`` has an active relabel,
    confirmation or read of; with ``reviewer`` None, which are **confirmed**: they have a
    label that counts (a standing relabel, consensus or adjudication; a double reading's
    reads alone confirm nothing)."""
    u = aliased(Relabel)
    active = and_(Relabel.undo_of.is_(None), ~exists().where(u.undo_of == Relabel.id),
                  Relabel.kind.in_(COUNTING_KINDS) if reviewer is None
                  else Relabel.reviewer == reviewer)
    out: set[int | str] = set()
    ids, shas = list(image_ids), list(upload_sha256s)
    for i in range(0, len(ids), 500):
        out.update(session.scalars(select(Relabel.image_id).where(
            active, Relabel.image_id.in_(ids[i:i + 500]))))
    for i in range(0, len(shas), 500):
        out.update(session.scalars(select(Relabel.upload_sha256).where(
            active, Relabel.upload_sha256.in_(shas[i:i + 500]))))
    return out


def confirmation_order(*, session: Session, image_ids: Iterable[int]) -> dict[int, int]:
    """Image id -> the id of its first relabel or confirmation still standing (the order in
    which a site's films were confirmed: labels that count); images never confirmed are left
    out."""
    u = aliased(Relabel)
    active = and_(Relabel.undo_of.is_(None), ~exists().where(u.undo_of == Relabel.id),
                  Relabel.kind.in_(COUNTING_KINDS))
    ids, out = list(image_ids), {}
    for i in range(0, len(ids), 500):
        out.update({int(img): int(first) for img, first in session.execute(
            select(Relabel.image_id, func.min(Relabel.id)).where(
                active, Relabel.image_id.in_(ids[i:i + 500])).group_by(Relabel.image_id))})
    return out


def label_pairs(*, session: Session, dataset_id: int) -> list[tuple[str, str | None]]:
    """The distinct (original label, subtype) pairs of a dataset (the label buttons)."""
    return [tuple(r) for r in session.execute(select(ImageRow.label, ImageRow.subtype).where(
        ImageRow.dataset_id == dataset_id).distinct())]


# -- Agreement: each reviewer's newest label of an image, compared pair by pair, in SQL -------

def _latest_labels(dataset_id: int):
    """Subquery (key, reviewer, label) of each reviewer's newest active relabel or read per
    image of the dataset and per upload (a consensus or an adjudication is no reader's own
    answer); ``key`` is the image id as text or the upload's sha256."""
    u = aliased(Relabel)
    key = func.coalesce(cast(Relabel.image_id, String), Relabel.upload_sha256)
    label = Relabel.new_label + case((Relabel.new_subtype.is_(None), ""),
                                     else_="·" + Relabel.new_subtype)
    ranked = (select(key.label("key"), Relabel.reviewer.label("reviewer"),
                     label.label("label"), ImageRow.relpath.label("relpath"),
                     func.row_number().over(partition_by=(key, Relabel.reviewer),
                                            order_by=Relabel.id.desc()).label("rn"))
              .outerjoin(ImageRow, ImageRow.id == Relabel.image_id)
              .where(or_(ImageRow.dataset_id == dataset_id, Relabel.upload_sha256.is_not(None)),
                     Relabel.undo_of.is_(None), Relabel.kind.in_(READ_KINDS),
                     ~exists().where(u.undo_of == Relabel.id))
              .subquery())
    return select(ranked.c.key, ranked.c.reviewer, ranked.c.label, ranked.c.relpath).where(
        ranked.c.rn == 1).subquery()


def _contingency(session: Session, latest) -> list[tuple[str, str, str, str, int]]:
    a, b = latest.alias("a"), latest.alias("b")
    q = (select(a.c.reviewer, b.c.reviewer, a.c.label, b.c.label, func.count())
         .join(b, and_(a.c.key == b.c.key, a.c.reviewer < b.c.reviewer))
         .group_by(a.c.reviewer, b.c.reviewer, a.c.label, b.c.label))
    return [(ra, rb, la, lb, int(n)) for ra, rb, la, lb, n in session.execute(q)]


def agreement_tables(*, session: Session, dataset_id: int, limit: int = 50, offset: int = 0):
    """From one derivation of each reviewer's newest labels: the contingency cells (reviewer a,
    reviewer b, label of a, label of b, images; a < b) Cohen's kappa is computed from, and
    (how many images/uploads have reviewers whose newest labels differ, a page of them as
    (key, relpath, [(reviewer, label), ...]); images first by id, then uploads)."""
    # Derived once into a temporary table indexed on the image key: the self-join of the
    # contingency then costs an index lookup, not a nested loop over a derived table.
    latest = materialize(session, _latest_labels(dataset_id), index_on=("key", "reviewer"))
    try:
        return _contingency(session, latest), _conflicts(session, latest, limit, offset)
    finally:
        latest.drop(session.connection())


def rating_counts(*, session: Session, dataset_id: int,
                  min_readers: int = 3) -> list[tuple[str, str, int]]:
    """(key, label, readers) for every image (or upload) read by at least ``min_readers``
    readers (each reader's newest answer): the table Fleiss' kappa is computed from."""
    latest = materialize(session, _latest_labels(dataset_id), index_on=("key", "reviewer"))
    try:
        keys = (select(latest.c.key).group_by(latest.c.key)
                .having(func.count() >= min_readers).subquery())
        q = (select(latest.c.key, latest.c.label, func.count())
             .where(latest.c.key.in_(select(keys.c.key)))
             .group_by(latest.c.key, latest.c.label).order_by(latest.c.key))
        return [(k, label, int(n)) for k, label, n in session.execute(q)]
    finally:
        latest.drop(session.connection())


def _conflicts(session: Session, latest, limit: int, offset: int):
    keys = (select(latest.c.key).group_by(latest.c.key)
            .having(func.count(func.distinct(latest.c.label)) > 1))
    total = session.scalar(select(func.count()).select_from(keys.subquery())) or 0
    ordered = keys.order_by(func.length(latest.c.key) > 20, func.length(latest.c.key),
                            latest.c.key).offset(offset).limit(limit)
    page = [k for (k,) in session.execute(ordered)]
    rows = session.execute(select(latest.c.key, latest.c.relpath, latest.c.reviewer,
                                  latest.c.label).where(latest.c.key.in_(page))
                           .order_by(latest.c.reviewer)).all() if page else []
    by_key: dict[str, list] = {k: [None, []] for k in page}
    for key, relpath, reviewer, label in rows:
        by_key[key][0] = relpath if relpath is not None else key
        by_key[key][1].append((reviewer, label))
    return int(total), [(k, v[0], v[1]) for k, v in by_key.items()]
