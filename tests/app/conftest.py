"""AppTest fixtures: every page test starts with empty Streamlit caches.

``get_db()`` is an ``st.cache_resource``: without clearing, a page would reuse the database
of an earlier test's CXR_HOME.
"""
from __future__ import annotations

import pytest
import streamlit as st


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()
