"""Real-browser flows: Streamlit server + Playwright driving Debian's Chromium.

One server and one browser per module (tests/e2e/conftest.py); each test opens its own tab,
i.e. its own Streamlit session. Every step leaves a screenshot in the artifacts folder
(``$CXR_E2E_ARTIFACTS``, default ``test-artifacts/e2e``), named by step: ``01_page_train.png``;
docs/screenshots.py copies a few of them into the README.

Waits use Playwright's ``expect`` (or ``wait_for_function`` for "more than before"), never
sleeps. ``[data-testid=stApp][data-test-script-state=notRunning]`` marks a finished script
run; Streamlit draws exceptions as ``[data-testid=stException]``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text

pytestmark = pytest.mark.e2e
expect = pytest.importorskip("playwright.sync_api").expect

SLOW_MS = 180_000  # first TensorFlow import, model load, worker start on a busy 2-core host

# (url path, main heading, sidebar title): every page of streamlit_app.py's navigation.
PAGES = [("", "CXR Workbench", "Home"), ("class_balance", "Class balance", "Class balance"),
         ("augmentation", "Augmentation", "Augmentation"), ("train", "Train", "Train"),
         ("search", "Search", "Search"),
         ("compare", "Compare runs", "Compare"), ("predict", "Predict", "Predict"),
         ("review", "Review", "Review"), ("admin", "Access and audit", "Access and audit")]
NAV_TITLES = [re.compile(re.escape(title) + "$") for *_, title in PAGES]  # after the icon's name


# -- Helpers --------------------------------------------------------------------------------

def settle(page, timeout: int = SLOW_MS) -> None:
    """Wait for the script run to finish, then check that no exception box is shown."""
    expect(page.get_by_test_id("stApp")).to_have_attribute(
        "data-test-script-state", "notRunning", timeout=timeout)
    expect(page.get_by_test_id("stException")).to_have_count(0)


def open_page(page, server, path: str, heading: str) -> None:
    page.goto(f"{server.url}/{path}", wait_until="domcontentloaded")
    expect(page.get_by_role("heading", level=1)).to_contain_text(heading, timeout=SLOW_MS)
    settle(page)


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label`` (main area or sidebar)."""
    box = page.get_by_role("combobox", name=label, exact=True)
    if box.input_value() == option:
        return
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def set_number(page, label: str, value: int) -> None:
    field = page.get_by_role("spinbutton", name=label, exact=True)
    field.fill(str(value))
    field.press("Tab")  # commits the value (Enter would submit the form)


# Markers of the fullest chart: while the fragment redraws, the old and new chart coexist.
POINTS_JS = ("Math.max(0, ...[...document.querySelectorAll('[data-testid=stPlotlyChart]')]"
             ".map(chart => chart.querySelectorAll('path.point').length))")


def image_sources(page) -> list[str]:
    return page.get_by_test_id("stImage").locator("img").evaluate_all("els => els.map(e => e.src)")


@pytest.fixture(scope="module")
def sample(shared_data) -> Path:
    """The real full-resolution films (../shared/data/chest_xray_fullres_sample)."""
    path = shared_data / "chest_xray_fullres_sample"
    if not (path / "train" / "PNEUMONIA").is_dir():
        pytest.skip(f"real full-resolution sample not found at {path}")
    return path


@pytest.fixture(scope="module")
def fullres(e2e_db, sample) -> str:
    """The real sample indexed as "fullres" (a no-op when the UI test already did it)."""
    from cxr_core.data.indexing import index_dataset

    index_dataset(e2e_db, sample, name="fullres")
    return "fullres"


@pytest.fixture(scope="module")
def two_runs(e2e_db, e2e_tiny) -> list[str]:
    """Two finished real tiny runs (1 epoch, 32 px) trained here, both evaluated on validation."""
    from cxr_core.training import service as svc

    names = []
    for seed in (1, 2):
        cfg = svc.make_config(e2e_db, {"recipe": "cpu128", "dataset": "tiny", "name": f"e2e-{seed}",
                                       "model": "small3_50", "image_size": 32, "epochs": 1,
                                       "augment": "none", "seed": seed})
        out = svc.run_in_process(e2e_db, cfg)
        assert out.status == "finished", out
        names.append(cfg.name)
    return names


# -- Flows ----------------------------------------------------------------------------------

def test_00_deep_link_on_a_fresh_server_uses_our_navigation(fresh_server, page, shot):
    """A server's first request, to /class_balance, must get st.navigation's pages, not
    Streamlit's legacy pages/ auto-discovery (which would list helper modules as pages)."""
    page.goto(fresh_server.url + "/class_balance", wait_until="domcontentloaded")
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav.get_by_text("Augmentation")).to_be_visible(timeout=SLOW_MS)
    expect(nav.get_by_role("link")).to_have_text(NAV_TITLES)
    expect(nav.get_by_text("shared")).to_have_count(0)
    expect(page.get_by_role("heading", level=1)).to_contain_text("Class balance")
    settle(page)
    shot(page, "00_deep_link_class_balance")


@pytest.mark.parametrize("path, heading, title", PAGES, ids=[p[2] for p in PAGES])
def test_01_every_page_renders_its_heading(app_server, page, shot, path, heading, title):
    open_page(page, app_server, path, heading)
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav.get_by_role("link")).to_have_text(NAV_TITLES)  # no page left untested
    expect(nav.get_by_role("link", name=title, exact=True)).to_have_attribute(
        "aria-current", "page")
    shot(page, f"01_page_{path or 'home'}")


def test_02_index_the_real_sample_through_the_ui(app_server, page, shot, sample):
    open_page(page, app_server, "class_balance", "Class balance")
    sidebar = page.get_by_test_id("stSidebar")
    sidebar.get_by_text("Add a dataset").click()
    sidebar.get_by_role("textbox", name="Dataset folder or PneumoniaMNIST .npz").fill(str(sample))
    sidebar.get_by_role("textbox", name="Name (optional)").fill("fullres")
    shot(page, "02_index_form")
    sidebar.get_by_role("button", name=re.compile("Index dataset")).click()
    report = sidebar.get_by_test_id("stAlert").filter(has_text="Indexed fullres: 265 images")
    expect(report).to_be_visible(timeout=SLOW_MS)
    settle(page)
    shot(page, "02_index_done")
    choose(page, "Dataset", "fullres")
    metric = page.get_by_test_id("stMetric").filter(has_text="Images")
    expect(metric.get_by_test_id("stMetricValue")).to_have_text("265", timeout=SLOW_MS)
    patients = page.get_by_test_id("stMetric").filter(has_text="Patients")
    expect(patients.get_by_test_id("stMetricValue")).not_to_have_text("0")
    expect(page.get_by_text("Images per split").first).to_be_visible(timeout=SLOW_MS)
    settle(page)
    shot(page, "02_index_class_balance")


def test_03_augmentation_slider_changes_the_preview(app_server, page, shot, fullres):
    open_page(page, app_server, "augmentation", "Augmentation")
    choose(page, "Dataset", fullres)
    images = page.get_by_test_id("stImage").locator("img")
    expect(images).to_have_count(9, timeout=SLOW_MS)  # the original and 8 seeded variants
    settle(page)
    before = image_sources(page)
    old_bytes = page.request.get(before[1]).body()
    shot(page, "03_augmentation_before")
    slider = page.get_by_role("slider", name="Rotation (± degrees)")
    start = float(slider.input_value())  # a visually hidden <input type=range>
    slider.focus()
    slider.press("ArrowRight")
    expect(slider).to_have_value(f"{start + 1:g}")
    expect(images.nth(1)).not_to_have_attribute("src", before[1], timeout=SLOW_MS)
    settle(page)
    after = image_sources(page)
    assert len(after) == 9
    assert after[0] == before[0]  # the original is not augmented
    assert all(a != b for a, b in zip(after[1:], before[1:])), (before, after)
    assert page.request.get(after[1]).body() != old_bytes
    shot(page, "03_augmentation_after")


def test_04_train_live_curves_then_cancel(app_server, page, shot, e2e_db):
    from cxr_core.training import service as svc

    open_page(page, app_server, "train", "Train")
    choose(page, "Dataset", "tiny")
    page.get_by_role("textbox", name="Run name", exact=True).fill("e2e-live")
    choose(page, "Model", "small3_50")
    set_number(page, "Image size (px)", 32)
    set_number(page, "Epochs", 200)  # the most CXR_MAX_EPOCHS allows; cancelled long before
    set_number(page, "Patience", 1000)
    choose(page, "Augmentation", "none")
    page.get_by_role("button", name=re.compile("Start training")).click()
    queued = page.get_by_text(re.compile(r"^Run \d+ queued"))
    expect(queued).to_be_visible(timeout=SLOW_MS)
    run_id = int(queued.inner_text().split()[1])
    # The worker process imports TensorFlow, then writes one metric row per key and epoch;
    # the page's fragment redraws the chart from the DB every 2 s.
    page.wait_for_function(f"() => {POINTS_JS} > 0", timeout=SLOW_MS)
    first = page.evaluate(f"() => {POINTS_JS}")
    page.wait_for_function(f"() => {POINTS_JS} > {first}", timeout=SLOW_MS)
    assert svc.get_run(e2e_db, run_id).status == "running"
    settle(page)  # between two redraws of the fragment (mid-redraw, old and new chart coexist)
    shot(page, "04_train_running")
    shot(page, "04_train_curves", start=page.get_by_role("heading", name="Runs", exact=True),
         end=page.get_by_test_id("stPlotlyChart").last)
    page.locator(f".st-key-train_cancel_{run_id} button").first.click()
    expect(page.get_by_text(f"(#{run_id}) — ⏹️ cancelled").first).to_be_visible(timeout=SLOW_MS)
    expect(page.get_by_role("combobox", name="Run details").first).to_have_value(
        f"#{run_id} e2e-live (cancelled)")
    run = svc.get_run(e2e_db, run_id)
    assert run.status == "cancelled" and run.epochs_done >= 1, run
    settle(page)
    shot(page, "04_train_cancelled")


def test_05_compare_two_runs_shows_both_confusion_matrices(app_server, page, shot,
                                                           two_runs):
    open_page(page, app_server, "compare", "Compare runs")
    tab = page.get_by_role("tabpanel").first
    for name in two_runs:
        expect(tab.get_by_text(name, exact=True)).to_be_visible(timeout=SLOW_MS)
    charts = tab.get_by_test_id("stPlotlyChart")
    expect(charts).to_have_count(4)  # per run: counts and row-normalised
    for i in range(4):
        expect(charts.nth(i).locator(".heatmaplayer .hm")).to_have_count(1)
    expect(tab.get_by_text("counts")).to_have_count(2)
    settle(page)
    shot(page, "05_compare")


def test_06_predict_an_uploaded_film_with_saliency(app_server, page, shot, sample):
    film = sorted((sample / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    open_page(page, app_server, "predict", "Predict")
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(str(film))
    metric = page.get_by_test_id("stMetric").filter(has_text="P(PNEUMONIA)")
    expect(metric.get_by_test_id("stMetricValue")).to_have_text(re.compile(r"\d+\.\d%"),
                                                                timeout=SLOW_MS)
    expect(page.get_by_text(re.compile(r"P\(PNEUMONIA\) = \d\.\d{3} [≥<] operating point"))
           ).to_be_visible()
    overlay = page.get_by_test_id("stImage").filter(has_text="Grad-CAM for")
    expect(overlay.locator("img")).to_have_count(1, timeout=SLOW_MS)
    settle(page)
    size = overlay.locator("img").evaluate("img => [img.complete, img.naturalWidth]")
    assert size[0] and size[1] > 0, size
    expect(page.get_by_test_id("stImage").filter(has_text=film.name)).to_have_count(1)
    shot(page, "06_predict")


def test_07_review_relabel_is_stored(app_server, page, shot, e2e_db, fullres):
    reviewer = "Dr E2E"
    open_page(page, app_server, "review", "Review")
    name = page.get_by_role("textbox", name="Your name (stored with each label)")
    name.fill(reviewer)
    name.press("Enter")
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar.get_by_text(f"Reviewing as {reviewer}")).to_be_visible()
    choose(page, "Dataset", fullres)
    sidebar.get_by_text("By class", exact=True).click()
    choose(page, "Class", "NORMAL")
    target = page.locator(".st-key-review_label_2 button")  # NORMAL, PNEUMONIA·bacteria, ·virus
    expect(target).to_contain_text("virus", timeout=SLOW_MS)
    settle(page)
    title = page.locator("strong").filter(has_text=re.compile(r"^train/NORMAL/")).first
    relpath = title.inner_text()
    shot(page, "07_review_before")
    clipped = page.locator("[class*='st-key-review_label_'] button *").evaluate_all(
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)")
    assert clipped == [], f"label buttons cut off: {clipped}"
    target.click()
    expect(page.get_by_text(re.compile(r"^1 reviewed, \d+ left$"))).to_be_visible()
    settle(page)
    shot(page, "07_review_after")
    with e2e_db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT r.old_label, r.new_label, r.new_subtype, i.relpath FROM relabels r "
            "JOIN images i ON i.id = r.image_id WHERE r.reviewer = :who"), {"who": reviewer}).all()
    assert [tuple(r) for r in rows] == [("NORMAL", "PNEUMONIA", "virus", relpath)]
