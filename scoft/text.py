"""Text typed by people (captions, reasons, reviewer names, comments) where a terminal or a log shows it:
bounded, and free of the characters that rewrite what a terminal displays."""

from __future__ import annotations

import re

# C0/C1 controls (NUL and ESC among them) other than tab and line breaks, and the bidirectional
# embeddings, overrides and isolates that reorder how the rest of a line is displayed ("Trojan Source").
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# What a reason or a name typed for the registry may not hold: the above and a carriage return, which
# alone moves a terminal's cursor back over what was printed.
_REFUSED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# What `visible` escapes: the above, and line breaks and tabs, which can fake a line of output.
_SHOWN_ESCAPED = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def first_control(text: str) -> str | None:
    """Where `text` holds a control character, said for an error message; None when it holds none."""
    m = CONTROL.search(text)
    return None if m is None else f"control character U+{ord(m[0]):04X} at position {m.start()}"


def checked(field: str, text: str, limit: int) -> str:
    """`text` when it is at most `limit` characters and holds no control character (a carriage return
    included); else ValueError naming the field and the problem."""
    if not isinstance(text, str):
        raise ValueError(f"{field} must be text")
    if len(text) > limit:
        raise ValueError(f"{field} has {len(text)} characters, more than the {limit} allowed")
    if m := _REFUSED.search(text):
        raise ValueError(f"{field} holds control character U+{ord(m[0]):04X} at position {m.start()}")
    return text


def visible(text, limit: int = 500) -> str:
    """`text` as one safe line: controls and line breaks escaped (\\x1b, \\n), cut at `limit`."""
    text = str(text)
    shown = _SHOWN_ESCAPED.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"
