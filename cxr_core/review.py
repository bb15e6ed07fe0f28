"""Clinician review: label choices, the model output shown, review state, queues, relabel clicks.

Storage: append-only relabels, derived labels and snapshots in :mod:`cxr_core.storage.relabels`,
review items and model outputs in :mod:`cxr_core.storage.reviews`;
this module turns stored rows into the queues the review page walks and writes one relabel per
click through :meth:`Database.write` (short transactions, lock errors retried).

Next to it: :mod:`cxr_core.review_view` (what the page shows of one entry: facts and the
windowed picture), :mod:`cxr_core.agreement` (reviewers' agreement, Cohen's kappa),
:mod:`cxr_core.review_export` (relabels as CSV), :mod:`cxr_core.relabel_import` (relabelling
named by path: the ``relabel`` CLI) and :mod:`cxr_core.explain` (saliency).
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cxr_core.datasets import BINARY_CLASSES, THREE_CLASSES, ImageRecord, scheme_label
from cxr_core.errors import ConfigError
from cxr_core.storage import Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import relabels as rel_store, reviews as store
from cxr_core.storage.relabels import ChangedImage, Label, RelabelRecord, active_relabels
from cxr_core.storage.reviews import ReviewItemRecord, RunOption, RunPredictions

QUEUES = {
    "disagreement": "Model disagrees with the dataset label",
    "uncertain": "Most uncertain (nearest the operating point)",
    "sent": "Sent from Predict / Compare",
    "random": "Random",
    "class": "By class",
    "changed": "Image changed since it was relabelled",
}
SUBTYPES = ("bacteria", "virus")


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
        relabels = rel_store.list_relabels(session=s, dataset_id=dataset_id, include_uploads=True)
        runs = store.runs_with_predictions(session=s, dataset_id=dataset_id)
        if runs and run_id not in {r.run_id for r in runs}:
            run_id = runs[0].run_id  # None or a run of another dataset: the newest run
        preds = None if run_id is None else store.latest_predictions(
            session=s, run_id=run_id, dataset_id=dataset_id)
        items = store.list_review_items(session=s, dataset_id=dataset_id)
        uploads = store.list_upload_items(session=s)
        upload_current = rel_store.upload_labels(session=s)
        changed = {c.image_id: c for c in rel_store.changed_since_relabel(session=s,
                                                                      dataset_id=dataset_id)}
        dirs = {f"run:{r.run_id}": r.artifact_dir for r in runs}
        for ref in {i.run_ref for i in items + uploads
                    if i.run_ref and i.run_ref.startswith("run:")}:
            if ref not in dirs and ref[4:].isdigit():
                dirs[ref] = store.run_artifact_dir(session=s, run_id=int(ref[4:]))
    originals = {i: (r.label, r.subtype) for i, r in images.items()}
    return ReviewState(dataset_id, images, originals, rel_store.derive_labels(originals, relabels),
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
        return db.write(lambda s: rel_store.add_upload_relabel(session=s, upload_sha256=upload_sha256,
                                                           **kw))
    return db.write(lambda s: rel_store.add_relabel(session=s, image_id=image_id, **kw))


def submit_undo(db: Database, *, relabel_id: int, reviewer: str, note: str = "") -> int:
    """Append an undo row for ``relabel_id`` (its own short transaction)."""
    return db.write(lambda s: rel_store.undo_relabel(session=s, relabel_id=relabel_id,
                                                 reviewer=reviewer, note=note))
