"""A study's life: create it, advance it, read it back, plot it, promote its best trial.

**Each trial is an ordinary queued run.** :func:`advance` is the one place trials are made and
ended in Optuna: under the study's lock (:func:`cxr_core.storage.studies.lock_study`), in one
transaction of the app database, it tells Optuna how every ended trial run went (complete
with its objective, pruned, or failed), fails any Optuna trial that has no run (an advance that
died between Optuna's ask and the app's commit), then asks Optuna for trials until ``parallel``
are queued or running or ``n_trials`` were asked, and queues each as a run carrying the study
and trial number. Asking only as trials end keeps the sampler informed (queuing every trial at
once would blind it). Optuna's store is another database, so "one transaction" holds for the
app's side; Optuna's own writes are made idempotent by ``skip_if_finished`` and the orphan rule.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_core.core.errors import ConfigError, RunError
from cxr_core.models.card import CARD_NAME
from cxr_core.search.config import StudyConfig
from cxr_core.storage import Database, optuna_store
from cxr_core.storage import runs as run_store
from cxr_core.storage import studies as store
from cxr_core.storage.runs import RunRecord
from cxr_core.storage.studies import StudyRecord
from cxr_core.training.config import RECIPES, TrainConfig

PRUNED_PREFIX = "pruned"  # a trial run's error when the pruner stopped it


def parent_of(study_id: int) -> str:
    """A trial run's ``parent``: per-user caps count a study's trials once (core.limits)."""
    return f"study:{study_id}"
OPTUNA_PREFIX = "cxr-"  # the Optuna study's name is this + the study's name


def _optuna():
    """Optuna, imported when a study is touched (pages and the CLI import this module cheaply)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE's constant liar (trials at once) is marked experimental; it is what Optuna advises.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def sampler_for(cfg: StudyConfig, draw: int):
    """The study's sampler for trial ``draw`` (seeded ``seed + draw``: every process that
    asks draws a different, reproducible start)."""
    optuna = _optuna()
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed + draw)
    return optuna.samplers.TPESampler(seed=cfg.seed + draw, constant_liar=cfg.parallel > 1,
                                      n_startup_trials=max(1, min(10, cfg.n_trials // 2)))


def pruner_for(cfg: StudyConfig):
    optuna = _optuna()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials,
                                           n_warmup_steps=cfg.warmup_epochs)
    if cfg.pruner == "hyperband":
        epochs = cfg.base_config().epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 2),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def distributions(cfg: StudyConfig) -> dict[str, Any]:
    """The space as Optuna distributions (ask's ``fixed_distributions``)."""
    d = _optuna().distributions
    out: dict[str, Any] = {}
    for p in cfg.space:
        if p.type == "categorical":
            out[p.name] = d.CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[p.name] = d.IntDistribution(p.low, p.high, log=p.log, step=p.step or 1)
        else:
            out[p.name] = d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def store_url(study: StudyRecord) -> str:
    """The URL this process opens the study's store by (the stored one has no password).

    Raises:
        ConfigError: this process's store is another one (CXR_OPTUNA_URL differs).
    """
    url = optuna_store.store_url()
    if optuna_store.redacted(url) != study.optuna_url:
        raise ConfigError(f"study {study.name!r} lives in the Optuna store "
                          f"{study.optuna_url}; this process uses {optuna_store.redacted(url)}: "
                          "set CXR_OPTUNA_URL (and CXR_HOME) as where the study was made")
    return url


def load(study: StudyRecord, storage: Any, *, draw: int = 0):
    """The Optuna study of an app study, on an open store."""
    cfg = StudyConfig.from_dict(study.config)
    return _optuna().load_study(study_name=study.optuna_study, storage=storage,
                                sampler=sampler_for(cfg, draw), pruner=pruner_for(cfg))


def create_optuna_study(cfg: StudyConfig, url: str) -> str:
    """Create the Optuna study in its store; returns its name there.

    Raises:
        ConfigError: a study of this name exists in the store.
    """
    optuna = _optuna()
    name = OPTUNA_PREFIX + cfg.name
    with optuna_store.optuna_storage(url) as storage:
        try:
            optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                sampler=sampler_for(cfg, 0), pruner=pruner_for(cfg))
        except optuna.exceptions.DuplicatedStudyError as exc:
            raise ConfigError(f"the Optuna store already holds a study {name!r}; choose another "
                              f"name. Received: name={cfg.name!r}") from exc
    return name


def objective_value(cfg: StudyConfig, run: RunRecord) -> float | None:
    """A finished trial run's objective (None when the run did not record it)."""
    summary = run.summary or {}
    if cfg.objective.dataset:
        for entry in summary.get("external") or ():
            if cfg.objective.dataset in (entry.get("dataset"), entry.get("name")):
                value = entry.get(cfg.objective.metric)
                break
        else:
            value = None
    else:
        value = (summary.get("val") or {}).get(cfg.objective.metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _tell_ended(optuna_study: Any, cfg: StudyConfig, runs: list[RunRecord]) -> None:
    """Tell Optuna how each ended trial run went; fail Optuna trials without a run."""
    state = _optuna().trial.TrialState
    trials = {t.number: t for t in optuna_study.get_trials(deepcopy=False)}
    by_number = {r.trial_number: r for r in runs if r.trial_number is not None}
    for number, trial in trials.items():
        if trial.state != state.RUNNING:
            continue
        run = by_number.get(number)
        if run is None:  # asked, but the run was never committed
            optuna_study.tell(number, state=state.FAIL, skip_if_finished=True)
            continue
        if run.active:
            continue
        value = objective_value(cfg, run) if run.status == "finished" else None
        if value is not None:
            optuna_study.tell(number, value, skip_if_finished=True)
        elif run.status == "cancelled" and trial.intermediate_values:
            # pruned by the pruner, or cancelled by a person after some epochs
            optuna_study.tell(number, state=state.PRUNED, skip_if_finished=True)
        else:
            optuna_study.tell(number, state=state.FAIL, skip_if_finished=True)


def _best(optuna_study: Any, runs: list[RunRecord]) -> tuple[int | None, float | None]:
    try:
        best = optuna_study.best_trial
    except ValueError:  # no complete trial yet
        return None, None
    run = next((r for r in runs if r.trial_number == best.number), None)
    return (run.id if run else None), best.value


@dataclass(frozen=True)
class Advance:
    """What one :func:`advance` did."""

    queued: tuple[int, ...]  # run ids queued for new trials
    status: str  # the study's status after it
    failed_configs: tuple[str, ...] = ()  # trials whose values made no valid run config


def advance(db: Database, study_id: int) -> Advance:
    """Tell Optuna how ended trials went, then ask and queue trials up to ``parallel`` at once
    and ``n_trials`` in all; finish the study when every trial ended (see the module
    docstring). A stopped study only gets its ended trials told.
    """
    def work(s) -> Advance:
        study = store.lock_study(session=s, study_id=study_id)
        cfg = StudyConfig.from_dict(study.config)
        runs = store.trial_runs(session=s, study_id=study_id)
        queued: list[int] = []
        bad: list[str] = []
        asked = study.trials_queued
        with optuna_store.optuna_storage(store_url(study)) as storage:
            ostudy = load(study, storage, draw=asked)
            _tell_ended(ostudy, cfg, runs)
            active = sum(r.active for r in runs)
            dists = distributions(cfg)
            while study.status == "running" and active < cfg.parallel and asked < cfg.n_trials:
                ostudy.sampler = sampler_for(cfg, asked)
                trial = ostudy.ask(dists)
                asked += 1
                try:
                    run_cfg = cfg.trial_config(trial.params)
                except ConfigError as exc:  # e.g. values that clash: fail it, ask again
                    ostudy.tell(trial.number, state=_optuna().trial.TrialState.FAIL)
                    bad.append(f"trial {trial.number}: {exc}")
                    continue
                queued.append(run_store.create_run(
                    session=s, name=f"{study.name} · trial {trial.number}",
                    config=run_cfg.to_dict(), created_by=study.created_by, study_id=study.id,
                    trial_number=trial.number, parent=parent_of(study.id)))
                active += 1
            best_run, best_value = _best(ostudy, runs)
        status = study.status
        if status == "running" and asked >= cfg.n_trials and active == 0:
            status = "finished"
        note = study.note
        if bad:
            note = "; ".join(filter(None, [note, *bad]))[-4000:]
        store.update_study(session=s, study_id=study.id, trials_queued=asked,
                           best_run_id=best_run, best_value=best_value, note=note,
                           **({"status": status} if status != study.status else {}))
        return Advance(tuple(queued), status, tuple(bad))

    return db.write(work)


def advance_due(db: Database) -> dict[int, Advance | str]:
    """Advance every running study with room for a trial, or whose trials all ended (a
    worker loop's turn: trials of a worker that died are reaped, then told and replaced here).
    A study whose store cannot be reached is reported, not raised: the loop goes on."""
    with db.session() as s:
        due = store.studies_to_advance(session=s)
    out: dict[int, Advance | str] = {}
    for study_id in due:
        try:
            out[study_id] = advance(db, study_id)
        except Exception as exc:  # noqa: BLE001  (an unreachable store must not stop the loop)
            out[study_id] = f"{type(exc).__name__}: {exc}"
    return out


def get_study(db: Database, name_or_id: str | int) -> StudyRecord:
    """A study by name or id.

    Raises:
        RunError: no such study.
    """
    with db.session() as s:
        return store.require_study(session=s, name_or_id=name_or_id)


def list_studies(db: Database, limit: int = 100) -> list[StudyRecord]:
    with db.session() as s:
        return store.list_studies(session=s, limit=limit)


def mark_selected_on(db: Database, run_id: int, study: StudyRecord) -> list[str]:
    """A study whose objective is an external dataset chose its trials (and the promoted run)
    on it: the run's card says so beside its figures there (``recipe_selected_on``), so the
    sample is no longer shown as an independent test. Returns the datasets marked."""
    dataset = StudyConfig.from_dict(study.config).objective.dataset
    with db.session() as s:
        run = run_store.get_run(session=s, run_id=run_id)
    if not dataset or run is None or not run.artifact_dir:
        return []
    path = Path(run.artifact_dir) / CARD_NAME
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    card["recipe_selected_on"] = sorted({*card.get("recipe_selected_on", ()), dataset})
    card["selected_by_study"] = study.name
    tmp = path.with_name(f".tmp-study-{CARD_NAME}")
    tmp.write_text(json.dumps(card, indent=2, default=str))
    os.replace(tmp, path)
    return card["recipe_selected_on"]


def trial_of(db: Database, run_id: int) -> StudyRecord | None:
    """The study a run is a trial of (None for an ordinary run)."""
    with db.session() as s:
        run = run_store.get_run(session=s, run_id=run_id)
        if run is None or run.study_id is None:
            return None
        return store.get_study(session=s, name_or_id=run.study_id)


def promoted_from(db: Database, run_id: int) -> StudyRecord | None:
    """The study whose best trial a run retrains (None for any other run)."""
    with db.session() as s:
        return store.study_promoting(session=s, run_id=run_id)


def trials(db: Database, name_or_id: str | int) -> list[dict]:
    """The study's trials: number, Optuna state, values, objective value, the run (id,
    status, epochs done), and intermediate values, by trial number."""
    study = get_study(db, name_or_id)
    with db.session() as s:
        runs = {r.trial_number: r for r in store.trial_runs(session=s, study_id=study.id)}
    with optuna_store.optuna_storage(store_url(study)) as storage:
        frozen = load(study, storage).get_trials(deepcopy=False)
    out = []
    for t in frozen:
        run = runs.get(t.number)
        out.append({"number": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                    "value": t.value, "run_id": run.id if run else None,
                    "run_status": run.status if run else None,
                    "epochs": run.epochs_done if run else None,
                    "intermediate": {int(k): float(v) for k, v in t.intermediate_values.items()},
                    "error": run.error if run else None})
    return out


def status(db: Database, name_or_id: str | int) -> dict:
    """``search status NAME --json``: the study and its trials (state, params, value)."""
    study = get_study(db, name_or_id)
    rows = trials(db, study.id)
    cfg = StudyConfig.from_dict(study.config)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"study": study.name, "id": study.id, "state": study.status,
            "n_trials": cfg.n_trials, "parallel": cfg.parallel, "asked": study.trials_queued,
            "objective": cfg.objective.describe(), "sampler": cfg.sampler, "pruner": cfg.pruner,
            "states": counts, "best_value": study.best_value, "best_run_id": study.best_run_id,
            "promoted_run_id": study.promoted_run_id, "note": study.note,
            "store": study.optuna_url, "trials": rows}


def best(db: Database, name_or_id: str | int) -> dict:
    """``search best NAME --json``: the best complete trial, its run and its run config.

    Raises:
        RunError: no trial has completed yet.
    """
    study = get_study(db, name_or_id)
    with optuna_store.optuna_storage(store_url(study)) as storage:
        ostudy = load(study, storage)
        try:
            t = ostudy.best_trial
        except ValueError as exc:
            raise RunError(f"study {study.name!r} has no complete trial yet") from exc
    with db.session() as s:
        run = next((r for r in store.trial_runs(session=s, study_id=study.id)
                    if r.trial_number == t.number), None)
    cfg = StudyConfig.from_dict(study.config)
    return {"study": study.name, "trial": t.number, "value": t.value, "params": dict(t.params),
            "objective": cfg.objective.describe(), "run_id": run.id if run else None,
            "config": cfg.trial_config(t.params).to_dict(),
            "promoted_run_id": study.promoted_run_id}


def figures(db: Database, name_or_id: str | int) -> dict[str, Any]:
    """The study's plotly figures by optuna.visualization: optimization history, parallel
    coordinates, parameter importances and slices. A plot that needs more complete trials
    than there are is left out (its name maps to the reason)."""
    import optuna.visualization as vis

    study = get_study(db, name_or_id)
    plots = {"history": vis.plot_optimization_history,
             "parallel": vis.plot_parallel_coordinate,
             "importances": vis.plot_param_importances, "slice": vis.plot_slice,
             "intermediate": vis.plot_intermediate_values}
    out: dict[str, Any] = {}
    with optuna_store.optuna_storage(store_url(study)) as storage:
        ostudy = load(study, storage)
        complete = [t for t in ostudy.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        for key, plot in plots.items():
            need = 2 if key == "importances" else 1
            if len(complete) < need:
                out[key] = f"needs {need} complete trial(s); {len(complete)} so far"
                continue
            try:
                out[key] = plot(ostudy)
            except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant value
                out[key] = f"not drawn: {exc}"
    return out


def promote_config(db: Database, name_or_id: str | int,
                   changes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run config of "promote the best trial": the best trial's values on the study's
    base config, with the full recipe's settings a search may have cut for speed put back
    (every image, the recipe's calibration slice, its epochs and patience), then ``changes``.
    The new run is an ordinary run (no study, no pruning)."""
    b = best(db, name_or_id)
    cfg = dict(b["config"])
    recipe = RECIPES[cfg["recipe"]]
    full = TrainConfig.from_dict({"recipe": cfg["recipe"], "dataset": cfg["dataset"]})
    cfg.update(max_images=None, calibration_fraction=max(full.calibration_fraction,
                                                         cfg.get("calibration_fraction") or 0))
    for key in ("epochs", "patience", "image_size"):
        if key in recipe and key not in b["params"]:
            cfg[key] = recipe[key]
    cfg["name"] = f"{b['study']} · best (trial {b['trial']})"
    cfg.update(dict(changes or {}))
    return cfg


def record_promoted(db: Database, study_id: int, run_id: int) -> None:
    db.write(lambda s: store.update_study(session=s, study_id=study_id,
                                          promoted_run_id=run_id))
