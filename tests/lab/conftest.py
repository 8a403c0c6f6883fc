"""Lab fixtures: labs and simulated devvms started per test (each in well under a second) and
always closed, so every test sees its scenario fresh."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import asyncssh
import pytest

from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import CommandOutcome, SshTarget
from breakglass_tui.lab.devvm_sim import DevvmSim
from breakglass_tui.lab.lab import Lab, start_lab
from tests.support.realparts import new_key, public_line


class SimDevvm:
    """A standalone simulated devvm (no Proxmox) with a client key and a DevvmShell on it."""

    def __init__(self, sim: DevvmSim, key: asyncssh.SSHKey, host_key: asyncssh.SSHKey) -> None:
        self.sim = sim
        self.key = key
        pub = public_line(host_key).split()
        self.target = SshTarget(
            "127.0.0.1", sim.port, sim.user, f"[127.0.0.1]:{sim.port} {pub[0]} {pub[1]}\n"
        )
        self.shell = DevvmShell(
            self.target, ConnectOptions(client_keys=[key], connect_timeout_s=3.0)
        )

    async def run(self, command: str, timeout_s: float = 10.0) -> CommandOutcome:
        return await self.shell.run(command, timeout_s=timeout_s)

    async def connect(self) -> asyncssh.SSHClientConnection:
        """A plain asyncssh connection (for what DevvmShell does not do: signals, closing)."""
        return await asyncssh.connect(
            "127.0.0.1",
            self.sim.port,
            username=self.sim.user,
            client_keys=[self.key],
            known_hosts=asyncssh.import_known_hosts(self.target.known_hosts or ""),
            config=None,
            connect_timeout=3,
        )


@pytest.fixture
async def devvm_factory() -> AsyncIterator[Callable[..., Awaitable[SimDevvm]]]:
    made: list[SimDevvm] = []

    async def make(scenario: str = "healthy", **kwargs: object) -> SimDevvm:
        key, host_key = new_key("lab-client"), new_key("lab-devvm-host")
        sim = DevvmSim(scenario, host_key=host_key, authorized_keys=[public_line(key)], **kwargs)  # type: ignore[arg-type]
        await sim.start()
        devvm = SimDevvm(sim, key, host_key)
        made.append(devvm)
        return devvm

    try:
        yield make
    finally:
        for devvm in made:
            await devvm.shell.close()
            await devvm.sim.close()


@pytest.fixture
async def lab_factory() -> AsyncIterator[Callable[..., Awaitable[Lab]]]:
    labs: list[Lab] = []

    async def make(scenario: str = "healthy", **kwargs: object) -> Lab:
        lab = await start_lab(scenario, **kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            await lab.close()
