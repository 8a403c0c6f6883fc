"""Hostile VM output is reduced to printable text and colour before any widget sees it."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from breakglass_tui.ui.sanitize import sanitize_line, sanitize_text

CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def test_osc52_with_bel_or_st_leaves_nothing_of_the_clipboard_write():
    for seq in ("\x1b]52;c;SGVsbG8=\x07", "\x1b]52;c;SGVsbG8=\x1b\\"):
        text = sanitize_line(f"before{seq}after")
        assert text.plain == "beforeafter"


def test_colour_is_kept_and_cursor_movement_dropped():
    text = sanitize_line("\x1b[31mred\x1b[0m \x1b[2J\x1b[Hplain")
    assert text.plain == "red plain"
    assert [str(span.style) for span in text.spans] == ["color(1)"]


def test_c1_csi_and_bell_are_removed():
    assert sanitize_line("\x9b31mx\x07y").plain == "31mxy"


def test_tabs_become_spaces_and_plain_lines_pass_untouched():
    assert sanitize_line("a\tb").plain == "a       b"
    assert sanitize_line("just text").plain == "just text"


def test_sanitize_text_keeps_newlines_drops_escapes():
    assert sanitize_text("a\x1b]52;c;x\x07\nb\x1b[2Jc") == "a\nbc"


@given(st.text(alphabet=st.characters(max_codepoint=0x200), max_size=80))
def test_no_control_character_ever_survives(line: str):
    assert not CONTROL.search(sanitize_line(line).plain)
    assert "\x1b" not in sanitize_text(line)


def test_crlf_output_keeps_its_text():
    assert sanitize_line("Filesystem  Size\r").plain == "Filesystem  Size"
