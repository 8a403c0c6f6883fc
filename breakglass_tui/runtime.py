"""One wiring: where a console's targets, keys and records come from.

Both fronts use it — ``breakglass-tui`` in a terminal (``ui.backend``) and ``breakglass-serve``,
which prepares once what each tab's app process gets (``serve.backend``) — so neither imports
the lab, and the rules live in one place:

- **the lab or the real targets.** ``--lab`` chooses its devvm before a screen opens
  (:func:`choose_lab`: the real devvm where QEMU runs, else the sandbox, else none, with one
  sentence saying why) and starts it (:func:`wire_lab`); real targets come from the settings
  (:func:`wire_real`).
- **keys.** Real targets: from Vault into a private ssh-agent, or the operator's own ssh-agent
  (``hosts.keyagent``). The lab's keys are made in memory; a server puts them in a private
  ssh-agent, so its tabs drive the lab exactly as they would drive real targets.
- **the pinned-host-key rule.** A target without a pinned host key is refused, never trusted on
  first use; a host key from the Vault secret wins over ``BREAKGLASS_*_HOST_KEY``.
- **one key per target.** Each target is offered only its own key, named by fingerprint
  (docs/keys.md); a server hands each tab the fingerprints with the targets (:meth:`Wiring.env`).
- **records.** Real incidents live in the state directory; each ``--lab`` run keeps its records
  in a directory of its own under ``<state dir>/lab/`` (:func:`lab_run_dir`), so a lab console
  never resumes a real incident, a real one never a lab incident, and no lab console resumes an
  incident of an earlier lab, whose devvm is gone.

Light at import (``--help`` must be instant): the lab, asyncssh and hvac are imported when used.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breakglass_tui.lab.catalog import SCENARIOS, describe

if TYPE_CHECKING:
    from breakglass_tui.config import Settings
    from breakglass_tui.hosts.session import HostSession
    from breakglass_tui.hosts.types import SshTarget

__all__ = [
    "LAB_NOTE_VARIABLE",
    "SCENARIOS",
    "LabPlan",
    "Wiring",
    "choose_lab",
    "describe",
    "kill_lab_processes",
    "lab_run_dir",
    "pinned_targets",
    "prestart_devvm",
    "wire_lab",
    "wire_real",
]

Progress = Callable[[str], None]

# The one sentence about the lab a server's tabs show (why this devvm): set by the server in
# each tab's environment, read by the tab's wiring.
LAB_NOTE_VARIABLE = "BREAKGLASS_LAB_NOTE"
# The lab runs whose records are kept under <state dir>/lab/ (the oldest go at the next start).
LAB_RUNS_KEPT = 20


# -- the lab's devvm, chosen before a screen opens ------------------------------------------------
@dataclass(frozen=True)
class LabPlan:
    """Which devvm ``--lab`` rehearses on, and the one sentence to show about it."""

    devvm: str  # "guest" (the real devvm), "sandbox" or "none" (none can run here)
    note: str | None
    scenario: str


def choose_lab(
    scenario: str,
    devvm: str = "auto",
    *,
    progress: Progress | None = None,
    prepare: bool = True,
    stopper: Any = None,
) -> LabPlan:
    """Which devvm --lab rehearses on ("auto": the real devvm where QEMU runs, else the
    sandbox, else none; "guest" or "sandbox" to insist), decided before the screen opens. With
    ``prepare``, the real devvm's first run (the image built, a booted state saved: about a
    minute) happens here, its progress given to ``progress``, so the console then starts in
    seconds; if it fails, the sandbox stands in and the plan's note says why in one sentence.
    Without, the lab's start does it (a server, which logs its progress).

    The first run runs in a child process (lab.guest.plan's Preparation), so a hang-up or
    SIGTERM meanwhile (``stopper``, ui.stopping's) ends it at once, leaving no QEMU and no
    temporary directory: the plan returned then is "none" and the caller exits."""
    from breakglass_tui.lab.choice import choose_devvm

    say = progress or (lambda _line: None)
    choice = choose_devvm(scenario, devvm)
    if choice.devvm == "guest" and prepare:
        from breakglass_tui.lab.guest import plan

        if not plan.ready(choice.scenario):
            say("preparing the lab's devvm (first run)…")
            try:
                preparation = plan.Preparation(choice.scenario)
            except OSError as exc:  # no TMPDIR space: the sandbox may stand in
                return _fallback(scenario, f"The real devvm could not be prepared ({exc})")
            if stopper is not None:
                stopper.add_last_resort(preparation.kill)
            try:
                preparation.run(
                    say,
                    stopped=stopper.requested.is_set if stopper is not None else lambda: False,
                )
            except plan.PreparationStopped:
                return LabPlan("none", None, scenario)
            except plan.PreparationFailed as exc:  # shown in the console
                return _fallback(scenario, f"The real devvm could not be prepared ({exc})")
    return LabPlan(choice.devvm or "none", choice.note, choice.scenario)


def _fallback(scenario: str, reason: str) -> LabPlan:
    """The sandbox in place of the real devvm that could not be prepared (or none)."""
    from breakglass_tui.lab.choice import choose_devvm

    fallback = choose_devvm(scenario, "sandbox")
    if fallback.devvm is None:
        return LabPlan("none", f"{reason}; {fallback.note}", scenario)
    return LabPlan("sandbox", f"{reason}: this drill runs on a sandboxed shell.", fallback.scenario)


def prestart_devvm(scenario: str) -> Any:
    """Start restoring the real devvm now, while the console itself starts (its ``close()``
    ends it once the console has; ``kill_now()`` at the stop's hard deadline); pass it to
    :func:`wire_lab` as ``prestarted``."""
    from breakglass_tui.lab.guest.drill import prestart

    return prestart(scenario)


# -- records: real incidents and lab runs apart ----------------------------------------------------
def lab_run_dir(state_dir: Path) -> Path:
    """A new directory for this ``--lab`` run's records (audit log, incident, transcripts,
    bundles) under ``<state_dir>/lab/``: never the real incident's directory, never an earlier
    lab's. Only the newest :data:`LAB_RUNS_KEPT` runs are kept."""
    runs = Path(state_dir) / "lab"
    runs.mkdir(parents=True, exist_ok=True, mode=0o700)
    _prune_lab_runs(runs, keep=LAB_RUNS_KEPT - 1)
    while True:  # named by the time it starts (to the nanosecond), so names sort by age
        ns = time.time_ns()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 1_000_000_000))
        run = runs / f"{stamp}.{ns % 1_000_000_000:09d}Z-{os.getpid()}"
        try:
            run.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return run


_RUN_NAME = re.compile(r"\d{8}T\d{6}\.\d{9}Z-\d+")


def _prune_lab_runs(runs: Path, keep: int) -> None:
    """Remove the oldest lab runs beyond ``keep`` (only directories named as runs are)."""
    with contextlib.suppress(OSError):
        old = sorted(p for p in runs.iterdir() if p.is_dir() and _RUN_NAME.fullmatch(p.name))
        for run in old[: max(0, len(old) - keep)]:
            shutil.rmtree(run, ignore_errors=True)


# -- the wiring -----------------------------------------------------------------------------------
@dataclass
class Wiring:
    """The two targets, each pinned and bound to its own key, and what holds the keys."""

    devvm: SshTarget
    pve: SshTarget
    keys: str  # where the keys came from, for the header: "lab keys (in memory)", …
    targets: str  # for the header: "lab (real devvm) · scenario oom", "devvm … · pve …"
    is_lab: bool  # the targets are a lab's (this process's, or its server's)
    note: str | None = None  # the one sentence about the lab to show, if any
    lab: Any = None  # the lab.Lab this process started (None: real targets, or a server's lab)
    client_keys: list[Any] | None = field(default=None, repr=False)  # keys held in memory
    agent: Any = None  # the hosts.keyagent.KeyAgent holding the keys (None: in memory)
    loaded: Any = None  # hosts.keyagent.LoadedKeys, for real targets (reloadable)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)

    def host_session(self, settings: Settings) -> HostSession:
        """The hosts layer's session over these targets and keys."""
        from breakglass_tui.hosts.session import HostSession

        if self.agent is not None:
            return HostSession(
                self.devvm, self.pve, agent_path=self.agent.socket_path, settings=settings
            )
        return HostSession(self.devvm, self.pve, client_keys=self.client_keys, settings=settings)

    def env(self) -> dict[str, str]:
        """What a tab's app process needs to drive these targets: the two targets with their
        pinned host keys and key fingerprints, the ssh-agent's socket, whether they are a lab's,
        and the lab's sentence. The app's own wiring (:func:`wire_real`) reads it back."""
        if self.agent is None:
            raise RuntimeError("these keys are in memory: put them in an ssh-agent first")
        env = {
            **_target_env("DEVVM", self.devvm),
            **_target_env("PVE", self.pve),
            "SSH_AUTH_SOCK": self.agent.socket_path,
        }
        if self.is_lab:
            env["BREAKGLASS_TARGETS_ARE_LAB"] = "1"
        if self.note:
            env[LAB_NOTE_VARIABLE] = self.note
        return env

    async def reload(self, settings: Settings) -> bool:
        """Load the real targets' keys again (a key rotated in Vault) and keep each bound to its
        own target; True when a key changed. The lab's keys never change: False. On an error
        nothing changes and the error is raised."""
        if self.loaded is None:
            return False
        changed = await self.loaded.reload(settings)
        self.devvm, self.pve = pinned_targets(settings, self.loaded)
        return changed

    async def close(self) -> None:
        """Stop the ssh-agent and the lab, in that order; never raises."""
        closers, self.closers = self.closers, []
        for close in closers:
            with contextlib.suppress(Exception):
                await close()

    def kill_now(self) -> None:
        """Last resort at a stop's hard deadline (any thread, the loop may be stuck)."""
        if self.lab is not None:
            kill_lab_processes(self.lab)


def _target_env(prefix: str, target: SshTarget) -> dict[str, str]:
    env = {
        f"BREAKGLASS_{prefix}_HOST": target.host,
        f"BREAKGLASS_{prefix}_PORT": str(target.port),
        f"BREAKGLASS_{prefix}_USER": target.user,
    }
    if target.known_hosts:
        env[f"BREAKGLASS_{prefix}_HOST_KEY"] = target.known_hosts
    if target.key_fingerprint:
        env[f"BREAKGLASS_{prefix}_KEY_FINGERPRINT"] = target.key_fingerprint
    return env


async def wire_lab(
    scenario: str,
    devvm: str = "auto",
    *,
    progress: Progress | None = None,
    prestarted: Any = None,
    note: str | None = None,
    into_agent: bool = False,
) -> Wiring:
    """Start the lab behind ``--lab``: the devvm ``devvm`` names ("auto": the best one here;
    "guest", "sandbox", or "none": the lab without a devvm). ``note`` (the plan's sentence)
    wins over the lab's own. ``into_agent``: the lab's keys go into a private ssh-agent (a
    server, whose tabs are other processes); else they stay in this process's memory."""
    from breakglass_tui.lab.lab import start_lab

    extra = {"prestarted": prestarted} if prestarted is not None else {}
    lab = await start_lab(scenario, devvm=devvm, progress=progress, **extra)
    kind = "real devvm" if hasattr(lab, "image") else "sandbox devvm"
    wiring = Wiring(
        devvm=lab.devvm,
        pve=lab.pve,
        keys="lab keys (in memory)",
        targets=f"lab ({kind}) · scenario {lab.scenario}",
        is_lab=True,
        note=note or lab.note,
        lab=lab,
        client_keys=lab.client_keys,
        closers=[lab.close],
    )
    if into_agent:
        from breakglass_tui.hosts.keyagent import KeyAgent

        try:
            agent = await KeyAgent.start_private()
            wiring.closers.insert(0, agent.close)
            await agent.add_keys(lab.client_keys)
        except BaseException:
            await wiring.close()
            raise
        wiring.agent, wiring.client_keys, wiring.keys = agent, None, "lab keys (ssh-agent)"
    return wiring


async def wire_real(settings: Settings) -> Wiring:
    """The real targets of ``settings``: their keys loaded (Vault into a private ssh-agent, or
    the operator's ssh-agent), each target pinned and offered its own key. A tab of a server
    gets its targets, fingerprints and agent from the server (:meth:`Wiring.env`): the same."""
    from breakglass_tui.hosts.keyagent import load_keys

    _check_hosts(settings)
    loaded = await load_keys(settings)
    try:
        devvm, pve = pinned_targets(settings, loaded)
    except BaseException:
        with contextlib.suppress(Exception):
            await loaded.agent.close()
        raise
    return Wiring(
        devvm=devvm,
        pve=pve,
        keys=f"keys loaded ({loaded.source})",
        targets=f"devvm {devvm.host} · pve {pve.host}",
        is_lab=settings.targets_are_lab,
        note=os.environ.get(LAB_NOTE_VARIABLE) or None,
        agent=loaded.agent,
        loaded=loaded,
        closers=[loaded.agent.close],
    )


def _check_hosts(settings: Settings) -> None:
    from breakglass_tui.config import ConfigError

    for name in ("devvm", "pve"):
        if not getattr(settings, f"{name}_host"):
            raise ConfigError(
                f"BREAKGLASS_{name.upper()}_HOST is not set: give the {name}'s IP address"
                " (or run with --lab to rehearse on the lab)"
            )


def pinned_targets(settings: Settings, loaded: Any) -> tuple[SshTarget, SshTarget]:
    """The two real SSH targets, each bound to its own key (``loaded``: the hosts layer's
    ``LoadedKeys``). The pinned-host-key rule: a host key from Vault wins over the
    BREAKGLASS_*_HOST_KEY one, and a target with neither is refused (``ConfigError``)."""
    from breakglass_tui.config import ConfigError
    from breakglass_tui.hosts.types import SshTarget

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
            SshTarget(
                host=host, port=port, user=user, known_hosts=known, name=name, key_fingerprint=key
            )
        )
    return out[0], out[1]


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


def import_heavy(lab: bool) -> None:
    """Import what wiring and driving take (seconds: asyncssh, the agent), e.g. in a thread
    while the screen keeps answering keys."""
    import importlib

    modules = ["breakglass_tui.config", "breakglass_tui.hosts.session", "breakglass_tui.core.agent"]
    if lab:
        modules += ["breakglass_tui.lab.lab", "breakglass_tui.lab.guest.lab"]
    else:
        modules.append("breakglass_tui.hosts.keyagent")
    for name in modules:
        importlib.import_module(name)
