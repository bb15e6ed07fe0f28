"""CSV export without formula injection: the one helper every CSV export of the product uses.

A spreadsheet (Excel, LibreOffice, Google Sheets) runs a cell that starts with ``=``, ``+``,
``-`` or ``@`` as a formula, and also one that starts with a tab or a carriage return followed
by one; a reviewer name or note such as ``=HYPERLINK("http://evil", "x")`` would then run on
whoever opens the export. Following OWASP ("CSV Injection"), such a cell is prefixed with a
single quote, which the spreadsheet shows as text (the quote is visible in a text editor and
is part of the value a CSV reader returns).

Only strings are guarded. Numbers (``int``, ``float``, numpy scalars, ``bool``) are written as
they are, so a negative score ``-0.5`` in a numeric column stays the number ``-0.5``; the same
text held as a *string* (``"-0.5"`` typed into a note) is guarded (``'-0.5``), because the
export cannot know that free text is meant as a number. ``None`` becomes an empty cell and a
date or datetime its ISO text.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

__all__ = ["FORMULA_PREFIXES", "cell", "rows_to_csv", "safe_cell", "write_rows"]

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is a string a spreadsheet would run as a formula.

    Non-strings (numbers, None, ...) are returned unchanged.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def cell(value: Any) -> Any:
    """One value as written to an export: None -> "", dates -> ISO text, then :func:`safe_cell`."""
    if value is None:
        return ""
    if hasattr(value, "isoformat") and not isinstance(value, str):
        value = value.isoformat()
    return safe_cell(value)


class _Terminated:
    """A stream that writes each CSV row with ``term`` instead of the writer's "\r\n"."""

    def __init__(self, out: TextIO, term: str) -> None:
        self.out, self.term = out, term

    def write(self, row: str) -> int:
        if row.endswith("\r\n"):
            row = row[:-2] + self.term
        return self.out.write(row)


def write_rows(out: TextIO, header: Sequence[Any] | None, rows: Iterable[Sequence[Any]], *,
               lineterminator: str = "\n") -> int:
    """Write a header (None: none) and rows as CSV, every cell through :func:`cell`.

    Args:
        out: a text stream (open files with ``newline=""``).
        header: the column names.
        rows: sequences of values, in header order.
        lineterminator: the row separator (the exports use ``"\\n"``).

    Returns:
        The number of data rows written.
    """
    # The csv module quotes a cell only for the characters of its own line terminator, so a
    # "\r" inside a note would be written bare with "\n": a spreadsheet then starts a new row
    # there, and the rest of the cell (``x\r=cmd|...``) would be a formula cell of its own.
    # Write with "\r\n" (every line break in a cell quoted) and put the asked terminator back.
    w = csv.writer(_Terminated(out, lineterminator), lineterminator="\r\n")
    if header is not None:
        w.writerow([cell(h) for h in header])
    n = 0
    for row in rows:
        w.writerow([cell(v) for v in row])
        n += 1
    return n


def rows_to_csv(header: Sequence[Any] | None, rows: Iterable[Sequence[Any]], *,
                lineterminator: str = "\n") -> str:
    """:func:`write_rows` into a string (what a download button serves)."""
    buf = io.StringIO()
    write_rows(buf, header, rows, lineterminator=lineterminator)
    return buf.getvalue()
