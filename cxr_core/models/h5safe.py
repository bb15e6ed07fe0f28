"""Checks a weights file's HDF5 structure before anything reads it (issue 26 item 7).

HDF5 lets a dataset keep its bytes in another file (``external=[(path, offset, size)]``) or
map other files' datasets (virtual datasets), and lets a name point elsewhere (soft links,
external links to other files). h5py follows all of them when a dataset is read, so a
"weights" file could hand back any file the worker can read, and a dataset declaring a huge
shape could make the reader allocate until the process dies. Weights never need any of this:
:func:`check_h5` refuses such a file, and caps the declared size of each dataset and of all of
them together, before Keras or our legacy reader opens it. A ``.keras`` archive's weights
(``model.weights.h5`` inside the zip) are checked the same way (:func:`check_keras_archive`).

Pure h5py (no TensorFlow): :mod:`cxr_core.models.weights` and :mod:`cxr_core.models.layers` call
it on every file they load.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cxr_core.core.errors import ModelError

# VGG16 with its top, the largest keras.applications file, is 553 MB (one 411 MB kernel).
MAX_DATASET_BYTES = 1 * 2**30
MAX_TOTAL_BYTES = 2 * 2**30
MAX_OBJECTS = 200_000  # links visited: a file with millions of tiny groups is refused too


def _size(ds: h5py.Dataset) -> int:
    """The bytes a dataset declares (its shape x item size), read from its header only."""
    shape = ds.shape or ()
    return int(np.prod(shape, dtype=object)) * int(ds.dtype.itemsize)


def check_h5(source: str | os.PathLike[str] | io.BytesIO, *, name: str | None = None,
             max_dataset_bytes: int = MAX_DATASET_BYTES,
             max_total_bytes: int = MAX_TOTAL_BYTES) -> int:
    """Refuse an HDF5 weights file that reads outside itself or declares too much.

    Args:
        source: the file (or its bytes, for the weights inside a ``.keras`` archive).
        name: how to call it in messages (default: the path).
        max_dataset_bytes: the largest one dataset may declare.
        max_total_bytes: the most all datasets together may declare.

    Returns:
        The total bytes its datasets declare.

    Raises:
        ModelError: not an HDF5 file; a soft or external link; a dataset with external
            storage, a virtual dataset, an object (variable-length) dtype; a declared size
            over a cap; more than :data:`MAX_OBJECTS` links.
    """
    label = name or str(source)
    try:
        f = h5py.File(source, "r")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{label}: not a readable HDF5 weights file ({exc})") from exc
    total, seen = 0, 0
    problems: list[str] = []

    def visit(path: str, link: Any) -> bool | None:  # a true value stops the walk
        nonlocal total, seen
        seen += 1
        if seen > MAX_OBJECTS:
            problems.append(f"more than {MAX_OBJECTS:,} HDF5 objects")
        elif isinstance(link, h5py.SoftLink):
            problems.append(f"'{path}' is a soft link (to {link.path!r})")
        elif isinstance(link, h5py.ExternalLink):
            problems.append(f"'{path}' is an external link (to {link.filename!r})")
        elif isinstance(link, h5py.HardLink):
            obj = f.get(path)
            if isinstance(obj, h5py.Dataset):
                total += _dataset_size(obj, path, problems, max_dataset_bytes)
        else:  # user-defined link classes
            problems.append(f"'{path}' is a link of another kind ({type(link).__name__})")
        return True if problems else None

    with f:
        try:
            f.visititems_links(visit)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{label}: unreadable HDF5 structure ({exc})") from exc
    if problems:
        raise _refused(label, problems)
    if total > max_total_bytes:
        raise ModelError(f"{label}: its datasets declare {total / 2**20:,.0f} MB in all; at "
                         f"most {max_total_bytes / 2**20:,.0f} MB of weights are read. "
                         "Refused")
    return total


def _dataset_size(ds: h5py.Dataset, path: str, problems: list[str], cap: int) -> int:
    if ds.external:
        problems.append(f"dataset '{path}' keeps its bytes in another file "
                        f"({ds.external[0][0]!r}: HDF5 external storage)")
    elif ds.is_virtual:
        problems.append(f"dataset '{path}' is virtual (maps other files' datasets)")
    elif ds.dtype.hasobject or h5py.check_vlen_dtype(ds.dtype) is not None:
        problems.append(f"dataset '{path}' has variable-length items ({ds.dtype}); weights "
                        "are numbers")
    size = _size(ds)
    if size > cap:
        problems.append(f"dataset '{path}' declares {size / 2**20:,.0f} MB (shape "
                        f"{ds.shape}); at most {cap / 2**20:,.0f} MB")
    return size


def _refused(label: str, problems: list[str]) -> ModelError:
    return ModelError(f"{label}: refused as weights: {problems[0]}. Expected plain datasets "
                      "stored in the file itself (HDF5 external storage, virtual datasets and "
                      "links can read other files)")


def check_keras_archive(path: str | os.PathLike[str]) -> None:
    """Check the HDF5 weights inside a ``.keras`` archive (a zip) like :func:`check_h5`.

    A member's declared uncompressed size is capped before it is read.

    Raises:
        ModelError: the archive is not a zip, a member is too large, or its weights are refused.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".h5"):
                    continue
                if info.file_size > MAX_TOTAL_BYTES:
                    raise ModelError(f"{p}: '{info.filename}' declares "
                                     f"{info.file_size / 2**20:,.0f} MB; at most "
                                     f"{MAX_TOTAL_BYTES / 2**20:,.0f} MB. Refused")
                check_h5(io.BytesIO(zf.read(info)), name=f"{p}:{info.filename}")
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{p}: not a .keras archive (expected a zip file: {exc})") from exc
