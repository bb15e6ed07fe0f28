"""Class balance: counts, patients, sizes, duplicates, leakage, split preview, balancing."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages._access import md
from app_pages._db import get_db
from app_pages._shared import dataset_picker, image_path, kept_result, plot_safe, thumbnail
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import LABEL_SCHEMES
from cxr_core.data import indexing
from cxr_core.data.balance_report import Aggregates, SplitPreview, balance_tables
from cxr_core.data.balancing import BALANCING, balance_summary
from cxr_core.data.splits import SPLIT_STRATEGIES
from cxr_core.training import label_audit

SCHEME_NAMES = {"binary": "Binary (normal / pneumonia)",
                "three_class": "3-class (normal / bacteria / virus)",
                "folders": "Folder classes",
                "subtype": "Subtype among pneumonia (bacteria / virus)"}


@st.cache_data(show_spinner=False, max_entries=32)
def original_tables(dataset_id: int, indexed_at: object, scheme: str) -> Aggregates:
    """SQL aggregates over the original labels (the index time keys the cache)."""
    return balance_tables(get_db(), dataset_id, scheme)


def current_tables(info, relabel_id: int | None, scheme: str) -> Aggregates | None:
    """The same tables over the labels as of ``relabel_id``: deriving every image's current
    label reads all relabel rows, so a worker does it once per label version (None while it
    runs)."""
    result = kept_result("balance_tables", dict(
        dataset_id=info.id, scheme=scheme, as_of_relabel_id=relabel_id,
        indexed_at=str(info.indexed_at)), "Counting the current labels", "balance_tables_job")
    return None if result is None else Aggregates(**result)


def labels_ui(dataset_id: int) -> tuple[bool, int | None]:
    """Original labels or labels as of now: (current?, the newest relabel id then)."""
    n, newest = indexing.relabel_position(get_db(), dataset_id)
    if not n:
        return False, None
    current = st.toggle(f"Use current labels ({n} clinician relabels)", key="balance_current")
    return current, newest


def relabel_delta_ui(original: Aggregates, current: Aggregates) -> None:
    orig = pd.DataFrame(original.counts).groupby("class")["images"].sum()
    cur = pd.DataFrame(current.counts).groupby("class")["images"].sum()
    st.dataframe(pd.DataFrame({"original": orig, "current": cur}).fillna(0).astype(int)
                 .assign(change=lambda d: d["current"] - d["original"]), width="stretch")


SPLIT_NAMES = {"patient": "Patient (random, in-distribution)",
               "temporal": "Temporal (earliest patients held out)",
               "group": "Group (leave one folder out)"}


def options_ui() -> tuple[str, float, int, str, str | None]:
    c1, c2, c3 = st.columns([2, 1, 1])
    scheme = c1.radio("Label scheme", LABEL_SCHEMES, format_func=SCHEME_NAMES.get,
                      horizontal=True, key="balance_scheme")
    val = c2.slider("Validation share (by patient)", 0.05, 0.5, 0.15, 0.05, key="balance_val")
    seed = int(c3.number_input("Split seed", 0, 10_000, 0, key="balance_seed"))
    s1, s2 = st.columns([2, 2])
    split = s1.radio("Validation split", SPLIT_STRATEGIES, format_func=SPLIT_NAMES.get,
                     horizontal=True, key="balance_split",
                     help="Temporal holds out the earliest share of each class (acquisition "
                          "date, else the patient number of Kermany names): the official test "
                          "split is the earliest patients, so this is its proxy. Every "
                          "strategy keeps a patient's images and identical files together.")
    group = s2.text_input("Folder to hold out", key="balance_group",
                          placeholder="e.g. train/site_b or site:site_b", disabled=split != "group").strip()
    return scheme, val, seed, split, (group or None) if split == "group" else None


def counts_ui(rep: Aggregates) -> None:
    counts = plot_safe(pd.DataFrame(rep.counts))
    if counts.empty:
        return
    c1, c2 = st.columns(2)
    c1.plotly_chart(px.bar(counts, x="class", y="images", color="subtype", facet_col="split",
                           title="Images per split × class × subtype"), width="stretch")
    pats = plot_safe(pd.DataFrame(rep.patients))
    if not pats.empty:
        c2.plotly_chart(px.bar(pats.melt(id_vars="class", var_name="count"), x="class",
                               y="value", color="count", barmode="group",
                               title="Patients and images per class"), width="stretch")


def sizes_ui(rep: Aggregates) -> None:
    sizes = plot_safe(pd.DataFrame(rep.sizes))
    if sizes.empty:
        return
    c1, c2 = st.columns(2)
    c1.plotly_chart(px.scatter(sizes, x="width", y="height", color="mode", size="images",
                               opacity=0.6, hover_data=["images"],
                               title="Image sizes (px) and modes (marker size: images)"),
                    width="stretch")
    c2.plotly_chart(px.bar(sizes.groupby("mode", as_index=False)["images"].sum(), x="mode",
                           y="images", title="Colour modes"), width="stretch")


def split_ui(params: dict) -> SplitPreview | None:
    """The split preview of the chosen strategy: computed by a worker, kept with its job
    (keyed by the label version), so each version is split once."""
    st.subheader(f"{SPLIT_NAMES[params['split']].split(' (')[0]} split "
                 "(validation made from train, grouped by patient)")
    if params["split"] == "group" and not params["split_group"]:
        st.info("Name the folder to hold out (relative to the dataset).")
        return None
    result = kept_result("split_preview", params, "Computing the patient-grouped split",
                         "balance_split_job")
    if result is None:
        return None
    rep = SplitPreview.from_json(result)
    ok = rep.split_overlap == 0
    icon = ":material/check_circle:" if ok else ":material/error:"
    st.caption(f"{icon} patients in both train and validation: "
               f"**{rep.split_overlap}**; byte-identical duplicates are kept in one split.")
    if rep.val_order:
        st.dataframe(pd.DataFrame(rep.val_order).T.rename_axis("class"), width="stretch")
        st.caption("Held out (val) and trained on (train): the acquisition dates, or the "
                   "patient numbers per numbering series, of each class."
                   + (f" {rep.unordered} images have neither and stay in train."
                      if rep.unordered else ""))
    split = plot_safe(pd.DataFrame(rep.split_counts))
    if not split.empty:
        st.plotly_chart(px.bar(split, x="split", y="images", color="class", barmode="group"),
                        width="stretch")
    return rep


def balancing_ui(rep: SplitPreview) -> None:
    st.subheader("Balancing the training split")
    if rep.weights:
        st.dataframe(pd.DataFrame({"images": rep.class_counts, "class weight": rep.weights}),
                     width="stretch")
        st.caption("Class weight = total / (n_classes × count), as in the reports.")
    scheme = st.session_state.get("balance_scheme", "binary")
    ratio_txt = st.text_input("Oversampling target ratio (one number per class, in the order "
                              f"{md(', '.join(rep.classes))})", ":".join("1" * len(rep.classes)),
                              key=f"balance_ratio_{scheme}")
    try:
        ratio = [float(x) for x in ratio_txt.split(":")]
        rows = {s: balance_summary(rep.class_counts, s, target_ratio=ratio if s == "oversample"
                                   else None) for s in BALANCING}
    except (ValueError, CxrError) as exc:
        st.error(f"Ratio must look like 2:1:2 with one number per class. Received: "
                 f"{md(repr(ratio_txt))} ({md(exc)})")
        return
    st.dataframe(pd.DataFrame(rows), width="stretch")


def integrity_ui(rep: Aggregates) -> None:
    c1, c2 = st.columns(2)
    c1.subheader(f"Byte-identical duplicates: {rep.duplicate_groups:,} groups")
    if rep.duplicates:
        c1.dataframe(pd.DataFrame(rep.duplicates), hide_index=True, width="stretch", height=260)
        if rep.duplicate_groups > len({d["group"] for d in rep.duplicates}):
            c1.caption(f"The first {len(rep.duplicates)} rows are shown.")
    c2.subheader(f"Patients in several split folders: {rep.n_leaked:,}")
    if rep.leaked_patients:
        c2.dataframe(pd.DataFrame(rep.leaked_patients), hide_index=True, width="stretch")
        if rep.n_leaked > len(rep.leaked_patients):
            c2.caption(f"The first {len(rep.leaked_patients)} patients are shown.")


def noise_ui(dataset_id: int) -> None:
    """The estimated noise matrix of each finished label audit (out-of-fold confident
    learning): P(given label | true label), rows given, columns estimated true."""
    audits = {a.id: a for a in label_audit.list_audits(get_db(), dataset_id, finished=True)}
    if not audits:
        return
    st.subheader("Estimated label noise (label audits)")
    a = audits[st.selectbox("Label audit", list(audits), format_func=lambda i: audits[i].title,
                            key="balance_audit")]
    res = a.result or {}
    noise = res.get("noise_matrix") or {}
    names = [md(label) for label in noise.get("labels", [])]
    c1, c2 = st.columns([3, 2])
    fig = px.imshow(noise.get("matrix", []), x=names, y=names, text_auto=".3f",
                    color_continuous_scale="Blues", zmin=0, zmax=1,
                    labels={"x": "estimated true label", "y": "given label"},
                    title="P(given | true): each column sums to 1")
    fig.update_layout(coloraxis_showscale=False, height=320, margin=dict(t=40, b=0))
    c1.plotly_chart(fig, width="stretch", key="balance_noise")
    c2.dataframe(pd.DataFrame({"given": res.get("given_counts", {}),
                               "flagged": res.get("issues_by_given", {}),
                               "threshold": res.get("thresholds", {})}), width="stretch")
    c2.caption(f"{res.get('n_issues', 0):,} of {res.get('n_scored', 0):,} films flagged; each "
               f"scored by a model that never trained on it ({a.folds} patient-grouped folds, "
               f"{a.label_source} labels, snapshot {a.snapshot_hash[:12]}). Review → Likely "
               "mislabelled shows them, most likely wrong first.")


@st.cache_data(show_spinner=False, max_entries=16)
def samples(dataset_id: int, indexed_at: object) -> dict[str, list]:
    return indexing.sample_images(get_db(), dataset_id, per_class=8)


def samples_ui(info) -> None:
    st.subheader("Samples per class")
    sizes = info.summary.get("by_class", {}) if info.summary else {}
    for label, rows in sorted(samples(info.id, info.indexed_at).items()):
        n = sizes.get(label)
        st.markdown(f"**{md(label)}**" + (f" ({n:,})" if n else ""))
        for col, (relpath, subtype, size) in zip(st.columns(8), rows):
            thumb = thumbnail(image_path(info, relpath), size) if info.layout != "npz" else None
            if thumb is not None:
                col.image(thumb, caption=md(subtype or relpath.rsplit("/", 1)[-1][:18]))


st.title(":material/bar_chart: Class balance")
info = dataset_picker("balance")
if info is not None:
    summary = info.summary or {}
    m = st.columns(5)
    m[0].metric("Images", f"{summary.get('images', info.n_images):,}")
    m[1].metric("Patients", f"{summary.get('patients', 0):,}")
    m[2].metric("Duplicate groups", summary.get("duplicate_groups", 0))
    m[3].metric("Cross-split duplicates", summary.get("cross_split_duplicates", 0))
    m[4].metric("Unreadable", summary.get("unreadable", 0))
    for problem in summary.get("problems", [])[:20]:
        st.warning(md(problem))
    scheme, val, seed, split, group = options_ui()
    current, relabel_id = labels_ui(info.id)
    rep = original_tables(info.id, info.indexed_at, scheme)
    if current and (rep_now := current_tables(info, relabel_id, scheme)) is not None:
        relabel_delta_ui(rep, rep_now)
        rep = rep_now
    counts_ui(rep)
    if rep.unlabelled:
        st.warning(f"{rep.unlabelled} images have no class under this scheme "
                   "(e.g. pneumonia without a stated bacteria/virus subtype, in the file name "
                   "or a reviewer's label) and are left out.")
    preview = split_ui(dict(dataset_id=info.id, scheme=scheme, val_fraction=val, seed=seed,
                            labels="current" if current else "original",
                            as_of_relabel_id=relabel_id if current else None,
                            split=split, split_group=group,
                            indexed_at=str(info.indexed_at)))
    if preview is not None:
        balancing_ui(preview)
    noise_ui(info.id)
    integrity_ui(rep)
    sizes_ui(rep)
    samples_ui(info)
