"""Train: queue runs for the worker process, follow them live, cancel or resume them.

Nothing trains in this script's thread: "Start" writes a queued run and makes sure a worker
process is alive; the curves are redrawn from the DB's long-form metric rows by a fragment.
"""
from __future__ import annotations

import time

import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages._access import md, principal
from app_pages._db import get_db
from app_pages._shared import dataset_picker, list_datasets, plot_safe
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import LABEL_SCHEMES
from cxr_core.data.balancing import BALANCING
from cxr_core.data.presets import all_presets
from cxr_core.data.splits import SPLIT_STRATEGIES
from cxr_core.models.specs import HEAD_ACTIVATIONS, INTENSITY_MODES, MODELS
from cxr_core.training import actions
from cxr_core.training import service as svc
from cxr_core.training.config import LR_SCHEDULES, OPTIMIZERS, RECIPES

REFRESH_S = 2.0
ICONS = dict(queued="⏳", running="🏃", finished="✅", failed="❌", cancelled="⏹️")


def _pick(col, label: str, options, value, key: str, **kw):
    options = list(options)
    return col.selectbox(label, options, index=options.index(value) if value in options else 0,
                         key=key, **kw)


def form_ui(dataset: str, layout: str) -> dict | None:
    """Recipe presets and the fields people change; returns the config changes on submit."""
    recipe = _pick(st, "Recipe", RECIPES, svc.host_recipe(layout), "train_recipe",
                   help="Defaults for every field (PneumoniaMNIST: mnist28; otherwise "
                        "default224 with a GPU, cpu128 without). docs/experiments.md has "
                        "each recipe's validation results.")
    d, k = svc.recipe_defaults(recipe), f"train_{recipe}_"  # keys per recipe: its defaults
    with st.form("train_form"):
        c1, c2, c3 = st.columns(3)
        out = dict(recipe=recipe, dataset=dataset, name=c1.text_input("Run name", key=k + "name"))
        out["model"] = _pick(c1, "Model", MODELS, d["model"], k + "model")
        out["weights"] = c1.text_input("Weights", d["weights"] or "", key=k + "weights",
                                       help="empty = random init; imagenet; a file; run:ID") or None
        out["freeze_epochs"] = c1.number_input("Frozen-backbone epochs", 0, 1000,
                                               d["freeze_epochs"], key=k + "freeze")
        out["image_size"] = c2.number_input("Image size (px)", 8, 1024, d["image_size"],
                                            key=k + "size")
        out["label_scheme"] = _pick(c2, "Label scheme", LABEL_SCHEMES, d["label_scheme"],
                                    k + "scheme")
        out["label_source"] = c2.radio("Labels", ["original", "current"], horizontal=True,
                                       key=k + "source", help="current = with clinician relabels")
        out["augment"] = _pick(c2, "Augmentation", all_presets(get_db()), d["augment"],
                               k + "augment", help="built-in or saved on the Augmentation page")
        out["balancing"] = _pick(c2, "Balancing", BALANCING, d["balancing"], k + "balancing")
        out["epochs"] = c3.number_input("Epochs", 1, 1000, d["epochs"], key=k + "epochs")
        out["batch_size"] = c3.number_input("Batch size", 1, 1024, d["batch_size"], key=k + "batch")
        out["optimizer"] = _pick(c3, "Optimizer", OPTIMIZERS, d["optimizer"], k + "opt")
        out["learning_rate"] = c3.number_input("Learning rate", 1e-6, 1.0, d["learning_rate"],
                                               format="%.5f", key=k + "lr")
        out["lr_schedule"] = _pick(c3, "LR schedule", LR_SCHEDULES, d["lr_schedule"], k + "sched")
        e1, e2, e3, e4 = st.columns(4)
        out["max_images"] = e1.number_input("At most N images (0: all)", 0, 10**6, 0,
                                            key=k + "max") or None
        out["split"] = _pick(e1, "Validation split", SPLIT_STRATEGIES, d.get("split", "patient"),
                             k + "split", help="patient: random patient groups; temporal: the "
                             "earliest patients of each class (a proxy of the official test "
                             "split); group: leave the folder below out")
        out["split_group"] = e1.text_input("Folder or site:NAME to hold out (group split)",
                                           key=k + "split_group") or None
        out["seed"] = e2.number_input("Seed", 0, 10**6, d["seed"], key=k + "seed")
        out["intensity"] = _pick(e2, "Intensity", INTENSITY_MODES, d.get("intensity", "none"),
                                 k + "intensity", help="standardize: each film to zero mean and "
                                 "unit spread inside the model (exposure differs between sites)")
        out["patience"] = e3.number_input("Patience", 1, 1000, d["patience"], key=k + "patience")
        out["label_smoothing"] = e3.number_input(
            "Label smoothing (binary)", 0.0, 0.49, float(d.get("label_smoothing", 0.0)),
            step=0.05, key=k + "smooth", help="targets 0/1 become s/2 and 1 - s/2")
        out["mixed_precision"] = e4.toggle("Mixed precision (GPU)", key=k + "mp")
        out["ema"] = e4.number_input("Weight averaging (EMA momentum; 0: off)", 0.0, 0.9999,
                                     float(d.get("ema") or 0.0), format="%.4f",
                                     key=k + "ema") or None
        out.update(site_ui(dataset, d, k))
        out["head"] = head_ui(k)
        submitted = st.form_submit_button("Start training", icon=":material/play_arrow:")
    return out if submitted else None


def site_ui(dataset: str, d: dict, k: str) -> dict:
    """Another site: evaluate the finished run there (external figures on its card), and the
    next round: add the films confirmed on Review at a site to this run's data."""
    others = [x for x in list_datasets() if x.name != dataset]
    s1, s2, s3 = st.columns([2, 2, 1])
    external = s1.multiselect(
        "Evaluate at the end on (external)", [x.name for x in others if x.external],
        default=[x for x in d.get("external") or [] if x in {o.name for o in others}],
        key=k + "external", help="Datasets flagged external on Home: the run's card reports "
        "its figures there (AUC, the stored and a cross-fitted site threshold).")
    extra = s2.multiselect("Next round: add films of", [x.name for x in others],
                           key=k + "extra", help="Each dataset's films with their current "
                           "labels, split by patient on their own; the rest of a site stays "
                           "its external validation.")
    images = s3.radio("Which films", ["reviewed", "all"], key=k + "extra_images",
                      help="reviewed: those confirmed on Review (the new-site queue)")
    repeat = s3.number_input("Repeat them ×", 1, 50, 3, key=k + "extra_repeat",
                             help="oversample a small site sample in training")
    return {"external": external,
            "extra": [{"dataset": n, "images": images, "repeat": int(repeat)} for n in extra]}


def head_ui(k: str) -> dict | None:
    """A configurable head in place of the architecture's own (None: the recipe's head). The
    fields always show: a form reruns only on submit, so the toggle cannot reveal them."""
    h1, h2, h3, h4, h5 = st.columns([1.2, 1, 1.2, 1, 1])
    on = h1.toggle("Configurable head", key=k + "head_on", help="Dense layers on the pooled "
                   "features; the initialiser follows the activation (He for ReLU/ELU, Glorot "
                   "for sigmoid/tanh, LeCun for SELU, which gets no batch norm)")
    layers = h1.number_input("Dense layers", 0, 8, 1, key=k + "head_layers")
    units = h2.text_input("Units (one, or one per layer)", "256", key=k + "head_units")
    activation = _pick(h3, "Activation", HEAD_ACTIVATIONS, "relu", k + "head_act")
    batch_norm = h4.toggle("Batch norm", key=k + "head_bn")
    dropout = h5.number_input("Head dropout", 0.0, 0.95, 0.5, step=0.05, key=k + "head_dropout")
    try:
        widths = [int(u) for u in units.replace(" ", "").split(",") if u]
    except ValueError:
        widths = [units]  # refused by the config, naming head.units
    return {"layers": layers, "units": widths[0] if len(widths) == 1 else widths,
            "activation": activation, "batch_norm": batch_norm, "dropout": dropout} if on else None


def start_ui(dataset: str, layout: str) -> None:
    changes = form_ui(dataset, layout)
    if changes is None:
        return
    if changes.get("split") != "group":
        changes["split_group"] = None  # the folder field only counts for a group split
    db = get_db()
    try:
        run_id, pid = actions.start_run(db, principal(), svc.make_config(db, changes))
    except CxrError as exc:
        st.error(md(exc))
    else:
        st.session_state["train_detail_run"] = run_id
        # A new widget key with this default, not a value written to the widget's key: the live
        # fragment can redraw the widget before the browser applied such a value, and the
        # browser then sends back its old (empty) selection for good.
        st.session_state["train_plot_default"] = [run_id, *st.session_state.get(_plot_key(), [])]
        st.session_state["train_plot_gen"] = st.session_state.get("train_plot_gen", 0) + 1
        st.success(f"Run {run_id} queued; worker process {pid} will train it." if pid else
                   f"Run {run_id} queued for the workers that share this database (this app "
                   "starts none: CXR_WORKER=off, or a live worker runs on another host).")


RUNS_PAGE = 50  # runs listed at once (newest first)


def _plot_key() -> str:
    """The "Runs to plot" widget's key: a new one each time this session starts a run."""
    return f"train_plot_runs_{st.session_state.get('train_plot_gen', 0)}"


def runs_table_ui(runs) -> None:
    rows = [{"id": r.id, "run": r.display_name, "status": f"{ICONS.get(r.status, '')} {r.status}",
             "trial": r.trial_number,  # a study's trial (Search page); empty for a plain run
             "epochs": f"{r.epochs_done}/{r.config.get('epochs', '?')}",
             "model": r.config.get("model"), "dataset": r.config.get("dataset"),
             "val AUC": ((r.summary or {}).get("val") or {}).get("auc"),
             "created": r.created_at} for r in runs]
    # Fit the rows (35 px each plus the header), scrolling beyond six runs.
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 height=min(220, 35 * (len(rows) + 1) + 3))


def _eta(seconds: float) -> str:
    minutes = seconds / 60
    return (f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90
            else f"{minutes / 60:.1f} h")


def progress_ui(runs: dict, run_ids: list[int]) -> None:
    """Where each running run is, from its newest batch row, and the time left at its pace."""
    active = [i for i in run_ids if runs[i].status == "running"]
    for i, p in svc.run_progress(get_db(), active).items():
        total = runs[i].config.get("epochs", "?")
        st.caption(f"{md(runs[i].display_name)} (#{i}): epoch {p.epoch_progress:.2f} of "
                   f"{total} · about {_eta(p.eta_s)} left at the current pace (early "
                   "stopping may end it sooner)")


def curves_ui(runs: dict, run_ids: list[int]) -> None:
    rows = svc.live_curves(get_db(), run_ids)
    st.caption(f"{len(rows)} metric rows · refreshed {time.strftime('%H:%M:%S')}")
    progress_ui(runs, run_ids)
    if not rows:
        st.info("No batch has been reported yet for these runs.")
        return
    fig = px.line(plot_safe(pd.DataFrame(rows)), x="epoch", y="value", color="run", line_dash="kind",
                  facet_col="key", facet_col_wrap=2, markers=True,
                  category_orders={"kind": ["epoch end", "during epoch"]})
    # Epoch ends as points; the running metrics within epochs as a thin line.
    fig.for_each_trace(lambda t: t.update(mode="lines", line_width=1, opacity=0.6)
                       if "during epoch" in t.name else None)
    fig.update_yaxes(matches=None)
    st.plotly_chart(fig, width="stretch", key="train_curves")


def outcome_ui(run) -> None:
    """A finished run's size (parameters) and per-class report at its operating point."""
    summary = run.summary or {}
    if params := summary.get("parameters"):
        c1, c2, c3 = st.columns(3)
        c1.metric("Parameters", f"{params['total']:,}")
        c2.metric("Trainable", f"{params['trainable']:,}")
        c3.metric("Non-trainable", f"{params['non_trainable']:,}",
                  help="Frozen layers and BatchNorm's moving statistics")
    if per_class := summary.get("per_class"):
        t = per_class.get("threshold")
        st.caption(f"Per class on validation ({per_class.get('n')} images) at "
                   + ("the argmax" if t is None else f"the operating point {t:.3f}"))
        st.dataframe(pd.DataFrame(per_class["rows"]), hide_index=True)
    if left := summary.get("left_out_unlabelled"):
        st.caption("Left out (no class in this scheme; no subtype is guessed): "
                   + ", ".join(f"{n} {md(why)}" for why, n in sorted(left.items())))


def detail_ui(run) -> None:
    st.markdown(f"**{md(run.display_name)}** (#{run.id}) — {ICONS.get(run.status, '')} "
                f"{run.status}" + (f" · queued by {md(run.created_by)}" if run.created_by else ""))
    if run.error:
        st.error(md(run.error))
    c1, c2 = st.columns(2)
    may = principal().can("cancel_own_run")
    try:
        if may and run.active and c1.button("Cancel", key=f"train_cancel_{run.id}",
                                            icon=":material/stop:"):
            st.toast(f"Run {run.id}: {actions.cancel_run(get_db(), principal(), run.id)}")
        if may and run.status in ("failed", "cancelled") and c2.button(
                "Resume", key=f"train_resume_{run.id}", icon=":material/replay:"):
            actions.resume_run(get_db(), principal(), run.id)
            st.toast(f"Run {run.id} queued to resume from epoch {run.epochs_done}")
    except CxrError as exc:
        st.error(md(exc), icon=":material/block:")
    outcome_ui(run)
    tab_logs, tab_cfg, tab_sum = st.tabs(["Log", "Config", "Summary"])
    logs = svc.run_logs(get_db(), run.id)
    tab_logs.code("\n".join(f"{x.created_at:%H:%M:%S} {x.level:7} {x.message}" for x in logs)
                  or "(no log lines yet)", language=None)
    tab_cfg.json(run.config, expanded=False)
    tab_sum.json(run.summary or {}, expanded=True)


def live_ui() -> None:
    """Run list, curves and the chosen run: redrawn from the DB every REFRESH_S seconds."""
    svc.refresh(get_db())  # dead workers' runs → failed
    page = int(st.session_state.get("train_runs_page", 1))
    runs = {r.id: r for r in svc.list_runs(get_db(), limit=RUNS_PAGE,
                                           offset=(page - 1) * RUNS_PAGE)}
    if not runs and page == 1:
        st.info("No run yet: start one above.")
        return
    runs_table_ui(list(runs.values()))
    if (total := svc.count_runs(get_db())) > RUNS_PAGE:
        st.number_input(f"Page of runs ({total:,} in all, {RUNS_PAGE} a page, newest first)",
                        1, -(-total // RUNS_PAGE), key="train_runs_page")
    if not runs:
        return
    if (q := st.query_params.get("run", "")).isdigit() and int(q) in runs:  # Search's links
        st.session_state.setdefault("train_detail_run", int(q))
    default = (st.session_state.get("train_plot_default")
               or [i for i, r in runs.items() if r.active][:4] or list(runs)[:3])
    curves_ui(runs, st.multiselect("Runs to plot", list(runs), key=_plot_key(),
                                   default=[i for i in default if i in runs],
                                   format_func=lambda i: runs[i].display_name))
    chosen = st.selectbox("Run details", list(runs), key="train_detail_run",
                          format_func=lambda i: f"#{i} {runs[i].display_name} ({runs[i].status})")
    detail_ui(runs[chosen])


st.title(":material/model_training: Train")
user = principal()
if not user.can("train"):
    st.info(f"Starting runs needs the scientist role; you are signed in as {md(user.identity)} "
            f"({', '.join(sorted(user.roles)) or 'no role'}). The runs below are read-only.",
            icon=":material/block:")
elif (info := dataset_picker("train")) is not None:
    with st.expander("New run", expanded=True, icon=":material/add:"):
        start_ui(info.name, info.layout)
st.subheader("Runs")
st.fragment(live_ui, run_every=REFRESH_S)()
