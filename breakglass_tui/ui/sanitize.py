"""Neutralise terminal escape sequences in text that came from a host or the model.

Output of a wedged VM is hostile input: an OSC 52 sequence in it would write the operator's
clipboard (xterm.js in the browser obeys it), other sequences can move the cursor or retitle the
window. Every line is reduced to printable text plus colour spans before it reaches a widget.
"""

from __future__ import annotations

import re

from rich.text import Text

# OSC ... terminated by BEL or ST; rich's decoder only knows the ST form and would leave the
# payload of a BEL-terminated one behind as text.
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
# Anything that is not printable after decoding: C0 (but tab), DEL, C1 (incl. the one-byte CSI).
# CSI sequences and two-character escapes, for text that is not decoded for colour.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL_KEEP_NL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def sanitize_line(line: str) -> Text:
    """One line of command output as a ``Text`` with its colours kept and every other escape
    sequence or control character removed (tabs become spaces)."""
    if not _CONTROL.search(line):
        # The common case, and the fast one: nothing to decode.
        return Text(line.expandtabs(), no_wrap=True, end="")
    if "\x1b" in line or "\x9b" in line:
        text = Text.from_ansi(_OSC.sub("", line), no_wrap=True, end="")
        plain = text.plain
        if _CONTROL.search(plain):
            # Leftovers the decoder let through (C1 bytes, BEL, ...): rebuild without them,
            # keeping the spans only when nothing was removed before them would shift them.
            text = Text(_CONTROL.sub("", plain).expandtabs(), no_wrap=True, end="")
        else:
            text.expand_tabs()
        return text
    return Text(_CONTROL.sub("", line).expandtabs(), no_wrap=True, end="")


def sanitize_text(text: str) -> str:
    """Multi-line text (model output, commands) with control characters other than newline and
    tab removed, for widgets that render plain text or Markdown."""
    text = _ESCAPES.sub("", _OSC.sub("", text))
    return _CONTROL_KEEP_NL.sub("", text)
