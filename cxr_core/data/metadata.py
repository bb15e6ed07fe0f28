"""A dataset's metadata CSV: per-image patient, date, site, sex, age and view the index reads.

The file is ``metadata.csv`` in the dataset's root folder. Columns (any subset, header
required): ``path`` (required: the image's path relative to the root, as the index shows it),
``patient`` (stored only as a salted hash, like a DICOM PatientID), ``date`` (acquisition
date: ``YYYY-MM-DD`` or ``YYYYMMDD``; the temporal split orders by it), ``site``, ``sex``
(``F``/``M``/``O``), ``age`` (years, a number) and ``view`` (e.g. ``PA``, ``AP``). A value
left empty keeps what the index found. Every bad cell is reported by line and column; the
rows that are fine are applied.
"""
from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cxr_core.core.errors import DatasetError

FILENAME = "metadata.csv"
COLUMNS = ("path", "patient", "date", "site", "sex", "age", "view")
SEXES = {"f": "F", "female": "F", "m": "M", "male": "M", "o": "O", "other": "O"}
MAX_ROWS = 2_000_000


@dataclass(frozen=True)
class Metadata:
    """The parsed file: relpath -> the fields it sets (index column names), and problems."""

    rows: dict[str, dict]
    problems: tuple[str, ...] = field(default=())


def _date(value: str) -> str:
    digits = value.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise ValueError("expected YYYY-MM-DD or YYYYMMDD")
    return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()


def _age(value: str) -> float:
    age = float(value)
    if not 0 <= age <= 130:
        raise ValueError("expected an age in years between 0 and 130")
    return age


def _sex(value: str) -> str:
    if value.lower() not in SEXES:
        raise ValueError("expected one of F, M, O")
    return SEXES[value.lower()]


def read_metadata(root: str | Path, patient_key) -> Metadata | None:
    """The metadata CSV of a dataset root (None when there is none).

    Args:
        root: the dataset's root folder.
        patient_key: ``patient_key(raw_id) -> stored value`` (the salted hash).

    Raises:
        DatasetError: the file cannot be read as CSV, has no ``path`` column, or names an
            unknown column.
    """
    path = Path(root) / FILENAME
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in header:
                raise DatasetError(f"{path}: the metadata CSV needs a 'path' column. "
                                   f"Received columns: {header}")
            unknown = sorted(set(header) - set(COLUMNS))
            if unknown:
                raise DatasetError(f"{path}: unknown metadata column(s) {unknown}. "
                                   f"Expected any of {list(COLUMNS)}")
            rows: dict[str, dict] = {}
            problems: list[str] = []
            for line, raw in enumerate(reader, start=2):
                if line > MAX_ROWS + 1:
                    problems.append(f"{FILENAME}: more than {MAX_ROWS:,} rows; the rest is "
                                    "ignored")
                    break
                cells = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
                rel = cells.get("path", "").replace("\\", "/").lstrip("./")
                if not rel:
                    problems.append(f"{FILENAME} line {line}: empty path")
                    continue
                out: dict = {}
                for column, parse, target in (("date", _date, "acquired_date"),
                                              ("age", _age, "age_years"),
                                              ("sex", _sex, "sex")):
                    if cells.get(column):
                        try:
                            out[target] = parse(cells[column])
                        except ValueError as exc:
                            problems.append(f"{FILENAME} line {line}, {column} "
                                            f"{cells[column]!r}: {exc}")
                for column, target in (("site", "site"), ("view", "view")):
                    if cells.get(column):
                        out[target] = cells[column][:100]
                if cells.get("patient"):
                    out["patient"] = patient_key(cells["patient"])
                if rel in rows:
                    problems.append(f"{FILENAME} line {line}: {rel} is listed twice; the "
                                    "last row wins")
                rows[rel] = out
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from exc
    return Metadata(rows, tuple(problems))
