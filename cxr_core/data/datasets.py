"""Datasets: discover layouts, parse labels/subtypes/patients, scan headers, find duplicates.

Layouts understood:
- ``splits``: ``train|val|test/<CLASS>/*`` (Kaggle's ``chest_xray``, also nested one or two
  levels as ``chest_xray/chest_xray/...``; any split may be missing; any class names, e.g.
  ``COVID19|NORMAL|PNEUMONIA``).
- ``classes``: ``<CLASS>/*`` without split folders.
- ``npz``: PneumoniaMNIST (``train_images``/``train_labels``, ``val_*``, optional ``test_*``).
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_core.core import settings
from cxr_core.core.errors import DatasetError, ImageLoadError
from cxr_core.core.labels import SPLIT_NAMES
from cxr_core.core.records import ImageRecord, ScannedImage
from cxr_core.data.images import IMAGE_SUFFIXES, read_header

NPZ_CLASSES = ("NORMAL", "PNEUMONIA")  # PneumoniaMNIST: 0 = normal, 1 = pneumonia
_IGNORED_DIRS = {"__MACOSX", ".git", ".ipynb_checkpoints"}
_SUBTYPE_RE = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)
_PERSON_RE = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL2_RE = re.compile(r"^NORMAL2-IM-(\d+)-", re.IGNORECASE)
_IM_RE = re.compile(r"^IM-(\d+)-", re.IGNORECASE)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FileEntry:
    """One image found on disk (before its header is read)."""

    relpath: str
    split: str
    label: str
    size: int | None = None  # from the directory walk, for incremental scans
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Layout:
    """What :func:`discover` found under a path."""

    kind: str  # splits | classes | npz
    root: Path
    classes: tuple[str, ...]
    entries: tuple[FileEntry, ...]
    problems: tuple[str, ...] = ()  # empty class folders and the like: reported, not fatal
    scope: str = ""  # "test/" when one split folder was given: other splits' rows are kept


def parse_name(filename: str) -> tuple[str | None, str | None]:
    """Parse (subtype, patient) from a Kermany file name.

    ``person1003_virus_1685.jpeg`` → ("virus", "person1003");
    ``IM-0115-0001.jpeg`` → (None, "0115"); ``NORMAL2-IM-1427-0001.jpeg`` → (None, "NORMAL2-1427").
    Other names give (None, None): each such image is its own patient group.
    """
    stem = Path(filename).name
    m = _SUBTYPE_RE.search(stem)
    subtype = m.group(1).lower() if m else None
    for regex, fmt in ((_PERSON_RE, "{}"), (_NORMAL2_RE, "NORMAL2-{}"), (_IM_RE, "{}")):
        p = regex.match(stem)
        if p:
            return subtype, fmt.format(p.group(1).lower() if regex is _PERSON_RE else p.group(1))
    return subtype, None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("._")


def _visible_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir() and entry.name not in _IGNORED_DIRS and not entry.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted(Path(e.path) for e in it if _visible_dir(e))


def _find_root(path: Path, depth: int = 2) -> Path:
    """Descend through wrapper folders such as ``chest_xray/chest_xray``."""
    dirs = _subdirs(path)
    names = {d.name.lower() for d in dirs}
    if names & set(SPLIT_NAMES) or depth == 0:
        return path
    for d in dirs:
        if {s.name.lower() for s in _subdirs(d)} & set(SPLIT_NAMES):
            return _find_root(d, depth - 1)
    if len(dirs) == 1 and not any(_is_image(f.name) for f in dirs[0].iterdir()):
        return _find_root(dirs[0], depth - 1)
    return path


def _class_files(class_dir: Path, prefix: str, split: str) -> list[FileEntry]:
    """Image files under a class folder (recursively), with their stat from the walk."""
    out: list[FileEntry] = []
    stack = [(str(class_dir), prefix)]
    seen: set[str] = set()  # real paths walked: a symlink back up the tree is not a loop
    while stack:
        folder, rel = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if _visible_dir(e):
                stack.append((e.path, f"{rel}{e.name}/"))
            elif _is_image(e.name) and e.is_file():
                st = e.stat()
                out.append(FileEntry(f"{rel}{e.name}", split, class_dir.name,
                                     st.st_size, st.st_mtime_ns))
    return out


def discover(path: str | Path) -> Layout:
    """Find the layout, classes and image files under ``path`` (no file is opened).

    Args:
        path: a dataset folder (any supported layout) or a PneumoniaMNIST ``.npz`` file.

    Returns:
        The layout with one entry per image file.

    Raises:
        DatasetError: the path does not exist or holds no images in a known layout.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _discover_npz(path)
        raise DatasetError(f"expected a folder or a PneumoniaMNIST .npz file. Received: {path}")
    root = _find_root(path)
    scope = ""
    if root.name.lower() in SPLIT_NAMES:  # pointed at one split folder, e.g. .../train
        root, split_dirs, scope = root.parent, [root], f"{root.name}/"
    else:
        split_dirs = [d for d in _subdirs(root) if d.name.lower() in SPLIT_NAMES]
    entries: list[FileEntry] = []
    problems: list[str] = []
    classes: set[str] = set()
    groups = ([(d.name.lower(), d) for d in split_dirs] if split_dirs else [("", root)])
    for split, folder in groups:
        for class_dir in _subdirs(folder):
            prefix = f"{folder.name}/{class_dir.name}/" if split else f"{class_dir.name}/"
            files = _class_files(class_dir, prefix, split)
            classes.add(class_dir.name)
            if not files:
                problems.append(f"empty class folder: {prefix.rstrip('/')}")
            entries.extend(files)
    if not entries:
        raise DatasetError(
            f"no images found under {path}: expected <split>/<CLASS>/*.jpeg (train/val/test), "
            f"<CLASS>/*.jpeg, or a PneumoniaMNIST .npz file")
    kind = "splits" if split_dirs else "classes"
    return Layout(kind, root, tuple(sorted(classes)), tuple(entries), tuple(problems), scope)


def _discover_npz(path: Path) -> Layout:
    if not zipfile.is_zipfile(path):  # empty, truncated, or not made by np.savez
        raise DatasetError(f"cannot read .npz file {path}: not a NumPy .npz archive (expected "
                           f"PneumoniaMNIST arrays train_images/train_labels saved by np.savez)")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            labels = {s: _npz_labels(path, s, data[f"{s}_images"].shape, data[f"{s}_labels"])
                      for s in SPLIT_NAMES if f"{s}_images" in keys and f"{s}_labels" in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"cannot read .npz file {path}: {exc}") from exc
    if not labels:
        raise DatasetError(f"{path.name}: expected keys like train_images/train_labels "
                           f"(PneumoniaMNIST). Received keys: {sorted(keys)}")
    entries = [FileEntry(f"npz:{split}:{i}", split, NPZ_CLASSES[lab])
               for split, labs in labels.items() for i, lab in enumerate(labs)]
    return Layout("npz", path, NPZ_CLASSES, tuple(entries))


def _npz_labels(path: Path, split: str, image_shape: tuple, raw: np.ndarray) -> list[int]:
    """A split's labels, checked against its images: (N, H, W[, C]) and N labels in {0, 1}."""
    if len(image_shape) not in (3, 4):
        raise DatasetError(f"{path.name}: {split}_images must be (N, H, W) or (N, H, W, C). "
                           f"Received: shape {image_shape}")
    labels = np.asarray(raw).reshape(-1)
    if labels.shape[0] != image_shape[0]:
        raise DatasetError(f"{path.name}: {split}_labels has {labels.shape[0]} labels for "
                           f"{image_shape[0]} images in {split}_images")
    if labels.size and (not np.issubdtype(labels.dtype, np.number)
                        or not np.isin(labels, range(len(NPZ_CLASSES))).all()):
        bad = [v for v in labels.tolist() if v not in range(len(NPZ_CLASSES))][:5]
        raise DatasetError(f"{path.name}: {split}_labels must be 0 (normal) or 1 (pneumonia). "
                           f"Received: {bad}")
    return [int(v) for v in labels]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


OUTSIDE_ROOTS = "not read: a symlink that resolves outside the dataset folder and the data roots"


def read_bases(root: Path) -> tuple[Path, ...] | None:
    """Where a dataset's files may really lie when the data roots are restricted: the
    dataset folder and every data root (real paths); None in unrestricted local mode."""
    from cxr_core.core.data_roots import allowed_roots

    roots = allowed_roots()
    return None if roots is None else (Path(os.path.realpath(root)), *roots)


def refused_link(root: Path, entry: FileEntry, bases: Sequence[Path] | None) -> ScannedImage | None:
    """The unreadable row of a file whose real path lies under none of ``bases`` (a symlink
    out of the dataset and the data roots), which is therefore never opened; else None."""
    if bases is None:
        return None
    real = Path(os.path.realpath(root / entry.relpath))
    if any(real == b or b in real.parents for b in bases):
        return None
    subtype, patient = parse_name(Path(entry.relpath).name)
    return ScannedImage(entry.relpath, entry.split, entry.label, subtype, patient, None, None,
                        None, None, entry.size, entry.mtime_ns, error=OUTSIDE_ROOTS)


def scan_file(root: Path, entry: FileEntry, patient_salt: str | None = None) -> ScannedImage:
    """Read one file's header and content hash; an unreadable file is reported in ``error``.

    A DICOM file's PatientID (salted hash, see :func:`cxr_core.data.images.patient_key`) wins over
    the patient parsed from the file name; its StudyDate fills ``acquired_date``. The salt
    defaults to :func:`cxr_core.core.settings.patient_salt`.
    """
    path = root / entry.relpath
    subtype, patient = parse_name(path.name)
    base = dict(relpath=entry.relpath, split=entry.split, label=entry.label, subtype=subtype,
                patient=patient, bytes=entry.size, mtime_ns=entry.mtime_ns)
    try:
        sha = _sha256(path)
    except OSError as exc:
        return ScannedImage(**base, sha256=None, width=None, height=None, mode=None,
                            error=f"cannot read file ({exc.strerror or exc})")
    try:
        hdr = read_header(path, patient_salt=patient_salt or settings.patient_salt())
    except ImageLoadError as exc:
        return ScannedImage(**base, sha256=sha, width=None, height=None, mode=None, error=str(exc))
    base["patient"] = hdr.patient or patient
    return ScannedImage(**base, sha256=sha, width=hdr.width, height=hdr.height, mode=hdr.mode,
                        acquired_date=hdr.acquired_date)


def scan_npz(layout: Layout) -> list[ScannedImage]:
    """Index rows for a PneumoniaMNIST file: one per array image, hash of its pixels."""
    out = []
    st = layout.root.stat()
    with np.load(layout.root) as data:
        arrays = {s: np.asarray(data[f"{s}_images"]) for s in SPLIT_NAMES if f"{s}_images" in data}
    for e in layout.entries:
        _, split, idx = e.relpath.split(":")
        img = arrays[split][int(idx)]
        mode = "L" if img.ndim == 2 or img.shape[-1] == 1 else "RGB"
        out.append(ScannedImage(e.relpath, split, e.label, None, None,
                                hashlib.sha256(img.tobytes()).hexdigest(), int(img.shape[1]),
                                int(img.shape[0]), mode, int(img.nbytes), st.st_mtime_ns))
    return out


def scan_changed(layout: Layout, known: dict[str, tuple[int | None, int | None]],
                 progress: Progress | None = None, workers: int = 4,
                 on_batch: Callable[[list[ScannedImage]], None] | None = None,
                 batch_size: int = 500) -> tuple[list[ScannedImage], list[str], list[str]]:
    """Incremental scan: read only files that are new or whose size/mtime changed.

    Args:
        layout: from :func:`discover`.
        known: relpath → (bytes, mtime_ns) already in the index.
        progress: called with (done, total) as files are checked.
        workers: threads for hashing (file reads release the GIL).
        on_batch: called with every ``batch_size`` rows read (not the last, partial batch),
            so the caller can store them as it goes and a killed scan resumes where it was.
        batch_size: rows per ``on_batch`` call.

    Returns:
        (new or changed rows, relpaths unchanged, relpaths gone from disk).
    """
    if layout.kind == "npz":
        st = layout.root.stat()
        same = all(known.get(e.relpath, (None, None))[1] == st.st_mtime_ns for e in layout.entries)
        if same and len(known) == len(layout.entries):
            return [], [e.relpath for e in layout.entries], []
        rows = scan_npz(layout)
        return rows, [], sorted(set(known) - {r.relpath for r in rows})
    todo, unchanged = [], []
    for entry in layout.entries:
        if known.get(entry.relpath) == (entry.size, entry.mtime_ns):
            unchanged.append(entry.relpath)
        else:
            todo.append(entry)
    in_scope = {p for p in known if p.startswith(layout.scope)}
    gone = sorted(in_scope - {e.relpath for e in layout.entries})
    total, done = len(layout.entries), len(unchanged)
    if progress:
        progress(done, total)
    rows: list[ScannedImage] = []
    salt = settings.patient_salt() if todo else None
    bases = read_bases(layout.root)  # restricted roots: symlinks out are not read
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row in pool.map(lambda e: refused_link(layout.root, e, bases)
                            or scan_file(layout.root, e, salt), todo):
            rows.append(row)
            done += 1
            if on_batch is not None and len(rows) % batch_size == 0:
                on_batch(rows[-batch_size:])
            if progress and (done % 64 == 0 or done == total):
                progress(done, total)
    return rows, unchanged, gone


@dataclass(frozen=True)
class DuplicateGroup:
    """Byte-identical files (same sha256)."""

    sha256: str
    image_ids: tuple[int, ...]
    relpaths: tuple[str, ...]
    splits: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def cross_split(self) -> bool:
        return len(set(self.splits)) > 1

    @property
    def conflicting_labels(self) -> bool:
        return len(set(self.labels)) > 1


def find_duplicates(records: Iterable[ImageRecord]) -> list[DuplicateGroup]:
    """Group byte-identical images by content hash (groups of two or more)."""
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        if r.sha256:
            by_hash[r.sha256].append(r)
    groups = []
    for sha, rs in sorted(by_hash.items()):
        if len(rs) > 1:
            rs = sorted(rs, key=lambda r: r.relpath)
            groups.append(DuplicateGroup(sha, tuple(r.id for r in rs), tuple(r.relpath for r in rs),
                                         tuple(r.split for r in rs), tuple(r.label for r in rs)))
    return groups


def cross_split_patients(records: Iterable[ImageRecord]) -> dict[str, tuple[str, ...]]:
    """Patients found in more than one split folder (leakage in the dataset as shipped)."""
    splits: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.patient:
            splits[r.patient].add(r.split)
    return {p: tuple(sorted(s)) for p, s in sorted(splits.items()) if len(s) > 1}


def summarize(records: Sequence[ImageRecord]) -> dict[str, object]:
    """Counts for the CLI and the class-balance page (unreadable images excluded)."""
    ok = [r for r in records if not r.error]
    by_subtype = Counter(f"{r.label}/{r.subtype}" if r.subtype else r.label for r in ok)
    return {
        "images": len(ok),
        "by_split": dict(sorted(Counter(r.split or "(none)" for r in ok).items())),
        "by_class": dict(sorted(Counter(r.label for r in ok).items())),
        "by_subtype": dict(sorted(by_subtype.items())),
        "patients": len({r.patient for r in ok if r.patient}),
        "unreadable": len(records) - len(ok),
    }
