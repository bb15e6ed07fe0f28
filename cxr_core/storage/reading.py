"""How a dataset is read on Review: blind or open, and how many readers each image needs.

A setting is an append-only row (``review_settings``): the newest row of a dataset is in force;
none means open single reading (every relabel counts at once, as before double reading
existed). Under double reading (``reads_per_image`` >= 2) a reader's answer is a ``read`` row of
``relabels`` that counts only through a consensus or an adjudication
(:mod:`cxr_core.storage.relabels`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_core.core.errors import ConfigError
from db.models import ReviewSetting

MAX_READS = 5  # readers per image a dataset may ask for


@dataclass(frozen=True)
class ReadingSetting:
    """A dataset's reading mode."""

    dataset_id: int
    blind: bool = False  # no model score, no other reader's label, no folder label before one answers
    reads_per_image: int = 1  # 1: single reading; 2: double reading (agreement or adjudication)
    changed_by: str | None = None  # None: the default (no row)
    created_at: datetime | None = None
    id: int | None = None

    @property
    def double(self) -> bool:
        return self.reads_per_image >= 2


def check_reads(reads_per_image: object) -> int:
    """``reads_per_image`` as an int in [1, MAX_READS].

    Raises:
        ConfigError: anything else.
    """
    if isinstance(reads_per_image, bool) or not isinstance(reads_per_image, int) or \
            not 1 <= reads_per_image <= MAX_READS:
        raise ConfigError(f"reads_per_image must be an integer from 1 to {MAX_READS} (1: single "
                          f"reading, 2: double reading). Received: reads_per_image="
                          f"{reads_per_image!r}")
    return reads_per_image


def get_setting(*, session: Session, dataset_id: int) -> ReadingSetting:
    """The dataset's reading mode in force (its newest row; the default without one)."""
    row = session.scalars(select(ReviewSetting).where(ReviewSetting.dataset_id == dataset_id)
                          .order_by(ReviewSetting.id.desc()).limit(1)).first()
    if row is None:
        return ReadingSetting(dataset_id)
    return ReadingSetting(row.dataset_id, bool(row.blind), int(row.reads_per_image),
                          row.changed_by, row.created_at, row.id)


def set_setting(*, session: Session, dataset_id: int, blind: bool, reads_per_image: int,
                changed_by: str, note: str = "") -> int:
    """Append a reading-mode row for the dataset (the old ones stay); returns its id.

    Raises:
        ConfigError: a bad ``reads_per_image``, a non-boolean ``blind`` or no ``changed_by``.
    """
    if not isinstance(blind, bool):
        raise ConfigError(f"blind must be true or false. Received: blind={blind!r}")
    if not (changed_by or "").strip():
        raise ConfigError("a reading setting needs who changed it. Received: changed_by=''")
    row = ReviewSetting(dataset_id=dataset_id, blind=blind,
                        reads_per_image=check_reads(reads_per_image),
                        changed_by=changed_by.strip()[:200], note=note or "")
    session.add(row)
    session.flush()
    return row.id


def history(*, session: Session, dataset_id: int, limit: int = 20) -> list[ReadingSetting]:
    """The dataset's reading-mode rows, newest first."""
    rows = session.scalars(select(ReviewSetting).where(ReviewSetting.dataset_id == dataset_id)
                           .order_by(ReviewSetting.id.desc()).limit(limit))
    return [ReadingSetting(r.dataset_id, bool(r.blind), int(r.reads_per_image), r.changed_by,
                           r.created_at, r.id) for r in rows]
