"""The lab: a devvm and a PVE host on loopback, for ``breakglass-tui --lab`` and for the tests.

Two devvms, one shape (``devvm``, ``pve``, ``devvm_key``, ``pve_key``, ``client_keys``, ``sim``,
``scenario``, ``close()``), so the hosts layer, the breakglass agent and the app use either:

- the real devvm (:func:`~breakglass_tui.lab.guest.lab.start_real_lab`): a Debian guest under
  QEMU, restored from a saved state in seconds, every scenario real. What ``--lab`` rehearses on
  wherever QEMU is installed.
- the sandbox devvm (:func:`start_sandbox_lab`): this machine's userland in a bubblewrap sandbox
  behind a real sshd, ready in a fraction of a second, with the simulated Proxmox
  (:class:`~breakglass_tui.lab.sim_pve.SimPve`) as its PVE side. For fast tests, and for ``--lab``
  where QEMU is missing.

:func:`~breakglass_tui.lab.choice.choose_devvm` picks one for ``--lab`` (cheaply: no lab is
started) and says in one sentence what is missing when the real devvm cannot run;
:func:`start_lab` starts the one chosen.
Both labs generate every key in memory, pin every host key, listen on 127.0.0.1 only, and run the
real ``breakglass-verb`` as the PVE host's forced command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from breakglass_tui.hosts.types import SshTarget
from breakglass_tui.lab import loopback
from breakglass_tui.lab.catalog import SANDBOX_SCENARIOS, SCENARIOS
from breakglass_tui.lab.choice import LabChoice, choose_devvm
from breakglass_tui.lab.devvm_sim import DevvmSim
from breakglass_tui.lab.loopback import new_key, pinned_target, public_line
from breakglass_tui.lab.pve_host import VERB_PATH, LabPveHost
from breakglass_tui.lab.sandbox import SandboxDevvm
from breakglass_tui.lab.sim_pve import SimPve

__all__ = [
    "SCENARIOS",
    "Lab",
    "LabChoice",
    "choose_devvm",
    "start_lab",
    "start_lab_without_devvm",
    "start_sandbox_lab",
]

log = logging.getLogger(__name__)

SANDBOX_USER = "root"  # the sandbox has no sudo of its own (bubblewrap forbids new privileges)
PVE_USER = "root"


def _join_reaper(kvm_pid: int | None) -> None:
    """Wait for SimPve's reaper thread of the killed kvm: it marks the VM stopped in vm.json, and
    would otherwise write into the workdir after we removed it."""
    if kvm_pid is None:
        return
    for thread in threading.enumerate():
        if thread.name == f"sim-kvm-reaper-{kvm_pid}":
            thread.join(5)


@dataclass
class Lab:
    """A running sandbox lab. Close it with ``await lab.close()``."""

    devvm: SshTarget
    pve: SshTarget
    devvm_key: asyncssh.SSHKey = field(repr=False)
    pve_key: asyncssh.SSHKey = field(repr=False)
    sim: SimPve
    scenario: str
    sandbox: SandboxDevvm | None = field(repr=False)  # None: a lab without a devvm
    devvm_sim: DevvmSim | None = field(repr=False)
    pve_host: LabPveHost = field(repr=False)
    workdir: Path
    note: str | None = None  # what to tell the operator about this lab (one sentence)
    _own_workdir: bool = field(default=True, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def client_keys(self) -> list[asyncssh.SSHKey]:
        """Both private keys (devvm first), for a hosts layer without an ssh-agent."""
        return [self.devvm_key, self.pve_key]

    async def close(self) -> None:
        """Stop everything the lab started (the sandbox and the sim kvm, by PID) and remove its
        workdir."""
        if self._closed:
            return
        self._closed = True
        if self.devvm_sim is not None:
            with contextlib.suppress(Exception):
                await self.devvm_sim.close()
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                await self.sandbox.close()
        with contextlib.suppress(Exception):
            # Verbs running now have deadlines of their own; the lab does not wait long for them.
            await self.pve_host.close(grace_s=2.0)
        kvm = self.sim.kvm_pid()
        await asyncio.to_thread(self.sim.cleanup)
        await asyncio.to_thread(_join_reaper, kvm)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _lab_keys() -> tuple[asyncssh.SSHKey, asyncssh.SSHKey, asyncssh.SSHKey, asyncssh.SSHKey]:
    """A lab's four keys, made now (devvm and PVE user keys, their host keys); the verb must be
    there for the PVE host to run it."""
    if not VERB_PATH.exists():
        raise RuntimeError(f"the breakglass verb is missing at {VERB_PATH}: reinstall the package")
    devvm_key, pve_key, devvm_host_key, pve_host_key = (
        new_key(c)
        for c in (
            loopback.DEVVM_KEY,
            loopback.PVE_KEY,
            loopback.DEVVM_HOST_KEY,
            loopback.PVE_HOST_KEY,
        )
    )
    return devvm_key, pve_key, devvm_host_key, pve_host_key


async def start_sandbox_lab(
    scenario: str = "healthy",
    *,
    workdir: Path | None = None,
    boot_delay_s: float = 2.0,
    note: str | None = None,
) -> Lab:
    """Start the sandbox lab in `scenario` (one of SANDBOX_SCENARIOS). After a reset or cycle
    through the PVE host the devvm reboots and refuses connections for `boot_delay_s`.
    ``io-stall``: the simulated VM is paused by an I/O error; ``wedged``: its guest never
    answers. SandboxUnavailable when bubblewrap cannot run here."""
    if scenario not in SANDBOX_SCENARIOS:
        raise ValueError(
            f"the sandbox lab cannot stage {scenario!r}: choose one of"
            f" {', '.join(SANDBOX_SCENARIOS)} (the real devvm stages {', '.join(SCENARIOS)})"
        )
    devvm_key, pve_key, devvm_host_key, pve_host_key = _lab_keys()
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="breakglass-lab-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    sim: SimPve | None = None
    sandbox = SandboxDevvm(
        scenario, host_key=devvm_host_key, authorized_keys=[public_line(devvm_key)]
    )
    devvm_sim: DevvmSim | None = None
    pve_host: LabPveHost | None = None
    try:
        sim = await asyncio.to_thread(SimPve.create, root / "pve")
        await asyncio.to_thread(sim.start_vm)
        upstream = await sandbox.start()
        if scenario == "io-stall":
            await asyncio.to_thread(sim.set_faults, io_error_pause=True)
        devvm_sim = DevvmSim(
            upstream,
            wedged=scenario == "wedged",
            vm_json=sim.root / "vm.json",
            boot_delay_s=boot_delay_s,
            on_reboot=sandbox.reboot,
        )
        devvm_port = await devvm_sim.start()
        pve_host = LabPveHost()
        pve_port = await pve_host.start_verb(
            sim.verb_config_path, authorized_key=pve_key, host_key=pve_host_key
        )
    except BaseException:
        if devvm_sim is not None:
            await devvm_sim.close()
        await sandbox.close()
        if pve_host is not None:
            await pve_host.close(grace_s=0.5)
        if sim is not None:
            await asyncio.to_thread(sim.cleanup)
        if own:
            shutil.rmtree(root, ignore_errors=True)
        raise
    log.info(
        "sandbox lab %s: devvm on 127.0.0.1:%s, PVE host on 127.0.0.1:%s",
        scenario,
        devvm_port,
        pve_port,
    )
    return Lab(
        devvm=pinned_target(
            devvm_port, SANDBOX_USER, public_line(devvm_host_key), "devvm", devvm_key
        ),
        pve=pinned_target(pve_port, PVE_USER, public_line(pve_host_key), "pve", pve_key),
        devvm_key=devvm_key,
        pve_key=pve_key,
        sim=sim,
        scenario=scenario,
        sandbox=sandbox,
        devvm_sim=devvm_sim,
        pve_host=pve_host,
        workdir=root,
        note=note,
        _own_workdir=own,
    )


async def start_lab_without_devvm(
    scenario: str = "healthy", *, workdir: Path | None = None, note: str | None = None
) -> Lab:
    """Where no devvm can run (a read-only container without capabilities): the simulated
    Proxmox and the PVE host running the real verb, and a devvm address where nothing listens.
    The console opens, says why (`note`), and its verbs, audit and manual mode work."""
    devvm_key, pve_key, devvm_host_key, pve_host_key = _lab_keys()
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="breakglass-lab-")) if workdir is None else Path(workdir)
    sim: SimPve | None = None
    pve_host: LabPveHost | None = None
    try:
        sim = await asyncio.to_thread(SimPve.create, root / "pve")
        await asyncio.to_thread(sim.start_vm)
        pve_host = LabPveHost()
        pve_port = await pve_host.start_verb(
            sim.verb_config_path, authorized_key=pve_key, host_key=pve_host_key
        )
    except BaseException:
        if pve_host is not None:
            await pve_host.close(grace_s=0.5)
        if sim is not None:
            await asyncio.to_thread(sim.cleanup)
        if own:
            shutil.rmtree(root, ignore_errors=True)
        raise
    with contextlib.closing(socket.socket()) as s:  # a port nothing listens on: refused
        s.bind(("127.0.0.1", 0))
        devvm_port = s.getsockname()[1]
    return Lab(
        devvm=pinned_target(
            devvm_port, SANDBOX_USER, public_line(devvm_host_key), "devvm", devvm_key
        ),
        pve=pinned_target(pve_port, PVE_USER, public_line(pve_host_key), "pve", pve_key),
        devvm_key=devvm_key,
        pve_key=pve_key,
        sim=sim,
        scenario=scenario,
        sandbox=None,
        devvm_sim=None,
        pve_host=pve_host,
        workdir=root,
        note=note,
        _own_workdir=own,
    )


async def start_lab(
    scenario: str = "healthy",
    *,
    devvm: str = "auto",
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> Any:
    """Start a drill of `scenario` on the devvm :func:`choose_devvm` picks (or `devvm` names:
    "guest", "sandbox", or "none" for the lab without a devvm): a RealLab or a Lab, its ``note``
    holding the one sentence to show. Where no devvm can run, the lab without one, saying why.
    `options` go to the chosen lab's start function."""
    if devvm == "none":
        return await start_lab_without_devvm(scenario)
    choice = choose_devvm(scenario, devvm)
    if choice.devvm is None:
        return await start_lab_without_devvm(scenario, note=choice.note)
    if choice.devvm == "guest":
        from breakglass_tui.lab.guest.lab import start_real_lab

        lab = await start_real_lab(choice.scenario, progress=progress, **options)
        lab.note = choice.note
        return lab
    return await start_sandbox_lab(choice.scenario, note=choice.note, **options)
