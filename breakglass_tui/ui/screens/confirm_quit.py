"""Asks before quitting while an action runs: quitting would cancel it mid-way."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from breakglass_tui.ui.screens.question import QuestionScreen


class ConfirmQuitScreen(QuestionScreen[bool]):
    """Dismisses with True to quit, False to stay. Ctrl+Q again quits; Esc stays."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("escape", "choose(False)", "Stay", id="confirm_quit.stay"),
    ]
    AUTO_FOCUS = "#stay"

    def __init__(self, running: str) -> None:
        super().__init__()
        self.running = running

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(
                f"{self.running} is still running. Quitting cancels it (a PVE verb already"
                " begun finishes on the host). Quit anyway? Ctrl+Q again quits, Esc stays.",
                markup=False,
                id="confirm-text",
            )
            yield self.typed_line()
            with Horizontal(id="confirm-buttons"):
                yield Button("Quit", id="quit", variant="error")
                yield Button("Stay", id="stay", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.button_pressed(event) == "quit")

    def action_choose(self, quit_: bool) -> None:
        self.dismiss(quit_)
