"""Home: what the tool does, the datasets it knows, where to go next."""
from __future__ import annotations

import streamlit as st

from pages._shared import dataset_picker, list_datasets

st.title(":material/pulmonology: CXR Workbench")
st.markdown(
    "Build, check and improve pneumonia classifiers for chest X-rays: explore class balance, "
    "tune augmentation, train with live curves, compare models at matched sensitivity, predict "
    "with saliency maps, and feed clinician relabels into the next training round.")

datasets = list_datasets()
if datasets:
    st.subheader("Datasets")
    st.dataframe(
        [{"name": d.name, "images": d.n_images, "layout": d.layout,
          "classes": ", ".join(d.classes), "root": d.root,
          "indexed": d.indexed_at.strftime("%Y-%m-%d %H:%M") if d.indexed_at else "—"}
         for d in datasets], hide_index=True, width="stretch")
    st.page_link("pages/class_balance.py", label="Explore class balance", icon=":material/bar_chart:")
else:
    st.subheader("Get started")
    dataset_picker("home")

st.caption("Data: Kermany, Zhang, Goldbaum et al., *Cell* 172(5), 2018 (Mendeley Data, "
           "CC BY 4.0). PneumoniaMNIST: MedMNIST v2, CC BY 4.0.")
