"""The ONE image loader: every page, the index, the pipeline and predict go through it.

It reads headers without decoding (for the index), and decodes with the guards a clinical
image tool needs: EXIF orientation, 16-bit and CMYK sources, multi-frame files, decompression
bombs, truncated files, text files with an image extension, and DICOM (size guard from the
header, first frame only, modality LUT then VOI LUT or window, MONOCHROME1; RLE, JPEG Lossless,
JPEG-LS and JPEG 2000 through the pylibjpeg plugins). It also reads the pixels of array
datasets (PneumoniaMNIST-style ``.npz``): :func:`npz_record_images`, the one loader of them.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_core.core.errors import DatasetError, ImageLoadError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Largest image we decode: 12k x 12k. Full-res chest films are at most ~3k a side; a
# 30k x 30k PNG is a decompression bomb and must be refused before decoding.
DEFAULT_MAX_PIXELS = 144_000_000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class ImageHeader:
    """What the index stores per image, read without decoding pixels."""

    width: int
    height: int
    mode: str  # PIL mode of the file ("L", "RGB", "I;16", "CMYK", ...) or "DICOM"
    format: str
    bytes: int
    patient: str | None = None  # DICOM: salted hash of PatientID (never the raw id)
    acquired_date: str | None = None  # DICOM: ISO YYYY-MM-DD of StudyDate (or fallbacks)


def is_dicom(data: bytes) -> bool:
    """True when the bytes carry the DICOM preamble magic ("DICM" at offset 128)."""
    return data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _open_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageLoadError(f"{name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{name}: image too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"{name}: not a readable image (expected JPEG, PNG, BMP, TIFF or DICOM)") from exc


def _read(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), name or "upload"
    path = Path(source)
    try:
        return path.read_bytes(), name or path.name
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def read_header(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                patient_salt: str | None = None) -> ImageHeader:
    """Read size and mode from the file header only (no pixel decoding).

    Args:
        path: image file.
        max_pixels: larger images are reported as unreadable (decompression-bomb guard).
        patient_salt: when given, a DICOM file's PatientID is returned as
            :func:`patient_key` (salted hash); without it no patient is read.

    Returns:
        The header fields stored by the index.

    Raises:
        ImageLoadError: the file is empty, not an image, or too large.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(_DICOM_MAGIC_OFFSET + 4)
            if is_dicom(head):
                return _dicom_header(path, size, max_pixels, patient_salt)
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if size == 0:
        raise ImageLoadError(f"{path.name}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode, fmt = img.mode, img.format or "?"
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"{path.name}: not a readable image (expected JPEG, PNG, BMP, TIFF or DICOM)") from exc
    except Image.DecompressionBombError as exc:  # PIL refuses > 2x its own limit at open
        raise ImageLoadError(f"{path.name}: image too large to decode safely ({exc})") from exc
    except OSError as exc:
        raise ImageLoadError(f"{path.name}: cannot read image header ({exc})") from exc
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{path.name}: image too large ({width}x{height} px; at most {max_pixels:,} pixels)")
    return ImageHeader(width, height, mode, fmt, size)


def patient_key(patient_id: str, salt: str, prefix: str = "dcm-") -> str:
    """The index's patient value for a patient id (a DICOM PatientID, or a metadata CSV's
    ``patient`` with ``prefix="pid-"``): the prefix + 16 hex of sha256(salt + id)."""
    return prefix + hashlib.sha256((salt + patient_id).encode("utf-8")).hexdigest()[:16]


def _dicom_date(ds: Dataset) -> str | None:
    """StudyDate, else AcquisitionDate, else ContentDate, as ISO YYYY-MM-DD (None if invalid)."""
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate"):
        digits = str(ds.get(keyword) or "").strip().replace(".", "")  # also ACR-NEMA YYYY.MM.DD
        if len(digits) != 8 or not digits.isdigit():
            continue
        try:
            return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
        except ValueError:  # e.g. month 13
            continue
    return None


def _dicom_size(ds: Dataset, label: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of one frame from Rows/Columns/NumberOfFrames, refusing bombs."""
    try:
        width, height = int(ds.Columns), int(ds.Rows)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageLoadError(f"{label}: unreadable DICOM header (Rows, Columns or "
                             f"NumberOfFrames missing or not a number)") from exc
    if width < 1 or height < 1 or frames < 1:
        raise ImageLoadError(f"{label}: unreadable DICOM header (claims {width}x{height} px "
                             f"and {frames} frame(s); expected at least 1 of each)")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: image too large ({width}x{height} px; at most {max_pixels:,} pixels)")
    return width, height


def _dicom_header(path: Path, size: int, max_pixels: int,
                  patient_salt: str | None) -> ImageHeader:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on malformed files
        raise ImageLoadError(f"{path.name}: unreadable DICOM header ({exc})") from exc
    width, height = _dicom_size(ds, path.name, max_pixels)
    patient_id = str(ds.get("PatientID") or "").strip()
    patient = patient_key(patient_id, patient_salt) if patient_id and patient_salt else None
    return ImageHeader(width, height, "DICOM", "DICOM", size, patient, _dicom_date(ds))


def load_image(source: str | Path | bytes, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode an image into an 8-bit "L" or "RGB" PIL image, fully loaded.

    Args:
        source: a path or the raw bytes (uploads are never written under their client name).
        name: how to call the image in messages (defaults to the file name).
        max_pixels: decompression-bomb guard.
        draft: when the caller only needs about this many pixels a side, let the JPEG
            decoder scale down by 1/2..1/8 while decoding (several times faster on full-res
            films); the result is still at least ``draft`` pixels a side.

    Returns:
        A loaded PIL image in mode "L" (grayscale sources) or "RGB", EXIF-transposed.

    Raises:
        ImageLoadError: with a one-line message naming the file and the problem.
    """
    data, label = _read(source, name)
    if is_dicom(data):
        return _load_dicom(data, label, max_pixels)
    img = _open_bytes(data, label)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: image too large ({width}x{height} px; at most {max_pixels:,} pixels)")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageLoadError(
            f"{label}: has {img.n_frames} frames (animated or multi-page); expected one image")
    if draft and img.format == "JPEG":
        img.draft(img.mode, (draft, draft))
    try:
        img.load()
    except OSError as exc:  # truncated JPEG/PNG
        raise ImageLoadError(f"{label}: truncated or corrupt image data ({exc})") from exc
    img = ImageOps.exif_transpose(img)
    return _to_8bit(img, label)


def _to_8bit(img: Image.Image, label: str) -> Image.Image:
    """Map any PIL mode to "L" or "RGB" with 8 bits, keeping the full dynamic range."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(_window_to_uint8(arr, label=label), mode="L")
    if img.mode in ("1", "P", "LA", "PA"):
        converted = img.convert("RGBA" if img.mode in ("P", "PA") else "L")
        return converted.convert("L") if converted.mode != "RGBA" else converted.convert("RGB")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX"):
        return img.convert("RGB")
    raise ImageLoadError(f"{label}: unsupported image mode {img.mode!r}")


def _window_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None, *,
                     label: str = "image") -> np.ndarray:
    lo = float(np.min(arr)) if lo is None else lo
    hi = float(np.max(arr)) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageLoadError(f"{label}: holds non-finite pixel values (NaN or infinity)")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _load_dicom(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Decode the first frame: modality LUT, then VOI LUT or window, MONOCHROME1 inverted.

    The size is checked from the header before any pixel is decoded. Only pixels leave this
    function: no header field (patient data) is returned or stored.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # malformed DICOM raises many types
        raise ImageLoadError(f"{label}: unreadable DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise ImageLoadError(f"{label}: DICOM file has no pixel data")
    _dicom_size(ds, label, max_pixels)
    try:
        arr = pixel_array(ds, index=0)  # decodes the first frame only
    except Exception as exc:  # missing decoder plugin, bad transfer syntax, short data
        raise ImageLoadError(f"{label}: cannot decode DICOM pixels ({exc})") from exc
    if arr.ndim == 3:
        return Image.fromarray(arr[..., :3].astype(np.uint8), mode="RGB")
    try:
        values, lo, hi = _apply_voi(apply_modality_lut(arr, ds), ds)
    except Exception as exc:  # invalid window width, LUT descriptor, ...
        raise ImageLoadError(f"{label}: invalid DICOM modality/VOI LUT ({exc})") from exc
    out = _window_to_uint8(np.asarray(values, dtype=np.float64), lo, hi, label=label)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: high values are dark
    return Image.fromarray(out, mode="L")


def _apply_voi(values: np.ndarray, ds: Dataset,
               ) -> tuple[np.ndarray, float | None, float | None]:
    """``apply_voi_lut`` and the range its output spans; (values, None, None) without a VOI.

    The range comes from passing the LUT's whole domain (or values beyond both window edges)
    through pydicom, so 8 bits span what the LUT or window maps to, not one image's min-max.
    The LUT is preferred over a window, as ``apply_voi_lut`` does.
    """
    from pydicom.pixels import apply_voi_lut

    item = (ds.get("VOILUTSequence") or [None])[0]
    if item is not None and None not in (item.get("LUTDescriptor"), item.get("LUTData")):
        entries, first = int(item.LUTDescriptor[0]) or 2 ** 16, int(item.LUTDescriptor[1])
        probe = np.arange(first, first + entries)
        values = np.rint(values).astype(np.int64)  # LUT inputs are whole numbers
    elif None not in (ds.get("WindowCenter"), ds.get("WindowWidth")):
        probe = np.array([-np.inf, np.inf])
    else:
        return values, None, None
    ends = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
    return apply_voi_lut(values, ds), float(ends.min()), float(ends.max())


def to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Resize to size x size and return uint8 (size, size, channels).

    Args:
        img: an "L" or "RGB" image from :func:`load_image`.
        size: output side in pixels (the dataset's images are stretched, as in every report).
        channels: 1 (grayscale) or 3 (gray repeated, or the RGB source).

    Returns:
        A uint8 array of shape (size, size, channels).
    """
    if channels not in (1, 3):
        raise ImageLoadError(f"channels must be 1 or 3. Received: channels={channels}")
    if size < 8:
        raise ImageLoadError(f"size must be at least 8. Received: size={size}")
    target = "L" if channels == 1 else "RGB"
    resized = img.convert(target).resize((size, size), Image.Resampling.BILINEAR,
                                         reducing_gap=3.0)
    arr = np.asarray(resized, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def thumbnail(source: str | Path | bytes, size: int = 160) -> np.ndarray:
    """A small RGB uint8 thumbnail for grids (keeps aspect ratio)."""
    img = load_image(source, draft=size)
    img.thumbnail((size, size))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# -- Array datasets (PneumoniaMNIST-style .npz) -----------------------------------------

def npz_record_images(path: str | Path, records: Sequence[Any]) -> np.ndarray:
    """The images of indexed array records (relpath ``"npz:<split>:<i>"``), in record order.

    The one loader of an indexed ``.npz`` dataset's pixels (training, evaluation, Predict):
    each split is read once.

    Raises:
        DatasetError: as :func:`load_npz_split`, or a relpath that is not ``npz:<split>:<i>``.
    """
    splits: dict[str, np.ndarray] = {}
    out = []
    for r in records:
        parts = str(r.relpath).split(":")
        if len(parts) != 3 or parts[0] != "npz" or not parts[2].isdigit():
            raise DatasetError(f"not an array record: relpath={r.relpath!r}. "
                               "Expected 'npz:<split>:<index>'")
        if parts[1] not in splits:
            splits[parts[1]] = load_npz_split(path, parts[1])[0]
        out.append(splits[parts[1]][int(parts[2])])
    return np.stack(out) if out else np.zeros((0, 0, 0), np.uint8)


def load_npz_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of a MedMNIST-style .npz (``{split}_images``, ``{split}_labels``).

    The official PneumoniaMNIST file has train/val/test; the shared copy has no test arrays.

    Returns:
        (uint8 images (N, H, W) or (N, H, W, C), int64 labels (N,)).

    Raises:
        DatasetError: the file cannot be read or has no such split.
    """
    try:
        with np.load(path) as data:
            splits = sorted(k[: -len("_images")] for k in data.files if k.endswith("_images"))
            if f"{split}_images" not in data.files or f"{split}_labels" not in data.files:
                raise DatasetError(f"{Path(path).name}: no {split!r} split. "
                                   f"Expected one of {splits}. Received: split={split!r}")
            images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64)
    return np.asarray(images, dtype=np.uint8), labels
