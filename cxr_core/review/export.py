"""Relabels as CSV: every append-only row (undo rows included), for download and the CLI.

Cells a spreadsheet would run as a formula are quoted (:mod:`cxr_core.core.csv_safe`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path

from cxr_core.core.csv_safe import rows_to_csv, write_rows
from cxr_core.storage import Database
from cxr_core.storage import relabels as store
from cxr_core.storage.relabels import RelabelRecord

_CSV_COLUMNS = [f.name for f in fields(RelabelRecord)]


def relabels_to_csv(records: Iterable[RelabelRecord]) -> str:
    """Every relabel row (undo rows included) as CSV text, one row per relabel.

    Cells go through :func:`cxr_core.core.csv_safe.cell`: a reviewer name or note a spreadsheet
    would run as a formula (``=...``, ``+...``, ``@...``) gets a leading ``'``; numbers
    (``score``, ids) are written as they are.
    """
    return rows_to_csv(_CSV_COLUMNS, ([getattr(r, c) for c in _CSV_COLUMNS] for r in records))


def export_relabels_csv(db: Database, dataset_id: int | None = None) -> str:
    """CSV of all relabels (of one dataset, or of every dataset) and of every upload.

    Upload rows have an empty ``image_id`` and their sha256 as ``relpath`` (and
    ``upload_sha256``).
    """
    with db.session() as s:
        return relabels_to_csv(store.list_relabels(session=s, dataset_id=dataset_id,
                                                   include_uploads=True))


EXPORT_PAGE = 5000  # rows read per query while writing an export


def write_relabels_csv(db: Database, path: str | Path, dataset_id: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> int:
    """Write :func:`export_relabels_csv`'s CSV to ``path`` page by page (keyset on the row id,
    so memory stays flat at any size); the file appears whole (written aside, then renamed).

    Returns:
        The number of rows written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with db.session() as s:
        total = store.count_relabels(session=s, dataset_id=dataset_id, include_uploads=True)
    done, last = 0, 0
    with tmp.open("w", newline="", encoding="utf-8") as f:
        write_rows(f, _CSV_COLUMNS, [])
        while True:
            with db.session() as s:
                page = store.list_relabels(session=s, dataset_id=dataset_id,
                                           include_uploads=True, after_id=last,
                                           limit=EXPORT_PAGE)
            if not page:
                break
            write_rows(f, None, ([getattr(r, c) for c in _CSV_COLUMNS] for r in page))
            done, last = done + len(page), page[-1].id
            if progress is not None:
                progress(done, max(total, done))
    tmp.replace(out)
    if progress is not None:
        progress(done, max(total, done))
    return done
