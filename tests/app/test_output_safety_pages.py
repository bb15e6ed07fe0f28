"""AppTest (issue 15 item 5): a dataset name with markdown renders literally."""
from __future__ import annotations

from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from cxr_core import worker

REPO = Path(__file__).resolve().parents[2]
EVIL = "[x](http://evil) ![i](http://e/i.png) <b>"


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    monkeypatch.setattr(worker, "ensure_worker", lambda db, **kw: None)


def test_a_dataset_name_with_markdown_renders_literally(cxr_home, tiny_dataset):
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=60).run()
    assert any("Allowed folders: any folder" in c.value for c in at.caption)
    at.text_input[0].set_value(str(tiny_dataset))
    at.text_input[1].set_value(EVIL)
    at.button[0].click().run()
    worker.run_worker(once=True, kinds="jobs")
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
