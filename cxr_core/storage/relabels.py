"""Relabel storage: append-only relabels, the labels derived from them, label snapshots.

Relabel rows are never updated or deleted. An undo is a new row whose ``undo_of`` names the
row it cancels; the current label of an image is its newest relabel that is neither an undo row
nor undone, else its original label. A row labels either an indexed image (``image_id``) or an
upload sent to review (``upload_sha256``, no dataset: it never enters a dataset's labels or
snapshot); an upload's label before any relabel is the model's prediction shown with it. Every writer here is one short ``INSERT`` (plus a small
update of ``review_items.done``), so many reviewers can write through
:meth:`cxr_core.storage.Database.write` (which retries SQLite lock errors).

Relabel ids grow with commit order on SQLite (one writer at a time), so "newest" means the
highest id and ``as_of_relabel_id`` reproduces the labels a training run saw.

Double reading (a dataset's :mod:`cxr_core.storage.reading` setting, ``reads_per_image`` >= 2):
a reader's answer is a row of kind ``read``, which never counts by itself. When enough readers'
newest reads agree, a ``consensus`` row is appended in the same transaction (its reviewer names
the readers, its basis their read ids); conflicting reads keep the label that counted before
until an adjudicator appends an ``adjudication`` row. "The label that counts" (current labels,
snapshots, "confirmed") is derived from the rows of the counting kinds only (``label``,
``consensus``, ``adjudication``), so every derivation keeps its one rule: the newest active
counting row, else the original. Undoing a read also undoes the consensus built on it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from cxr_core.core.errors import ConfigError
from cxr_core.core.labels import Label, labels_hash
from cxr_core.storage import lock_for_write
from cxr_core.storage import reading
from db.models import ImageRow, Relabel, ReviewItem

KINDS = ("label", "read", "consensus", "adjudication")
COUNTING_KINDS = ("label", "consensus", "adjudication")  # rows that make the label that counts
READ_KINDS = ("label", "read")  # one reader's own answer (what agreement compares)


@dataclass(frozen=True)
class RelabelRecord:
    """One relabel (or undo) row, with the image's path for exports."""

    id: int
    image_id: int | None  # None for an upload
    relpath: str  # path under the dataset root; an upload's sha256
    old_label: str
    old_subtype: str | None
    new_label: str
    new_subtype: str | None
    reviewer: str
    note: str
    run_ref: str | None  # model shown to the reviewer, e.g. "run:3"
    score: float | None  # model probability shown
    undo_of: int | None  # set on undo rows: the id of the undone row
    created_at: datetime
    upload_sha256: str | None = None  # set on rows of uploads (then image_id is None)
    kind: str = "label"  # label | read | consensus | adjudication (see the module docstring)
    reads_required: int | None = None  # a read: the readers the dataset needed then
    basis: tuple[int, ...] = ()  # a consensus or adjudication: the read rows it settled

    @property
    def counts(self) -> bool:
        """Whether the row (while active) makes the label that counts."""
        return self.kind in COUNTING_KINDS

    @property
    def key(self) -> int | str:
        """What is labelled: the image id, or the upload's sha256."""
        return self.image_id if self.image_id is not None else self.upload_sha256


@dataclass(frozen=True)
class LabelVersion:
    """Labels at one point of the relabel history, and that point."""

    labels: dict[int, Label]  # image_id -> (folder label, subtype)
    newest_relabel_id: int | None  # newest relabel row applied (None: none, the originals)
    n_relabels: int  # relabel rows (undo rows included) up to newest_relabel_id

    def snapshot(self) -> LabelSnapshot:
        """This version's identity: the hash of its labels and its place in the history."""
        return LabelSnapshot(labels_hash(self.labels), self.newest_relabel_id, self.n_relabels)


@dataclass(frozen=True)
class LabelSnapshot:
    """Identity of a dataset's labels at a point in the relabel history (stored on each run)."""

    hash: str  # sha256 over the sorted (image_id, label, subtype) triples
    newest_relabel_id: int | None  # None: no relabel yet (labels are the originals)
    n_relabels: int  # relabel rows (undo rows included) up to newest_relabel_id


def _record(row: Relabel, relpath: str | None) -> RelabelRecord:
    return RelabelRecord(row.id, row.image_id, relpath or row.upload_sha256 or "", row.old_label,
                         row.old_subtype, row.new_label, row.new_subtype, row.reviewer, row.note,
                         row.run_ref, row.score, row.undo_of, row.created_at, row.upload_sha256,
                         row.kind or "label", row.reads_required,
                         tuple(json.loads(row.basis_json)) if row.basis_json else ())


def list_relabels(*, session: Session, dataset_id: int | None = None,
                  image_ids: Sequence[int] | None = None,
                  as_of_relabel_id: int | None = None,
                  include_uploads: bool = False, after_id: int | None = None,
                  limit: int | None = None, newest_first: bool = False) -> list[RelabelRecord]:
    """Relabel rows (undo rows included), oldest first (keyset pages with ``after_id`` and
    ``limit``; ``newest_first`` with ``after_id`` pages backwards: ids below it).

    Args:
        session: the open session.
        dataset_id: only images of this dataset (None: every dataset).
        image_ids: only these images.
        as_of_relabel_id: only rows with ``id <= as_of_relabel_id``.
        include_uploads: also every upload's rows (no dataset; ``relpath`` is the sha256).
        after_id: only rows past this id (below it when ``newest_first``).
        limit: at most this many rows.
        newest_first: newest row first.

    Returns:
        The rows as records, in id order.
    """
    # Outer join: upload rows have no image. Without include_uploads they are filtered out,
    # so dataset labels and snapshots never see them.
    q = select(Relabel, ImageRow.relpath).outerjoin(ImageRow, ImageRow.id == Relabel.image_id)
    in_scope = Relabel.image_id.is_not(None) if dataset_id is None else \
        ImageRow.dataset_id == dataset_id
    q = q.where(or_(in_scope, Relabel.upload_sha256.is_not(None)) if include_uploads else in_scope)
    if image_ids is not None:
        q = q.where(Relabel.image_id.in_(list(image_ids)))
    if as_of_relabel_id is not None:
        q = q.where(Relabel.id <= as_of_relabel_id)
    if after_id is not None:
        q = q.where(Relabel.id < after_id if newest_first else Relabel.id > after_id)
    q = q.order_by(Relabel.id.desc() if newest_first else Relabel.id)
    if limit is not None:
        q = q.limit(limit)
    return [_record(row, relpath) for row, relpath in session.execute(q)]


def count_relabels(*, session: Session, dataset_id: int | None = None,
                   include_uploads: bool = False) -> int:
    """How many rows :func:`list_relabels` would return (undo rows included)."""
    q = select(func.count(Relabel.id)).outerjoin(ImageRow, ImageRow.id == Relabel.image_id)
    in_scope = Relabel.image_id.is_not(None) if dataset_id is None else \
        ImageRow.dataset_id == dataset_id
    q = q.where(or_(in_scope, Relabel.upload_sha256.is_not(None)) if include_uploads else in_scope)
    return int(session.scalar(q) or 0)


def newest_relabel_id(*, session: Session, dataset_id: int,
                      include_uploads: bool = True) -> int | None:
    """The id of the newest relabel row of the dataset (and of uploads): one indexed MAX."""
    in_dataset = select(func.max(Relabel.id)).join(ImageRow, ImageRow.id == Relabel.image_id) \
        .where(ImageRow.dataset_id == dataset_id)
    ids = [session.scalar(in_dataset)]
    if include_uploads:
        ids.append(session.scalar(select(func.max(Relabel.id)).where(
            Relabel.upload_sha256.is_not(None))))
    return max((i for i in ids if i is not None), default=None)


def list_upload_relabels(*, session: Session,
                         upload_sha256s: Sequence[str] | None = None) -> list[RelabelRecord]:
    """Relabel rows of uploads (undo rows included), oldest first; optionally only these hashes."""
    q = select(Relabel).where(Relabel.upload_sha256.is_not(None))
    if upload_sha256s is not None:
        q = q.where(Relabel.upload_sha256.in_(list(upload_sha256s)))
    return [_record(row, None) for row in session.scalars(q.order_by(Relabel.id))]


def active_relabels(records: Iterable[RelabelRecord]) -> list[RelabelRecord]:
    """The rows that still assert a label: not undo rows, and not undone (id order kept)."""
    rows = list(records)
    undone = {r.undo_of for r in rows if r.undo_of is not None}
    return [r for r in rows if r.undo_of is None and r.id not in undone]


def counting(records: Iterable[RelabelRecord]) -> list[RelabelRecord]:
    """The active rows that make the label that counts (a double reading's reads do not)."""
    return [r for r in active_relabels(records) if r.counts]


def derive_labels(originals: dict[int, Label],
                  records: Iterable[RelabelRecord]) -> dict[int, Label]:
    """Original labels overlaid with each image's newest active counting relabel."""
    out = dict(originals)
    for r in counting(records):  # id order: a newer row overwrites an older one
        if r.image_id in out:
            out[r.image_id] = (r.new_label, r.new_subtype)
    return out


def _newest_active(base: Label, records: Iterable[RelabelRecord]) -> Label:
    """``base`` overlaid with the newest active counting row of ``records`` (one target)."""
    active = counting(records)
    return (active[-1].new_label, active[-1].new_subtype) if active else base


def _originals(session: Session, dataset_id: int,
               include_missing: bool = False) -> dict[int, Label]:
    """Original labels of the dataset's images present on disk (missing rows keep their
    relabels but are in no label set, snapshot or run; ``include_missing`` adds them, for
    re-scoring stored outputs of images that have since gone)."""
    q = select(ImageRow.id, ImageRow.label, ImageRow.subtype).where(
        ImageRow.dataset_id == dataset_id)
    if not include_missing:
        q = q.where(ImageRow.missing.is_(False))
    return {i: (label, sub) for i, label, sub in session.connection().execute(q)}


def original_labels(*, session: Session, dataset_id: int,
                    include_missing: bool = False) -> dict[int, Label]:
    """image_id -> (label, subtype) as indexed from disk (never changed by review)."""
    return _originals(session, dataset_id, include_missing)


def label_version(*, session: Session, dataset_id: int, as_of_relabel_id: int | None = None,
                  include_missing: bool = False) -> LabelVersion:
    """The one derivation of a dataset's labels as of a relabel id.

    The relabel rows are read once and the labels derived from exactly those rows, so a
    relabel committed meanwhile cannot make the labels, their hash and the relabel id disagree.

    Args:
        session: the open session.
        dataset_id: the dataset.
        as_of_relabel_id: ignore relabel rows newer than this id (reproduces a run's snapshot);
            0 gives the original labels, None the labels as of now
            (:func:`cxr_core.data.provenance.as_of_relabel_id` maps a label source to it).
        include_missing: also the images whose file is gone (flagged missing).

    Returns:
        The labels (the newest active relabel of each image, else its original) and the
        newest relabel row read.
    """
    records = list_relabels(session=session, dataset_id=dataset_id,
                            as_of_relabel_id=as_of_relabel_id)
    labels = derive_labels(_originals(session, dataset_id, include_missing), records)
    return LabelVersion(labels, records[-1].id if records else None, len(records))


def image_label_version(*, session: Session, image_ids: Sequence[int],
                        as_of_relabel_id: int | None = None) -> LabelVersion:
    """The labels of these images (any datasets, files gone included) as of a relabel id:
    each one's newest active relabel (the rule of :func:`label_version`), else its original.

    Used to re-score stored per-image outputs; reads only these images' rows (SQL, in chunks),
    not their datasets'. The relabel id and count are those of the datasets holding them.
    """
    ids = sorted({int(i) for i in image_ids})
    labels: dict[int, Label] = {}
    dataset_ids: set[int] = set()
    u = aliased(Relabel)
    for i in range(0, len(ids), 5000):
        chunk = ids[i:i + 5000]
        for image_id, ds_id, label, sub in session.execute(
                select(ImageRow.id, ImageRow.dataset_id, ImageRow.label, ImageRow.subtype)
                .where(ImageRow.id.in_(chunk))):
            labels[image_id] = (label, sub)
            dataset_ids.add(ds_id)
        rows = select(Relabel.image_id, Relabel.new_label, Relabel.new_subtype,
                      func.row_number().over(partition_by=Relabel.image_id,
                                             order_by=Relabel.id.desc()).label("rn")).where(
            Relabel.image_id.in_(chunk), Relabel.undo_of.is_(None),
            Relabel.kind.in_(COUNTING_KINDS))
        undone = exists().where(u.undo_of == Relabel.id)
        if as_of_relabel_id is not None:
            rows = rows.where(Relabel.id <= as_of_relabel_id)
            undone = exists().where(u.undo_of == Relabel.id, u.id <= as_of_relabel_id)
        ranked = rows.where(~undone).subquery()
        for image_id, label, sub, _ in session.execute(select(ranked).where(ranked.c.rn == 1)):
            labels[image_id] = (label, sub)
    newest, n_relabels = None, 0
    if dataset_ids:
        q = select(func.max(Relabel.id), func.count(Relabel.id)).join(
            ImageRow, ImageRow.id == Relabel.image_id).where(
            ImageRow.dataset_id.in_(sorted(dataset_ids)))
        if as_of_relabel_id is not None:
            q = q.where(Relabel.id <= as_of_relabel_id)
        newest, n_relabels = session.execute(q).one()
    return LabelVersion(labels, newest, int(n_relabels or 0))


def current_labels(*, session: Session, dataset_id: int, as_of_relabel_id: int | None = None,
                   include_missing: bool = False) -> dict[int, Label]:
    """image_id -> (folder label, subtype) of :func:`label_version` (same arguments)."""
    return label_version(session=session, dataset_id=dataset_id,
                         as_of_relabel_id=as_of_relabel_id, include_missing=include_missing).labels


def label_snapshot(*, session: Session, dataset_id: int,
                   as_of_relabel_id: int | None = None) -> LabelSnapshot:
    """Hash and position of the dataset's current labels (a training run stores both).

    Args:
        session: the open session.
        dataset_id: the dataset.
        as_of_relabel_id: as in :func:`label_version` (None: as of now).

    Returns:
        The snapshot; its hash changes whenever a relabel or undo changes a current label.
    """
    return label_version(session=session, dataset_id=dataset_id,
                         as_of_relabel_id=as_of_relabel_id).snapshot()


def _upload_base(session: Session, upload_sha256: str) -> Label:
    """An upload's label before any relabel: the prediction of its newest review item."""
    found = session.execute(select(ReviewItem.id, ReviewItem.predicted).where(
        ReviewItem.upload_sha256 == upload_sha256).order_by(ReviewItem.id.desc()).limit(1)).first()
    if found is None:
        raise ConfigError("upload_sha256 must name an upload sent to review. "
                          f"Received: upload_sha256={upload_sha256!r}")
    return (found[1] or "", None)  # "" when it was sent without a model output


def upload_labels(*, session: Session,
                  upload_sha256s: Sequence[str] | None = None) -> dict[str, Label]:
    """sha256 -> current label of every upload sent to review (or of these).

    The newest active relabel of the upload, else the model's prediction stored with its
    newest review item ("" when it was sent without one).
    """
    q = (select(ReviewItem.upload_sha256, ReviewItem.predicted)
         .where(ReviewItem.upload_sha256.is_not(None)).order_by(ReviewItem.id))
    if upload_sha256s is not None:
        q = q.where(ReviewItem.upload_sha256.in_(list(upload_sha256s)))
    out: dict[str, Label] = {sha: (predicted or "", None)
                             for sha, predicted in session.execute(q)}  # newest item wins
    rows = list_upload_relabels(session=session, upload_sha256s=upload_sha256s)
    for r in counting(rows):  # id order: newest wins
        out[r.upload_sha256] = (r.new_label, r.new_subtype)
    return out


def _check_reviewer(reviewer: str) -> str:
    name = (reviewer or "").strip()
    if not name:
        raise ConfigError(f"a relabel needs a reviewer name. Received: reviewer={reviewer!r}")
    return name[:200]


def add_relabel(*, session: Session, image_id: int, new_label: str, new_subtype: str | None,
                reviewer: str, note: str = "", run_ref: str | None = None,
                score: float | None = None) -> int:
    """Append a relabel row (a confirmation of the same label is a row too).

    The old label stored is the image's current label at write time. Open review items of the
    image are marked done.

    Args:
        session: the open session (one transaction per click).
        image_id: the indexed image.
        new_label: folder class, e.g. "PNEUMONIA".
        new_subtype: "bacteria" | "virus" | None.
        reviewer: who labelled (login identity or the name typed once per session).
        note: free text.
        run_ref: the model whose output was shown, e.g. "run:3".
        score: the model probability shown.

    Returns:
        The new row's id.

    Raises:
        ConfigError: unknown image, empty label or reviewer.
    """
    return _append(session, image_id, None, new_label, new_subtype, reviewer, note, run_ref, score)


def add_upload_relabel(*, session: Session, upload_sha256: str, new_label: str,
                       new_subtype: str | None, reviewer: str, note: str = "",
                       run_ref: str | None = None, score: float | None = None) -> int:
    """Append a relabel row for an upload sent to review (same semantics as :func:`add_relabel`).

    The old label stored is the upload's current label: its newest active relabel, else the
    model's predicted label from its newest review item. Open review items of the upload are
    marked done.

    Args:
        session: the open session (one transaction per click).
        upload_sha256: the upload's content hash (its review item's ``upload_sha256``).
        new_label, new_subtype, reviewer, note, run_ref, score: as in :func:`add_relabel`.

    Returns:
        The new row's id.

    Raises:
        ConfigError: no review item names the upload, empty label or reviewer.
    """
    if not (upload_sha256 or "").strip():
        raise ConfigError("upload_sha256 must name an upload sent to review. "
                          f"Received: upload_sha256={upload_sha256!r}")
    return _append(session, None, upload_sha256, new_label, new_subtype, reviewer, note, run_ref,
                   score)


def _target_label(session: Session, image_id: int | None, upload_sha256: str | None,
                  *, without: int | None = None) -> Label:
    """Current label of an image or an upload; ``without``: as if that relabel did not count.

    Raises:
        ConfigError: unknown image, or an upload no review item names.
    """
    if image_id is not None:
        img = session.execute(select(ImageRow.label, ImageRow.subtype).where(
            ImageRow.id == image_id)).first()
        if img is None:
            raise ConfigError(f"image_id must name an indexed image. Received: image_id={image_id}")
        base, records = (img[0], img[1]), list_relabels(session=session, image_ids=[image_id])
    else:
        base = _upload_base(session, upload_sha256)
        records = list_upload_relabels(session=session, upload_sha256s=[upload_sha256])
    return _newest_active(base, [r for r in records if r.id != without])


def _image_sha(session: Session, image_id: int | None) -> str | None:
    """The image's content hash now: stored on each relabel (the bytes the reviewer saw)."""
    if image_id is None:
        return None
    return session.scalar(select(ImageRow.sha256).where(ImageRow.id == image_id))


@dataclass(frozen=True)
class ChangedImage:
    """An image whose bytes changed after a reviewer relabelled it."""

    image_id: int
    relpath: str
    relabel_id: int  # the newest active relabel
    relabelled_sha256: str | None
    current_sha256: str | None
    missing: bool


def changed_since_relabel(*, session: Session, dataset_id: int,
                          image_ids: Sequence[int] | None = None) -> list[ChangedImage]:
    """Images whose current content hash differs from the one their newest active relabel
    was made on ("image changed since it was relabelled"); the relabels are kept as they are.

    One SQL query (each image's newest active relabel by a window function): the review page
    runs it on every click, at any number of relabels."""
    # Only an image whose bytes changed since it was indexed can differ from the bytes a
    # relabel was made on: find those few first (index on dataset, content_changed_at).
    q = select(ImageRow.id).where(ImageRow.dataset_id == dataset_id,
                                  ImageRow.content_changed_at.is_not(None))
    if image_ids is not None:
        q = q.where(ImageRow.id.in_(list(image_ids)))
    candidates = list(session.scalars(q))
    if not candidates:
        return []
    image_ids = candidates
    u = aliased(Relabel)
    ranked = (select(Relabel.id, Relabel.image_id, Relabel.image_sha256,
                     func.row_number().over(partition_by=Relabel.image_id,
                                            order_by=Relabel.id.desc()).label("rn"))
              .join(ImageRow, ImageRow.id == Relabel.image_id)
              .where(ImageRow.dataset_id == dataset_id, Relabel.image_id.in_(image_ids),
                     Relabel.undo_of.is_(None), ~exists().where(u.undo_of == Relabel.id)))
    newest = ranked.subquery()
    q = (select(newest.c.image_id, ImageRow.relpath, newest.c.id, newest.c.image_sha256,
                ImageRow.sha256, ImageRow.missing)
         .join(ImageRow, ImageRow.id == newest.c.image_id)
         .where(newest.c.rn == 1, newest.c.image_sha256.is_not(None),
                or_(ImageRow.sha256.is_(None), newest.c.image_sha256 != ImageRow.sha256))
         .order_by(newest.c.id))
    return [ChangedImage(i, rel, rid, old, new, bool(missing))
            for i, rel, rid, old, new, missing in session.execute(q)]


def _items_of(image_id: int | None, upload_sha256: str | None):
    """Where-clause of the review items of an image or an upload."""
    return ReviewItem.image_id == image_id if image_id is not None else \
        ReviewItem.upload_sha256 == upload_sha256


def _append(session: Session, image_id: int | None, upload_sha256: str | None, new_label: str,
            new_subtype: str | None, reviewer: str, note: str, run_ref: str | None,
            score: float | None) -> int:
    """Insert one relabel row of exactly one target and close the target's open items."""
    if (image_id is None) == (upload_sha256 is None):
        raise ConfigError("a relabel needs exactly one of image_id or upload_sha256. "
                          f"Received: image_id={image_id}, upload_sha256={upload_sha256!r}")
    reviewer = _check_reviewer(reviewer)
    if not (new_label or "").strip():
        raise ConfigError(f"new_label must be a class name. Received: new_label={new_label!r}")
    lock_for_write(session)  # the old label read below must still be current at the INSERT
    old_label, old_subtype = _target_label(session, image_id, upload_sha256)
    # Under double reading (the image's dataset setting now) the answer is a read; uploads
    # belong to no dataset and are always read once.
    need = _reads_required(session, image_id)
    row = Relabel(image_id=image_id, upload_sha256=upload_sha256, image_sha256=_image_sha(
                      session, image_id), old_label=old_label,
                  old_subtype=old_subtype, new_label=new_label.strip(),
                  new_subtype=new_subtype or None, reviewer=reviewer, note=note or "",
                  run_ref=run_ref, score=None if score is None else float(score),
                  kind="read" if need > 1 else "label",
                  reads_required=need if need > 1 else None)
    session.add(row)
    session.execute(update(ReviewItem).where(_items_of(image_id, upload_sha256),
                                             ReviewItem.done.is_(False)).values(done=True))
    session.flush()
    if need > 1:
        _settle(session, image_id, need)
    return row.id


def _reads_required(session: Session, image_id: int | None) -> int:
    """Readers an image needs now: its dataset's ``reads_per_image`` (1 for an upload)."""
    if image_id is None:
        return 1
    dataset_id = session.scalar(select(ImageRow.dataset_id).where(ImageRow.id == image_id))
    if dataset_id is None:
        return 1  # unknown image: _target_label has refused it already
    return reading.get_setting(session=session, dataset_id=dataset_id).reads_per_image


# -- Double reading: the round of reads, consensus, adjudication ---------------------------

@dataclass(frozen=True)
class ReadingRound:
    """An image's reads since its newest standing adjudication, and what they settle."""

    image_id: int
    reads: tuple[RelabelRecord, ...]  # each reader's newest standing read, in id order
    reads_required: int  # readers the dataset needs per image now
    current: Label  # the label that counts now
    adjudications: tuple[RelabelRecord, ...] = ()  # standing adjudications, oldest first

    @property
    def labels(self) -> set[Label]:
        return {(r.new_label, r.new_subtype) for r in self.reads}

    @property
    def conflict(self) -> bool:
        """Readers' newest reads differ: the prior label counts until an adjudication."""
        return len(self.labels) > 1

    @property
    def agreed(self) -> Label | None:
        """The label enough readers agree on (None: too few readers, or a conflict)."""
        if len(self.reads) >= self.reads_required and len(self.labels) == 1:
            return next(iter(self.labels))
        return None

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(r.reviewer for r in self.reads)


def _round_of(image_id: int, base: Label, records: Sequence[RelabelRecord],
              reads_required: int) -> ReadingRound:
    active = active_relabels(records)
    adjudications = tuple(r for r in active if r.kind == "adjudication")
    since = adjudications[-1].id if adjudications else 0
    newest: dict[str, RelabelRecord] = {}
    for r in active:  # id order: a reader's newer read replaces their older one
        if r.kind == "read" and r.id > since:
            newest[r.reviewer] = r
    reads = tuple(sorted(newest.values(), key=lambda r: r.id))
    return ReadingRound(image_id, reads, reads_required, _newest_active(base, records),
                        adjudications)


def reading_round(*, session: Session, image_id: int) -> ReadingRound:
    """The image's reads (each reader's newest standing read since the newest standing
    adjudication), the readers its dataset needs and the label that counts.

    Raises:
        ConfigError: unknown image.
    """
    img = session.execute(select(ImageRow.label, ImageRow.subtype).where(
        ImageRow.id == image_id)).first()
    if img is None:
        raise ConfigError(f"image_id must name an indexed image. Received: image_id={image_id}")
    return _round_of(image_id, (img[0], img[1]), list_relabels(session=session,
                                                               image_ids=[image_id]),
                     _reads_required(session, image_id))


def _settle(session: Session, image_id: int, reads_required: int) -> int | None:
    """Append a consensus row when enough readers agree and no standing counting row since
    their first read says the same already; returns its id (None: nothing to settle)."""
    records = list_relabels(session=session, image_ids=[image_id])
    img = session.execute(select(ImageRow.label, ImageRow.subtype).where(
        ImageRow.id == image_id)).one()
    rnd = _round_of(image_id, (img[0], img[1]), records, reads_required)
    agreed = rnd.agreed
    if agreed is None:
        return None
    standing = counting(records)
    first_read = min(r.id for r in rnd.reads)
    if standing and (standing[-1].new_label, standing[-1].new_subtype) == agreed \
            and standing[-1].id > first_read:
        return None  # settled already (a later reader agreeing adds no row)
    readers = sorted(rnd.readers)
    row = Relabel(image_id=image_id, image_sha256=_image_sha(session, image_id),
                  old_label=rnd.current[0], old_subtype=rnd.current[1], new_label=agreed[0],
                  new_subtype=agreed[1], reviewer=("consensus:" + "+".join(readers))[:200],
                  note=f"{len(readers)} readers agree (reads {', '.join(str(r.id) for r in rnd.reads)})",
                  kind="consensus", basis_json=json.dumps([r.id for r in rnd.reads]))
    session.add(row)
    session.flush()
    return row.id


def adjudicate(*, session: Session, image_id: int, new_label: str, new_subtype: str | None,
               adjudicator: str, note: str = "") -> int:
    """Append an adjudication of an image whose readers conflict: the label that counts
    from now on (its own row; undone like any relabel).

    Args:
        session: the open session (one transaction).
        image_id: the image.
        new_label, new_subtype: the adjudicated label.
        adjudicator: who decided (the principal's identity).
        note: why.

    Returns:
        The adjudication row's id.

    Raises:
        ConfigError: unknown image, no conflicting reads to adjudicate, empty label.
    """
    adjudicator = _check_reviewer(adjudicator)
    if not (new_label or "").strip():
        raise ConfigError(f"new_label must be a class name. Received: new_label={new_label!r}")
    lock_for_write(session)  # the conflict read below must still stand at the INSERT
    rnd = reading_round(session=session, image_id=image_id)
    if not rnd.conflict:
        raise ConfigError(
            f"image {image_id} has no conflicting reads to adjudicate (reads since the last "
            f"adjudication: {', '.join(f'{r.reviewer}={r.new_label}' for r in rnd.reads) or 'none'}"
            f"). Received: image_id={image_id}")
    row = Relabel(image_id=image_id, image_sha256=_image_sha(session, image_id),
                  old_label=rnd.current[0], old_subtype=rnd.current[1],
                  new_label=new_label.strip(), new_subtype=new_subtype or None,
                  reviewer=adjudicator, note=note or "", kind="adjudication",
                  basis_json=json.dumps([r.id for r in rnd.reads]))
    session.add(row)
    session.execute(update(ReviewItem).where(_items_of(image_id, None),
                                             ReviewItem.done.is_(False)).values(done=True))
    session.flush()
    return row.id


def undo_relabel(*, session: Session, relabel_id: int, reviewer: str, note: str = "") -> int:
    """Append an undo row cancelling ``relabel_id`` (the undone row itself stays).

    The undo row's new label is the image's (or upload's) label once the undone row no longer
    counts.

    Returns:
        The undo row's id.

    Raises:
        ConfigError: the row does not exist, is itself an undo, or was already undone.
    """
    reviewer = _check_reviewer(reviewer)
    lock_for_write(session)  # "already undone?" and the labels read below stay true until INSERT
    target = session.get(Relabel, relabel_id)
    if target is None:
        raise ConfigError(f"relabel_id must name a relabel. Received: relabel_id={relabel_id}")
    if target.undo_of is not None:
        raise ConfigError("an undo row cannot be undone; relabel the image instead. "
                          f"Received: relabel_id={relabel_id}")
    if session.scalar(select(func.count()).where(Relabel.undo_of == relabel_id)):
        raise ConfigError(f"relabel {relabel_id} was already undone; relabel the image instead. "
                          f"Received: relabel_id={relabel_id}")
    image_id, sha = target.image_id, target.upload_sha256
    row_id = _append_undo(session, target, reviewer, note)
    # Items this relabel closed are open again (the image still needs a decision).
    session.execute(update(ReviewItem).where(_items_of(image_id, sha),
                                             ReviewItem.created_at <= target.created_at)
                    .values(done=False))
    session.flush()
    if target.kind == "read":  # a consensus built on this read no longer stands
        for r in counting(list_relabels(session=session, image_ids=[image_id])):
            if r.kind == "consensus" and relabel_id in r.basis:
                _append_undo(session, session.get(Relabel, r.id), reviewer,
                             f"undone with read {relabel_id}")
        _settle(session, image_id, _reads_required(session, image_id))  # the others may agree
    return row_id


def _append_undo(session: Session, target: Relabel, reviewer: str, note: str) -> int:
    """Append the undo row of ``target`` (its kind kept): the label once it no longer counts."""
    image_id, sha = target.image_id, target.upload_sha256
    old = _target_label(session, image_id, sha)
    new = _target_label(session, image_id, sha, without=target.id)
    row = Relabel(image_id=image_id, upload_sha256=sha, image_sha256=_image_sha(session, image_id),
                  old_label=old[0], old_subtype=old[1],
                  new_label=new[0], new_subtype=new[1], reviewer=reviewer, note=note or "",
                  run_ref=target.run_ref, score=target.score, undo_of=target.id,
                  kind=target.kind or "label", reads_required=target.reads_required)
    session.add(row)
    session.flush()
    return row.id
