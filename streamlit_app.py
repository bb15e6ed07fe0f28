"""Entry point: page config, session defaults, navigation. Nothing else (see HOUSE_STYLE.md)."""
from __future__ import annotations

import streamlit as st

from app_pages._access import identity_badge, new_script_run, principal

st.set_page_config(page_title="CXR Workbench", page_icon=":material/pulmonology:", layout="wide")
st.session_state.setdefault("dataset_name", None)
new_script_run()  # the signed-in principal is read once per run from here on
user = principal()  # with [auth] configured: the sign-in screen until someone signs in
identity_badge(user)

PAGES = {
    "Overview": [
        st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    ],
    "Data": [
        st.Page("app_pages/class_balance.py", title="Class balance", icon=":material/bar_chart:"),
        st.Page("app_pages/augmentation.py", title="Augmentation", icon=":material/auto_fix_high:"),
    ],
    "Models": [
        st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
        st.Page("app_pages/predict.py", title="Predict", icon=":material/radiology:"),
    ],
}
if user.can("search"):
    PAGES["Models"].insert(1, st.Page("app_pages/search.py", title="Search",
                                      icon=":material/travel_explore:"))
if user.can("review"):
    PAGES["Review"] = [st.Page("app_pages/review.py", title="Review",
                               icon=":material/rate_review:")]
if user.can("view_audit"):
    PAGES["Admin"] = [st.Page("app_pages/admin.py", title="Access and audit",
                              icon=":material/admin_panel_settings:")]

st.navigation(PAGES).run()
