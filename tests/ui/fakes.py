"""A scripted stand-in for the breakglass agent, for widget and key tests that feed events.

The end-to-end tests use the real agent, the lab and the fake Messages API; these tests pin the
UI's rendering of each event to a known sequence (and a frozen clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breakglass_tui.core import events as ev
from breakglass_tui.core.steering import OperatorQueue, steering_blocks
from breakglass_tui.hosts.types import (
    OutputChunk,
    ProbeResult,
    Reachability,
    VerbResult,
)
from breakglass_tui.ui.backend import AppOptions, Backend, Emit

MODEL = "claude-sonnet-4-5"
T0 = 1_790_000_000.0  # a fixed instant: timestamps on screen never change between runs


@dataclass
class FakeHosts:
    bundles: dict[str, dict[str, Any]] = field(default_factory=dict)
    closed: bool = False

    async def bundle(self, bundle_id: str) -> dict[str, Any]:
        return self.bundles[bundle_id]

    async def close(self) -> None:
        self.closed = True


class ScriptedAgent:
    """Plays events for each operator text; ``/sh sleep`` runs until cancelled."""

    def __init__(self, emit: Emit, *, manual: bool = True, operator: str = "viktor") -> None:
        self.emit = emit
        self.manual = manual
        self.handled: list[str] = []
        self.cancelled = 0
        self.closed = False
        self.script: dict[str, Callable[[], Any]] = {}
        self.setup: dict[str, Any] = {}  # how the app built it: session_id, conversation, ...
        self.operator_queue: OperatorQueue | None = None
        self.steered: list[str] = []  # queued messages taken at a step boundary, as Claude would
        self.approvals: list[tuple[str, bool]] = []  # the operator's answers (core.approval)
        self._n = 0

    def _id(self) -> str:
        self._n += 1
        return f"call-{self._n}"

    async def handle(self, text: str) -> None:
        self.handled.append(text)
        self.emit(ev.OperatorMessage(at=T0, text=text))  # as the real agent does
        if text in self.script:
            result = self.script[text]()
            if asyncio.iscoroutine(result):
                await result
            return
        if text.startswith("/sh "):
            await self.shell(text[4:])
        elif text == "/probe":
            self.tool(
                "probe_devvm",
                {},
                "healthy: the devvm is up",
                ev.ProbeUpdated(at=T0, result=probe_ok()),
            )
        elif text in ("/status", "/forensics"):
            name = text[1:]
            result = verb(name, "running", "running")
            self.tool(
                "pve_verb",
                {"verb": name},
                "ok: the VM is running",
                ev.VerbCompleted(at=T0, result=result),
            )

    def step_boundary(self) -> None:
        """After a tool call of Claude's: take the operator's queued messages, as the real
        agent does (core.steering), emitting each as an operator message."""

        def deliver(text: str) -> str:
            self.emit(ev.OperatorMessage(at=T0, text=text))
            self.steered.append(text)
            return text

        steering_blocks(self.operator_queue, deliver)

    def tool(
        self,
        tool: str,
        params: dict[str, Any],
        summary: str,
        *between: ev.Event,
        manual: bool = True,
        mutating: bool = False,
        ok: bool = True,
        duration_s: float = 0.3,
    ) -> None:
        """One complete tool call: start, the events it causes, end."""
        call = self._id()
        self.emit(
            ev.ToolCallStarted(
                at=T0, call_id=call, tool=tool, input=params, mutating=mutating, manual=manual
            )
        )
        for event in between:
            self.emit(event)
        self.emit(
            ev.ToolCallEnded(
                at=T0, call_id=call, tool=tool, ok=ok, summary=summary, duration_s=duration_s
            )
        )
        if not manual:
            self.step_boundary()

    async def shell(self, command: str, output: str = "", *, hang: bool = False) -> None:
        call = self._id()
        self.emit(
            ev.ToolCallStarted(
                at=T0,
                call_id=call,
                tool="devvm_shell",
                input={"command": command},
                mutating=False,
                manual=True,
            )
        )
        try:
            if command.startswith("sleep") or hang:
                await asyncio.sleep(3600)
            self.emit(ev.ToolOutput(at=T0, call_id=call, chunk=OutputChunk("stdout", output)))
        except asyncio.CancelledError:
            self.cancelled += 1
            self.emit(
                ev.ToolCallEnded(
                    at=T0,
                    call_id=call,
                    tool="devvm_shell",
                    ok=False,
                    summary="cancelled",
                    duration_s=0.5,
                    cancelled=True,
                )
            )
            raise
        self.emit(
            ev.ToolCallEnded(
                at=T0,
                call_id=call,
                tool="devvm_shell",
                ok=True,
                summary=f"exit 0, {len(output)} B, 0.2 s",
                duration_s=0.2,
                exit_status=0,
            )
        )

    def answer_approval(self, request_id: str, approved: bool) -> bool:
        self.approvals.append((request_id, approved))
        return True

    async def close(self) -> None:
        self.closed = True


def probe_ok() -> ProbeResult:
    return ProbeResult(Reachability.HEALTHY, 0.12, "SSH works and a trivial command ran")


def verb(name: str, before: str, after: str, **kw: Any) -> VerbResult:
    return VerbResult(
        verb=name,
        ok=kw.pop("ok", True),
        exit_code=kw.pop("exit_code", 0),
        message=kw.pop("message", f"{name} done"),
        vmid=102,
        state_before=before,
        state_after=after,
        **kw,
    )


def fake_backend_factory(
    *,
    manual: bool = True,
    agents: list | None = None,
    lazy: bool = False,
    operator: str = "viktor",
    state_dir: Path | None = None,
):
    """A backend factory for BreakglassApp that builds a ScriptedAgent over FakeHosts; ``lazy``:
    the agent is built only when the tab drives (as the real backend does)."""

    async def factory(options: AppOptions, emit: Emit) -> Backend:
        hosts = FakeHosts()

        def make_agent(emit_to: Emit, **setup: Any) -> ScriptedAgent:
            agent = ScriptedAgent(emit_to, manual=manual)
            agent.setup = setup
            if lazy:  # as the real agent does when built (the snapshot tests' screens stay)
                emit_to(
                    ev.SessionStarted(
                        at=T0, session_id="s", operator=operator, lab=True, model=MODEL
                    )
                )
            if agents is not None:
                agents.append(agent)
            return agent

        agent = None if lazy else make_agent(emit)
        return Backend(
            agent=agent,
            hosts=hosts,
            keys="lab keys (in memory)",
            targets=f"lab · scenario {options.scenario}",
            operator=operator,
            model=MODEL,
            manual_reason="no ANTHROPIC_API_KEY set, slash commands only" if manual else None,
            closers=[agent.close, hosts.close] if agent is not None else [hosts.close],
            make_agent=make_agent if lazy else None,
            state_dir=state_dir,
        )

    return factory


DISK_FULL_DF = """Filesystem     Size  Used Avail Use% Mounted on
/dev/vda1       49G   49G     0 100% /
tmpfs          7.9G     0  7.9G   0% /dev/shm
"""


async def streamed_answer(agent: ScriptedAgent) -> None:
    """Claude diagnoses a full disk: streamed Markdown, a shell call, forensics, a reset."""
    emit = agent.emit
    emit(ev.AssistantTurnStarted(at=T0, turn_id="t1"))
    for piece in (
        "I'll check the ",
        "disk first — a **full root** ",
        "filesystem fits the symptoms.\n",
    ):
        emit(ev.AssistantTextDelta(at=T0, turn_id="t1", text=piece))
        await asyncio.sleep(0.01)  # the stream's pace: time passing, not a wait
    call = "toolu_1"
    emit(
        ev.ToolCallStarted(
            at=T0,
            call_id=call,
            tool="devvm_shell",
            input={"command": "df -h /"},
            mutating=False,
            manual=False,
        )
    )
    emit(ev.ToolOutput(at=T0, call_id=call, chunk=OutputChunk("stdout", DISK_FULL_DF)))
    emit(
        ev.ToolCallEnded(
            at=T0,
            call_id=call,
            tool="devvm_shell",
            ok=True,
            summary="exit 0, 180 B, 0.1 s",
            duration_s=0.1,
            exit_status=0,
        )
    )
    probes = [
        {"name": "proc_status", "status": "ok", "elapsed_s": 0.01, "bytes": 900},
        {"name": "qmp_query_status", "status": "timeout", "elapsed_s": 5.0, "bytes": 0},
        {"name": "screendump", "status": "error", "elapsed_s": 0.2, "bytes": 0},
    ]
    forensics = verb(
        "forensics",
        "running",
        "running",
        bundle_id="20261128T151200Z-forensics-a1b2c3",
        document={"probes": probes},
    )
    agent.tool(
        "pve_verb",
        {"verb": "forensics"},
        "ok: bundle 20261128T151200Z-forensics-a1b2c3",
        ev.VerbCompleted(at=T0 + 5, result=forensics),
        manual=False,
        duration_s=5.4,
    )
    reset = verb(
        "reset",
        "paused (io-error)",
        "running",
        bundle_id="20261128T151300Z-reset-d4e5f6",
        document={"probes": probes[:1]},
    )
    agent.tool(
        "pve_verb",
        {"verb": "reset"},
        "ok: reset, the VM is running again",
        ev.VerbCompleted(at=T0 + 65, result=reset),
        manual=False,
        mutating=True,
        duration_s=9.2,
    )
    emit(
        ev.AssistantTurnEnded(
            at=T0,
            turn_id="t1",
            stop_reason="tool_use",
            usage=ev.Usage(),
            total_usage=ev.Usage(input_tokens=5200, output_tokens=410, cost_usd=0.0218),
        )
    )
    emit(ev.AssistantTurnStarted(at=T0, turn_id="t2"))
    text = (
        "## What happened\n\n"
        "- `/` was **100 % full** (49G of 49G)\n"
        "- QMP did not answer within 5 s, so I took the forensics bundle and **reset** VM 102\n\n"
        "Next: `journalctl --vacuum-size=500M` once it is back.\n"
    )
    for i in range(0, len(text), 40):
        emit(ev.AssistantTextDelta(at=T0, turn_id="t2", text=text[i : i + 40]))
        await asyncio.sleep(0.01)  # the stream's pace: time passing, not a wait
    emit(
        ev.AssistantTurnEnded(
            at=T0,
            turn_id="t2",
            stop_reason="end_turn",
            usage=ev.Usage(),
            total_usage=ev.Usage(input_tokens=9800, output_tokens=760, cost_usd=0.0408),
        )
    )


async def api_fails_midturn(agent: ScriptedAgent) -> None:
    """The stream starts, then the API reports overloaded; the agent falls back to manual mode."""
    emit = agent.emit
    emit(ev.AssistantTurnStarted(at=T0, turn_id="t1"))
    emit(ev.AssistantTextDelta(at=T0, turn_id="t1", text="I will look at the dev"))
    await asyncio.sleep(0.01)  # the stream's pace: time passing, not a wait
    emit(
        ev.ApiError(
            at=T0,
            kind="overloaded",
            message="overloaded_error mid-stream (not retried)",
            will_retry=False,
        )
    )
    emit(
        ev.ModeChanged(
            at=T0,
            manual=True,
            reason="Claude API overloaded: manual mode. Slash commands work; a message retries.",
        )
    )
