"""Text from CCUB (captions, categories, anything a community member typed) made inert wherever it
is rendered: Markdown reports and Prefect artifacts, HTML reports and the Data Docs."""

from __future__ import annotations

import html
import re
from pathlib import Path

from scoft.io import atomic_dir, write_json

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


def write_skipped_evaluation(out_dir: Path, metrics_file: Path, culture: str, reason: str) -> dict:
    """A culture that cannot be evaluated (no held-out record, no LoRA): the report says why. Here, not
    in scoft/evaluate.py, so that writing it imports no torch (the stage of a culture without records)."""
    metrics = {"culture": culture, "insufficient": reason}
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.md").write_text(f"# SCoFT evaluation: {markdown_text(culture)}\n\nNot evaluated: "
                                       f"{markdown_text(reason)}\n", encoding="utf-8")
    write_json(metrics_file, metrics)
    return metrics
