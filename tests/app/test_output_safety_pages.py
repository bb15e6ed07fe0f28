"""AppTest (issue 15 item 5): user and file text (run, preset, dataset and person names, file
paths, notes, model-card fields) renders literally on every page: markdown and HTML in it are
shown as typed, never as links, images, bold or colours."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from markdown_it import MarkdownIt
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_model_store import BINARY_CARD, make_run, save_tiny_model
from test_site_thresholds import site_folder  # noqa: F401  (fixture: 48 real films)

from cxr_core.evaluation import evaluate as es
from cxr_core.evaluation import operating_points as ops
from cxr_core.jobs import launcher
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core import app

REPO = Path(__file__).resolve().parents[2]
PAGES = REPO / "app_pages"
EVIL = "[x](http://evil) ![i](http://e/i.png) <b>"
# A run, dataset or person name, a note: markdown, raw HTML, a link, an image, a colour.
HOSTILE = "**bold** <b>x</b> [link](http://evil) ![i](http://evil/i.png) :red[c] _it_"
# A file name cannot hold "/": the same without slashes in its links ("fiend" marks it).
HOSTILE_FILE = "**bold** <b>x [link](javascript:fiend) ![i](fiend.png) :red[c]"
MD = MarkdownIt("commonmark", {"html": True})
TEXTS = ("markdown", "caption", "info", "warning", "error", "success", "toast", "title",
         "header", "subheader")
WIDGETS = ("button", "checkbox", "toggle", "radio", "text_input", "number_input", "selectbox",
           "multiselect", "slider")


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)


def test_a_dataset_name_with_markdown_renders_literally(cxr_home, tiny_dataset):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert any("Allowed folders: any folder" in c.value for c in at.caption)
    at.text_input[0].set_value(str(tiny_dataset))
    at.text_input[1].set_value(EVIL)
    at.button[0].click().run()
    app.run_worker(once=True, kinds="jobs")
    at.run()
    assert not at.exception, at.exception
    shown = [s.value for s in at.success if "Indexed" in s.value]
    assert shown, [s.value for s in at.success]
    html = MarkdownIt("commonmark", {"html": True}).render(shown[0])
    assert "<a" not in html and "<img" not in html and "<b>" not in html
    assert EVIL.replace("<", "&lt;").replace(">", "&gt;") in html  # the name, as typed


def test_the_add_dataset_form_names_the_allowed_roots(cxr_home, monkeypatch, tmp_path,
                                                      tiny_dataset):
    monkeypatch.setenv("CXR_DATA_ROOTS", str(tmp_path / "data"))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert any(f"Allowed folders: {tmp_path}" in c.value.replace("\\", "")
               for c in at.caption)
    at.text_input[0].set_value(str(tiny_dataset))
    at.button[0].click().run()
    assert any("outside the allowed data roots" in e.value.replace("\\", "") for e in at.error)


def rendered(at: AppTest) -> list[str]:
    """The source of every text on the page that Streamlit renders as markdown: texts and
    alerts, widget labels and tooltips, radio options, metric labels and tooltips, image
    captions, expander and tab labels (selectbox and multiselect options are plain text)."""
    out = [e.value for kind in TEXTS for e in at.get(kind)]
    out += [t for kind in WIDGETS for w in at.get(kind) for t in (w.proto.label, w.proto.help)]
    out += [o for r in at.radio for o in r.options]
    out += [t for m in at.metric for t in (m.proto.label, m.proto.help)]
    out += [i.caption for img in at.get("image") for i in img.proto.imgs]
    return out + [e.label for e in at.expander] + [t.label for t in at.tabs]


def assert_literal(at: AppTest, hostile: str, marker: str = "evil") -> list[str]:
    """Every markdown text naming ``marker`` shows ``hostile`` as typed (at least one does):
    no link, image or raw HTML tag, and the source is not ``hostile`` itself (so no GFM
    autolink or ``:red[...]`` directive either). Returns those texts."""
    assert not at.exception, at.exception
    hits = [t for t in rendered(at) if marker in t]
    assert hits, rendered(at)
    typed = hostile.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for text in hits:
        html = MD.render(text)
        assert typed in html, (text, html)
        assert "<a" not in html and "<img" not in html and "<b>" not in html, html
        assert hostile not in text, text
    return hits


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _run(db, home: Path, name: str, seed: int) -> int:
    run_id = make_run(db, name)
    save_tiny_model(home / "runs" / str(run_id) / "best.keras", seed=seed, card=BINARY_CARD)
    return run_id


def test_compare_and_site_calibration_show_run_dataset_and_person_names_literally(
        cxr_home, site_folder):  # noqa: F811
    db = open_db()
    index_dataset(db, site_folder, name=HOSTILE)
    runs = [_run(db, cxr_home, f"{HOSTILE} {n}", seed) for seed, n in ((1, "a"), (2, "b"))]
    for run_id in runs:  # set by hand: Compare names who set each operating point
        ops.set_manual_threshold(db, run_id=run_id, threshold=0.5, changed_by=HOSTILE,
                                 note=HOSTILE)
        es.evaluate_model(db, f"run:{run_id}", HOSTILE)
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=120).run()
    assert_literal(at, HOSTILE)
    heads = [m.value for m in at.markdown if "evil" in m.value]  # each run's confusion matrix
    assert len(heads) == 2 and all(h.count("evil") == 4 for h in heads), heads  # run, setter
    # Plotly renders <b>, <a href> in legends: the curves' run names are escaped there.
    names = [t.get("name", "") for c in at.get("plotly_chart")
             for t in json.loads(c.proto.spec)["data"]]
    assert any("&lt;b&gt;x" in n for n in names) and not any("<b>" in n for n in names), names
    # Site calibration: the site named in the candidate, the record button and the result.
    at.selectbox(key="site_ref").set_value("default").run()
    assert any("evil" in i.value for i in at.info)  # "No evaluation of this model on ..."
    assert_literal(at, HOSTILE)
    at.selectbox(key="site_ref").set_value(f"run:{runs[0]}").run()
    at.button(key="site_go").click().run()
    app.run_worker(once=True, kinds="jobs")
    at.run()
    assert any("evil" in c.value for c in at.caption), [c.value for c in at.caption]
    assert any("evil" in b.label for b in at.button)  # "Record as ...'s operating point"
    assert_literal(at, HOSTILE)
    at.text_input(key="site_who").input(HOSTILE)
    at.text_input(key="site_note").input(HOSTILE)
    [record] = [b for b in at.button if b.label.startswith("Record as")]
    record.click().run()
    assert [s.value for s in at.success if "by" in s.value], [e.value for e in at.error]
    assert_literal(at, HOSTILE)


def test_predict_shows_upload_names_and_who_set_the_threshold_literally(cxr_home):
    db = open_db()
    run_id = _run(db, cxr_home, HOSTILE, 1)
    ops.set_manual_threshold(db, run_id=run_id, threshold=0.4, changed_by=HOSTILE, note=HOSTILE)
    at = AppTest.from_file(str(PAGES / "predict.py"), default_timeout=120).run()
    at.sidebar.selectbox(key="predict_model").set_value(f"run:{run_id}").run()
    at.file_uploader(key="predict_files").set_value([
        (f"{HOSTILE_FILE}.png", _png(1), "image/png"),
        (f"{HOSTILE_FILE} bad.png", b"not an image", "image/png")]).run()
    assert not at.exception, at.exception
    assert any("fiend" in e.value for e in at.error)  # the unreadable upload, named
    captions = [i.caption for img in at.get("image") for i in img.proto.imgs]
    assert any("fiend" in c for c in captions), captions  # the upload's name under it
    assert_literal(at, HOSTILE_FILE, "fiend")
    # The global operating point, named with who set it: in the caption and the decision.
    assert any(c.value.startswith("Decided with") and "evil" in c.value for c in at.caption)
    assert "evil" in at.markdown[0].value and "operating point" in at.markdown[0].value
    assert_literal(at, HOSTILE)


def test_augmentation_shows_paths_and_preset_names_literally(cxr_home, tmp_path):
    root = tmp_path / "films"
    write_image(root / "train" / "NORMAL" / f"{HOSTILE_FILE}.jpeg", seed=1)
    write_image(root / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg", seed=2)
    index_dataset(open_db(), root, name="films")
    at = AppTest.from_file(str(PAGES / "augmentation.py"), default_timeout=120).run()
    assert any("fiend" in m.value for m in at.markdown)  # the previewed image's path
    assert_literal(at, HOSTILE_FILE, "fiend")
    def save_as():  # the form's name box, in the newest run of the page
        return next(t for t in at.text_input if t.label.startswith("Save these settings"))
    save_as().set_value(HOSTILE)  # refused: not a preset name; the error quotes it
    at.button[1].click().run()
    assert any("evil" in e.value for e in at.error)
    assert_literal(at, HOSTILE)
    save_as().set_value("x __evil__ 1.0")  # allowed, and bold were it markdown
    at.button[1].click().run()
    assert any("evil" in t.value for t in at.toast)
    assert_literal(at, "x __evil__ 1.0")


def test_class_balance_shows_unreadable_paths_and_typed_ratios_literally(cxr_home, tmp_path):
    root = tmp_path / "films"
    for i, folder in enumerate(("NORMAL", "PNEUMONIA") * 3):
        write_image(root / "train" / folder / f"person{i}_virus_{i}.jpeg", seed=i)
    (root / "train" / "NORMAL" / f"{HOSTILE_FILE}.jpeg").write_bytes(b"not an image")
    index_dataset(open_db(), root, name="films")
    at = AppTest.from_file(str(PAGES / "class_balance.py"), default_timeout=60).run()
    assert any("fiend" in w.value for w in at.warning)  # the unreadable file's problem
    assert_literal(at, HOSTILE_FILE, "fiend")
    app.run_worker(once=True, kinds="jobs")  # the split preview
    at.run()
    at.text_input(key="balance_ratio_binary").set_value(HOSTILE).run()
    assert any("evil" in e.value for e in at.error)  # "Received: ..."
    assert_literal(at, HOSTILE)


def test_home_shows_model_card_fields_literally(cxr_home, tmp_path, monkeypatch):
    from cxr_core.models import store as model_store

    card = json.loads((model_store.DEFAULT_MODELS_DIR / "model_card.json").read_text())
    card["model"] = HOSTILE
    for entry in card.get("measured") or []:
        entry["dataset"] = HOSTILE
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    monkeypatch.setattr(model_store, "DEFAULT_MODELS_DIR", tmp_path)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert any("evil" in m.value for m in at.markdown)  # the headline's dataset
    assert any("evil" in c.value for c in at.caption)  # the model's name
    assert_literal(at, HOSTILE)
    card.pop("measured")
    card["training_config"]["split"] = HOSTILE  # an unknown split: the card's own words
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    at.run()
    assert sum("evil" in c.value for c in at.caption) >= 1
    assert_literal(at, HOSTILE)
