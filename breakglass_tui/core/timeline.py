"""The incident as it happened, from its events: one pass over them, the same live (each event
the agent emits) and on replay (the incident journal, when a tab resumes or takes over). The
incident report and ``list_outputs`` read it; it knows nothing of the agent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from breakglass_tui.core import events as ev
from breakglass_tui.core import injection
from breakglass_tui.core.pricing import add
from breakglass_tui.core.tools import label
from breakglass_tui.hosts.types import ProbeResult, VerbResult

INTERRUPTED = "interrupted: the tab running it closed"
# The stop reasons of a turn that did not end with the model's own word.
_NOT_A_LAST_WORD = (None, "cancelled", "error", "incomplete", "refusal")


@dataclass(frozen=True)
class Call:
    """One finished tool call (or a forensics bundle's file, kept as an output)."""

    call_id: str
    tool: str
    label: str
    summary: str
    manual: bool
    exit_status: int | None
    output_id: str | None
    ok: bool


class Timeline:
    """What happened, in order: notes for the report's timeline, the calls and their outputs,
    the verbs, the last probe, Claude's last word, the usage and the sessions."""

    def __init__(self, scrub: Callable[[str], str] = str) -> None:
        self._scrub = scrub
        self.notes: list[tuple[float, str]] = []
        self.calls: list[Call] = []
        self.verbs: list[VerbResult] = []
        self.last_probe: ProbeResult | None = None
        self.last_assistant_text = ""
        self.usage = ev.Usage()
        self.sessions: list[tuple[str, str]] = []  # (session id, operator), in order
        self.call_ids: list[str] = []  # every call started, in order
        self.model: str | None = None
        self._started: dict[str, ev.ToolCallStarted] = {}
        self._turn_text: dict[str, list[str]] = {}

    def note(self, text: str, at: float | None = None) -> None:
        """A line of the timeline that no event says (a cancel, a failed record)."""
        self.notes.append((time.time() if at is None else at, self._scrub(text)))

    def replay(self, events: Iterable[ev.Event]) -> None:
        """The incident's earlier events; a call they show started and never ended was left
        running by a tab that closed."""
        for event in events:
            self.observe(event)
        for begun in list(self._started.values()):
            self._started.pop(begun.call_id)
            self.calls.append(
                Call(
                    begun.call_id,
                    begun.tool,
                    label(begun.tool, begun.input),
                    INTERRUPTED,
                    begun.manual,
                    None,
                    None,
                    ok=False,
                )
            )

    def observe(self, event: ev.Event) -> None:
        at = event.at
        match event:
            case ev.SessionStarted():
                if event.session_id not in dict(self.sessions):
                    self.sessions.append((event.session_id, event.operator))
                self.model = event.model
                lab = " (lab)" if event.lab else ""
                self.note(f"session {event.session_id} started by {event.operator}{lab}", at)
            case ev.OperatorMessage():
                self.note(f"operator: {event.text}", at)
            case ev.ToolCallStarted():
                self._started[event.call_id] = event
                self.call_ids.append(event.call_id)
                who = "operator" if event.manual else "Claude"
                self.note(f"{who} ran {event.tool} {label(event.tool, event.input)}", at)
            case ev.ToolCallEnded():
                begun = self._started.pop(event.call_id, None)
                shown = label(event.tool, begun.input if begun is not None else {})
                self.note(f"{event.tool} {shown}: {event.summary}", at)
                manual = begun.manual if begun is not None else False
                self.calls.append(
                    Call(
                        event.call_id,
                        event.tool,
                        shown,
                        event.summary,
                        manual,
                        event.exit_status,
                        event.output_id,
                        event.ok,
                    )
                )
            case ev.VerbCompleted():
                self.verbs.append(event.result)
            case ev.ProbeUpdated():
                self.last_probe = event.result
            case ev.ModeChanged():
                mode = "manual mode" if event.manual else "normal mode"
                self.note(f"{mode}: {event.reason}", at)
            case ev.ModelSwitched():
                self.note(f"model {self.model} -> {event.model}: {event.reason}", at)
                self.model = event.model
            case ev.ApiError():
                self.note(f"API error ({event.kind}): {event.message}", at)
            case ev.AssistantTextDelta():
                self._turn_text.setdefault(event.turn_id, []).append(event.text)
            case ev.AssistantTurnEnded():
                text = "".join(self._turn_text.pop(event.turn_id, []))
                self.usage = add(self.usage, event.usage)
                if text:
                    if event.stop_reason not in _NOT_A_LAST_WORD:
                        self.last_assistant_text = text
                    self.note(f"Claude: {text}", at)
            case ev.Notice() if event.level != "info":
                self.note(event.text, at)
            case ev.InjectionReported():
                self.note(injection.notice_text(event), at)
            case ev.VerbApprovalEnded():
                self.note(f"Claude's {event.verb} past the per-message limit: {event.outcome}", at)
            case _:
                pass

    def highest_call_number(self, prefix: str) -> int:
        """The highest n of the calls named ``<prefix><n>`` (0 if none)."""
        numbers = [c.removeprefix(prefix) for c in self.call_ids if c.startswith(prefix)]
        return max((int(n) for n in numbers if n.isdigit()), default=0)

    def add_output(self, call: Call) -> None:
        """An output no tool call ended with (a forensics bundle's file)."""
        self.calls.append(call)

    def where_things_stand(self) -> str:
        """Where things stand, from the record (when Claude cannot say it)."""
        lines = ["Where things stand (from the session record):"]
        if self.last_probe is not None:
            lines.append(
                f"- last probe: {self.last_probe.reachability.value} ({self.last_probe.message})"
            )
        for v in self.verbs[-3:]:
            lines.append(
                f"- verb {v.verb}: {'ok' if v.ok else 'failed'} ({v.message})"
                + (f", bundle {v.bundle_id}" if v.bundle_id else "")
            )
        for c in [c for c in self.calls if c.tool != "forensics_file"][-5:]:
            lines.append(f"- {c.tool} {c.label}: {c.summary}")
        if len(lines) == 1:
            lines.append("- nothing has been run yet")
        return "\n".join(lines)
