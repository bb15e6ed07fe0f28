"""Shared fixtures: a temporary CXR_HOME/DB per test and the real shared data."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, also on a GPU host

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("CXR_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data); CI sets CXR_SHARED_DATA and requires it."""
    path = _shared_data()
    if not (path / "chest_xray_224" / "train").is_dir():
        if os.environ.get("CXR_REQUIRE_DATA") == "1":
            pytest.fail(f"real data required but missing at {path}")
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture()
def cxr_home(tmp_path, monkeypatch) -> Path:
    """A fresh CXR_HOME with its own SQLite DB for one test. ``CXR_WORKER=off``: a page or
    service that queues work launches no worker process (a test that wants one sets
    ``auto``; the others play the worker with ``app.run_worker(once=True)``). ``CXR_DEMO=off``:
    no first-launch demo job."""
    home = tmp_path / "cxr_home"
    home.mkdir()
    monkeypatch.setenv("CXR_HOME", str(home))
    monkeypatch.setenv("CXR_WORKER", "off")
    monkeypatch.setenv("CXR_DEMO", "off")  # a test that wants the first-launch demo sets "on"
    monkeypatch.delenv("CXR_DB_URL", raising=False)
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    monkeypatch.delenv("CXR_DATA_ROOTS", raising=False)
    # The app writes CXR_AUTH_MODE when a page runs; set here so the test restores it.
    monkeypatch.setenv("CXR_AUTH_MODE", "local")
    return home


def write_image(path: Path, *, size=(32, 32), mode="L", seed=0, fmt=None) -> Path:
    """A small real image file with random content (distinct per seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L" if mode == "L" else "RGB").convert(mode).save(path, format=fmt)
    return path


# Kermany-style names: 3 normal patients (one with 2 images), 3 pneumonia patients.
TINY_FILES = {
    "train/NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.jpeg",
                     "NORMAL2-IM-0003-0001.jpeg", "IM-0004-0001.jpeg", "IM-0005-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg",
                        "person2_virus_3.jpeg", "person3_bacteria_4.jpeg",
                        "person4_virus_5.jpeg", "person5_bacteria_6.jpeg",
                        "person6_virus_7.jpeg", "person7_bacteria_8.jpeg"],
    "test/NORMAL": ["IM-0100-0001.jpeg", "IM-0101-0001.jpeg"],
    "test/PNEUMONIA": ["person100_bacteria_1.jpeg", "person101_virus_2.jpeg"],
}


@pytest.fixture()
def tiny_dataset(tmp_path) -> Path:
    """A Kaggle-layout dataset of 18 generated 32x32 JPEGs with Kermany file names."""
    root = tmp_path / "chest_xray"
    seed = 0
    for folder, names in TINY_FILES.items():
        for name in names:
            seed += 1
            write_image(root / folder / name, seed=seed)
    return root


def dicom_bytes(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2") -> bytes:
    """A DICOM file with a patient name and id in its header; pixels 12-bit, or none at all."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "SECRET-4711", "CR"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_claiming(width: int, height: int, rows: int = 4) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb when large).

    Only ``rows`` rows of (highly compressible) zero data follow: loaders must refuse such a
    file from its header, before decoding.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width + 1) * rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
