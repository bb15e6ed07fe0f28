"""Search: hyperparameter studies (Optuna). Create one from a form (a recipe and a space from
the reports, or your own JSON), follow its trials live (each an ordinary run on Train), see
Optuna's plots, and promote the best trial to a full run.

Nothing trains here: creating a study queues its first trials as runs for the workers, and
each worker that ends a trial asks Optuna for the next (cxr_core.search).
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from app_pages._access import md, principal
from app_pages._db import get_db
from app_pages._shared import dataset_picker, list_datasets
from cxr_core.core.errors import CxrError
from cxr_core.search import actions
from cxr_core.search import study as svc
from cxr_core.search.config import PRUNERS, SAMPLERS, SPACE_PRESETS
from cxr_core.training.config import RECIPES

REFRESH_S = 2.0
PLOTS = {"history": "Optimization history", "parallel": "Parallel coordinates",
         "importances": "Parameter importances", "slice": "Slices",
         "intermediate": "Per-epoch values (pruning)"}


def form_ui(dataset: str) -> dict | None:
    """The study form; returns the study config on submit."""
    preset = st.selectbox("Start from", list(SPACE_PRESETS), key="search_preset",
                          help="a search space from the reports; edit it below")
    externals = [d.name for d in list_datasets() if d.external and d.name != dataset]
    with st.form("search_form"):
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Study name", key="search_name")
        recipe = c1.selectbox("Recipe", list(RECIPES), index=list(RECIPES).index("cpu128"),
                              key="search_recipe", help="every trial starts from it")
        size = c1.number_input("Image size (px)", 8, 1024, 64, key="search_size")
        epochs = c2.number_input("Epochs per trial", 1, 1000, 6, key="search_epochs")
        max_images = c2.number_input("At most N images (0: all)", 0, 10**6, 1500,
                                     key="search_max") or None
        objective = c2.selectbox("Objective: AUC on", ["validation split", *externals],
                                 key="search_objective", help="an external dataset only when "
                                 "chosen here: it is then no longer external for the winner")
        n_trials = c3.number_input("Trials", 1, 1000, 20, key="search_trials")
        parallel = c3.number_input("At once", 1, 64, 1, key="search_parallel",
                                   help="trials queued at the same time (one per worker)")
        sampler = c3.selectbox("Sampler", SAMPLERS, key="search_sampler")
        pruner = c3.selectbox("Pruner", PRUNERS, key="search_pruner")
        space = st.text_area("Search space (JSON)", json.dumps(SPACE_PRESETS[preset], indent=1),
                             height=220, key=f"search_space_{preset}")
        if not st.form_submit_button("Create study", icon=":material/travel_explore:"):
            return None
    try:
        space = json.loads(space)
    except ValueError as exc:
        st.error(f"The search space is not JSON: {exc}")
        return None
    return {"name": name, "space": space, "sampler": sampler, "pruner": pruner,
            "n_trials": int(n_trials), "parallel": int(parallel),
            "objective": {"metric": "auc",
                          "dataset": None if objective == "validation split" else objective},
            "base": {"recipe": recipe, "dataset": dataset, "image_size": int(size),
                     "epochs": int(epochs), "max_images": max_images}}


def create_ui(dataset: str) -> None:
    data = form_ui(dataset)
    if data is None:
        return
    db = get_db()
    try:
        created = actions.create_study(db, principal(), actions.resolve_config(db, data))
    except CxrError as exc:
        st.error(md(exc))
        return
    st.session_state["search_study"] = created.study_id
    for warning in created.warnings:
        st.warning(md(warning), icon=":material/warning:")
    st.success(f"Study {md(created.name)} created: trials as runs "
               f"{', '.join(map(str, created.run_ids))} queued.")


def trials_ui(study_id: int) -> None:
    """The study's trials, redrawn from the database every REFRESH_S seconds."""
    status = svc.status(get_db(), study_id)
    st.caption(f"{md(status['study'])}: {status['state']} · {status['asked']} of "
               f"{status['n_trials']} trials asked, {status['parallel']} at once · objective "
               f"{status['objective']} · best {status['best_value'] if status['best_value'] is not None else '–'}")
    rows = [{"trial": t["number"], "state": t["state"], "value": t["value"],
             "epochs": t["epochs"], "run": f"./train?run={t['run_id']}" if t["run_id"] else None,
             **{k: str(v) for k, v in t["params"].items()}} for t in status["trials"]]
    if not rows:
        st.info("No trial yet.")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
        "run": st.column_config.LinkColumn("run", display_text=r"run=(\d+)")})


def plots_ui(study_id: int) -> None:
    figs = svc.figures(get_db(), study_id)
    tabs = st.tabs(list(PLOTS.values()))
    for tab, key in zip(tabs, PLOTS):
        fig = figs[key]
        if isinstance(fig, str):
            tab.info(md(fig))
        else:
            tab.plotly_chart(fig, width="stretch", key=f"search_plot_{key}")


def actions_ui(study) -> None:
    c1, c2 = st.columns(2)
    db, me = get_db(), principal()
    try:
        if study.best_run_id and c1.button("Promote the best trial", key="search_promote",
                                           icon=":material/workspace_premium:",
                                           help="retrain its values with the full recipe "
                                           "(every image, the calibration slice, no pruning)"):
            out = actions.promote_best(db, me, study.id)
            st.success(f"Run {out['run_id']} queued: {md(out['config']['name'])}")
        if study.status == "running" and c2.button("Stop the study", key="search_stop",
                                                   icon=":material/stop:"):
            out = actions.stop_study(db, me, study.id)
            st.toast(f"Stopped; runs {out['cancelled_runs']} cancelled")
    except CxrError as exc:
        st.error(md(exc), icon=":material/block:")
    if study.promoted_run_id:
        st.caption(f"Promoted: [run {study.promoted_run_id}](./train?run="
                   f"{study.promoted_run_id}) (on Compare and export like any run)")


st.title(":material/travel_explore: Search")
user = principal()
if not user.can("search"):
    st.info(f"Hyperparameter studies need the scientist role; you are signed in as "
            f"{md(user.identity)}.", icon=":material/block:")
    st.stop()
if (info := dataset_picker("search")) is not None:
    with st.expander("New study", expanded=not svc.list_studies(get_db(), limit=1),
                     icon=":material/add:"):
        create_ui(info.name)
studies = {s.id: s for s in svc.list_studies(get_db())}
if not studies:
    st.info("No study yet: create one above.")
    st.stop()
chosen = st.selectbox("Study", list(studies), key="search_study",
                      format_func=lambda i: f"{studies[i].name} ({studies[i].status})")
try:
    st.fragment(trials_ui, run_every=REFRESH_S)(chosen)
    actions_ui(studies[chosen])
    plots_ui(chosen)
except CxrError as exc:
    st.error(md(exc))
