"""The class-balance report: the tables the Class balance page shows for one dataset and label
scheme, computed from the index (no image decoding). Rendering is the page's job.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxr_core.balancing import class_weights
from cxr_core.datasets import (ImageRecord, cross_split_patients, find_duplicates, scheme_classes,
                               scheme_label)
from cxr_core.splits import patient_split


@dataclass(frozen=True)
class BalanceReport:
    """Long-form tables describing one dataset under one label scheme."""

    scheme: str
    classes: tuple[str, ...]
    counts: list[dict]  # split, class, subtype, images
    patients: list[dict]  # class, patients, images
    sizes: list[dict]  # width, height, mode, bytes (one row per readable image)
    duplicates: list[dict]  # group, sha256, relpath, split, label
    leaked_patients: list[dict]  # patient, splits
    split_counts: list[dict]  # split, class, images (patient-grouped plan)
    split_overlap: int  # patients found in both train and validation of the plan (must be 0)
    class_counts: dict[str, int]  # training pool per scheme class
    weights: dict[str, float]
    unlabelled: int  # images with no class in this scheme (e.g. no subtype for three_class)


def _weights(class_counts: dict[str, int]) -> dict[str, float]:
    if not all(class_counts.values()):
        return {}
    labels = np.repeat(np.arange(len(class_counts)), list(class_counts.values()))
    return dict(zip(class_counts, class_weights(labels, len(class_counts)).values()))


def balance_report(records: Sequence[ImageRecord], scheme: str, *, val_fraction: float = 0.15,
                   seed: int = 0) -> BalanceReport:
    """Everything the class-balance page shows, computed from the index (no image decoding).

    Args:
        records: the dataset's indexed images (current labels may be substituted by the caller).
        scheme: label scheme (binary, three_class, folders).
        val_fraction: validation share of the patient-grouped split preview.
        seed: split seed.

    Returns:
        The report.
    """
    ok = [r for r in records if not r.error]
    labels = [scheme_label(r.label, r.subtype, scheme) for r in ok]
    classes = scheme_classes(scheme, sorted({r.label for r in ok}))
    counts = Counter((r.split or "(none)", y or "(no class)", r.subtype or "—")
                     for r, y in zip(ok, labels))
    pat: dict[str, set[str]] = defaultdict(set)
    for r, y in zip(ok, labels):
        if y:
            pat[y].add(r.patient or f"img:{r.id}")
    plan = patient_split(ok, labels, val_fraction=val_fraction, seed=seed) if len(ok) > 1 else None
    by_id = {r.id: (r, y) for r, y in zip(ok, labels)}
    split_rows: Counter = Counter()
    if plan:
        for split, ids in (("train", plan.train), ("val", plan.val), ("test", plan.test)):
            for i in ids:
                split_rows[(split, by_id[i][1])] += 1
    overlap = 0
    if plan:
        tp = {by_id[i][0].patient for i in plan.train if by_id[i][0].patient}
        overlap = len(tp & {by_id[i][0].patient for i in plan.val if by_id[i][0].patient})
    pool = Counter(y for (split, y), n in split_rows.items() for _ in range(n) if split == "train")
    class_counts = {c: pool.get(c, 0) for c in classes}
    dups = [dict(group=g_i, sha256=g.sha256[:12], relpath=p, split=s or "(none)", label=lab)
            for g_i, g in enumerate(find_duplicates(ok), 1)
            for p, s, lab in zip(g.relpaths, g.splits, g.labels)]
    return BalanceReport(
        scheme, classes,
        [dict(split=s, **{"class": c}, subtype=t, images=n) for (s, c, t), n in sorted(counts.items())],
        [{"class": c, "patients": len(p), "images": sum(1 for y in labels if y == c)}
         for c, p in sorted(pat.items())],
        [dict(width=r.width, height=r.height, mode=r.mode, bytes=r.bytes) for r in ok],
        dups,
        [dict(patient=p, splits=", ".join(s)) for p, s in cross_split_patients(ok).items()],
        [dict(split=s, **{"class": c}, images=n) for (s, c), n in sorted(split_rows.items())],
        overlap, class_counts, _weights(class_counts),
        sum(1 for y in labels if y is None))
