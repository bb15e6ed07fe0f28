"""Augmentation tuner: see exactly what the network will see, before spending GPU hours."""
from __future__ import annotations

import numpy as np
import streamlit as st

from app_pages._access import md, principal
from app_pages._db import get_db
from app_pages._shared import dataset_picker, image_path, image_picker
from cxr_core.core.errors import CxrError
from cxr_core.data import actions, presets
from cxr_core.data.augment import augment_preview
from cxr_core.data.augment_config import AugmentConfig
from cxr_core.data.images import load_image, to_array

KEYS = ("hflip", "vflip", "rotation", "zoom", "width_shift", "height_shift", "brightness_on",
        "brightness_lo", "brightness_hi", "contrast", "one_of", "seed")


def _apply_preset(cfg: AugmentConfig) -> None:
    """Copy a preset into the widget state (called before the widgets are drawn)."""
    d = cfg.to_dict()
    for k in ("hflip", "vflip", "rotation", "zoom", "width_shift", "height_shift", "contrast",
              "crop", "gamma", "blur", "noise", "one_of", "seed"):
        st.session_state[f"aug_{k}"] = d[k]
    st.session_state["aug_brightness_on"] = d["brightness"] is not None
    lo, hi = d["brightness"] or (1.2, 1.5)
    st.session_state["aug_brightness_lo"], st.session_state["aug_brightness_hi"] = lo, hi


def preset_ui(all_presets: dict[str, AugmentConfig]) -> None:
    names = list(all_presets)
    c1, c2 = st.columns([3, 1])
    name = c1.selectbox("Preset", names, key="aug_preset",
                        index=names.index("rot10_shift_flip") if "rot10_shift_flip" in names else 0,
                        format_func=lambda n: f"{n} — {presets.PRESET_NOTES.get(n, 'saved preset')}")
    if c2.button("Load preset", icon=":material/download:", width="stretch") or \
            "aug_seed" not in st.session_state:
        _apply_preset(all_presets[name])


def config_ui() -> AugmentConfig | None:
    """Sliders and toggles for every option; returns the config (None if invalid)."""
    c1, c2, c3, c4 = st.columns(4)
    hflip = c1.toggle("Horizontal flip", key="aug_hflip")
    vflip = c1.toggle("Vertical flip", key="aug_vflip",
                      help="Off by default: chest films have one orientation.")
    one_of = c1.toggle("One of (apply exactly one op per image)", key="aug_one_of")
    rotation = c2.slider("Rotation (± degrees)", 0.0, 45.0, step=1.0, key="aug_rotation")
    zoom = c2.slider("Zoom (±)", 0.0, 0.5, step=0.05, key="aug_zoom")
    contrast = c2.slider("Contrast (±)", 0.0, 0.9, step=0.05, key="aug_contrast")
    width_shift = c3.slider("Width shift (±)", 0.0, 0.5, step=0.05, key="aug_width_shift")
    height_shift = c3.slider("Height shift (±)", 0.0, 0.5, step=0.05, key="aug_height_shift")
    bright = c3.toggle("Brightness ×", key="aug_brightness_on")
    lo, hi = c3.slider("Brightness factor range", 0.3, 2.0, step=0.05, disabled=not bright,
                       value=(st.session_state.get("aug_brightness_lo", 1.2),
                              st.session_state.get("aug_brightness_hi", 1.5)))
    st.session_state["aug_brightness_lo"], st.session_state["aug_brightness_hi"] = lo, hi
    # What differs between sites and devices (issue 14): framing, exposure, sharpness, noise.
    crop = c4.slider("Random resized crop (sides ≥ 1 − c)", 0.0, 0.5, step=0.05, key="aug_crop")
    gamma = c4.slider("Gamma (±, log scale)", 0.0, 0.9, step=0.05, key="aug_gamma")
    blur = c4.slider("Blur (σ px, random weight)", 0.0, 5.0, step=0.25, key="aug_blur")
    noise = c4.slider("Noise (sd, grey levels)", 0.0, 32.0, step=1.0, key="aug_noise")
    seed = int(st.number_input("Seed", 0, 1_000_000, key="aug_seed"))
    try:
        return AugmentConfig(hflip=hflip, vflip=vflip, rotation=rotation, zoom=zoom,
                             width_shift=width_shift, height_shift=height_shift,
                             brightness=(lo, hi) if bright else None, contrast=contrast,
                             crop=crop, gamma=gamma, blur=blur, noise=noise,
                             one_of=one_of, seed=seed)
    except CxrError as exc:
        st.error(md(exc))
        return None


def save_ui(cfg: AugmentConfig) -> None:
    with st.form("aug_save", border=False):
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        name = c1.text_input("Save these settings as a preset", placeholder="my-preset")
        if c2.form_submit_button("Save preset", icon=":material/save:", width="stretch"):
            try:
                actions.save_preset(get_db(), principal(), name.strip(), cfg)
                st.toast(f"Saved preset {md(repr(name.strip()))}", icon=":material/check:")
            except CxrError as exc:
                st.error(md(exc))


def images_ui(info) -> list:
    c1, c2 = st.columns([1, 3])
    label = c1.selectbox("Class", sorted(info.classes), key="aug_class")
    n = c2.slider("Variants per image", 1, 16, 8, key="aug_n")
    records = image_picker(info, f"aug_images_{label}", label=label, max_selections=4,
                           default_first=True)
    return [(info, r, n) for r in records]


@st.cache_data(show_spinner=False, max_entries=64)
def source_image(path: str, size: int = 256) -> np.ndarray:
    """The image as training sees it before augmentation (the one loader, resized)."""
    return to_array(load_image(path, draft=size), size, 1)[..., 0]


st.title(":material/auto_fix_high: Augmentation")
st.caption("The same builder is used here and in training: every random op is seeded, so "
           "the same seed gives the same images.")
info = dataset_picker("aug")
if info is not None and info.layout == "npz":
    st.info("Previews read image files; pick a folder dataset (the .npz images are 28 px).")
elif info is not None:
    preset_ui(presets.all_presets(get_db()))
    cfg = config_ui()
    if cfg is not None:
        save_ui(cfg)
        for info_, rec, n in images_ui(info):
            try:
                original = source_image(image_path(info_, rec.relpath))
            except CxrError as exc:
                st.error(md(exc))
                continue
            ops_text = ", ".join(cfg.enabled_ops) or "no augmentation"
            st.markdown(f"**{md(rec.relpath)}** — {ops_text}")
            tiles = [original, *augment_preview(original, cfg, n)]
            cols = st.columns(min(len(tiles), 9))
            for i, tile in enumerate(tiles):
                cols[i % len(cols)].image(tile, caption="original" if i == 0 else f"#{i}",
                                          clamp=True)
