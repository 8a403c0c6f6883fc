"""The chat pane: operator input, one Markdown per assistant turn, a compact block per tool call."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.suggester import SuggestFromList
from textual.widgets import Collapsible, Input, Static

from breakglass_tui.core import slash, tools
from breakglass_tui.core.events import ToolCallEnded, ToolCallStarted
from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.sanitize import literal, one_line, sanitize_text

if TYPE_CHECKING:
    from textual.widgets import Markdown
    from textual.widgets.markdown import MarkdownStream


def describe_call(tool: str, params: dict[str, Any]) -> str:
    """One line naming what a tool call does (its entry in core.tools says how)."""
    return tools.title(tool, params)


class ChatInput(Guarded, Input):
    """The operator's input: slash-command completion (→ accepts) and history (↑/↓)."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("up", "history(-1)", "Previous", show=False, id="chat.history_previous"),
        Binding("down", "history(1)", "Next", show=False, id="chat.history_next"),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            placeholder="Tell Claude what is wrong, or /help · → completes · ↑ history",
            suggester=SuggestFromList(slash.completions(), case_sensitive=False),
            **kwargs,
        )
        self.history: list[str] = []
        self._history_index = 0

    async def _on_key(self, event: events.Key) -> None:
        if event.key in ("enter", "ctrl+j"):
            # Enter sends here, in the order the keys came. Textual's own Enter is a binding,
            # found only once the key has bubbled back up to the app: by then the keys typed
            # after it (a burst from a terminal, `/probe⏎/sh df -h⏎`) are already in the box,
            # and both Enters sent "/probe/sh df -h". (ctrl+j: Enter typed before the console
            # set the terminal to raw mode arrives as a line feed.)
            event.stop()
            event.prevent_default()
            await self.action_submit()
            return
        await super()._on_key(event)

    async def action_submit(self) -> None:
        """Send what is in the box, and empty it at once: what is typed next is the next
        message, never cleared with this one."""
        value = self.value
        validation = self.validate(value) if "submitted" in self.validate_on else None
        self.value = ""
        self.post_message(self.Submitted(self, value, validation))

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._history_index = len(self.history)

    def action_history(self, step: int) -> None:
        if step < 0 and not self.value:
            # ↑ on an empty input first takes back the newest queued message, to edit it.
            edit = getattr(self.app, "edit_last_queued", None)
            if edit is not None and edit():
                return
        if not self.history:
            return
        self._history_index = max(0, min(len(self.history), self._history_index + step))
        self.value = (
            self.history[self._history_index] if self._history_index < len(self.history) else ""
        )
        self.cursor_position = len(self.value)


# A heading is one line cut with an ellipsis on screen; this bounds the work behind it.
HEADING_CHARS = 500


class ToolBlock(Guarded, Collapsible):
    """A tool call: what ran, exit status, duration; expands to the details.

    The heading holds outside text (a command such as ``grep -c '[/]' /etc/fstab``, a summary):
    it is given as ``Content``, never as a markup string."""

    def __init__(self, event: ToolCallStarted) -> None:
        self.call = event
        self.label = one_line(describe_call(event.tool, event.input), limit=HEADING_CHARS)
        classes = "tool"
        if event.mutating:
            classes += " -mutating"
        if event.manual:
            classes += " -manual"
        self.heading = self._heading("running…")
        self._details = Static(literal(self._detail_text()), classes="tool-details")
        super().__init__(
            self._details, title=literal(self.heading), collapsed=True, classes=classes
        )

    def _heading(self, status: str) -> str:
        who = "you" if self.call.manual else "Claude"
        badge = "⚠ " if self.call.mutating else ""
        return f"{badge}{self.label}  · {status} · {who}"

    def _detail_text(self) -> str:
        params = json.dumps(self.call.input, indent=2, ensure_ascii=False)
        return f"tool {self.call.tool}\ninput {params}"

    def finish(self, event: ToolCallEnded) -> None:
        summary = one_line(event.summary, limit=HEADING_CHARS)
        if event.cancelled:
            status = "cancelled"
            self.add_class("-cancelled")
        elif event.ok:
            status = f"✓ {summary}"
            self.add_class("-ok")
        else:
            status = f"✗ {summary}"
            self.add_class("-failed")
        self.heading = self._heading(status)
        self.title = literal(self.heading)
        self._details.update(
            literal(f"{self._detail_text()}\nresult {event.summary} ({event.duration_s:.1f} s)")
        )


class ThinkingBlock(Guarded, Collapsible):
    """What Claude thinks before and between its tool calls, dimmed, under its turn: open while
    it streams (the operator never sits in silence), with how long Claude has been thinking;
    folded once the turn answered in words. Model text: never markup."""

    def __init__(self, started_at: float) -> None:
        self._started_at = started_at
        self._text = ""
        self._thought_s = 0.0
        self._open_blocks = 0
        self._redacted = 0
        self._running = True
        self._body = Static(Text(""), markup=False, classes="thinking-text")
        super().__init__(self._body, title=self._heading(), collapsed=False, classes="thinking")

    def on_mount(self) -> None:
        self._timer = self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        if self._running:
            self.title = self._heading()

    def _heading(self) -> Content:
        if self._running:
            seconds = max(0.0, time.time() - self._started_at)
            words = f"thinking… {seconds:.0f} s"
        else:
            words = f"thought for {self._thought_s:.1f} s"
        if self._redacted:
            words += f" · {self._redacted} redacted block{'s' if self._redacted > 1 else ''}"
        return Content(words)

    def start_block(self, *, redacted: bool) -> None:
        self._open_blocks += 1
        self._running = True
        if redacted:
            self._redacted += 1
        self.title = self._heading()

    def write(self, text: str) -> None:
        self._text += sanitize_text(text)
        self._body.update(Text(self._text))

    def end_block(self, duration_s: float) -> None:
        self._open_blocks = max(0, self._open_blocks - 1)
        self._thought_s += duration_s
        self._running = self._open_blocks > 0
        self.title = self._heading()

    def finish(self, *, fold: bool) -> None:
        """The turn ended: stop the clock; fold the block if the turn answered in words."""
        self._running = False
        self._open_blocks = 0
        self.title = self._heading()
        if fold:
            self.collapsed = True


class ChatPane(Guarded, Vertical):
    """Conversation (anchored to the bottom until the operator scrolls) above the input."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._turns: dict[str, tuple[Markdown, MarkdownStream]] = {}
        self._pending_text: dict[str, str] = {}  # a turn's whitespace before its first text
        self._tools: dict[str, ToolBlock] = {}
        self._thinking: dict[str, ThinkingBlock] = {}

    def compose(self) -> ComposeResult:
        from breakglass_tui.ui.widgets.queued import QueuedView

        yield VerticalScroll(id="conversation")
        yield QueuedView(id="queued")
        yield ChatInput(id="chat-input")

    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    def on_mount(self) -> None:
        self.conversation.anchor()

    async def _add(self, widget: Any) -> None:
        await self.conversation.mount(widget)

    async def add_operator(self, text: str) -> None:
        await self._add(Static(literal(text), classes="operator"))

    async def add_notice(self, text: str, level: str = "info") -> None:
        await self._add(Static(literal(text), classes=f"notice -{level}"))

    async def start_turn(self, turn_id: str) -> None:
        """A turn begins; its Markdown is mounted with its first visible text (a turn with no
        text — tools only — leaves nothing behind: an empty Markdown removed again was seen to
        wedge its message pump)."""
        self._pending_text.setdefault(turn_id, "")

    async def _markdown_for(self, turn_id: str) -> MarkdownStream:
        turn = self._turns.get(turn_id)
        if turn is not None:
            return turn[1]
        # Imported on the first turn, not at start: markdown-it is a noticeable part of the
        # time to the first frame.
        from textual.widgets import Markdown

        # Links do not open on click: the app shows the URL and asks (LinkScreen).
        markdown = Markdown(classes="assistant", open_links=False)
        await self._add(markdown)
        stream = Markdown.get_stream(markdown)
        self._turns[turn_id] = (markdown, stream)
        return stream

    async def turn_delta(self, turn_id: str, text: str) -> None:
        text = sanitize_text(text)
        if turn_id not in self._turns:
            text = self._pending_text.pop(turn_id, "") + text
            if not text.strip():  # nothing to show yet: kept until there is
                self._pending_text[turn_id] = text
                return
        await (await self._markdown_for(turn_id)).write(text)

    async def end_turn(self, turn_id: str) -> None:
        self._pending_text.pop(turn_id, None)
        turn = self._turns.pop(turn_id, None)
        answered = False
        if turn is not None:
            markdown, stream = turn
            await stream.stop()
            answered = bool(markdown.source.strip())
            if not answered:
                await markdown.remove()
        block = self._thinking.pop(turn_id, None)
        if block is not None:
            block.finish(fold=answered)

    async def thinking_start(self, turn_id: str, *, started_at: float, redacted: bool) -> None:
        """Claude began a thinking block in ``turn_id``: one dimmed block per turn, above the
        turn's words."""
        block = self._thinking.get(turn_id)
        if block is None:
            block = ThinkingBlock(started_at)
            self._thinking[turn_id] = block
            turn = self._turns.get(turn_id)
            if turn is not None and turn[0].parent is not None:
                await self.conversation.mount(block, before=turn[0])
            else:
                await self._add(block)
        block.start_block(redacted=redacted)

    def thinking_delta(self, turn_id: str, text: str) -> None:
        block = self._thinking.get(turn_id)
        if block is not None:
            block.write(text)

    def thinking_end(self, turn_id: str, duration_s: float) -> None:
        block = self._thinking.get(turn_id)
        if block is not None:
            block.end_block(duration_s)

    async def end_all_turns(self) -> None:
        for turn_id in list(self._turns) + list(self._pending_text):
            await self.end_turn(turn_id)

    async def start_tool(self, event: ToolCallStarted) -> None:
        block = ToolBlock(event)
        self._tools[event.call_id] = block
        await self._add(block)

    def end_tool(self, event: ToolCallEnded) -> None:
        block = self._tools.pop(event.call_id, None)
        if block is not None:
            block.finish(event)
