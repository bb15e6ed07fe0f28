"""A fresh install's first launch, in a real browser: the demo films are indexed and the shipped
model evaluated on them by the worker the app starts; then a short real run trained on the demo,
and Class balance, Compare, Predict and Review on real films (the README's pictures come from
these steps: docs/screenshots.py)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.test_browser import SLOW_MS, choose, open_page, settle

from e2e.conftest import AppServer, _stop_workers, serve

pytestmark = pytest.mark.e2e
expect = pytest.importorskip("playwright.sync_api").expect
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "chest_xray_mini"


@pytest.fixture(scope="module")
def demo_server(chromium, e2e_home, e2e_db, artifacts) -> Iterator[AppServer]:
    """A first launch: an empty home, CXR_DEMO on, the app's own worker."""
    with serve(e2e_home, artifacts / "streamlit_demo.log",
               env_extra={"CXR_DEMO": "on", "CXR_WORKER": "auto"}) as server:
        try:
            yield server
        finally:
            _stop_workers(e2e_home, e2e_db, artifacts)


def test_d1_first_launch_sets_up_the_demo_films(demo_server, page, shot, e2e_db):
    from cxr_core.evaluation import evaluate as es

    open_page(page, demo_server, "", "CXR Workbench")
    info = page.get_by_test_id("stAlert").filter(has_text="The demo dataset")
    for _ in range(3):  # the page shows the job's progress, then the demo once it is done
        try:
            expect(info).to_be_visible(timeout=SLOW_MS)
            break
        except AssertionError:
            page.reload()
    expect(info).to_contain_text("its own training films")
    (ev,) = [e for e in es.list_evaluations(e2e_db) if e.dataset_name == "demo"]
    assert ev.model_ref == "default" and ev.n == 300
    settle(page)
    shot(page, "demo_01_home")


@pytest.fixture(scope="module")
def demo_run(e2e_db) -> str:
    """A short real run on the demo films (64 px, 3 epochs), evaluated on them."""
    from cxr_core.evaluation import evaluate as es
    from cxr_core.training import service as svc

    cfg = svc.make_config(e2e_db, {"recipe": "cpu128", "dataset": "demo", "name": "demo-64px",
                                   "image_size": 64, "epochs": 3, "batch_size": 32})
    out = svc.run_in_process(e2e_db, cfg)
    assert out.status == "finished", out
    es.evaluate_model(e2e_db, f"run:{out.run_id}", "demo")
    return cfg.name


def test_d2_class_balance_of_the_demo(demo_server, page, shot):
    open_page(page, demo_server, "class_balance", "Class balance")
    choose(page, "Dataset", "demo")
    metric = page.get_by_test_id("stMetric").filter(has_text="Images")
    expect(metric.get_by_test_id("stMetricValue")).to_have_text("300", timeout=SLOW_MS)
    expect(page.get_by_text("Images per split").first).to_be_visible(timeout=SLOW_MS)
    settle(page)
    shot(page, "demo_02_class_balance")


def test_d3_compare_the_shipped_model_and_a_run_on_the_demo(demo_server, page, shot, demo_run):
    open_page(page, demo_server, "compare", "Compare runs")
    tab = page.get_by_role("tabpanel").first
    expect(tab.get_by_text(demo_run, exact=True)).to_be_visible(timeout=SLOW_MS)
    charts = tab.get_by_test_id("stPlotlyChart")
    expect(charts).to_have_count(4)
    expect(tab.get_by_text("default", exact=True).first).to_be_visible()
    settle(page)
    shot(page, "demo_05_compare")


def test_d4_predict_a_demo_film_with_saliency(demo_server, page, shot):
    film = sorted((DEMO / "train" / "PNEUMONIA").glob("*virus*.jpeg"))[0]
    open_page(page, demo_server, "predict", "Predict")
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(film))
    overlay = page.get_by_test_id("stImage").filter(has_text="Grad-CAM for")
    expect(overlay.locator("img")).to_have_count(1, timeout=SLOW_MS)
    settle(page)
    shot(page, "demo_06_predict")


def test_d5_review_the_demo_in_the_new_site_queue(demo_server, page, shot):
    open_page(page, demo_server, "review", "Review")
    name = page.get_by_role("textbox", name="Your name (stored with each label)")
    name.fill("Dr Demo")
    name.press("Enter")
    choose(page, "Dataset", "demo")
    sidebar = page.get_by_test_id("stSidebar")
    sidebar.get_by_text("New site: most informative first", exact=False).click()
    expect(page.locator("[class*='st-key-review_label_'] button").first).to_be_visible(
        timeout=SLOW_MS)
    settle(page)
    shot(page, "demo_07_review")
