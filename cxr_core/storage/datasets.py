"""Datasets and their image index."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from cxr_core.datasets import ImageRecord, ScannedImage
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


def _info(row: Dataset, n: int) -> DatasetInfo:
    return DatasetInfo(row.id, row.name, row.root, row.layout, tuple(json.loads(row.classes_json)),
                       row.indexed_at, row.scan_seconds, n,
                       json.loads(row.summary_json) if row.summary_json else None)


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


def mark_indexed(*, session: Session, dataset_id: int, seconds: float, summary: dict) -> None:
    """Stamp the index time and keep the summary, so an unchanged re-open needs no recount."""
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(
        indexed_at=datetime.now(timezone.utc), scan_seconds=seconds,
        summary_json=json.dumps(summary)))


def list_datasets(*, session: Session) -> list[DatasetInfo]:
    from sqlalchemy import func

    counts = dict(session.execute(select(ImageRow.dataset_id, func.count()).group_by(
        ImageRow.dataset_id)).all())
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
        ImageRow.dataset_id == row.id)) or 0
    return _info(row, n)


def known_files(*, session: Session, dataset_id: int) -> dict[str, tuple[int | None, int | None]]:
    """relpath → (bytes, mtime_ns) of the indexed files (for incremental scans)."""
    q = select(ImageRow.relpath, ImageRow.bytes, ImageRow.mtime_ns).where(
        ImageRow.dataset_id == dataset_id)
    return {r: (b, m) for r, b, m in session.execute(q)}


def apply_scan(*, session: Session, dataset_id: int, rows: Iterable[ScannedImage],
               gone: Sequence[str]) -> None:
    """Insert new rows, replace changed ones, delete files gone from disk."""
    rows = list(rows)
    paths = [r.relpath for r in rows] + list(gone)
    for i in range(0, len(paths), 500):
        session.execute(delete(ImageRow).where(ImageRow.dataset_id == dataset_id,
                                               ImageRow.relpath.in_(paths[i:i + 500])))
    if rows:
        session.execute(insert(ImageRow), [dict(r.__dict__, dataset_id=dataset_id) for r in rows])


def list_images(*, session: Session, dataset_id: int) -> list[ImageRecord]:
    """Every indexed image of a dataset, in relpath order."""
    cols = [getattr(ImageRow, c) for c in _RECORD_COLS]
    q = select(*cols).where(ImageRow.dataset_id == dataset_id).order_by(ImageRow.relpath)
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
