"""Blind and double reading: a dataset's reading mode, what a reader may see before and after
answering, the reads an adjudicator settles, and the adjudication itself.

- **Blind** (a dataset setting): before answering, a reader sees the film only: no model score,
  no other reader's label, no folder label. After answering, :func:`reveal` says what they
  answered and everything that was hidden (and, in the "likely mislabelled" queue, why the label
  audit flagged the image: shown after the answer in every mode, so it cannot anchor it).
- **Reads per image** (1 by default, 2 for double reading): with 2 or more, each answer is a
  *read*; agreeing reads make the label that counts, conflicting reads keep the label that
  counted before until an adjudicator (the ``adjudicator`` role, or an admin) decides
  (:mod:`cxr_core.storage.relabels`). "Confirmed" anywhere in the app means a label that counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from cxr_core.core.errors import ConfigError
from cxr_core.core.labels import format_label
from cxr_core.review.agreement import labels_by_reviewer
from cxr_core.review.queues import LabelChoice, QueueEntry, ReviewState
from cxr_core.storage import AndThen, Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import label_audits as audit_store
from cxr_core.storage import reading as store
from cxr_core.storage import relabels as rel_store
from cxr_core.storage.reading import ReadingSetting
from cxr_core.storage.relabels import ReadingRound


def reading_setting(db: Database, dataset_id: int) -> ReadingSetting:
    """The dataset's reading mode in force."""
    with db.session() as s:
        return store.get_setting(session=s, dataset_id=dataset_id)


def setting_history(db: Database, dataset_id: int) -> list[ReadingSetting]:
    with db.session() as s:
        return store.history(session=s, dataset_id=dataset_id)


def save_setting(db: Database, *, dataset_id: int, blind: bool, reads_per_image: int,
                 changed_by: str, note: str = "", and_then: AndThen | None = None) -> int:
    """Append the dataset's reading mode (``and_then`` in its transaction: the audit row)."""
    return db.write(lambda s: store.set_setting(session=s, dataset_id=dataset_id, blind=blind,
                                                reads_per_image=reads_per_image,
                                                changed_by=changed_by, note=note),
                    and_then=and_then)


def reading_round(db: Database, image_id: int) -> ReadingRound:
    """The image's reads since its last adjudication (what an adjudicator sees)."""
    with db.session() as s:
        return rel_store.reading_round(session=s, image_id=image_id)


def submit_adjudication(db: Database, *, image_id: int, choice: LabelChoice, adjudicator: str,
                        note: str = "", and_then: AndThen | None = None) -> int:
    """Append the adjudication of an image whose reads conflict (its own short transaction,
    ``and_then`` in it: the audit row); returns its id (keep it for undo).

    Raises:
        ConfigError: no conflicting reads, unknown image, empty label or adjudicator.
    """
    return db.write(lambda s: rel_store.adjudicate(
        session=s, image_id=image_id, new_label=choice.label, new_subtype=choice.subtype,
        adjudicator=adjudicator, note=note), and_then=and_then)


@dataclass(frozen=True)
class Reveal:
    """What a reader sees once they have answered (everything blind reading hid)."""

    title: str
    answer: str  # what this reader answered
    folder_label: str  # the dataset's original label
    counts_now: str  # the label that counts after the answer
    pending: str | None  # double reading: why the answer does not count yet
    model: str | None  # "P(pneumonia) 0.912 · run:3 (predicts PNEUMONIA)"
    readers: tuple[tuple[str, str], ...]  # (reader, label) of every reader's newest answer
    why_flagged: str | None  # the label audit's reason, in the "likely mislabelled" queue


def _why_flagged(db: Database, state: ReviewState, image_id: int) -> str | None:
    if state.audit is None:
        return None
    with db.session() as s:
        row = audit_store.audit_images_by_id(session=s, audit_id=state.audit.id,
                                             image_ids=[image_id]).get(image_id)
    if row is None or row.issue_rank is None or row.probs is None:
        return None
    labels = state.audit.labels
    given, suggested = labels[row.given], labels[row.suggested]
    t = (state.audit.result or {}).get("thresholds", {})
    return (f"Label audit #{state.audit.id} (out-of-fold, fold {row.fold + 1} of "
            f"{state.audit.folds}): given {given}, but a model that never trained on this "
            f"film gave P({given}) = {row.probs[row.given]:.3f} and P({suggested}) = "
            f"{row.probs[row.suggested]:.3f}, at or above {suggested}'s threshold "
            f"{t.get(suggested, float('nan')):.3f} (mean self-confidence of films given "
            f"{suggested}). Confident learning suggests {suggested}; rank {row.issue_rank} of "
            f"{(state.audit.result or {}).get('n_issues', '?')} flagged.")


def reveal(db: Database, state: ReviewState, entry: QueueEntry, relabel_id: int) -> Reveal:
    """What to show a reader about the entry they just answered (relabel ``relabel_id``).

    Raises:
        ConfigError: the relabel is not of this entry.
    """
    with db.session() as s:
        if entry.image_id is None:
            rows = rel_store.list_upload_relabels(session=s, upload_sha256s=[entry.upload_sha256])
        else:
            rows = rel_store.list_relabels(session=s, image_ids=[entry.image_id])
            (rec,) = ds_store.get_images(session=s, image_ids=[entry.image_id])
        mine = next((r for r in rows if r.id == relabel_id), None)
        rnd = rel_store.reading_round(session=s, image_id=entry.image_id) \
            if entry.image_id is not None else None
    if mine is None:
        raise ConfigError(f"relabel {relabel_id} is not of this entry. Received: "
                          f"relabel_id={relabel_id}")
    readers = tuple(labels_by_reviewer(rows, entry.key))
    model = None if entry.score is None else (
        f"P(pneumonia) {entry.score:.3f} · {entry.run_ref} (predicts {entry.predicted})")
    if entry.image_id is None:
        current = rel_store.counting(rows)
        now = format_label(current[-1].new_label, current[-1].new_subtype) if current else \
            (entry.predicted or "—")
        return Reveal(f"Upload {entry.upload_sha256[:12]}…", format_label(
            mine.new_label, mine.new_subtype), "—", now, None, model, readers, None)
    pending = None
    if mine.kind == "read":
        if rnd.conflict:
            pending = ("Readers disagree: the label that counted before stays until an "
                       "adjudicator decides.")
        elif rnd.agreed is None:
            pending = (f"{len(rnd.reads)} of {rnd.reads_required} reads: it counts once "
                       f"{rnd.reads_required} readers agree.")
    return Reveal(rec.relpath, format_label(mine.new_label, mine.new_subtype),
                  format_label(rec.label, rec.subtype), format_label(*rnd.current), pending,
                  model, readers, _why_flagged(db, state, entry.image_id))
