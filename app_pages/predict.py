"""Predict: upload films or pick indexed images, read the decision, explain it, send to review."""
from __future__ import annotations

import streamlit as st

from app_pages._access import acting_as, md, principal
from app_pages._db import get_db
from app_pages._shared import dataset_picker, image_picker
from cxr_core.core.errors import ConfigError, CxrError
from cxr_core.evaluation import site_thresholds
from cxr_core.models import ensembles, refs
from cxr_core.models import store as model_store
from cxr_core.predict import explain, inference
from cxr_core.predict.render import shortcut_warning
from cxr_core.review import actions


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def get_model(ref: str) -> model_store.LoadedModel:
    return refs.load_model_ref(ref, db=get_db())


@st.cache_resource(show_spinner=False, max_entries=4)
def explainer(ref: str):
    return explain.make_explainer(get_model(ref))


@st.cache_data(show_spinner="Computing saliency…", max_entries=256)
def heatmap(ref: str, sha256: str, method: str, class_index: int, _pixels):
    """One map per model, image content, method and class (the pixels follow from the hash)."""
    return explain.saliency_map(explainer(ref), _pixels, method, class_index)


@st.cache_data(show_spinner=False, max_entries=64)
def picture(sha256: str, _pred: inference.Prediction):  # keyed by the content hash
    return explain.display_pixels(_pred)  # an upload's was decoded with it, in its sandbox


def model_ui() -> str | None:
    options = {o.ref: o.title for o in inference.model_options(get_db())}
    if not options:
        st.warning("No model yet: train one on the Train page (or ship `models/default`).")
        return None
    return st.sidebar.selectbox("Model", list(options), format_func=options.get,
                                key="predict_model")


def inputs_ui() -> tuple[tuple, list[inference.ImageInput], int | None]:
    """The chosen images, a key that changes when the choice does, and their dataset (None
    for uploads)."""
    source = st.radio("Images", ["Upload", "From a dataset"], horizontal=True,
                      key="predict_source", label_visibility="collapsed")
    if source == "Upload":
        files = st.file_uploader(
            "Chest X-rays: JPEG, PNG, BMP, TIFF or DICOM (also without extension)",
            accept_multiple_files=True, key="predict_files")
        try:  # files and bytes per request are capped before any file is decoded
            inference.check_upload_request([f.size for f in files])
        except CxrError as exc:
            st.error(md(exc), icon=":material/block:")
            return (), [], None
        return (tuple(f.file_id for f in files),
                [inference.ImageInput(f.name, data=f.getvalue()) for f in files], None)
    info = dataset_picker("predict")
    if info is None:
        return (), [], None
    records = image_picker(info, "predict_pick_images", sample_button=True)
    return ((info.id, *(r.id for r in records)), inference.dataset_inputs(info.root, records),
            info.id)


def site_ui(ref: str, dataset_id: int | None) -> int | None:
    """The site whose operating point decides: the picked images' dataset, or, for uploads,
    the site the user says they come from (among those calibrated for this model)."""
    if dataset_id is not None:
        return dataset_id
    sites = {op.dataset_id: op.dataset_name
             for op in site_thresholds.site_points(get_db(), model_ref=ref)}
    if not sites:
        return None
    return st.selectbox("Site of these films", [None, *sites], key="predict_site",
                        format_func=lambda i: ("Another site: the global operating point"
                                               if i is None else f"{sites[i]} (calibrated)"),
                        help="A site threshold set on Compare → Site threshold decides with "
                             "its own operating point.")


def run_ui(ref: str, key: tuple, items: list[inference.ImageInput], site: int | None):
    """Predict once per (model, images, operating point) choice; reruns (sliders) reuse the
    stored result. Returns it with a sentence naming the operating point used."""
    loaded, used = site_thresholds.operating_point_for(get_db(), get_model(ref), site)
    if st.session_state.get("predict_key") != (ref, key, loaded.threshold, used):
        bar = st.progress(0.0, text="Reading images…")
        result = inference.predict_batch(loaded, items, progress=lambda n, total:
                                       bar.progress(n / total, f"Reading images: {n}/{total}"))
        bar.empty()
        st.session_state["predict_key"] = (ref, key, loaded.threshold, used)
        st.session_state["predict_result"] = result
    return st.session_state["predict_result"], used


def results_ui(ref: str, result: inference.BatchResult) -> None:
    if note := ensembles.describe(get_model(ref)):
        st.info(note, icon=":material/join:")  # markdown, its refs escaped
    if inference.no_operating_point(result):
        st.warning("This model has no stored operating point: decisions use 0.5.")
    for err in result.errors:
        st.error(md(err.error), icon=":material/broken_image:")
    if len(result.rows()) > 1:
        st.dataframe(result.rows(), hide_index=True)
        st.download_button("Download results (CSV)", result.to_csv(), file_name="predictions.csv",
                           mime="text/csv", icon=":material/download:", key="predict_csv")


def detail_ui(result: inference.BatchResult) -> inference.Prediction:
    preds = result.predictions
    names = {i: p.source.name for i, p in enumerate(preds)}
    pick = st.selectbox("Image", list(names), format_func=names.get,
                        key="predict_pick") if len(preds) > 1 else 0
    pred = preds[pick if pick in names else 0]
    st.markdown(inference.decision_text(result, pred))  # markdown, its names escaped
    for col, (label, p) in zip(st.columns(len(result.labels)), pred.probabilities.items()):
        col.metric(f"P({md(label)})", f"{p:.1%}")
    return pred


def saliency_ui(ref: str, result: inference.BatchResult, pred: inference.Prediction) -> None:
    c1, c2, c3 = st.columns(3)
    names = explain.METHOD_NAMES
    method = c1.selectbox("Saliency", list(names), format_func=names.get, key="predict_method")
    choices = dict(explain.class_choices(result.labels, pred))
    cls = c2.radio("Explain", list(choices), format_func=lambda c: md(choices[c]), horizontal=True,
                   key="predict_class")
    alpha = c3.slider("Opacity", 0.0, 1.0, 0.4, 0.05, key="predict_alpha")
    try:
        heat = heatmap(ref, pred.sha256, method, cls, pred.pixels)
        image = picture(pred.sha256, pred)
    except CxrError as exc:
        st.error(md(exc))
        return
    left, right = st.columns(2)
    left.image(image, caption=md(pred.source.name), width="stretch")
    right.image(explain.overlay_png(image, heat, alpha=alpha), width="stretch",
                caption=f"{explain.method_title(explainer(ref), method)} for {md(choices[cls])}")
    if cls == pred.class_index and (warning := shortcut_warning(heat)):
        st.warning(warning, icon=":material/center_focus_weak:")


def review_ui(ref: str, pred: inference.Prediction) -> None:
    if not principal().can("send_to_review"):
        return  # viewers predict and explain; sending to clinicians needs the reviewer role
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    who = acting_as("Sent by", "predict_sent_by", left, required=False,
                    placeholder="Your name")
    if right.button("Send to review", key="predict_send", icon=":material/rate_review:"):
        try:
            if who is None:
                raise ConfigError("sending to review needs the name of who sends it")
            item = actions.send_to_review(get_db(), who, pred, model_ref=ref)
            st.success(f"Sent to the review queue (item {item}).", icon=":material/done:")
        except CxrError as exc:
            st.error(md(exc))


st.title("Predict")
ref = model_ui()
key, items, dataset_id = inputs_ui()
if ref is None or not items:
    st.stop()
try:
    result, used = run_ui(ref, key, items, site_ui(ref, dataset_id))
except CxrError as exc:
    st.error(md(exc))
    st.stop()
st.caption(f"Decided with the {md(used)}.", help="Site operating points are recorded on Compare "
           "→ Site threshold; elsewhere the model's global one decides.")
results_ui(ref, result)
if result.predictions:
    pred = detail_ui(result)
    saliency_ui(ref, result, pred)
    review_ui(ref, pred)
