"""The live output pane's buffering: an unfinished line is kept as its chunks (linear time) and
written out as a line once it reaches 64 KiB, so output without newlines stays bounded."""

from __future__ import annotations

import time

from breakglass_tui.ui.widgets.output_pane import MAX_PARTIAL_CHARS, OutputPane


def test_lines_split_across_chunks_are_joined() -> None:
    pane = OutputPane()
    for chunk in ("fi", "rst li", "ne\nsec", "ond\n", "third", ""):
        pane.feed("c1", chunk)
    pane.feed("c2", "other call\n")
    assert pane.queued_lines == ["first line", "second", "other call"]
    pane.end("c1")
    assert pane.queued_lines[-1] == "third" and pane.ingested == 4


def test_a_long_line_without_newline_is_flushed_in_64_kib_lines() -> None:
    assert MAX_PARTIAL_CHARS == 64 * 1024
    pane = OutputPane()
    total = 0
    for i in range(1100):  # 1100 KiB, never a newline
        chunk = chr(ord("a") + i % 26) * 1024
        pane.feed("c1", chunk)
        total += len(chunk)
        held = pane.unfinished_chars("c1")
        assert held < MAX_PARTIAL_CHARS, "the unfinished line grows without bound"
    lines = pane.queued_lines
    assert len(lines) == total // MAX_PARTIAL_CHARS
    assert {len(line) for line in lines} == {MAX_PARTIAL_CHARS}
    pane.feed("c1", "tail\n")
    pane.end("c1")
    lines = pane.queued_lines
    assert "".join(lines) == "".join(chr(ord("a") + i % 26) * 1024 for i in range(1100)) + "tail"


def test_a_long_line_in_small_chunks_costs_linear_time() -> None:
    pane = OutputPane()
    chunk = "x" * 512
    started = time.perf_counter()
    for _ in range(8 * 1024):  # 4 MiB in 512-byte chunks, no newline
        pane.feed("c1", chunk)
    elapsed = time.perf_counter() - started
    pane.end("c1")
    assert sum(len(line) for line in pane.queued_lines) == 4 * 1024 * 1024
    # Linear: well under a second here (re-concatenating the whole line took many seconds).
    assert elapsed < 1.0, f"{elapsed:.1f} s"
