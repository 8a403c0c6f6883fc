"""Offers to resume the open incident when a tab opens and nobody drives it."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from breakglass_tui.core.incident import IncidentSummary
from breakglass_tui.ui.sanitize import sanitize_text


def resume_text(summary: IncidentSummary) -> str:
    """ "Resume the incident started <time> by <operator> (<N> events, last: <summary>)"."""
    when = (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(summary.started_at))
        if summary.started_at is not None
        else "at an unknown time"
    )
    who = f" by {summary.operator}" if summary.operator else ""
    last = f", last: {summary.last}" if summary.last else ""
    return sanitize_text(
        f"Resume the incident started {when}{who} ({summary.events} events{last})?"
    )


class ResumeScreen(ModalScreen[bool]):
    """Dismisses with True to resume the open incident, False to start a new one."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("r", "choose(True)", "Resume", id="resume.resume"),
        Binding("n", "choose(False)", "New incident", id="resume.new"),
    ]

    AUTO_FOCUS = "#resume"

    def __init__(self, summary: IncidentSummary) -> None:
        super().__init__()
        self.summary = summary

    def compose(self) -> ComposeResult:
        with Vertical(id="resume-box"):
            yield Static(resume_text(self.summary), markup=False, id="resume-text")
            yield Static(
                "Resuming restores the chat, outputs and bundles and Claude's context. A new"
                " incident closes this one.",
                markup=False,
                id="resume-hint",
            )
            with Horizontal(id="resume-buttons"):
                yield Button("Resume (r)", id="resume", variant="primary")
                yield Button("Start a new incident (n)", id="new", variant="default")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "resume")

    def action_choose(self, resume: bool) -> None:
        self.dismiss(resume)
