"""Datasets and their image index."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from cxr_core.core.records import ImageRecord, ScannedImage
from db.models import Dataset, ImageRow

_RECORD_COLS = list(ImageRecord._fields)


@dataclass(frozen=True)
class DatasetInfo:
    id: int
    name: str
    root: str
    layout: str
    classes: tuple[str, ...]
    indexed_at: datetime | None
    scan_seconds: float | None
    n_images: int
    summary: dict | None = None  # counts stored by the last index run
    external: bool = False  # another site or period: external validation data


def _info(row: Dataset, n: int) -> DatasetInfo:
    return DatasetInfo(row.id, row.name, row.root, row.layout, tuple(json.loads(row.classes_json)),
                       row.indexed_at, row.scan_seconds, n,
                       json.loads(row.summary_json) if row.summary_json else None,
                       bool(row.external))


def upsert_dataset(*, session: Session, name: str, root: str, layout: str,
                   classes: Sequence[str]) -> int:
    """Create the dataset or update its root/layout/classes; returns its id."""
    row = session.scalar(select(Dataset).where(Dataset.name == name))
    if row is None:
        row = Dataset(name=name, root=root, layout=layout, classes_json=json.dumps(list(classes)))
        session.add(row)
        session.flush()
    else:
        row.root, row.layout, row.classes_json = root, layout, json.dumps(list(classes))
    return row.id


def set_external(*, session: Session, dataset_id: int, external: bool) -> None:
    """Flag (or unflag) a dataset as external validation data (another site or period)."""
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(
        external=bool(external)))


def mark_indexing(*, session: Session, dataset_id: int) -> None:
    """An index run has started writing rows: the stored summary no longer holds until it
    ends (a run killed midway leaves none, so the next one recounts)."""
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(summary_json=None))


def mark_indexed(*, session: Session, dataset_id: int, seconds: float, summary: dict) -> None:
    """Stamp the index time and keep the summary, so an unchanged re-open needs no recount."""
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(
        indexed_at=datetime.now(timezone.utc), scan_seconds=seconds,
        summary_json=json.dumps(summary)))


def list_datasets(*, session: Session) -> list[DatasetInfo]:
    from sqlalchemy import func

    counts = dict(session.execute(select(ImageRow.dataset_id, func.count()).where(
        ImageRow.missing.is_(False)).group_by(ImageRow.dataset_id)).all())
    rows = session.scalars(select(Dataset).order_by(Dataset.name)).all()
    return [_info(r, counts.get(r.id, 0)) for r in rows]


def get_dataset(*, session: Session, name_or_id: str | int) -> DatasetInfo | None:
    from sqlalchemy import func

    q = select(Dataset)
    q = q.where(Dataset.id == name_or_id) if isinstance(name_or_id, int) else q.where(
        Dataset.name == name_or_id)
    row = session.scalar(q)
    if row is None:
        return None
    n = session.scalar(select(func.count()).select_from(ImageRow).where(
        ImageRow.dataset_id == row.id, ImageRow.missing.is_(False))) or 0
    return _info(row, n)


def known_files(*, session: Session, dataset_id: int) -> dict[str, tuple[int | None, int | None]]:
    """relpath → (bytes, mtime_ns) of the indexed files present on disk at the last scan.

    Rows flagged missing are left out, so a file that comes back is read again (and its row,
    with all its history, is marked present).
    """
    q = select(ImageRow.relpath, ImageRow.bytes, ImageRow.mtime_ns).where(
        ImageRow.dataset_id == dataset_id, ImageRow.missing.is_(False))
    return {r: (b, m) for r, b, m in session.execute(q)}


@dataclass(frozen=True)
class ScanApplied:
    """What :func:`apply_scan` changed in the index."""

    added: int
    updated: int  # rows re-read in place (same identity)
    content_changed: tuple[str, ...]  # relpaths whose bytes (sha256) changed
    restored: int  # rows that were missing and are back on disk
    missing: int  # rows newly flagged missing


def apply_scan(*, session: Session, dataset_id: int, rows: Iterable[ScannedImage],
               gone: Sequence[str]) -> ScanApplied:
    """Write a scan without ever deleting a row.

    An image is identified by (dataset, relpath). New files are inserted; a file read again
    (size/mtime changed, or back after being missing) is updated in place, so its id, relabels,
    review items and predictions stay attached; when its bytes changed, the old hash is kept
    in ``previous_sha256`` with ``content_changed_at``. Files gone from disk are flagged
    ``missing`` (with ``missing_since``), never deleted.
    """
    now = datetime.now(timezone.utc)
    rows = list(rows)
    existing: dict[str, tuple[int, str | None, bool]] = {}
    paths = [r.relpath for r in rows]
    for i in range(0, len(paths), 500):
        q = select(ImageRow.relpath, ImageRow.id, ImageRow.sha256, ImageRow.missing).where(
            ImageRow.dataset_id == dataset_id, ImageRow.relpath.in_(paths[i:i + 500]))
        existing.update({p: (k, sha, bool(m)) for p, k, sha, m in session.execute(q)})
    new, changed, restored, updates = [], [], 0, []
    for r in rows:
        values = dict(r.__dict__, missing=False, missing_since=None)
        if r.relpath not in existing:
            new.append(dict(values, dataset_id=dataset_id))
            continue
        row_id, old_sha, was_missing = existing[r.relpath]
        restored += was_missing
        if old_sha is not None and r.sha256 != old_sha:
            changed.append(r.relpath)
            values.update(previous_sha256=old_sha, content_changed_at=now)
        updates.append(dict(values, id=row_id))
    if new:
        session.execute(insert(ImageRow), new)
    if updates:
        session.execute(update(ImageRow), updates)  # bulk UPDATE by primary key
    gone = list(gone)
    for i in range(0, len(gone), 500):
        session.execute(update(ImageRow).where(
            ImageRow.dataset_id == dataset_id, ImageRow.relpath.in_(gone[i:i + 500]),
            ImageRow.missing.is_(False)).values(missing=True, missing_since=now))
    return ScanApplied(len(new), len(updates), tuple(changed), restored, len(gone))


def apply_metadata(*, session: Session, dataset_id: int,
                   rows: dict[str, dict]) -> tuple[int, list[str]]:
    """Set the fields of a metadata CSV (relpath -> {column: value}) on the dataset's rows.

    Returns:
        (rows updated, relpaths the dataset has no image for).
    """
    from sqlalchemy import bindparam, update

    known = set(session.scalars(select(ImageRow.relpath).where(
        ImageRow.dataset_id == dataset_id)))
    unknown = sorted(r for r in rows if r not in known)
    by_columns: dict[tuple[str, ...], list[dict]] = {}
    for rel, fields in rows.items():
        if rel in known and fields:
            by_columns.setdefault(tuple(sorted(fields)), []).append(
                {"_rel": rel, **{f"_{k}": v for k, v in fields.items()}})
    conn = session.connection()
    updated = 0
    for columns, params in by_columns.items():
        stmt = (update(ImageRow.__table__)
                .where(ImageRow.__table__.c.dataset_id == dataset_id,
                       ImageRow.__table__.c.relpath == bindparam("_rel"))
                .values({c: bindparam(f"_{c}") for c in columns}))
        for start in range(0, len(params), 1000):
            conn.execute(stmt, params[start:start + 1000])
        updated += len(params)
    return updated, unknown


def count_missing(*, session: Session, dataset_id: int) -> int:
    """Rows whose file was gone at the last scan (kept with their history)."""
    from sqlalchemy import func

    return session.scalar(select(func.count()).select_from(ImageRow).where(
        ImageRow.dataset_id == dataset_id, ImageRow.missing.is_(True))) or 0


def list_images(*, session: Session, dataset_id: int,
                include_missing: bool = False) -> list[ImageRecord]:
    """The indexed images of a dataset present on disk (all rows with ``include_missing``),
    in relpath order."""
    cols = [getattr(ImageRow, c) for c in _RECORD_COLS]
    q = select(*cols).where(ImageRow.dataset_id == dataset_id).order_by(ImageRow.relpath)
    if not include_missing:
        q = q.where(ImageRow.missing.is_(False))
    # Core execution on the session's connection: no ORM row bookkeeping for 5k+ rows.
    return [ImageRecord._make(r) for r in session.connection().execute(q)]


def get_images(*, session: Session, image_ids: Sequence[int]) -> list[ImageRecord]:
    """Images by id (any dataset), in the order asked."""
    cols = [getattr(ImageRow, c) for c in _RECORD_COLS]
    found: dict[int, ImageRecord] = {}
    ids = list(image_ids)
    for i in range(0, len(ids), 500):
        for r in session.execute(select(*cols).where(ImageRow.id.in_(ids[i:i + 500]))):
            found[r[0]] = ImageRecord(*r)
    return [found[i] for i in ids if i in found]


def image_patients(*, session: Session,
                   image_ids: Sequence[int | None]) -> list[str | None] | None:
    """The patient of each image, in order (None where unknown or not indexed), or None when
    no image has one."""
    ids = [i for i in image_ids if i is not None]
    found = {r.id: r.patient for r in get_images(session=session, image_ids=ids)}
    patients = [found.get(i) if i is not None else None for i in image_ids]
    return patients if any(patients) else None


def image_by_path(*, session: Session, dataset_id: int, relpath: str) -> ImageRecord | None:
    """The image at ``relpath`` in a dataset, or None when no row has that path.

    Rows flagged missing are found too (check ``record.missing``): their history is kept, and
    a caller that must refuse them (relabelling) can say why instead of "unknown path".
    """
    cols = [getattr(ImageRow, c) for c in _RECORD_COLS]
    row = session.execute(select(*cols).where(ImageRow.dataset_id == dataset_id,
                                              ImageRow.relpath == relpath)).first()
    return None if row is None else ImageRecord._make(row)
