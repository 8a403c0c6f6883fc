"""The screen's backend: the hosts session and the breakglass agent behind the app, over the
targets and keys ``runtime`` wires (the lab behind ``--lab``, else the real targets).

Nothing heavy is imported at module level: anthropic, asyncssh and hvac cost seconds and tens of
megabytes, and each browser tab is a new process, so the first frame is painted before a worker
calls :func:`build_backend`, which imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from breakglass_tui.core.events import Event

if TYPE_CHECKING:
    from breakglass_tui.config import Settings
    from breakglass_tui.core.steering import OperatorQueue

Emit = Callable[[Event], None]
Conversation = list[dict[str, Any]]


class AgentLike(Protocol):
    """What the UI needs of ``core.agent.BreakglassAgent``."""

    manual: bool
    operator_queue: OperatorQueue | None  # the tab's queue, read at each step boundary

    async def handle(self, text: str) -> None: ...

    def answer_approval(self, request_id: str, approved: bool) -> bool: ...

    async def close(self) -> None: ...


class HostsLike(Protocol):
    """What the UI needs of ``hosts.session.HostSession``."""

    async def bundle(self, bundle_id: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class AgentFactory(Protocol):
    """Builds the breakglass agent for a tab that drives (at start, or on taking over)."""

    def __call__(
        self,
        emit: Emit,
        *,
        session_id: str,
        conversation: Conversation | None,
        save_conversation: Callable[[Conversation], None] | None,
        history: list[Event] | None = None,
        incident_id: str | None = None,
    ) -> AgentLike: ...


@dataclass(frozen=True)
class AppOptions:
    """How ``breakglass-tui`` was started."""

    lab: bool = True
    scenario: str = "healthy"
    settings: Settings | None = None  # real targets: validated by the CLI before the app starts
    # With --lab, the devvm: "auto" (the real devvm where QEMU runs, else the sandbox), "guest",
    # "sandbox", or "none" (none can run here: lab_note says why, and the console opens anyway).
    devvm: str = "auto"
    lab_note: str | None = None  # one sentence about the lab to show in the chat
    # With devvm "guest": the devvm the command line already started restoring (lab.guest.drill
    # Prestart), adopted by the lab so the console is ready sooner.
    lab_prestart: Any = None
    # Where the incident store lives (one incident, many tabs); None: no incident is kept (the
    # UI's own tests, the benchmark).
    incident_dir: Path | None = None


@dataclass
class Backend:
    """The objects behind the screen, and how to put them away."""

    agent: AgentLike | None  # None until this tab drives (built by make_agent)
    hosts: HostsLike
    keys: str  # where the SSH keys came from, for the header: "lab (in memory)", "vault", ...
    targets: str  # "lab" or "devvm 10.0.0.5 · pve 10.0.0.2"
    operator: str
    model: str
    manual_reason: str | None = None
    wiring: Any = None  # runtime.Wiring: the targets, their keys, and the lab behind --lab
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    make_agent: AgentFactory | None = None  # None: ``agent`` was built with the backend
    state_dir: Path | None = None  # where the audit log is (the app writes its own lines there)

    @property
    def lab(self) -> Any:
        """The lab.Lab this console started (``--lab``), or None."""
        return self.wiring.lab if self.wiring is not None else None

    def start_agent(
        self,
        emit: Emit,
        *,
        session_id: str,
        conversation: Conversation | None = None,
        save_conversation: Callable[[Conversation], None] | None = None,
        history: list[Event] | None = None,
        incident_id: str | None = None,
    ) -> AgentLike:
        """The breakglass agent for a driving tab: built now (from a saved conversation and the
        incident's journal when resuming or taking over, so /report covers the whole incident),
        or the one the backend came with."""
        if self.agent is not None:
            return self.agent
        if self.make_agent is None:
            raise RuntimeError("this backend has no breakglass agent to start")
        agent = self.make_agent(
            emit,
            session_id=session_id,
            conversation=conversation,
            save_conversation=save_conversation,
            history=history,
            incident_id=incident_id,
        )
        self.agent = agent
        self.closers.insert(0, agent.close)  # the agent closes before the hosts it uses
        return agent

    async def drop_agent(self, timeout_s: float = 10.0) -> None:
        """Close the agent (this tab no longer drives); the hosts stay. Never raises."""
        agent, self.agent = self.agent, None
        if agent is None:
            return
        with contextlib.suppress(ValueError):
            self.closers.remove(agent.close)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.close(), timeout=timeout_s)

    async def close(self) -> None:
        """Close agent, sessions, lab and key agent, in that order; never raises."""
        closers, self.closers = self.closers, []
        await _close_all(closers)

    def kill_now(self) -> None:
        """Last resort at the stop's hard deadline (any thread, the loop may be stuck): kill the
        lab's processes by PID. Real targets leave nothing to kill: the private ssh-agent's
        keeper ends it when this process is gone."""
        if self.wiring is not None:
            self.wiring.kill_now()


async def _close_all(closers: list[Callable[[], Awaitable[None]]]) -> None:
    for close in closers:
        # Best effort: one failing close must not leave the lab's processes behind.
        with contextlib.suppress(Exception):
            await close()


def manual_reason() -> str | None:
    """Why the breakglass agent will be in manual mode, or None when Claude is available."""
    if not os.environ.get("ANTHROPIC_API_KEY"):
        return "no ANTHROPIC_API_KEY set, slash commands only"
    return None


async def build_backend(options: AppOptions, emit: Emit) -> Backend:
    """Wire the targets (``runtime``: the lab behind ``--lab``, else the real targets with their
    keys), then build the ``HostSession``; the ``BreakglassAgent`` is built by
    :meth:`Backend.start_agent` once the tab knows it drives (``emit`` is the default for it)."""
    from breakglass_tui import runtime

    # Imported in a thread: asyncssh and the agent take a second or more, and the screen must
    # keep answering keys meanwhile (anthropic itself is imported by the agent, lazily).
    await asyncio.to_thread(runtime.import_heavy, options.lab)
    from breakglass_tui.config import load_settings
    from breakglass_tui.core.agent import BreakglassAgent
    from breakglass_tui.core.events import Notice

    settings = options.settings or load_settings()
    if options.lab:
        loop = asyncio.get_running_loop()

        def progress(line: str) -> None:  # called from the build's thread too
            loop.call_soon_threadsafe(emit, Notice(level="info", text=f"lab: {line}"))

        wiring = await runtime.wire_lab(
            options.scenario,
            options.devvm,
            progress=progress,
            prestarted=options.lab_prestart,
            note=options.lab_note,
        )
    else:
        wiring = await runtime.wire_real(settings)
    # The one sentence about the lab (QEMU missing, a scenario the sandbox cannot stage, no
    # devvm at all; in a tab of `breakglass-serve --lab`, the server's), said in the chat.
    if wiring.note:
        emit(Notice(level="warning", text=wiring.note))
    closers: list[Callable[[], Awaitable[None]]] = [wiring.close]
    try:
        hosts = wiring.host_session(settings)
    except BaseException:
        await _close_all(closers)
        raise
    closers.insert(0, hosts.close)

    def make_agent(
        emit_to: Emit,
        *,
        session_id: str,
        conversation: Conversation | None,
        save_conversation: Callable[[Conversation], None] | None,
        history: list[Event] | None = None,
        incident_id: str | None = None,
    ) -> AgentLike:
        return BreakglassAgent(
            settings,
            hosts,
            emit=emit_to,
            operator=settings.operator,
            lab=wiring.is_lab,  # a server's lab tab too: its audit says lab=true
            session_id=session_id,
            conversation=conversation,
            save_conversation=save_conversation,
            history=history,
            incident_id=incident_id,
        )

    return Backend(
        agent=None,
        hosts=hosts,
        keys=wiring.keys,
        targets=wiring.targets,
        operator=settings.operator,
        model=settings.model,
        manual_reason=manual_reason(),
        wiring=wiring,
        closers=closers,
        make_agent=make_agent,
        state_dir=Path(settings.state_dir),
    )
