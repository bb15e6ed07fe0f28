"""Home, Class balance, Train, Compare and Review import no TensorFlow on a first visit.

Each page runs once in a fresh interpreter (``bench.pages.first_visit``: the app's entry point
and the page's first script run, what a browser's first visit triggers) against a database
with an indexed dataset and two evaluated runs, so Compare and Review show real content.
"""
from __future__ import annotations

import os

import pytest

from bench.pages import PAGES, first_visit

pytestmark = pytest.mark.slow


@pytest.fixture()
def env(cxr_home, two_runs) -> dict:
    return {**os.environ, "CXR_HOME": str(cxr_home), "CXR_DATA_DIR": "",
            "TF_CPP_MIN_LOG_LEVEL": "3"}


TITLES = {"home": "CXR Workbench", "class_balance": "Class balance", "train": "Train",
          "compare": "Compare runs", "review": "Review"}


@pytest.mark.parametrize("page", PAGES)
def test_first_visit_imports_no_tensorflow(page, env):
    out = first_visit(page, "ours", env)
    assert out["exceptions"] == []
    assert TITLES[page] in out["title"][0]  # that page, not the default one, was rendered
    assert out["tensorflow"] is False, f"app_pages/{page}.py imported tensorflow on load"


def test_the_check_sees_tensorflow_when_it_is_imported(env):
    """The baseline side imports TensorFlow first: the flag must then say so."""
    assert first_visit("home", "tf", env)["tensorflow"] is True
