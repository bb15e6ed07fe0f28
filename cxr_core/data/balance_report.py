"""The class-balance report: what the Class balance page shows for one dataset, label version
and scheme, computed from the index (no image decoding). Rendering is the page's job.

Two parts, so a page never reads a dataset's rows:

- :func:`balance_tables`: counts, patients, sizes, duplicates and leaked patients as SQL
  aggregates (:mod:`cxr_core.storage.aggregates`), fast at any size;
- :func:`split_preview`: the seeded patient-grouped validation split a run would get
  (:func:`cxr_core.data.splits.patient_split`, the same function training uses) and the class
  weights of its training pool. It reads every labelled image, so the page asks a worker for
  it (job kind ``split_preview``) and the result is kept with the job, keyed by the label
  version (the newest relabel id: relabels are append-only, so labels as of an id never
  change).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from cxr_core.core.labels import scheme_classes, scheme_label
from cxr_core.data.balancing import class_weights
from cxr_core.data.splits import make_split, temporal_key
from cxr_core.storage import Database
from cxr_core.storage import aggregates as agg
from cxr_core.storage import datasets as ds_store
from cxr_core.storage.aggregates import Aggregates

__all__ = ["Aggregates", "SplitPreview", "balance_tables", "split_preview"]


def balance_tables(db: Database, dataset_id: int, scheme: str, *,
                   as_of_relabel_id: int | None = None, current: bool = False) -> Aggregates:
    """The dataset's tables under ``scheme``, with original labels or (``current``) the labels
    as of ``as_of_relabel_id`` (None: as of now)."""
    with db.session() as s:
        return agg.aggregates(session=s, dataset_id=dataset_id, scheme=scheme, current=current,
                              as_of_relabel_id=as_of_relabel_id)


@dataclass(frozen=True)
class SplitPreview:
    """The patient-grouped plan of a dataset under one scheme (JSON-able: a job's result)."""

    classes: list[str]
    split_counts: list[dict]  # split, class, images
    split_overlap: int  # patients found in both train and validation (must be 0)
    class_counts: dict[str, int]  # training pool per scheme class
    weights: dict[str, float]
    strategy: str = "patient"
    unordered: int = 0  # temporal: images without a date or an ordered id (kept in train)
    val_order: dict | None = None  # temporal: per class, the latest key held out vs trained on

    def to_json(self) -> dict:
        return dict(classes=self.classes, split_counts=self.split_counts,
                    split_overlap=self.split_overlap, class_counts=self.class_counts,
                    weights=self.weights, strategy=self.strategy, unordered=self.unordered,
                    val_order=self.val_order)

    @classmethod
    def from_json(cls, d: dict) -> SplitPreview:
        return cls(list(d["classes"]), list(d["split_counts"]), int(d["split_overlap"]),
                   dict(d["class_counts"]), dict(d["weights"]), d.get("strategy", "patient"),
                   int(d.get("unordered", 0)), d.get("val_order"))


def _weights(class_counts: dict[str, int]) -> dict[str, float]:
    if not all(class_counts.values()):
        return {}
    labels = np.repeat(np.arange(len(class_counts)), list(class_counts.values()))
    return dict(zip(class_counts, class_weights(labels, len(class_counts)).values()))


def split_preview(db: Database, dataset_id: int, scheme: str, *, val_fraction: float = 0.15,
                  seed: int = 0, as_of_relabel_id: int | None = None,
                  current: bool = False, strategy: str = "patient",
                  group: str | None = None) -> SplitPreview:
    """The split a run with these settings would get, and its training pool's class weights.

    Raises:
        DatasetError: a dataset that cannot be split (fewer than 2 groups or images a class).
    """
    from cxr_core.data import indexing

    with db.session() as s:
        info = ds_store.get_dataset(session=s, name_or_id=dataset_id)
    records = (indexing.current_records(db, dataset_id, as_of_relabel_id=as_of_relabel_id)
               if current else indexing.indexed_records(db, dataset_id))
    ok = [r for r in records if not r.error]
    labels = [scheme_label(r.label, r.subtype, scheme) for r in ok]
    classes = scheme_classes(scheme, info.classes if info else sorted({r.label for r in ok}))
    plan = make_split(strategy, ok, labels, val_fraction=val_fraction, seed=seed, group=group)
    by_id = {r.id: (r, y) for r, y in zip(ok, labels)}
    split_rows: Counter = Counter()
    for split, ids in (("train", plan.train), ("val", plan.val), ("test", plan.test)):
        for i in ids:
            split_rows[(split, by_id[i][1])] += 1
    tp = {by_id[i][0].patient for i in plan.train if by_id[i][0].patient}
    overlap = len(tp & {by_id[i][0].patient for i in plan.val if by_id[i][0].patient})
    class_counts = {c: split_rows.get(("train", c), 0) for c in classes}
    return SplitPreview(list(classes),
                        [dict(split=s, **{"class": c}, images=n)
                         for (s, c), n in sorted(split_rows.items())],
                        overlap, class_counts, _weights(class_counts), plan.strategy,
                        plan.unordered, _val_order(plan, by_id) if strategy == "temporal"
                        else None)


def _val_order(plan, by_id) -> dict:
    """Per class: the patient id range held out and the one trained on (what "earliest"
    meant), e.g. {"NORMAL": {"val": "im 115–210", "train": "im 211–766"}}."""
    out: dict[str, dict[str, str]] = {}
    for side, ids in (("val", plan.val), ("train", plan.train)):
        spans: dict[tuple[str, str], list] = {}
        for i in ids:
            rec, y = by_id[i]
            key = temporal_key(rec)
            if key is not None:
                spans.setdefault((str(y), key[1] if key[0] == "id" else "date"), []).append(
                    key[2] if key[0] == "id" else key[1])
        for (cls, series), values in sorted(spans.items()):
            text = f"{series} {min(values)}–{max(values)}"
            out.setdefault(cls, {})[side] = "; ".join(
                filter(None, [out.get(cls, {}).get(side), text]))
    return out
