"""The lab: a simulated devvm and a simulated PVE host on loopback, for `breakglass-tui --lab` and
for tests.

:func:`start_lab` generates every key in memory (the devvm login key, the PVE key, both host
keys), lays out a :class:`~breakglass_tui.lab.sim_pve.SimPve` in a temporary workdir and starts
its VM, starts the simulated devvm (:class:`~breakglass_tui.lab.devvm_sim.DevvmSim`, following
the VM's state) and the lab PVE host running the real ``breakglass-verb`` as its forced command.
The returned :class:`Lab` carries the two :class:`SshTarget` (host keys pinned) and the keys.

The devvm's login user is ``breakglass`` (the production default), not root: the hosts layer then
uses ``sudo -n``, as it will on the real devvm, and the lab's shell grants it (NOPASSWD).
The PVE user is ``root``, as on a Proxmox host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from breakglass_tui.hosts.types import SshTarget
from breakglass_tui.lab import loopback
from breakglass_tui.lab.devvm_sim import DevvmSim
from breakglass_tui.lab.loopback import new_key, pinned_target, public_line
from breakglass_tui.lab.pve_host import VERB_PATH, LabPveHost
from breakglass_tui.lab.scenarios import SCENARIOS
from breakglass_tui.lab.sim_pve import SimPve

__all__ = ["SCENARIOS", "Lab", "start_lab"]

log = logging.getLogger(__name__)

DEVVM_USER = "breakglass"
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
    """A running lab. Close it with ``await lab.close()``."""

    devvm: SshTarget
    pve: SshTarget
    devvm_key: asyncssh.SSHKey = field(repr=False)
    pve_key: asyncssh.SSHKey = field(repr=False)
    sim: SimPve
    scenario: str
    devvm_sim: DevvmSim = field(repr=False)
    pve_host: LabPveHost = field(repr=False)
    workdir: Path
    _own_workdir: bool = field(default=True, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def client_keys(self) -> list[asyncssh.SSHKey]:
        """Both private keys (devvm first), for a hosts layer without an ssh-agent."""
        return [self.devvm_key, self.pve_key]

    async def close(self) -> None:
        """Stop everything the lab started (sim kvm processes by PID) and remove its workdir."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.devvm_sim.close()
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


async def start_lab(
    scenario: str = "healthy", *, workdir: Path | None = None, boot_delay_s: float = 2.0
) -> Lab:
    """Start the lab in `scenario` (one of SCENARIOS). After a reset/cycle through the PVE host
    the devvm refuses connections for `boot_delay_s` (booting), then comes back rebooted."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown lab scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
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
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="breakglass-lab-")) if workdir is None else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    sim: SimPve | None = None
    devvm_sim: DevvmSim | None = None
    pve_host: LabPveHost | None = None
    try:
        sim = await asyncio.to_thread(SimPve.create, root / "pve")
        await asyncio.to_thread(sim.start_vm)
        devvm_sim = DevvmSim(
            scenario,
            host_key=devvm_host_key,
            authorized_keys=[public_line(devvm_key)],
            user=DEVVM_USER,
            vm_json=sim.root / "vm.json",
            boot_delay_s=boot_delay_s,
        )
        devvm_port = await devvm_sim.start()
        pve_host = LabPveHost()
        pve_port = await pve_host.start_verb(
            sim.verb_config_path, authorized_key=pve_key, host_key=pve_host_key
        )
    except BaseException:
        if devvm_sim is not None:
            await devvm_sim.close()
        if pve_host is not None:
            await pve_host.close(grace_s=0.5)
        if sim is not None:
            await asyncio.to_thread(sim.cleanup)
        if own:
            shutil.rmtree(root, ignore_errors=True)
        raise
    log.info(
        "lab %s: devvm on 127.0.0.1:%s, PVE host on 127.0.0.1:%s", scenario, devvm_port, pve_port
    )
    return Lab(
        devvm=pinned_target(
            devvm_port, DEVVM_USER, public_line(devvm_host_key), "devvm", devvm_key
        ),
        pve=pinned_target(pve_port, PVE_USER, public_line(pve_host_key), "pve", pve_key),
        devvm_key=devvm_key,
        pve_key=pve_key,
        sim=sim,
        scenario=scenario,
        devvm_sim=devvm_sim,
        pve_host=pve_host,
        workdir=root,
        _own_workdir=own,
    )
