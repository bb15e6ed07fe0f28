"""Review's reading widgets: the dataset's reading mode (blind, reads per image), what a reader
sees once they have answered, and the adjudication of conflicting reads."""
from __future__ import annotations

import streamlit as st

from app_pages._access import md, principal
from app_pages._db import get_db
from cxr_core.auth.policy import Principal
from cxr_core.core.errors import CxrError
from cxr_core.review import actions
from cxr_core.review import queues as review
from cxr_core.review import reading


def reading_mode_ui(state: review.ReviewState) -> None:
    """The reading mode in force; a scientist or admin may change it (an audited row)."""
    mode = state.reading
    blind, reads = (mode.blind, mode.reads_per_image) if mode else (False, 1)
    text = (f"{'Blind' if blind else 'Open'} reading, "
            f"{'double' if reads == 2 else str(reads) + '×' if reads > 2 else 'single'} reading")
    with st.sidebar.expander(f"Reading mode: {text}", icon=":material/visibility_off:"
                             if blind else ":material/visibility:"):
        st.caption("Blind: no model score, no other reader's label and no folder label until "
                   "you answer. Reads per image 2 (double reading): agreeing reads make the "
                   "label that counts; a conflict keeps the label that counted before until an "
                   "adjudicator decides.")
        if not principal().can("review_settings"):
            st.caption("Changing it needs the scientist role.")
            return
        with st.form("review_mode_form", border=False):
            new_blind = st.toggle("Blind reading", value=blind, key="review_mode_blind")
            new_reads = st.number_input("Reads per image", 1, 5, reads, key="review_mode_reads")
            note = st.text_input("Why (kept with the setting)", key="review_mode_note")
            if st.form_submit_button("Save reading mode", icon=":material/save:"):
                try:
                    actions.set_reading(get_db(), principal(), dataset_id=state.dataset_id,
                                        blind=bool(new_blind), reads_per_image=int(new_reads),
                                        note=note)
                    st.rerun()
                except CxrError as exc:
                    st.error(md(exc))


def last_answer_ui(state: review.ReviewState) -> None:
    """After an answer: what was hidden before it (blind reading) and why the label audit
    flagged the film (the likely-mislabelled queue)."""
    last = st.session_state.get("review_last")
    if not last or last[0] != state.dataset_id:
        return
    _, entry, relabel_id = last
    try:
        r = reading.reveal(get_db(), state, entry, relabel_id)
    except CxrError:  # undone meanwhile, or another dataset
        return
    lines = [f"You answered **{md(r.answer)}** for {md(r.title)}",
             f"Folder label: **{md(r.folder_label)}** · label that counts now: "
             f"**{md(r.counts_now)}**"]
    if r.pending:
        lines.append(md(r.pending))
    if r.model:
        lines.append(f"Model: {md(r.model)}")
    if r.readers:
        lines.append("Readers: " + ", ".join(f"{md(w)}: **{md(lab)}**" for w, lab in r.readers))
    if r.why_flagged:
        lines.append(f"Why it was flagged: {md(r.why_flagged)}")
    st.info("  \n".join(lines), icon=":material/fact_check:")


def adjudication_ui(state: review.ReviewState, entry: review.QueueEntry, who: Principal,
                    choices: list[review.LabelChoice], act) -> None:
    """An image whose readers conflict: their reads, then one button per label."""
    rnd = reading.reading_round(get_db(), entry.image_id)
    st.markdown(f"**Conflicting reads** · the label that counts until you decide: "
                f"**{md(review.format_label(*rnd.current))}**")
    st.dataframe([{"reader": r.reviewer, "read": review.format_label(r.new_label, r.new_subtype),
                   "when (UTC)": f"{r.created_at:%Y-%m-%d %H:%M}", "note": r.note}
                  for r in rnd.reads], hide_index=True)
    if entry.score is not None:
        st.caption(f"Model: P(pneumonia) {entry.score:.3f} · {md(entry.run_ref)}")
    if not who.can("adjudicate"):
        st.warning("Adjudicating needs the adjudicator role (or admin).", icon=":material/block:")
        return
    st.text_area("Why (kept with the adjudication)", key="review_note", height=68)
    for n, choice in enumerate(choices):
        st.button(f"Adjudicate: {choice.text}", key=f"review_adjudicate_{n}", type="primary",
                  width="stretch", on_click=act, args=("adjudicate", who, entry, choice))
    c1, c2 = st.columns(2)
    c1.button("Skip", key="review_skip", icon=":material/skip_next:", width="stretch",
              on_click=act, args=("skip", who, entry))
    c2.button("Undo", key="review_undo_btn", icon=":material/undo:", width="stretch",
              disabled=not st.session_state.get("review_undo"), on_click=act, args=("undo", who))
