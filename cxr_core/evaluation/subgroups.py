"""Per-subgroup metrics of a comparison: by site, sex, age band, view (from the dataset's
metadata CSV) or pneumonia subtype (from the file names), at each run's threshold.

Only indexed images have these attributes; an image without one is in "(unknown)".
"""
from __future__ import annotations

import math

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.evaluation.compare import Comparison
from cxr_core.stats.metrics import summary
from cxr_core.storage import Database
from cxr_core.storage import datasets as ds_store

SUBGROUPS = {"site": "Site", "sex": "Sex", "age_band": "Age band", "view": "View",
             "subtype": "Subtype (file name)"}
AGE_BANDS = ((0, 1, "<1 y"), (1, 3, "1–2 y"), (3, 6, "3–5 y"), (6, 12, "6–11 y"),
             (12, 200, "12+ y"))
UNKNOWN = "(unknown)"


def age_band(age: float | None) -> str:
    """The pediatric age band of an age in years."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return UNKNOWN
    return next((name for lo, hi, name in AGE_BANDS if lo <= age < hi), UNKNOWN)


def _value(rec, by: str) -> str:
    if rec is None:
        return UNKNOWN
    if by == "age_band":
        return age_band(rec.age_years)
    value = getattr(rec, by)
    return str(value) if value not in (None, "") else UNKNOWN


def subgroup_rows(db: Database, cmp: Comparison, by: str) -> list[dict]:
    """One row per (subgroup, run): images, positives, AUC, sensitivity and specificity of
    the run at its compared threshold (AUC is None where a subgroup lacks a class).

    Raises:
        ConfigError: ``by`` is not one of :data:`SUBGROUPS`.
    """
    if by not in SUBGROUPS:
        raise ConfigError(f"subgroups are by one of {list(SUBGROUPS)}. Received: by={by!r}")
    ids = [i for i in cmp.image_ids if i is not None]
    with db.session() as s:
        recs = {r.id: r for r in ds_store.get_images(session=s, image_ids=ids)}
    values = np.array([_value(recs.get(i) if i is not None else None, by)
                       for i in cmp.image_ids], dtype=object)
    rows = []
    for value in sorted(set(values.tolist()), key=lambda v: (v == UNKNOWN, v)):
        mask = values == value
        y = cmp.y_true[mask]
        for name in cmp.names:
            m = summary(y, cmp.probs[name][mask], cmp.predictions[name][mask])
            rows.append({SUBGROUPS[by]: value, "run": name, "images": int(mask.sum()),
                         "positives": int((y != 0).sum()),
                         **{k: None if math.isnan(v) else round(v, 4) for k, v in m.items()}})
    return rows
