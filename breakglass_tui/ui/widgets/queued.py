"""The operator's queued messages, above the chat input: what will be sent when, and how to
change it (core.steering has the rules)."""

from __future__ import annotations

from collections.abc import Sequence

from textual.content import Content
from textual.widgets import Static

from breakglass_tui.core.steering import QueuedMessage
from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.sanitize import literal, one_line

HINT = "↑ on an empty input edits the last · /drop removes it · click ✎ or ✗"


class QueuedView(Guarded, Static):
    """One line per queued message, each with ✎ (edit) and ✗ (drop) to click."""

    DEFAULT_CSS = """
    QueuedView {
        height: auto;
        max-height: 8;
        padding: 0 1;
        border-left: thick $accent;
        background: $accent 10%;
        color: $text;
        display: none;
    }
    """

    def show(self, items: Sequence[QueuedMessage], *, starting: bool) -> None:
        """Redraw for ``items``; ``starting``: the console is not ready to run anything yet."""
        self.display = bool(items)
        if not items:
            self.update("")
            return
        when = (
            "runs as soon as the console is ready"
            if starting
            else "sent to Claude at its next step, or run when the current step ends"
        )
        lines = [Content.assemble((f"Queued ({when})", "bold"), "  ", (HINT, "dim"))]
        for item in items:
            actions = Content.from_markup(
                f"[@click=app.edit_queued({item.id})]✎[/] [@click=app.drop_queued({item.id})]✗[/]"
            )
            text = literal(one_line(item.text, limit=300))
            lines.append(Content.assemble(actions, " ⏳ ", text))
        self.update(Content("\n").join(lines))
