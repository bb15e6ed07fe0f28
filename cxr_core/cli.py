"""Command line: the same functions the pages call. A stable contract (see DESIGN.md).

With ``--json`` each command prints exactly one JSON object on stdout; errors go to stderr
as one line with a non-zero exit (a traceback only with ``--debug``). Progress goes to stderr.

``relabel add|import|list`` writes and reads relabels with the review page's writers
(:mod:`cxr_core.review.relabel_import`); ``import`` writes every row of its CSV in one transaction, or
none.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cxr_core.core.errors import ConfigError, CxrError

REPO = Path(__file__).resolve().parents[1]  # cxr_core/cli.py -> the repository
BENCHES = ("index", "pages", "pipeline", "features", "predict", "training", "scale",
           "site-round", "label-noise")


def _progress(label: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\r{label}: {done}/{total}", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)
    return report


@contextmanager
def _audited(action: str, target: str = "", **detail) -> Iterator[None]:
    """The CLI acts as its configured local principal (CXR_CLI_IDENTITY, CXR_CLI_ROLES):
    checked against the policy, then recorded as ``started`` before the work and ``ok`` or
    ``failed`` (with why) after it, so the log never says ok for work that failed."""
    from cxr_core.app import open_db
    from cxr_core.auth import gate
    from cxr_core.auth.policy import cli_principal

    db, p = open_db(), cli_principal()
    gate.authorize(db, p, action, target)
    gate.record(db, p, action, target, outcome="started", detail=detail)
    try:
        yield
    except BaseException as exc:
        gate.record(db, p, action, target, outcome="failed",
                    detail={**detail, "why": f"{type(exc).__name__}: {exc}"[:500]})
        raise
    gate.record(db, p, action, target, detail=detail)


def cmd_index(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.core import data_roots
    from cxr_core.data.indexing import index_dataset

    data_roots.check_path(args.path, roots=data_roots.allowed_roots())
    with _audited("index_dataset", str(args.path), name=args.name, external=args.external):
        report = index_dataset(open_db(), args.path, name=args.name,
                               progress=_progress("scan"), external=args.external)
    for problem in [*report.warnings, *report.problems[:20]]:
        print(f"warning: {problem}", file=sys.stderr)
    return report.to_json()


def cmd_fetch_kermany(args: argparse.Namespace) -> dict:
    """Download (resumably), unpack, check and index the full public release."""
    from cxr_core.app import open_db
    from cxr_core.core import data_roots
    from cxr_core.data.fetch import URL, fetch_kermany
    from cxr_core.data.indexing import index_dataset

    data_roots.check_path(args.out, roots=data_roots.allowed_roots())
    with _audited("index_dataset", str(args.out), fetch=args.url or URL):
        got = fetch_kermany(args.out, url=args.url or URL, progress=_progress("fetch"))
        report = index_dataset(open_db(), got["root"], name=args.name,
                               progress=_progress("scan"))
    return {**got, "index": report.to_json()}


def cmd_backup(args: argparse.Namespace) -> dict:
    from cxr_core import app

    with _audited("backup", str(args.out)):
        return app.backup(args.out)


def cmd_cleanup(args: argparse.Namespace) -> dict:
    """Retention now: uploads nothing refers to and exports older than CXR_RETENTION_DAYS*
    (admin role; workers also run it once a day)."""
    from cxr_core import app

    with _audited("cleanup", "uploads+exports", dry_run=args.dry_run):
        return app.cleanup(dry_run=args.dry_run)


def cmd_restore(args: argparse.Namespace) -> dict:
    """Checked before (the policy: no database to read yet), audited after, in the restored
    database."""
    from cxr_core import app
    from cxr_core.auth import gate, policy

    p = policy.cli_principal()
    policy.require(p, "backup", target=str(args.src))
    out = app.restore(args.src, force=args.force)
    gate.record(app.open_db(), p, "backup", str(args.src),
                detail={"restore": True, "force": args.force})
    return out


def cmd_bench(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    module = importlib.import_module(f"bench.{args.name.replace('-', '_')}")
    data = Path(args.data or os.environ.get("CXR_SHARED_DATA") or REPO.parent / "shared" / "data")
    if args.name == "label-noise":
        return module.run(data, flip=args.flip, images=args.images, config=args.config,
                          **({} if args.folds is None else {"folds": args.folds}))
    if args.name != "site-round":
        return module.run(data)
    options = {"site": args.site, "base": args.base, "config": args.config,
               "folds": 3 if args.folds is None else args.folds, "repeat": args.repeat}
    if args.budgets:
        try:
            options["budgets"] = tuple(int(b) for b in args.budgets.split(","))
        except ValueError as exc:
            raise ConfigError("--budgets is a comma-separated list of film counts, e.g. "
                              f"0,25,50. Received: {args.budgets!r}") from exc
    return module.run(data, **options)


def train_cli(config_path: str | Path, *, detach: bool = False,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """``python -m cxr_core train --config FILE``: train to the end, or only queue, as the
    CLI's principal (CXR_CLI_IDENTITY/CXR_CLI_ROLES): the pages' checks (role, run limits,
    quota), owner and audit row (:mod:`cxr_core.auth.gate`).

    Returns:
        ``{"run_id", "status", "epochs", "val"}`` (+ ``"error"`` when it failed), or
        ``{"run_id", "status": "queued"}`` with ``detach`` (a worker is started if none runs).
    """
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.training import actions as training_actions
    from cxr_core.training.service import make_config, read_config_file

    path = Path(config_path).expanduser()
    db, p = open_db(), cli_principal()
    cfg = make_config(db, read_config_file(path), base_dir=path.parent)
    if detach:
        run_id, _ = training_actions.start_run(db, p, cfg)
        return {"run_id": run_id, "status": "queued"}
    return training_actions.train_here(db, p, cfg, progress=progress).to_json()


def cmd_train(args: argparse.Namespace) -> dict:
    # checked, limited and audited as the CLI principal inside (cxr_core.auth.gate)
    return train_cli(args.config, detach=args.detach, progress=_progress("train"))


def cmd_label_audit(args: argparse.Namespace) -> dict:
    """Start a label audit (K fold runs) as the CLI principal, then train its folds here (one
    more worker) unless --detach; prints the audit (the issues once every fold finished)."""
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.training import actions as training_actions
    from cxr_core.training import label_audit
    from cxr_core.training import service as training_service
    from cxr_core.training.service import read_config_file

    if not args.dataset:
        raise ConfigError("label-audit needs --dataset NAME (or: label-audit show ID, "
                          "label-audit resume ID)")
    db, p = open_db(), cli_principal()
    path = Path(args.config).expanduser() if args.config else None
    cfg = training_service.label_audit_config(
        db, args.dataset, read_config_file(path) if path else None,
        label_scheme=args.label_scheme, label_source=args.labels,
        base_dir=path.parent if path else None)
    audit_id, _ = training_actions.start_label_audit(db, p, cfg, folds=args.folds,
                                                     seed=args.seed, start_worker=args.detach)
    if args.detach:
        return {**label_audit.audit_json(db, audit_id, top=args.top), "status": "queued"}
    return _audit_outcome(db, audit_id, args.top)


def _audit_outcome(db, audit_id: int, top: int | None) -> dict:
    """Train the audit's queued folds in this process, then its JSON (status "failed" when a
    fold did not finish: resume it)."""
    from cxr_core.training import label_audit
    from cxr_core.training import service as training_service

    training_service.train_audit_folds(db, audit_id, progress=_progress("fold epochs"))
    out = label_audit.audit_json(db, audit_id, top=top)
    if out["status"] != "finished":
        for f in out["fold_runs"]:
            if f["status"] != "finished":
                print(f"warning: fold {f['fold'] + 1} (run {f['run_id']}) {f['status']}: "
                      f"{f['error'] or ''}", file=sys.stderr)
        out["status"] = "failed"
    return out


def cmd_label_audit_show(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.training import label_audit

    db = open_db()
    label_audit.finalize(db, args.audit_id)  # a finished audit nobody finalized yet
    return label_audit.audit_json(db, args.audit_id, top=args.top)


def cmd_label_audit_resume(args: argparse.Namespace) -> dict:
    """Resume an audit's failed or cancelled folds (each from its checkpoint)."""
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.training import actions as training_actions
    from cxr_core.training import label_audit

    db = open_db()
    resumed = training_actions.resume_label_audit(db, cli_principal(), args.audit_id,
                                                  start_worker=args.detach)
    if not resumed:
        print(f"warning: audit {args.audit_id} has no failed or cancelled fold",
              file=sys.stderr)
    if args.detach:
        return {**label_audit.audit_json(db, args.audit_id, top=args.top), "status": "queued",
                "resumed_runs": resumed}
    return {**_audit_outcome(db, args.audit_id, args.top), "resumed_runs": resumed}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from cxr_core.evaluation.evaluate import evaluate_cli

    with _audited("evaluate", str(args.model), data=args.data, split=args.split):
        out = evaluate_cli(args.model, args.data, split=args.split, labels=args.labels)
    for warning in out["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return out


def cmd_stress(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.evaluation import stress

    db = open_db()
    if (args.run is None) == (args.evaluation is None):
        raise ConfigError("stress needs exactly one of --run ID (its validation images) or "
                          "--evaluation ID")
    ev_id = args.evaluation or stress.run_val_evaluation(db, args.run, args.split)
    model = args.model or f"run:{args.run}"
    rows = stress.stress_evaluation(db, model, ev_id, names=args.only, tta=args.tta)
    return {"model": model, "evaluation_id": ev_id, "tta": args.tta, **stress.summary(rows)}


def cmd_site_calibrate(args: argparse.Namespace) -> dict:
    """Compare → Site threshold from the command line: the candidate (always printed), and
    with --record the operating point for that dataset, recorded as the CLI principal."""
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.evaluation import actions as evaluation_actions
    from cxr_core.evaluation import site_thresholds

    db = open_db()
    cand = site_thresholds.candidate(db, evaluation_id=args.evaluation, sample=args.sample,
                        labels=args.labels, method=args.method, target=args.target,
                        n_boot=args.n_boot)
    out: dict = {"candidate": cand.to_json(), "recorded": None}
    if args.record:
        op = evaluation_actions.record_site_threshold(db, cli_principal(), cand, note=args.note)
        out["recorded"] = {"model_ref": op.model_ref, "dataset_id": op.dataset_id,
                           "threshold": op.threshold, "changed_by": op.changed_by}
    return out


def cmd_predict(args: argparse.Namespace) -> dict:
    from cxr_core.predict.cli import predict_cli

    return predict_cli(args.model, args.images, saliency=args.saliency, out_dir=args.out)


def cmd_worker(args: argparse.Namespace) -> dict:
    if args.gpu is not None:  # before TensorFlow is imported: it reads the variable once
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    from cxr_core.app import run_worker

    return run_worker(once=args.once, idle_exit_s=args.idle_exit, kinds=args.kinds)


def cmd_relabel_add(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.review import actions as review_actions
    from cxr_core.review.relabel_import import relabel_json

    p = cli_principal()
    if args.reviewer is not None and args.reviewer != p.identity:
        raise ConfigError(f"relabels are recorded as the CLI's identity ({p.identity!r}, "
                          "CXR_CLI_IDENTITY), never a typed name: set CXR_CLI_IDENTITY to "
                          f"relabel as someone else. Received: --reviewer {args.reviewer!r}")
    rec = review_actions.relabel_path(open_db(), p, dataset=args.dataset, relpath=args.path,
                               label=args.label, subtype=args.subtype, note=args.note)
    return relabel_json(rec, args.dataset)


def cmd_relabel_import(args: argparse.Namespace) -> dict:
    """Every row recorded as the CLI's identity (a CSV ``reviewer`` column is kept only as a
    note), the audit row in the import's own transaction."""
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.review import actions as review_actions

    p = cli_principal()
    if args.reviewer is not None and args.reviewer != p.identity:
        raise ConfigError(f"relabels are recorded as the CLI's identity ({p.identity!r}, "
                          "CXR_CLI_IDENTITY), never a typed name: set CXR_CLI_IDENTITY to "
                          f"import as someone else. Received: --reviewer {args.reviewer!r}")
    source = sys.stdin if args.file == "-" else args.file
    records = review_actions.import_relabels(
        open_db(), p, dataset=args.dataset, source=source,
        source_name="stdin" if args.file == "-" else None)
    return {"dataset": args.dataset, "count": len(records), "ids": [r.id for r in records],
            "reviewer": p.identity}


def cmd_relabel_list(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.review.relabel_import import relabel_history, relabel_json

    info, records = relabel_history(open_db(), dataset=args.dataset)
    return {"dataset": info.name, "count": len(records),
            "relabels": [relabel_json(r, info.name) for r in records]}


def cmd_ensemble_create(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.models import actions as models_actions

    p = cli_principal()
    if args.by and args.by != p.identity:
        raise ConfigError(f"an ensemble is recorded as made by the CLI's identity "
                          f"({p.identity!r}, CXR_CLI_IDENTITY), never a typed name. "
                          f"Received: --by {args.by!r}")
    info = models_actions.create_ensemble(open_db(), p, args.name, args.members,
                                   threshold=args.threshold, note=args.note)
    return {"ensemble": info.ref, "members": list(info.members), "labels": list(info.labels),
            "threshold": info.threshold, "threshold_source": info.threshold_source}


def cmd_ensemble_list(args: argparse.Namespace) -> dict:
    from cxr_core.models.ensembles import list_ensembles

    return {"ensembles": [{"ensemble": e.ref, "members": list(e.members),
                           "labels": list(e.labels), "threshold": e.threshold,
                           "threshold_source": e.threshold_source, "created_by": e.created_by,
                           "note": e.note} for e in list_ensembles()]}


def cmd_audit_list(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.auth import admin
    from cxr_core.auth.policy import cli_principal

    events = admin.audit_log(open_db(), cli_principal(), limit=args.limit,
                               before_id=args.before, actor=args.actor, action=args.action)
    return {"count": len(events), "events": [e.to_dict() for e in events]}


def cmd_roles_grant(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.auth import admin
    from cxr_core.auth.policy import cli_principal

    db, p = open_db(), cli_principal()
    admin.grant_roles(db, p, args.identity, args.roles)
    return {"grants": [{"identity": g.identity, "roles": list(g.roles),
                        "granted_by": g.granted_by} for g in admin.role_grants(db, p)]}


def cmd_search_create(args: argparse.Namespace) -> dict:
    """``search create --config SEARCH.json``: the study and its first trials queued (as the
    CLI's principal; a worker is started if none runs)."""
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.search import actions as search_actions
    from cxr_core.training.service import read_config_file

    path = Path(args.config).expanduser()
    db = open_db()
    cfg = search_actions.resolve_config(db, read_config_file(path), base_dir=path.parent)
    created = search_actions.create_study(db, cli_principal(), cfg,
                                          start_worker=not args.no_worker)
    for warning in created.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return created.to_json()


def cmd_search_status(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.search import study

    return study.status(open_db(), args.name)


def cmd_search_best(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.search import study

    return study.best(open_db(), args.name)


def cmd_search_stop(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.search import actions as search_actions

    out = search_actions.stop_study(open_db(), cli_principal(), args.name)
    out["study_status"] = out.pop("status")  # "status" is the command's own outcome key
    return out


def cmd_search_promote(args: argparse.Namespace) -> dict:
    from cxr_core.app import open_db
    from cxr_core.auth.policy import cli_principal
    from cxr_core.search import actions as search_actions

    try:
        changes = json.loads(args.set) if args.set else None
    except ValueError as exc:
        raise ConfigError(f"--set must be a JSON object of run config changes. Received: "
                          f"{args.set!r}") from exc
    if changes is not None and not isinstance(changes, dict):
        raise ConfigError(f"--set must be a JSON object of run config changes. Received: "
                          f"{args.set!r}")
    out = search_actions.promote_best(open_db(), cli_principal(), args.name, changes,
                                      start_worker=not args.no_worker)
    return {**out, "status": "queued"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_core",
                                     description="Chest X-ray pneumonia classifier workbench.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help_: str, subs=sub) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.set_defaults(fn=fn)
        return p

    p = add("index", cmd_index, "index a dataset folder or .npz into the database")
    p.add_argument("path")
    p.add_argument("--name", default=None)
    p.add_argument("--external", action="store_true", default=None,
                   help="flag it as another site or period: external validation data (models "
                        "report their external figures on it)")
    p.add_argument("--not-external", dest="external", action="store_false",
                   help="clear the external flag")
    p = add("fetch-kermany", cmd_fetch_kermany,
            "download the full public Kermany release (Mendeley Data, CC BY 4.0), unpack, "
            "check and index it")
    p.add_argument("--out", required=True, help="the folder to unpack into")
    p.add_argument("--url", default=None, help="a mirror of ChestXRay2017.zip (file:// too)")
    p.add_argument("--name", default="kermany", help="the dataset's name in the app")
    p = add("backup", cmd_backup, "back up the database, the patient salt and the artifacts")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p = add("cleanup", cmd_cleanup, "delete review uploads no relabel or open review item "
            "needs, and exports, older than CXR_RETENTION_DAYS (admin)")
    p.add_argument("--dry-run", action="store_true", help="report only, delete nothing")
    p = add("restore", cmd_restore, "restore a backup folder into this install")
    p.add_argument("--from", dest="src", required=True, help="the backup folder")
    p.add_argument("--force", action="store_true",
                   help="replace an existing database or a different salt")
    p = add("train", cmd_train, "train from a run config JSON (same code path as the page)")
    p.add_argument("--config", required=True)
    p.add_argument("--detach", action="store_true", help="only queue the run for the worker")
    p = add("label-audit", cmd_label_audit, "find likely wrong labels: K patient-grouped "
            "folds trained as runs, out-of-fold probabilities, confident learning")
    p.add_argument("--dataset", default=None, help="the indexed dataset to audit")
    p.add_argument("--folds", type=int, default=5, help="K folds (each image predicted once "
                   "by a model that never trained on it)")
    p.add_argument("--config", default=None, help="a run config JSON for the fold runs "
                   "(recipe, model, epochs, ...); default: the host's recipe")
    p.add_argument("--labels", choices=("current", "original"), default=None,
                   help="audit the current labels (relabels applied; default) or the originals")
    p.add_argument("--label-scheme", choices=("binary", "three_class", "folders"), default=None,
                   help="default binary (subtypes are a second question)")
    p.add_argument("--seed", type=int, default=0, help="the folds' seed")
    p.add_argument("--top", type=int, default=None, help="print only the N most likely wrong")
    p.add_argument("--detach", action="store_true", help="only queue the fold runs")
    asub = p.add_subparsers(dest="label_audit_command")
    q = add("show", cmd_label_audit_show, "a stored audit (its issues once finished)", asub)
    q.add_argument("audit_id", type=int)
    q.add_argument("--top", type=int, default=None)
    q = add("resume", cmd_label_audit_resume, "resume an audit's failed or cancelled folds",
            asub)
    q.add_argument("audit_id", type=int)
    q.add_argument("--top", type=int, default=None)
    q.add_argument("--detach", action="store_true", help="only queue them for the workers")
    p = add("evaluate", cmd_evaluate, "evaluate a model on a dataset")
    p.add_argument("--model", required=True, help="RUN_ID, 'default', a .keras file or an "
                   "ensemble: 'ensemble:run:3+run:5' or 'ensemble:NAME'")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--labels", choices=("current", "original"), default="current",
                   help="score against the current labels (relabels applied) or the original "
                        "folder labels; stored with the evaluation")
    p = add("stress", cmd_stress, "re-score a model's validation images under synthetic "
            "acquisition shift (exposure, contrast, blur, noise, framing) at its threshold")
    p.add_argument("--run", type=int, default=None, help="a run: its own stored evaluation")
    p.add_argument("--split", default="val", help="which of the run's evaluations (val: the "
                   "part that chose neither model nor threshold)")
    p.add_argument("--evaluation", type=int, default=None, help="or any stored evaluation")
    p.add_argument("--model", default=None, help="the model to score (default: the run)")
    p.add_argument("--only", nargs="+", default=None, help="perturbation names")
    p.add_argument("--tta", action="store_true", help="score the mean over fixed test-time "
                   "views (identity, a 90%% crop, +-4%% shifts) at the same threshold")
    p = add("site-calibrate", cmd_site_calibrate, "re-choose a model's operating point for one "
            "dataset on its labelled sample (a stored evaluation); --record keeps it")
    p.add_argument("--evaluation", type=int, required=True,
                   help="a stored binary evaluation of the model on the site's dataset")
    p.add_argument("--sample", choices=("all", "reviewed"), default="all",
                   help="every evaluated image, or only those confirmed on Review")
    p.add_argument("--labels", choices=("current", "original"), default="current")
    p.add_argument("--method", choices=("sensitivity", "youden"), default="sensitivity")
    p.add_argument("--target", type=float, default=0.95, help="target sensitivity")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for the CIs")
    p.add_argument("--record", action="store_true", help="record it for that dataset (as "
                   "CXR_CLI_IDENTITY; Predict then uses it for the site's images)")
    p.add_argument("--note", default="", help="why (kept with the operating point)")
    p = add("predict", cmd_predict, "predict (and explain) images")
    p.add_argument("--model", required=True, help="RUN_ID, 'default', a .keras file or an "
                   "ensemble: 'ensemble:run:3+run:5' or 'ensemble:NAME'")
    p.add_argument("images", nargs="+")
    p.add_argument("--saliency", default=None)
    p.add_argument("--out", default=None)
    p = add("bench", cmd_bench, "run a benchmark (prints a ratio against its baseline)")
    p.add_argument("name", choices=BENCHES)
    p.add_argument("--data", default=None, help="the shared data folder")
    p.add_argument("--site", default=None,
                   help="site-round: the new site's folder (default: the external sample)")
    p.add_argument("--base", default="default", help="site-round: default or run:ID")
    p.add_argument("--config", default=None, help="site-round: the next round's run config; "
                   "label-noise: the audit's fold runs' config")
    p.add_argument("--budgets", default=None, help="site-round: e.g. 0,25,50,100,150")
    p.add_argument("--folds", type=int, default=None,
                   help="site-round: patient-grouped folds (default 3); label-noise: the "
                        "audit's folds (default 5)")
    p.add_argument("--flip", type=float, default=0.05,
                   help="label-noise: share of labels flipped NORMAL <-> PNEUMONIA")
    p.add_argument("--images", type=int, default=1000,
                   help="label-noise: the stratified subset of the real train films")
    p.add_argument("--repeat", type=int, default=3,
                   help="site-round: copies of a confirmed film per epoch")
    p = add("worker", cmd_worker, "run the training worker in the foreground")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after N idle seconds")
    p.add_argument("--kinds", choices=("all", "runs", "jobs"), default="all",
                   help="serve training runs, jobs (evaluations) or both")
    p.add_argument("--gpu", default=None, metavar="IDS",
                   help="the GPUs this worker may use (CUDA_VISIBLE_DEVICES, e.g. 0 or 2,3; "
                        "'' = CPU only): one worker per GPU serves sweeps in parallel")
    search = sub.add_parser("search", help="hyperparameter studies (Optuna): each trial a "
                            "queued run any worker takes")
    ssub = search.add_subparsers(dest="search_command", required=True)
    p = add("create", cmd_search_create, "create a study from a JSON file and queue its first "
            "trials (README: Hyperparameter search)", ssub)
    p.add_argument("--config", required=True, help="the study config JSON")
    p.add_argument("--no-worker", action="store_true", help="only queue: start no worker")
    p = add("status", cmd_search_status, "a study's trials: state, params, value", ssub)
    p.add_argument("name", help="the study's name or id")
    p = add("best", cmd_search_best, "a study's best complete trial and its run config", ssub)
    p.add_argument("name", help="the study's name or id")
    p = add("stop", cmd_search_stop, "stop a study: no new trial; active ones cancelled", ssub)
    p.add_argument("name", help="the study's name or id")
    p = add("promote", cmd_search_promote, "retrain the best trial's values with the full "
            "recipe (calibration slice, no pruning) as a new run", ssub)
    p.add_argument("name", help="the study's name or id")
    p.add_argument("--set", default=None, help='run config changes, e.g. \'{"epochs": 12}\'')
    p.add_argument("--no-worker", action="store_true", help="only queue: start no worker")
    ensemble = sub.add_parser("ensemble", help="named ensembles: the mean of a few models")
    esub = ensemble.add_subparsers(dest="ensemble_command", required=True)
    p = add("create", cmd_ensemble_create, "make a named ensemble (ref 'ensemble:NAME'); its "
            "operating point is chosen on the members' shared validation outputs, or --threshold",
            esub)
    p.add_argument("--name", required=True, help="letters, digits, _ . -; never rewritten")
    p.add_argument("--members", required=True, nargs="+", metavar="REF",
                   help="2+ of run:ID, ID, default, a .keras file")
    p.add_argument("--threshold", type=float, default=None,
                   help="set the binary operating point by hand")
    p.add_argument("--by", default="", help="optional: must be the CLI's identity "
                   "(CXR_CLI_IDENTITY), which the ensemble is recorded as made by")
    p.add_argument("--note", default="", help="why")
    add("list", cmd_ensemble_list, "the named ensembles", esub)
    audit = sub.add_parser("audit", help="the append-only audit log of gated actions")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = add("list", cmd_audit_list, "newest first (admin role)", asub)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", type=int, default=None, help="only events with id < BEFORE")
    p.add_argument("--actor", default=None)
    p.add_argument("--action", default=None)
    roles = sub.add_parser("roles", help="roles granted to identities (added to [cxr_roles])")
    rosub = roles.add_subparsers(dest="roles_command", required=True)
    p = add("grant", cmd_roles_grant, "set an identity's granted roles (none: remove)", rosub)
    p.add_argument("identity", help="an email (lowercased), or issuer|subject as the identity "
                   "provider gives it (case kept)")
    p.add_argument("roles", nargs="*", choices=("viewer", "reviewer", "scientist", "admin",
                                                "adjudicator"))
    relabel = sub.add_parser("relabel", help="relabel images (the review page's writer)")
    rsub = relabel.add_subparsers(dest="relabel_command", required=True)
    p = add("add", cmd_relabel_add, "relabel one image by its path", rsub)
    p.add_argument("--dataset", required=True, help="the dataset's name")
    p.add_argument("--path", required=True, help="the image's path under the dataset root")
    p.add_argument("--label", required=True,
                   help="a folder class (or a button's text, e.g. PNEUMONIA·virus)")
    p.add_argument("--subtype", default=None, help="bacteria | virus, where the class has them")
    p.add_argument("--reviewer", default=None, help="optional: must be the CLI's identity "
                   "(CXR_CLI_IDENTITY), which the relabel is recorded as")
    p.add_argument("--note", default="")
    p = add("import", cmd_relabel_import,
            "relabel from a CSV (path,label[,subtype,reviewer,note]): all rows or none", rsub)
    p.add_argument("file", help="the CSV file (header row required); - reads stdin")
    p.add_argument("--dataset", required=True, help="the dataset's name")
    p.add_argument("--reviewer", default=None, help="for rows without a reviewer cell")
    p = add("list", cmd_relabel_list, "the dataset's relabel history (undo rows included), "
            "oldest first", rsub)
    p.add_argument("--dataset", required=True, help="the dataset's name")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.fn(args)
    except (CxrError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("status", "finished") in ("finished", "queued", "running") else 1

