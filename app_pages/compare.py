"""Compare runs on the same images: at their operating points or at a matched sensitivity."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages._access import acting_as, md, principal
from app_pages._db import get_db
from app_pages._ensemble_form import ensemble_form_ui
from app_pages._shared import finished_job, job_ui, kept_result, list_datasets, plot_safe, thumbnail
from app_pages._site_thresholds import site_threshold_ui
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import ConfigError, CxrError
from cxr_core.core.text_safe import plotly_escape
from cxr_core.data.provenance import LABEL_SOURCE_TEXT, LABEL_SOURCES
from cxr_core.evaluation import actions, subgroups
from cxr_core.evaluation import compare as cs
from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import operating_points as ops
from cxr_core.jobs import actions as jobs_actions
from cxr_core.models import ensembles, hierarchy
from cxr_core.models.refs import shipped_models
from cxr_core.stats import tables


@st.cache_data(show_spinner="Comparing runs…", ttl=600, max_entries=16)
def comparison(ids: tuple[int, ...], mode: str, target: float, truth: str,
               as_of: int | None, images: str = "all") -> cs.Comparison:
    """Point estimates only (no resampling here): the intervals are a worker's job."""
    return cs.compare_evaluations(get_db(), ids, mode=mode, target=target, truth=truth,
                                  n_boot=0, as_of_relabel_id=as_of, images=images)


def ci_params(cmp: cs.Comparison, ids: tuple[int, ...], mode: str, target: float, truth: str,
              as_of: int | None) -> dict:
    """What the intervals job computes: these evaluations, labels, images and thresholds."""
    out = dict(evaluation_ids=list(ids), mode=mode, target=target, truth=truth,
               as_of_relabel_id=as_of if truth == "current" else None,
               thresholds=dict(cmp.thresholds), n_boot=N_BOOT)
    return out if cmp.images == "all" else {**out, "images": cmp.images}


N_BOOT = 500


def evaluate_ui(db) -> None:
    """Evaluate a finished run, the default model or a named ensemble on a dataset: a job a
    worker runs."""
    refs = {f"run:{r.id}": f"{r.name} (run:{r.id})" for r in es.evaluable_runs(db)}
    refs.update({e.ref: e.title for e in ensembles.list_ensembles()})
    refs.update({r: t for r, t in shipped_models().items() if r != "default"})
    datasets = {d.name: d for d in list_datasets()}
    c1, c2, c3, c4 = st.columns(4)
    ref = c1.selectbox("Model", [*refs, "default"], key="compare_eval_ref",
                       format_func=lambda r: refs.get(r, "Default model"))
    ref = two_step_ui(db) or ref
    name = c2.selectbox("Dataset", list(datasets), key="compare_eval_data")
    splits = (datasets[name].summary or {}).get("by_split", {}) if name else {}
    split = c3.selectbox("Split", [s for s in splits if s != "(none)"] + ["(all)"],
                         key="compare_eval_split")
    labels = c4.selectbox("Labels", list(LABEL_SOURCES), key="compare_eval_labels",
                          format_func=LABEL_SOURCE_TEXT.get,
                          help="Stored with the evaluation: which labels its numbers use.")
    if st.button("Evaluate", icon=":material/play_arrow:", key="compare_eval_go",
                 disabled=not name):
        # A worker process decodes and predicts; this page only polls the job's progress.
        try:
            st.session_state["compare_job"] = jobs_actions.submit_job(db, principal(), "evaluate", dict(
                model_ref=ref, data=name, split=None if split == "(all)" else split,
                labels=labels), once=False)
        except CxrError as exc:
            st.error(md(exc), icon=":material/block:")
    job_ui("compare_job", "Decoding, then predicting")
    if (job := finished_job("compare_job")) is not None:
        st.toast(f"Stored evaluation #{job.result['evaluation_id']}", icon=":material/check:")


def two_step_ui(db) -> str | None:
    """Optionally, a hierarchical three-class model made of a pneumonia run and a subtype run
    (pneumonia at the first's operating point, then the subtype): its reference."""
    pneumonia, subtype = es.two_step_options(db)
    if not subtype or not st.toggle("Two-step three-class model (pneumonia, then subtype)",
                                     key="compare_two_step"):
        return None
    c1, c2 = st.columns(2)
    first = c1.selectbox("Pneumonia step", list(pneumonia), format_func=pneumonia.get,
                         key="compare_step1")
    second = c2.selectbox("Subtype step", list(subtype), format_func=subtype.get,
                          key="compare_step2")
    return hierarchy.hierarchical_ref(first, second) if first and second else None


def selection_ui(db) -> tuple[tuple[int, ...], str, float, str, str]:
    """2–4 evaluations of one image set, the labels to score them against, which films, and
    the thresholds: operating points, matched, or each model's site threshold."""
    if not (groups := cs.comparable_groups(db)):
        st.info("No two evaluations share the same images yet: evaluate two runs on one dataset.")
        return (), "", 0.0, "", "all"
    g = groups[st.selectbox("Image set", range(len(groups)), key="compare_group",
                            format_func=lambda i: groups[i].label)]
    names = {e.id: e.title for e in g.evaluations}
    ids = st.multiselect("Evaluations (2–4)", list(names), list(names)[:4], names.get,
                         max_selections=4, key=f"compare_evals_{g.images_key[:12]}")
    truth = st.radio("Score every run against", list(LABEL_SOURCES), horizontal=True,
                     format_func=LABEL_SOURCE_TEXT.get, key="compare_truth",
                     help="One truth for all runs: each run's stored per-image outputs are "
                          "re-scored against these labels, whatever labels it was evaluated "
                          "with at the time.")
    c1, c2, c3, binary = *st.columns(3), len(g.labels) == 2
    matched = c1.toggle("Matched sensitivity", key="compare_matched", disabled=not binary,
                        help="On: every run at the threshold reaching the same sensitivity on "
                             "these images. Off: each run's stored operating point.") and binary
    site = c1.toggle("Site thresholds", key="compare_site", disabled=not binary or matched,
                     help="Each model at the threshold recorded for this dataset (Compare → "
                          "Site threshold): the base model and the next round side by side "
                          "at the new site.") and binary and not matched
    mode = "matched" if matched else "site" if site else "operating_point"
    target = c2.slider("Target sensitivity", 0.5, 1.0, 0.95, 0.01, key="compare_target",
                       disabled=not matched)
    images = c3.radio("Films", ["all", "unconfirmed"], key="compare_images",
                      format_func={"all": "all", "unconfirmed": "not confirmed on Review"}.get,
                      help="not confirmed: a site's external validation once its confirmed "
                           "films trained the next round")
    return tuple(sorted(ids)), mode, target, truth, images


def provenance_ui(cmp: cs.Comparison) -> None:
    """Which labels every number uses, the interval unit, and data the models have seen."""
    unit = ("patients (all images of a patient resampled together)" if cmp.ci_unit == "patient"
            else "images (no patient ids known)")
    dropped = (f" {cmp.dropped} images have no class under these labels and are left out of "
               "every run." if cmp.dropped else "") + (
        f" {cmp.confirmed_left_out} films confirmed on Review are left out: only the films "
        "no one confirmed count (a site's external validation)." if cmp.images == "unconfirmed"
        else "")
    st.caption(f"Every number below is scored against **{md(cmp.truth_text)}** on "
               f"{len(cmp.y_true):,} images. 95% intervals: bootstrap over {unit}.{dropped}")
    for row in cmp.provenance_rows:
        if row["warning"]:
            st.warning(f"{md(row['evaluation'])}: {md(row['warning'])}", icon=":material/warning:")


def provenance_table_ui(cmp: cs.Comparison) -> None:
    with st.expander("Label provenance of each evaluation", icon=":material/fact_check:"):
        st.dataframe(pd.DataFrame(cmp.provenance_rows), hide_index=True)


def confusion_ui(cmp: cs.Comparison) -> None:
    for col, name in zip(st.columns(len(cmp.names)), cmp.names):
        cm, t = cmp.reports[name].confusion_matrix, cmp.thresholds[name]
        col.markdown(f"**{md(name)}** · {'argmax' if t is None else f'threshold {t:.3f}'}  \n"
                     f"{md(cmp.threshold_sources[name])}")
        for z, fmt, what in ((cm, True, "counts"),
                             (cm / cm.sum(axis=1, keepdims=True), ".2f", "row-normalised")):
            names = [plotly_escape(label) for label in cmp.labels]
            fig = px.imshow(z, x=names, y=names, text_auto=fmt, title=what,
                            color_continuous_scale="Blues", labels={"x": "predicted", "y": "true"})
            fig.update_layout(coloraxis_showscale=False, height=300, margin=dict(t=40, b=0))
            col.plotly_chart(fig, width="stretch", key=f"compare_cm_{name}_{what}")


def curves_ui(cmp: cs.Comparison) -> None:
    line = dict(color="run", line_dash=None if len(cmp.labels) == 2 else "class",
                hover_data=["threshold", "area"])
    roc, pr, rel = (plot_safe(pd.DataFrame(rows)) for rows in (
        tables.roc_table(cmp.reports), tables.pr_table(cmp.reports),
        tables.reliability_table(cmp.reports)))
    rel_fig = px.line(rel, x="confidence", y="accuracy", color="run", markers=True,
                      hover_data=["count"], title="Reliability (predicted vs observed)")
    rel_fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line=dict(dash="dot", color="grey"))
    for col, fig in zip(st.columns(3), (px.line(roc, x="fpr", y="tpr", title="ROC", **line),
                                        px.line(pr, x="recall", y="precision",
                                                title="Precision–recall", **line), rel_fig)):
        col.plotly_chart(fig, width="stretch")


def metrics_ui(cmp: cs.Comparison, params: dict) -> None:
    """Point estimates at once; the bootstrap intervals from a worker's job (kept per label
    version, so each set of evaluations is resampled once)."""
    result = kept_result("compare_ci", params,
                         f"Bootstrap 95% intervals ({N_BOOT} resamples)", "compare_ci_job")
    if result is not None:
        st.dataframe(pd.DataFrame(result["rows"]), hide_index=True)
        st.caption(f"95% intervals: {result['n_boot']} bootstrap resamples over "
                   f"{'patients' if result['ci_unit'] == 'patient' else 'images'}.")
    else:
        st.dataframe(pd.DataFrame(cmp.metrics_text()), hide_index=True)
    if len(tests := cmp.mcnemar_rows()) == 1:
        st.metric("McNemar p-value", f"{tests[0]['p_value']:.4g}", help=tests[0]["test"])
    st.dataframe(pd.DataFrame(tests), hide_index=True)


def per_class_ui(cmp: cs.Comparison) -> None:
    """scikit-learn's classification report per run, at the thresholds compared above."""
    st.dataframe(pd.DataFrame(cmp.class_rows()), hide_index=True,
                 column_config={k: st.column_config.NumberColumn(format="%.3f")
                                for k in ("precision", "recall", "f1")})
    st.caption("Precision, recall (= sensitivity), F1 and support of each class at each run's "
               "threshold above (argmax for multi-class); macro avg is the unweighted mean over "
               "classes, weighted avg weights each class by its support.")


def send(cmp: cs.Comparison, row: dict, sent_by: Principal) -> None:
    try:
        actions.send_disagreement(get_db(), sent_by, **cmp.review_payload(row))
        st.toast("Sent to review", icon=":material/rate_review:")
    except CxrError as exc:
        st.toast(md(exc), icon=":material/error:")


def disagreements_ui(cmp: cs.Comparison) -> None:
    rows = cmp.disagreement_rows()
    st.caption(f"The runs disagree on **{len(rows)}** of {len(cmp.y_true)} images.")
    who = acting_as("Your name (stored with items sent to review)", "compare_sent_by") \
        if principal().can("send_to_review") else None
    page = st.number_input("Page (12 images a page)", 1, max(1, -(-len(rows) // 12)),
                           key="compare_page")
    shown = rows[(page - 1) * 12:page * 12]
    for start in range(0, len(shown), 4):
        for col, row in zip(st.columns(4), shown[start:start + 4]):
            if (thumb := thumbnail(row["path"], None)) is not None:
                col.image(thumb, width="stretch")
            col.caption(row["summary"])  # markdown: its names are escaped
            col.button("Send to review", key=f"compare_send_{row['index']}", on_click=send,
                       args=(cmp, row, who), icon=":material/rate_review:",
                       disabled=row["image_id"] is None or who is None)


def subgroups_ui(cmp: cs.Comparison) -> None:
    by = st.selectbox("Subgroups by", list(subgroups.SUBGROUPS),
                      format_func=subgroups.SUBGROUPS.get, key="compare_subgroups_by")
    rows = subgroups.subgroup_rows(get_db(), cmp, by)
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.caption("Each run at its compared threshold. Site, sex, age and view come from the "
               "dataset's metadata.csv (\"(unknown)\" where it has none); subtype from the "
               "file names. Small subgroups give noisy numbers.")


def operating_point_ui(cmp: cs.Comparison) -> None:
    runs = {e.run_id: n for n, e in cmp.evaluations.items() if e.run_id is not None}
    if len(cmp.labels) != 2 or not runs:
        st.info("Operating points belong to binary runs (multi-class uses the argmax).")
        return
    run_id = st.selectbox("Run", list(runs), format_func=runs.get, key="compare_op_run")
    history = ops.operating_point_history(get_db(), run_id)
    st.dataframe(pd.DataFrame(history).drop(columns=["id", "run_id"], errors="ignore"),
                 hide_index=True)
    with st.form("compare_op_form"):  # an explicit, recorded user action
        threshold = st.number_input("New threshold", 0.0, 1.0, history[0].threshold if history
                                    else 0.5, 0.01, format="%.3f", key="compare_op_threshold")
        who = acting_as("Your name", "compare_op_who")
        note = st.text_input("Reason", key="compare_op_note")
        submitted = st.form_submit_button("Set operating point", icon=":material/tune:", help=(
            "Changes Predict and Compare for everyone; recorded with your name and reason. "
            "Prefer thresholds chosen on validation data."))
    if submitted:
        try:
            if who is None:
                raise ConfigError("setting an operating point needs the name of who sets it")
            actions.set_manual_threshold(get_db(), who, run_id=run_id, threshold=threshold,
                                         note=note, evaluation_id=cmp.evaluations[runs[run_id]].id)
            comparison.clear()
            st.rerun()
        except CxrError as exc:
            st.error(md(exc))


st.title("Compare runs")
with st.expander("Evaluate a model on a dataset", icon=":material/science:"):
    evaluate_ui(get_db())
with st.expander("Site threshold: an operating point for one dataset",
                 icon=":material/location_on:"):
    site_threshold_ui()
with st.expander("Named ensembles: the mean of a few runs as one model",
                 icon=":material/join:"):
    ensemble_form_ui()
ids, mode, target, truth, images = selection_ui(get_db())
if len(ids) < 2:
    st.stop()
as_of = es.newest_relabel_for(get_db(), ids[0]) if truth == "current" else None
try:
    cmp = comparison(ids, mode, target, truth, as_of, images)
except CxrError as exc:
    st.error(md(exc))
    st.stop()
provenance_ui(cmp)
views = {"Confusion matrices": confusion_ui, "Curves": curves_ui,
         "Metrics (95% CI)": lambda c: metrics_ui(c, ci_params(c, ids, mode, target, truth,
                                                               as_of)),
         "Per class": per_class_ui,
         "Subgroups": subgroups_ui, "Disagreements": disagreements_ui,
         "Operating points": operating_point_ui}
for tab, view in zip(st.tabs(list(views)), views.values()):
    with tab:
        view(cmp)
provenance_table_ui(cmp)
