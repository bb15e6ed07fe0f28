"""User and file text for Streamlit markdown, escaped so it renders literally (issue 15 item 5).

A run, preset or dataset name, a file path, a reviewer's note or a CSV cell put into
``st.markdown`` / ``st.caption`` / ``st.info`` / ... is parsed as GitHub-flavoured markdown
with Streamlit's extensions: ``[x](http://evil)`` becomes a link, ``![i](http://e/i.png)`` loads
an image from another host, ``$...$`` is LaTeX, ``:red[...]`` colours text, ``:smile:`` is an
emoji, a bare URL is auto-linked, and a newline can start a heading, list or table.

CommonMark lets any ASCII punctuation character be backslash-escaped and then shows it as
itself, so :func:`md_escape` escapes every one of them (which also breaks URLs and emoji
short codes) and turns line breaks into spaces. The result shows exactly the original text,
on one line. Pure: no Streamlit import.
"""
from __future__ import annotations

import html
import re
import string
from typing import Any

__all__ = ["md_escape", "plotly_escape"]

_PUNCT = re.compile("([" + re.escape(string.punctuation) + "])")
_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c]+")


def md_escape(text: Any) -> str:
    """``text`` (``str()`` of any value; None is "") escaped for markdown.

    Args:
        text: user-typed or file-derived text (a name, a path, a note, a CSV cell).

    Returns:
        Markdown source that renders as the same characters, on one line: every ASCII
        punctuation character backslash-escaped, line breaks replaced by a space.

    """
    if text is None:
        return ""
    return _PUNCT.sub(r"\\\1", _BREAKS.sub(" ", str(text)))


def plotly_escape(text: Any) -> str:
    """``text`` for a Plotly legend, title, axis or hover label, shown literally.

    Plotly.js renders a subset of HTML in those strings (``<b>``, ``<span style=...>``,
    ``<a href=...>`` links) and decodes entities after parsing the tags, so escaping ``&``,
    ``<`` and ``>`` shows the original characters with no tag taking effect.
    """
    if text is None:
        return ""
    return html.escape(str(text), quote=False)
