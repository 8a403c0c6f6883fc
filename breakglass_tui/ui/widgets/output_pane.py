"""The live output pane: every command's output as it arrives, sanitised, batched, bounded.

Measured: per-line writes to ``Log`` manage ~8.5k lines/s and ``RichLog`` ~1k lines/s, so output is
buffered as it arrives and written in bulk on a short timer. The widget is a line API over a
bounded list of lines (Toolong's approach): no widget per line, strips rendered on demand and
cached. Lines are kept as received and sanitised when rendered: ``render_line`` is the only way
to the screen, so every line that is ever shown passes :func:`sanitize_line` (escape sequences
other than colour dropped), and a burst of 200,000 lines costs only the few hundred that are shown.
"""

from __future__ import annotations

from collections import deque

from rich.segment import Segment
from rich.text import Text
from textual.app import ComposeResult
from textual.cache import LRUCache
from textual.containers import Vertical
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Static

from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.sanitize import clean, one_line, sanitize_line

FLUSH_INTERVAL_S = 0.08  # within the 50-100 ms window: fast enough to feel live, few renders
DEFAULT_MAX_LINES = 20_000
# An unfinished line is written out as a line once it holds this much: output without newlines
# (a binary, a progress bar) must not grow one line without bound.
MAX_PARTIAL_CHARS = 64 * 1024


class OutputLog(Guarded, ScrollView, can_focus=True):
    """A bounded, scrollable list of lines that follows the tail unless scrolled up. Raw lines
    are sanitised when rendered; ``Text`` lines are the app's own (separators, summaries)."""

    DEFAULT_CSS = """
    OutputLog { background: $surface; color: $text; overflow-x: auto; }
    """

    def __init__(self, *, max_lines: int = DEFAULT_MAX_LINES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_lines = max_lines
        self._lines: deque[str | Text] = deque()
        self._first = 0  # absolute index of _lines[0]: cache keys survive pruning
        self._width = 0
        self._cache: LRUCache[int, Strip] = LRUCache(1024)
        self._follow = True  # at the tail: new output scrolls into view

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        # The operator scrolling up stops the following; back at the bottom resumes it.
        self._follow = new >= self.max_scroll_y

    def watch_show_horizontal_scrollbar(self, shown: bool) -> None:
        # A long line brings the horizontal scrollbar, which takes a row: stay on the tail.
        if self._follow:
            self.call_after_refresh(self._scroll_to_tail)

    def _scroll_to_tail(self) -> None:
        self.scroll_end(animate=False, immediate=True, x_axis=False)

    def keep_tail(self) -> None:
        """If following, make sure the tail is in view (a scroll requested before the layout
        settled can land short); called on every flush tick."""
        if self._follow and self.scroll_y < self.max_scroll_y:
            self._scroll_to_tail()

    @property
    def line_count(self) -> int:
        return len(self._lines)

    @property
    def lines(self) -> list[str]:
        """The lines held, as the screen shows them (sanitised plain text)."""
        return [self._text(i).plain for i in range(len(self._lines))]

    def _text(self, index: int) -> Text:
        line = self._lines[index]
        return line if isinstance(line, Text) else sanitize_line(line)

    def write_lines(self, lines: list[str | Text]) -> None:
        """Append lines in one go; prune to ``max_lines``."""
        if not lines:
            return
        follow = self._follow
        if len(lines) > self.max_lines:
            lines = lines[-self.max_lines :]
        self._lines.extend(lines)
        # Raw length bounds the shown width (escapes only shrink it): cheap, and only the
        # horizontal scroll range depends on it.
        width = max(len(line) if isinstance(line, str) else line.cell_len for line in lines)
        self._width = max(self._width, width)
        removed = len(self._lines) - self.max_lines
        if removed > 0:
            for _ in range(removed):
                self._lines.popleft()
            self._first += removed
        self.virtual_size = Size(self._width, len(self._lines))
        if follow:
            # After the refresh: the scrollbar that allows scrolling may not exist yet.
            self.scroll_end(animate=False, immediate=False, x_axis=False)
        elif removed > 0:
            # Keep the lines the operator is reading where they are while the head is pruned.
            self.scroll_to(y=max(0, self.scroll_y - removed), animate=False, immediate=True)
        self.refresh()

    def clear(self) -> None:
        self._lines.clear()
        self._cache.clear()
        self._width = 0
        self.virtual_size = Size(0, 0)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.size.width
        style = self.rich_style
        if index >= len(self._lines):
            return Strip.blank(width, style)
        key = self._first + index
        strip = self._cache.get(key)
        if strip is None:
            text = self._text(index)  # the sanitising step, for every line ever shown
            segments = [
                Segment(seg.text, style + seg.style if seg.style else style)
                for seg in text.render(self.app.console)
                if seg.text != "\n"
            ]
            strip = Strip(segments, text.cell_len)
            self._cache[key] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, style).apply_offsets(scroll_x, index)


class OutputPane(Guarded, Vertical):
    """The pane around :class:`OutputLog`: buffers chunks per call and flushes them on a timer."""

    def __init__(self, *, max_lines: int = DEFAULT_MAX_LINES, **kwargs) -> None:
        super().__init__(**kwargs)
        self._max_lines = max_lines
        self._pending: deque[str | Text] = deque()
        # Per call, its unfinished line: the chunks so far (joined once, when the line ends, so
        # a long line costs linear time) and their length.
        self._partial: dict[str, list[str]] = {}
        self._partial_chars: dict[str, int] = {}
        self._dropped = 0
        self.ingested = 0  # lines accepted so far (the benchmark reads it)

    def compose(self) -> ComposeResult:
        yield Static("Live output", classes="pane-title")
        yield OutputLog(max_lines=self._max_lines, id="output-log")

    def on_mount(self) -> None:
        self.set_interval(FLUSH_INTERVAL_S, self.flush, name="output flush")

    @property
    def log_widget(self) -> OutputLog:
        return self.query_one(OutputLog)

    @property
    def queued_lines(self) -> list[str]:
        """The lines taken in and not written yet: the next flush writes them."""
        return [str(line) for line in self._pending]

    def unfinished_chars(self, call_id: str) -> int:
        """How much of ``call_id``'s unfinished line (no newline yet) the pane holds."""
        return sum(len(piece) for piece in self._partial.get(call_id, []))

    def begin(self, call_id: str, label: str) -> None:
        """A separator naming the command whose output follows."""
        self._end_partial(call_id)
        title = one_line(label, limit=500)
        rule = Text(f"── {title} ", style="bold cyan", no_wrap=True, end="")
        rule.append("─" * max(3, 60 - rule.cell_len), style="dim cyan")
        self._queue(rule)

    def feed(self, call_id: str, text: str) -> None:
        """A chunk of output of ``call_id``; complete lines are queued, the rest waits (up to
        ``MAX_PARTIAL_CHARS``, then it is queued as a line of its own)."""
        if not text:
            return
        parts = text.split("\n")
        tail = parts.pop()
        if parts:  # the unfinished line ends in this chunk
            held = self._partial.pop(call_id, None)
            self._partial_chars.pop(call_id, None)
            if held:
                held.append(parts[0])
                parts[0] = "".join(held)
        if tail:
            held = self._partial.setdefault(call_id, [])
            held.append(tail)
            size = self._partial_chars.get(call_id, 0) + len(tail)
            self._partial_chars[call_id] = size
            if size >= MAX_PARTIAL_CHARS:
                data = "".join(held)
                cut = len(data) - len(data) % MAX_PARTIAL_CHARS
                parts.extend(
                    data[i : i + MAX_PARTIAL_CHARS] for i in range(0, cut, MAX_PARTIAL_CHARS)
                )
                rest = data[cut:]
                self._partial[call_id] = [rest] if rest else []
                self._partial_chars[call_id] = len(rest)
        self._queue_lines(parts)

    def _queue_lines(self, parts: list[str]) -> None:
        pending = self._pending
        pending.extend(parts)
        self.ingested += len(parts)
        overflow = len(pending) - self._max_lines
        if overflow > 0:
            # They would be pruned at once anyway: drop them before paying for sanitising.
            for _ in range(overflow):
                pending.popleft()
            self._dropped += overflow

    def end(self, call_id: str, summary: str | None = None) -> None:
        """The call finished: its last partial line is written, then a one-line summary."""
        self._end_partial(call_id)
        if summary:
            shown = clean(summary, newlines=False, limit=2000)
            self._queue(Text(f"   ↳ {shown}", style="dim", no_wrap=True, end=""))

    def _end_partial(self, call_id: str) -> None:
        held = self._partial.pop(call_id, None)
        self._partial_chars.pop(call_id, None)
        if held:
            self._pending.append("".join(held))
            self.ingested += 1

    def _queue(self, line: Text) -> None:
        self._pending.append(line)

    def flush(self) -> None:
        """Write what has arrived since the last flush (sanitised when shown)."""
        if not self._pending:
            self.log_widget.keep_tail()
            return
        pending, self._pending = self._pending, deque()
        lines: list[str | Text] = []
        if self._dropped:
            lines.append(
                Text(f"… {self._dropped} earlier lines not kept", style="dim italic", end="")
            )
            self._dropped = 0
        lines.extend(pending)
        self.log_widget.write_lines(lines)
