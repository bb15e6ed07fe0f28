"""Compare → Site threshold: re-choose a model's operating point for one dataset (a site) on
its labelled sample, see it with patient-clustered intervals (a worker's job), record it."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages._access import acting_as, md, principal
from app_pages._db import get_db
from app_pages._shared import kept_result, list_datasets
from cxr_core.core.errors import ConfigError, CxrError
from cxr_core.data.provenance import LABEL_SOURCE_TEXT, LABEL_SOURCES
from cxr_core.evaluation import actions, site_round, site_thresholds
from cxr_core.evaluation import evaluate as es
from cxr_core.jobs import queue
from cxr_core.models.card import fmt_ci

N_BOOT = 500


def choice_ui() -> tuple[str, object] | None:
    """The model and the site (dataset) to calibrate it for."""
    refs = {f"run:{r.id}": f"{r.name} (run:{r.id})" for r in es.evaluable_runs(get_db())}
    datasets = {d.name: d for d in list_datasets()}
    if not datasets:
        st.info("No dataset yet: index the site's images first.")
        return None
    c1, c2 = st.columns(2)
    ref = c1.selectbox("Model", [*refs, "default"], key="site_ref",
                       format_func=lambda r: refs.get(r, "Default model"))
    name = c2.selectbox("Site (dataset)", list(datasets), key="site_data")
    return ref, datasets[name]


def sample_ui(evals: list) -> dict:
    """The labelled sample and the target: the params of the candidate job."""
    names = {e.id: f"#{e.id} [{e.split or 'all'}] {e.n} images, "
                   f"{e.created_at:%Y-%m-%d}" for e in evals}
    c1, c2, c3, c4 = st.columns(4)
    evaluation_id = c1.selectbox("Evaluation (the sample)", list(names), format_func=names.get,
                                 key="site_eval")
    sample = c2.radio("Images", list(site_thresholds.SAMPLES), format_func=site_thresholds.SAMPLES.get, key="site_sample")
    labels = c3.radio("Labels", list(LABEL_SOURCES), format_func=LABEL_SOURCE_TEXT.get,
                      key="site_labels")
    target = c4.slider("Target sensitivity", 0.5, 0.99, 0.95, 0.01, key="site_target")
    as_of = es.newest_relabel_for(get_db(), evaluation_id) if labels == "current" else None
    return dict(evaluation_id=evaluation_id, sample=sample, labels=labels,
                as_of_relabel_id=as_of, method="sensitivity", target=target, n_boot=N_BOOT)


def candidate_ui(cand: dict) -> None:
    """What the threshold gives on the sample, with intervals, and what the global one gives."""
    cols = st.columns(4)
    cols[0].metric("Candidate threshold", f"{cand['threshold']:.3f}")
    for col, key, name in zip(cols[1:], ("sensitivity", "specificity", "auc"),
                              ("Sensitivity", "Specificity", "AUC")):
        ci = fmt_ci(cand[key], cand[key + "_ci"])
        col.metric(name, f"{cand[key]:.3f}", help=f"95% interval: {ci}")
    unit = "patients" if cand["ci_unit"] == "patient" else "images"
    st.caption(
        f"On {cand['n']} images of {md(cand['dataset_name'])} ({cand['n_positive']} positive, "
        f"{cand['n_negative']} negative, {cand['n_patients'] or '?'} patients), "
        f"{LABEL_SOURCE_TEXT.get(cand['label_source'], cand['label_source'])}. 95% intervals "
        f"({cand['n_boot']} bootstrap resamples over {unit}): sensitivity "
        f"{fmt_ci(cand['sensitivity'], cand['sensitivity_ci'])}, specificity "
        f"{fmt_ci(cand['specificity'], cand['specificity_ci'])}, AUC "
        f"{fmt_ci(cand['auc'], cand['auc_ci'])}. Chosen on this sample: the figures at the "
        "candidate are optimistic until scored on other images of the site.")
    if cand["global_threshold"] is not None and cand["global_sensitivity"] is not None:
        st.caption(f"The model's global threshold {cand['global_threshold']:.3f} gives "
                   f"sensitivity {cand['global_sensitivity']:.3f} and specificity "
                   f"{cand['global_specificity']:.3f} on the same sample.")
    crossed_ui(cand)
    for warning in cand["warnings"]:
        st.warning(md(warning), icon=":material/warning:")


def crossed_ui(cand: dict) -> None:
    """What such a threshold gives on films it was not chosen on (cross-fitted), and how the
    interval narrows as more films are confirmed."""
    crossed = cand.get("cross_fitted") or {}
    if crossed.get("refused"):
        st.caption(f"No cross-fitted figure: {md(crossed['refused'])}")
        return
    if not crossed:
        return
    st.markdown(
        f"**On films it was not chosen on** (cross-fitted: chosen on {crossed['folds'] - 1} of "
        f"{crossed['folds']} patient-grouped folds, scored on the last, {crossed['repeats']} "
        f"draws): sensitivity {fmt_ci(crossed['sensitivity'], crossed['sensitivity_ci'])}, "
        f"specificity {fmt_ci(crossed['specificity'], crossed['specificity_ci'])}.")
    steps = cand.get("narrowing") or []
    if len(steps) > 1:
        frame = pd.DataFrame(steps)
        fig = px.line(frame, x="n", y="specificity", markers=True,
                      labels={"n": "films confirmed", "specificity": "specificity (cross-fitted)"},
                      title="How the site threshold's specificity interval narrows")
        fig.add_scatter(x=frame["n"], y=frame["high"], mode="lines", line=dict(width=0),
                        showlegend=False)
        fig.add_scatter(x=frame["n"], y=frame["low"], mode="lines", line=dict(width=0),
                        fill="tonexty", name="95% interval")
        st.plotly_chart(fig, width="stretch", key="site_narrowing")


def record_ui(cand: dict) -> None:
    """Record the candidate for the site: an explicit action with a name and a reason."""
    with st.form("site_record_form"):
        who = acting_as("Your name", "site_who")
        note = st.text_input("Reason / note", key="site_note")
        submitted = st.form_submit_button(
            f"Record as {md(cand['dataset_name'])}'s operating point", icon=":material/tune:",
            help="Predict then decides with it for this dataset's images (and uploads said "
                 "to come from it); the global operating point stays for everything else.")
    if submitted:
        try:
            if who is None:
                raise ConfigError("recording a site's operating point needs the name of who "
                                  "records it")
            op = actions.record_site_threshold(get_db(), who, cand, note=note)
            st.success(f"Recorded: {md(site_thresholds.describe(op))}.", icon=":material/done:")
        except CxrError as exc:
            st.error(md(exc))


def history_ui(ref: str) -> None:
    points = site_thresholds.site_points(get_db(), model_ref=ref)
    if points:
        st.markdown("**Site operating points of this model** (the newest per site is in force)")
        st.dataframe(pd.DataFrame([{
            "site": p.dataset_name, "threshold": round(p.threshold, 4), "method": p.method,
            "target": p.target, "sample": p.sample_n, "sensitivity": p.sensitivity,
            "specificity": p.specificity, "by": p.changed_by, "note": p.note,
            "when": f"{p.created_at:%Y-%m-%d %H:%M}"} for p in points]), hide_index=True)


def site_round_ui() -> None:
    """What confirming a new site's films bought the shipped model, as measured by the bench."""
    try:
        got = site_round.measured()
    except CxrError as exc:
        st.error(md(exc))
        return
    if got is None:
        return
    st.markdown("**What reviewing a new site's films buys** (the shipped model, measured by "
                "`python -m cxr_core bench site-round`)")
    st.plotly_chart(site_round.figure(got), key="site_round_chart")
    st.caption(f"Site {md(got.site)}, {got.folds} patient-grouped folds: every film is scored "
               "only in the fold where no one confirmed it and no threshold was chosen on it; "
               "bars are patient-clustered 95% intervals. Full table: docs/benchmarks.md.")
    if note := (got.raw.get("base_threshold") or {}).get("note"):
        st.caption(f"Base model: {md(note)}.")
    refused = sorted({r["budget"] for r in got.rows if r["refused"]})
    if refused:
        st.caption(f"Site threshold refused at {', '.join(map(str, refused))} films confirmed "
                   "(under 10 of a class).")


def site_threshold_ui() -> None:
    """The whole section: choose, compute (a job), read, record."""
    st.caption("A threshold chosen on one hospital's validation images does not transfer. "
               "With labelled images of a site (its dataset's labels, or only those confirmed "
               "on Review), choose the operating point there and record it for that site.")
    site_round_ui()
    if (choice := choice_ui()) is None:
        return
    ref, info = choice
    evals = site_thresholds.site_evaluations(get_db(), ref, info.id)
    if not evals:
        st.info(f"No evaluation of this model on {md(info.name)} yet: evaluate it there first "
                "(Evaluate a model on a dataset, above).", icon=":material/info:")
    else:
        params = sample_ui(evals)
        asked = st.button("Choose the threshold on this sample", key="site_go",
                          icon=":material/calculate:")
        # Asked once per sample and target (a worker's job); its kept result is shown after.
        cand = kept_result("site_calibration", params, "Choosing the threshold (bootstrap "
                           f"{N_BOOT} resamples)", "site_job") if asked or queue.latest_job(
            get_db(), "site_calibration", params) is not None else None
        if cand is not None:
            candidate_ui(cand)
            if principal().can("site_calibration"):
                record_ui(cand)
            else:
                st.caption("Recording a site's operating point needs the scientist role.")
    history_ui(ref)
