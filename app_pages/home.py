"""Home: what the tool does, the demo model, the datasets and runs it knows, where to go next."""
from __future__ import annotations

import streamlit as st

from app_pages._access import md, principal
from app_pages._db import get_db
from app_pages._shared import dataset_picker, index_report_ui, list_datasets, startup_index_ui
from cxr_core.app import DEMO_NAME
from cxr_core.core.errors import CxrError
from cxr_core.data import actions as data_actions
from cxr_core.models.card import (card_per_class, entry_title, external_text, fmt_ci, headline,
                                  parameters_text, stress_summary)
from cxr_core.models.store import DEFAULT_MODELS_DIR, read_card

SPLIT_TEXT = {"patient": "a random patient-grouped validation split (in-distribution)",
              "temporal": "a temporal validation split (the earliest patients held out)",
              "group": "a held-out folder (group validation)"}

st.title(":material/pulmonology: CXR Workbench")
st.markdown(
    "Build, check and improve pneumonia classifiers for chest X-rays: explore class balance, "
    "tune augmentation, train with live curves, compare models at matched sensitivity, predict "
    "with saliency maps, and feed clinician relabels into the next training round.")


def external_ui(entry: dict, card: dict) -> None:
    """An external entry: AUC, the stored threshold's figures and the cross-fitted site
    threshold's, on images the model never saw."""
    site = entry.get("site_threshold") or {}
    cols = st.columns(4)
    auc_ci = fmt_ci(entry.get("auc"), entry.get("auc_ci"))
    cols[0].metric("AUC", f"{entry.get('auc') or float('nan'):.3f}",
                   help=f"95% interval over patients: {auc_ci}")
    if entry.get("sensitivity") is None and site.get("sensitivity") is not None:
        # The stored threshold was chosen on these films: only cross-fitted figures are honest.
        for col, key in zip(cols[1:3], ("sensitivity", "specificity")):
            col.metric(f"{key.capitalize()} (site threshold, cross-fitted)",
                       f"{site[key]:.3f}",
                       help=f"95% interval: {fmt_ci(site.get(key), site.get(key + '_ci'))}. A "
                            "threshold chosen on the site's own labelled films for sensitivity "
                            "≥ 0.95, scored cross-fitted (never on the films it was chosen on).")
        cols[3].metric("Threshold (site)", f"{entry.get('threshold') or float('nan'):.3f}",
                       help="The stored threshold, chosen on all of this site's films.")
    else:
        cols[1].metric("Sensitivity (stored threshold)",
                       "—" if entry.get("sensitivity") is None else f"{entry['sensitivity']:.3f}")
        cols[2].metric("Specificity (stored threshold)",
                       "—" if entry.get("specificity") is None else f"{entry['specificity']:.3f}")
        cols[3].metric("Specificity (site threshold)",
                       "—" if site.get("specificity") is None else f"{site['specificity']:.3f}",
                       help="A threshold chosen on the site's own labelled films for "
                            "sensitivity ≥ 0.95, scored cross-fitted (never on the films it "
                            "was chosen on).")
    st.caption(md(external_text(entry, card.get("recipe_selected_on") or ())))


def chosen_where(entry: dict, op: dict) -> str:
    """Where an entry's threshold was chosen, in words."""
    chosen = entry.get("chosen_on")
    if chosen == "site":
        return f"on the films of the site {md(op.get('dataset') or 'sample')}"
    return f"on the {md(chosen)} {'slice' if chosen == 'calibration' else 'split'}"


def measured_ui(card: dict) -> bool:
    """The card's headline figures: at a new site (external validation) first, then temporal
    validation, in-distribution last, never on the images a threshold was chosen on. False:
    none to show."""
    heads = headline(card.get("measured") or [])
    if not heads:
        return False
    op = card.get("operating_point") or {}
    for rank, entry in enumerate(heads):
        title = entry_title(entry)
        if entry.get("role") == "external":
            st.markdown(f"**{md(title[0].upper() + title[1:])}**"
                        + (" (headline)" if rank == 0 else ""))
            external_ui(entry, card)
            continue
        st.markdown(f"**{md(title[0].upper() + title[1:])}**" + (" (headline)" if rank == 0 else
                    " (in-distribution: optimistic for a new site or period)"
                    if entry.get("validation") in ("patient", "temporal") else ""))
        cols = st.columns(4)
        for col, key, name in zip(cols, ("auc", "sensitivity", "specificity"),
                                  ("AUC", "Sensitivity", "Specificity")):
            ci = fmt_ci(entry.get(key), entry.get(key + "_ci"))
            col.metric(name, f"{entry.get(key) or float('nan'):.3f}",
                       help=f"95% interval over patients: {ci}")
        cols[3].metric("Threshold", f"{entry.get('threshold') or float('nan'):.3f}")
        st.caption(f"95% intervals (bootstrap over patients): AUC "
                   f"{fmt_ci(entry.get('auc'), entry.get('auc_ci'))}, sensitivity "
                   f"{fmt_ci(entry.get('sensitivity'), entry.get('sensitivity_ci'))}, "
                   f"specificity {fmt_ci(entry.get('specificity'), entry.get('specificity_ci'))}. "
                   f"Threshold chosen {chosen_where(entry, op)} for "
                   f"sensitivity ≥ {md(op.get('target', 0.95))}, not on these images.")
    return True


def card_details_ui(card: dict) -> None:
    """The card's per-class report at its operating point and the model's size."""
    rep = card_per_class(card)
    with st.expander(f"Per class · {parameters_text(card.get('parameters'))} parameters",
                     icon=":material/table_chart:"):
        if rep:
            st.table([{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()}
                      for r in rep["rows"]])
            t = rep.get("threshold")
            st.caption(f"Validation ({md(rep.get('n'))} images) at "
                       + ("the argmax" if t is None else f"the operating point {t:.3f}")
                       + (f"; derived {md(rep['derived'])}." if rep.get("derived") else "."))
        else:
            st.caption("This card has no per-class report.")


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
    if measured_ui(card):
        if stress := stress_summary(card.get("stress")):
            st.warning(md(stress), icon=":material/thermostat:")
        st.caption(f"{md(card.get('model'))} at {md(card.get('image_size'))} px. Every split "
                   "it was measured on is in `models/default/README.md`. Evaluate on your own data "
                   "(Compare) and calibrate the operating point for your site there.")
        card_details_ui(card)
        st.page_link("app_pages/predict.py", label="Try it on an X-ray",
                     icon=":material/radiology:")
        return
    cols = st.columns(4)
    cols[0].metric("Validation AUC", f"{val.get('auc', float('nan')):.3f}")
    cols[1].metric("Sensitivity", f"{op.get('sensitivity', float('nan')):.3f}")
    cols[2].metric("Specificity", f"{op.get('specificity', float('nan')):.3f}")
    cols[3].metric("Threshold", f"{op.get('threshold', float('nan')):.3f}")
    what = SPLIT_TEXT.get(split) or md(split)  # an unknown split: the card's own text
    st.caption(f"{md(card.get('model'))} at {md(card.get('image_size'))} px. Measured on "
               f"**{what}** of the Kermany train set ({md(val.get('n', '?'))} images); the "
               "operating point was chosen on those same images for sensitivity ≥ "
               f"{md(op.get('target', 0.95))}.")
    if split == "patient":
        st.warning("These are in-distribution figures: a random patient split of one "
                   "acquisition period, with the threshold chosen on the images it is scored "
                   "on. They are optimistic for a new site or period; do not quote them as "
                   "deployment performance. Evaluate on your own data (Compare) and set the "
                   "operating point there.", icon=":material/warning:")
    st.page_link("app_pages/predict.py", label="Try it on an X-ray", icon=":material/radiology:")


def external_flag_ui(datasets: list) -> None:
    """Flag a dataset as another site or period: models report their external figures on it."""
    with st.expander("External validation data"):
        st.caption("A dataset from another site or acquisition period is the honest test of a "
                   "model: evaluations on it give the model's external figures (only films it "
                   "never trained, selected or was calibrated on), which Home and the model "
                   "card lead with.")
        names = {d.name: d for d in datasets}
        name = st.selectbox("Dataset", list(names), key="home_ext_ds")
        current = names[name].external
        if st.button("Unflag as external" if current else "Flag as external",
                     key="home_ext_btn"):
            try:
                data_actions.flag_external(get_db(), principal(), names[name].id, not current)
            except CxrError as exc:
                st.error(md(exc))
            else:
                st.rerun()


def demo_dataset_ui(datasets: list) -> None:
    """Say so when the embedded demo films are what the app shows."""
    if any(d.name == DEMO_NAME for d in datasets):
        st.info("The **demo dataset** (`demo`) holds 300 real films of the Kermany train split "
                "(demo/README.md), so every page has films to show. The shipped model was "
                "trained on that split: its figures on the demo are on its own training films "
                "(optimistic), not a measure of the model. Add your own data below (Get "
                "started / Add a dataset) or `python -m cxr_core fetch-kermany --out PATH`.",
                icon=":material/science:")


demo_model_ui()
datasets = list_datasets()
if datasets:
    demo_dataset_ui(datasets)
    st.subheader("Datasets")
    startup_index_ui()
    index_report_ui()  # a dataset just added from "Get started" below
    st.dataframe(
        [{"name": d.name, "images": d.n_images, "layout": d.layout,
          "classes": ", ".join(d.classes), "external": "yes" if d.external else "",
          "root": d.root,
          "indexed": d.indexed_at.strftime("%Y-%m-%d %H:%M") if d.indexed_at else "—"}
         for d in datasets], hide_index=True, width="stretch")
    external_flag_ui(datasets)
    st.page_link("app_pages/class_balance.py", label="Explore class balance", icon=":material/bar_chart:")
else:
    st.subheader("Get started")
    dataset_picker("home")

st.caption("Data: Kermany, Zhang, Goldbaum et al., *Cell* 172(5), 2018 (Mendeley Data, "
           "CC BY 4.0). PneumoniaMNIST: MedMNIST v2, CC BY 4.0.")
