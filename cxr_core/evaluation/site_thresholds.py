"""Site thresholds: re-choose a model's operating point for one dataset (a site) on a labelled
local sample, see what it gives with patient-clustered intervals, and record it.

A threshold chosen on one hospital's validation images does not transfer to another's. A user
with labelled images from the new site (an indexed dataset's labels, or only the images
confirmed on Review) evaluates the model there (Compare's Evaluate: a stored evaluation with
per-image outputs), then:

1. :func:`candidate` (a worker job, ``site_calibration``): the threshold chosen on that sample
   (method, target), sensitivity / specificity / AUC with patient-clustered bootstrap 95%
   intervals, the sample's size, and what the model's global threshold gives on it; samples
   missing a class or with fewer than :data:`MIN_PER_CLASS` images of one are refused, small
   ones (under :data:`SMALL_PER_CLASS`) flagged;
2. :func:`record` (an explicit user action): appends an ``operating_points`` row scoped to
   (model, dataset) with who, when, note, method, target, sample size and the measured figures.

Predict then decides with that site's operating point for images of the dataset (or an upload
the user says comes from it) and the global one elsewhere (:func:`operating_point_for`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.data import provenance
from cxr_core.stats import reports as ev
from cxr_core.stats.crossfit import cross_fitted_threshold
from cxr_core.stats.thresholds import choose_threshold
from cxr_core.storage import AndThen, Database, relabels, review_queue
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import evals as store
from cxr_core.storage.evals import EvaluationInfo, OperatingPoint

MIN_PER_CLASS = 10  # fewer images of a class: refused (no threshold worth recording)
SMALL_PER_CLASS = 50  # fewer: flagged (wide intervals)
SAMPLES = {"all": "every evaluated image (the dataset's labels)",
           "reviewed": "only images confirmed or relabelled on Review"}
N_BOOT = 500


@dataclass(frozen=True)
class SiteCandidate:
    """A threshold chosen on a site's labelled sample, with what it gives there."""

    model_ref: str
    run_id: int | None
    dataset_id: int
    dataset_name: str
    evaluation_id: int
    sample: str  # "all" | "reviewed"
    label_source: str  # "current" | "original"
    label_hash: str
    n: int
    n_positive: int
    n_negative: int
    n_patients: int | None
    ci_unit: str | None
    method: str
    target: float | None
    threshold: float
    sensitivity: float
    sensitivity_ci: list[float]
    specificity: float
    specificity_ci: list[float]
    auc: float
    auc_ci: list[float]
    n_boot: int
    global_threshold: float | None  # the model's global operating point, on the same sample
    global_sensitivity: float | None = None
    global_specificity: float | None = None
    warnings: list[str] = field(default_factory=list)
    # What the threshold gives on films it was not chosen on (cxr_core.stats.crossfit), or
    # {"refused": why}; the figures above are on the very sample it was chosen on.
    cross_fitted: dict | None = None
    # How the cross-fitted specificity's interval narrows as more films are confirmed:
    # [{"n", "specificity", "low", "high"}], in confirmation order (sample "reviewed").
    narrowing: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SiteCandidate:
        return cls(**data)


def site_evaluations(db: Database, model_ref: str, dataset_id: int) -> list[EvaluationInfo]:
    """Stored binary evaluations of ``model_ref`` on the dataset (the samples to calibrate on),
    newest first."""
    with db.session() as s:
        found = store.list_evaluations(session=s, with_metrics=False, limit=200)
    return [e for e in found if e.model_ref == model_ref and e.dataset_id == dataset_id
            and len(e.labels) == 2]


def _sample(db: Database, info: EvaluationInfo, sample: str, labels: str,
            as_of_relabel_id: int | None):
    """(ids, y, p_pos, patients, truth) of the sample, its labels re-derived."""
    provenance.check_source(labels)
    as_of = provenance.as_of_relabel_id(labels)
    if labels == "current" and as_of_relabel_id is not None:
        as_of = as_of_relabel_id
    if sample not in SAMPLES:
        raise ConfigError(f"sample must be one of {list(SAMPLES)}. Received: sample={sample!r}")
    with db.session() as s:
        preds = store.get_predictions(session=s, evaluation_id=info.id)
        ids = [int(i) for i in preds.image_ids if i is not None]
        if len(ids) != len(preds.image_ids):
            raise ConfigError(f"evaluation {info.id} holds images that are not indexed: a site "
                              "sample must come from an indexed dataset")
        version = relabels.image_label_version(
            session=s, image_ids=ids, as_of_relabel_id=as_of)
        keep = set(ids) if sample == "all" else review_queue.reviewed_among(
            session=s, reviewer=None, image_ids=ids)
        patients = ds_store.image_patients(session=s, image_ids=ids)
    scheme = info.label_scheme or provenance.infer_scheme(info.labels)
    truth = provenance.make_truth(version.labels, ids, info.labels, scheme, labels,
                                  version.newest_relabel_id)
    mask = np.array([i in keep for i in ids]) & (truth.y >= 0)
    pats = None if patients is None else [p for p, m in zip(patients, mask) if m]
    return ([i for i, m in zip(ids, mask) if m], truth.y[mask], preds.probs[mask][:, 1],
            pats, truth)


def _check_size(y: np.ndarray, labels: tuple[str, ...], sample: str) -> list[str]:
    counts = {labels[k]: int(np.sum(y == k)) for k in (0, 1)}
    missing = [c for c, n in counts.items() if n == 0]
    what = SAMPLES[sample]
    if missing:
        raise ConfigError(f"the sample ({what}) has no {' or '.join(missing)} image: a "
                          f"threshold needs both classes. Received: {counts}")
    few = {c: n for c, n in counts.items() if n < MIN_PER_CLASS}
    if few:
        raise ConfigError(f"the sample ({what}) is too small to choose a threshold on: at least "
                          f"{MIN_PER_CLASS} images of each class are needed. Received: {counts}")
    small = {c: n for c, n in counts.items() if n < SMALL_PER_CLASS}
    return [f"small sample ({counts}): under {SMALL_PER_CLASS} images of a class, the "
            "intervals are wide; label more images of this site before relying on it"] \
        if small else []


def _global_threshold(db: Database, info: EvaluationInfo) -> float | None:
    if info.run_id is not None:
        with db.session() as s:
            op = store.latest_operating_point(session=s, run_id=info.run_id)
        if op is not None:
            return op.threshold
    return (info.metrics or {}).get("threshold")


def candidate(db: Database, *, evaluation_id: int, sample: str = "all",
              labels: str = "current", method: str = "sensitivity", target: float = 0.95,
              n_boot: int = N_BOOT, as_of_relabel_id: int | None = None) -> SiteCandidate:
    """The threshold a site's labelled sample gives, with patient-clustered 95% intervals.

    Args:
        db: the database.
        evaluation_id: a stored binary evaluation of the model on the site's dataset.
        sample: "all" evaluated images, or only those "reviewed" (confirmed on Review).
        labels: score against the "current" labels (relabels applied) or the "original" ones.
        method: "sensitivity" (highest threshold reaching ``target``) or "youden".
        target: target sensitivity for "sensitivity".
        n_boot: bootstrap resamples (patients resampled together where they are known).
        as_of_relabel_id: "current" labels as of this relabel id (None: as of now).

    Returns:
        The candidate (nothing is recorded: :func:`record` does that).

    Raises:
        ConfigError: no such binary evaluation of an indexed dataset, a sample missing a class
            or with fewer than :data:`MIN_PER_CLASS` images of one, a bad method or target.
    """
    with db.session() as s:
        info = store.get_evaluation(session=s, evaluation_id=evaluation_id)
    if info is None or len(info.labels) != 2 or info.dataset_id is None:
        raise ConfigError("a site threshold needs a stored binary evaluation of an indexed "
                          f"dataset. Received: evaluation_id={evaluation_id}")
    ids, y, p, patients, truth = _sample(db, info, sample, labels, as_of_relabel_id)
    warnings = _check_size(y, info.labels, sample)
    chosen = choose_threshold(y, p, method=method, target_sensitivity=target)  # type: ignore
    probs = np.column_stack([1.0 - p, p])
    rep = ev.evaluate(y, probs, list(info.labels), threshold=chosen.threshold, n_boot=n_boot,
                      groups=patients if patients and any(patients) else None)
    ci = {k: [rep.ci[k].low, rep.ci[k].high] if k in rep.ci else [float("nan")] * 2
          for k in ("sensitivity", "specificity", "auc")}
    seen = provenance.overlap_warning(info.overlap, info.n)
    if seen:
        warnings.append(seen)
    g = _global_threshold(db, info)
    gsens = gspec = None
    if g is not None:
        at = ev.evaluate(y, probs, list(info.labels), threshold=g, n_boot=0)
        gsens, gspec = at.sensitivity, at.specificity
    crossed, narrowing = _cross_fitted(db, ids, y, p, patients, sample, target, n_boot)
    return SiteCandidate(
        info.model_ref, info.run_id, info.dataset_id, info.dataset_name or "", info.id, sample,
        labels, truth.hash, len(ids), int(np.sum(y == 1)), int(np.sum(y == 0)), rep.n_clusters,
        rep.ci_unit, chosen.method, chosen.target, chosen.threshold, rep.sensitivity,
        ci["sensitivity"], rep.specificity, ci["specificity"], rep.auc, ci["auc"], n_boot, g,
        gsens, gspec, warnings, crossed, narrowing)


NARROWING_SIZES = (20, 30, 40, 60, 80, 100, 150, 200, 300, 400, 600, 800, 1000)


def _cross_fitted(db: Database, ids: list[int], y: np.ndarray, p: np.ndarray,
                  patients: list | None, sample: str, target: float | None,
                  n_boot: int) -> tuple[dict, list[dict]]:
    """The cross-fitted figures of a site threshold on this sample, and how their interval
    narrows with the number of films confirmed (in confirmation order; a seeded order for the
    whole sample)."""
    target = target or 0.95
    try:
        whole = cross_fitted_threshold(y, p, patients, target=target, n_boot=n_boot).to_json()
    except ConfigError as exc:
        return {"refused": str(exc)}, []
    if sample == "reviewed":
        with db.session() as s:
            first = review_queue.confirmation_order(session=s, image_ids=ids)
        order = sorted(range(len(ids)), key=lambda k: first.get(ids[k], float("inf")))
    else:
        order = list(np.random.default_rng(0).permutation(len(ids)))
    steps = []
    for n in [m for m in NARROWING_SIZES if m < len(ids)] + [len(ids)]:
        idx = np.array(order[:n])
        groups = None if patients is None else [patients[k] for k in idx]
        try:
            cf = cross_fitted_threshold(y[idx], p[idx], groups, target=target, repeats=5,
                                        n_boot=min(n_boot, 200))
        except ConfigError:
            continue  # too few of a class this early
        steps.append({"n": int(n), "specificity": cf.specificity.estimate,
                      "low": cf.specificity.low, "high": cf.specificity.high})
    return whole, steps


def record(db: Database, cand: SiteCandidate | dict, *, changed_by: str,
           note: str = "", and_then: AndThen | None = None) -> OperatingPoint:
    """Record a candidate as the model's operating point for its dataset: an explicit action,
    with who, when (the row's time), why, the method, target, sample size and the figures.
    ``and_then(session, operating_point)`` runs in the same transaction (an audit row).

    Raises:
        ConfigError: no name given.
    """
    c = cand if isinstance(cand, SiteCandidate) else SiteCandidate.from_json(dict(cand))
    if not (changed_by or "").strip():
        raise ConfigError("recording a site's operating point needs the name of who records "
                          f"it. Received: changed_by={changed_by!r}")
    details = {"chosen_on": "site", **{k: v for k, v in c.to_json().items() if k not in (
        "model_ref", "run_id", "dataset_id", "threshold", "method", "target", "sensitivity",
        "specificity", "n", "narrowing")}}
    return db.write(lambda s: store.add_operating_point(
        session=s, run_id=c.run_id, model_ref=c.model_ref, dataset_id=c.dataset_id,
        threshold=c.threshold, method=c.method, target=c.target, sensitivity=c.sensitivity,
        specificity=c.specificity, changed_by=changed_by.strip(), note=note, sample_n=c.n,
        details=details), and_then=and_then)


def site_points(db: Database, *, model_ref: str | None = None,
                dataset_id: int | None = None) -> list[OperatingPoint]:
    """Recorded site thresholds, newest first (each scope's first row is in force)."""
    with db.session() as s:
        return store.site_points(session=s, model_ref=model_ref, dataset_id=dataset_id)


def site_operating_point(db: Database, model_ref: str, dataset_id: int) -> OperatingPoint | None:
    """The operating point in force for ``model_ref`` on one dataset, or None (global)."""
    with db.session() as s:
        return store.site_operating_point(session=s, model_ref=model_ref, dataset_id=dataset_id)


def describe(op: OperatingPoint) -> str:
    """e.g. ``site operating point for kermany (sensitivity 0.95 on 240 images, by dr a,
    2026-12-04 10:12 UTC)``."""
    how = op.method if op.target is None else f"{op.method} {op.target:g}"
    when = op.created_at.strftime("%Y-%m-%d %H:%M UTC") if op.created_at else "?"
    return (f"site operating point for {op.dataset_name or op.dataset_id} ({how} on "
            f"{op.sample_n or '?'} images, by {op.changed_by}, {when})")


def operating_point_for(db: Database, loaded: Any, dataset_id: int | None) -> tuple[Any, str]:
    """The loaded model with the operating point Predict must use for images of
    ``dataset_id`` (None: not from a known site), and a sentence saying which one it is.

    A site threshold of the model for that dataset wins; otherwise the model's global
    operating point (as :func:`cxr_core.models.refs.load_model_ref` set it).
    """
    if getattr(loaded, "is_binary", False) and dataset_id is not None:
        op = site_operating_point(db, loaded.ref, dataset_id)
        if op is not None:
            text = describe(op)
            return replace(loaded, threshold=op.threshold, threshold_source=text), text
    return loaded, global_text(db, loaded)


def global_text(db: Database, loaded: Any) -> str:
    """Which global operating point a model decides with (who set it and when, when known)."""
    if not getattr(loaded, "is_binary", False):
        return "argmax (multi-class: no threshold)"
    op = None
    if loaded.run_id is not None:
        with db.session() as s:
            op = store.latest_operating_point(session=s, run_id=loaded.run_id)
    if op is not None and abs(op.threshold - loaded.threshold) < 1e-12:
        when = op.created_at.strftime("%Y-%m-%d %H:%M UTC") if op.created_at else "?"
        on = f", chosen on {op.chosen_on}" if op.chosen_on else ""
        return (f"global operating point {op.threshold:.3f} ({op.method}{on}, by "
                f"{op.changed_by}, {when})")
    card_op = (loaded.card or {}).get("operating_point") or {}
    on = f", chosen on {card_op['chosen_on']}" if card_op.get("chosen_on") else ""
    return f"global operating point {loaded.threshold:.3f} ({loaded.threshold_source}{on})"
