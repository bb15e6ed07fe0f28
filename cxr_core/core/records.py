"""What an indexed image is, as storage writes and returns it: :class:`ScannedImage` (the
fields a header scan produces, one DB row) and :class:`ImageRecord` (a stored image, as the rest
of the package sees it). Imports nothing of ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class ScannedImage:
    """One image's index fields (the row the DB stores)."""

    relpath: str
    split: str
    label: str
    subtype: str | None
    patient: str | None
    sha256: str | None
    width: int | None
    height: int | None
    mode: str | None
    bytes: int | None
    mtime_ns: int | None
    error: str | None = None
    acquired_date: str | None = None  # ISO YYYY-MM-DD (DICOM StudyDate/AcquisitionDate)


class ImageRecord(NamedTuple):
    """An indexed image as the rest of the package sees it (from storage).

    A NamedTuple rather than a dataclass: opening a 5k-image dataset builds thousands of
    these, and tuple construction is several times cheaper (the open-vs-scan benchmark).
    """

    id: int
    dataset_id: int
    relpath: str
    split: str
    label: str
    subtype: str | None
    patient: str | None
    sha256: str | None
    width: int | None
    height: int | None
    mode: str | None
    bytes: int | None
    error: str | None = None
    acquired_date: str | None = None  # ISO YYYY-MM-DD, from DICOM or a metadata CSV
    missing: bool = False  # the file is gone from disk (the row and its history are kept)
    site: str | None = None  # from the dataset's metadata CSV (cxr_core.data.metadata)
    sex: str | None = None  # F | M | O
    age_years: float | None = None
    view: str | None = None  # e.g. PA, AP
