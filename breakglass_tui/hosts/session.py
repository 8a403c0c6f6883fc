"""HostSession: the one object the breakglass agent and the UI hold to reach the hosts.

It bundles the devvm shell, the reachability probe and the PVE client, built with the same keys
(an ssh-agent socket and/or in-memory keys) and the same timers (from Settings when given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncssh

from breakglass_tui.config import Settings
from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.pve import PveClient
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import (
    CommandOutcome,
    OutputChunk,
    ProbeResult,
    SshTarget,
    VerbResult,
)

PROBE_TIMEOUT_S = 5.0


class HostSession:
    """The devvm shell, the probe and the PVE verbs behind one object."""

    def __init__(
        self,
        devvm: SshTarget,
        pve: SshTarget,
        *,
        agent_path: str | None = None,
        client_keys: Sequence[asyncssh.SSHKey] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.devvm_target = devvm
        self.pve_target = pve
        timers: dict[str, Any] = {}
        default_timeout_s = 120.0
        pve_options: dict[str, Any] = {}
        if settings is not None:
            pve_options["cold_path_pointer"] = settings.cold_path_pointer
            timers = {
                "connect_timeout_s": settings.connect_timeout_s,
                "keepalive_interval_s": settings.keepalive_interval_s,
                "keepalive_count_max": settings.keepalive_count_max,
            }
            default_timeout_s = settings.command_timeout_s
        self.options = ConnectOptions(agent_path=agent_path, client_keys=client_keys, **timers)
        self.shell = DevvmShell(devvm, self.options, default_timeout_s=default_timeout_s)
        self.pve = PveClient(pve, self.options, **pve_options)

    async def run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        on_output: Callable[[OutputChunk], None] | None = None,
        keep_output: bool = True,
    ) -> CommandOutcome:
        """Run a command as root on the devvm (see :meth:`DevvmShell.run`)."""
        return await self.shell.run(
            command, timeout_s=timeout_s, on_output=on_output, keep_output=keep_output
        )

    async def probe(self) -> ProbeResult:
        """How reachable the devvm is (see :func:`probe_devvm`)."""
        return await probe_devvm(
            self.devvm_target,
            agent_path=self.options.agent_path,
            client_keys=self.options.client_keys,
            timeout_s=PROBE_TIMEOUT_S,
        )

    async def verb(self, name: str) -> VerbResult:
        """Run one forced-command verb on the PVE host (see :meth:`PveClient.verb`)."""
        return await self.pve.verb(name)

    async def bundle(self, bundle_id: str) -> dict[str, Any]:
        """Fetch a forensics bundle by id (see :meth:`PveClient.bundle`)."""
        return await self.pve.bundle(bundle_id)

    async def close(self) -> None:
        """Close both connections."""
        await self.shell.close()
        await self.pve.close()
