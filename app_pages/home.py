"""Home: what the tool does, the demo model, the datasets and runs it knows, where to go next."""
from __future__ import annotations

import streamlit as st

from cxr_core.errors import CxrError
from cxr_core.model_store import DEFAULT_MODELS_DIR, read_card
from app_pages._shared import dataset_picker, index_report_ui, list_datasets, startup_index_ui

SPLIT_TEXT = {"patient": "a random patient-grouped validation split (in-distribution)",
              "temporal": "a temporal validation split (the earliest patients held out)",
              "group": "a held-out folder (group validation)"}

st.title(":material/pulmonology: CXR Workbench")
st.markdown(
    "Build, check and improve pneumonia classifiers for chest X-rays: explore class balance, "
    "tune augmentation, train with live curves, compare models at matched sensitivity, predict "
    "with saliency maps, and feed clinician relabels into the next training round.")


def demo_model_ui() -> None:
    try:
        card = read_card(DEFAULT_MODELS_DIR / "model_card.json")
    except (CxrError, OSError):
        return
    if not card:
        return
    val, op = card.get("val_metrics", {}), card.get("operating_point", {})
    split = (card.get("training_config") or {}).get("split", "patient")
    st.subheader("Shipped demo model")
    cols = st.columns(4)
    cols[0].metric("Validation AUC", f"{val.get('auc', float('nan')):.3f}")
    cols[1].metric("Sensitivity", f"{op.get('sensitivity', float('nan')):.3f}")
    cols[2].metric("Specificity", f"{op.get('specificity', float('nan')):.3f}")
    cols[3].metric("Threshold", f"{op.get('threshold', float('nan')):.3f}")
    what = SPLIT_TEXT.get(split, split)
    st.caption(f"{card.get('model')} at {card.get('image_size')} px. Measured on **{what}** of "
               f"the Kermany train set ({val.get('n', '?')} images); the operating point was "
               f"chosen on those same images for sensitivity ≥ {op.get('target', 0.95)}.")
    if split == "patient":
        st.warning("These are in-distribution figures: a random patient split of one "
                   "acquisition period, with the threshold chosen on the images it is scored "
                   "on. They are optimistic for a new site or period; do not quote them as "
                   "deployment performance. Evaluate on your own data (Compare) and set the "
                   "operating point there.", icon=":material/warning:")
    st.page_link("app_pages/predict.py", label="Try it on an X-ray", icon=":material/radiology:")


demo_model_ui()
datasets = list_datasets()
if datasets:
    st.subheader("Datasets")
    startup_index_ui()
    index_report_ui()  # a dataset just added from "Get started" below
    st.dataframe(
        [{"name": d.name, "images": d.n_images, "layout": d.layout,
          "classes": ", ".join(d.classes), "root": d.root,
          "indexed": d.indexed_at.strftime("%Y-%m-%d %H:%M") if d.indexed_at else "—"}
         for d in datasets], hide_index=True, width="stretch")
    st.page_link("app_pages/class_balance.py", label="Explore class balance", icon=":material/bar_chart:")
else:
    st.subheader("Get started")
    dataset_picker("home")

st.caption("Data: Kermany, Zhang, Goldbaum et al., *Cell* 172(5), 2018 (Mendeley Data, "
           "CC BY 4.0). PneumoniaMNIST: MedMNIST v2, CC BY 4.0.")
