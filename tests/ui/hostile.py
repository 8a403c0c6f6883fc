"""Hostile strings, and how to read what the screen shows, for the text-is-data tests.

Every string that reaches the console from a host, the model, the operator, the PVE host or an
exception may contain any of these: markup Textual or Rich would obey, escape sequences a
terminal would obey (nested, unterminated, C1), BiDi overrides, NUL, lone surrogates (undecodable
bytes), very long lines.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from textual.geometry import Region

FRAGMENTS = (
    "[",
    "]",
    "[/]",
    "[/",
    "[b]bold?[/b]",
    "[@click=app.quit]quit[/]",
    "[@click=app.exit]",
    "[link=https://evil.example]x[/link]",
    "[red on white]",
    "[bold italic]",
    "[$accent]",
    "\\[escaped]",
    "[[double]]",
    "$variable",
    "\x1b[31mred\x1b[0m",
    "\x1b[2J\x1b[H",
    "\x1b]8;;https://evil.example\x07link\x1b]8;;\x07",
    "\x1b\x1b]0;x\x07]8;;https://evil.example\x07",  # one pass of stripping rebuilds an OSC 8
    "\x1b]52;c;cm0gLXJmIC8K\x07",
    "\x1b]52;c;cm0gLXJmIC8K\x1b\\",
    "\x1b]0;new title",  # unterminated
    "\x1bP1;2|secret\x1b\\",
    "\x9b31m",
    "\x9d8;;https://evil.example\x9c",
    "\x1b",
    "\x07",
    "\x00",
    "\r",
    "\t",
    "\n",
    "\u202e\u2066evil\u2069",
    "\u200f",
    "\ud800",
    "\udcff",
    "\ufeff",
    "é",
    "日本語",
    "🔥",
    "grep -c '[/]' /etc/fstab",
    "awk -F'[/]' '{print $2}'",
    "grep -v '[/]usr'",
)


def _invalid_utf8() -> st.SearchStrategy[str]:
    """Undecodable bytes as they arrive: surrogate-escaped or replaced."""
    raw = st.binary(min_size=1, max_size=12).filter(lambda b: _undecodable(b))
    return raw.flatmap(
        lambda b: st.sampled_from(
            [b.decode("utf-8", "surrogateescape"), b.decode("utf-8", "replace")]
        )
    )


def _undecodable(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def hostile_text(max_long: int = 30_000) -> st.SearchStrategy[str]:
    """A string of hostile fragments, ordinary text, undecodable bytes and, sometimes, a very
    long run."""
    piece = st.one_of(
        st.sampled_from(FRAGMENTS),
        st.text(max_size=12),
        _invalid_utf8(),
        st.integers(200, max_long).map(lambda n: "x" * n),
    )
    return st.lists(piece, min_size=1, max_size=8).map("".join)


def rendered(widget: Any) -> str:
    """What ``widget`` puts on the screen now: its rendered lines as text."""
    width, height = widget.size
    if not width or not height:
        return ""
    strips = widget.render_lines(Region(0, 0, width, height))
    return "\n".join("".join(segment.text for segment in strip) for strip in strips)


def squeeze(text: str) -> str:
    """Text without whitespace or the ellipsis of a cut line (wrapping and cutting differ)."""
    return "".join(ch for ch in text if not ch.isspace() and ch != "…")


CONTROL = (
    {chr(c) for c in range(0x20) if c != 0x0A} | {chr(0x7F)} | {chr(c) for c in range(0x80, 0xA0)}
)


def has_control(text: str) -> bool:
    return any(ch in CONTROL for ch in text)
