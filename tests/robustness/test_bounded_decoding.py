"""Bounded decoding (issue 26 item 2): the three files that exhausted memory, with peak memory
asserted, and the isolation of upload decoding in a child process.

Peak memory is the decoding child's own ``ru_maxrss`` (:class:`cxr_core.data.sandbox.Decoded`),
measured after the same child decoded two small films first, so what is asserted is what the
file itself added. Before the fix, in the web process: the deflated DICOM +801 MB, the 16-bit
PNG +300 MB, the RLE DICOM +259 MB (docs/benchmarks.md has both sets of numbers).
"""
from __future__ import annotations

import io
import os
import signal
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from cxr_core.core.errors import ImageLoadError
from cxr_core.data import images, sandbox

pytestmark = pytest.mark.robustness

MB = 2**20


# -- The three files, built without ever holding their decoded size ----------------------------

def png16_zeros(width: int = 3000, height: int = 3000) -> bytes:
    """A 16-bit grayscale PNG, zeros but one bright pixel: 9 Mpx in 0.02 MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    comp, parts = zlib.compressobj(9), []
    row = b"\x00" + bytes(2 * width)
    for y in range(height):
        parts.append(comp.compress(row if y != height // 2 else b"\x00\xff\xff" + row[3:]))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def _dataset(rows: int, cols: int, syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.PatientID, ds.Modality = "SECRET-1", "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds


def rle_dicom_zeros(rows: int = 3000, cols: int = 3000) -> bytes:
    """A 9 Mpx 16-bit RLE Lossless DICOM of zeros: 0.29 MB (two segments of replicate runs)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    row, left = b"", cols
    while left > 0:
        run = min(128, left)
        row, left = row + bytes([257 - run, 0]), left - run
    segment = row * rows
    frame = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13)) + segment + segment
    ds = _dataset(rows, cols, RLELossless)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflated_bomb(body_mb: int = 400) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose header says 64x64 px, followed by
    ``body_mb`` of zero pixel data: 0.39 MB on disk (pydicom alone inflated all of it)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dataset(64, 64, DeflatedExplicitVRLittleEndian)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(body.getvalue()
                         + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, body_mb * MB))]
    zeros = bytes(MB)
    out += [comp.compress(zeros) for _ in range(body_mb)] + [comp.flush()]
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return bytes(128) + b"DICM" + meta.getvalue() + b"".join(out)


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes]:
    return {"deflated_bomb.dcm": deflated_bomb(), "png16_9mpx.png": png16_zeros(),
            "rle_9mpx.dcm": rle_dicom_zeros()}


def _warm(dec: sandbox.UploadDecoder) -> int:
    """The child's peak after two small films (a PNG and an RLE DICOM): the baseline."""
    return max(dec.decode(d, name="warm", specs=((224, 1),), display_side=512).max_rss
               for d in (png16_zeros(64, 64), rle_dicom_zeros(64, 64)))


def _decoder(**kw) -> sandbox.UploadDecoder:
    budget = kw.pop("budget", images.decode_budget())
    return sandbox.UploadDecoder(memory_bytes=kw.pop("memory_bytes",
                                                     sandbox.decode_limit(budget)),
                                 budget=budget, **kw)


# name, expected (None: decoded), the most it may add to the decoding process's peak (MB),
# and the figure measured before the fix (issue 26), for the message.
CASES = [
    pytest.param("deflated_bomb.dcm", "inflates to more than 8.0 MB though its header declares "
                 r"1 frame\(s\) of 64x64 px", 40, 801, id="deflated_dicom_bomb"),
    pytest.param("png16_9mpx.png", None, 100, 300, id="png_16_bit_9_mpx"),
    pytest.param("rle_9mpx.dcm", None, 100, 259, id="rle_dicom_9_mpx"),
]


@pytest.mark.parametrize("name, refused, cap_mb, before_mb", CASES)
def test_hostile_file_is_decoded_within_its_budget(hostile, name, refused, cap_mb, before_mb):
    data = hostile[name]
    assert len(data) < 0.4 * MB  # the sizes: 0.39, 0.02 and 0.29 MB
    with _decoder() as dec:
        base = _warm(dec)
        if refused:
            with pytest.raises(ImageLoadError, match=refused) as err:
                dec.decode(data, name=name, specs=((224, 1),), display_side=512)
            assert str(err.value).startswith(f"{name}: ") and "\n" not in str(err.value)
            peak = dec.decode(png16_zeros(64, 64), name="after", specs=((224, 1),)).max_rss
        else:
            out = dec.decode(data, name=name, specs=((224, 1), (128, 3)), display_side=512)
            assert [v.shape for v in out.views] == [(224, 224, 1), (128, 128, 3)]
            assert out.display.shape == (512, 512)
            assert (out.display.max() > 0) == name.endswith(".png")  # its one bright pixel
            assert (out.png is not None) == name.endswith(".dcm")
            peak = out.max_rss
    added = (peak - base) / MB
    assert added < cap_mb, f"{name} added {added:.0f} MB (before the fix: +{before_mb} MB)"


@pytest.mark.parametrize("make, mode, estimate", [
    (lambda: png16_zeros(), "I;16", images.pil_decode_bytes(3000, 3000, "I;16")),
    (lambda: rle_dicom_zeros(), "DICOM", images.dicom_decode_bytes(3000, 3000, 1, 16)),
])
def test_the_header_estimate_bounds_what_a_decode_uses(make, mode, estimate):
    """The budget is computed from the header before decoding; the real peak stays under it."""
    with _decoder() as dec:
        base = _warm(dec)
        peak = dec.decode(make(), name=mode, specs=((224, 1),), display_side=512).max_rss
    assert peak - base < estimate < 128 * MB


def test_a_file_over_the_budget_is_refused_before_decoding(hostile, monkeypatch):
    monkeypatch.setenv("CXR_MAX_DECODE_MB", "50")  # the 9 Mpx 16-bit PNG needs ~107 MB
    with pytest.raises(ImageLoadError, match=r"png16_9mpx.png: decoding it would need about "
                       r"107 MB \(3000x3000 px, mode I;16\); at most 50 MB per image .*"
                       "CXR_MAX_DECODE_MB"):
        images.load_image(hostile["png16_9mpx.png"], name="png16_9mpx.png")
    with pytest.raises(ImageLoadError, match="rle_9mpx.dcm: decoding it would need about"):
        images.load_image(hostile["rle_9mpx.dcm"], name="rle_9mpx.dcm")


def test_indexing_reads_a_deflated_bomb_header_without_inflating_it(hostile, tmp_path):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(hostile["deflated_bomb.dcm"])
    tracemalloc.start()
    try:
        header = images.read_header(path, patient_salt="salt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (header.width, header.height, header.patient[:4]) == (64, 64, "dcm-")
    assert peak < 16 * MB, f"reading the header allocated {peak / MB:.0f} MB"


def test_a_real_deflated_dicom_still_decodes():
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from conftest import dicom_bytes

    plain = dicom_bytes(np.linspace(0, 4095, 40 * 32).reshape(40, 32).astype(np.uint16))
    ds = pydicom.dcmread(io.BytesIO(plain))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert np.array_equal(np.asarray(images.load_image(buf.getvalue())),
                          np.asarray(images.load_image(plain)))


# -- One bad file cannot take the web process down --------------------------------------------

def test_out_of_memory_ends_only_the_child_and_the_next_file_decodes(hostile):
    with _decoder(memory_bytes=100 * MB, budget=None) as dec:  # no estimate: the limit acts
        with pytest.raises(ImageLoadError, match=r"png16_9mpx.png: decoding needs more memory "
                           r"than the 100 MB its process may use; refused"):
            dec.decode(hostile["png16_9mpx.png"], name="png16_9mpx.png", specs=((224, 1),))
        out = dec.decode(png16_zeros(64, 64), name="next.png", specs=((32, 1),))
    assert out.views[0].shape == (32, 32, 1)


def test_a_killed_decoder_is_one_file_error_and_a_new_child_takes_the_next(hostile):
    import threading

    with _decoder() as dec:
        dec.decode(png16_zeros(64, 64), name="first.png")  # the child is up
        pid = dec._proc.pid
        # killed while it decodes (about a second of work), as the OOM killer or a segfault would
        threading.Timer(0.1, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(ImageLoadError, match=r"rle_9mpx.dcm: the decoding process died "
                           r"\(killed by SIGKILL\)"):
            dec.decode(hostile["rle_9mpx.dcm"], name="rle_9mpx.dcm", specs=((224, 1),),
                       display_side=512)
        assert dec.decode(png16_zeros(64, 64), name="next.png", specs=((32, 1),)).views
        assert dec._proc.pid != pid


def test_a_hung_decode_is_killed_after_its_timeout(hostile):
    with _decoder(timeout_s=0.05) as dec:
        with pytest.raises(ImageLoadError, match=r"rle_9mpx.dcm: decoding took longer than "
                           r"0.05 s; refused"):
            dec.decode(hostile["rle_9mpx.dcm"], name="rle_9mpx.dcm", specs=((224, 1),))
        assert dec._proc is None  # killed; the next decode starts a new child
        dec.timeout_s = 60
        assert dec.decode(png16_zeros(64, 64), name="next.png", specs=((32, 1),)).views


def test_a_reply_is_checked_before_it_is_read():
    """The parent never builds more than the cap from what a (possibly subverted) child says."""
    bad = io.BytesIO()
    sandbox._write_frame(bad, {"ok": True, "views": [[60000, 60000, 3]], "display": None,
                               "png": None})
    r, w = os.pipe()
    os.write(w, bad.getvalue())
    os.close(w)
    with os.fdopen(r, "rb") as stream, pytest.raises(EOFError, match="reply of"):
        sandbox._read_payload(stream, sandbox._read_header(stream, None), 1e12, "x")
