"""The breakglass agent: Claude's tool loop over the hosts layer, with budgets, resilience, audit
and manual mode.

The UI calls :meth:`BreakglassAgent.handle` for every operator message or slash command, in an
exclusive worker; cancelling that worker is the operator's cancel. The agent emits plain events
(``core.events``) and never imports Textual. The anthropic SDK is imported lazily, on the first
request, because ``import anthropic`` costs seconds and every browser tab is a new process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import importlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breakglass_tui.config import Settings
from breakglass_tui.core import conversation, forensics, prompt, report
from breakglass_tui.core import events as events_codec
from breakglass_tui.core.audit import JsonLines, audit_log, transcript
from breakglass_tui.core.events import (
    ApiError,
    AssistantTextDelta,
    AssistantThinkingDelta,
    AssistantThinkingEnded,
    AssistantThinkingStarted,
    AssistantTurnEnded,
    AssistantTurnStarted,
    BundleSaved,
    Event,
    ModeChanged,
    ModelSwitched,
    Notice,
    OperatorMessage,
    ProbeUpdated,
    ReportReady,
    SessionEnded,
    SessionStarted,
    ToolCallEnded,
    ToolCallStarted,
    ToolOutput,
    Usage,
    VerbCompleted,
)
from breakglass_tui.core.hostapi import HostSessionLike
from breakglass_tui.core.ids import new_session_id
from breakglass_tui.core.outputs import OutputRecord, OutputStore
from breakglass_tui.core.pricing import add, cost_usd
from breakglass_tui.core.scrub import Scrubber
from breakglass_tui.core.steering import OperatorQueue, steering_blocks
from breakglass_tui.hosts.types import (
    BUNDLE_ID_RE,
    MUTATING_VERBS,
    VERBS,
    CommandOutcome,
    Ending,
    OutputChunk,
    ProbeResult,
    Reachability,
    VerbResult,
)

HELP = """\
Slash commands (they work with or without Claude, through the same hosts layer):
  /probe            probe the devvm's reachability
  /status           PVE verb: the VM's state (read-only)
  /forensics        PVE verb: capture a forensics bundle (read-only)
  /reset            PVE verb: reset the guest (QEMU stays; forensics first)
  /stop             PVE verb: stop the VM (forensics first)
  /start            PVE verb: start the VM (never refused by the budget)
  /cycle            PVE verb: stop and start the QEMU process (forensics first)
  /sh <command>     run a command as root on the devvm
  /cancel           stop what is running (the stream and the running command)
  /report           write the Markdown incident report
  /help             this list
Anything else is a message to Claude."""

_SLASH_VERBS = {f"/{v}": v for v in VERBS}
_MAX_TOKENS_CAP = 128_000
# Ask for the thinking text back: on Sonnet 5.5 and Opus 5.5 the text between tool calls comes in
# thinking blocks, empty under the default display ("omitted"); "summarized" returns it.
THINKING = {"type": "adaptive", "display": "summarized"}
# devvm_shell's timeout_s, as the tool schema says (prompt.tool_definitions).
TIMEOUT_MIN_S = 1
TIMEOUT_MAX_S = 3600
_RESTORED_NOTE = "This conversation was restored in a new session of the breakglass agent"


class _SafeRecord:
    """The audit log or the transcript, whose write failures (disk full) never stop the rescue.

    The first failure is reported once (``on_failure``); later records are dropped while the
    disk stays full, and the next record that can be written is preceded by a count of the lost
    ones."""

    def __init__(
        self, log: JsonLines, name: str, on_failure: Callable[[str, OSError], None]
    ) -> None:
        self._log = log
        self.name = name
        self._on_failure = on_failure
        self.lost = 0
        self.failures = 0

    @property
    def path(self) -> Path:
        return self._log.path

    def write(self, kind: str, **fields: Any) -> None:
        try:
            if self.lost:
                self._log.write("records_lost", count=self.lost)
                self.lost = 0
            self._log.write(kind, **fields)
        except OSError as exc:
            self.lost += 1
            self.failures += 1
            if self.failures == 1:
                self._on_failure(self.name, exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._log.close()


class _TurnFailed(Exception):
    """One attempt at a model turn failed in a way worth telling the operator about."""

    def __init__(self, kind: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable


@dataclass
class _Reply:
    """One assistant message: its content as the SDK accumulated it (kept verbatim for the
    conversation), how it ended, and what the stream showed on the way."""

    turn_id: str
    model: str
    basis: str  # the digest of the request that produced it (conversation.request_messages)
    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    got_message_stop: bool = False
    usage: Usage = field(default_factory=Usage)
    # Per content index: the tool call's raw JSON and whether its block was closed.
    tool_json: dict[int, str] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)
    streamed_text: list[str] = field(default_factory=list)
    streamed_thinking: list[str] = field(default_factory=list)
    thinking_since: float | None = None
    thinking_s: float = 0.0
    applied_edits: list[dict[str, Any]] = field(default_factory=list)
    dropped_by_api: list[dict[str, Any]] = field(default_factory=list)
    block_types: dict[int, str] = field(default_factory=dict)
    refusal_category: str | None = None

    @property
    def text(self) -> str:
        if self.content:
            return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")
        return "".join(self.streamed_text)

    @property
    def thinking(self) -> str:
        return "".join(self.streamed_thinking)

    @property
    def tool_uses(self) -> list[dict[str, Any]]:
        return [b for b in self.content if b.get("type") == "tool_use"]

    def truncated_tool_use(self) -> bool:
        """A tool call cut short (max_tokens inside its input, or a block never closed)."""
        for index, block in enumerate(self.content):
            if block.get("type") != "tool_use":
                continue
            if index not in self.closed:
                return True
            raw = self.tool_json.get(index, "")
            try:
                value = json.loads(raw) if raw.strip() else {}
            except ValueError:
                return True
            if not isinstance(value, dict):
                return True
        last_is_tool = bool(self.content) and self.content[-1].get("type") == "tool_use"
        return self.stop_reason == "max_tokens" and last_is_tool

    def unsigned_thinking(self) -> bool:
        """A thinking block without its signature: never to be kept or sent back."""
        return any(
            (b.get("type") == "thinking" and not b.get("signature"))
            or (b.get("type") == "redacted_thinking" and not b.get("data"))
            for b in self.content
        )

    def worth_keeping(self) -> bool:
        """Text or a tool call: a turn of only thinking adds nothing to the conversation."""
        return any(b.get("type") in ("text", "tool_use") for b in self.content)


@dataclass
class _ToolRun:
    """What one tool call produced: the tool_result content and the facts for the record."""

    content: str | list[dict[str, Any]]  # text, or text and image blocks (a screendump)
    is_error: bool = False  # for Claude: the tool itself failed (not a command's exit status)
    summary: str = ""
    record: OutputRecord | None = None
    exit_status: int | None = None
    ok: bool | None = None  # for the operator: exit 0 / verb ok; None = not is_error


class BreakglassAgent:
    """Claude's tool loop for the warm case, plus the operator's manual slash commands.

    Extra knobs beyond :class:`Settings` are keyword arguments with defaults (see the report of
    issue 4 for the names the lead may move into config).
    """

    def __init__(
        self,
        settings: Settings,
        hosts: HostSessionLike,
        emit: Callable[[Event], None],
        *,
        operator: str,
        lab: bool,
        session_id: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        stream_read_timeout_s: float = 30.0,
        api_connect_timeout_s: float = 5.0,
        sdk_max_retries: int = 2,
        turn_retries: int = 1,
        retry_delay_s: float = 1.0,
        max_tokens: int | None = None,
        output_budget_bytes: int = 8192,
        output_budget_tokens: int = 2048,
        context_budget_bytes: int = 120_000,
        wait_probe_interval_s: float = 2.0,
        conversation: list[dict[str, Any]] | None = None,
        save_conversation: Callable[[list[dict[str, Any]]], None] | None = None,
        keep_recent_results: int = 8,
        context_trigger_tokens: int = 40_000,
        context_clear_at_least_tokens: int = 8_000,
        fetch_bundles: bool = True,
        bundle_timeout_s: float = 30.0,
        image_budget_bytes: int = 1_500_000,
        history: list[Event] | None = None,
        incident_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.hosts = hosts
        self._emit_cb = emit
        self.operator = operator
        self.lab = lab
        self.session_id = session_id or new_session_id()
        self._api_key_arg = api_key
        self._base_url = base_url
        self.stream_read_timeout_s = stream_read_timeout_s
        self.api_connect_timeout_s = api_connect_timeout_s
        self.sdk_max_retries = sdk_max_retries
        self.turn_retries = turn_retries
        self.retry_delay_s = retry_delay_s
        self.max_tokens = max_tokens or settings.max_tokens
        self.fetch_bundles = fetch_bundles
        self.context_trigger_tokens = context_trigger_tokens
        self.context_clear_at_least_tokens = context_clear_at_least_tokens
        self.image_budget_bytes = image_budget_bytes
        self.context_budget_bytes = context_budget_bytes
        self.wait_probe_interval_s = wait_probe_interval_s
        self.keep_recent_results = keep_recent_results
        self.bundle_timeout_s = bundle_timeout_s

        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.scrubber = Scrubber([self._api_key()])
        who = {"session_id": self.session_id, "operator": operator}
        self.audit = _SafeRecord(
            audit_log(self.state_dir, self.scrubber, **who), "audit log", self._record_failed
        )
        self.transcript = _SafeRecord(
            transcript(self.state_dir, self.scrubber, **who), "transcript", self._record_failed
        )
        self.incident_id = incident_id
        # Output ids name the session (o<n>-<tag>): a restored conversation's ids never alias
        # this session's, and the earlier sessions' outputs are read from their directories.
        self.outputs = OutputStore(
            self.state_dir / "transcripts" / self.session_id,
            self.scrubber,
            budget_bytes=output_budget_bytes,
            budget_tokens=output_budget_tokens,
            shared_root=self.state_dir / "transcripts",
        )
        self.messages: list[dict[str, Any]] = [dict(m) for m in conversation or []]
        self._save_conversation = save_conversation
        self.manual = False
        # The incident's usage so far (earlier sessions' from ``history`` too: the header and
        # the report show it); the audit log records this session's own (session_usage), so
        # summing sessions does not count a turn twice.
        self.total_usage = Usage()
        self.session_usage = Usage()
        self.cost_known = True
        self._spend_warned = False
        # The model asked now: the configured one, or the fallback for the rest of an operator
        # message after a refusal or a persistent overload.
        self.model = settings.model
        # What the model saw last (input + cache tokens) and the requests' sizes: the benchmark
        # and the audit log read them.
        self.last_seen_tokens = 0
        self._client: Any = None
        self._sdk_modules: tuple[Any, Any] | None = None
        self._client_key: str | None = None
        self._pending_manual: list[str] = []
        # The operator's messages queued while this agent works (the UI shares its own queue).
        self.operator_queue: OperatorQueue | None = None
        # Manual call ids name the session: tabs sharing an incident journal never repeat one.
        self._manual_prefix = f"manual-{self.session_id}-"
        self._manual_count = 0
        self._closed = False
        # For /report: what happened, in order.
        self.timeline: list[tuple[float, str]] = []
        self.calls: list[dict[str, Any]] = []
        self.verbs: list[VerbResult] = []
        self.last_probe: ProbeResult | None = None
        self.last_assistant_text = ""
        # The sessions of the incident (session id, operator), this one last.
        self.sessions: list[tuple[str, str]] = [(self.session_id, operator)]
        self._live_record: OutputRecord | None = None
        # The incident's earlier events (the journal, replayed): /report covers all of it.
        if history:
            self._seed_history(history)

        self._emit(
            SessionStarted(
                session_id=self.session_id,
                operator=operator,
                lab=lab,
                model=settings.model,
                spend_limit_usd=settings.max_cost_usd,
            )
        )
        self.audit.write(
            "session_start",
            lab=lab,
            model=settings.model,
            effort=settings.effort,
            fallback_model=settings.fallback_model,
            max_cost_usd=settings.max_cost_usd,
        )
        self._note(f"session started by {operator}{' (lab)' if lab else ''}")
        if self.messages:
            self._repair_conversation()
        if not self._api_key():
            self._set_mode(
                True,
                "no ANTHROPIC_API_KEY is set: manual mode. The slash commands work (/help);"
                " set the key and send a message to bring Claude in.",
            )

    # -- public API ---------------------------------------------------------------------------

    async def handle(self, text: str) -> None:
        """Handle one operator message or slash command. Cancelling the task running this is the
        operator's cancel: the stream and the running command stop at once, the conversation
        stays valid, and CancelledError is re-raised."""
        text = text.strip()
        if not text:
            return
        self._emit(OperatorMessage(text=text))
        slash = text.startswith("/")
        self.audit.write("operator_message", text=text, slash=slash)
        self._note(f"operator: {text}")
        if slash:
            await self._slash(text)
        else:
            # What the model is shown (and the saved conversation) is scrubbed like every record.
            await self._converse(self.scrubber.text(text))

    async def close(self) -> None:
        """End the session: close the API client and the records. The
        HostSession belongs to the caller and is not closed here."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        self._emit(SessionEnded(session_id=self.session_id))
        self.audit.write(
            "session_end",
            total_usage=_usage_dict(self.session_usage),
            incident_usage=_usage_dict(self.total_usage),
        )
        self.audit.close()
        self.transcript.close()

    # -- the conversation ---------------------------------------------------------------------

    async def _converse(self, text: str) -> None:
        # An operator message is the one boundary where earlier turns may be edited: nothing in
        # the conversation is in flight. Keep the context within its budget here.
        self._compact_at_boundary()
        # Each operator message asks the configured model first (a fallback lasts one message).
        if self.model != self.settings.model:
            self._switch_model(self.settings.model, "a new operator message: the configured model")
        # Kept in the conversation even when Claude cannot be asked now: it is context later.
        blocks = self._manual_context()
        blocks.append({"type": "text", "text": text})
        self._append_user(blocks)
        if not self._api_key():
            self._set_mode(
                True,
                "no ANTHROPIC_API_KEY is set, so Claude cannot be asked: manual mode. Use the"
                " slash commands (/help), or set the key.",
            )
            return
        steps = 0
        max_steps = self.settings.max_steps
        while True:
            reply = await self._turn(tools=True)
            if reply is None:
                return
            self._append_assistant(reply)
            tool_uses = reply.tool_uses
            if not tool_uses:
                if reply.stop_reason == "max_tokens":
                    self._notice("warning", "Claude's reply was cut at the max_tokens limit.")
                return
            results: list[dict[str, Any]] = []
            limit_hit = False
            try:
                for block in tool_uses:
                    if steps >= max_steps:
                        limit_hit = True
                        results.append(
                            _tool_result(
                                block["id"],
                                f"Not run: the step limit of {max_steps} tool calls for this"
                                " operator message was reached.",
                                is_error=True,
                            )
                        )
                        continue
                    steps += 1
                    run = await self._run_tool(block["id"], block["name"], block["input"])
                    results.append(_tool_result(block["id"], run.content, is_error=run.is_error))
            except BaseException as exc:
                # Cancel, or anything else that escaped a tool: every tool_use still gets its
                # tool_result, so the conversation stays valid and the next request does not 400.
                cancelled = isinstance(exc, asyncio.CancelledError)
                reason = (
                    "Cancelled by the operator."
                    if cancelled
                    else f"Not completed: the breakglass agent failed ({exc.__class__.__name__}:"
                    f" {exc})."
                )
                answered = {r["tool_use_id"] for r in results}
                for block in tool_uses:
                    if block["id"] not in answered:
                        results.append(_tool_result(block["id"], reason, is_error=True))
                self._append_user(results)
                with contextlib.suppress(Exception):
                    if cancelled:
                        self.audit.write(
                            "cancelled", during="tool", calls=[b["id"] for b in tool_uses]
                        )
                        self._note("cancelled by the operator during a tool call")
                        self._notice("warning", "Cancelled: the running command was stopped.")
                    else:
                        self.audit.write(
                            "tool_loop_error",
                            error=f"{exc.__class__.__name__}: {exc}",
                            calls=[b["id"] for b in tool_uses],
                        )
                        self._note(f"the tool loop failed: {exc.__class__.__name__}: {exc}")
                raise
            # The tool loop's boundary: the next request carries these results. Nothing sent
            # before is edited inside the loop (the thinking blocks are bound to it); the API's
            # context editing clears old results on its side when the context grows.
            if not (limit_hit or steps >= max_steps):
                results += self._steering()  # the operator's queued words, after the results
            self._append_user(results)
            if limit_hit or steps >= max_steps:
                await self._step_limit_summary(max_steps)
                return

    def _steering(self) -> list[dict[str, Any]]:
        """Messages the operator queued while Claude worked (core.steering), as text blocks for
        the next request; each is emitted and audited as a new operator message."""
        return steering_blocks(self.operator_queue, self._deliver_queued)

    def _deliver_queued(self, text: str) -> str:
        self._emit(OperatorMessage(text=text))
        self.audit.write("operator_message", text=text, slash=False, queued=True)
        self._note(f"operator (while Claude worked): {text}")
        return self.scrubber.text(text)

    async def _step_limit_summary(self, max_steps: int) -> None:
        """One last request without tool use, so the operator gets where things stand."""
        self._notice(
            "warning",
            f"Step limit reached ({max_steps} tool calls for this message): asking Claude for a"
            " summary of where things stand. Send another message to continue.",
        )
        self.audit.write("step_limit", max_steps=max_steps)
        self._append_user(
            [
                {
                    "type": "text",
                    "text": (
                        f"The step limit of {max_steps} tool calls for this operator message is"
                        " reached. Do not call tools. Summarise where things stand: what is"
                        " wrong, what was done, the devvm's current state, and the next step."
                    ),
                }
            ]
        )
        reply = await self._turn(tools=False)
        if reply is not None and not reply.tool_uses:
            self._append_assistant(reply)
            return
        if reply is not None:
            # The model called a tool anyway: answer it (unrun) so the conversation stays valid.
            self._append_assistant(reply)
            self._append_user(
                [
                    _tool_result(b["id"], "Not run: the step limit was reached.", is_error=True)
                    for b in reply.tool_uses
                ]
            )
        self._notice("info", self._local_summary())

    def _local_summary(self) -> str:
        """Where things stand, from our own records (when Claude cannot say it)."""
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
        for c in self.calls[-5:]:
            lines.append(f"- {c['tool']} {c['label']}: {c['summary']}")
        if len(lines) == 1:
            lines.append("- nothing has been run yet")
        return "\n".join(lines)

    def _append_assistant(self, reply: _Reply) -> None:
        """Keep Claude's message as the API returned it (thinking and all), with the model and
        the basis its thinking is bound to. A turn of only thinking is not kept: it adds
        nothing, and an empty message is refused."""
        if reply.worth_keeping():
            self.messages.append(
                conversation.assistant_message(reply.content, model=reply.model, basis=reply.basis)
            )
            self._saved()

    def _saved(self) -> None:
        if self._save_conversation is not None:
            try:
                self._save_conversation(self.messages)
            except Exception as exc:  # saving is a convenience; the rescue goes on
                self.audit.write("save_error", error=f"{exc.__class__.__name__}: {exc}")

    def _repair_conversation(self) -> None:
        """A restored conversation (resume, take-over) was another session's: answer the tool
        calls whose process died mid-run, so the next request is valid; and when it names
        outputs by ids from before ids named their session (``o3``), tell Claude they are not
        readable here (this session's ``o3-<tag>`` is another output). Ids with a session tag
        stay readable: the OutputStore finds them in the earlier session's directory."""
        last = self.messages[-1]
        blocks: list[dict[str, Any]] = []
        if last.get("role") == "assistant":
            calls = [b for b in last.get("content", []) if b.get("type") == "tool_use"]
            blocks += [
                _tool_result(
                    b["id"], "Interrupted: the session ended while this ran.", is_error=True
                )
                for b in calls
            ]
        told = " ".join(  # an earlier restore's note: not told twice
            b.get("text", "")
            for m in self.messages
            if m.get("role") == "user" and isinstance(m.get("content"), list)
            for b in m["content"]
            if isinstance(b, dict) and str(b.get("text", "")).startswith(_RESTORED_NOTE)
        )
        legacy = sorted(
            {
                i
                for i in _mentioned_output_ids(self.messages)
                if OutputStore.is_legacy_id(i) and not re.search(rf"\b{i}\b", told)
            },
            key=lambda i: int(i[1:]),
        )
        if legacy:
            shown = ", ".join(legacy)
            blocks.append(
                {
                    "type": "text",
                    "text": (
                        f"{_RESTORED_NOTE}. The outputs named by the earlier ids {shown}"
                        " belong to an earlier tab's session and are not readable here; run the"
                        " command again if you need them. Output ids of this session look like"
                        f" {self.outputs.id_for(1)!r}."
                    ),
                }
            )
            self.audit.write("restored_legacy_output_ids", output_ids=legacy)
        if blocks:
            self._append_user(blocks)

    def _append_user(self, blocks: list[dict[str, Any]]) -> None:
        """Add user content; merges into a trailing user message (tool results stay first)."""
        if not blocks:
            return
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages[-1]["content"].extend(blocks)
        else:
            self.messages.append({"role": "user", "content": list(blocks)})
        self._saved()

    def _compact_at_boundary(self) -> None:
        """Keep a long incident's context bounded, at an operator-message boundary: when the
        tool results pass the context budget, the completed turns' thinking goes first (it is
        bound to what precedes it), then the older results are cut to their header and a short
        tail, in one batch (the cached prefix is invalidated rarely); the whole outputs stay
        readable by output_id."""
        total = conversation.tool_result_bytes(self.messages)
        if total <= self.context_budget_bytes:
            return
        dropped = conversation.drop_thinking(self.messages)
        shortened, _ = conversation.shorten_old_results(
            self.messages,
            budget_bytes=self.context_budget_bytes,
            keep_recent=self.keep_recent_results,
        )
        if shortened or dropped:
            self.audit.write(
                "context_compacted",
                results=shortened,
                thinking_blocks_dropped=dropped,
                bytes_before=total,
            )
            self._saved()

    def _manual_context(self) -> list[dict[str, Any]]:
        if not self._pending_manual:
            return []
        text = (
            "While you were not involved, the operator ran these commands manually (outputs are"
            " kept: use read_output/grep_output with the output_id):\n"
            + "\n".join(self._pending_manual)
        )
        self._pending_manual.clear()
        return [{"type": "text", "text": text}]

    # -- one model turn: retries, the fallback model, the spend limit ----------------------------

    async def _turn(
        self, *, tools: bool, extra: list[dict[str, Any]] | None = None
    ) -> _Reply | None:
        """One assistant message, retried per the resilience rules; None when it could not be had
        (the operator has been told, and manual mode entered when the API or the spend limit is
        the problem). ``tools`` False asks with ``tool_choice: none``; ``extra`` is user content
        sent after the conversation for this request only (the /report turn)."""
        if self._spend_exhausted():
            return None
        attempts = 1 + max(0, self.turn_retries)
        max_tokens = self.max_tokens
        failure: _TurnFailed | None = None
        binding_repaired = False
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                reply = await self._attempt(tools=tools, max_tokens=max_tokens, extra=extra)
            except _TurnFailed as exc:
                failure = exc
            else:
                failure = self._check_reply(reply)
                if failure is None:
                    if self.manual:
                        self._set_mode(False, "Claude answered again: back to normal mode.")
                    return reply
                if failure.kind == "max_tokens":
                    max_tokens = min(max_tokens * 2, _MAX_TOKENS_CAP)
            will_retry = failure.retryable and attempt < attempts
            if not binding_repaired and _thinking_binding_error(failure):
                # The API would not take an earlier thinking block back (bound to another
                # conversation): leave the completed turns' thinking out, and ask once more.
                binding_repaired = will_retry = True
                attempts += 1
                dropped = conversation.drop_thinking(self.messages, before=self._loop_start())
                self.audit.write("thinking_dropped", blocks=dropped, reason=failure.message)
                self._saved()
            self._emit(ApiError(kind=failure.kind, message=failure.message, will_retry=will_retry))
            self.audit.write(
                "api_error",
                error_kind=failure.kind,
                message=failure.message,
                will_retry=will_retry,
                model=self.model,
            )
            self._note(f"API error ({failure.kind}): {failure.message}")
            if not will_retry:
                break
            await asyncio.sleep(self.retry_delay_s)
        assert failure is not None
        fallback = self.settings.fallback_model
        if fallback and fallback != self.model and failure.kind in ("refusal", "overloaded"):
            why = (
                f"{self.model} declined (refusal)"
                if failure.kind == "refusal"
                else f"{self.model} stayed overloaded"
            )
            self._switch_model(fallback, f"{why}: asking the fallback model for this message")
            return await self._turn(tools=tools, extra=extra)
        if failure.kind == "refusal":
            self._notice(
                "error",
                f"Claude declined to continue ({failure.message}). The refused turn was not kept;"
                " rephrase the request, set BREAKGLASS_FALLBACK_MODEL to have another model"
                " asked, or act with the slash commands (/help).",
            )
            return None
        self._set_mode(
            True,
            f"Claude is unavailable ({failure.kind}: {failure.message}). Manual mode: the slash"
            " commands work (/help); your next message tries Claude again.",
        )
        return None

    def _switch_model(self, model: str, reason: str) -> None:
        """Ask ``model`` from now on. The earlier turns' thinking it cannot read is left out of
        its requests (conversation.request_messages: a thinking block is bound to its model)."""
        previous, self.model = self.model, model
        self._emit(ModelSwitched(model=model, reason=reason))
        self.audit.write("model_switch", model=model, previous=previous, reason=reason)
        self._note(f"model {previous} -> {model}: {reason}")

    def _loop_start(self) -> int:
        """The index of the current tool loop's first assistant message: after the last user
        message that holds more than tool results."""
        start = 0
        for i, message in enumerate(self.messages):
            content = message.get("content")
            if (
                message.get("role") == "user"
                and isinstance(content, list)
                and any(b.get("type") != "tool_result" for b in content)
            ):
                start = i + 1
        return start

    def _spend_exhausted(self) -> bool:
        """The incident's spend limit is reached: Claude is not asked, manual mode goes on."""
        limit = self.settings.max_cost_usd
        spent = self.total_usage
        if not spent.cost_known or spent.cost_usd < limit:
            return False
        self.audit.write("spend_limit", cost_usd=round(spent.cost_usd, 6), limit_usd=limit)
        self._set_mode(
            True,
            f"The incident's spend limit is reached (${spent.cost_usd:.2f} of ${limit:.2f},"
            " BREAKGLASS_MAX_COST_USD): Claude is not asked any more. Manual mode: the slash"
            " commands work (/help); to go on with Claude, raise BREAKGLASS_MAX_COST_USD and"
            " reopen the console (the incident resumes).",
        )
        return True

    def _check_spend(self) -> None:
        """Warn once when the incident's cost passes 80 % of its limit."""
        limit = self.settings.max_cost_usd
        spent = self.total_usage
        if self._spend_warned or not spent.cost_known or spent.cost_usd < 0.8 * limit:
            return
        self._spend_warned = True
        self.audit.write("spend_warning", cost_usd=round(spent.cost_usd, 6), limit_usd=limit)
        self._notice(
            "warning",
            f"Claude has used {spent.cost_usd / limit:.0%} of the incident's spend limit"
            f" (${spent.cost_usd:.2f} of ${limit:.2f}, BREAKGLASS_MAX_COST_USD). At the limit"
            " Claude stops and manual mode goes on.",
        )

    def _check_reply(self, reply: _Reply) -> _TurnFailed | None:
        if not reply.got_message_stop or reply.stop_reason is None:
            return _TurnFailed(
                "dropped",
                "the API stream ended before message_stop (a partial message); it was discarded",
            )
        if reply.unsigned_thinking():
            return _TurnFailed(
                "dropped",
                "a thinking block came without its signature; the message was discarded",
            )
        if reply.truncated_tool_use():
            return _TurnFailed(
                "max_tokens",
                "the reply hit max_tokens in the middle of a tool call's input; the truncated"
                " call was not executed",
            )
        if reply.stop_reason == "refusal":
            category = f", category {reply.refusal_category}" if reply.refusal_category else ""
            # The same request would be refused again: no retry on this model.
            return _TurnFailed(
                "refusal", f"stop_reason refusal{category} from {reply.model}", retryable=False
            )
        return None

    def _request(
        self, *, tools: bool, max_tokens: int, extra: list[dict[str, Any]] | None
    ) -> tuple[dict[str, Any], str]:
        """The request for the next turn, and the basis its reply's thinking is bound to."""
        model = self.model
        system = prompt.system_prompt(self.settings.vmid, self.settings.cold_path_pointer)
        tool_defs = prompt.tool_definitions()
        stored = list(self.messages)
        if extra:
            if stored and stored[-1]["role"] == "user":
                last = stored[-1]
                stored[-1] = {**last, "content": [*last["content"], *extra]}
            else:
                stored.append({"role": "user", "content": list(extra)})
        messages, basis = conversation.request_messages(
            stored, model=model, system=system, tools=tool_defs
        )
        if messages and messages[-1]["content"]:
            # A cache breakpoint on the last block: the growing history is cached too.
            messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        params: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "system": system,
            "tools": tool_defs,
            "messages": messages,
            "thinking": dict(THINKING),
            "betas": [conversation.CONTEXT_MANAGEMENT_BETA],
            "context_management": conversation.context_management(
                trigger_tokens=self.context_trigger_tokens,
                keep=self.keep_recent_results,
                clear_at_least=self.context_clear_at_least_tokens,
            ),
        }
        if self.settings.effort:
            params["output_config"] = {"effort": self.settings.effort}
        if not tools:
            # The tool list stays (the history holds tool_use blocks, the prefix and its cache
            # stay intact); tool_choice none keeps Claude from calling them. Forcing a tool is
            # a 400 on the current models.
            params["tool_choice"] = {"type": "none"}
        return params, basis

    async def _attempt(
        self, *, tools: bool, max_tokens: int, extra: list[dict[str, Any]] | None = None
    ) -> _Reply:
        """One streamed request under our own deadline; the SDK's small retry budget applies
        before the stream starts."""
        anthropic, httpx2 = await self._sdk()
        client = self._get_client(anthropic, httpx2)
        params, basis = self._request(tools=tools, max_tokens=max_tokens, extra=extra)
        reply = _Reply(turn_id=uuid.uuid4().hex[:12], model=params["model"], basis=basis)
        self._emit(AssistantTurnStarted(turn_id=reply.turn_id))
        deadline_s = self.settings.turn_deadline_s(max_tokens)
        outcome = "error"
        try:
            async with asyncio.timeout(deadline_s):
                async with client.beta.messages.stream(**params) as stream:
                    async for event in stream:
                        self._on_stream_event(reply, event)
                    # The message as the SDK accumulated it, every block as the API sent it:
                    # what goes back to the API (a rebuilt turn is a 400).
                    snapshot = stream.current_message_snapshot
                    reply.content = [
                        b.model_dump(mode="json", exclude_none=True) for b in snapshot.content
                    ]
            outcome = reply.stop_reason or "incomplete"
        except asyncio.CancelledError:
            outcome = "cancelled"
            self.audit.write("cancelled", during="stream", turn_id=reply.turn_id)
            self._note("cancelled by the operator while Claude was answering")
            raise
        except TimeoutError:
            raise _TurnFailed(
                "deadline",
                f"no complete answer within {deadline_s:g} s (BREAKGLASS_API_DEADLINE_S plus"
                f" {max_tokens} max_tokens at 80 tokens/s)",
            ) from None
        except anthropic.APIStatusError as exc:
            raise _classify_status(exc) from None
        except (anthropic.APITimeoutError, httpx2.TimeoutException):
            raise _TurnFailed(
                "stalled",
                f"the API sent nothing for {self.stream_read_timeout_s:g} s (stream read timeout)",
            ) from None
        except (anthropic.APIConnectionError, httpx2.TransportError) as exc:
            raise _TurnFailed(
                "dropped" if reply.streamed_text or reply.usage.input_tokens else "connection",
                f"the connection to the API failed: {exc.__class__.__name__}: {exc}",
            ) from None
        except anthropic.AnthropicError as exc:
            raise _TurnFailed("api_error", f"{exc.__class__.__name__}: {exc}") from None
        finally:
            self._finish_turn(reply, outcome)
        return reply

    def _on_stream_event(self, reply: _Reply, event: Any) -> None:
        """Show the stream as it comes (text, thinking, how long Claude thinks) and note what
        the accumulated message cannot say (whether each tool call's input was whole)."""
        kind = event.type
        if kind == "message_start":
            u = event.message.usage
            reply.usage = Usage(
                input_tokens=u.input_tokens or 0,
                output_tokens=u.output_tokens or 0,
                cache_creation_input_tokens=u.cache_creation_input_tokens or 0,
                cache_read_input_tokens=u.cache_read_input_tokens or 0,
            )
        elif kind == "content_block_start":
            cb = event.content_block
            reply.block_types[event.index] = cb.type
            if cb.type == "text" and cb.text:
                reply.streamed_text.append(cb.text)
                self._emit(AssistantTextDelta(turn_id=reply.turn_id, text=cb.text))
            elif cb.type == "tool_use":
                reply.tool_json[event.index] = ""
            elif cb.type in conversation.THINKING_TYPES:
                reply.thinking_since = time.monotonic()
                self._emit(
                    AssistantThinkingStarted(
                        turn_id=reply.turn_id, redacted=cb.type == "redacted_thinking"
                    )
                )
        elif kind == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta":
                reply.streamed_text.append(delta.text)
                self._emit(AssistantTextDelta(turn_id=reply.turn_id, text=delta.text))
            elif delta.type == "input_json_delta":
                reply.tool_json[event.index] = (
                    reply.tool_json.get(event.index, "") + delta.partial_json
                )
            elif delta.type == "thinking_delta" and delta.thinking:
                reply.streamed_thinking.append(delta.thinking)
                self._emit(AssistantThinkingDelta(turn_id=reply.turn_id, text=delta.thinking))
        elif kind == "content_block_stop":
            reply.closed.add(event.index)
            if reply.block_types.get(event.index) in conversation.THINKING_TYPES:
                took = time.monotonic() - (reply.thinking_since or time.monotonic())
                reply.thinking_since = None
                reply.thinking_s += took
                self._emit(AssistantThinkingEnded(turn_id=reply.turn_id, duration_s=took))
        elif kind == "message_delta":
            reply.stop_reason = event.delta.stop_reason
            details = getattr(event.delta, "stop_details", None)
            if details is not None:
                reply.refusal_category = getattr(details, "category", None)
            u = event.usage
            reply.usage = Usage(
                input_tokens=(u.input_tokens if u.input_tokens is not None else 0)
                or reply.usage.input_tokens,
                output_tokens=u.output_tokens or 0,
                cache_creation_input_tokens=(u.cache_creation_input_tokens or 0)
                or reply.usage.cache_creation_input_tokens,
                cache_read_input_tokens=(u.cache_read_input_tokens or 0)
                or reply.usage.cache_read_input_tokens,
            )
            edits = getattr(event, "context_management", None)
            if edits is not None:
                reply.applied_edits = [e.model_dump(mode="json") for e in edits.applied_edits]
            dropped = getattr(event, "input_transformations", None)
            if dropped:
                reply.dropped_by_api = [d.model_dump(mode="json") for d in dropped]
        elif kind == "message_stop":
            reply.got_message_stop = True

    def _finish_turn(self, reply: _Reply, outcome: str) -> None:
        cost = cost_usd(reply.model, reply.usage)
        if cost is None and self.cost_known:
            self.cost_known = False
            self._notice(
                "info",
                f"No price is known for model {reply.model}: usage is shown in tokens only (cost"
                " unknown), and the spend limit (BREAKGLASS_MAX_COST_USD) cannot be enforced.",
            )
        usage = Usage(
            input_tokens=reply.usage.input_tokens,
            output_tokens=reply.usage.output_tokens,
            cache_creation_input_tokens=reply.usage.cache_creation_input_tokens,
            cache_read_input_tokens=reply.usage.cache_read_input_tokens,
            cost_usd=cost or 0.0,
            cost_known=cost is not None,
        )
        self.total_usage = add(self.total_usage, usage)
        self.session_usage = add(self.session_usage, usage)
        if reply.usage.input_tokens or reply.usage.cache_read_input_tokens:
            self.last_seen_tokens = (
                usage.input_tokens
                + usage.cache_read_input_tokens
                + usage.cache_creation_input_tokens
            )
        stop = reply.stop_reason if outcome == reply.stop_reason else outcome
        self._emit(
            AssistantTurnEnded(
                turn_id=reply.turn_id, stop_reason=stop, usage=usage, total_usage=self.total_usage
            )
        )
        text = reply.text
        if text:
            if outcome == reply.stop_reason and stop != "refusal":
                self.last_assistant_text = text
            self._note(f"Claude: {text}")
        record: dict[str, Any] = {}
        if reply.streamed_thinking or reply.thinking_s:
            record["thinking"] = reply.thinking
            record["thinking_s"] = round(reply.thinking_s, 3)
        if reply.applied_edits:
            record["context_edits"] = reply.applied_edits
        if reply.dropped_by_api:
            record["thinking_dropped_by_api"] = reply.dropped_by_api
        self.audit.write(
            "model_turn",
            turn_id=reply.turn_id,
            model=reply.model,
            stop_reason=stop,
            text=text,
            tool_calls=[{"id": b["id"], "name": b["name"]} for b in reply.tool_uses],
            usage=_usage_dict(usage),
            total_usage=_usage_dict(self.session_usage),
            **record,
        )
        self._check_spend()

    async def _sdk(self) -> tuple[Any, Any]:
        # Lazy import (seconds), off the event loop so the UI keeps painting meanwhile.
        if self._sdk_modules is None:
            anthropic = await asyncio.to_thread(importlib.import_module, "anthropic")
            self._sdk_modules = (anthropic, importlib.import_module("httpx2"))
        return self._sdk_modules

    def _get_client(self, anthropic: Any, httpx2: Any) -> Any:
        key = self._api_key()
        if self._client is None or key != self._client_key:
            self.scrubber.add(key)
            self._client = anthropic.AsyncAnthropic(
                api_key=key,
                base_url=self._base_url or os.environ.get("ANTHROPIC_BASE_URL") or None,
                max_retries=self.sdk_max_retries,
                timeout=httpx2.Timeout(
                    connect=self.api_connect_timeout_s,
                    read=self.stream_read_timeout_s,
                    write=30.0,
                    pool=10.0,
                ),
            )
            self._client_key = key
        return self._client

    def _api_key(self) -> str | None:
        return self._api_key_arg or os.environ.get("ANTHROPIC_API_KEY") or None

    # -- tools ---------------------------------------------------------------------------------

    async def _run_tool(
        self, call_id: str, name: str, tool_input: dict[str, Any], *, manual: bool = False
    ) -> _ToolRun:
        """Run one tool call (Claude's or the operator's), with its events and audit records."""
        mutating = name == "pve_verb" and tool_input.get("verb") in MUTATING_VERBS
        self._emit(
            ToolCallStarted(
                call_id=call_id, tool=name, input=tool_input, mutating=mutating, manual=manual
            )
        )
        self.audit.write(
            "tool_call",
            call_id=call_id,
            tool=name,
            input=tool_input,
            manual=manual,
            mutating=mutating,
        )
        label = _label(name, tool_input)
        self._live_record = None
        self._note(f"{'operator' if manual else 'Claude'} ran {name} {label}")
        started = time.monotonic()
        try:
            if name == "devvm_shell":
                run = await self._devvm_shell(call_id, tool_input)
            elif name == "pve_verb":
                run = await self._pve_verb(tool_input)
            elif name == "probe_devvm":
                run = await self._probe()
            elif name == "wait_for_devvm":
                run = await self._wait_for_devvm(tool_input)
            elif name == "read_output":
                run = self._read_output(tool_input)
            elif name == "grep_output":
                run = await self._grep_output(tool_input)
            elif name == "list_outputs":
                run = self._list_outputs()
            else:
                run = _ToolRun(f"Unknown tool {name!r}.", is_error=True, summary="unknown tool")
        except asyncio.CancelledError:
            elapsed = time.monotonic() - started
            self._emit(
                ToolCallEnded(
                    call_id=call_id,
                    tool=name,
                    ok=False,
                    summary="cancelled",
                    duration_s=elapsed,
                    cancelled=True,
                )
            )
            self.audit.write(
                "tool_result",
                call_id=call_id,
                tool=name,
                cancelled=True,
                ok=False,
                duration_s=round(elapsed, 3),
                **self._partial_output_facts(),
            )
            self.calls.append(
                {
                    "call_id": call_id,
                    "tool": name,
                    "label": label,
                    "summary": "cancelled",
                    "manual": manual,
                    "exit_status": None,
                    "output_id": None,
                    "ok": False,
                }
            )
            raise
        except Exception as exc:  # a tool that fails must not end the incident
            run = _ToolRun(
                f"The tool failed: {exc.__class__.__name__}: {exc}",
                is_error=True,
                summary=f"failed: {exc.__class__.__name__}: {exc}",
            )
        elapsed = time.monotonic() - started
        rec = run.record
        exit_status = run.exit_status
        ok = run.ok if run.ok is not None else not run.is_error
        self._emit(
            ToolCallEnded(
                call_id=call_id,
                tool=name,
                ok=ok,
                summary=run.summary,
                duration_s=elapsed,
                exit_status=exit_status,
                output_id=rec.output_id if rec is not None else None,
            )
        )
        facts: dict[str, Any] = {}
        if rec is not None:
            facts = {
                "output_id": rec.output_id,
                "bytes": rec.raw_bytes,
                "stdout_bytes": rec.stdout_bytes,
                "stderr_bytes": rec.stderr_bytes,
                "sha256": rec.sha256,
            }
        self.audit.write(
            "tool_result",
            call_id=call_id,
            tool=name,
            ok=ok,
            exit_status=exit_status,
            summary=run.summary,
            duration_s=round(elapsed, 3),
            **facts,
        )
        self.calls.append(
            {
                "call_id": call_id,
                "tool": name,
                "label": label,
                "summary": run.summary,
                "manual": manual,
                "exit_status": exit_status,
                "output_id": rec.output_id if rec else None,
                "sha256": rec.sha256 if rec else None,
                "ok": ok,
            }
        )
        self._note(f"{name} {label}: {run.summary}")
        return run

    def _partial_output_facts(self) -> dict[str, Any]:
        rec = self._live_record
        if rec is None:
            return {}
        return {"output_id": rec.output_id, "bytes": rec.raw_bytes, "sha256": rec.sha256}

    async def _devvm_shell(self, call_id: str, tool_input: dict[str, Any]) -> _ToolRun:
        command = tool_input.get("command")
        if not isinstance(command, str) or not command.strip():
            return _ToolRun("devvm_shell needs a non-empty 'command' string.", True, "bad input")
        timeout_s, timeout_note = _clamp_timeout(tool_input.get("timeout_s"))
        recorder = self.outputs.recorder()
        streamed = False

        def on_output(chunk: OutputChunk) -> None:
            nonlocal streamed
            streamed = True
            shown = recorder.feed(chunk)
            if shown is not None:
                self._show_output(call_id, recorder.output_id, shown)

        try:
            # keep_output False: the whole goes to the output store, not to memory.
            outcome: CommandOutcome = await self.hosts.run(
                command, timeout_s=timeout_s, on_output=on_output, keep_output=False
            )
        except BaseException:
            record, rest = self.outputs.finish(recorder)
            for chunk in rest:
                self._show_output(call_id, record.output_id, chunk)
            self._live_record = record
            self._record_stored(call_id, record)
            raise
        if not streamed and not outcome.kept_tail_only:
            # An implementation that returned the output instead of streaming it.
            for stream, text in (("stdout", outcome.stdout), ("stderr", outcome.stderr)):
                if text:
                    shown = recorder.feed(OutputChunk(stream=stream, text=text))  # type: ignore[arg-type]
                    if shown is not None:
                        self._show_output(call_id, recorder.output_id, shown)
        record, rest = self.outputs.finish(recorder)
        for chunk in rest:
            self._show_output(call_id, record.output_id, chunk)
        self._record_stored(call_id, record)
        ending = _describe_ending(outcome)
        header = f"devvm_shell: {ending} in {outcome.duration_s:.1f} s"
        if timeout_note:
            header += f" | {timeout_note}"
        content = self.outputs.view(record, header)
        summary = f"{ending}, {_size(record.raw_bytes)}, {outcome.duration_s:.1f} s"
        if record.truncated:
            summary += f" (only the first {_size(record.stored_bytes)} kept)"
        is_error = outcome.ending is not Ending.EXITED
        return _ToolRun(
            content, is_error, summary, record, exit_status=outcome.exit_status, ok=outcome.ok
        )

    def _show_output(self, call_id: str, output_id: str, chunk: OutputChunk) -> None:
        # The output itself is stored once, in its own file (capped, OutputStore); the
        # transcript records where it is (_record_stored) rather than a second full copy.
        self._emit(ToolOutput(call_id=call_id, chunk=chunk))

    def _record_stored(self, call_id: str, record: OutputRecord) -> None:
        """The transcript's record of one output: the file that holds it and what it holds."""
        self.transcript.write(
            "output",
            call_id=call_id,
            output_id=record.output_id,
            file=str(record.path.relative_to(self.state_dir)),
            bytes=record.raw_bytes,
            stdout_bytes=record.stdout_bytes,
            stderr_bytes=record.stderr_bytes,
            stored_bytes=record.stored_bytes,
            scrubbed_bytes=record.scrubbed_bytes,
            truncated=record.truncated,
            store_error=record.store_error,
            sha256=record.sha256,
        )
        if record.truncated:
            self.audit.write(
                "output_truncated",
                call_id=call_id,
                output_id=record.output_id,
                stored_bytes=record.stored_bytes,
                scrubbed_bytes=record.scrubbed_bytes,
                store_error=record.store_error,
            )

    async def _pve_verb(self, tool_input: dict[str, Any]) -> _ToolRun:
        verb = tool_input.get("verb")
        if verb not in VERBS:
            return _ToolRun(f"Unknown verb {verb!r}: one of {', '.join(VERBS)}.", True, "bad input")
        result = await self.hosts.verb(verb)
        self.verbs.append(result)
        self._emit(VerbCompleted(result=result))
        self.audit.write(
            "verb_result",
            verb=result.verb,
            ok=result.ok,
            exit_code=result.exit_code,
            message=result.message,
            state_before=result.state_before,
            state_after=result.state_after,
            bundle_id=result.bundle_id,
            refused=result.refused,
            cold_case=result.cold_case,
        )
        bundle: forensics.BundleView | None = None
        if result.bundle_id and self.fetch_bundles and BUNDLE_ID_RE.fullmatch(result.bundle_id):
            # Claude sees the forensics it collects: fetched now, before the tool result.
            doc = await self._fetch_bundle(result.bundle_id)
            if doc is not None:
                bundle = forensics.bundle_view(
                    result.bundle_id, doc, self.outputs, image_budget_bytes=self.image_budget_bytes
                )
                for name, rec in bundle.outputs.items():
                    self._record_stored("", rec)
                    self.calls.append(
                        {
                            "call_id": "",
                            "tool": "forensics_file",
                            "label": f"{result.bundle_id}/{name}",
                            "summary": f"{rec.raw_bytes} bytes",
                            "manual": False,
                            "exit_status": None,
                            "output_id": rec.output_id,
                            "ok": True,
                        }
                    )
        recorder = self.outputs.recorder()
        recorder.feed_text(json.dumps(result.document or _verb_dict(result), indent=1))
        record, _ = self.outputs.finish(recorder)
        self._record_stored("", record)
        state = f"{result.state_before or '?'} -> {result.state_after or '?'}"
        header = (
            f"pve_verb {verb}: {'ok' if result.ok else 'FAILED'} (exit {result.exit_code}),"
            f" {state}: {result.message}"
        )
        if result.bundle_id:
            header += f" | forensics bundle {result.bundle_id}"
        if result.refused:
            header += f" | refused by policy: {result.refused}"
        if result.cold_case:
            header += " | COLD CASE: host-level recovery is needed, out of scope. " + (
                self.settings.cold_path_pointer
            )
        text = self.outputs.view(record, header)
        content: str | list[dict[str, Any]] = text
        if bundle is not None:
            text += "\n\n" + bundle.text
            content = text
            if bundle.image is not None:
                content = [{"type": "text", "text": text}, bundle.image]
        summary = f"{'ok' if result.ok else 'failed'}: {result.message}"
        if result.bundle_id:
            summary += f" (bundle {result.bundle_id})"
        return _ToolRun(
            content, not result.ok, summary, record, exit_status=result.exit_code, ok=result.ok
        )

    async def _fetch_bundle(self, bundle_id: str) -> dict[str, Any] | None:
        """Fetch a forensics bundle into ``<state_dir>/bundles/<id>/`` (the forensics pane
        lists it) and return it; None, with a warning, when the PVE host does not give it."""
        try:
            async with asyncio.timeout(self.bundle_timeout_s):
                doc = await self.hosts.bundle(bundle_id)
            directory = self.state_dir / "bundles" / bundle_id
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            names: list[str] = []
            for name, b64 in (doc.get("files") or {}).items():
                safe = Path(str(name)).name  # never a path from the host
                if not safe or safe.startswith("."):
                    continue
                (directory / safe).write_bytes(base64.b64decode(b64))
                names.append(safe)
            manifest = doc.get("manifest") or {}
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
            self._emit(
                BundleSaved(
                    bundle_id=bundle_id,
                    directory=str(directory),
                    files=tuple(sorted(names)),
                    manifest=manifest if isinstance(manifest, dict) else {},
                )
            )
            self.audit.write("bundle_saved", bundle_id=bundle_id, files=sorted(names))
            return doc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._notice(
                "warning",
                f"Could not fetch forensics bundle {bundle_id} from the PVE host"
                f" ({exc.__class__.__name__}: {exc}); it stays on the host.",
            )
            return None

    async def _probe(self) -> _ToolRun:
        result = await self.hosts.probe()
        self.last_probe = result
        self._emit(ProbeUpdated(result=result))
        self.audit.write(
            "probe_result",
            reachability=result.reachability.value,
            elapsed_s=round(result.elapsed_s, 3),
            message=result.message,
        )
        text = f"probe_devvm: {result.reachability.value} in {result.elapsed_s:.2f} s: "
        text += result.message
        if result.banner:
            text += f"\nbanner: {result.banner[:200]}"
        return _ToolRun(text, False, f"{result.reachability.value}: {result.message}"[:200])

    async def _wait_for_devvm(self, tool_input: dict[str, Any]) -> _ToolRun:
        """Probe until healthy or the timeout: a rebooting guest refuses for a while."""
        timeout = tool_input.get("timeout_s")
        timeout_s = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else 120.0
        timeout_s = min(timeout_s, 600.0)
        started = time.monotonic()
        probes = 0
        while True:
            run = await self._probe()
            probes += 1
            elapsed = time.monotonic() - started
            assert self.last_probe is not None
            healthy = self.last_probe.reachability is Reachability.HEALTHY
            if healthy or elapsed + self.wait_probe_interval_s > timeout_s:
                break
            await asyncio.sleep(self.wait_probe_interval_s)
        verdict = "the devvm answers" if healthy else f"still not healthy after {elapsed:.0f} s"
        return _ToolRun(
            f"wait_for_devvm: {verdict} ({probes} probe(s), {elapsed:.1f} s)\n{run.content}",
            False,
            f"{verdict} ({probes} probes)",
        )

    def _read_output(self, tool_input: dict[str, Any]) -> _ToolRun:
        try:
            text = self.outputs.read(
                tool_input.get("output_id", ""),
                int(tool_input.get("offset", 0)),
                int(tool_input.get("length", self.outputs.budget_bytes)),
            )
        except (ValueError, TypeError) as exc:
            return _ToolRun(str(exc), True, "bad input")
        return _ToolRun(text, False, f"{len(text.encode())} bytes")

    def _list_outputs(self) -> _ToolRun:
        """Every output of the incident with an id: what produced it, its exit, its size."""
        lines = []
        for call in self.calls:
            if not call.get("output_id"):
                continue
            exit_status = call.get("exit_status")
            status = f"exit {exit_status}" if exit_status is not None else ""
            label = (
                call["label"]
                if call["tool"] == "forensics_file"
                else f"{call['tool']} {call['label']}"
            )
            facts = ", ".join(x for x in (status, call["summary"]) if x)
            lines.append(f"- {call['output_id']}: {label} ({facts})")
        if not lines:
            return _ToolRun("No outputs are kept yet.", False, "0 outputs")
        return _ToolRun(
            f"{len(lines)} outputs (read_output/grep_output):\n" + "\n".join(lines[-200:]),
            False,
            f"{len(lines)} outputs",
        )

    async def _grep_output(self, tool_input: dict[str, Any]) -> _ToolRun:
        try:
            text = await self.outputs.grep(
                tool_input.get("output_id", ""),
                str(tool_input.get("pattern", "")),
                int(tool_input.get("max_matches", 50)),
            )
        except (ValueError, TypeError) as exc:
            return _ToolRun(str(exc), True, "bad input")
        return _ToolRun(text, False, text.split("\n", 1)[0])

    # -- manual mode ---------------------------------------------------------------------------

    async def _slash(self, text: str) -> None:
        command, _, rest = text.partition(" ")
        command = command.lower()
        rest = rest.strip()
        if command == "/help":
            self._notice("info", HELP)
            return
        if command == "/cancel":
            # The UI cancels the running worker itself; by the time this runs it is done.
            self._notice("info", "Nothing is running.")
            return
        if command == "/report":
            await self.report()
            return
        if command == "/probe":
            name, tool_input = "probe_devvm", {}
        elif command in _SLASH_VERBS:
            name, tool_input = "pve_verb", {"verb": _SLASH_VERBS[command]}
        elif command == "/sh":
            if not rest:
                self._notice("error", "/sh needs a command, e.g. /sh df -h")
                return
            name, tool_input = "devvm_shell", {"command": rest}
        else:
            self._notice("error", f"Unknown command {command}: /help lists the slash commands.")
            return
        self._manual_count += 1
        call_id = f"{self._manual_prefix}{self._manual_count}"
        try:
            run = await self._run_tool(call_id, name, tool_input, manual=True)
        except asyncio.CancelledError:
            self._pending_manual.append(f"- {self.scrubber.text(text)}: cancelled by the operator")
            raise
        # Claude learns of it on its next turn, briefly; the whole output stays readable by id.
        entry = f"- {self.scrubber.text(text)}: {self.scrubber.text(run.summary)}"
        if run.record is not None:
            entry += f" (output_id {run.record.output_id})"
            tail = run.record.tail or run.record.head
            if tail:
                entry += "\n  last output: " + tail[-600:].decode("utf-8", "ignore").strip()
        self._pending_manual.append(entry)

    # -- the incident so far (resume, take-over) -----------------------------------------------

    def _seed_history(self, history: list[Event]) -> None:
        """Seed the report's timeline, calls, verbs, last probe, Claude's last word and the
        usage from the incident's earlier events (other sessions, or this one's earlier agent),
        so /report covers the whole incident. Manual call ids go on after this session's."""
        started: dict[str, ToolCallStarted] = {}
        turn_text: dict[str, list[str]] = {}
        usage = Usage()
        for event in history:
            at = event.at
            if isinstance(event, SessionStarted):
                if event.session_id not in dict(self.sessions):
                    self.sessions.insert(-1, (event.session_id, event.operator))
                lab = " (lab)" if event.lab else ""
                self._note(f"session {event.session_id} started by {event.operator}{lab}", at)
            elif isinstance(event, OperatorMessage):
                self._note(f"operator: {event.text}", at)
            elif isinstance(event, ToolCallStarted):
                started[event.call_id] = event
                label = _label(event.tool, event.input)
                who = "operator" if event.manual else "Claude"
                self._note(f"{who} ran {event.tool} {label}", at)
                if event.call_id.startswith(self._manual_prefix):
                    n = event.call_id[len(self._manual_prefix) :]
                    if n.isdigit():
                        self._manual_count = max(self._manual_count, int(n))
            elif isinstance(event, ToolCallEnded):
                begun = started.pop(event.call_id, None)
                tool_input = begun.input if begun is not None else {}
                label = _label(event.tool, tool_input)
                self._note(f"{event.tool} {label}: {event.summary}", at)
                self.calls.append(
                    {
                        "call_id": event.call_id,
                        "tool": event.tool,
                        "label": label,
                        "summary": event.summary,
                        "manual": begun.manual if begun is not None else False,
                        "exit_status": event.exit_status,
                        "output_id": event.output_id,
                        "ok": event.ok,
                    }
                )
            elif isinstance(event, VerbCompleted):
                self.verbs.append(event.result)
            elif isinstance(event, ProbeUpdated):
                self.last_probe = event.result
            elif isinstance(event, ModeChanged):
                mode = "manual mode" if event.manual else "normal mode"
                self._note(f"{mode}: {event.reason}", at)
            elif isinstance(event, ApiError):
                self._note(f"API error ({event.kind}): {event.message}", at)
            elif isinstance(event, AssistantTextDelta):
                turn_text.setdefault(event.turn_id, []).append(event.text)
            elif isinstance(event, AssistantTurnEnded):
                text = "".join(turn_text.pop(event.turn_id, []))
                usage = add(usage, event.usage)
                if text:
                    if event.stop_reason not in (None, "cancelled", "error", "incomplete"):
                        self.last_assistant_text = text
                    self._note(f"Claude: {text}", at)
            elif isinstance(event, Notice) and event.level != "info":
                self._note(event.text, at)
        for begun in started.values():  # its tab closed mid-call
            label = _label(begun.tool, begun.input)
            self.calls.append(
                {
                    "call_id": begun.call_id,
                    "tool": begun.tool,
                    "label": label,
                    "summary": "interrupted: the tab running it closed",
                    "manual": begun.manual,
                    "exit_status": None,
                    "output_id": None,
                    "ok": False,
                }
            )
        self.timeline.sort(key=lambda entry: entry[0])
        self.total_usage = usage

    # -- report --------------------------------------------------------------------------------

    async def report(self) -> Path:
        """/report: the incident report written by Claude when it can be asked (one extra turn
        with the same system prompt and tools and ``tool_choice: none``, so the prefix stays
        intact and nothing is kept in the conversation), with the mechanical record as its
        appendix; the mechanical report alone when Claude cannot be asked (manual mode)."""
        written: str | None = None
        if self._api_key() and not self.manual and self.messages:
            self._notice("info", "Asking Claude to write the incident report…")
            last_word = self.last_assistant_text
            try:
                reply = await self._turn(
                    tools=False, extra=[{"type": "text", "text": prompt.REPORT_REQUEST}]
                )
            finally:
                self.last_assistant_text = last_word  # the report is not the incident's last word
            if reply is not None and reply.text.strip():
                written = reply.text.strip()
            else:
                self._notice("warning", "Claude could not write the report: the record alone.")
        return self.write_report(written)

    def write_report(self, written: str | None = None) -> Path:
        """Write the Markdown incident report under ``<state_dir>/reports/`` (``written``:
        Claude's report, put before the record) and emit ReportReady; returns its path."""
        markdown = report.render(self, written=written)
        directory = self.state_dir / "reports"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        filename = f"incident-{self.incident_id or self.session_id}.md"
        path = directory / filename
        path.write_text(self.scrubber.text(markdown))
        self._emit(ReportReady(filename=filename, markdown=self.scrubber.text(markdown)))
        self.audit.write("report", path=str(path), written_by_claude=written is not None)
        return path

    # -- plumbing ------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        # Scrubbed here, once, so every sink (the UI, the incident journal it writes, the
        # transcript) agrees with the audit log. Live output was scrubbed by its recorder.
        if not isinstance(event, ToolOutput):
            event = _scrub_event(self.scrubber, event)
        if not isinstance(event, AssistantTextDelta | AssistantThinkingDelta | ToolOutput):
            data = events_codec.to_json(event, documents=False)
            self.transcript.write("event", event=data.pop("type"), data=data)
        try:
            self._emit_cb(event)
        except Exception as exc:  # a UI bug must not break the rescue
            self.audit.write("ui_error", error=f"{exc.__class__.__name__}: {exc}")

    def _notice(self, level: str, text: str) -> None:
        self._emit(Notice(level=level, text=text))
        self.audit.write("notice", level=level, text=text)

    def _set_mode(self, manual: bool, reason: str) -> None:
        if manual == self.manual and manual is False:
            return
        changed = manual != self.manual
        self.manual = manual
        if changed or manual:
            self._emit(ModeChanged(manual=manual, reason=reason))
            self.audit.write("mode_change", manual=manual, reason=reason)
            self._note(f"{'manual mode' if manual else 'normal mode'}: {reason}")

    def _note(self, text: str, at: float | None = None) -> None:
        self.timeline.append((time.time() if at is None else at, self.scrubber.text(text)))

    def _record_failed(self, name: str, exc: OSError) -> None:
        """The audit log or the transcript could not be written (first time only): say so, and
        go on; the rescue matters more than its record."""
        text = (
            f"Could not write the {name} ({exc.__class__.__name__}: {exc.strerror or exc}):"
            " the rescue goes on, but records are missing until it can be written again (free"
            " space in the state volume)."
        )
        self._note(text)
        if name != "audit log":
            self.audit.write("record_write_failed", record=name, error=str(exc))
        with contextlib.suppress(Exception):
            self._emit_cb(Notice(level="error", text=self.scrubber.text(text)))


# -- helpers -------------------------------------------------------------------------------------


def _clamp_timeout(value: Any) -> tuple[float | None, str]:
    """devvm_shell's timeout_s from the model, within TIMEOUT_MIN_S..TIMEOUT_MAX_S; and a note
    for the tool result when it was changed (None = the shell's default deadline)."""
    if value is None:
        return None, ""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None, f"timeout_s {value!r} is not a number: the default deadline was used"
    clamped = float(min(max(value, TIMEOUT_MIN_S), TIMEOUT_MAX_S))
    if clamped != value:
        return clamped, (
            f"timeout_s {value!r} is outside {TIMEOUT_MIN_S}..{TIMEOUT_MAX_S}: clamped to"
            f" {clamped:g} s"
        )
    return clamped, ""


def _put(blocks: list[dict[str, Any]], index: int, block: dict[str, Any]) -> None:
    while len(blocks) < index:
        blocks.append({"type": "missing"})
    if index < len(blocks):
        blocks[index] = block
    else:
        blocks.append(block)


def _tool_result(
    tool_use_id: str, content: str | list[dict[str, Any]], *, is_error: bool = False
) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": content}
    if is_error:
        result["is_error"] = True
    return result


def _thinking_binding_error(failure: _TurnFailed) -> bool:
    """A 400 about a thinking block sent back ("bound to a different conversation", an invalid
    signature): repairable by leaving the earlier turns' thinking out."""
    text = failure.message.lower()
    return (
        failure.kind == "bad_request"
        and "thinking" in text
        and ("bound to a different conversation" in text or "invalid `signature`" in text)
    )


def _classify_status(exc: Any) -> _TurnFailed:
    status = getattr(exc, "status_code", None)
    etype = getattr(exc, "type", None) or ""
    detail = getattr(exc, "message", str(exc))
    if status == 200:
        # An `error` event in the middle of the stream: the SDK does not retry these.
        return _TurnFailed(
            "overloaded" if etype == "overloaded_error" else "stream_error",
            f"the API sent an error event mid-stream ({etype or 'unknown'}): {detail}",
        )
    if status == 429:
        return _TurnFailed("rate_limited", f"rate limited by the API (429): {detail}")
    if status == 529 or etype == "overloaded_error":
        return _TurnFailed("overloaded", f"the API is overloaded ({status}): {detail}")
    if status in (401, 403):
        return _TurnFailed(
            "auth",
            f"the API refused the key ({status}): check ANTHROPIC_API_KEY",
            retryable=False,
        )
    if status is not None and 400 <= status < 500 and status not in (408, 409):
        return _TurnFailed(
            "bad_request", f"the API rejected the request ({status}): {detail}", retryable=False
        )
    return _TurnFailed("server_error", f"the API failed ({status}): {detail}")


def _describe_ending(outcome: CommandOutcome) -> str:
    if outcome.ending is Ending.EXITED:
        if outcome.signal:
            return f"killed by signal {outcome.signal}"
        return f"exit {outcome.exit_status}"
    if outcome.ending is Ending.TIMED_OUT:
        return f"timed out (stopped): {outcome.message}" if outcome.message else "timed out"
    if outcome.ending is Ending.CANCELLED:
        return "cancelled"
    return f"{outcome.ending.value}: {outcome.message}" if outcome.message else outcome.ending.value


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def _label(name: str, tool_input: dict[str, Any]) -> str:
    if name == "devvm_shell":
        return repr(str(tool_input.get("command", ""))[:200])
    if name == "pve_verb":
        return str(tool_input.get("verb"))
    if name in ("read_output", "grep_output"):
        return str(tool_input.get("output_id"))
    return ""


def _usage_dict(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cost_usd": round(u.cost_usd, 6),
        "cost_known": u.cost_known,
    }


def _verb_dict(r: VerbResult) -> dict[str, Any]:
    return {
        "verb": r.verb,
        "ok": r.ok,
        "exit_code": r.exit_code,
        "message": r.message,
        "state_before": r.state_before,
        "state_after": r.state_after,
        "bundle_id": r.bundle_id,
        "refused": r.refused,
        "cold_case": r.cold_case,
    }


_MENTIONED_ID = re.compile(r"\bo[0-9]{1,9}(?:-[0-9a-f]{8})?\b")
_ID_CONTEXT = re.compile(r"output_id[ =:'\"]*(o[0-9]{1,9}(?:-[0-9a-f]{8})?)\b")


def _mentioned_output_ids(messages: list[dict[str, Any]]) -> set[str]:
    """The output ids a conversation names ("output_id o3", read_output inputs)."""
    found: set[str] = set()
    for message in messages:
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                value = (block.get("input") or {}).get("output_id")
                if isinstance(value, str) and _MENTIONED_ID.fullmatch(value):
                    found.add(value)
                continue
            text = block.get("content") if block.get("type") == "tool_result" else block.get("text")
            if isinstance(text, list):
                text = " ".join(str(b.get("text", "")) for b in text if isinstance(b, dict))
            if isinstance(text, str) and "output_id" in text:
                found.update(_ID_CONTEXT.findall(text))
    return found


def _scrub_event(scrubber: Scrubber, event: Event) -> Event:
    """``event`` with every string in it scrubbed (operator, model and host text can carry a
    key); the same object when nothing changed."""
    import dataclasses

    def scrub(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value
        if isinstance(value, str):
            return scrubber.text(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {}
            for f in dataclasses.fields(value):
                if not f.init:
                    continue
                old = getattr(value, f.name)
                new = scrub(old)
                if new is not old:
                    changes[f.name] = new
            return dataclasses.replace(value, **changes) if changes else value
        if isinstance(value, dict):
            items = {k: scrub(v) for k, v in value.items()}
            return value if all(items[k] is value[k] for k in value) else items
        if isinstance(value, list | tuple):
            seq = [scrub(v) for v in value]
            if all(a is b for a, b in zip(seq, value, strict=True)):
                return value
            return type(value)(seq) if isinstance(value, tuple) else seq
        return value

    scrubbed: Event = scrub(event)
    return scrubbed
