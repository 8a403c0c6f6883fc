"""The breakglass agent's tools: one registry, where each tool is one entry.

An entry (:class:`Tool`) holds everything the console says and does about a tool: its name,
description and input schema (the API request), its handler, how a call is labelled (the audit
log, the timeline and the report) and titled on the screen, and whether a call is mutating.
Adding a tool is adding an entry to :data:`REGISTRY`. The handlers take a :class:`ToolContext`
(the hosts, the output store, the settings, where to emit and record) and never import the agent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from breakglass_tui.config import Settings
from breakglass_tui.core import forensics, injection
from breakglass_tui.core.events import (
    BundleSaved,
    Event,
    ProbeUpdated,
    ToolCallEnded,
    ToolCallStarted,
    ToolOutput,
    VerbCompleted,
)
from breakglass_tui.core.fence import escape, new_fence
from breakglass_tui.core.hostapi import HostSessionLike
from breakglass_tui.core.outputs import OutputRecord, OutputStore
from breakglass_tui.core.records import Record
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

if TYPE_CHECKING:
    from anthropic.types.beta import BetaImageBlockParam, BetaTextBlockParam

# devvm_shell's timeout_s, as its schema says.
TIMEOUT_MIN_S = 1
TIMEOUT_MAX_S = 3600

ToolInput = dict[str, Any]
# A verb's refusal reason as breakglass_verb names them (REFUSED_*), and a signal's name: shown
# outside the fence only when they are such names (core.fence).
_REFUSAL = re.compile(r"[a-z_]{1,32}")
_SIGNAL = re.compile(r"[A-Z0-9]{1,12}")


@dataclass
class ToolRun:
    """What one tool call produced: the tool_result content and the facts for the record."""

    content: str | list[BetaTextBlockParam | BetaImageBlockParam]  # with a screendump: both
    is_error: bool = False  # for Claude: the tool itself failed (not a command's exit status)
    summary: str = ""
    record: OutputRecord | None = None
    exit_status: int | None = None
    ok: bool | None = None  # for the operator: exit 0 / verb ok; None = not is_error
    # What the agent itself knows of the run, never the host's text: the manual-mode
    # note (core.manual_note) is built from these.
    facts: dict[str, Any] = field(default_factory=dict)


class CallLog(Protocol):
    """What the tools read of the incident so far (core.timeline.Timeline is one)."""

    @property
    def calls(self) -> Sequence[Any]: ...

    def add_output(self, call: Any) -> None: ...


@dataclass
class ToolContext:
    """What a tool handler may use; the agent builds one, a test may build another."""

    hosts: HostSessionLike
    outputs: OutputStore
    settings: Settings
    state_dir: Path
    emit: Callable[[Event], None]
    audit: Record
    transcript: Record
    notice: Callable[[str, str], None]  # (level, text)
    note: Callable[[str], None]  # a line of the incident's timeline that no event says
    log: CallLog
    make_call: Callable[..., Any]  # builds a log entry (core.timeline.Call)
    fetch_bundles: bool = True
    bundle_timeout_s: float = 30.0
    image_limit_bytes: int = 1_500_000
    wait_probe_interval_s: float = 2.0
    # The output of the call running now, while it is written (a cancel records how far it got).
    live_record: OutputRecord | None = field(default=None)


Handler = Callable[[ToolContext, str, ToolInput], Awaitable[ToolRun]]


def _no_label(tool_input: ToolInput) -> str:
    return ""


def _never(tool_input: ToolInput) -> bool:
    return False


@dataclass(frozen=True)
class Tool:
    """One tool: what the API is told, what runs, and how a call is named."""

    name: str
    description: str
    input_schema: dict[str, Any]
    handler: Handler
    # The call in one short phrase, after the tool's name (audit log, timeline, report).
    label: Callable[[ToolInput], str] = _no_label
    # The call's one-line title on the screen (chat and live-output pane); None: the default.
    title: Callable[[ToolInput], str] | None = None
    mutating: Callable[[ToolInput], bool] = _never

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }

    def screen_title(self, tool_input: ToolInput) -> str:
        if self.title is not None:
            return self.title(tool_input)
        return default_title(self.name, tool_input)


def default_title(name: str, tool_input: ToolInput) -> str:
    if not tool_input:
        return name.replace("_", " ")
    return f"{name} {json.dumps(tool_input, ensure_ascii=False)[:200]}"


# -- the handlers ----------------------------------------------------------------------------


async def devvm_shell(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    command = tool_input.get("command")
    if not isinstance(command, str) or not command.strip():
        return ToolRun("devvm_shell needs a non-empty 'command' string.", True, "bad input")
    timeout_s, timeout_note = clamp_timeout(tool_input.get("timeout_s"))
    recorder = ctx.outputs.recorder()
    streamed = False

    def show(output_id: str, chunk: OutputChunk) -> None:
        # The output itself is stored once, in its own file (capped, OutputStore); the
        # transcript records where it is (record_stored) rather than a second full copy.
        ctx.emit(ToolOutput(call_id=call_id, chunk=chunk))

    def on_output(chunk: OutputChunk) -> None:
        nonlocal streamed
        streamed = True
        shown = recorder.feed(chunk)
        if shown is not None:
            show(recorder.output_id, shown)

    try:
        # keep_output False: the whole goes to the output store, not to memory.
        outcome: CommandOutcome = await ctx.hosts.run(
            command, timeout_s=timeout_s, on_output=on_output, keep_output=False
        )
    except BaseException:
        record, rest = ctx.outputs.finish(recorder)
        for chunk in rest:
            show(record.output_id, chunk)
        ctx.live_record = record
        record_stored(ctx, call_id, record)
        raise
    if not streamed and not outcome.kept_tail_only:
        # A host that did not stream: its outcome holds the whole output.
        for stream, text in (("stdout", outcome.stdout), ("stderr", outcome.stderr)):
            if text:
                shown = recorder.feed(OutputChunk(stream=stream, text=text))  # type: ignore[arg-type]
                if shown is not None:
                    show(recorder.output_id, shown)
    record, rest = ctx.outputs.finish(recorder)
    for chunk in rest:
        show(record.output_id, chunk)
    record_stored(ctx, call_id, record)
    ending = describe_ending(outcome)
    # [issue 15] The agent's facts outside the fence; the host's text (the output, and the hosts
    # layer's message about an ending, which may quote the host) inside it (core.fence).
    fence = new_fence()
    kind = outcome.ending.value
    if outcome.ending is Ending.EXITED and outcome.signal:
        # The signal's name comes from the devvm's sshd: shown only when it is a name.
        named = _SIGNAL.fullmatch(outcome.signal)
        kind = f"killed by signal {outcome.signal}" if named else "killed by a signal"
    elif outcome.ending is Ending.EXITED:
        kind = f"exit {outcome.exit_status}"
    header = f"devvm_shell: {escape(kind)} in {outcome.duration_s:.1f} s"
    if timeout_note:
        header += f" | {escape(timeout_note)}"
    content = ctx.outputs.view(record, header, fence)
    if outcome.message and outcome.ending is not Ending.EXITED:
        content += "\nhow it ended:\n" + fence.wrap(outcome.message)
    summary = f"{ending}, {size(record.raw_bytes)}, {outcome.duration_s:.1f} s"
    if record.truncated:
        summary += f" (only the first {size(record.stored_bytes)} kept)"
    is_error = outcome.ending is not Ending.EXITED
    facts = {
        "ending": outcome.ending.value,
        "exit_status": outcome.exit_status,
        "signal": outcome.signal,
        "duration_s": outcome.duration_s,
    }
    return ToolRun(
        content,
        is_error,
        summary,
        record,
        exit_status=outcome.exit_status,
        ok=outcome.ok,
        facts=facts,
    )


async def pve_verb(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    verb = tool_input.get("verb")
    if not isinstance(verb, str) or verb not in VERBS:
        return ToolRun(
            f"Unknown verb {escape(repr(verb))}: one of {', '.join(VERBS)}.", True, "bad input"
        )
    fence = new_fence()  # [issue 15] one per tool result, for the verb's and the bundle's text
    result = await ctx.hosts.verb(verb)
    ctx.emit(VerbCompleted(result=result))
    ctx.audit.write(
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
    if result.bundle_id and ctx.fetch_bundles and BUNDLE_ID_RE.fullmatch(result.bundle_id):
        # Claude sees the forensics it collects: fetched now, before the tool result.
        doc = await fetch_bundle(ctx, result.bundle_id)
        if doc is not None:
            bundle = forensics.bundle_view(
                result.bundle_id,
                doc,
                ctx.outputs,
                image_limit_bytes=ctx.image_limit_bytes,
                fence=fence,
            )
            for name, rec in bundle.outputs.items():
                record_stored(ctx, "", rec)
                ctx.log.add_output(
                    ctx.make_call(
                        call_id="",
                        tool="forensics_file",
                        label=f"{result.bundle_id}/{name}",
                        summary=f"{rec.raw_bytes} bytes",
                        manual=False,
                        exit_status=None,
                        output_id=rec.output_id,
                        ok=True,
                    )
                )
    recorder = ctx.outputs.recorder()
    recorder.feed_text(json.dumps(result.document or verb_dict(result), indent=1))
    record, _ = ctx.outputs.finish(recorder)
    record_stored(ctx, "", record)
    # [issue 15] What the agent knows outside the fence; what the host said (the states, its
    # message) inside it, then its whole answer.
    bundle_id = result.bundle_id if BUNDLE_ID_RE.fullmatch(result.bundle_id or "") else None
    header = f"pve_verb {verb}: {'ok' if result.ok else 'FAILED'} (exit {result.exit_code})"
    if bundle_id:
        header += f" | forensics bundle {bundle_id}"
    if result.refused:
        refused = result.refused if _REFUSAL.fullmatch(result.refused) else "(see below)"
        header += f" | refused: {refused}"
    if result.cold_case:
        header += " | COLD CASE: host-level recovery is needed, out of scope. " + (
            ctx.settings.cold_path_pointer
        )
    state = f"{result.state_before or '?'} -> {result.state_after or '?'}"
    said = fence.wrap(f"state: {state}\nmessage: {result.message}")
    text = f"{header}\n{said}\n" + ctx.outputs.view(record, "the verb's answer", fence)
    content: str | list[BetaTextBlockParam | BetaImageBlockParam] = text
    if bundle is not None:
        text += "\n\n" + bundle.text
        content = text
        if bundle.image is not None:
            content = [{"type": "text", "text": text}, bundle.image]
    summary = f"{'ok' if result.ok else 'failed'}: {result.message}"
    if result.bundle_id:
        summary += f" (bundle {result.bundle_id})"
    facts = {
        "verb": verb,
        "ok": result.ok,
        "exit_code": result.exit_code,
        "bundle_id": bundle_id,
        "refused": result.refused,
    }
    return ToolRun(
        content,
        not result.ok,
        summary,
        record,
        exit_status=result.exit_code,
        ok=result.ok,
        facts=facts,
    )


async def fetch_bundle(ctx: ToolContext, bundle_id: str) -> dict[str, Any] | None:
    """Fetch a forensics bundle into ``<state_dir>/bundles/<id>/`` (the forensics pane lists
    it) and return it; None, with a warning, when the PVE host does not give it."""
    try:
        async with asyncio.timeout(ctx.bundle_timeout_s):
            doc = await ctx.hosts.bundle(bundle_id)
        directory = ctx.state_dir / "bundles" / bundle_id
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
        ctx.emit(
            BundleSaved(
                bundle_id=bundle_id,
                directory=str(directory),
                files=tuple(sorted(names)),
                manifest=manifest if isinstance(manifest, dict) else {},
            )
        )
        ctx.audit.write("bundle_saved", bundle_id=bundle_id, files=sorted(names))
        return doc
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ctx.notice(
            "warning",
            f"Could not fetch forensics bundle {bundle_id} from the PVE host"
            f" ({exc.__class__.__name__}: {exc}); it stays on the host.",
        )
        return None


async def probe(
    ctx: ToolContext, call_id: str = "", tool_input: ToolInput | None = None
) -> ToolRun:
    return _probe_run(await _probe(ctx))


async def _probe(ctx: ToolContext) -> ProbeResult:
    result = await ctx.hosts.probe()
    ctx.emit(ProbeUpdated(result=result))
    ctx.audit.write(
        "probe_result",
        reachability=result.reachability.value,
        elapsed_s=round(result.elapsed_s, 3),
        message=result.message,
    )
    return result


def _probe_run(result: ProbeResult) -> ToolRun:
    # [issue 15] The message and the SSH banner may hold the devvm's text: fenced.
    said = result.message + (f"\nbanner: {result.banner[:200]}" if result.banner else "")
    text = f"probe_devvm: {result.reachability.value} in {result.elapsed_s:.2f} s\n"
    text += new_fence().wrap(said)
    return ToolRun(
        text,
        False,
        f"{result.reachability.value}: {result.message}"[:200],
        facts={"reachability": result.reachability.value},
    )


async def wait_for_devvm(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    """Probe until healthy or the timeout: a rebooting guest refuses for a while."""
    timeout = tool_input.get("timeout_s")
    timeout_s = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else 120.0
    timeout_s = min(timeout_s, 600.0)
    started = time.monotonic()
    probes = 0
    while True:
        result = await _probe(ctx)
        probes += 1
        elapsed = time.monotonic() - started
        healthy = result.reachability is Reachability.HEALTHY
        if healthy or elapsed + ctx.wait_probe_interval_s > timeout_s:
            break
        await asyncio.sleep(ctx.wait_probe_interval_s)
    verdict = "the devvm answers" if healthy else f"still not healthy after {elapsed:.0f} s"
    last = _probe_run(result)
    return ToolRun(
        f"wait_for_devvm: {verdict} ({probes} probe(s), {elapsed:.1f} s)\n{last.content}",
        False,
        f"{verdict} ({probes} probes)",
        facts=last.facts,
    )


async def read_output(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    try:
        text = ctx.outputs.read(
            tool_input.get("output_id", ""),
            int(tool_input.get("offset", 0)),
            int(tool_input.get("length", ctx.outputs.view_bytes)),
            new_fence(),
        )
    except (ValueError, TypeError) as exc:
        return ToolRun(escape(str(exc)), True, "bad input")
    return ToolRun(text, False, f"{len(text.encode())} bytes")


async def list_outputs(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    """Every output of the incident with an id: what produced it, its exit, its size."""
    lines = []
    for call in ctx.log.calls:
        if not call.output_id:
            continue
        status = f"exit {call.exit_status}" if call.exit_status is not None else ""
        shown = call.label if call.tool == "forensics_file" else f"{call.tool} {call.label}"
        facts = ", ".join(x for x in (status, call.summary) if x)
        lines.append(f"- {call.output_id}: {shown} ({facts})")
    if not lines:
        return ToolRun("No outputs are kept yet.", False, "0 outputs")
    # The labels and summaries hold the hosts' words (a verb's message, a bundle's file
    # names): the list is fenced.
    return ToolRun(
        f"{len(lines)} outputs (read_output/grep_output):\n"
        + new_fence().wrap("\n".join(lines[-200:])),
        False,
        f"{len(lines)} outputs",
    )


async def grep_output(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    try:
        text = await ctx.outputs.grep(
            tool_input.get("output_id", ""),
            str(tool_input.get("pattern", "")),
            int(tool_input.get("max_matches", 50)),
            fence=new_fence(),
        )
    except (ValueError, TypeError) as exc:
        return ToolRun(escape(str(exc)), True, "bad input")
    return ToolRun(text, False, text.split("\n", 1)[0])


async def report_injection(ctx: ToolContext, call_id: str, tool_input: ToolInput) -> ToolRun:
    """[issue 15] Claude says host text tried to instruct it: a warning for the operator
    (core.injection)."""
    event, text = injection.report(tool_input)
    if event is None:
        return ToolRun(text, True, "bad input")
    ctx.emit(event)
    ctx.audit.write("injection_reported", output_id=event.output_id, summary=event.summary)
    return ToolRun(text, False, f"reported: {event.summary}"[:200])


# -- the registry ----------------------------------------------------------------------------


def _output_id(tool_input: ToolInput) -> str:
    return str(tool_input.get("output_id"))


REGISTRY: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        Tool(
            name="devvm_shell",
            description=(
                "Run a shell command as root on the devvm over SSH (non-interactive, no pty). The"
                " output streams to the operator's live-output pane; you see its head and tail"
                " within a limit, the exit status and an output_id for read_output/grep_output."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The shell command."},
                    "timeout_s": {
                        "type": "integer",
                        "description": "Deadline in seconds (default from config).",
                        "minimum": TIMEOUT_MIN_S,
                        "maximum": TIMEOUT_MAX_S,
                    },
                },
                "required": ["command"],
            },
            handler=devvm_shell,
            label=lambda i: repr(str(i.get("command", ""))[:200]),
            title=lambda i: f"$ {i.get('command')}",
        ),
        Tool(
            name="pve_verb",
            description=(
                "Run one forced-command verb on the Proxmox host for the devvm's VM only. status"
                " and forensics are read-only; reset, stop, start and cycle are mutating, each"
                " captures a forensics bundle first and is bounded by the host's budget and"
                " cooldown. reset = guest reset (QEMU stays); cycle = stop and start the QEMU"
                " process (for a stuck QEMU or when reset did not help)."
            ),
            input_schema={
                "type": "object",
                "properties": {"verb": {"type": "string", "enum": list(VERBS)}},
                "required": ["verb"],
            },
            handler=pve_verb,
            label=lambda i: str(i.get("verb")),
            title=lambda i: f"pve {i.get('verb')}",
            mutating=lambda i: i.get("verb") in MUTATING_VERBS,
        ),
        Tool(
            name="probe_devvm",
            description=(
                "Probe the devvm's reachability: TCP, SSH banner, login and a trivial command."
                " Says healthy, refused, tcp_timeout, no_banner, auth_refused, host_key_mismatch"
                " or command_failed."
            ),
            input_schema={"type": "object", "properties": {}},
            handler=probe,
        ),
        Tool(
            name="wait_for_devvm",
            description=(
                "Probe the devvm repeatedly until SSH answers (healthy) or the timeout passes;"
                " use it after reset, cycle or start, while the guest boots."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "timeout_s": {"type": "integer", "minimum": 1, "maximum": 600},
                },
            },
            handler=wait_for_devvm,
        ),
        Tool(
            name="read_output",
            description=(
                "Read a byte range of an earlier tool output by its output_id (up to its first"
                " 16 MiB are kept; you were shown only its head and tail). Length is capped by"
                " the view limit."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "output_id": {"type": "string"},
                    "offset": {"type": "integer", "minimum": 0},
                    "length": {"type": "integer", "minimum": 1},
                },
                "required": ["output_id", "offset", "length"],
            },
            handler=read_output,
            label=_output_id,
        ),
        Tool(
            name="list_outputs",
            description=(
                "List the outputs kept in this incident: output_id, what produced it (command,"
                " verb, forensics bundle file), exit status and size. Use it to find an output"
                " whose tool result was cleared from your context."
            ),
            input_schema={"type": "object", "properties": {}},
            handler=list_outputs,
        ),
        Tool(
            name="grep_output",
            description=(
                "Search an earlier tool output by its output_id for lines matching a Python"
                " regular expression; returns line numbers, byte offsets and the lines. The"
                " pattern sees the first 4096 characters of each line, and a pattern that runs"
                " longer than a few seconds is stopped: avoid nested quantifiers."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "output_id": {"type": "string"},
                    "pattern": {"type": "string"},
                    "max_matches": {"type": "integer", "minimum": 1, "maximum": 500},
                },
                "required": ["output_id", "pattern"],
            },
            handler=grep_output,
            label=_output_id,
        ),
        Tool(
            name=injection.NAME,
            description=injection.DEFINITION["description"],
            input_schema=injection.DEFINITION["input_schema"],
            handler=report_injection,
            label=lambda i: str(i.get("output_id") or ""),
        ),
    )
}


def definitions() -> list[dict[str, Any]]:
    """The tools as the API request names them; the last carries cache_control (the tool
    list is cached)."""
    tools = [tool.definition() for tool in REGISTRY.values()]
    if tools:
        tools[-1]["cache_control"] = {"type": "ephemeral"}
    return tools


def label(name: str, tool_input: ToolInput) -> str:
    """A call in one short phrase after its tool's name ("" for a tool that needs none)."""
    tool = REGISTRY.get(name)
    return tool.label(tool_input) if tool is not None else ""


def title(name: str, tool_input: ToolInput) -> str:
    """A call's one-line title on the screen."""
    tool = REGISTRY.get(name)
    return tool.screen_title(tool_input) if tool is not None else default_title(name, tool_input)


def is_mutating(name: str, tool_input: ToolInput) -> bool:
    tool = REGISTRY.get(name)
    return tool is not None and tool.mutating(tool_input)


# -- one call, with its events and audit records ----------------------------------------------


async def run_call(
    ctx: ToolContext,
    call_id: str,
    name: str,
    tool_input: ToolInput,
    *,
    manual: bool = False,
) -> ToolRun:
    """Run one tool call (Claude's or the operator's), with its events and audit records."""
    mutating = is_mutating(name, tool_input)
    ctx.emit(
        ToolCallStarted(
            call_id=call_id, tool=name, input=tool_input, mutating=mutating, manual=manual
        )
    )
    ctx.audit.write(
        "tool_call",
        call_id=call_id,
        tool=name,
        input=tool_input,
        label=label(name, tool_input),
        manual=manual,
        mutating=mutating,
    )
    ctx.live_record = None
    started = time.monotonic()
    tool = REGISTRY.get(name)
    try:
        if tool is None:
            run = ToolRun(
                f"Unknown tool {escape(repr(name))}.", is_error=True, summary="unknown tool"
            )
        else:
            run = await tool.handler(ctx, call_id, tool_input)
    except asyncio.CancelledError:
        elapsed = time.monotonic() - started
        ctx.emit(
            ToolCallEnded(
                call_id=call_id,
                tool=name,
                ok=False,
                summary="cancelled",
                duration_s=elapsed,
                cancelled=True,
            )
        )
        rec = ctx.live_record
        partial: dict[str, Any] = (
            {"output_id": rec.output_id, "bytes": rec.raw_bytes, "sha256": rec.sha256}
            if rec is not None
            else {}
        )
        ctx.audit.write(
            "tool_result",
            call_id=call_id,
            tool=name,
            cancelled=True,
            ok=False,
            duration_s=round(elapsed, 3),
            **partial,
        )
        raise
    except Exception as exc:  # a tool that fails must not end the incident
        # The exception's text may carry the host's (an SSH disconnect reason): fenced.
        run = ToolRun(
            f"The tool failed: {exc.__class__.__name__}\n{new_fence().wrap(str(exc))}",
            is_error=True,
            summary=f"failed: {exc.__class__.__name__}: {exc}",
        )
    elapsed = time.monotonic() - started
    rec = run.record
    ok = run.ok if run.ok is not None else not run.is_error
    ctx.emit(
        ToolCallEnded(
            call_id=call_id,
            tool=name,
            ok=ok,
            summary=run.summary,
            duration_s=elapsed,
            exit_status=run.exit_status,
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
    ctx.audit.write(
        "tool_result",
        call_id=call_id,
        tool=name,
        ok=ok,
        exit_status=run.exit_status,
        summary=run.summary,
        duration_s=round(elapsed, 3),
        **facts,
    )
    return run


def interrupted(ctx: ToolContext, exc: BaseException, call_ids: list[str]) -> str:
    """The tool loop was cancelled, or something escaped a tool: record it, and say what each
    call not run is answered with (the conversation stays valid)."""
    error = f"{exc.__class__.__name__}: {exc}"
    with contextlib.suppress(Exception):
        if isinstance(exc, asyncio.CancelledError):
            ctx.audit.write("cancelled", during="tool", calls=call_ids)
            ctx.note("cancelled by the operator during a tool call")
            ctx.notice("warning", "Cancelled: the running command was stopped.")
        else:
            ctx.audit.write("tool_loop_error", error=error, calls=call_ids)
            ctx.note(f"the tool loop failed: {error}")
    if isinstance(exc, asyncio.CancelledError):
        return "Cancelled by the operator."
    # The error's text may quote a host: fenced.
    return (
        f"Not completed: the breakglass agent failed ({exc.__class__.__name__})\n"
        + new_fence().wrap(str(exc))
    )


def record_stored(ctx: ToolContext, call_id: str, record: OutputRecord) -> None:
    """The transcript's record of one output: the file that holds it and what it holds."""
    ctx.transcript.write(
        "output",
        call_id=call_id,
        output_id=record.output_id,
        file=str(record.path.relative_to(ctx.state_dir)),
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
        ctx.audit.write(
            "output_truncated",
            call_id=call_id,
            output_id=record.output_id,
            stored_bytes=record.stored_bytes,
            scrubbed_bytes=record.scrubbed_bytes,
            store_error=record.store_error,
        )


# -- helpers -------------------------------------------------------------------------------------


def clamp_timeout(value: Any) -> tuple[float | None, str]:
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


def describe_ending(outcome: CommandOutcome) -> str:
    if outcome.ending is Ending.EXITED:
        if outcome.signal:
            return f"killed by signal {outcome.signal}"
        return f"exit {outcome.exit_status}"
    if outcome.ending is Ending.TIMED_OUT:
        return f"timed out (stopped): {outcome.message}" if outcome.message else "timed out"
    if outcome.ending is Ending.CANCELLED:
        return "cancelled"
    return f"{outcome.ending.value}: {outcome.message}" if outcome.message else outcome.ending.value


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def verb_dict(r: VerbResult) -> dict[str, Any]:
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
