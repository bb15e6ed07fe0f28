"""Dataset aggregates in SQL: what the Class balance page shows, as GROUP BY queries.

Labels are the originals or the current ones as of a relabel id (each image's newest active
relabel, found with a window function: the same rule as
:func:`cxr_core.storage.relabels.label_version`), mapped to a label scheme's classes with a
CASE over the dataset's few (label, subtype) pairs. A page reads counts, never rows.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Index,
    MetaData,
    String,
    Table,
    and_,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    select,
    union_all,
)
from sqlalchemy.orm import Session, aliased

from cxr_core.core.labels import scheme_label
from cxr_core.storage.relabels import COUNTING_KINDS
from db.models import ImageRow, Relabel

LIST_LIMIT = 200  # rows of the duplicate and leaked-patient tables a page shows


def labelled(dataset_id: int, as_of_relabel_id: int | None, *, current: bool):
    """Subquery of the dataset's readable images on disk with the labels to count:
    (id, split, patient, sha256, width, height, mode, relpath, label, subtype).

    Current labels are a UNION ALL of the relabelled images (each one's newest active relabel,
    a window over the relabel rows, joined to its image by primary key) and the others (their
    original label; NOT EXISTS on the relabels' image index). No outer join against a derived
    table, which SQLite would run as a nested loop (minutes at 100k images)."""
    cols = (ImageRow.id, ImageRow.split, ImageRow.patient, ImageRow.sha256, ImageRow.width,
            ImageRow.height, ImageRow.mode, ImageRow.relpath)
    where = and_(ImageRow.dataset_id == dataset_id, ImageRow.error.is_(None),
                 ImageRow.missing.is_(False))
    if not current:
        return select(*cols, ImageRow.label, ImageRow.subtype).where(where).subquery()
    latest = latest_relabels(dataset_id, as_of_relabel_id)
    relabelled = (select(*cols, latest.c.new_label.label("label"),
                         latest.c.new_subtype.label("subtype"))
                  .select_from(latest).join(ImageRow, ImageRow.id == latest.c.image_id)
                  .where(where))
    r, u = aliased(Relabel), aliased(Relabel)
    undone = exists().where(u.undo_of == r.id) if as_of_relabel_id is None else \
        exists().where(u.undo_of == r.id, u.id <= as_of_relabel_id)
    active = [r.image_id == ImageRow.id, r.undo_of.is_(None), r.kind.in_(COUNTING_KINDS),
              ~undone]
    if as_of_relabel_id is not None:
        active.append(r.id <= as_of_relabel_id)
    original = select(*cols, ImageRow.label, ImageRow.subtype).where(
        where, ~exists().where(*active))
    return union_all(relabelled, original).subquery()


def latest_relabels(dataset_id: int, as_of_relabel_id: int | None):
    """Subquery (image_id, new_label, new_subtype) of each image's newest active counting
    relabel as of a relabel id (None: now): not an undo row, not undone by then, not a read
    of a double reading (:data:`cxr_core.storage.relabels.COUNTING_KINDS`)."""
    u = aliased(Relabel)
    undone = exists().where(u.undo_of == Relabel.id)
    rows = select(Relabel.image_id, Relabel.new_label, Relabel.new_subtype,
                  func.row_number().over(partition_by=Relabel.image_id,
                                         order_by=Relabel.id.desc()).label("rn")) \
        .join(ImageRow, ImageRow.id == Relabel.image_id) \
        .where(ImageRow.dataset_id == dataset_id, Relabel.undo_of.is_(None),
               Relabel.kind.in_(COUNTING_KINDS))
    if as_of_relabel_id is not None:
        rows = rows.where(Relabel.id <= as_of_relabel_id)
        undone = exists().where(u.undo_of == Relabel.id, u.id <= as_of_relabel_id)
    ranked = rows.where(~undone).subquery()
    return select(ranked.c.image_id, ranked.c.new_label, ranked.c.new_subtype).where(
        ranked.c.rn == 1).subquery()


def _pairs(session: Session, images) -> list[tuple[str, str | None]]:
    return [tuple(r) for r in session.execute(select(images.c.label, images.c.subtype)
                                              .distinct())]


def scheme_class(session: Session, images, scheme: str):
    """A CASE giving each row's class in ``scheme`` (NULL: none, e.g. no subtype)."""
    whens = []
    for label, subtype in _pairs(session, images):
        cls = scheme_label(label, subtype, scheme)
        if cls is not None:
            sub = images.c.subtype.is_(None) if subtype is None else images.c.subtype == subtype
            whens.append((and_(images.c.label == label, sub), cls))
    return case(*whens, else_=None) if whens else literal(None, String)


@dataclass(frozen=True)
class Aggregates:
    """The Class balance tables of one dataset, label version and scheme."""

    counts: list[dict]  # split, class, subtype, images
    patients: list[dict]  # class, patients, images
    sizes: list[dict]  # width, height, mode, images
    duplicates: list[dict]  # group, sha256, relpath, split, label (first LIST_LIMIT rows)
    duplicate_groups: int
    leaked_patients: list[dict]  # patient, splits (first LIST_LIMIT)
    n_leaked: int
    unlabelled: int  # readable images without a class in the scheme
    images: int


def aggregates(*, session: Session, dataset_id: int, scheme: str, current: bool = False,
               as_of_relabel_id: int | None = None) -> Aggregates:
    """Counts per split × class × subtype, patients per class, sizes, duplicates and patients
    in several split folders, each one GROUP BY over the labelled images.

    Current labels are derived once into a temporary table (the label-dependent tables are
    four queries over it); sizes, duplicates and leaked patients do not depend on labels and
    read the images directly (their ``label`` column is the original one).
    """
    if not current:
        return _aggregates(session, labelled(dataset_id, None, current=False), None, scheme)
    tmp = materialize(session, labelled(dataset_id, as_of_relabel_id, current=True))
    try:
        return _aggregates(session, labelled(dataset_id, None, current=False), tmp, scheme)
    finally:
        tmp.drop(session.connection())


def materialize(session: Session, query, *, index_on: tuple[str, ...] = ()) -> Table:
    """``query``'s rows in a temporary table of this connection, indexed on ``index_on``
    (dropped by the caller): several queries, or a self-join, over one derived set without
    deriving it again, and with an index SQLite would not build for a derived table."""
    name = f"cxr_tmp_{uuid.uuid4().hex[:12]}"
    table = Table(name, MetaData(), *(Column(c.name, c.type) for c in query.c),
                  prefixes=["TEMPORARY"])
    if index_on:
        Index(f"{name}_ix", *(table.c[c] for c in index_on))
    conn = session.connection()
    table.create(conn)
    conn.execute(insert(table).from_select([c.name for c in query.c], select(query)))
    return table


def _aggregates(session: Session, images, current, scheme: str) -> Aggregates:
    img = images if current is None else current  # what the label-dependent counts read
    cls = scheme_class(session, img, scheme).label("cls")
    counts = [dict(split=s or "(none)", **{"class": c or "(no class)"}, subtype=t or "—",
                   images=int(n))
              for s, c, t, n in session.execute(
                  select(img.c.split, cls, img.c.subtype, func.count())
                  .group_by(img.c.split, cls, img.c.subtype))]
    counts.sort(key=lambda d: (d["split"], d["class"], d["subtype"]))
    who = func.coalesce(img.c.patient, literal("img:") + cast(img.c.id, String))
    patients = [{"class": c, "patients": int(p), "images": int(n)} for c, p, n in session.execute(
        select(cls, func.count(func.distinct(who)), func.count()).where(cls.is_not(None))
        .group_by(cls).order_by(cls))]
    sizes = [dict(width=w, height=h, mode=m, images=int(n)) for w, h, m, n in session.execute(
        select(images.c.width, images.c.height, images.c.mode, func.count())
        .group_by(images.c.width, images.c.height, images.c.mode))]
    dup_keys = select(images.c.sha256).where(images.c.sha256.is_not(None)).group_by(
        images.c.sha256).having(func.count() > 1)
    n_groups = session.scalar(select(func.count()).select_from(dup_keys.subquery())) or 0
    dups: list[dict] = []
    if n_groups:
        rows = session.execute(select(images.c.sha256, images.c.relpath, images.c.split, images.c.label)
                               .where(images.c.sha256.in_(dup_keys.order_by(images.c.sha256)
                                                       .limit(LIST_LIMIT)))
                               .order_by(images.c.sha256, images.c.relpath).limit(LIST_LIMIT)).all()
        group: dict[str, int] = {}
        for sha, rel, split, label in rows:
            group.setdefault(sha, len(group) + 1)
            dups.append(dict(group=group[sha], sha256=sha[:12], relpath=rel,
                             split=split or "(none)", label=label))
    leak_keys = select(images.c.patient).where(images.c.patient.is_not(None)).group_by(
        images.c.patient).having(func.count(func.distinct(images.c.split)) > 1)
    n_leaked = session.scalar(select(func.count()).select_from(leak_keys.subquery())) or 0
    leaked: dict[str, list[str]] = {}
    if n_leaked:
        for p, split in session.execute(
                select(images.c.patient, images.c.split).distinct()
                .where(images.c.patient.in_(leak_keys.order_by(images.c.patient).limit(LIST_LIMIT)))
                .order_by(images.c.patient, images.c.split)):
            leaked.setdefault(p, []).append(split or "(none)")
    total, unlabelled = session.execute(select(func.count(), func.count().filter(
        cls.is_(None)))).one()
    return Aggregates(counts, patients, sizes, dups, int(n_groups),
                      [dict(patient=p, splits=", ".join(s)) for p, s in leaked.items()],
                      int(n_leaked), int(unlabelled or 0), int(total or 0))


def sample_images(*, session: Session, dataset_id: int, per_class: int = 8,
                  ) -> dict[str, list[tuple[str, str | None, int | None]]]:
    """Up to ``per_class`` readable images of each original class, spread evenly over the
    class in path order: class -> [(relpath, subtype, bytes)]."""
    ranked = select(ImageRow.label, ImageRow.relpath, ImageRow.subtype, ImageRow.bytes,
                    func.row_number().over(partition_by=ImageRow.label,
                                           order_by=ImageRow.relpath).label("rn"),
                    func.count().over(partition_by=ImageRow.label).label("n")) \
        .where(ImageRow.dataset_id == dataset_id, ImageRow.error.is_(None),
               ImageRow.missing.is_(False)).subquery()
    step = case((ranked.c.n // per_class < 1, 1), else_=ranked.c.n // per_class)
    q = select(ranked.c.label, ranked.c.relpath, ranked.c.subtype, ranked.c.bytes,
               ranked.c.n).where((ranked.c.rn - 1) % step == 0,
                                 ranked.c.rn <= step * per_class).order_by(ranked.c.label,
                                                                           ranked.c.rn)
    out: dict[str, list] = {}
    for label, rel, sub, size, _ in session.execute(q):
        out.setdefault(label, []).append((rel, sub, size))
    return out


def search_images(*, session: Session, dataset_id: int, text: str = "",
                  label: str | None = None, limit: int = 50) -> list[tuple[int, str]]:
    """(id, relpath) of readable images whose path contains ``text`` (case-insensitive),
    optionally of one original class, in path order: the server-side image picker."""
    q = select(ImageRow.id, ImageRow.relpath).where(
        ImageRow.dataset_id == dataset_id, ImageRow.error.is_(None), ImageRow.missing.is_(False))
    if text.strip():
        pattern = "%" + text.strip().replace("\\", "\\\\").replace("%", "\\%").replace(
            "_", "\\_") + "%"
        q = q.where(ImageRow.relpath.ilike(pattern, escape="\\"))
    if label is not None:
        q = q.where(ImageRow.label == label)
    return [(int(i), p) for i, p in session.execute(q.order_by(ImageRow.relpath).limit(limit))]
