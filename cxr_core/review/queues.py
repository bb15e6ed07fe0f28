"""Clinician review: label choices, the model output shown, review state, queues, relabel clicks.

Storage: append-only relabels, derived labels and snapshots in :mod:`cxr_core.storage.relabels`,
review items and model outputs in :mod:`cxr_core.storage.reviews`, the queues themselves as
SQL in :mod:`cxr_core.storage.review_queue` (a click reads the next image and the counts with
a few indexed queries; no page reads a dataset's images, relabels or predictions whole);
this module serves those queues to the review page and writes one relabel per click through
:meth:`Database.write` (short transactions, lock errors retried).

Next to it: :mod:`cxr_core.review.view` (what the page shows of one entry: facts and the
windowed picture), :mod:`cxr_core.review.agreement` (reviewers' agreement, Cohen's kappa),
:mod:`cxr_core.review.export` (relabels as CSV), :mod:`cxr_core.review.relabel_import` (relabelling
named by path: the ``relabel`` CLI) and :mod:`cxr_core.predict.explain` (saliency).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.core.labels import (UNSTATED_SUBTYPE_TEXT, format_label, scheme_label,
                                  scheme_of_classes)
from cxr_core.storage import AndThen, Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import label_audits as audit_store
from cxr_core.storage import reading as reading_store
from cxr_core.storage import relabels as rel_store
from cxr_core.storage import review_queue as queue_store
from cxr_core.storage import reviews as store
from cxr_core.storage.label_audits import LabelAuditRecord
from cxr_core.storage.reading import ReadingSetting
from cxr_core.storage.relabels import ChangedImage, Label
from cxr_core.storage.review_queue import QueueRow, RunScores
from cxr_core.storage.reviews import ReviewItemRecord, RunOption

QUEUES = {
    "disagreement": "Model disagrees with the dataset label",
    "uncertain": "Most uncertain (nearest the operating point)",
    "new_site": "New site: most informative first (one film per patient first)",
    "sent": "Sent from Predict / Compare",
    "random": "Random",
    "class": "By class",
    "changed": "Image changed since it was relabelled",
    "mislabelled": "Likely mislabelled (label audit, out-of-fold)",
    "conflicts": "Conflicting reads: adjudicate",
}
SUBTYPES = ("bacteria", "virus")


@dataclass(frozen=True)
class LabelChoice:
    """One label button: a folder class with an optional subtype."""

    label: str
    subtype: str | None
    # The class has subtypes in the data but this answer states none ("PNEUMONIA (subtype not
    # stated)"): the same label as (label, None); only the button's text differs.
    unstated: bool = field(default=False, compare=False)

    @property
    def text(self) -> str:
        if self.unstated:
            return f"{self.label} ({UNSTATED_SUBTYPE_TEXT})"
        return format_label(self.label, self.subtype)


def label_choices(classes: Sequence[str], pairs: Iterable[Label]) -> list[LabelChoice]:
    """The buttons for a dataset: each folder class, split by subtype where the data has them,
    plus that class without a stated subtype.

    ``pairs`` are the dataset's (label, subtype) pairs (``ReviewState.label_pairs``).
    ``NORMAL | PNEUMONIA`` with Kermany file names gives NORMAL, PNEUMONIA·bacteria,
    PNEUMONIA·virus and "PNEUMONIA (subtype not stated)" (a film seldom tells bacterial from
    viral: a reader need not guess); classes without subtypes (NORMAL, COVID19,
    PneumoniaMNIST) stay whole.
    """
    with_sub: dict[str, set[str]] = defaultdict(set)
    for label, subtype in pairs:
        if subtype in SUBTYPES:
            with_sub[label].add(subtype)
    out: list[LabelChoice] = []
    for c in sorted(set(classes) | set(with_sub)):
        if with_sub.get(c):
            out.extend(LabelChoice(c, s) for s in SUBTYPES)
            out.append(LabelChoice(c, None, unstated=True))
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
    """A folder label in a model's class space (binary, three-class, subtype or folder
    classes)."""
    scheme = scheme_of_classes(labels)
    return label if scheme == "folders" else scheme_label(label, subtype, scheme)


# -- State and queues -----------------------------------------------------------------------

@dataclass(frozen=True)
class ReviewState:
    """What the review page needs about one dataset besides the queue itself (which is SQL,
    :mod:`cxr_core.storage.review_queue`): no image, relabel or prediction table is read."""

    dataset_id: int
    label_pairs: tuple[Label, ...]  # distinct (original label, subtype): the label buttons
    scores: RunScores | None  # the chosen run's predictions feeding the model queues
    items: tuple[ReviewItemRecord, ...]  # open items of this dataset, newest first
    runs: tuple[RunOption, ...]
    artifact_dirs: dict[str, str | None]  # "run:ID" -> model folder, for every run shown
    upload_items: tuple[ReviewItemRecord, ...] = ()  # open items of uploads, newest first
    # image id -> its newest relabel made on other bytes ("image changed since it was relabelled")
    changed_since_relabel: dict[int, ChangedImage] = field(default_factory=dict)
    readable_items: frozenset[int] = frozenset()  # sent images that are readable and on disk
    reading: ReadingSetting | None = None  # blind or open, reads per image (None: the default)
    audits: tuple[LabelAuditRecord, ...] = ()  # the dataset's finished label audits, newest first
    audit: LabelAuditRecord | None = None  # the one feeding the "mislabelled" queue
    n_conflicts: int = 0  # images waiting for an adjudication

    @property
    def blind(self) -> bool:
        return bool(self.reading and self.reading.blind)

    @property
    def reads_per_image(self) -> int:
        return self.reading.reads_per_image if self.reading else 1

    @property
    def audit_id(self) -> int | None:
        return self.audit.id if self.audit else None

    @property
    def threshold(self) -> float | None:
        """The chosen run's operating point (None: no run, or none stored)."""
        return self.scores.threshold if self.scores else None

    @property
    def model_ref(self) -> str | None:
        return self.scores.model_ref if self.scores else None

    @property
    def open_uploads(self) -> int:
        """Uploads waiting in the "sent" queue (distinct content hashes)."""
        return len({i.upload_sha256 for i in self.upload_items})


def load_state(db: Database, dataset_id: int, model: int | str | None = None,
               audit: int | None = None) -> ReviewState:
    """Read the model options, the chosen model's score source and the short lists (open
    review items, images changed since their relabel); a few small queries at any dataset size.

    Args:
        db: the database.
        dataset_id: the dataset under review.
        model: whose predictions feed the model queues: a run id, or a model reference
            ("run:ID", "default", "ensemble:…"); None (or a model without predictions on this
            dataset) picks the most recently evaluated model.
        audit: the finished label audit feeding the "mislabelled" queue (None, or one of
            another dataset: the newest).
    """
    ref = f"run:{model}" if isinstance(model, int) else model
    with db.session() as s:
        runs = store.models_with_predictions(session=s, dataset_id=dataset_id)
        if runs and ref not in {r.model_ref for r in runs}:
            ref = runs[0].model_ref  # None or a model of another dataset: the newest one
        option = next((r for r in runs if r.model_ref == ref), None)
        threshold = None if option is None else (
            store.operating_threshold(session=s, run_id=option.run_id)
            if option.run_id is not None else
            store.evaluation_threshold(session=s, model_ref=ref, dataset_id=dataset_id))
        scores = None if option is None else queue_store.run_scores(
            session=s, model_ref=ref, dataset_id=dataset_id, threshold=threshold)
        items = store.list_review_items(session=s, dataset_id=dataset_id)
        uploads = store.list_upload_items(session=s)
        changed = {c.image_id: c for c in rel_store.changed_since_relabel(session=s,
                                                                      dataset_id=dataset_id)}
        readable = {r.id for r in ds_store.get_images(
            session=s, image_ids=sorted({i.image_id for i in items if i.image_id is not None}
                                        | set(changed)))
            if not r.error and not r.missing}
        dirs = {r.model_ref: r.artifact_dir for r in runs if r.run_id is not None}
        for item_ref in {i.run_ref for i in items + uploads
                         if i.run_ref and i.run_ref.startswith("run:")}:
            if item_ref not in dirs and item_ref[4:].isdigit():
                dirs[item_ref] = store.run_artifact_dir(session=s, run_id=int(item_ref[4:]))
        pairs = queue_store.label_pairs(session=s, dataset_id=dataset_id)
        setting = reading_store.get_setting(session=s, dataset_id=dataset_id)
        audits = audit_store.list_audits(session=s, dataset_id=dataset_id, status="finished")
        chosen = next((a for a in audits if a.id == audit), audits[0] if audits else None)
        conflicts = queue_store.count_conflicts(session=s, dataset_id=dataset_id)
    return ReviewState(dataset_id, tuple(sorted(pairs, key=str)), scores, tuple(items),
                       tuple(runs), dirs, tuple(uploads), changed, frozenset(readable),
                       setting, tuple(audits), chosen, conflicts)


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


def _entry(db: Database, state: ReviewState, image_id: int) -> QueueEntry:
    """An image with the chosen run's newest output on it (none when it has none)."""
    if state.scores is None:
        return QueueEntry(image_id)
    with db.session() as s:
        row = queue_store.image_score(session=s, dataset_id=state.dataset_id,
                                      image_id=image_id, scores=state.scores)
    if row.score is None:
        return QueueEntry(image_id)
    return QueueEntry(image_id, state.model_ref, row.score, row.predicted)


def _from_row(state: ReviewState, kind: str, row: QueueRow) -> QueueEntry | None:
    if kind in queue_store.MODEL_QUEUES:
        return QueueEntry(row.image_id, state.model_ref, row.score, row.predicted)
    return None  # the run's output is looked up for the one entry shown


def _short_queue(db: Database, state: ReviewState, kind: str) -> list[QueueEntry]:
    """The "sent" and "changed" queues: short lists, in review order."""
    if kind == "changed":  # empties itself: a relabel made on the new bytes clears the flag
        return [QueueEntry(i) for i in sorted(state.changed_since_relabel)
                if i in state.readable_items]
    out: dict[int | str, QueueEntry] = {}
    items = sorted(state.items + state.upload_items, key=lambda i: -i.id)
    for item in items:  # newest first: the newest send of an image wins
        key = item.image_id if item.image_id is not None else item.upload_sha256
        if key in out or (item.image_id is not None and item.image_id not in state.readable_items):
            continue
        if item.image_id is not None and not (item.run_ref or item.probs):
            out[key] = QueueEntry(item.image_id)  # sent without a model output: the run's
            continue
        binary = item.probs is not None and len(item.probs) in (1, 2)
        score = float(item.probs[-1]) if binary else None  # binary: P(PNEUMONIA) is last
        out[key] = QueueEntry(item.image_id, item.run_ref, score, item.predicted,
                              item.upload_sha256, item.probs)
    return list(out.values())


def _check_kind(kind: str) -> None:
    if kind not in QUEUES:
        raise ConfigError(f"queue must be one of {tuple(QUEUES)}. Received: queue={kind!r}")


def build_queue(db: Database, state: ReviewState, kind: str, *, class_name: str | None = None,
                seed: int = 0, offset: int = 0, limit: int = 50) -> list[QueueEntry]:
    """A page of a queue in review order (reviewed images included).

    Queues are defined on the dataset's original labels, so they stay stable while reviewers
    work (each reviewer's progress is counted separately: several reviewers may label the same
    images, which is what the agreement table needs).

    Args:
        db: the database.
        state: from :func:`load_state`.
        kind: one of :data:`QUEUES`.
        class_name: the folder class of the "class" queue.
        seed: order of the "random" queue.
        offset, limit: the page.

    Raises:
        ConfigError: unknown queue kind.
    """
    _check_kind(kind)
    if kind in ("sent", "changed"):
        entries = _short_queue(db, state, kind)[offset:offset + limit]
    else:
        with db.session() as s:
            rows = queue_store.queue_page(session=s, dataset_id=state.dataset_id, kind=kind,
                                          class_name=class_name, seed=seed,
                                          scores=state.scores, offset=offset, limit=limit,
                                          audit_id=state.audit_id)
        entries = [_from_row(state, kind, r) or QueueEntry(r.image_id) for r in rows]
    return [_entry(db, state, e.image_id) if e.image_id is not None and e.score is None
            and kind in ("random", "class", "changed", "mislabelled", "conflicts") else e
            for e in entries]


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
    """The next unreviewed entry of a short queue (skipped ones come back after the rest)
    and the counts. ``reviewed`` and ``skipped`` hold entry keys: image ids, and sha256s."""
    left = [e for e in queue if e.key not in reviewed]
    order = {i: n for n, i in enumerate(skipped)}
    left_sorted = sorted(left, key=lambda e: order.get(e.key, -1))  # stable: unskipped first
    return QueueView(left_sorted[0] if left_sorted else None, len(queue) - len(left), len(left),
                     len(queue))


def next_in_queue(db: Database, state: ReviewState, kind: str, reviewer: str, *,
                  class_name: str | None = None, seed: int = 0,
                  skipped: Sequence[int | str] = ()) -> QueueView:
    """The entry ``reviewer`` sees next and the queue's counts (what the page shows): SQL
    for the dataset queues, the short lists for "sent" and "changed"."""
    _check_kind(kind)
    if kind in ("sent", "changed"):
        queue = _short_queue(db, state, kind)
        # An image changed since its relabel waits until someone relabels the new bytes, even
        # if this reviewer labelled the old ones.
        reviewed: set[int | str] = set()
        if kind == "sent":
            with db.session() as s:
                reviewed = queue_store.reviewed_among(
                    session=s, reviewer=reviewer,
                    image_ids=[e.image_id for e in queue if e.image_id is not None],
                    upload_sha256s=[e.upload_sha256 for e in queue if e.upload_sha256])
        view = queue_view(queue, reviewed, skipped)
        if view.current is not None and view.current.image_id is not None \
                and view.current.score is None and kind == "changed":
            view = QueueView(_entry(db, state, view.current.image_id), view.n_reviewed,
                             view.n_left, view.n_total)
        return view
    args = dict(dataset_id=state.dataset_id, kind=kind, reviewer=reviewer,
                class_name=class_name, scores=state.scores, audit_id=state.audit_id,
                reads_per_image=state.reads_per_image)
    with db.session() as s:
        total, done = queue_store.queue_counts(session=s, **args)
        row = queue_store.queue_next(session=s, seed=seed, skipped=skipped, **args)
    current = None if row is None else (_from_row(state, kind, row)
                                        or _entry(db, state, row.image_id))
    return QueueView(current, done, total - done, total)


def newest_relabel_id(db: Database, dataset_id: int) -> int | None:
    """The newest relabel row of the dataset's images or of any upload: labels and agreement
    as of it are fixed (rows are append-only), so it keys their caches."""
    with db.session() as s:
        return rel_store.newest_relabel_id(session=s, dataset_id=dataset_id)


# -- Writing --------------------------------------------------------------------------------

def submit_relabel(db: Database, *, image_id: int | None = None, choice: LabelChoice,
                   reviewer: str, note: str = "", run_ref: str | None = None,
                   score: float | None = None, upload_sha256: str | None = None,
                   and_then: AndThen | None = None) -> int:
    """One click: append a relabel row in its own short transaction (lock errors retried).

    Args:
        db: the database.
        image_id: the indexed image, or None with ``upload_sha256`` for an upload.
        choice: the label clicked.
        reviewer, note, run_ref, score: stored with the row.
        upload_sha256: an upload sent to review (instead of ``image_id``).
        and_then: ``and_then(session, relabel_id)`` in the same transaction (the audit row
            of :func:`cxr_core.review.actions.relabel`).

    Returns:
        The new relabel id (keep it for undo).

    Raises:
        ConfigError: not exactly one of image_id / upload_sha256, or as the storage functions.
    """
    if (image_id is None) == (upload_sha256 is None):
        raise ConfigError("a relabel needs exactly one of image_id or upload_sha256. "
                          f"Received: image_id={image_id}, upload_sha256={upload_sha256!r}")
    if image_id is not None and run_ref is not None and _blind(db, image_id):
        run_ref, score = None, None  # blind reading shows no model output: none is recorded
    kw = dict(new_label=choice.label, new_subtype=choice.subtype, reviewer=reviewer, note=note,
              run_ref=run_ref, score=score)
    if upload_sha256 is not None:
        return db.write(lambda s: rel_store.add_upload_relabel(
            session=s, upload_sha256=upload_sha256, **kw), and_then=and_then)
    return db.write(lambda s: rel_store.add_relabel(session=s, image_id=image_id, **kw),
                    and_then=and_then)


def _blind(db: Database, image_id: int) -> bool:
    with db.session() as s:
        (rec,) = ds_store.get_images(session=s, image_ids=[image_id]) or (None,)
        return rec is not None and reading_store.get_setting(
            session=s, dataset_id=rec.dataset_id).blind


def submit_undo(db: Database, *, relabel_id: int, reviewer: str, note: str = "",
                and_then: AndThen | None = None) -> int:
    """Append an undo row for ``relabel_id`` (its own short transaction, ``and_then`` in it)."""
    return db.write(lambda s: rel_store.undo_relabel(session=s, relabel_id=relabel_id,
                                                 reviewer=reviewer, note=note),
                    and_then=and_then)
