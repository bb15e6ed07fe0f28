"""Review: clinicians confirm or correct labels; each click appends one relabel row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from app_pages._access import auth_on, md, principal, require_page
from app_pages._db import get_db
from app_pages._reading import adjudication_ui, last_answer_ui, reading_mode_ui
from app_pages._shared import dataset_picker, finished_job, job_ui, kept_result
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import CxrError
from cxr_core.jobs import actions as jobs_actions
from cxr_core.predict import explain
from cxr_core.review import actions
from cxr_core.review import agreement as agreement_mod
from cxr_core.review import queues as review
from cxr_core.review import view as review_view


def reviewer_ui() -> Principal | None:
    """Signed in: the principal (a reviewer or above; others are refused). Local mode: a name
    typed once a session becomes the local identity stored with each label."""
    if auth_on():
        return require_page("review", "Review")
    if name := st.session_state.get("review_reviewer"):
        st.sidebar.caption(f"Reviewing as **{md(name)}**")
        return principal()
    if typed := st.text_input("Your name (stored with each label)", key="review_name").strip():
        st.session_state["review_reviewer"] = typed
        st.rerun()
    return None


def queue_ui(state: review.ReviewState, classes: list[str], who: Principal) -> dict:
    """Queue, class, audit and model pickers; returns the queue arguments of ``next_in_queue``."""
    kinds = [k for k in review.QUEUES if (k != "mislabelled" or state.audits)
             and (k != "conflicts" or who.can("adjudicate") or state.n_conflicts)]
    kind = st.sidebar.radio("Queue", kinds, format_func=review.QUEUES.get, key="review_queue")
    cls = st.sidebar.selectbox("Class", classes, key="review_class") if kind == "class" else None
    if kind == "mislabelled":
        audits = {a.id: a.title for a in state.audits}
        st.sidebar.selectbox("Label audit", list(audits), format_func=audits.get,
                             key="review_audit")
        st.sidebar.caption("Films a label audit flagged: scored by models that never trained "
                           "on them (out of fold), most likely mislabelled first. Why each was "
                           "flagged is shown after you answer.")
    if kind == "conflicts":
        st.sidebar.caption(f"{state.n_conflicts} film(s) whose readers disagree wait for an "
                           "adjudication.")
    names = {r.model_ref: f"{r.name} ({r.model_ref})" if r.name != r.model_ref else r.model_ref
             for r in state.runs}
    if names:
        st.sidebar.selectbox("Model", list(names), format_func=names.get, key="review_run")
    elif kind in ("disagreement", "uncertain", "new_site"):
        st.info("No model has stored predictions on this dataset yet: evaluate one on it "
                "(Compare → Evaluate), or train one first.")
    if kind == "new_site":
        st.sidebar.caption("Ordered for learning: the film the model is least sure of, one per "
                           "patient before any patient's second. Confirmed films feed the site "
                           "threshold (Compare) and the next training round (Train → extra "
                           "data).")
    if state.open_uploads:
        st.sidebar.caption(f"{state.open_uploads} uploads wait in the “sent” queue.")
    seed = st.session_state.setdefault("review_seed", int(np.random.randint(1 << 30)))
    return {"kind": kind, "class_name": cls, "seed": seed,
            "skipped": st.session_state.get("review_skipped", [])}


def view_ui() -> dict:
    c1, c2, c3 = st.columns(3)
    view = {"zoom": c1.slider("Zoom", 1.0, 4.0, 1.0, 0.25, key="review_zoom"),
            "level": c2.slider("Level", 0, 255, 128, key="review_level"),
            "window": c3.slider("Window (contrast)", 16, 512, 256, 8, key="review_window")}
    if view["zoom"] > 1:
        view["center"] = (c1.slider("Pan x", 0.0, 1.0, 0.5, key="review_pan_x"),
                          c1.slider("Pan y", 0.0, 1.0, 0.5, key="review_pan_y"))
    return view


explainer = st.cache_resource(show_spinner="Loading the model…")(explain.load_explainer)


@st.cache_data(show_spinner="Computing saliency…", max_entries=64)
def heatmap(ref: str, path: str, version: str | None, threshold: float | None) -> np.ndarray:
    """Saliency of one image; ``version`` (the content hash) keys the cache."""
    return explain.saliency_map(explainer(ref), pixels(path, version), threshold=threshold)


@st.cache_data(show_spinner=False, max_entries=32)
def pixels(path: str, version: str | None) -> np.ndarray:
    """The decoded film, once per file version (not on every click's rerun)."""
    return review_view.view_pixels(path)


def act(action: str, reviewer: Principal, entry=None, choice=None, dataset_id=None,
        blind=False) -> None:
    """Button callback: one relabel / adjudication / undo row (its own short transaction), or
    a skip; done as the principal (checked and audited in cxr_core.auth.gate)."""
    stack = st.session_state.setdefault("review_undo", [])
    try:
        if action == "label":
            stack.append(actions.relabel(
                get_db(), reviewer, image_id=entry.image_id, upload_sha256=entry.upload_sha256,
                choice=choice, note=st.session_state.pop("review_note", ""),
                run_ref=None if blind else entry.run_ref, score=None if blind else entry.score))
            st.session_state["review_last"] = (dataset_id, entry, stack[-1])
        elif action == "adjudicate":
            stack.append(actions.adjudicate(get_db(), reviewer, image_id=entry.image_id,
                                            choice=choice,
                                            note=st.session_state.pop("review_note", "")))
        elif action == "undo":
            actions.undo_relabel(get_db(), reviewer, relabel_id=stack.pop(), note="undo")
        else:
            st.session_state.setdefault("review_skipped", []).append(entry.key)
    except CxrError as exc:
        st.toast(md(exc), icon=":material/error:")


def decision_ui(state: review.ReviewState, entry: review.QueueEntry, reviewer: Principal,
                choices: list[review.LabelChoice]) -> None:
    """What is known about the image (or upload), then one button per label, skip and undo.
    Blind reading shows the film's path only: no label, no reader, no score until answered."""
    about = review_view.describe_entry(get_db(), state, entry)
    blind = state.blind and entry.image_id is not None
    if blind:  # not even the path: its folder and file name carry the label
        st.markdown(f"**Image {entry.image_id}**  \nBlind reading: the file name, folder label, "
                    "other readers' labels and the model's score are shown after you answer.")
    else:
        # md() rather than code spans: a backtick in a label would end a span early.
        others = ", ".join(f"{md(who)}: **{md(label)}**" for who, label in about.reviewers)
        st.markdown(f"**{md(about.title)}**" + "".join(f"  \n{md(k)}: **{md(v)}**"
                                                       for k, v in about.facts)
                    + (f"  \nReviewers: {others}" if others else ""))
    if about.warning:
        st.warning(md(about.warning), icon=":material/published_with_changes:")
    if entry.score is not None and not blind:
        st.metric(f"P(pneumonia) · {entry.run_ref}", f"{entry.score:.3f}",
                  help=f"The model predicts {entry.predicted}")
    st.text_area("Note (optional)", key="review_note", height=68)
    # One button per row: side by side, "PNEUMONIA·bacteria" and "PNEUMONIA·virus" truncated
    # to the same "PNEUMO…" in a 1400 px window.
    for n, choice in enumerate(choices):
        st.button(choice.text, key=f"review_label_{n}", type="primary", width="stretch",
                  shortcut=str(n + 1) if n < 9 else None, on_click=act,
                  args=("label", reviewer, entry, choice, state.dataset_id, blind))
    c1, c2 = st.columns(2)
    c1.button("Skip", key="review_skip", shortcut="S", icon=":material/skip_next:",
              width="stretch", on_click=act, args=("skip", reviewer, entry))
    c2.button("Undo", key="review_undo_btn", shortcut="U", icon=":material/undo:",
              width="stretch", disabled=not st.session_state.get("review_undo"), on_click=act,
              args=("undo", reviewer))


def image_ui(state: review.ReviewState, entry: review.QueueEntry, info) -> None:
    path, sha = review_view.entry_image(get_db(), entry, info.root)
    if path is None:
        st.error(f"The stored upload {entry.upload_sha256} is missing from the uploads folder.")
        return
    why_not = explain.saliency_unavailable(entry.run_ref, state.artifact_dirs)
    if state.blind and entry.image_id is not None:
        why_not = "blind reading shows no model output before you answer"
    show = st.toggle("Saliency", key="review_saliency", disabled=bool(why_not)) and not why_not
    if why_not:
        st.caption(f"Saliency unavailable: {md(why_not)}.")
    view = view_ui()
    try:
        heat = heatmap(entry.run_ref, path, sha, state.threshold) if show else None
        st.image(review_view.render_view(pixels(path, sha), heat=heat, **view), width="stretch")
    except CxrError as exc:
        st.error(md(exc))


CONFLICTS_PAGE = 25


def agreement_ui(state: review.ReviewState) -> None:
    """Kappa per reviewer pair and conflicts: SQL aggregates over every relabel, computed by a
    worker once per relabel version (the newest relabel id keys the kept result)."""
    if not st.toggle("Reviewer agreement (Cohen's kappa) and conflicts", key="review_agreement"):
        export_ui(state.dataset_id)
        return
    page = int(st.session_state.get("review_conflicts_page", 1))
    result = kept_result("agreement", dict(
        dataset_id=state.dataset_id, newest_relabel_id=review.newest_relabel_id(
            get_db(), state.dataset_id), limit=CONFLICTS_PAGE,
        offset=(page - 1) * CONFLICTS_PAGE), "Comparing reviewers", "review_agreement_job")
    if result is not None:
        agr = agreement_mod.Agreement.from_json(result)
        st.dataframe([p.__dict__ for p in agr.pairs], hide_index=True)
        if agr.fleiss is not None:
            k = agr.fleiss.kappa
            st.metric("Fleiss' kappa (three or more readers)",
                      "undefined" if k is None else f"{k:.3f}",
                      help=f"{agr.fleiss.n_images:,} images read by 3+ readers, "
                           f"{agr.fleiss.ratings_per_image:.1f} readers per image on average")
        st.caption(f"{agr.n_conflicts:,} images where reviewers' newest labels differ")
        st.dataframe([{"image": c.relpath, **dict(c.labels)} for c in agr.conflicts],
                     hide_index=True)
        if agr.n_conflicts > CONFLICTS_PAGE:
            st.number_input("Conflicts page", 1, -(-agr.n_conflicts // CONFLICTS_PAGE),
                            key="review_conflicts_page")
    export_ui(state.dataset_id)


def export_ui(dataset_id: int) -> None:
    """Every relabel row as CSV: a worker writes the file, then it downloads from here."""
    if not principal().can("export_relabels"):
        st.caption("Exporting every relabel needs the scientist role.")
        return
    if st.button("Prepare CSV of all relabels", icon=":material/table_view:",
                 key="review_export_go"):
        try:
            st.session_state["review_export"] = jobs_actions.submit_job(
                get_db(), principal(), "export_relabels", {"dataset_id": dataset_id}, once=False)
        except CxrError as exc:
            st.error(md(exc), icon=":material/block:")
    job_ui("review_export", "Writing relabels CSV")
    if (job := finished_job("review_export", keep=True)) is not None and job.result:
        path = Path(job.result["path"])
        st.download_button(f"Download relabels.csv ({job.result['rows']:,} rows)",
                           data=path.read_bytes, file_name="relabels.csv", mime="text/csv",
                           icon=":material/download:", key="review_export_download",
                           on_click="ignore", disabled=not path.exists())


st.title("Review")
reviewer = reviewer_ui()
info = dataset_picker("review") if reviewer else None
if info is None:
    st.stop()
state = review.load_state(get_db(), info.id, st.session_state.get("review_run"),
                          st.session_state.get("review_audit"))
reading_mode_ui(state)
args = queue_ui(state, sorted(info.classes), reviewer)
view = review.next_in_queue(get_db(), state, reviewer=reviewer.identity, **args)
if state.changed_since_relabel:
    st.warning(f"{len(state.changed_since_relabel)} relabelled image(s) changed on disk since "
               "they were relabelled; their relabels are kept and flagged where they appear.",
               icon=":material/published_with_changes:")
st.progress(view.done_fraction, text=f"{view.n_reviewed} reviewed, {view.n_left} left")
last_answer_ui(state)
if view.current is None:
    st.success("Nothing left in this queue.", icon=":material/done_all:")
    if st.session_state.get("review_undo"):
        st.button("Undo", key="review_undo_btn", icon=":material/undo:", on_click=act,
                  args=("undo", reviewer))
else:
    left, right = st.columns([3, 2])
    choices = review.label_choices(info.classes, state.label_pairs)
    with left:
        image_ui(state, view.current, info)
    with right:
        if args["kind"] == "conflicts":
            adjudication_ui(state, view.current, reviewer, choices, act)
        else:
            decision_ui(state, view.current, reviewer, choices)
agreement_ui(state)
