"""AppTest fixtures: empty Streamlit caches for every page test; two evaluated tiny runs.

``get_db()`` is an ``st.cache_resource``: without clearing, a page would reuse the database
of an earlier test's CXR_HOME.
"""
from __future__ import annotations

import pytest
import streamlit as st
from test_model_store import BINARY_CARD, make_run, save_tiny_model

from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import operating_points as ops
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture()
def two_runs(cxr_home, tiny_dataset) -> tuple[int, int]:
    """Two finished runs (real tiny models with operating points), both evaluated on test."""
    db = open_db()
    index_dataset(db, tiny_dataset, name="tiny")
    runs = []
    for seed, name in ((1, "alpha"), (2, "beta")):
        run_id = make_run(db, name)
        save_tiny_model(cxr_home / "runs" / str(run_id) / "best.keras", seed=seed,
                        card=BINARY_CARD)
        ops.set_operating_point(db, run_id=run_id, y_true=[0, 1, 0, 1], p_pos=[0.2, 0.6, 0.4, 0.7])
        es.evaluate_model(db, f"run:{run_id}", "tiny", split="train")
        runs.append(run_id)
    return runs[0], runs[1]
