"""DICOM: transfer syntaxes, modality LUT then VOI LUT/window, MONOCHROME1, first frame only,
the header size guard, and hashed PatientID / StudyDate in the index."""
from __future__ import annotations

import io
import stat

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cxr_core.core import settings
from cxr_core.core.errors import ConfigError, ImageLoadError
from cxr_core.data.images import load_image, patient_key, read_header
from cxr_core.data.indexing import index_dataset, open_dataset
from cxr_core.storage import open_db

SECRET = "SECRET-4711"


def _ramp(rows: int = 40, cols: int = 64, *, top: int = 4095, seed: int = 0) -> np.ndarray:
    """12-bit test pixels: a horizontal ramp 0..top plus a little noise (not all one value)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, top, cols)[None, :].repeat(rows, 0)
    return np.clip(ramp + rng.integers(0, 16, (rows, cols)), 0, top).astype(np.uint16)


def _dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", **tags) -> Dataset:
    """A DX dataset (Explicit VR Little Endian) holding ``pixels`` ((frames,) rows, cols)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.Modality, ds.PatientName = "DX", "Doe^Jane"
    ds.set_pixel_data(pixels, photometric, 12)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    return np.round((arr - arr.min()) * 255 / (arr.max() - arr.min())).astype(np.uint8)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) with an output range of 0..255."""
    x = x.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y[x <= center - 0.5 - (width - 1) / 2] = 0
    y[x > center - 0.5 + (width - 1) / 2] = 255
    return np.round(y).astype(np.uint8)


def _jpeg_lossless_sv1(frame: np.ndarray, precision: int = 12) -> bytes:
    """A Lossless JPEG codestream (ITU T.81 process 14, selection value 1, Huffman).

    Neither pydicom 3 nor the pylibjpeg plugins can encode this transfer syntax, so it is
    written here, by the standard's Annex H; the decoder under test (pylibjpeg-libjpeg) and
    an exact round-trip check below show the bytes are real.
    """
    x = frame.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)  # H.1.2.1: first sample of the image
    pred[0, 1:] = x[0, :-1]  # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1 (Ra) everywhere else
    diffs = (x - pred).ravel()
    assert np.abs(diffs).max() < 1 << 15
    bits = []
    for d in diffs.tolist():
        ssss = abs(d).bit_length()
        bits.append(format(ssss, "05b"))  # 17 categories, one 5-bit code each (table below)
        if ssss:
            bits.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    rows, cols = frame.shape
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)  # BITS: 17 codes of length 5
    dht = b"\xff\xc4" + (2 + 1 + 16 + 17).to_bytes(2, "big") + b"\x00" + counts + bytes(range(17))
    sof3 = (b"\xff\xc3\x00\x0b" + bytes([precision]) + rows.to_bytes(2, "big")
            + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00")
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00"  # Ss = 1: first-order prediction
    return b"\xff\xd8" + dht + sof3 + sos + data + b"\xff\xd9"


def _encoded(pixels: np.ndarray, syntax: str) -> Dataset:
    """The pixels in ``syntax``: pydicom's encoders, or the Annex H encoder for SV1."""
    ds = _dataset(pixels)
    if syntax == ExplicitVRLittleEndian:
        return ds
    if syntax == JPEGLosslessSV1:
        ds.PixelData = encapsulate([_jpeg_lossless_sv1(pixels)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        return ds
    ds.compress(syntax)  # RLE: pydicom; JPEG-LS: pyjpegls; JPEG 2000: pylibjpeg-openjpeg
    return ds


def _no_decoding(monkeypatch) -> None:
    """Make any pixel decode fail loudly."""
    def boom(*args, **kwargs):
        raise AssertionError("pixel data was decoded")
    monkeypatch.setattr(Decoder, "as_array", boom)
    monkeypatch.setattr(Decoder, "iter_array", boom)


# -- Transfer syntaxes ----------------------------------------------------------------------

@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLSLossless,
                                    JPEG2000Lossless, JPEGLosslessSV1],
                         ids=["explicit_le", "rle", "jpeg_ls", "jpeg_2000", "jpeg_lossless_sv1"])
def test_transfer_syntax_decodes_exactly(syntax):
    pixels = _ramp()
    data = _bytes(_encoded(pixels, syntax))
    assert pixel_array(io.BytesIO(data)).tolist() == pixels.tolist()  # lossless round trip
    img = load_image(data, name="x.dcm")
    assert img.mode == "L" and img.size == (64, 40)
    assert np.array_equal(np.asarray(img), _minmax(pixels))  # no window: min-max to 8 bits


def test_jpeg_lossless_stream_is_process_14_sv1():
    frame = _jpeg_lossless_sv1(_ramp())
    sof, sos = frame.index(b"\xff\xc3"), frame.index(b"\xff\xda")  # SOF3: lossless, Huffman
    assert frame[:2] == b"\xff\xd8" and frame[sof + 4] == 12  # SOI; 12-bit precision
    assert frame[sos + 7:sos + 10] == b"\x01\x00\x00"  # Ss = 1 (first-order), Se, Ah/Al = 0


# -- Modality LUT, VOI LUT / window, MONOCHROME1 ---------------------------------------------

def test_window_maps_the_window_not_the_image_range():
    pixels = _ramp(top=1200)  # data fills only the lower part of a 0..4095 window
    img = np.asarray(load_image(_bytes(_dataset(pixels, WindowCenter=2048, WindowWidth=4096))))
    assert np.array_equal(img, _linear_window(pixels, 2048, 4096))
    assert img.max() < 80  # not stretched to 255 as a min-max would


def test_rescale_is_applied_before_the_window():
    pixels = _ramp()
    window = dict(WindowCenter=1000, WindowWidth=2000)  # in rescaled units
    rescaled = _dataset(pixels, RescaleSlope=1, RescaleIntercept=-1024, **window)
    img = np.asarray(load_image(_bytes(rescaled)))
    assert np.array_equal(img, _linear_window(pixels.astype(np.int64) - 1024, 1000, 2000))
    stored = np.asarray(load_image(_bytes(_dataset(pixels, **window))))
    assert np.abs(img.astype(int) - stored).mean() > 60  # the rescale visibly changes it
    doubled = _dataset(pixels, RescaleSlope=2, RescaleIntercept=0, WindowCenter=4096,
                       WindowWidth=8192)
    assert np.array_equal(np.asarray(load_image(_bytes(doubled))),
                          _linear_window(pixels * 2.0, 4096, 8192))


def test_voi_lut_sequence_is_applied_over_its_output_range():
    pixels = _ramp()
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(0x00283006, "US", [4095 - v for v in range(4096)])  # LUTData: an inverting LUT
    ds = _dataset(pixels, WindowCenter=100, WindowWidth=10)  # the LUT wins over the window
    ds.VOILUTSequence = [lut]
    img = np.asarray(load_image(_bytes(ds)))
    assert np.array_equal(img, np.round((4095 - pixels.astype(int)) * 255 / 4095).astype(np.uint8))


def test_monochrome1_is_inverted_after_the_window():
    pixels = _ramp()
    window = dict(WindowCenter=1500, WindowWidth=1000)
    mono2 = np.asarray(load_image(_bytes(_dataset(pixels, **window))))
    mono1 = np.asarray(load_image(_bytes(_dataset(pixels, photometric="MONOCHROME1", **window))))
    assert np.array_equal(mono1, 255 - _linear_window(pixels, 1500, 1000))
    assert np.array_equal(mono1, 255 - mono2)


def test_invalid_window_is_a_load_error():
    ds = _dataset(_ramp(), WindowCenter=100, WindowWidth=0)
    with pytest.raises(ImageLoadError, match="x.dcm: invalid DICOM modality/VOI LUT"):
        load_image(_bytes(ds), name="x.dcm")


# -- Multi-frame: first frame only ----------------------------------------------------------

@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless], ids=["native", "rle"])
def test_multiframe_shows_only_the_first_frame(syntax, monkeypatch):
    first, second = _ramp(seed=1), 4095 - _ramp(seed=2)
    ds = _dataset(np.stack([first, second]))
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    assert int(ds.NumberOfFrames) == 2
    indexes = []
    as_array = Decoder.as_array

    def spy(self, src, *args, **kwargs):
        indexes.append(kwargs.get("index"))
        return as_array(self, src, *args, **kwargs)
    monkeypatch.setattr(Decoder, "as_array", spy)
    img = np.asarray(load_image(_bytes(ds)))
    assert np.array_equal(img, _minmax(first))
    assert indexes == [0]  # one decode, of frame 1 only


# -- Size guard from the header -------------------------------------------------------------

def _claiming(rows: int, cols: int, frames: int | None = None) -> bytes:
    """A DICOM whose header claims rows x cols (x frames) but holds 8 bytes of pixel data."""
    ds = _dataset(_ramp(2, 2))
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = b"\0" * 8
    return _bytes(ds)


def test_huge_header_is_refused_before_decoding(tmp_path, monkeypatch):
    _no_decoding(monkeypatch)
    data = _claiming(20_000, 30_000)
    msg = r"bomb.dcm: image too large \(30000x20000 px; at most 144,000,000 pixels\)"
    with pytest.raises(ImageLoadError, match=msg):
        load_image(data, name="bomb.dcm")
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=msg):
        read_header(path)  # the index marks it unreadable, as for a PNG bomb


def test_max_pixels_applies_to_one_frame():
    data = _bytes(_dataset(np.stack([_ramp(), _ramp(seed=3)])))  # 2 frames of 64x40
    with pytest.raises(ImageLoadError, match=r"image too large \(64x40 px; at most 2,559"):
        load_image(data, max_pixels=2559)
    assert load_image(data, max_pixels=2560).size == (64, 40)


@pytest.mark.parametrize("rows, cols, frames, match", [
    (0, 16, None, r"claims 16x0 px and 1 frame\(s\); expected at least 1 of each"),
    (16, 16, -2, r"claims 16x16 px and -2 frame\(s\)"),
])
def test_header_without_a_valid_size_is_refused(rows, cols, frames, match, monkeypatch):
    _no_decoding(monkeypatch)
    with pytest.raises(ImageLoadError, match=f"unreadable DICOM header .*{match}"):
        load_image(_claiming(rows, cols, frames))


# -- Index: hashed PatientID, StudyDate -----------------------------------------------------

def _write(path, *, patient_id: str | None = SECRET, **tags) -> None:
    ds = _dataset(_ramp(seed=len(str(path))), **tags)
    if patient_id is not None:
        ds.PatientID = patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_bytes(ds))


def _dicom_folder(tmp_path):
    root = tmp_path / "dicoms"
    _write(root / "train/NORMAL/IM-0001-0001.dcm", StudyDate="20240131")
    _write(root / "train/NORMAL/IM-0002-0001.dcm", StudyDate="2024", AcquisitionDate="20240202")
    _write(root / "test/NORMAL/IM-0003-0001.dcm", StudyDate="20241399", ContentDate="20231224")
    _write(root / "train/PNEUMONIA/person7_virus_9.dcm", patient_id="OTHER-1")
    _write(root / "train/PNEUMONIA/person8_bacteria_1.dcm", patient_id=None,
           StudyDate="20240301")
    return root


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_index_stores_salted_patient_hash_and_study_date(tmp_path, cxr_home, monkeypatch):
    monkeypatch.delenv("CXR_PATIENT_SALT", raising=False)
    _no_decoding(monkeypatch)  # the scan reads headers only
    root = _dicom_folder(tmp_path)
    rep = index_dataset(open_db(), root, name="dcm")
    _, recs = open_dataset(open_db(), "dcm")
    by_path = {r.relpath: r for r in recs}
    assert not [r.error for r in recs if r.error]

    salt_file = cxr_home / "patient_salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = salt_file.read_text()
    key = patient_key(SECRET, salt)
    assert key.startswith("dcm-") and len(key) == 20
    # One patient across file names and splits: the DICOM id wins over "0001", "0002", ...
    assert {by_path[p].patient for p in ("train/NORMAL/IM-0001-0001.dcm",
                                         "train/NORMAL/IM-0002-0001.dcm",
                                         "test/NORMAL/IM-0003-0001.dcm")} == {key}
    assert by_path["train/PNEUMONIA/person7_virus_9.dcm"].patient == patient_key("OTHER-1", salt)
    assert by_path["train/PNEUMONIA/person8_bacteria_1.dcm"].patient == "person8"  # no id
    assert rep.summary["patients"] == 3
    assert {p: r.acquired_date for p, r in by_path.items()} == {
        "train/NORMAL/IM-0001-0001.dcm": "2024-01-31",
        "train/NORMAL/IM-0002-0001.dcm": "2024-02-02",  # invalid StudyDate: AcquisitionDate
        "test/NORMAL/IM-0003-0001.dcm": "2023-12-24",  # day 99: ContentDate
        "train/PNEUMONIA/person7_virus_9.dcm": None,
        "train/PNEUMONIA/person8_bacteria_1.dcm": "2024-03-01",
    }
    state = b"".join(p.read_bytes() for p in cxr_home.rglob("*") if p.is_file())
    assert SECRET.encode() not in state and b"OTHER-1" not in state  # DB, WAL, salt file
    assert SECRET.encode("utf-16-le") not in state

    # A full re-scan (fresh database, same install) gives the same patients.
    monkeypatch.setenv("CXR_DB_URL", f"sqlite:///{tmp_path / 'second.db'}")
    index_dataset(open_db(), root, name="dcm")
    _, again = open_dataset(open_db(), "dcm")
    assert [r.patient for r in again] == [r.patient for r in recs]
    assert SECRET.encode() not in (tmp_path / "second.db").read_bytes()


def test_patient_salt_from_environment(tmp_path, cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_PATIENT_SALT", "deployment-secret")
    _write(tmp_path / "d/NORMAL/a.dcm")
    _write(tmp_path / "d/PNEUMONIA/b.dcm", patient_id="OTHER-1")
    index_dataset(open_db(), tmp_path / "d", name="env")
    _, recs = open_dataset(open_db(), "env")
    assert recs[0].patient == patient_key(SECRET, "deployment-secret")
    assert recs[0].patient != patient_key(SECRET, "other-secret")
    assert not (cxr_home / "patient_salt").exists()


def test_patient_salt_file_is_made_once(cxr_home, monkeypatch):
    monkeypatch.delenv("CXR_PATIENT_SALT", raising=False)
    salt = settings.patient_salt()
    assert len(salt) == 64 and settings.patient_salt() == salt
    assert [p.name for p in cxr_home.iterdir() if "salt" in p.name] == ["patient_salt"]
    (cxr_home / "patient_salt").write_text("")
    with pytest.raises(ConfigError, match="patient salt file is empty"):
        settings.patient_salt()


def test_read_header_reads_no_patient_without_salt(tmp_path):
    path = tmp_path / "a.dcm"
    _write(path, StudyDate="20240131")
    hdr = read_header(path)
    assert (hdr.width, hdr.height, hdr.mode) == (64, 40, "DICOM")
    assert hdr.patient is None and hdr.acquired_date == "2024-01-31"
    assert read_header(path, patient_salt="s").patient == patient_key(SECRET, "s")
