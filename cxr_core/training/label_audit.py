"""A label audit: which given labels are likely wrong, from out-of-fold probabilities.

Review's disagreement queue compares a label with a model's score on images that model trained
on: it has fitted their label noise, so a wrong label looks right there. An audit scores every
image with a model that never saw it (Northcutt et al., JAIR 2021; cleanlab's documentation asks
for cross-validated probabilities):

1. :func:`start_audit` splits the dataset's labelled images into K class-stratified folds
   grouped by patient and by identical bytes (:func:`cxr_core.data.splits.grouped_folds`),
   stores them with the label each was given (the audit's label snapshot) and queues K
   **ordinary training runs** (``runs.parent`` = ``"audit:ID"``: the per-user caps count an audit once), each
   holding one fold out (``TrainConfig.holdout``); any free worker takes any fold, and a fold
   that fails resumes from its checkpoint like any run.
2. When a fold run finishes, the worker predicts its held-out fold (:func:`record_fold`) and
   stores the probabilities on the audit's rows; when every fold has finished,
   :func:`finalize` runs confident learning (:mod:`cxr_core.stats.confident_learning`) and
   stores the thresholds, the noise matrix and each image's self-confidence and issue rank.
3. Review reads the stored audit through storage (the "likely mislabelled" queue); Class
   balance shows its noise matrix; ``python -m cxr_core label-audit show ID --json`` prints it.

The fold runs' config (:func:`cxr_core.training.service.label_audit_config`) and training
the folds in the CLI's own process (:func:`cxr_core.training.service.train_audit_folds`) sit
in the service: the runner calls this module.

Binary by default: Kermany's bacteria/virus subtypes are a second question.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_core.core import labels as vocab
from cxr_core.core.errors import ConfigError, DatasetError, RunError
from cxr_core.data import provenance
from cxr_core.data.indexing import find_dataset, open_dataset
from cxr_core.data.splits import grouped_folds
from cxr_core.evaluation import evaluate as es
from cxr_core.models import refs
from cxr_core.stats import confident_learning as cl
from cxr_core.storage import AndThen, Database
from cxr_core.storage import datasets as ds_store
from cxr_core.storage import label_audits as store
from cxr_core.storage import runs as run_store
from cxr_core.storage.label_audits import LabelAuditRecord
from cxr_core.storage.relabels import label_version
from cxr_core.training.config import TrainConfig

DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class AuditPlan:
    """What :func:`start_audit` stores: the folds over the snapshot's labels."""

    dataset_id: int
    classes: tuple[str, ...]
    snapshot_hash: str
    snapshot_relabel_id: int | None
    assignments: tuple[tuple[int, int, int], ...]  # (image id, fold, given class index)
    left_out: dict[str, int]  # images without a class in the scheme, by why


def plan_audit(db: Database, cfg: TrainConfig, *, folds: int, seed: int) -> AuditPlan:
    """The K folds of the dataset's labelled images under the config's scheme and labels (now).

    Raises:
        ConfigError, DatasetError: bad ``folds``, too few patients or classes.
    """
    from cxr_core.training.inputs import unlabelled_reasons

    info, records = open_dataset(db, cfg.dataset)
    with db.session() as s:
        version = label_version(session=s, dataset_id=info.id,
                                as_of_relabel_id=provenance.as_of_relabel_id(cfg.label_source))
    classes = vocab.scheme_classes(cfg.label_scheme, info.classes)
    names = [vocab.scheme_label(*version.labels.get(r.id, (r.label, r.subtype)),
                                cfg.label_scheme) for r in records]
    names = [n if n in classes else None for n in names]
    present = {n for n, r in zip(names, records) if n is not None and r.split != "test"}
    if len(present) < 2:
        raise DatasetError(f"an audit needs images of at least 2 classes of {list(classes)}. "
                           f"Received: {sorted(present)} in dataset {info.name!r}")
    fold_of = grouped_folds(records, names, folds=folds, seed=seed)
    by_id = {r.id: n for r, n in zip(records, names)}
    assignments = tuple((i, k, classes.index(by_id[i])) for i, k in sorted(fold_of.items()))
    snap = version.snapshot()
    return AuditPlan(info.id, tuple(classes), snap.hash, snap.newest_relabel_id, assignments,
                     unlabelled_reasons(cfg, info, records, version.labels))


def start_audit(db: Database, cfg: TrainConfig, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                created_by: str | None = None,
                and_then: AndThen | None = None) -> tuple[int, list[int]]:
    """Store the audit (its folds and given labels) and queue its K fold runs, in one
    transaction (``and_then(session, audit_id)`` in it: the audit row of the action).

    Returns:
        (the audit id, the fold runs' ids by fold).
    """
    plan = plan_audit(db, cfg, folds=folds, seed=seed)
    base = {k: v for k, v in cfg.to_dict().items() if k != "holdout"}

    def write(s) -> tuple[int, list[int]]:
        audit_id = store.create_audit(
            session=s, dataset_id=plan.dataset_id, label_scheme=cfg.label_scheme,
            label_source=cfg.label_source, labels=plan.classes, folds=folds, seed=seed,
            config=base, snapshot_hash=plan.snapshot_hash,
            snapshot_relabel_id=plan.snapshot_relabel_id, assignments=plan.assignments,
            created_by=created_by)
        run_ids = []
        for k in range(folds):
            fold_cfg = TrainConfig.from_dict({**base, "holdout": {"audit": audit_id, "fold": k,
                                                                  "folds": folds}})
            run_ids.append(run_store.create_run(
                session=s, name=f"audit {audit_id} fold {k + 1}/{folds}",
                config=fold_cfg.to_dict(), created_by=created_by, parent=parent_of(audit_id)))
        return audit_id, run_ids

    audit_id, run_ids = db.write(write, and_then=(
        None if and_then is None else lambda s, out: and_then(s, out[0])))
    return audit_id, run_ids


def parent_of(audit_id: int) -> str:
    """The ``runs.parent`` of an audit's fold runs (the per-user caps count a parent once)."""
    return store.parent_of(audit_id)


def snapshot_relabel_id(db: Database, audit_id: int) -> int:
    """The relabel id a fold run reads its labels as of: the audit's (0: the originals)."""
    with db.session() as s:
        return store.require_audit(session=s, audit_id=audit_id).snapshot_relabel_id or 0


def record_fold(db: Database, run_id: int, cfg: TrainConfig, prepared: Any) -> int:
    """Predict a finished fold run's held-out fold with its model and store the probabilities
    on the audit's rows; returns how many images were scored (unreadable ones are not).

    Raises:
        RunError: the model's classes are not the audit's.
    """
    fold = cfg.holdout
    with db.session() as s:
        audit = store.require_audit(session=s, audit_id=fold.audit)
        info = ds_store.get_dataset(session=s, name_or_id=prepared.dataset_id)
    loaded = refs.load_model_ref(f"run:{run_id}", db=db)
    if tuple(loaded.labels) != audit.labels:
        raise RunError(f"fold run {run_id} predicts {list(loaded.labels)}; audit "
                       f"{audit.id} scores {list(audit.labels)}")
    records = list(prepared.holdout)
    if not records:
        return 0
    cache, kept = es._cache(info, records, [0] * len(records), loaded, None)
    probs = es._predict_cache(loaded, cache, None)
    scored = {r.id: p for r, p in zip(kept, probs)}
    db.write(lambda s: store.set_fold_probs(session=s, audit_id=audit.id, run_id=run_id,
                                            probs=scored))
    return len(scored)


def finalize(db: Database, audit_id: int) -> LabelAuditRecord:
    """Confident learning over the stored out-of-fold probabilities once every fold run has
    finished (idempotent: the first caller stores it, others read it). An audit with a failed
    or cancelled fold stays running, with the reason noted, until that fold is resumed.

    Returns:
        The audit as stored now.
    """
    with db.session() as s:
        audit = store.require_audit(session=s, audit_id=audit_id)
        runs = store.fold_runs(session=s, audit_id=audit_id)
    if audit.status != "running":
        return audit
    stuck = [f for f in runs if f.status in ("failed", "cancelled")]
    note = ("; ".join(f"fold {f.fold + 1} (run {f.run_id}) {f.status}: resume it "
                      "(python -m cxr_core label-audit resume "
                      f"{audit_id})" for f in stuck) or None)
    if note != audit.error:
        db.write(lambda s: store.set_audit_error(session=s, audit_id=audit_id, error=note))
    if len(runs) < audit.folds or any(f.status != "finished" for f in runs):
        with db.session() as s:
            return store.require_audit(session=s, audit_id=audit_id)
    with db.session() as s:
        images = store.audit_images(session=s, audit_id=audit_id)
    result, scores = confident_learning(audit, images)
    db.write(lambda s: store.finish_audit(session=s, audit_id=audit_id, result=result,
                                          scores=scores))
    with db.session() as s:
        return store.require_audit(session=s, audit_id=audit_id)


def confident_learning(audit: LabelAuditRecord,
                       images: list[store.AuditImage]) -> tuple[dict, dict]:
    """(the audit's result, image id -> (self-confidence, suggested class, rank or None))."""
    scored = [r for r in images if r.probs is not None]
    if not scored:
        raise RunError(f"audit {audit.id}: no image has out-of-fold probabilities")
    y = np.array([r.given for r in scored], dtype=np.int64)
    p = np.array([r.probs for r in scored], dtype=float)
    found = cl.find_label_issues(y, p)
    rank = found.rank_of()
    labels = list(audit.labels)
    by_given = Counter(labels[y[i]] for i in found.ranked)
    result = {
        "thresholds": {c: float(t) for c, t in zip(labels, found.thresholds)},
        "noise_matrix": {"labels": labels, "matrix": found.noise.round(6).tolist()},
        "joint": {"labels": labels, "matrix": found.joint.tolist()},
        "n_scored": len(scored), "n_unscored": len(images) - len(scored),
        "n_issues": found.n_issues, "issues_by_given": {c: by_given.get(c, 0) for c in labels},
        "given_counts": {c: int((y == k).sum()) for k, c in enumerate(labels)},
    }
    if len(labels) == 2 and len(set(y.tolist())) == 2:
        from sklearn.metrics import roc_auc_score

        result["oof_auc"] = float(roc_auc_score(y == 1, p[:, 1]))
    scores = {r.image_id: (float(found.self_confidence[i]), int(found.suggested[i]),
                           int(rank[i]) or None) for i, r in enumerate(scored)}
    return result, scores


def audit_json(db: Database, audit_id: int, *, top: int | None = None) -> dict:
    """The audit as the CLI prints it: the issue's object (``issues`` ranked most likely
    wrong first; ``top`` of them), plus its status and fold runs."""
    with db.session() as s:
        audit = store.require_audit(session=s, audit_id=audit_id)
        runs = store.fold_runs(session=s, audit_id=audit_id)
        info = find_dataset(db, audit.dataset_id)
        found = store.issues(session=s, audit_id=audit_id, limit=top) \
            if audit.status == "finished" else []
    res = audit.result or {}
    labels = list(audit.labels)
    return {
        "audit_id": audit.id, "dataset": info.name if info else audit.dataset_id,
        "label_scheme": audit.label_scheme, "labels": labels, "folds": audit.folds,
        "label_source": audit.label_source,
        "snapshot": {"hash": audit.snapshot_hash, "relabel_id": audit.snapshot_relabel_id},
        "n_images": audit.n_images, "thresholds": res.get("thresholds"),
        "noise_matrix": res.get("noise_matrix"),
        "issues": [{"path": r.relpath, "image_id": r.image_id, "patient": r.patient,
                    "given": labels[r.given],
                    "suggested": labels[r.suggested] if r.suggested is not None else None,
                    "score": r.self_confidence, "rank": r.issue_rank} for r in found],
        "status": audit.status, "n_issues": res.get("n_issues"),
        "issues_by_given": res.get("issues_by_given"), "oof_auc": res.get("oof_auc"),
        "n_scored": res.get("n_scored"), "error": audit.error, "seed": audit.seed,
        "config": audit.config, "created_by": audit.created_by,
        "fold_runs": [{"fold": f.fold, "run_id": f.run_id, "status": f.status,
                       "epochs": f.epochs_done, "error": f.error} for f in runs],
    }


def list_audits(db: Database, dataset_id: int | None = None, *,
                finished: bool = False) -> list[LabelAuditRecord]:
    """Stored audits (of one dataset), newest first."""
    with db.session() as s:
        return store.list_audits(session=s, dataset_id=dataset_id,
                                 status="finished" if finished else None)


def resumable_folds(db: Database, audit_id: int) -> list[int]:
    """The audit's fold runs that failed or were cancelled (each resumes from its checkpoint)."""
    with db.session() as s:
        store.require_audit(session=s, audit_id=audit_id)
        return [f.run_id for f in store.fold_runs(session=s, audit_id=audit_id)
                if f.status in ("failed", "cancelled")]


def check_folds(folds: Any) -> int:
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= 20:
        raise ConfigError(f"folds must be an integer from 2 to 20. Received: --folds {folds!r}")
    return folds
