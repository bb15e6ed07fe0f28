"""Relabelling named by path, the ``relabel`` CLI: one image, a CSV of many, the history.

Every row goes through the review page's writers (:func:`cxr_core.review.queues.submit_relabel` for
one image; the same storage writer in one transaction for a CSV) and must name one of the page's
label buttons for the dataset (:func:`cxr_core.review.queues.label_choices`).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.core.errors import ConfigError
from cxr_core.core.records import ImageRecord
from cxr_core.review.queues import LabelChoice, format_label, label_choices, submit_relabel
from cxr_core.storage import AndThen, Database, lock_for_write, review_queue
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import relabels as store
from cxr_core.storage.relabels import RelabelRecord

IMPORT_COLUMNS = ("path", "label", "subtype", "reviewer", "note")
_SUBTYPE_SEPARATORS = ("·", "/")  # "PNEUMONIA·virus" (the button's text) or "PNEUMONIA/virus"


class RelabelImportError(ConfigError):
    """A relabel CSV with bad rows; nothing was written.

    Attributes:
        problems: (line number, reason) of every bad row, in file order.
    """

    def __init__(self, source: str, problems: Sequence[tuple[int, str]]):
        self.problems = list(problems)
        listed = "; ".join(f"line {n}: {why}" for n, why in self.problems)
        super().__init__(f"{source}: {len(self.problems)} bad row(s), nothing was written. "
                         f"{listed}")


def find_dataset(*, session: Any, dataset: str | int) -> ds_store.DatasetInfo:
    """A dataset by name (a str) or id (an int).

    Raises:
        ConfigError: no such dataset (the message lists the known names).
    """
    info = ds_store.get_dataset(session=session, name_or_id=dataset)
    if info is None:
        known = ", ".join(d.name for d in ds_store.list_datasets(session=session)) or "none"
        raise ConfigError(f"dataset must name an indexed dataset (known: {known}). "
                          f"Received: dataset={dataset!r}")
    return info


def _choice_problem(choices: Sequence[LabelChoice], label: str | None,
                    subtype: str | None) -> tuple[LabelChoice | None, str | None]:
    """(the choice, None) when ``label``/``subtype`` name a button of the dataset, else
    (None, why)."""
    text = (label or "").strip()
    sub = (subtype or "").strip() or None
    for sep in _SUBTYPE_SEPARATORS:
        if sep in text:
            text, _, inline = (p.strip() for p in text.partition(sep))
            if sub is not None and sub != inline:
                return None, (f"label {label!r} names subtype {inline!r} but subtype is "
                              f"{sub!r}")
            sub = inline or None
            break
    if not text:
        return None, "empty label"
    choice = LabelChoice(text, sub)
    if choice in choices:
        return choice, None
    return None, (f"label {format_label(text, sub)!r} is not one of this dataset's labels "
                  f"({' / '.join(c.text for c in choices)})")


def choose_label(choices: Sequence[LabelChoice], label: str,
                 subtype: str | None = None) -> LabelChoice:
    """The :class:`LabelChoice` (a review button) named by a label and an optional subtype.

    ``label`` may also be the button's text, ``PNEUMONIA·virus`` (or ``PNEUMONIA/virus``).

    Raises:
        ConfigError: not one of ``choices`` (e.g. ``PNEUMONIA`` without a subtype on a dataset
            whose pneumonia images have subtypes: the page offers no such button either).
    """
    choice, why = _choice_problem(choices, label, subtype)
    if choice is None:
        raise ConfigError(f"{why}. Received: label={label!r}, subtype={subtype!r}")
    return choice


def _relpath(info: ds_store.DatasetInfo, path: str | None) -> str:
    """A path as indexed: stripped, and relative to the dataset root when given absolute
    inside it (``/data/chest_xray/train/NORMAL/x.jpeg`` -> ``train/NORMAL/x.jpeg``)."""
    text = (path or "").strip()
    if text and Path(text).is_absolute():
        try:
            return Path(text).relative_to(info.root).as_posix()
        except ValueError:
            return text
    return text


def _path_problem(rec: ImageRecord | None, relpath: str, dataset: str) -> str | None:
    if not relpath:
        return "empty path"
    if rec is None:
        return f"unknown path {relpath!r} (no image of dataset {dataset!r} has it)"
    if rec.missing:
        return (f"image {relpath!r} is missing from disk (flagged at the last index); "
                "relabelling a missing image is refused: restore the file and re-index")
    return None


def relabel_by_path(db: Database, *, dataset: str | int, relpath: str, label: str,
                    subtype: str | None = None, reviewer: str,
                    note: str = "", and_then: Any = None) -> RelabelRecord:
    """Relabel one image named by its path: what one click on the review page writes.

    The label must be one of the page's buttons for the dataset (:func:`label_choices`); the
    row is written by :func:`submit_relabel`, the page's writer.

    Args:
        db: the database.
        dataset: the dataset's name (or id).
        relpath: the image's path under the dataset root, as indexed (an absolute path
            inside the root is made relative).
        label, subtype: the new label (see :func:`choose_label`).
        reviewer, note: stored with the row.
        and_then: ``and_then(session, relabel_id)`` in the row's transaction (the audit row
            :func:`cxr_core.review.actions.relabel_path` appends).

    Returns:
        The new relabel row.

    Raises:
        ConfigError: unknown dataset or path, a missing image, a label that is not one of the
            dataset's, an empty reviewer.
    """
    with db.session() as s:
        info = find_dataset(session=s, dataset=dataset)
        relpath = _relpath(info, relpath)
        rec = ds_store.image_by_path(session=s, dataset_id=info.id, relpath=relpath) \
            if relpath else None
        why = _path_problem(rec, relpath, info.name)
        if why:
            raise ConfigError(f"{why}. Received: path={relpath!r}")
        choices = label_choices(info.classes, review_queue.label_pairs(session=s,
                                                                       dataset_id=info.id))
    choice = choose_label(choices, label, subtype)
    relabel_id = submit_relabel(db, image_id=rec.id, choice=choice, reviewer=reviewer, note=note,
                                and_then=and_then)
    with db.session() as s:
        return store.list_relabels(session=s, image_ids=[rec.id],
                                   as_of_relabel_id=relabel_id)[-1]


@dataclass(frozen=True)
class _ImportRow:
    line: int
    image_id: int
    choice: LabelChoice
    reviewer: str
    note: str


def _read_import_csv(source: str | Path | io.TextIOBase,
                     name: str) -> list[tuple[int, dict[str, str], int]]:
    """(first line number, {column: cell}, cells beyond the header) of each non-blank data
    row; the header is checked.

    Raises:
        ConfigError: no header, unknown or repeated columns, unreadable text or CSV.
    """
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8-sig", newline="") as fh:
            return _read_import_csv(fh, name)
    reader = csv.reader(source)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise ConfigError(f"{name}: the first row must be a header naming the columns "
                              f"{','.join(IMPORT_COLUMNS[:2])}[,{','.join(IMPORT_COLUMNS[2:])}]. "
                              f"Received: header={header}")
        unknown = [h for h in header if h not in IMPORT_COLUMNS]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if unknown or repeated:
            raise ConfigError(f"{name}: header columns must be among {IMPORT_COLUMNS}, each once. "
                              f"Received: unknown={unknown}, repeated={repeated}")
        rows: list[tuple[int, dict[str, str], int]] = []
        while True:
            line = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                return rows
            if not any(c.strip() for c in cells):
                continue  # a blank line
            rows.append((line, dict(zip(header, cells)), max(0, len(cells) - len(header))))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: expected UTF-8 text. Received: {exc}") from None
    except csv.Error as exc:
        raise ConfigError(f"{name}: not readable as CSV at line {reader.line_num}: {exc}") from None


def import_relabels(db: Database, *, dataset: str | int,
                    source: str | Path | io.TextIOBase, reviewer: str,
                    source_name: str | None = None,
                    and_then: AndThen | None = None) -> list[RelabelRecord]:
    """Relabel many images from a CSV, all rows or none, as ``reviewer``.

    The CSV has a header row and the columns ``path,label`` and optionally ``subtype``,
    ``reviewer``, ``note`` (any order). Every row is recorded as ``reviewer`` (the principal's
    identity): a ``reviewer`` cell is never an identity, it is kept in the row's note
    ("CSV reviewer: …"). Every row is checked first, as :func:`relabel_by_path` checks one
    (known path, image not missing, a label of the dataset), and a path may appear only once;
    then every row is written in ONE transaction with the storage writer the page's
    :func:`submit_relabel` uses (``and_then(session, rows)`` in it: the audit row). Any bad
    row: nothing is written and the error names every bad row by line number (the header is
    line 1) and reason.

    Args:
        db: the database.
        dataset: the dataset's name (or id).
        source: a CSV file path or an open text stream.
        reviewer: the identity every row is recorded as.
        source_name: how the error messages name the source (default: the path, or "CSV").
        and_then: run in the rows' transaction with the written rows.

    Returns:
        The written rows, in file order.

    Raises:
        RelabelImportError: one or more bad rows (``problems`` lists them); nothing written.
        ConfigError: unknown dataset, a bad header, or text that is not UTF-8 CSV.
    """
    name = source_name or (str(source) if isinstance(source, (str, Path)) else "CSV")
    rows = _read_import_csv(source, name)
    who = (reviewer or "").strip()
    if not who:
        raise ConfigError("an import is recorded as someone: reviewer is required")

    def write(s: Any) -> list[RelabelRecord]:
        lock_for_write(s)  # the checks below stay true until the last INSERT commits
        info = find_dataset(session=s, dataset=dataset)
        images = {r.relpath: r for r in ds_store.list_images(session=s, dataset_id=info.id,
                                                             include_missing=True)}
        choices = label_choices(info.classes, {(r.label, r.subtype) for r in images.values()
                                               if not r.missing})
        problems: list[tuple[int, str]] = []
        todo: list[_ImportRow] = []
        first_line: dict[str, int] = {}
        for line, row, extra in rows:
            why: list[str] = []
            if extra:
                why.append(f"{extra} cell(s) more than the header's {len(row)}")
            path = _relpath(info, row.get("path"))
            rec = images.get(path)
            if path in first_line:
                why.append(f"duplicate path {path!r} (first on line {first_line[path]})")
            elif problem := _path_problem(rec, path, info.name):
                why.append(problem)
            if path and path not in first_line:
                first_line[path] = line
            choice, problem = _choice_problem(choices, row.get("label"), row.get("subtype"))
            if problem:
                why.append(problem)
            note = row.get("note") or ""
            if named := (row.get("reviewer") or "").strip():  # never an identity: a note
                note = f"{note} (CSV reviewer: {named})" if note else f"CSV reviewer: {named}"
            if why:
                problems.append((line, ", ".join(why)))
            else:
                todo.append(_ImportRow(line, rec.id, choice, who, note))
        if problems:
            raise RelabelImportError(name, problems)
        ids = [store.add_relabel(session=s, image_id=r.image_id, new_label=r.choice.label,
                                 new_subtype=r.choice.subtype, reviewer=r.reviewer, note=r.note)
               for r in todo]
        if not ids:
            return []
        wanted = set(ids)  # read back in the same transaction: exactly the rows written
        by_id = {r.id: r for r in store.list_relabels(session=s, dataset_id=info.id)
                 if r.id in wanted}
        return [by_id[i] for i in ids]

    return db.write(write, and_then=and_then)


def relabel_history(db: Database, *, dataset: str | int) -> tuple[ds_store.DatasetInfo,
                                                                  list[RelabelRecord]]:
    """The dataset and its full append-only relabel history (undo rows and rows of images now
    missing included), oldest first. Uploads (in no dataset) are left out."""
    with db.session() as s:
        info = find_dataset(session=s, dataset=dataset)
        return info, store.list_relabels(session=s, dataset_id=info.id)


def relabel_json(record: RelabelRecord, dataset: str | None = None) -> dict:
    """One relabel row as the CLI prints it (``path``: the image's path under the root)."""
    return {"id": record.id, "dataset": dataset, "path": record.relpath,
            "image_id": record.image_id, "old_label": record.old_label,
            "old_subtype": record.old_subtype, "new_label": record.new_label,
            "new_subtype": record.new_subtype, "reviewer": record.reviewer,
            "note": record.note, "run_ref": record.run_ref, "score": record.score,
            "undo_of": record.undo_of, "created_at": record.created_at.isoformat()
            if record.created_at else None, "kind": record.kind,
            "basis": list(record.basis)}
