"""The events the breakglass agent emits and the UI renders.

The contract between ``core`` and ``ui``: plain frozen dataclasses, no Textual. The agent calls its
``emit`` callback with these, in order; the UI turns each into widget updates (the Textual app posts
them to itself as messages). Every event is also what the audit log records, minus live output,
which the transcript keeps whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from breakglass_tui.hosts.types import OutputChunk, ProbeResult, VerbResult


@dataclass(frozen=True, kw_only=True)
class Event:
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class SessionStarted(Event):
    session_id: str
    operator: str
    lab: bool
    model: str
    spend_limit_usd: float | None = None  # the incident's spend limit (BREAKGLASS_MAX_COST_USD)


@dataclass(frozen=True, kw_only=True)
class SessionEnded(Event):
    session_id: str


@dataclass(frozen=True, kw_only=True)
class OperatorMessage(Event):
    text: str


@dataclass(frozen=True, kw_only=True)
class AssistantTurnStarted(Event):
    turn_id: str


@dataclass(frozen=True, kw_only=True)
class AssistantTextDelta(Event):
    turn_id: str
    text: str


@dataclass(frozen=True, kw_only=True)
class AssistantThinkingStarted(Event):
    """Claude began a thinking block (its between-tools notes and reasoning summary arrive as
    :class:`AssistantThinkingDelta`; a redacted block has no text)."""

    turn_id: str
    redacted: bool = False


@dataclass(frozen=True, kw_only=True)
class AssistantThinkingDelta(Event):
    turn_id: str
    text: str


@dataclass(frozen=True, kw_only=True)
class AssistantThinkingEnded(Event):
    """A thinking block is complete; ``duration_s`` is how long Claude thought in it."""

    turn_id: str
    duration_s: float


@dataclass(frozen=True, kw_only=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True  # False when a model without a known price was used: say so, not $0


@dataclass(frozen=True, kw_only=True)
class AssistantTurnEnded(Event):
    turn_id: str
    stop_reason: str | None
    usage: Usage
    total_usage: Usage  # the whole incident so far


@dataclass(frozen=True, kw_only=True)
class ToolCallStarted(Event):
    call_id: str
    tool: str  # devvm_shell | pve_verb | probe_devvm | read_output | ...
    input: dict[str, Any]
    mutating: bool  # a mutating forced-command verb: the UI makes it stand out
    manual: bool  # started by the operator's slash command, not by Claude


@dataclass(frozen=True, kw_only=True)
class ToolOutput(Event):
    """A piece of live output of a running tool call (devvm_shell)."""

    call_id: str
    chunk: OutputChunk


@dataclass(frozen=True, kw_only=True)
class ToolCallEnded(Event):
    call_id: str
    tool: str
    ok: bool
    summary: str  # one line: "exit 0, 1.2 KiB, 0.4 s" / "timed out after 120 s" / "cancelled"
    duration_s: float
    exit_status: int | None = None
    cancelled: bool = False
    output_id: str | None = None  # where the whole output is kept (read_output/grep_output)


@dataclass(frozen=True, kw_only=True)
class ProbeUpdated(Event):
    result: ProbeResult


@dataclass(frozen=True, kw_only=True)
class VerbCompleted(Event):
    """A forced-command verb finished (status, forensics or a mutating one)."""

    result: VerbResult


@dataclass(frozen=True, kw_only=True)
class ModeChanged(Event):
    """Claude became unavailable (manual mode) or available again."""

    manual: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class ModelSwitched(Event):
    """The breakglass agent asks another model from now on (the fallback model after a refusal
    or a persistent overload, or the configured model again at the next operator message)."""

    model: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ApiError(Event):
    kind: str  # overloaded | rate_limited | stream_error | stalled | dropped | max_tokens | ...
    message: str
    will_retry: bool


@dataclass(frozen=True, kw_only=True)
class Notice(Event):
    """Anything else worth a line in the chat: step limit reached, help text, report ready."""

    level: str  # info | warning | error
    text: str


@dataclass(frozen=True, kw_only=True)
class ReportReady(Event):
    """An incident report was produced (by /report); the UI offers it as a download."""

    filename: str
    markdown: str


@dataclass(frozen=True, kw_only=True)
class BundleSaved(Event):
    """A forensics bundle was fetched from the PVE host and saved under the state dir; the
    forensics pane lists its files (``directory``/name) and the manifest."""

    bundle_id: str
    directory: str
    files: tuple[str, ...]
    manifest: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class VerbApprovalAsked(Event):
    """Claude wants a mutating verb past the per-message limit (core.approval): the driving tab
    asks its operator (one key runs it); the agent waits at most ``timeout_s``."""

    request_id: str
    call_id: str
    verb: str
    nth: int  # which mutating verb of this operator message it would be
    limit: int  # BREAKGLASS_MAX_MUTATING_VERBS_PER_MESSAGE
    timeout_s: float


@dataclass(frozen=True, kw_only=True)
class VerbApprovalEnded(Event):
    """The question is over: ``approved`` (it runs), ``refused``, ``no answer`` or
    ``cancelled`` (not run)."""

    request_id: str
    verb: str
    outcome: str


@dataclass(frozen=True, kw_only=True)
class InjectionReported(Event):
    """Claude says host text (an output, a host image) tried to instruct it (its
    ``report_injection`` tool, core.injection): shown to the operator as a warning."""

    output_id: str | None  # the output it was in, when Claude named a valid one
    summary: str  # Claude's one line: what the text tried to make it do


# -- the codec: one JSON form of every event, for the incident journal and the transcript --------


def _event_types() -> dict[str, type[Event]]:
    found: dict[str, type[Event]] = {}
    for value in list(globals().values()):
        if isinstance(value, type) and issubclass(value, Event) and value is not Event:
            found[value.__name__] = value
    return found


EVENT_TYPES = _event_types()


def to_json(event: Event, *, documents: bool = True) -> dict[str, Any]:
    """An event as a JSON-ready dict with its type name. ``documents`` False leaves out the
    verb's whole answer (``VerbResult.document``), which the transcript keeps elsewhere."""
    doc = dataclasses.asdict(event)
    doc["type"] = type(event).__name__
    if not documents and isinstance(doc.get("result"), dict):
        doc["result"].pop("document", None)
    loaded: dict[str, Any] = json.loads(json.dumps(doc, default=_json_default))
    return loaded


def _json_default(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _convert(value: Any, hint: Any) -> Any:
    """Turn JSON back into the annotated type (nested dataclasses, enums, tuples)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            with contextlib.suppress(TypeError, ValueError, KeyError):
                return _convert(value, arg)
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_convert(v, inner) for v in value)
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            return _from_fields(hint, value)
        if issubclass(hint, enum.Enum):
            return hint(value)
    return value


def _from_fields(cls: type, doc: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in doc and f.init:
            kwargs[f.name] = _convert(doc[f.name], hints.get(f.name, Any))
    return cls(**kwargs)


def from_json(doc: dict[str, Any]) -> Event | None:
    """The event a journal line describes; None for a type this version does not know."""
    cls = EVENT_TYPES.get(str(doc.get("type")))
    if cls is None:
        return None
    event: Event = _from_fields(cls, {k: v for k, v in doc.items() if k != "type"})
    return event
