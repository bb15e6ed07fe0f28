"""Home: what the tool does, the demo model, the datasets and runs it knows, where to go next."""
from __future__ import annotations

import streamlit as st

from cxr_core.errors import CxrError
from cxr_core.model_store import DEFAULT_MODELS_DIR, read_card
from app_pages._shared import dataset_picker, index_report_ui, list_datasets, startup_index_ui

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
    st.subheader("Shipped demo model")
    cols = st.columns(4)
    cols[0].metric("Validation AUC", f"{val.get('auc', float('nan')):.3f}")
    cols[1].metric("Sensitivity", f"{op.get('sensitivity', float('nan')):.3f}")
    cols[2].metric("Specificity", f"{op.get('specificity', float('nan')):.3f}")
    cols[3].metric("Threshold", f"{op.get('threshold', float('nan')):.3f}")
    st.caption(f"{card.get('model')} at {card.get('image_size')} px, patient-grouped validation "
               f"split of the Kermany train set ({val.get('n', '?')} images). Operating point "
               f"chosen on validation for sensitivity ≥ {op.get('target', 0.95)}.")
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
