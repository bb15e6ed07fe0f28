"""The one image loader: modes, bit depths, guards and clear errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from cxr_core.core.errors import ImageLoadError
from cxr_core.data.images import load_image, read_header, thumbnail, to_array


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_sixteen_bit_png_keeps_range():
    arr = np.linspace(1000, 50000, 64 * 64).reshape(64, 64).astype(np.uint16)
    img = load_image(_png_bytes(Image.fromarray(arr)))
    out = np.asarray(img)
    assert img.mode == "L" and out.min() == 0 and out.max() == 255


def test_cmyk_jpeg_becomes_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(buf, format="JPEG")
    assert load_image(buf.getvalue()).mode == "RGB"


def test_exif_orientation_applied():
    img = Image.new("L", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"hello, not an image", "not a readable image"),
])
def test_bad_bytes(data, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(data, name="x.jpeg")


def test_truncated_jpeg(tmp_path):
    good = write_image(tmp_path / "a.jpeg", size=(256, 256)).read_bytes()
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(good[: len(good) // 2])


def test_animated_gif_rejected():
    frames = [Image.new("L", (8, 8), c) for c in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageLoadError, match="2 frames"):
        load_image(buf.getvalue())


def test_decompression_bomb_refused_before_decoding():
    # A 30k x 30k PNG: the header says 900 Mpx; we refuse without decoding the pixels.
    data = _png_bytes(Image.new("1", (30_000, 30_000)), optimize=True)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(data)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="cannot read"):
        read_header(tmp_path / "nope.png")


def test_to_array_shapes_and_thumbnail(tmp_path):
    path = write_image(tmp_path / "a.png", size=(50, 30), mode="RGB", fmt="PNG")
    img = load_image(path)
    assert to_array(img, 24, 1).shape == (24, 24, 1)
    assert to_array(img, 24, 3).dtype == np.uint8
    assert thumbnail(path, 16).shape[2] == 3
    with pytest.raises(ImageLoadError, match="channels=2"):
        to_array(img, 24, 2)


def _dicom(tmp_path, *, photometric="MONOCHROME2", pixels=True):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^Jane"
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1024, 2048
    if pixels:
        ds.PixelData = np.tile(np.arange(16, dtype=np.uint16) * 256, (16, 1)).tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome1_inverted(tmp_path):
    mono2 = np.asarray(load_image(_dicom(tmp_path)))
    mono1 = np.asarray(load_image(_dicom(tmp_path, photometric="MONOCHROME1")))
    assert mono2[0, 0] < mono2[0, -1] and mono1[0, 0] > mono1[0, -1]
    assert read_header(_dicom(tmp_path)).mode == "DICOM"


def test_dicom_without_pixels(tmp_path):
    with pytest.raises(ImageLoadError, match="no pixel data"):
        load_image(_dicom(tmp_path, pixels=False))
