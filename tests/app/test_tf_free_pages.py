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
    return {**os.environ, "CXR_HOME": str(cxr_home), "CXR_DATA_DIR": "", "CXR_WORKER": "off",
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


def test_cli_and_config_validation_import_no_tensorflow():
    """The configuration layer (TrainConfig, recipes, model specs, augmentation) is TF-free."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from cxr_core import cli\nfrom cxr_core.training import service as training_service\n"
            "from cxr_core.training.config import RECIPES, TrainConfig\n"
            "from cxr_core.models.specs import MODELS, ModelConfig\n"
            "from cxr_core.data.augment_config import PRESETS\n"
            "for recipe in RECIPES:\n"
            "    TrainConfig.from_dict({'recipe': recipe, 'dataset': 'd'}).model_config()\n"
            "TrainConfig.from_dict({'dataset': 'd'}).augment_config()\n"
            "cli.build_parser().parse_args(['train', '--config', 'run.json'])\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
