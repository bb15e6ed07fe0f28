"""Clinician review: queues, label choices, agreement between reviewers, CSV export, viewing.

Storage (append-only relabels, derived labels, snapshots) is in :mod:`cxr_core.storage.reviews`;
this module turns stored rows into what the review page shows and writes one relabel per click
through :meth:`Database.write` (short transactions, lock errors retried).
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.csv_safe import rows_to_csv
from cxr_core.datasets import BINARY_CLASSES, THREE_CLASSES, ImageRecord, scheme_label
from cxr_core.errors import ConfigError, ModelError
from cxr_core.images import load_image
from cxr_core.storage import Database, lock_for_write
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import reviews as store
from cxr_core.storage.reviews import (ChangedImage, Label, LabelSnapshot, RelabelRecord, ReviewItemRecord,
                                      RunOption, RunPredictions, active_relabels, current_labels,
                                      label_snapshot, latest_predictions, send_to_review)

__all__ = [
    "IMPORT_COLUMNS", "QUEUES", "Agreement", "Conflict", "LabelChoice", "LabelSnapshot",
    "ModelOutput", "PairAgreement", "QueueEntry", "QueueView", "RelabelImportError",
    "RelabelRecord", "ReviewItemRecord", "ReviewState", "RunOption", "RunPredictions", "agreement",
    "build_queue", "choose_label", "cohen_kappa", "current_labels", "describe_entry", "entry_image",
    "eval_class", "export_relabels_csv", "find_dataset", "format_label", "import_relabels",
    "label_choices", "label_snapshot", "labels_by_reviewer", "latest_predictions", "load_explainer",
    "load_state", "model_file", "model_output", "next_in_queue", "queue_view", "relabel_by_path",
    "relabel_history", "relabel_json", "relabels_to_csv", "render_view", "reviewed_by",
    "saliency_map", "saliency_unavailable", "send_to_review", "submit_relabel", "submit_undo",
    "view_pixels",
]

QUEUES = {
    "disagreement": "Model disagrees with the dataset label",
    "uncertain": "Most uncertain (nearest the operating point)",
    "sent": "Sent from Predict / Compare",
    "random": "Random",
    "class": "By class",
    "changed": "Image changed since it was relabelled",
}
SUBTYPES = ("bacteria", "virus")
VIEW_SIZE = 1024  # decode full-resolution films at about this many pixels a side for viewing


def format_label(label: str, subtype: str | None) -> str:
    """``PNEUMONIA·virus`` for a label with a subtype, else the folder class."""
    return f"{label}·{subtype}" if subtype else label


@dataclass(frozen=True)
class LabelChoice:
    """One label button: a folder class with an optional subtype."""

    label: str
    subtype: str | None

    @property
    def text(self) -> str:
        return format_label(self.label, self.subtype)


def label_choices(classes: Sequence[str], records: Iterable[ImageRecord]) -> list[LabelChoice]:
    """The buttons for a dataset: each folder class, split by subtype where the data has them.

    ``NORMAL | PNEUMONIA`` with Kermany file names gives NORMAL, PNEUMONIA·bacteria,
    PNEUMONIA·virus; classes without subtypes (NORMAL, COVID19, PneumoniaMNIST) stay whole.
    """
    with_sub: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.subtype in SUBTYPES:
            with_sub[r.label].add(r.subtype)
    out: list[LabelChoice] = []
    for c in sorted(set(classes) | set(with_sub)):
        if with_sub.get(c):
            out.extend(LabelChoice(c, s) for s in SUBTYPES)
        else:
            out.append(LabelChoice(c, None))
    return out


# -- Model outputs --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelOutput:
    """What the page shows of one model prediction."""

    score: float  # P(pneumonia): column 1 of a binary model, else 1 - P(NORMAL)
    predicted: str
    margin: float  # distance to the decision: |score - threshold| (binary) or top-2 gap


def model_output(probs: Sequence[float], labels: Sequence[str],
                 threshold: float | None) -> ModelOutput:
    """Score, predicted class and decision margin of one probability vector.

    Args:
        probs: class probabilities in ``labels`` order (a binary model may give P(positive) only).
        labels: the evaluation's class names.
        threshold: the run's binary operating point (None: 0.5); multi-class uses the argmax.

    Raises:
        ConfigError: when probs and labels differ in length.
    """
    p = np.asarray(probs, dtype=float)
    if p.shape == (1,) and len(labels) == 2:
        p = np.array([1.0 - p[0], p[0]])  # a sigmoid model's single P(positive)
    if p.ndim != 1 or len(p) != len(labels) or len(p) < 2:
        raise ConfigError(f"expected one probability per class {tuple(labels)}. "
                          f"Received: probs={list(probs)}")
    if len(p) == 2:
        t = 0.5 if threshold is None else float(threshold)
        score = float(p[1])
        return ModelOutput(score, labels[1] if score >= t else labels[0], abs(score - t))
    top = np.sort(p)[::-1]
    score = 1.0 - float(p[list(labels).index("NORMAL")]) if "NORMAL" in labels else float(top[0])
    return ModelOutput(score, labels[int(np.argmax(p))], float(top[0] - top[1]))


def eval_class(label: str, subtype: str | None, labels: Sequence[str]) -> str | None:
    """A folder label in a model's class space (binary, three-class or folder classes)."""
    if tuple(labels) == BINARY_CLASSES:
        return scheme_label(label, subtype, "binary")
    if tuple(labels) == THREE_CLASSES:
        return scheme_label(label, subtype, "three_class")
    return label


# -- State and queues -----------------------------------------------------------------------

@dataclass(frozen=True)
class ReviewState:
    """Everything the review page needs about one dataset, read in one transaction."""

    dataset_id: int
    images: dict[int, ImageRecord]
    originals: dict[int, Label]
    current: dict[int, Label]
    relabels: tuple[RelabelRecord, ...]
    predictions: RunPredictions | None
    items: tuple[ReviewItemRecord, ...]  # open items of this dataset, newest first
    runs: tuple[RunOption, ...]
    artifact_dirs: dict[str, str | None]  # "run:ID" -> model folder, for every run shown
    upload_items: tuple[ReviewItemRecord, ...] = ()  # open items of uploads, newest first
    upload_current: dict[str, Label] = field(default_factory=dict)  # sha256 -> current label
    # image id -> its newest relabel made on other bytes ("image changed since it was relabelled")
    changed_since_relabel: dict[int, ChangedImage] = field(default_factory=dict)

    @property
    def threshold(self) -> float | None:
        """The chosen run's operating point (None: no run, or none stored)."""
        return self.predictions.threshold if self.predictions else None

    @property
    def open_uploads(self) -> int:
        """Uploads waiting in the "sent" queue (distinct content hashes)."""
        return len({i.upload_sha256 for i in self.upload_items})


def load_state(db: Database, dataset_id: int, run_id: int | None = None) -> ReviewState:
    """Read images, relabels, the chosen run's predictions and open review items.

    ``relabels`` holds the dataset's rows and every upload's (uploads are in no dataset but are
    reviewed on any dataset's "sent" queue); ``current`` covers the dataset's images only.

    Args:
        db: the database.
        dataset_id: the dataset under review.
        run_id: whose predictions feed the queues; None (or a run without predictions on this
            dataset) picks the newest run with predictions.
    """
    with db.session() as s:
        images = {r.id: r for r in ds_store.list_images(session=s, dataset_id=dataset_id)}
        relabels = store.list_relabels(session=s, dataset_id=dataset_id, include_uploads=True)
        runs = store.runs_with_predictions(session=s, dataset_id=dataset_id)
        if runs and run_id not in {r.run_id for r in runs}:
            run_id = runs[0].run_id  # None or a run of another dataset: the newest run
        preds = None if run_id is None else store.latest_predictions(
            session=s, run_id=run_id, dataset_id=dataset_id)
        items = store.list_review_items(session=s, dataset_id=dataset_id)
        uploads = store.list_upload_items(session=s)
        upload_current = store.upload_labels(session=s)
        changed = {c.image_id: c for c in store.changed_since_relabel(session=s,
                                                                      dataset_id=dataset_id)}
        dirs = {f"run:{r.run_id}": r.artifact_dir for r in runs}
        for ref in {i.run_ref for i in items + uploads
                    if i.run_ref and i.run_ref.startswith("run:")}:
            if ref not in dirs and ref[4:].isdigit():
                dirs[ref] = store.run_artifact_dir(session=s, run_id=int(ref[4:]))
    originals = {i: (r.label, r.subtype) for i, r in images.items()}
    return ReviewState(dataset_id, images, originals, store.derive_labels(originals, relabels),
                       tuple(relabels), preds, tuple(items), tuple(runs), dirs, tuple(uploads),
                       upload_current, changed)


@dataclass(frozen=True)
class QueueEntry:
    """One image (or upload) to review and the model output shown with it."""

    image_id: int | None  # None for an upload
    run_ref: str | None = None
    score: float | None = None
    predicted: str | None = None
    upload_sha256: str | None = None  # set for an upload sent to review
    probs: tuple[float, ...] | None = None  # class probabilities sent with an upload

    @property
    def key(self) -> int | str:
        """What is reviewed: the image id, or the upload's sha256 (as ``RelabelRecord.key``)."""
        return self.image_id if self.image_id is not None else self.upload_sha256


def _model_entries(state: ReviewState) -> list[tuple[QueueEntry, ModelOutput, str | None]]:
    p = state.predictions
    if p is None:
        return []
    out = []
    for image_id, probs in p.probs.items():
        if image_id not in state.images or state.images[image_id].error:
            continue
        m = model_output(probs, p.labels, p.threshold)
        truth = eval_class(*state.originals[image_id], p.labels)
        out.append((QueueEntry(image_id, p.model_ref, m.score, m.predicted), m, truth))
    return out


def _entry(state: ReviewState, image_id: int) -> QueueEntry:
    p = state.predictions
    if p is None or image_id not in p.probs:
        return QueueEntry(image_id)
    m = model_output(p.probs[image_id], p.labels, p.threshold)
    return QueueEntry(image_id, p.model_ref, m.score, m.predicted)


def build_queue(state: ReviewState, kind: str, *, class_name: str | None = None,
                seed: int = 0) -> list[QueueEntry]:
    """The images of a queue, in review order.

    Queues are defined on the dataset's original labels, so they stay stable while reviewers
    work (each reviewer's progress is counted separately: several reviewers may label the same
    images, which is what the agreement table needs).

    Args:
        state: from :func:`load_state`.
        kind: one of :data:`QUEUES`.
        class_name: the folder class of the "class" queue.
        seed: order of the "random" queue.

    Raises:
        ConfigError: unknown queue kind.
    """
    if kind not in QUEUES:
        raise ConfigError(f"queue must be one of {tuple(QUEUES)}. Received: queue={kind!r}")
    readable = [i for i, r in state.images.items() if not r.error]
    if kind == "disagreement":
        rows = [(e, m) for e, m, truth in _model_entries(state)
                if truth is not None and m.predicted != truth]
        return [e for e, m in sorted(rows, key=lambda x: (-x[1].margin, x[0].image_id))]
    if kind == "uncertain":
        rows = [(e, m) for e, m, _ in _model_entries(state)]
        return [e for e, m in sorted(rows, key=lambda x: (x[1].margin, x[0].image_id))]
    if kind == "sent":
        return _sent_queue(state)
    if kind == "changed":  # empties itself: a relabel made on the new bytes clears the flag
        return [_entry(state, i) for i in sorted(state.changed_since_relabel)
                if i in state.images]
    if kind == "random":
        ids = sorted(readable)
        random.Random(seed).shuffle(ids)
        return [_entry(state, i) for i in ids]
    return [_entry(state, i) for i in sorted(readable) if state.originals[i][0] == class_name]


def _sent_queue(state: ReviewState) -> list[QueueEntry]:
    """Open items of the dataset's images and of uploads, newest send first (one per target)."""
    out: dict[int | str, QueueEntry] = {}
    items = sorted(state.items + state.upload_items, key=lambda i: -i.id)
    for item in items:  # newest first: the newest send of an image wins
        key = item.image_id if item.image_id is not None else item.upload_sha256
        if key in out or (item.image_id is not None and item.image_id not in state.images):
            continue
        if item.image_id is not None and not (item.run_ref or item.probs):
            out[key] = _entry(state, item.image_id)  # sent without a model output: the run's
            continue
        binary = item.probs is not None and len(item.probs) in (1, 2)
        score = float(item.probs[-1]) if binary else None  # binary: P(PNEUMONIA) is last
        out[key] = QueueEntry(item.image_id, item.run_ref, score, item.predicted,
                              item.upload_sha256, item.probs)
    return list(out.values())


def reviewed_by(relabels: Iterable[RelabelRecord], reviewer: str) -> set[int | str]:
    """Images (ids) and uploads (sha256) with an active relabel or confirmation by ``reviewer``."""
    return {r.key for r in active_relabels(relabels) if r.reviewer == reviewer}


@dataclass(frozen=True)
class QueueView:
    """Where a reviewer stands in a queue."""

    current: QueueEntry | None  # next image to show; None when the queue is done
    n_reviewed: int
    n_left: int
    n_total: int

    @property
    def done_fraction(self) -> float:
        return self.n_reviewed / self.n_total if self.n_total else 1.0


def queue_view(queue: Sequence[QueueEntry], reviewed: set[int | str],
               skipped: Sequence[int | str] = ()) -> QueueView:
    """The next unreviewed image (skipped ones come back after the rest) and the counts.

    ``reviewed`` and ``skipped`` hold entry keys: image ids, and sha256s of uploads.
    """
    left = [e for e in queue if e.key not in reviewed]
    order = {i: n for n, i in enumerate(skipped)}
    left_sorted = sorted(left, key=lambda e: order.get(e.key, -1))  # stable: unskipped first
    return QueueView(left_sorted[0] if left_sorted else None, len(queue) - len(left), len(left),
                     len(queue))


def next_in_queue(state: ReviewState, kind: str, reviewer: str, *, class_name: str | None = None,
                  seed: int = 0, skipped: Sequence[int | str] = ()) -> QueueView:
    """:func:`build_queue` then :func:`queue_view` for one reviewer (what the page shows)."""
    queue = build_queue(state, kind, class_name=class_name, seed=seed)
    # An image changed since its relabel waits until someone relabels the new bytes, even if
    # this reviewer labelled the old ones.
    reviewed = set() if kind == "changed" else reviewed_by(state.relabels, reviewer)
    return queue_view(queue, reviewed, skipped)


# -- Writing --------------------------------------------------------------------------------

def submit_relabel(db: Database, *, image_id: int | None = None, choice: LabelChoice,
                   reviewer: str, note: str = "", run_ref: str | None = None,
                   score: float | None = None, upload_sha256: str | None = None) -> int:
    """One click: append a relabel row in its own short transaction (lock errors retried).

    Args:
        db: the database.
        image_id: the indexed image, or None with ``upload_sha256`` for an upload.
        choice: the label clicked.
        reviewer, note, run_ref, score: stored with the row.
        upload_sha256: an upload sent to review (instead of ``image_id``).

    Returns:
        The new relabel id (keep it for undo).

    Raises:
        ConfigError: not exactly one of image_id / upload_sha256, or as the storage functions.
    """
    if (image_id is None) == (upload_sha256 is None):
        raise ConfigError("a relabel needs exactly one of image_id or upload_sha256. "
                          f"Received: image_id={image_id}, upload_sha256={upload_sha256!r}")
    kw = dict(new_label=choice.label, new_subtype=choice.subtype, reviewer=reviewer, note=note,
              run_ref=run_ref, score=score)
    if upload_sha256 is not None:
        return db.write(lambda s: store.add_upload_relabel(session=s, upload_sha256=upload_sha256,
                                                           **kw))
    return db.write(lambda s: store.add_relabel(session=s, image_id=image_id, **kw))


def submit_undo(db: Database, *, relabel_id: int, reviewer: str, note: str = "") -> int:
    """Append an undo row for ``relabel_id`` (its own short transaction)."""
    return db.write(lambda s: store.undo_relabel(session=s, relabel_id=relabel_id,
                                                 reviewer=reviewer, note=note))


# -- Relabelling by path (the CLI; same writers as the page) ---------------------------------

IMPORT_COLUMNS = ("path", "label", "subtype", "reviewer", "note")
_SUBTYPE_SEPARATORS = ("·", "/")  # "PNEUMONIA·virus" (the button's text) or "PNEUMONIA/virus"


class RelabelImportError(ConfigError):
    """A relabel CSV with bad rows; nothing was written.

    Attributes:
        problems: (line number, reason) of every bad row, in file order.
    """

    def __init__(self, source: str, problems: Sequence[tuple[int, str]]):
        self.problems = list(problems)
        listed = "; ".join(f"line {n}: {why}" for n, why in self.problems)
        super().__init__(f"{source}: {len(self.problems)} bad row(s), nothing was written. "
                         f"{listed}")


def find_dataset(*, session: Any, dataset: str | int) -> ds_store.DatasetInfo:
    """A dataset by name (a str) or id (an int).

    Raises:
        ConfigError: no such dataset (the message lists the known names).
    """
    info = ds_store.get_dataset(session=session, name_or_id=dataset)
    if info is None:
        known = ", ".join(d.name for d in ds_store.list_datasets(session=session)) or "none"
        raise ConfigError(f"dataset must name an indexed dataset (known: {known}). "
                          f"Received: dataset={dataset!r}")
    return info


def _choice_problem(choices: Sequence[LabelChoice], label: str | None,
                    subtype: str | None) -> tuple[LabelChoice | None, str | None]:
    """(the choice, None) when ``label``/``subtype`` name a button of the dataset, else
    (None, why)."""
    text = (label or "").strip()
    sub = (subtype or "").strip() or None
    for sep in _SUBTYPE_SEPARATORS:
        if sep in text:
            text, _, inline = (p.strip() for p in text.partition(sep))
            if sub is not None and sub != inline:
                return None, (f"label {label!r} names subtype {inline!r} but subtype is "
                              f"{sub!r}")
            sub = inline or None
            break
    if not text:
        return None, "empty label"
    choice = LabelChoice(text, sub)
    if choice in choices:
        return choice, None
    return None, (f"label {format_label(text, sub)!r} is not one of this dataset's labels "
                  f"({' / '.join(c.text for c in choices)})")


def choose_label(choices: Sequence[LabelChoice], label: str,
                 subtype: str | None = None) -> LabelChoice:
    """The :class:`LabelChoice` (a review button) named by a label and an optional subtype.

    ``label`` may also be the button's text, ``PNEUMONIA·virus`` (or ``PNEUMONIA/virus``).

    Raises:
        ConfigError: not one of ``choices`` (e.g. ``PNEUMONIA`` without a subtype on a dataset
            whose pneumonia images have subtypes: the page offers no such button either).
    """
    choice, why = _choice_problem(choices, label, subtype)
    if choice is None:
        raise ConfigError(f"{why}. Received: label={label!r}, subtype={subtype!r}")
    return choice


def _relpath(info: ds_store.DatasetInfo, path: str | None) -> str:
    """A path as indexed: stripped, and relative to the dataset root when given absolute
    inside it (``/data/chest_xray/train/NORMAL/x.jpeg`` -> ``train/NORMAL/x.jpeg``)."""
    text = (path or "").strip()
    if text and Path(text).is_absolute():
        try:
            return Path(text).relative_to(info.root).as_posix()
        except ValueError:
            return text
    return text


def _path_problem(rec: ImageRecord | None, relpath: str, dataset: str) -> str | None:
    if not relpath:
        return "empty path"
    if rec is None:
        return f"unknown path {relpath!r} (no image of dataset {dataset!r} has it)"
    if rec.missing:
        return (f"image {relpath!r} is missing from disk (flagged at the last index); "
                "relabelling a missing image is refused: restore the file and re-index")
    return None


def relabel_by_path(db: Database, *, dataset: str | int, relpath: str, label: str,
                    subtype: str | None = None, reviewer: str,
                    note: str = "") -> RelabelRecord:
    """Relabel one image named by its path: what one click on the review page writes.

    The label must be one of the page's buttons for the dataset (:func:`label_choices`); the
    row is written by :func:`submit_relabel`, the page's writer.

    Args:
        db: the database.
        dataset: the dataset's name (or id).
        relpath: the image's path under the dataset root, as indexed (an absolute path
            inside the root is made relative).
        label, subtype: the new label (see :func:`choose_label`).
        reviewer, note: stored with the row.

    Returns:
        The new relabel row.

    Raises:
        ConfigError: unknown dataset or path, a missing image, a label that is not one of the
            dataset's, an empty reviewer.
    """
    with db.session() as s:
        info = find_dataset(session=s, dataset=dataset)
        relpath = _relpath(info, relpath)
        rec = ds_store.image_by_path(session=s, dataset_id=info.id, relpath=relpath) \
            if relpath else None
        why = _path_problem(rec, relpath, info.name)
        if why:
            raise ConfigError(f"{why}. Received: path={relpath!r}")
        choices = label_choices(info.classes, ds_store.list_images(session=s, dataset_id=info.id))
    choice = choose_label(choices, label, subtype)
    relabel_id = submit_relabel(db, image_id=rec.id, choice=choice, reviewer=reviewer, note=note)
    with db.session() as s:
        return store.list_relabels(session=s, image_ids=[rec.id],
                                   as_of_relabel_id=relabel_id)[-1]


@dataclass(frozen=True)
class _ImportRow:
    line: int
    image_id: int
    choice: LabelChoice
    reviewer: str
    note: str


def _read_import_csv(source: str | Path | io.TextIOBase,
                     name: str) -> list[tuple[int, dict[str, str], int]]:
    """(first line number, {column: cell}, cells beyond the header) of each non-blank data
    row; the header is checked.

    Raises:
        ConfigError: no header, unknown or repeated columns, unreadable text or CSV.
    """
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8-sig", newline="") as fh:
            return _read_import_csv(fh, name)
    reader = csv.reader(source)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise ConfigError(f"{name}: the first row must be a header naming the columns "
                              f"{','.join(IMPORT_COLUMNS[:2])}[,{','.join(IMPORT_COLUMNS[2:])}]. "
                              f"Received: header={header}")
        unknown = [h for h in header if h not in IMPORT_COLUMNS]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if unknown or repeated:
            raise ConfigError(f"{name}: header columns must be among {IMPORT_COLUMNS}, each once. "
                              f"Received: unknown={unknown}, repeated={repeated}")
        rows: list[tuple[int, dict[str, str], int]] = []
        while True:
            line = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                return rows
            if not any(c.strip() for c in cells):
                continue  # a blank line
            rows.append((line, dict(zip(header, cells)), max(0, len(cells) - len(header))))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: expected UTF-8 text. Received: {exc}") from None
    except csv.Error as exc:
        raise ConfigError(f"{name}: not readable as CSV at line {reader.line_num}: {exc}") from None


def import_relabels(db: Database, *, dataset: str | int,
                    source: str | Path | io.TextIOBase, reviewer: str | None = None,
                    source_name: str | None = None) -> list[RelabelRecord]:
    """Relabel many images from a CSV, all rows or none.

    The CSV has a header row and the columns ``path,label`` and optionally ``subtype``,
    ``reviewer``, ``note`` (any order). Every row is checked first, as :func:`relabel_by_path`
    checks one (known path, image not missing, a label of the dataset, a reviewer), and a path
    may appear only once; then every row is written in ONE transaction with the storage
    writer the page's :func:`submit_relabel` uses. Any bad row: nothing is written and the
    error names every bad row by line number (the header is line 1) and reason.

    Args:
        db: the database.
        dataset: the dataset's name (or id).
        source: a CSV file path or an open text stream.
        reviewer: the reviewer of rows whose ``reviewer`` cell is empty or absent.
        source_name: how the error messages name the source (default: the path, or "CSV").

    Returns:
        The written rows, in file order.

    Raises:
        RelabelImportError: one or more bad rows (``problems`` lists them); nothing written.
        ConfigError: unknown dataset, a bad header, or text that is not UTF-8 CSV.
    """
    name = source_name or (str(source) if isinstance(source, (str, Path)) else "CSV")
    rows = _read_import_csv(source, name)
    default_reviewer = (reviewer or "").strip()

    def write(s: Any) -> list[RelabelRecord]:
        lock_for_write(s)  # the checks below stay true until the last INSERT commits
        info = find_dataset(session=s, dataset=dataset)
        images = {r.relpath: r for r in ds_store.list_images(session=s, dataset_id=info.id,
                                                             include_missing=True)}
        choices = label_choices(info.classes, [r for r in images.values() if not r.missing])
        problems: list[tuple[int, str]] = []
        todo: list[_ImportRow] = []
        first_line: dict[str, int] = {}
        for line, row, extra in rows:
            why: list[str] = []
            if extra:
                why.append(f"{extra} cell(s) more than the header's {len(row)}")
            path = _relpath(info, row.get("path"))
            rec = images.get(path)
            if path in first_line:
                why.append(f"duplicate path {path!r} (first on line {first_line[path]})")
            elif problem := _path_problem(rec, path, info.name):
                why.append(problem)
            if path and path not in first_line:
                first_line[path] = line
            choice, problem = _choice_problem(choices, row.get("label"), row.get("subtype"))
            if problem:
                why.append(problem)
            who = (row.get("reviewer") or "").strip() or default_reviewer
            if not who:
                why.append("missing reviewer (empty reviewer cell and no --reviewer)")
            if why:
                problems.append((line, ", ".join(why)))
            else:
                todo.append(_ImportRow(line, rec.id, choice, who, row.get("note") or ""))
        if problems:
            raise RelabelImportError(name, problems)
        ids = [store.add_relabel(session=s, image_id=r.image_id, new_label=r.choice.label,
                                 new_subtype=r.choice.subtype, reviewer=r.reviewer, note=r.note)
               for r in todo]
        if not ids:
            return []
        wanted = set(ids)  # read back in the same transaction: exactly the rows written
        by_id = {r.id: r for r in store.list_relabels(session=s, dataset_id=info.id)
                 if r.id in wanted}
        return [by_id[i] for i in ids]

    return db.write(write)


def relabel_history(db: Database, *, dataset: str | int) -> tuple[ds_store.DatasetInfo,
                                                                  list[RelabelRecord]]:
    """The dataset and its full append-only relabel history (undo rows and rows of images now
    missing included), oldest first. Uploads (in no dataset) are left out."""
    with db.session() as s:
        info = find_dataset(session=s, dataset=dataset)
        return info, store.list_relabels(session=s, dataset_id=info.id)


def relabel_json(record: RelabelRecord, dataset: str | None = None) -> dict:
    """One relabel row as the CLI prints it (``path``: the image's path under the root)."""
    return {"id": record.id, "dataset": dataset, "path": record.relpath,
            "image_id": record.image_id, "old_label": record.old_label,
            "old_subtype": record.old_subtype, "new_label": record.new_label,
            "new_subtype": record.new_subtype, "reviewer": record.reviewer,
            "note": record.note, "run_ref": record.run_ref, "score": record.score,
            "undo_of": record.undo_of, "created_at": record.created_at.isoformat()
            if record.created_at else None}


# -- Showing an entry ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EntryInfo:
    """What the page states about the entry under review."""

    title: str  # the image's path, or "Upload <sha256 prefix>"
    facts: tuple[tuple[str, str], ...]  # (name, label) pairs: original/model, current
    reviewers: tuple[tuple[str, str], ...]  # (reviewer, label) of everyone who labelled it
    warning: str | None = None  # "image changed since it was relabelled", when it did


def describe_entry(state: ReviewState, entry: QueueEntry) -> EntryInfo:
    """Title, labels and reviewers' labels of a queue entry (an image or an upload)."""
    reviewers = tuple(labels_by_reviewer(state.relabels, entry.key))
    if entry.upload_sha256 is not None:
        probs = " / ".join(f"{p:.3f}" for p in entry.probs or ())
        model = f"{entry.predicted or '—'}" + (f" ({probs})" if probs else "")
        current = state.upload_current.get(entry.upload_sha256, (entry.predicted or "", None))
        return EntryInfo(f"Upload {entry.upload_sha256[:12]}…",
                         (("Model", model), ("Current", format_label(*current) or "—")), reviewers)
    rec = state.images[entry.image_id]
    changed = state.changed_since_relabel.get(entry.image_id)
    warning = None if changed is None else (
        f"Image changed since it was relabelled: relabel {changed.relabel_id} was made on "
        f"content {str(changed.relabelled_sha256)[:12]}…, the file now holds "
        f"{str(changed.current_sha256)[:12]}…. The relabel is kept; confirm or correct it.")
    return EntryInfo(rec.relpath, (("Original", format_label(rec.label, rec.subtype)),
                                   ("Current", format_label(*state.current[entry.image_id]))),
                     reviewers, warning)


def entry_image(state: ReviewState, entry: QueueEntry,
                root: str | Path) -> tuple[str | None, str | None]:
    """The file to show for an entry and its content hash (keys cached saliency).

    Args:
        state: from :func:`load_state`.
        entry: a dataset image (under ``root``, the dataset's folder) or an upload (stored by
            :func:`cxr_core.uploads.store_upload` under the settings' uploads folder).
        root: the dataset's root folder.

    Returns:
        (path, sha256); the path is None when an upload's stored file is missing.
    """
    if entry.upload_sha256 is None:
        rec = state.images[entry.image_id]
        return str(Path(root) / rec.relpath), rec.sha256
    from cxr_core.uploads import upload_path  # lazy: only uploads need the predict module

    path = upload_path(entry.upload_sha256)
    return (None if path is None else str(path)), entry.upload_sha256


# -- Agreement ------------------------------------------------------------------------------

def _latest_by_reviewer(
        relabels: Iterable[RelabelRecord]) -> dict[str, dict[int | str, RelabelRecord]]:
    """reviewer -> key (image id or upload sha256) -> that reviewer's newest active relabel."""
    latest: dict[str, dict[int | str, RelabelRecord]] = defaultdict(dict)
    for r in active_relabels(relabels):  # id order: newer rows overwrite older ones
        latest[r.reviewer][r.key] = r
    return latest


def labels_by_reviewer(relabels: Iterable[RelabelRecord],
                       image_id: int | str) -> list[tuple[str, str]]:
    """(reviewer, label) of every reviewer who labelled the image (id) or upload (sha256)."""
    return [(who, format_label(rows[image_id].new_label, rows[image_id].new_subtype))
            for who, rows in sorted(_latest_by_reviewer(relabels).items()) if image_id in rows]


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of two reviewers over the images both labelled."""

    reviewer_a: str
    reviewer_b: str
    n_images: int
    agreement: float  # observed fraction of equal labels
    kappa: float | None  # Cohen's kappa; None when undefined (one label used by both)


@dataclass(frozen=True)
class Conflict:
    """An image (or upload) whose reviewers' newest labels differ."""

    image_id: int | str  # an upload's sha256
    relpath: str
    labels: tuple[tuple[str, str], ...]  # (reviewer, label) pairs


@dataclass(frozen=True)
class Agreement:
    pairs: tuple[PairAgreement, ...]
    conflicts: tuple[Conflict, ...]


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two label sequences (sklearn); None when chance agreement is 1."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) != len(b):
        raise ConfigError(f"expected two equally long label lists. Received: {len(a)} and {len(b)}")
    if not a or len(set(a) | set(b)) < 2:
        return None
    k = float(cohen_kappa_score(list(a), list(b)))
    return None if math.isnan(k) else k


def agreement(relabels: Iterable[RelabelRecord]) -> Agreement:
    """Per-reviewer-pair Cohen's kappa and the list of conflicting images.

    Each reviewer's label of an image is their newest active relabel of it.
    """
    rows = _latest_by_reviewer(relabels)
    latest = {who: {i: format_label(r.new_label, r.new_subtype) for i, r in by_image.items()}
              for who, by_image in rows.items()}
    paths = {i: r.relpath for by_image in rows.values() for i, r in by_image.items()}
    pairs = []
    for a, b in itertools.combinations(sorted(latest), 2):
        common = sorted(set(latest[a]) & set(latest[b]), key=str)
        if not common:
            continue
        la, lb = [latest[a][i] for i in common], [latest[b][i] for i in common]
        agree = sum(x == y for x, y in zip(la, lb)) / len(common)
        pairs.append(PairAgreement(a, b, len(common), agree, cohen_kappa(la, lb)))
    by_image: dict[int | str, list[tuple[str, str]]] = defaultdict(list)
    for reviewer in sorted(latest):
        for image_id, label in latest[reviewer].items():
            by_image[image_id].append((reviewer, label))
    conflicts = [Conflict(i, paths[i], tuple(v))  # images (by id) first, then uploads
                 for i, v in sorted(by_image.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
                 if len({label for _, label in v}) > 1]
    return Agreement(tuple(pairs), tuple(conflicts))


# -- Export ---------------------------------------------------------------------------------

_CSV_COLUMNS = [f.name for f in fields(RelabelRecord)]


def relabels_to_csv(records: Iterable[RelabelRecord]) -> str:
    """Every relabel row (undo rows included) as CSV text, one row per relabel.

    Cells go through :func:`cxr_core.csv_safe.cell`: a reviewer name or note a spreadsheet
    would run as a formula (``=...``, ``+...``, ``@...``) gets a leading ``'``; numbers
    (``score``, ids) are written as they are.
    """
    return rows_to_csv(_CSV_COLUMNS, ([getattr(r, c) for c in _CSV_COLUMNS] for r in records))


def export_relabels_csv(db: Database, dataset_id: int | None = None) -> str:
    """CSV of all relabels (of one dataset, or of every dataset) and of every upload.

    Upload rows have an empty ``image_id`` and their sha256 as ``relpath`` (and
    ``upload_sha256``).
    """
    with db.session() as s:
        return relabels_to_csv(store.list_relabels(session=s, dataset_id=dataset_id,
                                                   include_uploads=True))


# -- Viewing --------------------------------------------------------------------------------

def render_view(image: np.ndarray, *, level: float = 128.0, window: float = 256.0,
                zoom: float = 1.0, center: tuple[float, float] = (0.5, 0.5),
                heat: np.ndarray | None = None, alpha: float = 0.4) -> np.ndarray:
    """Window/level, optional saliency overlay, then zoom: the picture the reviewer sees.

    Args:
        image: (H, W) or (H, W, 3) uint8 image.
        level: grey value at the middle of the window (contrast centre).
        window: width of the grey range stretched to black..white (smaller = more contrast).
        zoom: magnification >= 1 (a crop of 1/zoom of each side).
        center: (x, y) of the crop centre as fractions of width and height.
        heat: optional (h, w) saliency map in [0, 1] blended over the windowed image.
        alpha: heatmap weight.

    Returns:
        uint8 (h, w) or (h, w, 3) array.

    Raises:
        ConfigError: on a window <= 0 or a zoom < 1.
    """
    if window <= 0 or zoom < 1:
        raise ConfigError("expected window > 0 and zoom >= 1. "
                          f"Received: window={window}, zoom={zoom}")
    lo = level - window / 2.0
    out = np.clip((np.asarray(image, dtype=np.float32) - lo) * (255.0 / window), 0, 255)
    out = np.rint(out).astype(np.uint8)
    if heat is not None:
        from cxr_core.saliency_render import overlay

        out = overlay(out, heat, alpha=alpha)
    h, w = out.shape[:2]
    ch, cw = max(1, round(h / zoom)), max(1, round(w / zoom))
    y0 = int(np.clip(round(center[1] * h - ch / 2), 0, h - ch))
    x0 = int(np.clip(round(center[0] * w - cw / 2), 0, w - cw))
    return out[y0:y0 + ch, x0:x0 + cw]


def model_file(ref: str | None, artifact_dir: str | None) -> Path | None:
    """The .keras file behind a model reference, if one exists on disk (model_store's layout)."""
    from cxr_core.model_store import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, RUN_MODEL_NAME

    if ref == "default":
        path = DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME
    elif ref and ref.startswith("run:"):
        path = Path(artifact_dir) / RUN_MODEL_NAME if artifact_dir else None
    else:
        path = Path(ref) if ref else None
    return path if path is not None and path.is_file() else None


def saliency_unavailable(ref: str | None,
                         artifact_dirs: dict[str, str | None] | None = None) -> str | None:
    """Why saliency cannot be shown for ``ref`` (None when it can).

    Args:
        ref: the model reference shown with the image ("run:ID", "default", a path) or None.
        artifact_dirs: "run:ID" -> the run's artifact folder (where it keeps its model file).
    """
    if ref is None:
        return "no model output is shown for this image, so there is no model to explain"
    if model_file(ref, (artifact_dirs or {}).get(ref)) is None:
        return f"{ref} has no model file (.keras) on disk"
    return None


def load_explainer(ref: str) -> Any:
    """A saliency explainer for a model reference (loads keras: call it only when needed).

    Raises:
        ModelError: the model cannot be loaded.
    """
    from cxr_core.explain import make_explainer
    from cxr_core.model_store import load_model_ref

    return make_explainer(load_model_ref(ref))


def view_pixels(path: str | Path) -> np.ndarray:
    """The image to review as uint8 (H, W) or (H, W, 3), decoded at about 1024 px a side.

    Raises:
        ImageLoadError: the file cannot be read.
    """
    return np.asarray(load_image(path, draft=VIEW_SIZE))


def saliency_map(explainer: Any, image: np.ndarray | str | Path, *, threshold: float | None,
                 method: str = "gradcam") -> np.ndarray:
    """An (H, W) map in [0, 1] for one image, at the model's input size.

    Args:
        explainer: a :class:`cxr_core.saliency.SaliencyExplainer` (cached by the caller).
        image: (H, W) or (H, W, 3) uint8 image, or its path.
        threshold: the run's binary operating point (None: 0.5).
        method: one of :data:`cxr_core.saliency.METHODS`.
    """
    from PIL import Image

    from cxr_core.images import to_array

    if not isinstance(image, np.ndarray):
        image = view_pixels(image)
    _, size, _, channels = explainer.model.input_shape
    arr = to_array(Image.fromarray(np.asarray(image)), int(size), int(channels))
    return explainer.explain(arr.astype(np.float32), method,
                             threshold=0.5 if threshold is None else threshold)[0]
