"""The site round, measured end to end (issue 25): what a new site gains from confirming films on
Review and training the next round on them.

Through the product's own functions, with the site folder's labels standing in for its readers:

(a) the site folder is indexed as an external dataset and the base model evaluated on it;
(b) Review's ``new_site`` queue orders the films for learning;
(c) a site threshold is chosen on the confirmed films (``site_thresholds.candidate``);
(d) the next round trains the base config plus the confirmed films (``extra``, current labels,
    patient-grouped), from scratch, in this process (the worker's code path);
(e) base and next round are scored on the films no one confirmed.

The site's patients are split into ``folds`` patient-grouped, class-stratified folds. For each
fold, its films are the scoring set (never confirmed, never used for a threshold) and the other
folds are the review pool; each budget confirms the first ``budget`` pool films of the queue
(budgets are nested: 25 are the first 25 of 50), then the confirmations are undone. Figures
are pooled over the folds (every site film is scored once per budget), with patient-clustered
95% intervals:

- ``base_stored``: the base model at its stored threshold (or, where that threshold was chosen
  on this site's films, at the threshold it had before the site: ``base_threshold`` says which);
- ``base_site``: the base model at the threshold chosen on the confirmed films (``refused``
  under 10 films of a class);
- ``base_crossfit`` / ``next_crossfit``: base and next round at a site threshold cross-fitted on
  the scoring films themselves (chosen on 4/5 of them, scored on the rest, pooled, repeated);
- ``next_own``: the next round at its own operating point (its calibration slice, which holds
  some confirmed site films).

Bench contract: baseline = base at its stored threshold (before the site); ours = the next
round at the site threshold (cross-fitted); ratio = ours' specificity / the baseline's, both
aiming at sensitivity 0.95 (``python -m cxr_core bench site-round --site PATH --json``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BUDGETS = (0, 25, 50, 100, 150)
READER = "bench:folder-labels"  # the site folder's labels stand in for the readers
REPEAT = 3  # an extra film's copies per epoch in the next round (docs/benchmarks.md)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from cxr_core.stats.metrics import _rank_auc

    return float(_rank_auc(y == 1, p))


def _summary(y: np.ndarray, preds: np.ndarray, clusters: np.ndarray, p: np.ndarray | None,
             n_boot: int) -> dict:
    from cxr_core.stats.crossfit import decision_intervals

    sens, spec, acc = decision_intervals(y, preds, clusters, n_boot=n_boot)
    out = {"sensitivity": sens.estimate, "sensitivity_ci": [sens.low, sens.high],
           "specificity": spec.estimate, "specificity_ci": [spec.low, spec.high],
           "accuracy": acc, "n": int(y.size)}
    if p is not None:
        out["auc"] = _auc(y, p)
    return out


def _threshold(db: Any, evaluation_id: int) -> float:
    """The operating point an evaluation was scored at (the model's stored threshold)."""
    return float(_evaluation(db, evaluation_id).metrics.get("threshold", 0.5))


def _evaluation(db: Any, evaluation_id: int) -> Any:
    from cxr_core.evaluation import evaluate as es

    return next(e for e in es.list_evaluations(db) if e.id == evaluation_id)


def baseline_threshold(operating_point: dict | None, stored: float,
                       chosen_here: bool) -> tuple[float, str | None]:
    """The threshold the base stands at before the site round, and why, if not its stored one.

    ``chosen_here`` (:func:`cxr_core.evaluation.external.stored_threshold_chosen_here`): the
    stored threshold was chosen on this site's films (a shipped card's site operating point),
    so scoring the base there at it would score it on the films it was chosen on. The base
    then stands at the threshold it had before the site (the card's ``global_threshold``, its
    own calibration slice's), and the note says so; without one, the note says the baseline is
    resubstituted.
    """
    if not chosen_here:
        return stored, None
    op = operating_point or {}
    site = op.get("dataset") or "this site"
    if op.get("global_threshold") is None:
        return stored, (f"the stored threshold {stored:.3f} was chosen on this site's films "
                        f"({site}) and no earlier one is recorded: the baseline is scored on "
                        "the films its threshold was chosen on")
    before = float(op["global_threshold"])
    return before, (f"the stored threshold {stored:.3f} was chosen on this site's films "
                    f"({site}); the base stands at its own calibration threshold "
                    f"{before:.3f}, the one it had before the site")


def _folds(y: np.ndarray, patients: list[str | None], folds: int, seed: int) -> list[np.ndarray]:
    from sklearn.model_selection import StratifiedGroupKFold

    from cxr_core.stats.intervals import cluster_ids

    clusters = cluster_ids(patients, y.size)
    split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [score for _, score in split.split(np.zeros(y.size), y, clusters)]


def _next_config(db: Any, base: str, config: str | None) -> dict:
    """The next round's config: ``config`` (a run config file), else the base run's stored
    config, else the shipped model's ``train_config.json``."""
    from cxr_core.models.store import DEFAULT_MODELS_DIR, parse_run_ref
    from cxr_core.storage import runs as run_store
    from cxr_core.training.service import read_config_file

    if config:
        cfg = read_config_file(config)
        here = Path(config).resolve().parent
    elif (run_id := parse_run_ref(base)) is not None:
        with db.session() as s:
            cfg = dict(run_store.require_run(session=s, run_id=run_id).config)
        here = Path.cwd()
    else:
        cfg = read_config_file(DEFAULT_MODELS_DIR / "train_config.json")
        here = DEFAULT_MODELS_DIR
    for key in ("dataset", "weights"):  # paths in a config file are relative to that file
        value = cfg.get(key)
        if isinstance(value, str) and ":" not in value and value != "imagenet" \
                and not Path(value).is_absolute():
            candidate = (here / value).resolve()
            if candidate.exists():
                cfg[key] = str(candidate)
    return {k: v for k, v in cfg.items() if k not in ("external", "extra", "name")}


def run(shared_data: Path, *, site: str | None = None, base: str = "default",
        config: str | None = None, budgets: tuple[int, ...] = DEFAULT_BUDGETS, folds: int = 3,
        repeat: int = REPEAT, seed: int = 0, n_boot: int = 500) -> dict:
    """Run the site round (see the module docstring) and return the bench JSON object.

    Args:
        shared_data: the shared data folder (its ``chest_xray_224_external`` is the default site).
        site: the new site's folder (NORMAL/PNEUMONIA films, Kermany names).
        base: the model the site starts from: "default" or "run:ID".
        config: the next round's run config file (default: the base's own config).
        budgets: films confirmed before each next round (0: none, the base itself).
        folds: patient-grouped folds over the site's films.
        repeat: copies of each confirmed film per training epoch.
        seed: the folds' seed.
        n_boot: patient resamples for the intervals.
    """
    from cxr_core.core.errors import ConfigError
    from cxr_core.data.indexing import index_dataset
    from cxr_core.evaluation import evaluate as es
    from cxr_core.evaluation import site_thresholds
    from cxr_core.evaluation.external import stored_threshold_chosen_here
    from cxr_core.models.store import load_single
    from cxr_core.review import queues as review
    from cxr_core.stats.crossfit import cross_fitted_decisions
    from cxr_core.stats.intervals import cluster_ids
    from cxr_core.storage import open_db
    from cxr_core.training import service

    t_all = time.perf_counter()
    os.environ.setdefault("CXR_WORKER", "off")
    site_path = Path(site) if site else Path(shared_data) / "chest_xray_224_external"
    budgets = tuple(sorted({int(b) for b in budgets}))
    db = open_db()
    info = index_dataset(db, site_path, name="bench-site-round", external=True)
    base_eval, _ = es.evaluate_model(db, base, "bench-site-round")  # (a)
    preds = es.load_predictions(db, base_eval)
    ids = [int(i) for i in preds.image_ids]
    y, p_base = preds.y_true, preds.probs[:, 1]
    patients = es.patients_of(db, ids) or [None] * len(ids)
    base_info = _evaluation(db, base_eval)
    stored = float(base_info.metrics.get("threshold", 0.5))
    card = load_single(base, db=db).card
    base_thr, base_note = baseline_threshold(
        card.get("operating_point"), stored, stored_threshold_chosen_here(db, base_info, card))
    base_decisions = (p_base >= base_thr).astype(np.int64)
    state = review.load_state(db, info.dataset_id, base)
    queue = [e.image_id for e in review.build_queue(db, state, "new_site", limit=len(ids))]  # (b)
    next_cfg = _next_config(db, base, config)
    rows = {b: {"site": [], "site_refused": [], "next_own": [], "next_cross": [],
                "base_cross": [], "p_next": [], "scored": [], "wall_s": 0.0} for b in budgets}
    for fold, score_idx in enumerate(_folds(y, patients, folds, seed)):
        scored = set(ids[k] for k in score_idx)
        pool = [i for i in queue if i not in scored]
        sub = np.array(sorted(score_idx))
        fold_clusters = cluster_ids([patients[k] for k in sub], sub.size)
        base_cross, _ = cross_fitted_decisions(y[sub], p_base[sub], fold_clusters, seed=seed)
        confirmed: list[int] = []
        relabels: list[int] = []
        for budget in budgets:
            t0 = time.perf_counter()
            row = rows[budget]
            for image_id in pool[len(confirmed):budget]:  # (b) a reader confirms, in queue order
                rec = preds.image_ids.index(image_id)
                label = preds.labels[int(y[rec])]
                relabels.append(review.submit_relabel(
                    db, image_id=image_id, choice=review.LabelChoice(label, None),
                    reviewer=READER, note="bench: the folder label stands in for a reader"))
                confirmed.append(image_id)
            try:  # (c) the site threshold on the confirmed films (the base's scores)
                cand = site_thresholds.candidate(db, evaluation_id=base_eval, sample="reviewed",
                                                 n_boot=0)
                row["site"].append((p_base[sub] >= cand.threshold).astype(np.int64))
            except ConfigError as exc:
                row["site_refused"].append(str(exc))
            if budget == 0:
                p_next, own = p_base[sub], base_decisions[sub]
            else:  # (d) the next round, from scratch, with the confirmed films
                cfg = service.make_config(db, {**next_cfg, "name": f"site round f{fold} b{budget}",
                                               "extra": [{"dataset": "bench-site-round",
                                                          "images": "reviewed",
                                                          "repeat": repeat}]})
                outcome = service.run_in_process(db, cfg)
                if outcome.status != "finished":
                    raise ConfigError(f"next round (fold {fold}, budget {budget}) "
                                      f"{outcome.status}: {outcome.error}")
                ev_next, _ = es.evaluate_model(db, f"run:{outcome.run_id}", "bench-site-round")
                nxt = es.load_predictions(db, ev_next)  # (e) scored on the unconfirmed films
                order = [nxt.image_ids.index(ids[k]) for k in sub]
                p_next = nxt.probs[order, 1]
                own = (p_next >= _threshold(db, ev_next)).astype(np.int64)
            cross, _ = cross_fitted_decisions(y[sub], p_next, fold_clusters, seed=seed)
            row["next_cross"].append(cross)
            row["base_cross"].append(base_cross)
            row["next_own"].append(own)
            row["p_next"].append(p_next)
            row["scored"].append(sub)
            row["wall_s"] += time.perf_counter() - t0
        for rid in reversed(relabels):  # the next fold starts with nothing confirmed
            review.submit_undo(db, relabel_id=rid, reviewer=READER, note="bench: next fold")
    table = []
    for budget in budgets:
        row = rows[budget]
        sub = np.concatenate(row["scored"])
        ys, cl = y[sub], cluster_ids([patients[k] for k in sub], sub.size)
        entry = {"budget": budget, "n_scored": int(sub.size),
                 "base_stored": _summary(ys, base_decisions[sub], cl, p_base[sub], n_boot),
                 "base_crossfit": _summary(ys, np.concatenate(row["base_cross"], axis=1), cl,
                                           None, n_boot),
                 "next_own": _summary(ys, np.concatenate(row["next_own"]), cl,
                                      np.concatenate(row["p_next"]), n_boot),
                 "next_crossfit": _summary(ys, np.concatenate(row["next_cross"], axis=1), cl,
                                           None, n_boot),
                 "wall_s": round(row["wall_s"], 1)}
        entry["base_site"] = ({"refused": row["site_refused"][0]} if row["site_refused"] else
                              _summary(ys, np.concatenate(row["site"]), cl, None, n_boot))
        table.append(entry)
    last = table[-1]
    baseline, ours = last["base_stored"], last["next_crossfit"]
    return {"bench": "site-round", "site": str(site_path), "base": base,
            "next_config": next_cfg, "folds": folds, "repeat": repeat,
            "base_threshold": {"value": base_thr, "stored": stored, "note": base_note},
            "budgets": table, "baseline": {"what": ("base at its stored threshold"
                                                    if base_note is None else
                                                    "base at its threshold before the site"),
                                           "budget": last["budget"], **baseline},
            "ours": {"what": "next round at a cross-fitted site threshold",
                     "budget": last["budget"], **ours},
            "ratio": (ours["specificity"] / baseline["specificity"]
                      if baseline["specificity"] else None),
            "wall_s": round(time.perf_counter() - t_all, 1)}


if __name__ == "__main__":  # pragma: no cover - python bench/site_round.py SITE
    import sys

    from bench.common import default_shared_data

    print(json.dumps(run(default_shared_data(), site=sys.argv[1] if len(sys.argv) > 1 else None)))
