"""Export a finished training run as the shipped demo model (``models/default``).

``python -m cxr_core.training.export export-default RUN_ID`` (see ``models/default/README.md``):
the run's model without optimizer state, its card made shippable (data licence, operating point,
paths relative to the repository) and that card for people (:mod:`cxr_core.models.card`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_core.core.errors import CxrError, DatasetError, ModelError
from cxr_core.models import refs
from cxr_core.models.card import DATA_LICENCE, card_markdown
from cxr_core.models.store import CARD_NAME, DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR, LoadedModel
from cxr_core.storage import Database, open_db
from cxr_core.storage import evals as eval_store
from cxr_core.storage import runs as run_store
from cxr_core.training.config import RECIPE_SELECTED_ON

DEFAULT_MAX_MB = 15.0  # the shipped demo model must stay small enough for the repository


def export_default(run_id: int, *, db: Database | None = None,
                   out_dir: str | Path = DEFAULT_MODELS_DIR,
                   max_mb: float = DEFAULT_MAX_MB, site_dataset: str | None = None,
                   notes: Sequence[str] = ()) -> dict:
    """Export a finished run as the shipped demo model (``models/default``).

    Re-saves the run's ``best.keras`` without optimizer state as ``model.keras`` and writes
    ``model_card.json`` (the run's card with the data licence, the run's newest operating
    point, validation metrics, the ``measured`` list of every split it was evaluated on,
    training time, and paths made relative to the repository) and
    ``README.md`` (the card for people).

    Args:
        run_id: a finished run with ``best.keras`` and ``model_card.json`` in its artifacts.
        db: the database of the run (for its status, timing and operating point).
        out_dir: destination folder.
        max_mb: refuse models larger than this (the repository's limit).
        site_dataset: ship the site threshold chosen on this (external) dataset's whole
            labelled sample as the stored operating point (recorded for the run there); every
            figure of the card is then re-scored at it, and the external figures on that
            dataset are the cross-fitted ones only.
        notes: plain sentences the card (and its README) carries.

    Returns:
        The written card.

    Raises:
        ModelError: the run is not finished, has no model or card, or the model is too large.
    """
    db = db or open_db()
    with db.session() as s:
        run = run_store.get_run(session=s, run_id=run_id)
    if run is None or run.status != "finished":
        raise ModelError(f"only a finished run can be exported. Received: run {run_id} is "
                         f"{'unknown' if run is None else run.status}")
    from cxr_core.evaluation.card_measured import refresh_run_card

    refresh_run_card(db, run_id)  # "measured": every evaluation of the run up to now
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    if not loaded.card:
        raise ModelError(f"run {run_id} has no {CARD_NAME} in its artifacts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{DEFAULT_MODEL_NAME}"
    loaded.model.save(tmp)  # loaded with compile=False: no optimizer state (smaller file)
    size_mb = tmp.stat().st_size / 2**20
    if size_mb > max_mb:
        tmp.unlink()
        raise ModelError(f"run {run_id}'s model is {size_mb:.1f} MB; the shipped default must "
                         f"be at most {max_mb} MB")
    os.replace(tmp, out / DEFAULT_MODEL_NAME)
    card = _export_card(loaded, run, size_mb)
    if site_dataset:
        _ship_site_threshold(db, run_id, card, site_dataset)
    card["measured"] = [{k: v for k, v in e.items() if k != "evaluation_id"}  # local ids
                        for e in card.get("measured") or []]
    card["recipe_selected_on"] = list(RECIPE_SELECTED_ON.get(card.get("recipe"), ()))
    card["notes"] = list(notes)
    with db.session() as s:  # so an evaluation anywhere can warn of what it has seen
        card["training_patients"] = eval_store.run_patients(session=s, run_id=run_id)
        card["training_sha256"] = eval_store.run_image_hashes(session=s, run_id=run_id)
    (out / CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "README.md").write_text(card_markdown(card))
    return card


def _export_card(loaded: LoadedModel, run: Any, size_mb: float) -> dict:
    """The run's card made shippable: local ids moved under "exported_from", paths relative."""
    card = {k: v for k, v in loaded.card.items()
            if k not in ("run_id", "model_ref", "evaluation_id", "model_file")}
    op = dict(card.get("operating_point") or {})
    if loaded.threshold is not None:
        op["threshold"] = loaded.threshold
    seconds = (run.finished_at - run.started_at).total_seconds() \
        if run.started_at and run.finished_at else None
    cfg = dict(card.get("training_config") or {})
    if cfg.get("dataset"):
        cfg["dataset"] = _repo_relative(cfg["dataset"])
    dataset = dict(card.get("dataset") or {})
    if dataset.get("root"):
        dataset["root"] = _repo_relative(dataset["root"])
    dataset.pop("id", None)
    card.update(
        model_file=DEFAULT_MODEL_NAME, labels=list(loaded.labels),
        label_scheme=loaded.label_scheme, image_size=loaded.image_size,
        channels=loaded.channels, saliency_layer=loaded.saliency_layer, operating_point=op,
        recipe=cfg.get("recipe"), training_config=cfg, dataset=dataset,
        data_licence=DATA_LICENCE,
        measured=list(card.get("measured") or []),
        exported_from={"run_id": run.id, "run_name": run.name,
                       "evaluation_id": loaded.card.get("evaluation_id"),
                       "training_wall_s": None if seconds is None else round(seconds),
                       "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "file_mb": round(size_mb, 2)})
    return card


def _ship_site_threshold(db: Database, run_id: int, card: dict, dataset: str) -> None:
    """Record the site threshold of the run on ``dataset``'s whole labelled sample and make it
    the card's operating point; re-score the card's figures at it."""
    from cxr_core.evaluation import site_thresholds
    from cxr_core.evaluation.card_measured import at_threshold

    evals = [e for e in site_thresholds.site_evaluations(db, f"run:{run_id}", _dataset_id(
        db, dataset)) if len(e.labels) == 2]
    if not evals:
        raise DatasetError(f"run {run_id} has no evaluation on {dataset!r}: evaluate it there "
                           "first (python -m cxr_core evaluate --model run:ID --data NAME)")
    cand = site_thresholds.candidate(db, evaluation_id=evals[0].id, sample="all")
    op = site_thresholds.record(db, cand, changed_by="export-default",
                                note=f"shipped operating point: the site threshold of {dataset}")
    previous = (card.get("operating_point") or {}).get("threshold")
    card["operating_point"] = {
        "threshold": op.threshold, "method": op.method, "target": op.target,
        "chosen_on": "site", "dataset": dataset, "sample_n": cand.n,
        "cross_fitted": cand.cross_fitted, "global_threshold": previous}
    card["measured"] = at_threshold(db, card.get("measured") or [], op.threshold,
                                    chosen_on="site", dataset=dataset)


def _dataset_id(db: Database, name: str) -> int:
    from cxr_core.data.indexing import find_dataset

    info = find_dataset(db, name)
    if info is None:
        raise DatasetError(f"no dataset {name!r} is indexed")
    return info.id


def stress_default(evaluation_id: int, *, db: Database | None = None,
                   out_dir: str | Path = DEFAULT_MODELS_DIR) -> dict:
    """Run the shift stress test of the model in ``out_dir`` on a stored evaluation's images
    (e.g. a run's temporal ``val`` part, which chose neither model nor threshold), and keep it
    in that model's card (``stress``) and README. Returns the card entry."""
    from cxr_core.evaluation import stress
    db = db or open_db()
    out = Path(out_dir)
    ref = "default" if out.resolve() == DEFAULT_MODELS_DIR.resolve() else \
        str(out / DEFAULT_MODEL_NAME)
    with db.session() as s:
        info = eval_store.get_evaluation(session=s, evaluation_id=evaluation_id)
    if info is None:
        raise DatasetError(f"no evaluation with id {evaluation_id}")
    rows = stress.stress_evaluation(db, ref, evaluation_id)
    entry = stress.card_entry(rows, evaluation_id=evaluation_id, split=info.split,
                                    dataset=info.dataset_name or "")
    card_path = out / "model_card.json"
    card = json.loads(card_path.read_text())
    card["stress"] = entry
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(card_markdown(card))
    return entry


def export_three_class(pneumonia: str, subtype_run: int, *, db: Database | None = None,
                       out_dir: str | Path | None = None, external: str | None = None,
                       site_prior: bool = False, notes: Sequence[str] = (),
                       n_boot: int = 500) -> dict:
    """Ship the two-step three-class model (``models/three_class``, ref ``three_class``).

    ``pneumonia/``: the pneumonia step, ``"default"`` (a copy of the shipped binary model, so
    the three-class model stays what was measured when the default is re-shipped) or
    ``"run:ID"`` (exported as for the default, with ``external``'s site threshold). ``subtype/``:
    the subtype run. ``model_card.json`` and ``README.md``: the composite's card, with its
    figures on ``external`` **cross-fitted** (the pneumonia threshold, and with ``site_prior``
    the subtype prior, chosen on other patients' films than the ones scored), beside the flat
    argmax of the same probabilities at the stored rule.

    Args:
        pneumonia: "default" or "run:ID" (a binary run).
        subtype_run: a finished run with label scheme ``subtype``.
        db: the database of the runs.
        out_dir: destination (default ``models/three_class``).
        external: an indexed external dataset to measure it on (its films carry the subtype).
        site_prior: ship the subtype prior of ``external``'s labelled pneumonia films as the
            subtype step's target prior (then its figures there are cross-fitted for it too).
        notes: plain sentences the card carries.
        n_boot: patient resamples for the intervals.

    Raises:
        ModelError: a step of the wrong kind, or a run that is not finished.
        DatasetError: ``external`` is not indexed.
    """
    import shutil

    from cxr_core.core.labels import THREE_CLASSES
    from cxr_core.models import hierarchy
    from cxr_core.models.card import three_class_markdown
    from cxr_core.models.store import parse_run_ref
    from cxr_core.stats import three_class as tc
    from cxr_core.stats.priors import estimate_prior

    db = db or open_db()
    out = Path(out_dir) if out_dir is not None else hierarchy.SHIPPED_DIR
    step1 = out / "pneumonia"
    if pneumonia == "default":
        step1.mkdir(parents=True, exist_ok=True)
        for name in (DEFAULT_MODEL_NAME, CARD_NAME, "README.md"):
            shutil.copyfile(DEFAULT_MODELS_DIR / name, step1 / name)
    elif (run_id := parse_run_ref(pneumonia)) is not None:
        export_default(run_id, db=db, out_dir=step1, site_dataset=external)
    else:
        raise ModelError(f"the pneumonia step is 'default' or 'run:ID'. Received: {pneumonia!r}")
    sub_card = export_default(subtype_run, db=db, out_dir=out / "subtype")
    if sub_card.get("label_scheme") != "subtype":
        raise ModelError(f"run {subtype_run} is not a subtype run (label scheme "
                         f"{sub_card.get('label_scheme')!r})")
    measured = []
    if external:
        _dataset_id(db, external)  # indexed, else a clear error
        loaded = hierarchy.load_hierarchical(hierarchy.SHIPPED, models_dir=out)
        y, probs, groups = _evaluate_loaded(db, loaded, external)
        at = (loaded.members[1].priors or {}).get("target")  # the probabilities' subtype prior
        if site_prior:  # the site's own subtype mix, from its labelled pneumonia films
            pri = sub_card["priors"]
            pri.update(target=[round(float(v), 6) for v in estimate_prior(y[y > 0] - 1, 2)],
                       target_source=f"{external}'s labelled pneumonia films")
            (out / "subtype" / CARD_NAME).write_text(json.dumps(sub_card, indent=2,
                                                                default=str) + "\n")
        fitted = tc.cross_fitted(y, probs, "hierarchical", groups=groups,
                                 choose_prior=site_prior, train_prior=at, n_boot=n_boot)
        flat = tc.report(y, probs, "flat", groups=groups, n_boot=n_boot)
        measured = [{"dataset": external, "role": "external", "n": int(len(y)),
                     "patients": len({g for g in groups if g}),
                     "hierarchical_crossfit": fitted.to_dict(),
                     "argmax_at_training_priors": flat.to_dict()}]
    card = {"name": "three-class demo model (two steps)", "kind": "hierarchical",
            "labels": list(THREE_CLASSES), "label_scheme": "three_class",
            "steps": {"pneumonia": pneumonia, "subtype": f"run:{subtype_run}"},
            "decision": "NORMAL unless P(pneumonia) reaches the pneumonia step's operating "
                        "point; then the more probable subtype at the subtype step's target "
                        "prior",
            "measured": measured, "notes": list(notes), "data_licence": DATA_LICENCE,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "README.md").write_text(three_class_markdown(card, hierarchy.load_hierarchical(
        hierarchy.SHIPPED, models_dir=out)))
    return card


def _evaluate_loaded(db: Database, loaded: LoadedModel, dataset: str):
    """(y 0/1/2, probabilities, patients) of a loaded three-class model on a dataset."""
    from cxr_core.evaluation import evaluate as es

    ev_id, _ = es.evaluate_loaded(db, loaded, dataset)
    preds = es.load_predictions(db, ev_id)
    return (np.asarray(preds.y_true), np.asarray(preds.probs),
            es.patients_of(db, list(preds.image_ids)) or [None] * len(preds.image_ids))


def _repo_relative(path: str) -> str:
    """A path relative to the repository when it is absolute (the card is shipped)."""
    p = Path(path)
    return os.path.relpath(p, DEFAULT_MODELS_DIR.parents[1]) if p.is_absolute() else path


def size_default(out_dir: str | Path = DEFAULT_MODELS_DIR) -> dict:
    """Record the shipped model's parameter counts (total, trainable) in its card and README
    (a run's card has them from training; a card exported before issue 27 gets them here)."""
    from cxr_core.models import graph, layers

    out = Path(out_dir)
    card_path = out / CARD_NAME
    card = json.loads(card_path.read_text())
    model = layers.load_model(out / card.get("model_file", DEFAULT_MODEL_NAME))
    card["parameters"] = graph.parameter_counts(model)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(card_markdown(card))
    return card["parameters"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cxr_core.training.export export-default RUN_ID``: export a run as the demo model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxr_core.training.export")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export-default", help="export a finished run to models/default")
    p.add_argument("run_id", type=int)
    p.add_argument("--out", default=str(DEFAULT_MODELS_DIR))
    p.add_argument("--site-threshold", default=None, metavar="DATASET",
                   help="ship the site threshold chosen on this external dataset")
    p.add_argument("--note", action="append", default=[], help="a sentence for the card")
    p = sub.add_parser("stress-default", help="keep the shift stress test of models/default "
                       "(on a stored evaluation's images) in its card")
    p.add_argument("evaluation_id", type=int)
    p.add_argument("--out", default=str(DEFAULT_MODELS_DIR))
    p = sub.add_parser("size-default", help="record the parameter counts of models/default in "
                       "its card")
    p.add_argument("--out", default=str(DEFAULT_MODELS_DIR))
    p = sub.add_parser("export-three-class", help="ship the two-step three-class model to "
                       "models/three_class")
    p.add_argument("--pneumonia", default="default", help="'default' or run:ID (binary)")
    p.add_argument("--subtype", type=int, required=True, help="a subtype run's id")
    p.add_argument("--external", default=None, metavar="DATASET",
                   help="measure it there (cross-fitted); a run:ID pneumonia step ships that "
                        "dataset's site threshold")
    p.add_argument("--site-prior", action="store_true",
                   help="decide the subtype at the external dataset's labelled subtype mix")
    p.add_argument("--out", default=None)
    p.add_argument("--note", action="append", default=[], help="a sentence for the card")
    args = parser.parse_args(argv)
    try:
        if args.command == "export-three-class":
            card = export_three_class(args.pneumonia, args.subtype, out_dir=args.out,
                                      external=args.external, site_prior=args.site_prior,
                                      notes=args.note)
            print(json.dumps({"exported": args.out or "models/three_class",
                              "measured": card["measured"]}))
            return 0
        if args.command == "size-default":
            print(json.dumps(size_default(args.out)))
            return 0
        if args.command == "stress-default":
            print(json.dumps(stress_default(args.evaluation_id, out_dir=args.out)))
            return 0
        card = export_default(args.run_id, out_dir=args.out, site_dataset=args.site_threshold,
                              notes=args.note)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": str(Path(args.out) / DEFAULT_MODEL_NAME),
                      "val_metrics": card.get("val_metrics"),
                      "operating_point": card.get("operating_point")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
