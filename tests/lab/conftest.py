"""Sandbox lab fixtures: sandbox devvms and sandbox labs started per test (each in a fraction of a
second) and always closed, so every test sees its scenario fresh."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncssh
import pytest

from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import CommandOutcome, SshTarget
from breakglass_tui.lab.devvm_sim import DevvmSim
from breakglass_tui.lab.lab import Lab, start_sandbox_lab
from breakglass_tui.lab.loopback import pinned_target
from breakglass_tui.lab.sandbox import SandboxDevvm
from tests.support.realparts import new_key, public_line


class Devvm:
    """A sandbox devvm behind its port (no Proxmox), a client key and a DevvmShell on it."""

    def __init__(
        self, sandbox: SandboxDevvm, sim: DevvmSim, key: asyncssh.SSHKey, host_key: asyncssh.SSHKey
    ) -> None:
        self.sandbox = sandbox
        self.sim = sim
        self.key = key
        self.target: SshTarget = pinned_target(sim.port, "root", public_line(host_key), "devvm")
        self.shell = DevvmShell(self.target, ConnectOptions(client_keys=[key], connect_timeout_s=3))

    async def run(self, command: str, timeout_s: float = 10.0) -> CommandOutcome:
        return await self.shell.run(command, timeout_s=timeout_s)

    async def connect(self, user: str = "root") -> asyncssh.SSHClientConnection:
        """A plain asyncssh connection (for what DevvmShell does not do)."""
        return await asyncssh.connect(
            "127.0.0.1",
            self.sim.port,
            username=user,
            client_keys=[self.key],
            known_hosts=asyncssh.import_known_hosts(self.target.known_hosts or ""),
            config=None,
            connect_timeout=5,
        )


@pytest.fixture
async def devvm_factory() -> AsyncIterator[Callable[..., Awaitable[Devvm]]]:
    made: list[Devvm] = []

    async def make(
        scenario: str = "healthy", *, vm_json: Path | None = None, **kwargs: object
    ) -> Devvm:
        key, host_key = new_key("lab-client"), new_key("lab-devvm-host")
        sandbox = SandboxDevvm(
            "healthy" if scenario == "wedged" else scenario,
            host_key=host_key,
            authorized_keys=[public_line(key)],
        )
        upstream = await sandbox.start()
        sim = DevvmSim(
            upstream,
            wedged=scenario == "wedged",
            vm_json=vm_json,
            on_reboot=sandbox.reboot,
            **kwargs,  # type: ignore[arg-type]
        )
        await sim.start()
        devvm = Devvm(sandbox, sim, key, host_key)
        made.append(devvm)
        return devvm

    try:
        yield make
    finally:
        for devvm in made:
            await devvm.shell.close()
            await devvm.sim.close()
            await devvm.sandbox.close()


@pytest.fixture
async def lab_factory() -> AsyncIterator[Callable[..., Awaitable[Lab]]]:
    labs: list[Lab] = []

    async def make(scenario: str = "healthy", **kwargs: object) -> Lab:
        lab = await start_sandbox_lab(scenario, **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            await lab.close()
