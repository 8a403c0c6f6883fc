"""Outside text is data: the one way a string from a host, the model, the operator, the PVE host
or an exception reaches the screen.

Two dangers, both closed here and nowhere else:

- **Markup.** Textual parses a plain ``str`` given as a ``Collapsible`` title, a ``DataTable`` cell,
  a ``notify`` message or a ``Static`` with markup on: ``'[/]'`` raises ``MarkupError`` (the app
  ends), ``[@click=app.quit]`` becomes a live action, ``[b]x[/b]`` is rewritten. Widgets get
  :func:`literal` (a ``Content``) or :func:`literal_text` (a Rich ``Text``) instead, never a
  markup string.
- **Escape sequences and invisible characters.** An OSC 52 in a VM's output would write the
  operator's clipboard (xterm.js in the browser obeys it), an OSC 8 makes a hidden hyperlink,
  other sequences move the cursor or retitle the window, BiDi overrides reorder what is shown,
  and a lone surrogate cannot be encoded for the terminal at all. :func:`clean` removes escape
  sequences and control characters and shows BiDi controls and lone surrogates as ``�``. It runs
  to a fixpoint: removing one sequence can join the pieces around it into a new one.

Command output keeps its colours (:func:`sanitize_line`); everything else is plain text.
"""

from __future__ import annotations

import re

from rich.style import Style
from rich.text import Span, Text
from textual.content import Content

REPLACEMENT = "\ufffd"
# String sequences (OSC, DCS, SOS, PM, APC), terminated by BEL or ST (ESC \), or unterminated up
# to the next ESC or the end: their payload is never text. Both the 7-bit and the C1 forms.
_STRING_SEQ = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
)
# CSI sequences and two-character escapes, for text that is not decoded for colour.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|\x1b[ -/]+[0-~]")
# C0 (but tab), DEL and C1; with or without newline.
_CONTROL_KEEP_NL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Shown as U+FFFD: BiDi embeddings, overrides, isolates and marks (they reorder what is shown),
# and lone surrogates (from undecodable bytes; they cannot be written to a terminal).
_INVISIBLE = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# Anything that sends a line off the fast path.
_UNSAFE = re.compile(
    r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
# Outside text shown in a widget other than the output pane is cut here (a 10 MB error message
# or heading must not stall the screen); the whole of it stays in the records.
MAX_SHOWN_CHARS = 20_000


def _strip_sequences(text: str) -> str:
    """Remove string sequences until none is left (one pass can join a new one)."""
    while True:
        stripped = _STRING_SEQ.sub("", text)
        if stripped == text:
            return text
        text = stripped


def clean(
    text: str,
    *,
    newlines: bool = True,
    limit: int | None = MAX_SHOWN_CHARS,
    expand_tabs: bool = True,
) -> str:
    """``text`` as safe plain text: no escape sequence, no control character (newlines kept when
    ``newlines``; tabs kept, or expanded when ``expand_tabs``), BiDi controls and lone surrogates
    shown as ``�``, cut to ``limit`` characters with a note of how many more there were."""
    if not isinstance(text, str):
        text = str(text)
    if limit is not None and len(text) > limit:
        more = len(text) - limit
        text = f"{text[:limit]}… ({more:,} more characters)"
    if not newlines and "\n" in text:
        text = text.replace("\n", " ")
    if _UNSAFE.search(text):
        control = _CONTROL_KEEP_NL if newlines else _CONTROL
        while True:
            stripped = control.sub("", _ESCAPES.sub("", _strip_sequences(text)))
            if stripped == text:
                break
            text = stripped
        text = _INVISIBLE.sub(REPLACEMENT, text)
    return text.expandtabs() if expand_tabs and "\t" in text else text


def one_line(text: str, *, limit: int | None = MAX_SHOWN_CHARS) -> str:
    """:func:`clean` for a heading: line breaks shown as ``⏎``, a tab as one space (expanded,
    tabs would push the rest of a heading off its one line)."""
    if not isinstance(text, str):
        text = str(text)
    text = text.replace("\r\n", "\n").replace("\n", " ⏎ ").replace("\t", " ")
    return clean(text, newlines=False, limit=limit)


def literal(text: str, style: str = "", *, newlines: bool = True) -> Content:
    """Outside text as Textual ``Content``: shown exactly as cleaned, never parsed as markup."""
    content = Content(clean(text, newlines=newlines))
    return content.stylize(style) if style else content


def literal_text(text: str, style: str | Style = "", *, newlines: bool = True) -> Text:
    """Outside text as a Rich ``Text`` (for ``DataTable`` cells and Rich renderables)."""
    return Text(clean(text, newlines=newlines), style=style, end="")


def sanitize_line(line: str) -> Text:
    """One line of command output as a ``Text`` with its colours kept and every other escape
    sequence or control character removed (tabs become spaces, BiDi controls ``�``)."""
    if not _UNSAFE.search(line):
        # The common case, and the fast one: nothing to decode.
        return Text(line.expandtabs(), no_wrap=True, end="")
    line = _INVISIBLE.sub(REPLACEMENT, line)
    if "\x1b" in line or "\x9b" in line:
        text = Text.from_ansi(_strip_sequences(line), no_wrap=True, end="")
        plain = text.plain
        if _CONTROL.search(plain):
            # Leftovers the decoder let through (C1 bytes, BEL, a lone ESC, ...): rebuild
            # without them, keeping the spans only when nothing before them was removed.
            text = Text(clean(plain, newlines=False, limit=None), no_wrap=True, end="")
        else:
            text.expand_tabs()
            # Colours only: a link (OSC 8) or any other meta never survives.
            text.spans = [_colour_only(span) for span in text.spans]
        return text
    return Text(clean(line, newlines=False, limit=None), no_wrap=True, end="")


def _colour_only(span: Span) -> Span:
    style = span.style
    if isinstance(style, Style) and (style.link or style._meta):
        style = Style(
            color=style.color,
            bgcolor=style.bgcolor,
            bold=style.bold,
            dim=style.dim,
            italic=style.italic,
            underline=style.underline,
            reverse=style.reverse,
            strike=style.strike,
        )
    return Span(span.start, span.end, style)


def sanitize_text(text: str) -> str:
    """Multi-line outside text (model output, commands) without escape sequences or control
    characters other than newline and tab, for widgets that render plain text or Markdown.
    Not cut: the Markdown stream gets every piece."""
    return clean(text, newlines=True, limit=None, expand_tabs=False)
