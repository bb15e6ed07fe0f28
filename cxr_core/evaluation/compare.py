"""Comparing stored evaluations as user actions: which evaluations can be compared, a
:class:`Comparison` of 2–4 of them on the same images at comparable thresholds, and sending an
image they disagree on to review.

Every compared number uses one label version (re-derived per image where the images are
indexed, :mod:`cxr_core.data.provenance`) and one read of the database: the evaluations, their
labels, patients and operating points come from one transaction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.core.errors import ConfigError
from cxr_core.core.text_safe import md_escape
from cxr_core.data import provenance
from cxr_core.evaluation.evaluate import list_evaluations
from cxr_core.models.ensembles import is_ensemble_ref
from cxr_core.stats import reports as ev
from cxr_core.stats.metrics import predict
from cxr_core.stats.paired import disagreements, mcnemar
from cxr_core.stats.tables import metrics_table
from cxr_core.stats.thresholds import matched_thresholds
from cxr_core.storage import AndThen, Database, relabels, review_queue, reviews
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import evals as store
from cxr_core.storage.evals import EvalPredictions, EvaluationInfo, OperatingPoint
from cxr_core.storage.relabels import LabelVersion

# -- Which evaluations can be compared ---------------------------------------------------

@dataclass(frozen=True)
class ComparableGroup:
    """Evaluations of different models on the same images in the same order."""

    images_key: str
    evaluations: tuple[EvaluationInfo, ...]  # newest first, one per model

    @property
    def labels(self) -> tuple[str, ...]:
        return self.evaluations[0].labels

    @property
    def label(self) -> str:
        """e.g. ``chest_xray [test] · 624 images · 3 models``."""
        e = self.evaluations[0]
        where = e.dataset_name or Path(e.source).name or "images"
        return (f"{where} [{e.split or 'all'}] · {e.n} images · "
                f"{len(self.evaluations)} models")


GROUPS_OF_NEWEST = 1000  # evaluations the image-set picker groups (newest first)


def comparable_groups(db: Database, *, min_size: int = 2) -> list[ComparableGroup]:
    """Evaluations grouped by image set (same images, same order), largest group first.

    Within a group the newest evaluation of each model is kept (re-evaluating a run on the
    same images replaces the older result for comparison). Reads the newest
    :data:`GROUPS_OF_NEWEST` evaluations' descriptions, not their metrics or outputs.
    """
    groups: dict[str, list[EvaluationInfo]] = {}
    for e in list_evaluations(db, with_metrics=False, limit=GROUPS_OF_NEWEST):  # newest first
        group = groups.setdefault(e.images_key, [])
        if all(g.model_ref != e.model_ref for g in group):
            group.append(e)
    out = [ComparableGroup(k, tuple(g)) for k, g in groups.items() if len(g) >= min_size]
    return sorted(out, key=lambda g: (-len(g.evaluations), -g.evaluations[0].id))


# -- A comparison ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Comparison:
    """2–4 evaluations on the same images, evaluated at comparable thresholds.

    Every dict is keyed by the evaluation's display name (``names`` order).
    """

    names: tuple[str, ...]
    evaluations: dict[str, EvaluationInfo]
    labels: tuple[str, ...]
    mode: str  # "operating_point" | "matched" | "site"
    target: float | None  # matched sensitivity, for mode "matched"
    thresholds: dict[str, float | None]  # None = argmax (multi-class)
    threshold_sources: dict[str, str]
    reports: dict[str, ev.EvalReport]
    predictions: dict[str, np.ndarray]  # (N,) predicted class indices
    probs: dict[str, np.ndarray]  # (N, C)
    y_true: np.ndarray
    image_ids: tuple[int | None, ...]
    paths: tuple[str, ...]
    truth_source: str = "stored"  # "current" | "original" | "stored" (not re-derivable)
    truth_text: str = ""  # which labels every number of the comparison uses
    dropped: int = 0  # images left out: no class under the chosen labels
    ci_unit: str | None = None  # "patient" | "image"
    images: str = "all"  # "all" | "unconfirmed": the films no one has confirmed on Review
    confirmed_left_out: int = 0  # films left out as confirmed (images "unconfirmed")

    @property
    def provenance_rows(self) -> list[dict]:
        """Per evaluation: the labels it was stored with, and what Compare scores it against."""
        return [{"evaluation": n, "stored against": e.labels_text,
                 "compared against": self.truth_text,
                 "warning": provenance.overlap_warning(e.overlap, e.n) or ""}
                for n, e in self.evaluations.items()]

    def mcnemar_rows(self) -> list[dict]:
        """McNemar's test for every pair of runs (one row for two runs)."""
        rows = []
        for i, a in enumerate(self.names):
            for b in self.names[i + 1:]:
                res = mcnemar(self.y_true, self.predictions[a], self.predictions[b])
                rows.append({"run A": a, "run B": b, "A right, B wrong": res.b,
                             "A wrong, B right": res.c, "statistic": res.statistic,
                             "p_value": res.p_value, "test": res.method})
        return rows

    def disagreement_rows(self, *, with_truth: bool = False) -> list[dict]:
        """Images on which the runs disagree: truth, each run's prediction and P(class)."""
        idx = disagreements(self.y_true, self.predictions, with_truth=with_truth)
        rows = []
        for i in idx:
            row = {"index": int(i), "image_id": self.image_ids[i], "path": self.paths[i],
                   "truth": self.labels[int(self.y_true[i])]}
            for name in self.names:
                row[name] = self.labels[int(self.predictions[name][i])]
                row[f"{name} probs"] = [float(v) for v in self.probs[name][i]]
            row["summary"] = " · ".join([f"truth **{md_escape(row['truth'])}**"] + [
                f"{md_escape(n)}: {md_escape(row[n])}" for n in self.names])  # markdown caption
            rows.append(row)
        return rows

    def metrics_rows(self) -> list[dict]:
        """Top-level metrics with their 95% intervals, one row per (run, metric)."""
        return [r for r in metrics_table(self.reports) if r["class"] == "all"]

    def metrics_text(self) -> list[dict]:
        """One row per metric, one column per run: ``"0.912 (0.880–0.940)"`` for display."""
        table: dict[str, dict] = {}
        for r in self.metrics_rows():
            ci = f" ({r['low']:.3f}–{r['high']:.3f})" if r["low"] is not None else ""
            value = "n/a" if r["value"] is None or np.isnan(r["value"]) else f"{r['value']:.3f}"
            table.setdefault(r["metric"], {"metric": r["metric"]})[r["run"]] = value + ci
        return list(table.values())

    def class_rows(self) -> list[dict]:
        """Per run at its compared threshold: each class's precision, recall, F1 and support,
        then the macro and weighted averages (scikit-learn's classification report)."""
        return [{"run": name, **row} for name in self.names
                for row in ev.class_report(self.reports[name].per_class)]

    def review_payload(self, row: dict) -> dict:
        """What Compare sends to review for a disagreement row: the first run that is wrong
        on the image (else the first run), with its prediction and probabilities."""
        name = next((n for n in self.names if row[n] != row["truth"]), self.names[0])
        return {"image_id": row["image_id"], "run_ref": self.evaluations[name].model_ref,
                "predicted": row[name], "probs": row[f"{name} probs"]}


def _display_names(infos: list[EvaluationInfo]) -> list[str]:
    names = [e.run_name or Path(e.model_ref).name for e in infos]
    return [n if names.count(n) == 1 else f"{n} (#{e.id})" for n, e in zip(names, infos)]


def _stored_threshold(info: EvaluationInfo, op: OperatingPoint | None) -> tuple[float | None, str]:
    """The threshold an evaluation is compared at in mode "operating_point", and its source."""
    if len(info.labels) != 2:
        stored = info.metrics.get("threshold")  # a hierarchical model's pneumonia step
        return ((float(stored), "two steps: pneumonia at its operating point, then the subtype")
                if stored is not None else (None, "argmax"))
    if op is not None:
        return op.threshold, f"operating point ({op.method}, {op.changed_by})"
    stored = info.metrics.get("threshold")
    # An ensemble has no run row: its own operating point is the one it was evaluated at
    # (fixed in a named ensemble's card; an ad hoc one re-derives the same from stored outputs).
    where = ("ensemble operating point, at evaluation" if is_ensemble_ref(info.model_ref)
             else "at evaluation")
    return (float(stored), where) if stored is not None else (0.5, "none (0.5)")


def _check_comparable(ids: list[int], found: list[EvaluationInfo | None],
                      mode: str) -> list[EvaluationInfo]:
    """The evaluations, when they exist and can be compared in ``mode``; else ConfigError."""
    if any(e is None for e in found):
        missing = [i for i, e in zip(ids, found) if e is None]
        raise ConfigError(f"no evaluation with id(s) {missing}. Received: {ids}")
    infos = [e for e in found if e is not None]
    if len({e.images_key for e in infos}) != 1 or len({e.labels for e in infos}) != 1:
        got = [(e.id, e.images_key[:8], e.labels) for e in infos]
        raise ConfigError("evaluations can only be compared on the same images with the same "
                          f"labels. Received (id, images key, labels): {got}")
    if mode == "matched" and len(infos[0].labels) != 2:
        raise ConfigError("matched sensitivity needs binary models; multi-class compares at "
                          f"the argmax. Received: labels={list(infos[0].labels)}")
    return infos


def _comparison_truth(infos: list[EvaluationInfo], preds: list[EvalPredictions], truth: str,
                      version: LabelVersion | None) -> tuple[np.ndarray, str, str]:
    """(y, source, text): the truth every compared number uses.

    Indexed images: re-derived from the chosen label version (``version``, read for these
    images), for every evaluation alike. Otherwise (``version`` None) the stored truths must
    be identical (same labels), and are used as stored.
    """
    provenance.check_source(truth)
    labels = infos[0].labels
    if version is not None:
        schemes = {e.label_scheme or provenance.infer_scheme(labels) for e in infos}
        if len(schemes) != 1:
            raise ConfigError("these evaluations map folder labels to classes differently "
                              f"(label schemes {sorted(schemes)}); compare one scheme at a time")
        ids = [int(i) for i in preds[0].image_ids]  # type: ignore[arg-type]
        t = provenance.make_truth(version.labels, ids, labels, schemes.pop(), truth,
                                  version.newest_relabel_id)
        return t.y, truth, t.text
    hashes = {e.label_hash for e in infos}
    if any(not np.array_equal(p.y_true, preds[0].y_true) for p in preds) or len(hashes) > 1:
        got = [(e.id, e.labels_text) for e in infos]
        raise ConfigError("these evaluations were scored against different labels and their "
                          "images are not indexed, so the labels cannot be re-derived; "
                          f"compare evaluations scored against the same labels. Received: {got}")
    return preds[0].y_true, "stored", ("labels stored with the evaluations (images not "
                                       f"indexed: {infos[0].labels_text})")


MODES = ("operating_point", "matched", "site")
IMAGE_FILTERS = ("all", "unconfirmed")


def _site_thresholds(s: Any, infos: list[EvaluationInfo]) -> dict[int, OperatingPoint]:
    """Each evaluation's model's site threshold for the evaluated dataset (mode "site")."""
    out, missing = {}, []
    for e in infos:
        op = None if e.dataset_id is None else store.site_operating_point(
            session=s, model_ref=e.model_ref, dataset_id=e.dataset_id)
        if op is None:
            missing.append(e.run_name or e.model_ref)
        else:
            out[e.id] = op
    if missing:
        raise ConfigError(f"no site threshold recorded for {missing} on this dataset: record "
                          "one per model (Compare → Site threshold), or compare at their "
                          "operating points")
    return out


def compare_evaluations(db: Database, evaluation_ids: Sequence[int], *,
                        mode: str = "operating_point", target: float = 0.95,
                        n_boot: int = 500, truth: str = "current",
                        as_of_relabel_id: int | None = None, images: str = "all") -> Comparison:
    """Evaluate 2–4 stored evaluations of the same images at comparable thresholds.

    Args:
        db: the database.
        evaluation_ids: 2 to 4 evaluations with the same ``images_key`` and labels.
        mode: "operating_point" (each run's stored operating point), "matched" (each run
            at the threshold reaching the same sensitivity ``target`` on these images; binary)
            or "site" (each model at its site threshold recorded for this dataset).
        target: the matched sensitivity, in (0, 1].
        n_boot: bootstrap resamples for the 95% intervals (patients where known).
        truth: score every evaluation against the "current" labels (relabels up to now) or
            the "original" folder labels, re-derived per image; evaluations of images that
            are not indexed must have been scored against identical labels.
        as_of_relabel_id: with truth "current", the labels as of this relabel id (the page
            and the worker computing the intervals then use one label version); None: now.
        images: "all", or "unconfirmed": only the films no one has confirmed on Review (a
            site's external validation once its confirmed films trained the next round).

    Returns:
        The comparison; ``truth_text`` says which labels every number uses.

    Raises:
        ConfigError: fewer than 2 or more than 4 evaluations, different images or labels,
            an unknown mode or label version, or "matched" for a multi-class comparison.
    """
    ids = list(dict.fromkeys(int(i) for i in evaluation_ids))
    if not 2 <= len(ids) <= 4:
        raise ConfigError(f"compare 2 to 4 evaluations. Received: {len(ids)} ({ids})")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}. Received: mode={mode!r}")
    if images not in IMAGE_FILTERS:
        raise ConfigError(f"images must be one of {list(IMAGE_FILTERS)}. "
                          f"Received: images={images!r}")
    with db.session() as s:  # one read: outputs, labels, patients and thresholds agree
        infos = _check_comparable(
            ids, [store.get_evaluation(session=s, evaluation_id=i) for i in ids], mode)
        preds = [store.get_predictions(session=s, evaluation_id=i) for i in ids]
        indexed = [i for i in preds[0].image_ids if i is not None]
        version = (relabels.image_label_version(
            session=s, image_ids=indexed,
            as_of_relabel_id=provenance.as_of_relabel_id(truth) if truth != "current"
            or as_of_relabel_id is None else as_of_relabel_id)
            if len(indexed) == len(preds[0].image_ids) else None)
        y, source, text = _comparison_truth(infos, preds, truth, version)
        keep = y >= 0  # images with no class under the chosen labels are left out of every run
        confirmed_out = 0
        if images == "unconfirmed":
            if version is None:
                raise ConfigError("only indexed images can be told confirmed or not; compare "
                                  "all images")
            done = review_queue.reviewed_among(session=s, reviewer=None, image_ids=indexed)
            confirmed = np.array([i in done for i in preds[0].image_ids])
            confirmed_out = int((keep & confirmed).sum())
            keep &= ~confirmed
        image_ids = tuple(i for i, k in zip(preds[0].image_ids, keep) if k)
        groups = ds_store.image_patients(session=s, image_ids=image_ids)
        if mode == "site":
            ops = _site_thresholds(s, infos)
        else:
            ops = {} if mode == "matched" else {
                e.id: store.latest_operating_point(session=s, run_id=e.run_id)
                for e in infos if e.run_id is not None}
    names = _display_names(infos)
    labels = infos[0].labels
    y = y[keep]
    probs = {n: p.probs[keep] for n, p in zip(names, preds)}
    paths = tuple(p for p, k in zip(preds[0].paths, keep) if k)
    if mode == "matched":
        thresholds: dict[str, float | None] = dict(matched_thresholds(y, probs, target))
        sources = {n: f"matched sensitivity {target:.2f}" for n in names}
    elif mode == "site":
        thresholds = {n: ops[e.id].threshold for n, e in zip(names, infos)}
        sources = {n: f"site threshold ({ops[e.id].changed_by}, "
                      f"{ops[e.id].created_at:%Y-%m-%d})" for n, e in zip(names, infos)}
    else:
        stored = {n: _stored_threshold(e, ops.get(e.id)) for n, e in zip(names, infos)}
        thresholds = {n: t for n, (t, _) in stored.items()}
        sources = {n: src for n, (_, src) in stored.items()}
    reports = {n: ev.evaluate(y, probs[n], list(labels), threshold=thresholds[n], n_boot=n_boot,
                              groups=groups) for n in names}
    predictions = {n: predict(probs[n], threshold=thresholds[n]) for n in names}
    return Comparison(tuple(names), dict(zip(names, infos)), labels, mode,
                      target if mode == "matched" else None, thresholds, sources, reports,
                      predictions, probs, y, image_ids, paths, source, text,
                      int((~keep).sum()) - confirmed_out, "patient" if groups else "image",
                      images, confirmed_out)


def send_disagreement_to_review(db: Database, *, image_id: int, run_ref: str, predicted: str,
                                probs: Sequence[float], sent_by: str,
                                and_then: AndThen | None = None) -> int:
    """Queue an image the compared runs disagree on for clinician review (source "compare");
    ``and_then(session, item_id)`` runs in the same transaction (an audit row).

    Returns:
        The review item id.
    """
    return db.write(lambda s: reviews.send_to_review(
        session=s, image_id=int(image_id), upload_sha256=None, source="compare",
        run_ref=run_ref, predicted=predicted, probs=list(probs), sent_by=sent_by),
        and_then=and_then)


def comparison_intervals(db: Database, evaluation_ids: Sequence[int], *, mode: str,
                         target: float, truth: str, as_of_relabel_id: int | None,
                         thresholds: dict[str, float | None] | None = None,
                         n_boot: int = 500, images: str = "all") -> dict:
    """The bootstrap 95% intervals of a comparison (what the ``compare_ci`` job computes, off
    the page's thread): ``{"rows": metrics_text(), "ci_unit", "truth_text", "n_boot"}``.

    Raises:
        ConfigError: ``thresholds`` (what the page showed) differ from the runs' operating
            points now (one was changed meanwhile): the page asks again.
    """
    cmp = compare_evaluations(db, evaluation_ids, mode=mode, target=target, n_boot=n_boot,
                              truth=truth, as_of_relabel_id=as_of_relabel_id, images=images)
    if thresholds is not None and cmp.thresholds != thresholds:
        raise ConfigError("an operating point changed while the intervals were computed; "
                          f"reload the page. Received: {thresholds}, now {cmp.thresholds}")
    return {"rows": cmp.metrics_text(), "ci_unit": cmp.ci_unit, "truth_text": cmp.truth_text,
            "n_boot": n_boot}
