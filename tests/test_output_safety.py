"""Output safety (issue 15 item 5): user text renders literally; every CSV export is
formula-injection-safe."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from cxr_core.core.text_safe import md_escape

EVIL = "[x](http://evil) ![i](http://e/i.png) <b>bold</b>"
_MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


def rendered(markdown: str) -> str:
    """The HTML CommonMark makes of it (HTML allowed: the worst case)."""
    return _MD.render(markdown)


# -- md_escape --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    EVIL,
    "**bold** _it_ `code` ~~gone~~",
    "# heading",
    "line one\n# line two\r\n- item\n| a | b |\n|---|---|",
    "$E = mc^2$ and $$x$$",
    ":red[alert] :material/home: :smile:",
    "http://evil.example/path <http://e> me@example.org",
    "1. numbered",
    "> quote",
    "C:\\data\\x_1.jpeg",
    "plain name 42",
])
def test_md_escape_renders_the_same_characters_and_no_markup(text):
    html = rendered(md_escape(text))
    for tag in ("<a", "<img", "<b>", "<strong", "<em", "<code", "<h1", "<li", "<table",
                "<blockquote", "<del"):
        assert tag not in html, html
    # one paragraph whose text is the input on one line (HTML-escaped by the renderer)
    import html as h
    body = h.unescape(html.removeprefix("<p>").removesuffix("</p>\n"))
    assert body == " ".join(text.replace("\r\n", "\n").split("\n"))


@pytest.mark.parametrize(("text", "expected"), [
    ("[x](y)", r"\[x\]\(y\)"),
    ("a*b_c", r"a\*b\_c"),
    ("<b>", r"\<b\>"),
    ("$1", r"\$1"),
    ("a\nb", "a b"),
    ("a\\b", "a\\\\b"),
    (None, ""),
    (3.5, r"3\.5"),
    ("ok", "ok"),
])
def test_md_escape_cases(text, expected):
    assert md_escape(text) == expected


# -- CSV exports ------------------------------------------------------------------------------

FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"]


def cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def assert_neutral(text: str) -> None:
    for row in cells(text):
        for c in row:
            assert not c.startswith(("=", "+", "-", "@", "\t", "\r")), (c, text)


def test_relabel_exports_neutralise_formulas(cxr_home, tiny_dataset, tmp_path):
    from cxr_core.review import queues as review
    from cxr_core.review import export as review_export
    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import open_db

    db = open_db()
    rep = index_dataset(db, tiny_dataset, name="tiny")
    from cxr_core.data.indexing import indexed_records
    images = indexed_records(db, rep.dataset_id)
    for img, f in zip(images, FORMULAS):
        label = "PNEUMONIA" if img.label == "NORMAL" else "NORMAL"
        review.submit_relabel(db, image_id=img.id, choice=review.LabelChoice(label, None),
                              reviewer=f.strip() or "rev", note=f)
    text = review_export.export_relabels_csv(db, rep.dataset_id)
    assert "'=cmd|' /C calc'!A0" in text
    assert_neutral(text)
    out = tmp_path / "relabels.csv"
    assert review_export.write_relabels_csv(db, out, rep.dataset_id) == len(FORMULAS)
    assert_neutral(out.read_text())


def test_predict_results_csv_neutralises_formulas():
    from cxr_core.predict.inference import BatchResult, ImageInput, PredictError

    errors = tuple(PredictError(i, ImageInput(f, data=b""), f) for i, f in enumerate(FORMULAS))
    result = BatchResult("default", ("NORMAL", "PNEUMONIA"), 0.5, "card", (), errors, 0.0)
    text = result.to_csv()
    assert text.splitlines()[0] == "file,label,p_NORMAL,p_PNEUMONIA,threshold,error"
    assert cells(text)[1][0] == "'=cmd|' /C calc'!A0"
    assert_neutral(text)


def test_every_csv_writer_goes_through_csv_safe():
    """A module that writes CSV (a new export) must take its cells from cxr_core.core.csv_safe."""
    repo = Path(__file__).resolve().parents[1]
    writers, offenders = [], []
    for path in [*(repo / "cxr_core").rglob("*.py"), *(repo / "app_pages").glob("*.py"),
                 repo / "streamlit_app.py"]:
        src = path.read_text()
        if path.name == "csv_safe.py" or not any(
                n in src for n in ("csv.writer", "csv.DictWriter", ".to_csv(", "download_button",
                               "write_rows(", "rows_to_csv(")):
            continue
        writers.append(path.relative_to(repo / "cxr_core").as_posix()
                       if path.is_relative_to(repo / "cxr_core") else path.name)
        if "csv_safe" not in src and "to_csv()" not in src and "job.result" not in src:
            offenders.append(str(path.relative_to(repo)))
    assert {"predict/inference.py", "review/export.py"} <= set(writers)
    assert offenders == []


def test_a_line_break_in_a_cell_is_quoted_so_it_cannot_start_a_formula_row():
    from cxr_core.core.csv_safe import rows_to_csv

    text = rows_to_csv(["note", "n"], [["ok\r=cmd|' /C calc'!A0", 1], ["a\nb", 2]])
    assert text.endswith("\n") and "\r\n" not in text.replace("\r=cmd", "")
    assert cells(text) == [["note", "n"], ["ok\r=cmd|' /C calc'!A0", "1"], ["a\nb", "2"]]
    assert '"ok\r=cmd' in text  # quoted: a spreadsheet keeps the break inside the cell


def test_tables_built_in_csv_export_is_off():
    """st.dataframe's own download/copy writes cells unguarded, so the app switches it off
    (its own exports go through csv_safe)."""
    import tomllib
    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml")
                        .read_text())
    assert cfg["client"]["disableDataExport"] is True


def test_plotly_escape_shows_tags_as_text():
    from cxr_core.core.text_safe import plotly_escape

    assert plotly_escape('<a href="http://evil">run</a> & <b>x</b>') == \
        '&lt;a href="http://evil"&gt;run&lt;/a&gt; &amp; &lt;b&gt;x&lt;/b&gt;'
    assert plotly_escape(None) == "" and plotly_escape(3) == "3"
