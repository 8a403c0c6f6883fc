"""Wiring: builds the hosts session and the breakglass agent behind the app.

Nothing heavy is imported at module level: anthropic, asyncssh and hvac cost seconds and tens of
megabytes, and each browser tab is a new process, so the first frame is painted before a worker
calls :func:`build_backend`, which imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
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
    lab: Any = None  # the lab.Lab behind --lab (tests look at its processes)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    make_agent: AgentFactory | None = None  # None: ``agent`` was built with the backend
    state_dir: Path | None = None  # where the audit log is (the app writes its own lines there)

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
        if self.lab is not None:
            kill_lab_processes(self.lab)


def kill_lab_processes(lab: Any) -> None:
    """SIGKILL the processes a lab started (its kvm, verbs still running on its PVE host)."""
    pids: set[int] = set()
    sim = getattr(lab, "sim", None)
    with contextlib.suppress(Exception):
        pid = sim.kvm_pid() if sim is not None else None
        if pid:
            pids.add(int(pid))
    for owner, name in ((sim, "_children"), (getattr(lab, "pve_host", None), "_children")):
        children = getattr(owner, name, None) or ()
        with contextlib.suppress(Exception):
            pids.update(getattr(child, "pid", child) for child in list(children))
    for pid in pids:
        with contextlib.suppress(Exception):
            os.kill(int(pid), signal.SIGKILL)


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
    """Start the lab (``--lab``) or load the keys for the real targets, then build the
    ``HostSession``; the ``BreakglassAgent`` is built by :meth:`Backend.start_agent` once the tab
    knows it drives (``emit`` is the default for it)."""
    # Imported in a thread: asyncssh and the agent take a second or more, and the screen must
    # keep answering keys meanwhile (anthropic itself is imported by the agent, lazily).
    await asyncio.to_thread(_import_heavy, options.lab)
    from breakglass_tui.config import load_settings
    from breakglass_tui.core.agent import BreakglassAgent
    from breakglass_tui.hosts.session import HostSession

    settings = options.settings or load_settings()
    closers: list[Callable[[], Awaitable[None]]] = []
    lab = None
    try:
        if options.lab:
            lab = await _start_lab(options, emit)
            kind = "real devvm" if hasattr(lab, "image") else "sandbox devvm"
            targets = f"lab ({kind}) · scenario {lab.scenario}"
            closers.append(lab.close)
            hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys, settings=settings)
            keys = "lab keys (in memory)"
        else:
            from breakglass_tui.hosts.keyagent import load_keys
            from breakglass_tui.hosts.types import SshTarget

            loaded = await load_keys(settings)
            closers.append(loaded.agent.close)
            devvm, pve = real_targets(settings, loaded, SshTarget)
            hosts = HostSession(devvm, pve, agent_path=loaded.agent.socket_path, settings=settings)
            keys = f"keys loaded ({loaded.source})"
            targets = f"devvm {devvm.host} · pve {pve.host}"
            # A tab of `breakglass-serve --lab`: the server chose the lab's devvm, and says why.
            if os.environ.get("BREAKGLASS_LAB_NOTE"):
                from breakglass_tui.core.events import Notice

                emit(Notice(level="warning", text=os.environ["BREAKGLASS_LAB_NOTE"]))
        closers.insert(0, hosts.close)
    except BaseException:
        await _close_all(closers)
        raise

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
            lab=options.lab,
            session_id=session_id,
            conversation=conversation,
            save_conversation=save_conversation,
            history=history,
            incident_id=incident_id,
        )

    return Backend(
        agent=None,
        hosts=hosts,
        keys=keys,
        targets=targets,
        operator=settings.operator,
        model=settings.model,
        manual_reason=manual_reason(),
        lab=lab,
        closers=closers,
        make_agent=make_agent,
        state_dir=Path(settings.state_dir),
    )


async def _start_lab(options: AppOptions, emit: Emit) -> Any:
    """The lab behind --lab: the devvm options.devvm names (or the best one here; "none": the
    lab without a devvm, where none can run). Its one sentence (QEMU missing, a scenario the
    sandbox cannot stage, no devvm at all) and the first run's progress (the image built, a
    booted state saved) are said in the chat."""
    from breakglass_tui.core.events import Notice
    from breakglass_tui.lab.lab import start_lab

    loop = asyncio.get_running_loop()

    def progress(line: str) -> None:  # called from the build's thread too
        loop.call_soon_threadsafe(emit, Notice(level="info", text=f"lab: {line}"))

    extra = {"prestarted": options.lab_prestart} if options.lab_prestart is not None else {}
    lab = await start_lab(options.scenario, devvm=options.devvm, progress=progress, **extra)
    note = options.lab_note or lab.note
    if note:
        emit(Notice(level="warning", text=note))
    return lab


def _import_heavy(lab: bool) -> None:
    modules = ["breakglass_tui.config", "breakglass_tui.hosts.session", "breakglass_tui.core.agent"]
    if lab:
        modules += ["breakglass_tui.lab.lab", "breakglass_tui.lab.guest.lab"]
    else:
        modules.append("breakglass_tui.hosts.keyagent")
    for name in modules:
        importlib.import_module(name)


def real_targets(settings: Settings, loaded: Any, target_cls):
    """The two real SSH targets, each bound to its own key (``loaded``: the hosts layer's
    ``LoadedKeys``); host keys from Vault win over the BREAKGLASS_*_HOST_KEY ones."""
    from breakglass_tui.config import ConfigError

    out = []
    for name, host, port, user, known, key in (
        (
            "devvm",
            settings.devvm_host,
            settings.devvm_port,
            settings.devvm_user,
            loaded.devvm_known_hosts or settings.devvm_host_key,
            loaded.devvm_fingerprint,
        ),
        (
            "pve",
            settings.pve_host,
            settings.pve_port,
            settings.pve_user,
            loaded.pve_known_hosts or settings.pve_host_key,
            loaded.pve_fingerprint,
        ),
    ):
        if not host:
            raise ConfigError(f"BREAKGLASS_{name.upper()}_HOST is not set: give the IP address")
        if not known:
            raise ConfigError(
                f"no pinned host key for {name}: put it in the Vault secret"
                f" ({name}_known_hosts) or set BREAKGLASS_{name.upper()}_HOST_KEY"
            )
        out.append(
            target_cls(
                host=host, port=port, user=user, known_hosts=known, name=name, key_fingerprint=key
            )
        )
    return out[0], out[1]
