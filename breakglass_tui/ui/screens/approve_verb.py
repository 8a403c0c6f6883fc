"""Claude asks for a mutating verb past the per-message limit: the driving operator decides.

core.approval lets Claude run a few mutating verbs per operator message on its own; a further one
waits for this question. One key runs it (Ctrl+Y: not a letter, so a message being typed never
answers it); Esc, "Don't run" or no answer within the agent's timeout leaves it not run, and
Claude is told so. Read-only tabs are told in the chat; only the driving tab asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from breakglass_tui.core import injection
from breakglass_tui.core.events import (
    Event,
    InjectionReported,
    VerbApprovalAsked,
    VerbApprovalEnded,
)
from breakglass_tui.ui.screens.question import QuestionScreen

if TYPE_CHECKING:
    from breakglass_tui.ui.app import BreakglassApp

APPROVE_KEY = "ctrl+y"


def question_text(event: VerbApprovalAsked) -> str:
    return (
        f"Claude wants to run {event.verb} on the VM: its mutating verb no. {event.nth} for your"
        f" last message, past the limit of {event.limit}"
        " (BREAKGLASS_MAX_MUTATING_VERBS_PER_MESSAGE)."
        f" Ctrl+Y runs it (the PVE host's budget still applies). Esc, or no answer within"
        f" {event.timeout_s:g} s: it is not run, and Claude is told."
    )


class VerbApprovalScreen(QuestionScreen[bool]):
    """Dismisses with True to run the verb, False not to."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding(APPROVE_KEY, "choose(True)", "Run it", id="approve_verb.run"),
        Binding("escape", "choose(False)", "Don't run", id="approve_verb.refuse"),
    ]
    AUTO_FOCUS = "#refuse"  # Enter on nothing typed does not run a power action

    def __init__(self, event: VerbApprovalAsked) -> None:
        super().__init__()
        self.event = event
        self.over = False  # the agent stopped waiting (timeout, cancel) while it was covered

    def on_screen_resume(self) -> None:
        if self.over:  # it ended while another screen (help) was on top of it
            self.dismiss(None)

    @property
    def request_id(self) -> str:
        return self.event.request_id

    def compose(self) -> ComposeResult:
        with Vertical(id="approve-box"):
            yield Static(question_text(self.event), markup=False, id="approve-text")
            yield self.typed_line()
            with Horizontal(id="approve-buttons"):
                yield Button(f"Run {self.event.verb} (Ctrl+Y)", id="run", variant="error")
                yield Button("Don't run (Esc)", id="refuse", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.button_pressed(event) == "run")

    def action_choose(self, run: bool) -> None:
        self.dismiss(run)


OUTCOMES = {
    "approved": ("info", "The operator approved {verb}: it runs (the PVE host's budget applies)."),
    "refused": ("warning", "{verb} was not run: the operator refused it. Claude is told."),
    "no answer": ("warning", "{verb} was not run: no answer in time. Claude is told."),
    "cancelled": ("warning", "{verb} was not run: the turn was stopped."),
}


async def show(app: BreakglassApp, event: Event, *, own: bool) -> None:
    """[issue 15] The console's side of core.approval and core.injection: ask the driving
    operator, tell the others, show Claude's injection report as a warning."""
    chat = app.chat
    if isinstance(event, InjectionReported):
        await chat.add_notice(injection.notice_text(event), "warning")
    elif isinstance(event, VerbApprovalAsked):
        if not own:  # a read-only tab: the driving tab's operator decides
            await chat.add_notice(
                f"Claude asks the driving tab to approve {event.verb} (mutating verb no."
                f" {event.nth} for one message, past the limit of {event.limit}).",
                "warning",
            )
            return
        await chat.add_notice(question_text(event), "warning")

        def answered(run: bool | None) -> None:
            if run is None:  # the agent stopped waiting before the operator answered
                return
            agent: Any = app.backend.agent if app.backend is not None else None
            answer = getattr(agent, "answer_approval", None)
            if answer is None or not answer(event.request_id, run):
                app.notify("Too late: Claude is no longer waiting for that answer.")

        app.push_screen(VerbApprovalScreen(event), answered)
    elif isinstance(event, VerbApprovalEnded):
        for screen in app.screen_stack:
            if isinstance(screen, VerbApprovalScreen) and screen.request_id == event.request_id:
                if screen is app.screen:
                    screen.dismiss(None)
                else:
                    screen.over = True
        level, text = OUTCOMES.get(event.outcome, ("warning", "{verb}: " + event.outcome))
        await chat.add_notice(text.format(verb=event.verb), level)
