"""Class balance: counts, patients, sizes, duplicates, leakage, split preview, balancing."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from cxr_core.balance_report import BalanceReport, balance_report
from cxr_core.datasets import LABEL_SCHEMES
from cxr_core.errors import CxrError
from cxr_core.balancing import BALANCING, balance_summary
from cxr_core.indexing import current_records, label_snapshot
from app_pages._shared import dataset_picker, get_db, image_path, load_records, thumbnail

SCHEME_NAMES = {"binary": "Binary (normal / pneumonia)",
                "three_class": "3-class (normal / bacteria / virus)",
                "folders": "Folder classes"}


@st.cache_data(show_spinner="Computing the patient-grouped split…", max_entries=16)
def cached_report(dataset_id: int, indexed_at: object, snapshot: str | None, scheme: str,
                  val_fraction: float, seed: int) -> BalanceReport:
    """``snapshot`` is None for original labels, else the current-label hash (cache key)."""
    records = (load_records(dataset_id, indexed_at) if snapshot is None
               else current_records(get_db(), dataset_id))
    return balance_report(records, scheme, val_fraction=val_fraction, seed=seed)


def labels_ui(dataset_id: int) -> str | None:
    """Original labels or labels as of now; returns the snapshot hash for current labels."""
    snap = label_snapshot(get_db(), dataset_id)
    if not snap.n_relabels:
        return None
    current = st.toggle(f"Use current labels ({snap.n_relabels} clinician relabels)",
                        key="balance_current")
    return snap.hash if current else None


def relabel_delta_ui(original: BalanceReport, current: BalanceReport) -> None:
    orig = pd.DataFrame(original.counts).groupby("class")["images"].sum()
    cur = pd.DataFrame(current.counts).groupby("class")["images"].sum()
    st.dataframe(pd.DataFrame({"original": orig, "current": cur}).fillna(0).astype(int)
                 .assign(change=lambda d: d["current"] - d["original"]), width="stretch")


def options_ui() -> tuple[str, float, int]:
    c1, c2, c3 = st.columns([2, 1, 1])
    scheme = c1.radio("Label scheme", LABEL_SCHEMES, format_func=SCHEME_NAMES.get,
                      horizontal=True, key="balance_scheme")
    val = c2.slider("Validation share (by patient)", 0.05, 0.5, 0.15, 0.05, key="balance_val")
    seed = int(c3.number_input("Split seed", 0, 10_000, 0, key="balance_seed"))
    return scheme, val, seed


def counts_ui(rep: BalanceReport) -> None:
    counts = pd.DataFrame(rep.counts)
    c1, c2 = st.columns(2)
    c1.plotly_chart(px.bar(counts, x="class", y="images", color="subtype", facet_col="split",
                           title="Images per split × class × subtype"), width="stretch")
    pats = pd.DataFrame(rep.patients)
    c2.plotly_chart(px.bar(pats.melt(id_vars="class", var_name="count"), x="class", y="value",
                           color="count", barmode="group", title="Patients and images per class"),
                    width="stretch")


def sizes_ui(rep: BalanceReport) -> None:
    sizes = pd.DataFrame(rep.sizes)
    if sizes.empty:
        return
    c1, c2 = st.columns(2)
    c1.plotly_chart(px.scatter(sizes, x="width", y="height", color="mode", opacity=0.5,
                               title="Image sizes (px) and modes"), width="stretch")
    c2.plotly_chart(px.histogram(sizes, x="mode", title="Colour modes"), width="stretch")


def split_ui(rep: BalanceReport) -> None:
    st.subheader("Patient-grouped split (validation made from train)")
    ok = rep.split_overlap == 0
    icon = ":material/check_circle:" if ok else ":material/error:"
    st.caption(f"{icon} patients in both train and validation: "
               f"**{rep.split_overlap}**; byte-identical duplicates are kept in one split.")
    split = pd.DataFrame(rep.split_counts)
    if not split.empty:
        st.plotly_chart(px.bar(split, x="split", y="images", color="class", barmode="group"),
                        width="stretch")
    if rep.unlabelled:
        st.warning(f"{rep.unlabelled} images have no class under this scheme "
                   "(e.g. pneumonia files without bacteria/virus in the name) and are left out.")


def balancing_ui(rep: BalanceReport) -> None:
    st.subheader("Balancing the training split")
    if rep.weights:
        st.dataframe(pd.DataFrame({"images": rep.class_counts, "class weight": rep.weights}),
                     width="stretch")
        st.caption("Class weight = total / (n_classes × count), as in the reports.")
    ratio_txt = st.text_input("Oversampling target ratio (one number per class, in the order "
                              f"{', '.join(rep.classes)})", ":".join("1" * len(rep.classes)),
                              key=f"balance_ratio_{rep.scheme}")
    try:
        ratio = [float(x) for x in ratio_txt.split(":")]
        rows = {s: balance_summary(rep.class_counts, s, target_ratio=ratio if s == "oversample"
                                   else None) for s in BALANCING}
    except (ValueError, CxrError) as exc:
        st.error(f"Ratio must look like 2:1:2 with one number per class. Received: "
                 f"{ratio_txt!r} ({exc})")
        return
    st.dataframe(pd.DataFrame(rows), width="stretch")


def integrity_ui(rep: BalanceReport) -> None:
    c1, c2 = st.columns(2)
    groups = len({d["group"] for d in rep.duplicates})
    c1.subheader(f"Byte-identical duplicates: {groups} groups")
    if rep.duplicates:
        c1.dataframe(pd.DataFrame(rep.duplicates), hide_index=True, width="stretch", height=260)
    c2.subheader(f"Patients in several split folders: {len(rep.leaked_patients)}")
    if rep.leaked_patients:
        c2.dataframe(pd.DataFrame(rep.leaked_patients), hide_index=True, width="stretch")


def samples_ui(info, records, n: int = 8) -> None:
    st.subheader("Samples per class")
    by_class: dict[str, list] = {}
    for r in records:
        if not r.error:
            by_class.setdefault(r.label, []).append(r)
    for label, rs in sorted(by_class.items()):
        st.markdown(f"**{label}** ({len(rs):,})")
        step = max(1, len(rs) // n)
        cols = st.columns(n)
        for col, r in zip(cols, rs[::step][:n]):
            thumb = thumbnail(image_path(info, r.relpath), r.bytes) if info.layout != "npz" else None
            if thumb is not None:
                col.image(thumb, caption=r.subtype or r.relpath.rsplit("/", 1)[-1][:18])


st.title(":material/bar_chart: Class balance")
info = dataset_picker("balance")
if info is not None:
    records = load_records(info.id, info.indexed_at)
    summary = info.summary or {}
    m = st.columns(5)
    m[0].metric("Images", f"{summary.get('images', len(records)):,}")
    m[1].metric("Patients", f"{summary.get('patients', 0):,}")
    m[2].metric("Duplicate groups", summary.get("duplicate_groups", 0))
    m[3].metric("Cross-split duplicates", summary.get("cross_split_duplicates", 0))
    m[4].metric("Unreadable", summary.get("unreadable", 0))
    for problem in summary.get("problems", [])[:20]:
        st.warning(problem)
    scheme, val, seed = options_ui()
    snapshot = labels_ui(info.id)
    try:
        rep = cached_report(info.id, info.indexed_at, snapshot, scheme, val, seed)
    except CxrError as exc:  # a dataset that cannot be split is shown, not fatal
        st.error(str(exc))
    else:
        if snapshot is not None:
            relabel_delta_ui(cached_report(info.id, info.indexed_at, None, scheme, val, seed), rep)
        counts_ui(rep)
        split_ui(rep)
        balancing_ui(rep)
        integrity_ui(rep)
        sizes_ui(rep)
    samples_ui(info, records)
