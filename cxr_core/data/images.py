"""The ONE image loader: every page, the index, the pipeline and predict go through it.

It reads headers without decoding (for the index), and decodes with the guards a clinical
image tool needs: EXIF orientation, 16-bit and CMYK sources, multi-frame files, decompression
bombs, truncated files, text files with an image extension, and DICOM (size guard from the
header, first frame only, modality LUT then VOI LUT or window, MONOCHROME1; RLE, JPEG Lossless,
JPEG-LS and JPEG 2000 through the pylibjpeg plugins). It also reads the pixels of array
datasets (PneumoniaMNIST-style ``.npz``): :func:`npz_record_images`, the one loader of them.

Decoding is bounded (issue 26): before any pixel is decoded, the memory the decode needs is
estimated from the header (rows x columns x samples x bits, and the copies this loader makes)
and refused over the budget (``CXR_MAX_DECODE_MB``, :mod:`cxr_core.core.limits`); a
Deflated-transfer-syntax DICOM is inflated with a bound derived from its own header (pydicom
would inflate the whole body first); 16-bit and float pixels go to 8 bits in float32 strips of
about a million pixels, never a whole-image float64 copy. Uploads are decoded in a child process
with a memory limit (:func:`decode_upload` run by :mod:`cxr_core.data.sandbox`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_core.core.errors import DatasetError, ImageLoadError
from cxr_core.core.limits import ENV as LIMIT_ENV
from cxr_core.core.limits import Limits

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Largest image we decode: 12k x 12k. Full-res chest films are at most ~3k a side; a
# 30k x 30k PNG is a decompression bomb and must be refused before decoding.
DEFAULT_MAX_PIXELS = 144_000_000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128
_STRIP_PIXELS = 1 << 20  # pixels per float32 strip when mapping to 8 bits (~4 MB each)
_WORK_BYTES = 64 * 2**20  # strips, LUT probes, decoder scratch: what every decode adds
# Bytes a PIL image of each mode holds per pixel (multi-band modes are stored 4 bytes a pixel),
# and what converting it to "L"/"RGB" adds per pixel (the uint8 output and PIL's own copies).
_PIL_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_PIL_CONVERT = {"L": 0, "RGB": 0, "1": 1, "P": 8, "PA": 8, "LA": 1, "I": 5, "F": 5,
                "I;16": 3, "I;16B": 3, "I;16L": 3, "I;16N": 3}
_DEFLATE_HEADER = 8 * 2**20  # a Deflated DICOM's header must reach group 0028 within this
_DEFLATE_STEP = 1 << 20  # bytes inflated per step


def decode_budget() -> int | None:
    """Bytes one decode may need (``CXR_MAX_DECODE_MB``; None: no limit)."""
    return Limits.from_env().decode_budget


def _check_budget(label: str, need: int, budget: int | None, what: str) -> None:
    """Refuse a decode whose estimated memory is over the budget, before decoding."""
    if budget is not None and need > budget:
        raise ImageLoadError(
            f"{label}: decoding it would need about {need / 2**20:,.0f} MB ({what}); at most "
            f"{budget / 2**20:,.0f} MB per image (an administrator can raise "
            f"{LIMIT_ENV['max_decode_mb']})")


def pil_decode_bytes(width: int, height: int, mode: str, *, transposed: bool = False) -> int:
    """The memory :func:`load_image` needs for a PIL image: its pixels as PIL stores them,
    an EXIF-transposed copy, the 8-bit conversion and a fixed allowance for strips."""
    stored = _PIL_STORED.get(mode, 4)
    return width * height * (stored * (2 if transposed else 1) + _PIL_CONVERT.get(mode, 4)) \
        + _WORK_BYTES


def dicom_decode_bytes(rows: int, cols: int, samples: int, bits: int) -> int:
    """The memory :func:`load_image` needs for one DICOM frame of rows x columns x samples x
    bits: the decoded frame, one decoder copy of it, the 8-bit output and the strips."""
    frame = rows * cols * samples * max(1, math.ceil(bits / 8))
    return 2 * frame + rows * cols * (3 if samples > 1 else 1) + _WORK_BYTES


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


def _read(source: str | Path | bytes, name: str | None,
          budget: int | None = None) -> tuple[bytes, str]:
    """The bytes of an image (a file larger than the decode budget is refused unread)."""
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), name or "upload"
    else:
        path = Path(source)
        label = name or path.name
        try:
            if budget is not None and path.stat().st_size > budget:
                _check_budget(label, path.stat().st_size, budget, "the file alone")
            data = path.read_bytes()
        except OSError as exc:
            raise ImageLoadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    _check_budget(label, len(data), budget, "the file alone")
    return data, label


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


@dataclass(frozen=True)
class _Geometry:
    """What a DICOM header says its pixels need: the memory budget is computed from it."""

    rows: int
    cols: int
    samples: int
    bits: int  # BitsAllocated
    frames: int

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.cols * self.samples * max(1, math.ceil(self.bits / 8))

    @property
    def decode_bytes(self) -> int:
        return dicom_decode_bytes(self.rows, self.cols, self.samples, self.bits)

    def describe(self) -> str:
        return (f"{self.frames} frame(s) of {self.cols}x{self.rows} px, {self.samples} "
                f"sample(s) of {self.bits} bits")


def _dicom_geometry(ds: Dataset, label: str, max_pixels: int) -> _Geometry:
    width, height = _dicom_size(ds, label, max_pixels)
    try:
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise ImageLoadError(f"{label}: unreadable DICOM header (SamplesPerPixel or "
                             "BitsAllocated not a number)") from exc
    if not (1 <= samples <= 4 and 1 <= bits <= 64):
        raise ImageLoadError(f"{label}: unreadable DICOM header (expected 1-4 samples per "
                             f"pixel of 1-64 bits. Received: {samples} of {bits} bits)")
    return _Geometry(height, width, samples, bits, frames)


def _read_meta(fp: Any, label: str) -> tuple[bytes | None, Any]:
    """The preamble and the File Meta group (group 2); ``fp`` is left at the dataset."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        preamble = read_preamble(fp, False)
        return preamble, _read_file_meta_info(fp)
    except Exception as exc:  # pydicom raises many types on malformed files
        raise ImageLoadError(f"{label}: unreadable DICOM header ({exc})") from exc


def _is_deflated(meta: Any) -> bool:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    return str(meta.get("TransferSyntaxUID") or "") == DeflatedExplicitVRLittleEndian


class _Inflater:
    """A Deflated DICOM body inflated step by step, never past the bound asked for.

    pydicom inflates the whole body before reading any element, so a 0.4 MB file can become
    800 MB before a size guard runs; here the header is inflated first, and the rest only up
    to what that header declares.
    """

    def __init__(self, body: bytes, label: str):
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._tail, self.label = body, label
        self.out = bytearray()
        self.finished = False  # the stream ended (or its input ran out)

    def upto(self, limit: int) -> None:
        """Inflate until ``limit`` bytes in all are out, or the stream ends."""
        while len(self.out) < limit and not self.finished:
            try:
                chunk = self._z.decompress(self._tail, min(_DEFLATE_STEP, limit - len(self.out)))
            except zlib.error as exc:
                raise ImageLoadError(f"{self.label}: corrupt Deflated DICOM data ({exc})") from exc
            self._tail = self._z.unconsumed_tail
            self.out += chunk
            self.finished = self._z.eof or (not chunk and not self._tail)


def _explicit_le(data: bytes | bytearray) -> Any:
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO(bytes(data))
    buf.is_little_endian, buf.is_implicit_VR = True, False
    return buf


def _deflated_header(inf: _Inflater) -> Dataset:
    """The elements up to group 0028 (the image attributes), inflating only as far as needed
    (at most :data:`_DEFLATE_HEADER`)."""
    from pydicom.filereader import read_dataset

    size = 64 * 1024
    while True:
        inf.upto(size)
        buf = _explicit_le(inf.out)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the probe may end inside an element
                ds = read_dataset(buf, False, True,
                                  stop_when=lambda tag, vr, length: tag.group > 0x0028)
        except Exception as exc:  # malformed elements raise many types
            raise ImageLoadError(f"{inf.label}: unreadable DICOM header ({exc})") from exc
        if buf.tell() < len(inf.out) or inf.finished:
            return ds
        if size >= _DEFLATE_HEADER:
            raise ImageLoadError(f"{inf.label}: unreadable DICOM header (over "
                                 f"{_DEFLATE_HEADER >> 20} MB inflated before its image "
                                 "attributes; refused)")
        size *= 4


def _read_deflated(data: bytes, offset: int, preamble: bytes | None, meta: Any, label: str,
                   max_pixels: int, budget: int | None) -> Dataset:
    """A Deflated Explicit VR Little Endian file read with a bound: the header first, then the
    body only up to what rows x columns x samples x bits x frames declare."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    inf = _Inflater(data[offset:], label)
    geo = _dicom_geometry(_deflated_header(inf), label, max_pixels)
    # the whole body stays in memory (all frames), and the first frame is decoded from it
    _check_budget(label, geo.frames * geo.frame_bytes + geo.decode_bytes, budget,
                  geo.describe() + ", Deflated")
    allowed = _DEFLATE_HEADER + 2 * geo.frames * geo.frame_bytes  # elements beside the pixels
    inf.upto(allowed + 1)
    if len(inf.out) > allowed:
        raise ImageLoadError(
            f"{label}: Deflated DICOM inflates to more than {allowed / 2**20:.1f} MB though its "
            f"header declares {geo.describe()}; refused (a decompression bomb?)")
    try:
        body = read_dataset(_explicit_le(inf.out), False, True)
    except Exception as exc:  # malformed elements raise many types
        raise ImageLoadError(f"{label}: unreadable DICOM file ({exc})") from exc
    meta = meta.__class__(meta)  # a copy: its pixels are now plain Explicit VR Little Endian
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(label, body, preamble, meta, False, True)
    ds.set_original_encoding(False, True, body._character_set)
    return ds


def _dicom_header(path: Path, size: int, max_pixels: int,
                  patient_salt: str | None) -> ImageHeader:
    import pydicom

    with path.open("rb") as fh:
        preamble, meta = _read_meta(fh, path.name)
        deflated = _is_deflated(meta)
        offset = fh.tell()
    if deflated:  # only the header is inflated (pydicom would inflate the whole body)
        budget = decode_budget()
        data, _ = _read(path, path.name, budget)
        ds = _deflated_header(_Inflater(data[offset:], path.name))
    else:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on malformed files
            raise ImageLoadError(f"{path.name}: unreadable DICOM header ({exc})") from exc
    width, height = _dicom_size(ds, path.name, max_pixels)
    patient_id = str(ds.get("PatientID") or "").strip()
    patient = patient_key(patient_id, patient_salt) if patient_id and patient_salt else None
    return ImageHeader(width, height, "DICOM", "DICOM", size, patient, _dicom_date(ds))


_UNSET: Any = object()


def load_image(source: str | Path | bytes, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None,
               budget: int | None = _UNSET) -> Image.Image:
    """Decode an image into an 8-bit "L" or "RGB" PIL image, fully loaded.

    Args:
        source: a path or the raw bytes (uploads are never written under their client name).
        name: how to call the image in messages (defaults to the file name).
        max_pixels: decompression-bomb guard.
        draft: when the caller only needs about this many pixels a side, let the JPEG
            decoder scale down by 1/2..1/8 while decoding (several times faster on full-res
            films); the result is still at least ``draft`` pixels a side.
        budget: bytes the decode may need, estimated from the header before decoding
            (default: ``CXR_MAX_DECODE_MB``; None: no limit).

    Returns:
        A loaded PIL image in mode "L" (grayscale sources) or "RGB", EXIF-transposed.

    Raises:
        ImageLoadError: with a one-line message naming the file and the problem.
    """
    budget = decode_budget() if budget is _UNSET else budget
    data, label = _read(source, name, budget)
    if is_dicom(data):
        return _load_dicom(data, label, max_pixels, budget)
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
    width, height = img.size
    _check_budget(label, pil_decode_bytes(width, height, img.mode, transposed=_rotated(img)),
                  budget, f"{width}x{height} px, mode {img.mode}")
    try:
        img.load()
    except OSError as exc:  # truncated JPEG/PNG
        raise ImageLoadError(f"{label}: truncated or corrupt image data ({exc})") from exc
    img = ImageOps.exif_transpose(img)
    return _to_8bit(img, label)


def _rotated(img: Image.Image) -> bool:
    """Whether an EXIF orientation will make a transposed copy (read without decoding:
    Pillow's PNG ``getexif`` would load the pixels)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return False
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return exif.get(0x0112, 1) not in (None, 1)
    except Exception:  # noqa: BLE001 - a bad EXIF block: exif_transpose ignores it too
        return False


def _to_8bit(img: Image.Image, label: str) -> Image.Image:
    """Map any PIL mode to "L" or "RGB" with 8 bits, keeping the full dynamic range."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_window_to_uint8(np.asarray(img), label=label), mode="L")
    if img.mode in ("1", "P", "LA", "PA"):
        converted = img.convert("RGBA" if img.mode in ("P", "PA") else "L")
        return converted.convert("L") if converted.mode != "RGBA" else converted.convert("RGB")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBA", "RGBX"):
        return img.convert("RGB")
    raise ImageLoadError(f"{label}: unsupported image mode {img.mode!r}")


def _strips(arr: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges of about :data:`_STRIP_PIXELS` pixels each."""
    rows = arr.shape[0]
    step = max(1, _STRIP_PIXELS // max(1, int(np.prod(arr.shape[1:]))))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _finite_range(lo: float, hi: float, label: str) -> tuple[float, float]:
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageLoadError(f"{label}: holds non-finite pixel values (NaN or infinity)")
    return lo, hi


def _scale_strip(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One strip to uint8: a float32 copy of the strip, then every step in place."""
    if hi <= lo:
        return np.zeros(np.shape(values), dtype=np.uint8)
    blk = np.array(values, dtype=np.float32, copy=True)
    blk -= np.float32(lo)
    blk *= np.float32(255.0 / (hi - lo))
    np.rint(blk, out=blk)
    np.clip(blk, 0, 255, out=blk)
    return blk.astype(np.uint8)


def _window_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None, *,
                     label: str = "image") -> np.ndarray:
    """``arr`` mapped linearly from [lo, hi] (default its own range) to uint8, in strips."""
    lo = float(np.min(arr)) if lo is None else lo
    hi = float(np.max(arr)) if hi is None else hi
    lo, hi = _finite_range(lo, hi, label)
    out = np.empty(arr.shape, dtype=np.uint8)
    for a, b in _strips(arr):
        out[a:b] = _scale_strip(arr[a:b], lo, hi)
    return out


def _dicom_dataset(data: bytes, label: str, max_pixels: int, budget: int | None) -> Dataset:
    """The whole dataset, a Deflated body inflated with a bound; refused over the budget
    (the bytes themselves plus the first frame's decode) before any pixel is decoded."""
    import pydicom

    fp = io.BytesIO(data)
    preamble, meta = _read_meta(fp, label)
    if _is_deflated(meta):
        return _read_deflated(data, fp.tell(), preamble, meta, label, max_pixels, budget)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # malformed DICOM raises many types
        raise ImageLoadError(f"{label}: unreadable DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise ImageLoadError(f"{label}: DICOM file has no pixel data")
    geo = _dicom_geometry(ds, label, max_pixels)
    _check_budget(label, len(data) + geo.decode_bytes, budget, geo.describe())
    return ds


def _load_dicom(data: bytes, label: str, max_pixels: int, budget: int | None) -> Image.Image:
    """Decode the first frame: modality LUT, then VOI LUT or window, MONOCHROME1 inverted.

    The size and the memory it needs are checked from the header before any pixel is decoded.
    Only pixels leave this function: no header field (patient data) is returned or stored.
    """
    from pydicom.pixels import pixel_array

    ds = _dicom_dataset(data, label, max_pixels, budget)
    if "PixelData" not in ds:
        raise ImageLoadError(f"{label}: DICOM file has no pixel data")
    try:
        arr = pixel_array(ds, index=0)  # decodes the first frame only
    except Exception as exc:  # missing decoder plugin, bad transfer syntax, short data
        raise ImageLoadError(f"{label}: cannot decode DICOM pixels ({exc})") from exc
    if arr.ndim == 3:
        return Image.fromarray(arr[..., :3].astype(np.uint8), mode="RGB")
    try:
        out = _dicom_to_uint8(arr, ds, label)
    except ImageLoadError:
        raise
    except Exception as exc:  # invalid window width, LUT descriptor, ...
        raise ImageLoadError(f"{label}: invalid DICOM modality/VOI LUT ({exc})") from exc
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        np.subtract(255, out, out=out)  # MONOCHROME1: high values are dark
    return Image.fromarray(out, mode="L")


def _dicom_to_uint8(arr: np.ndarray, ds: Dataset, label: str) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, then 8 bits: strip by strip, so pydicom's float64
    results never span the whole image. Without a VOI the range is the modality values' own
    (a first pass over the strips)."""
    from pydicom.pixels import apply_modality_lut

    strips = _strips(arr)
    voi = _voi_range(ds)
    if voi is None:
        lo, hi = np.inf, -np.inf
        for a, b in strips:
            values = apply_modality_lut(arr[a:b], ds)
            lo, hi = min(lo, float(np.min(values))), max(hi, float(np.max(values)))
    else:
        lo, hi = voi
    lo, hi = _finite_range(lo, hi, label)
    out = np.empty(arr.shape, dtype=np.uint8)
    for a, b in strips:
        values = apply_modality_lut(arr[a:b], ds)
        if voi is not None:
            values = _apply_voi(values, ds)
        out[a:b] = _scale_strip(values, lo, hi)
    return out


def _voi_item(ds: Dataset) -> Any:
    item = (ds.get("VOILUTSequence") or [None])[0]
    if item is not None and None not in (item.get("LUTDescriptor"), item.get("LUTData")):
        return item
    return None


def _voi_range(ds: Dataset) -> tuple[float, float] | None:
    """The range ``apply_voi_lut``'s output spans, or None without a VOI LUT or window.

    It comes from passing the LUT's whole domain (or values beyond both window edges) through
    pydicom, so 8 bits span what the LUT or window maps to, not one image's min-max. The LUT
    is preferred over a window, as ``apply_voi_lut`` does.
    """
    from pydicom.pixels import apply_voi_lut

    item = _voi_item(ds)
    if item is not None:
        entries, first = int(item.LUTDescriptor[0]) or 2 ** 16, int(item.LUTDescriptor[1])
        probe = np.arange(first, first + entries)
    elif None not in (ds.get("WindowCenter"), ds.get("WindowWidth")):
        probe = np.array([-np.inf, np.inf])
    else:
        return None
    ends = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """``apply_voi_lut`` on one strip (LUT inputs are whole numbers)."""
    from pydicom.pixels import apply_voi_lut

    if _voi_item(ds) is not None:
        values = np.rint(values).astype(np.int64)
    return apply_voi_lut(values, ds)


@dataclass(frozen=True, eq=False)  # eq=False: holds arrays
class DecodedUpload:
    """What the web process needs from one uploaded file, decoded once in a child process.

    Attributes:
        views: one (size, size, channels) uint8 array per (size, channels) asked (what a model
            of that input sees: :func:`load_image` with ``draft=size``, then :func:`to_array`).
        display: uint8 (H, W) or (H, W, 3) at most ``display_side`` a side, or None.
        png: a DICOM file's pixels as PNG (what is stored for review: no header field), or
            None.
        dicom: whether the file was DICOM.
    """

    views: tuple[np.ndarray, ...]
    display: np.ndarray | None
    png: bytes | None
    dicom: bool


def decode_upload(data: bytes, name: str, specs: Sequence[tuple[int, int]] = (),
                  display_side: int | None = None, budget: int | None = None) -> DecodedUpload:
    """Decode an upload for every use the web process has of it (in a child process: run by
    :class:`cxr_core.data.sandbox.UploadDecoder`, or :func:`cxr_core.data.sandbox.load_upload`).

    Raises:
        ImageLoadError: with a one-line message naming the file and the problem.
    """
    jpeg = data[:2] == b"\xff\xd8"  # only JPEG decodes smaller for a draft size
    decoded: dict[int | None, Image.Image] = {}

    def image(draft: int | None) -> Image.Image:
        key = draft if jpeg else None
        if key not in decoded:
            decoded[key] = load_image(data, name=name, draft=key, budget=budget)
        return decoded[key]

    views = tuple(to_array(image(size), size, channels) for size, channels in specs)
    display = None
    if display_side is not None:
        shown = image(display_side).copy()
        shown.thumbnail((display_side, display_side))
        display = np.asarray(shown)
    png = None
    if is_dicom(data):
        buf = io.BytesIO()
        image(None).save(buf, format="PNG")
        png = buf.getvalue()
    return DecodedUpload(views, display, png, is_dicom(data))


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
