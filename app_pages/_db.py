"""The pages' database handle: one migrated database per app process (a cached resource), and the
index jobs of ``CXR_DATA_DIR`` queued once at start. Its own module so that sign-in
(:mod:`app_pages._access`) and the shared widgets (:mod:`app_pages._shared`) both use it without
knowing each other in a circle.
"""
from __future__ import annotations

import streamlit as st

from cxr_core import app
from cxr_core.core.errors import CxrError
from cxr_core.core.settings import apply_secrets
from cxr_core.core.text_safe import md_escape
from cxr_core.data.indexing import Database


@st.cache_resource(show_spinner="Opening the database…")
def _open_app() -> tuple[Database, list[int]]:
    """One migrated database per app process; CXR_DATA_DIR datasets are queued for indexing.

    Settings: the environment, then the ``[cxr]`` table of ``.streamlit/secrets.toml``.
    """
    if st.secrets.load_if_toml_exists() and "cxr" in st.secrets:
        apply_secrets(st.secrets["cxr"])
    return app.open_app_db()


def startup_jobs() -> list[int]:
    """The index jobs of CXR_DATA_DIR, queued once per app process."""
    get_db()  # stops the page on a settings mistake
    return _open_app()[1]


def get_db() -> Database:
    """The app's database; a settings mistake (a mistyped CXR_* value, a bad secrets table,
    an unreachable DB URL) stops the page with its message instead of a traceback. Nothing is
    cached then, so fixing the setting and reloading is enough."""
    try:
        return _open_app()[0]
    except CxrError as exc:
        st.error(f"The app cannot start with these settings: {md_escape(exc)}",
                 icon=":material/error:")
        st.stop()
