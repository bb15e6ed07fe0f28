"""Compare → Make a named ensemble: the mean of a few finished runs (seeds, snapshots) as one
model ref, ``ensemble:NAME``, usable on Predict and Compare like any run (issue 14 item 3)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app_pages._access import md, principal
from app_pages._db import get_db
from app_pages._shared import finished_job, job_ui
from cxr_core.core.errors import CxrError
from cxr_core.evaluation import evaluate as es
from cxr_core.jobs import actions
from cxr_core.models import ensembles


def listed_ui() -> None:
    made = ensembles.list_ensembles()
    if made:
        st.dataframe(pd.DataFrame([{"ensemble": e.ref, "members": ", ".join(e.members),
                                    "threshold": e.threshold, "where from": e.threshold_source,
                                    "made by": e.created_by, "note": e.note} for e in made]),
                     hide_index=True)
    else:
        st.caption("No named ensemble yet.")


def ensemble_form_ui() -> None:
    """The named ensembles, and (for the roles that set operating points) a form to make one:
    its threshold is chosen on the members' shared calibration (else validation) outputs, or
    set by hand with a note; a name is written once and never changes meaning."""
    listed_ui()
    p = principal()
    if not p.can("set_operating_point"):
        st.caption("Making an ensemble fixes an operating point: it needs the scientist role.")
        return
    runs = {f"run:{r.id}": f"{r.name} (run:{r.id})" for r in es.evaluable_runs(get_db())}
    with st.form("ensemble_form"):
        c1, c2 = st.columns([2, 1])
        members = c1.multiselect("Members (2 or more finished runs, or the default model)",
                                 [*runs, "default"], key="ens_members",
                                 format_func=lambda r: runs.get(r, "Default model"))
        name = c2.text_input("Name", key="ens_name", placeholder="seeds-cpu128",
                             help="letters, digits, _ . -; starting with a letter")
        c3, c4 = st.columns([1, 2])
        by_hand = c3.toggle("Set the threshold by hand", key="ens_manual")
        threshold = c3.number_input("Threshold", 0.0, 1.0, 0.5, step=0.01, key="ens_threshold")
        note = c4.text_input("Note (why)", key="ens_note")
        go = st.form_submit_button("Make ensemble", icon=":material/join:")
    if go:
        # Loading the members is TensorFlow work: a worker job, polled here.
        try:
            st.session_state["ens_job"] = actions.submit_job(get_db(), p, "create_ensemble", dict(
                name=name.strip(), members=list(members),
                threshold=threshold if by_hand else None, note=note.strip()), once=False)
        except CxrError as exc:
            st.error(md(exc), icon=":material/block:")
    job_ui("ens_job", "Loading the members and choosing the operating point")
    if (job := finished_job("ens_job")) is not None:
        st.success(f"Made {md(job.result['ensemble'])}: {md(job.result['threshold_source'])}.",
                   icon=":material/check:")
