"""The breakglass agent: Claude's tool loop over the hosts layer, with resilience, the spend limit
and manual mode.

The UI calls :meth:`BreakglassAgent.handle` for every operator message or slash command, in an
exclusive worker; cancelling that worker is the operator's cancel. The agent emits plain events
(``core.events``) and never imports Textual. Its parts are modules of their own, each taking what
it needs as arguments: the model turn (``core.turn``), the conversation (``core.conversation``),
the tools (``core.tools``), the slash commands (``core.slash``), the incident's timeline
(``core.timeline``, which the report reads) and the records (``core.records``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breakglass_tui.config import Settings
from breakglass_tui.core import events as ev
from breakglass_tui.core import prompt, report, slash, tools
from breakglass_tui.core.approval import VerbGate
from breakglass_tui.core.audit import audit_log, transcript
from breakglass_tui.core.conversation import Conversation, tool_result
from breakglass_tui.core.hostapi import HostSessionLike
from breakglass_tui.core.ids import new_session_id
from breakglass_tui.core.outputs import OutputStore
from breakglass_tui.core.records import SafeRecord, scrub_event
from breakglass_tui.core.scrub import Scrubber
from breakglass_tui.core.steering import OperatorQueue, steering_blocks
from breakglass_tui.core.timeline import Call, Timeline
from breakglass_tui.core.turn import Asker, ContextLimits, ModelClient, Reply, usage_dict

if TYPE_CHECKING:
    from anthropic.types.beta import BetaContentBlockParam, BetaToolResultBlockParam

HELP = slash.help_text()  # what /help says (core.slash is the one table)


class BreakglassAgent:
    """Claude's tool loop for the warm case, plus the operator's manual slash commands."""

    def __init__(
        self,
        settings: Settings,
        hosts: HostSessionLike,
        emit: Callable[[ev.Event], None],
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
        output_view_bytes: int = 8192,
        output_view_tokens: int = 2048,
        context_limit_bytes: int = 120_000,
        wait_probe_interval_s: float = 2.0,
        conversation: list[dict[str, Any]] | None = None,
        save_conversation: Callable[[list[dict[str, Any]]], None] | None = None,
        keep_recent_results: int = 8,
        context_trigger_tokens: int = 40_000,
        context_clear_at_least_tokens: int = 8_000,
        fetch_bundles: bool = True,
        bundle_timeout_s: float = 30.0,
        image_limit_bytes: int = 1_500_000,
        history: list[ev.Event] | None = None,
        incident_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.hosts = hosts
        self._emit_cb = emit
        self.operator = operator
        self.lab = lab
        self.session_id = session_id or new_session_id()
        self.incident_id = incident_id
        self._api_key_arg = api_key
        self.context_limit_bytes = context_limit_bytes
        self.keep_recent_results = keep_recent_results
        self.context_trigger_tokens = context_trigger_tokens
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.scrubber = Scrubber([self._api_key()])
        # The incident so far (earlier sessions' events too: the header and the report show
        # them); the audit log records this session's own usage, so sums count a turn once.
        self.timeline = Timeline(scrub=self.scrubber.text)
        who = {"session_id": self.session_id, "operator": operator}
        self.audit = SafeRecord(
            audit_log(self.state_dir, self.scrubber, **who), "audit log", self._record_failed
        )
        self.transcript = SafeRecord(
            transcript(self.state_dir, self.scrubber, **who), "transcript", self._record_failed
        )
        # Output ids name the session (o<n>-<tag>): a restored conversation's ids never alias
        # this session's, and the earlier sessions' outputs are read from their directories.
        self.outputs = OutputStore(
            self.state_dir / "transcripts" / self.session_id,
            self.scrubber,
            view_bytes=output_view_bytes,
            view_tokens=output_view_tokens,
            shared_root=self.state_dir / "transcripts",
        )
        self.conversation = Conversation(conversation, save=save_conversation, record=self.audit)
        self.manual = False
        client = ModelClient(
            self._api_key,
            base_url=base_url,
            connect_timeout_s=api_connect_timeout_s,
            read_timeout_s=stream_read_timeout_s,
            sdk_max_retries=sdk_max_retries,
            on_new_key=self.scrubber.add,
        )
        self.asker = Asker(
            settings,
            client,
            self.conversation,
            emit=self._emit,
            audit=self.audit,
            notice=self._notice,
            note=self.timeline.note,
            set_mode=self._set_mode,
            manual=lambda: self.manual,
            incident_usage=lambda: self.timeline.usage,
            tool_definitions=prompt.tool_definitions,
            limits=ContextLimits(
                context_trigger_tokens, keep_recent_results, context_clear_at_least_tokens
            ),
            max_tokens=max_tokens or settings.max_tokens,
            turn_retries=turn_retries,
            retry_delay_s=retry_delay_s,
        )
        # The operator's messages queued while this agent works (the UI shares its own queue).
        self.operator_queue: OperatorQueue | None = None
        self.tools = tools.ToolContext(
            hosts=hosts,
            outputs=self.outputs,
            settings=settings,
            state_dir=self.state_dir,
            emit=self._emit,
            audit=self.audit,
            transcript=self.transcript,
            notice=self._notice,
            note=self.timeline.note,
            log=self.timeline,
            make_call=Call,
            fetch_bundles=fetch_bundles,
            bundle_timeout_s=bundle_timeout_s,
            image_limit_bytes=image_limit_bytes,
            wait_probe_interval_s=wait_probe_interval_s,
        )
        # [issue 15] The agent-side bound on Claude's mutating verbs (core.approval).
        self.verb_gate = VerbGate(
            limit=settings.max_mutating_verbs_per_message,
            timeout_s=settings.verb_approval_timeout_s,
            emit=self._emit,
            audit=self.audit.write,
        )
        # Manual call ids name the session: tabs sharing an incident journal never repeat one.
        self._manual_prefix = f"manual-{self.session_id}-"
        self._manual_count = 0
        self._closed = False
        if history:  # the incident's earlier events (the journal, replayed)
            self.timeline.replay(history)
            self._manual_count = self.timeline.highest_call_number(self._manual_prefix)
        self._emit(
            ev.SessionStarted(
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
        if self.messages:
            legacy = self.conversation.repair(
                is_legacy_id=OutputStore.is_legacy_id, example_id=self.outputs.id_for(1)
            )
            if legacy:
                self.audit.write("restored_legacy_output_ids", output_ids=legacy)
        if not self._api_key():
            self._set_mode(
                True,
                "no ANTHROPIC_API_KEY is set: manual mode. The slash commands work (/help);"
                " set the key and send a message to bring Claude in.",
            )

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.conversation.messages

    @property
    def total_usage(self) -> ev.Usage:
        """The incident's usage so far (earlier sessions' too)."""
        return self.timeline.usage

    # -- public API ---------------------------------------------------------------------------

    async def handle(self, text: str) -> None:
        """Handle one operator message or slash command. Cancelling the task running this is the
        operator's cancel: the stream and the running command stop at once, the conversation
        stays valid, and CancelledError is re-raised."""
        text = text.strip()
        if not text:
            return
        self._emit(ev.OperatorMessage(text=text))
        is_slash = text.startswith("/")
        self.audit.write("operator_message", text=text, slash=is_slash)
        if is_slash:
            await self._slash(text)
        else:
            # What the model is shown (and the saved conversation) is scrubbed like every record.
            await self._converse(self.scrubber.text(text))

    async def close(self) -> None:
        """End the session: close the API client and the records. The HostSession belongs to
        the caller and is not closed here."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.asker.client.close()
        self._emit(ev.SessionEnded(session_id=self.session_id))
        self.audit.write(
            "session_end",
            total_usage=usage_dict(self.asker.session_usage),
            incident_usage=usage_dict(self.total_usage),
        )
        self.audit.close()
        self.transcript.close()

    def answer_approval(self, request_id: str, approved: bool) -> bool:
        """The driving operator's answer to a VerbApprovalAsked (core.approval); False when
        that question is no longer waiting."""
        return self.verb_gate.answer(request_id, approved)

    # -- the tool loop ------------------------------------------------------------------------

    async def _converse(self, text: str) -> None:
        self.asker.at_operator_message(self.context_limit_bytes, self.keep_recent_results)
        self.verb_gate.new_operator_message()  # [issue 15] core.approval counts per message
        # Kept in the conversation even when Claude cannot be asked now: it is context later.
        said = self.conversation.manual_context()
        said.append({"type": "text", "text": text})
        self.conversation.append_user(said)
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
            reply = await self.asker.ask(use_tools=True)
            if reply is None:
                return
            self._keep(reply)
            tool_uses = reply.tool_uses
            if not tool_uses:
                if reply.stop_reason == "max_tokens":
                    self._notice("warning", "Claude's reply was cut at the max_tokens limit.")
                return
            results: list[BetaToolResultBlockParam] = []
            try:
                for block in tool_uses:
                    if steps >= max_steps:
                        why = (
                            f"Not run: the step limit of {max_steps} tool calls for this"
                            " operator message was reached."
                        )
                        results.append(tool_result(block["id"], why, is_error=True))
                        continue
                    steps += 1
                    # [issue 15] Past the per-message limit a mutating verb waits for approval.
                    refusal = await self.verb_gate.admit(block["id"], block["name"], block["input"])
                    if refusal is not None:
                        results.append(tool_result(block["id"], refusal, is_error=True))
                        continue
                    run = await tools.run_call(
                        self.tools, block["id"], block["name"], block["input"]
                    )
                    results.append(tool_result(block["id"], run.content, is_error=run.is_error))
            except BaseException as exc:  # cancel, or anything that escaped a tool
                ids = [b["id"] for b in tool_uses]
                reason = tools.interrupted(self.tools, exc, ids)
                self.conversation.answer_all(tool_uses, results, reason)
                raise
            # The tool loop's boundary: the next request carries these results, then the
            # operator's queued words. Nothing sent before is edited inside the loop (the
            # thinking blocks are bound to it); the API's context editing clears old results.
            answer: list[BetaContentBlockParam] = [*results]
            if steps < max_steps:
                steering = steering_blocks(self.operator_queue, self._deliver_queued)
                if steering:  # a new operator message: the verb limit counts afresh
                    self.verb_gate.new_operator_message()
                answer += steering
            self.conversation.append_user(answer)
            if steps >= max_steps:
                await self._step_limit_summary(max_steps)
                return

    def _deliver_queued(self, text: str) -> str:
        """A message the operator queued while Claude worked, delivered at the step boundary."""
        self._emit(ev.OperatorMessage(text=text))
        self.audit.write("operator_message", text=text, slash=False, queued=True)
        return self.scrubber.text(text)

    async def _step_limit_summary(self, max_steps: int) -> None:
        """One last request without tool use, so the operator gets where things stand."""
        self._notice(
            "warning",
            f"Step limit reached ({max_steps} tool calls for this message): asking Claude for a"
            " summary of where things stand. Send another message to continue.",
        )
        self.audit.write("step_limit", max_steps=max_steps)
        self.conversation.append_user([{"type": "text", "text": prompt.step_limit(max_steps)}])
        reply = await self.asker.ask(use_tools=False)
        if reply is not None:
            self._keep(reply)
            if not reply.tool_uses:
                return
            # It called a tool anyway: answered unrun, so the conversation stays valid.
            why = "Not run: the step limit was reached."
            self.conversation.append_user(
                [tool_result(b["id"], why, is_error=True) for b in reply.tool_uses]
            )
        self._notice("info", self.timeline.where_things_stand())

    def _keep(self, reply: Reply) -> None:
        """A turn of only thinking is not kept (it adds nothing; an empty message is refused)."""
        if reply.worth_keeping():
            self.conversation.append_assistant(reply.content, model=reply.model, basis=reply.basis)

    def _api_key(self) -> str | None:
        return self._api_key_arg or os.environ.get("ANTHROPIC_API_KEY") or None

    # -- slash commands (core.slash) -----------------------------------------------------------

    async def _slash(self, text: str) -> None:
        word, _, rest = text.partition(" ")
        command = slash.find(word)
        if command is None:
            self._notice(
                "error", f"Unknown command {word.lower()}: /help lists the slash commands."
            )
            return
        if command.name == "/help":
            self._notice("info", slash.help_text())
            return
        if command.name == "/report":
            await self.report()
            return
        if command.tool is None or command.tool_input is None:
            # The UI answers these itself; by the time one reaches here, nothing runs.
            said = "Nothing is running." if command.name == "/cancel" else None
            self._notice("info", said or f"{command.name} is answered by the console's tab.")
            return
        self._manual_count += 1
        await slash.run_manual(
            command,
            rest.strip(),
            self.tools,
            call_id=f"{self._manual_prefix}{self._manual_count}",
            said=self.scrubber.text(text),
            pending=self.conversation.pending_manual,
        )

    # -- report --------------------------------------------------------------------------------

    async def report(self) -> Path:
        """/report: Claude's account when it can be asked (core.report.ask_claude), with the
        mechanical record as its appendix; the record alone in manual mode."""
        asked = self._api_key() and not self.manual and self.messages
        written = (
            await report.ask_claude(self.asker, self.timeline, self._notice) if asked else None
        )
        return self.write_report(written)

    def write_report(self, written: str | None = None) -> Path:
        """Write the Markdown incident report under ``<state_dir>/reports/`` (``written``:
        Claude's report, put before the record) and emit ReportReady; returns its path."""
        about = report.About.of(
            self.settings, self.session_id, self.operator, self.lab, self.incident_id
        )
        path, markdown = report.write(
            self.timeline, about, self.state_dir, written=written, scrub=self.scrubber.text
        )
        self._emit(ev.ReportReady(filename=path.name, markdown=markdown))
        self.audit.write("report", path=str(path), written_by_claude=written is not None)
        return path

    # -- plumbing ------------------------------------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        # Scrubbed here, once, so every sink (the timeline, the UI, the incident journal it
        # writes, the transcript) agrees with the audit log. Live output was scrubbed by its
        # recorder.
        if not isinstance(event, ev.ToolOutput):
            event = scrub_event(self.scrubber, event)
        if not isinstance(event, ev.AssistantTextDelta | ev.AssistantThinkingDelta | ev.ToolOutput):
            data = ev.to_json(event, documents=False)
            self.transcript.write("event", event=data.pop("type"), data=data)
        self.timeline.observe(event)
        try:
            self._emit_cb(event)
        except Exception as exc:  # a UI bug must not break the rescue
            self.audit.write("ui_error", error=f"{exc.__class__.__name__}: {exc}")

    def _notice(self, level: str, text: str) -> None:
        self._emit(ev.Notice(level=level, text=text))
        self.audit.write("notice", level=level, text=text)

    def _set_mode(self, manual: bool, reason: str) -> None:
        if manual == self.manual and manual is False:
            return
        changed = manual != self.manual
        self.manual = manual
        if changed or manual:
            self._emit(ev.ModeChanged(manual=manual, reason=reason))
            self.audit.write("mode_change", manual=manual, reason=reason)

    def _record_failed(self, name: str, exc: OSError) -> None:
        """The audit log or the transcript could not be written (first time only): say so, and
        go on; the rescue matters more than its record."""
        text = (
            f"Could not write the {name} ({exc.__class__.__name__}: {exc.strerror or exc}):"
            " the rescue goes on, but records are missing until it can be written again (free"
            " space in the state volume)."
        )
        self.timeline.note(text)
        if name != "audit log":
            self.audit.write("record_write_failed", record=name, error=str(exc))
        with contextlib.suppress(Exception):
            self._emit_cb(ev.Notice(level="error", text=self.scrubber.text(text)))
