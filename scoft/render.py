"""Text from CCUB (captions, categories, anything a community member typed) made inert wherever it
is rendered: Markdown reports and Prefect artifacts, HTML reports and the Data Docs."""

from __future__ import annotations

import html
import re

# Every ASCII character that starts Markdown structure (headings, emphasis, links, images, tables,
# lists, code, raw HTML); a backslash before each makes it literal text in CommonMark and GFM.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def markdown_text(value: object) -> str:
    """`value` as literal inline Markdown text: one line, no links, images, headings or HTML."""
    text = " ".join(str(value).split())  # newlines would end a table row or start a block
    text = html.escape(text, quote=False)  # <, > and & as entities: no raw HTML
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def html_text(value: object) -> str:
    """`value` as HTML text content or attribute value."""
    return html.escape(str(value), quote=True)
