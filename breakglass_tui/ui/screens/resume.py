"""Offers to resume the open incident when a tab opens and nobody drives it."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from breakglass_tui.core.incident import IncidentSummary
from breakglass_tui.ui.sanitize import literal
from breakglass_tui.ui.screens.question import QuestionScreen


def resume_text(summary: IncidentSummary) -> str:
    """ "Resume the incident started <time> by <operator> (<N> events, last: <summary>)"."""
    when = (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(summary.started_at))
        if summary.started_at is not None
        else "at an unknown time"
    )
    who = f" by {summary.operator}" if summary.operator else ""
    last = f", last: {summary.last}" if summary.last else ""
    return f"Resume the incident started {when}{who} ({summary.events} events{last})?"


class ResumeScreen(QuestionScreen[bool]):
    """Dismisses with True to resume the open incident, False to start a new one."""

    AUTO_FOCUS = "#resume"

    def __init__(self, summary: IncidentSummary) -> None:
        super().__init__()
        self.summary = summary

    def compose(self) -> ComposeResult:
        with Vertical(id="resume-box"):
            yield Static(literal(resume_text(self.summary)), id="resume-text")
            yield Static(
                "Resuming restores the chat, outputs and bundles and Claude's context. A new"
                " incident closes this one. ←/→ choose, Enter answers.",
                markup=False,
                id="resume-hint",
            )
            yield self.typed_line()
            with Horizontal(id="resume-buttons"):
                yield Button("Resume", id="resume", variant="primary")
                yield Button("Start a new incident", id="new", variant="default")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.button_pressed(event) == "resume")
