"""Asks before quitting while an action runs: quitting would cancel it mid-way."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmQuitScreen(ModalScreen[bool]):
    """Dismisses with True to quit, False to stay."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("y", "choose(True)", "Quit", id="confirm_quit.yes"),
        Binding("n,escape", "choose(False)", "Stay", id="confirm_quit.no"),
    ]

    def __init__(self, running: str) -> None:
        super().__init__()
        self.running = running

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(
                f"{self.running} is still running. Quitting cancels it (a PVE verb already"
                " begun finishes on the host). Quit anyway?",
                markup=False,
                id="confirm-text",
            )
            with Horizontal(id="confirm-buttons"):
                yield Button("Quit (y)", id="quit", variant="error")
                yield Button("Stay (n)", id="stay", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#stay", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "quit")

    def action_choose(self, quit_: bool) -> None:
        self.dismiss(quit_)
