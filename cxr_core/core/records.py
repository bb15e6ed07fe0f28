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


GLOBAL_PATIENT_PREFIXES = ("pid-", "dcm-")  # a metadata CSV's or a DICOM's patient (salted hash)


def scoped_patient(dataset_id: int | None, patient: str | None) -> tuple | str | None:
    """The key under which two images are the same patient.

    A patient parsed from a file name (``person1003``, ``0115``) means something only inside
    its dataset: another dataset's ``person1003`` is not known to be the same child, so the key
    is ``(dataset_id, patient)``. A patient from a metadata CSV or a DICOM PatientID (stored as
    a salted hash, ``pid-…`` / ``dcm-…``) links datasets deliberately and is its own key.
    """
    if not patient:
        return None
    return patient if patient.startswith(GLOBAL_PATIENT_PREFIXES) else (dataset_id, patient)
