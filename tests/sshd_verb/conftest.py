"""Two PVE SSH hosts in front of one simulated Proxmox: a real OpenSSH sshd with the
``command="…",restrict`` line, and the lab's LabPveHost. Each has two keys: one forced to the
real breakglass-verb, one forced to a script that prints what arrived in SSH_ORIGINAL_COMMAND
(to prove the bytes arrive verbatim, independently of the verb)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio

from breakglass_tui.lab.pve_host import LabPveHost
from breakglass_tui.lab.sim_pve import SimPve
from tests.support.realparts import new_key, public_line, start_sshd
from tests.verb.conftest import PROXMOX_TIMINGS, VERB_PATH

VERB_FILE = VERB_PATH  # BREAKGLASS_VERB_UNDER_TEST can point it at another copy
ECHO_MARK = "<unset>"


@dataclass
class PveEndpoint:
    """One way in to the PVE host: where, its pinned host key, and the two client keys (the
    echo key may be served on its own port)."""

    name: str
    port: int
    known_hosts: str
    verb_key: asyncssh.SSHKey
    echo_key: asyncssh.SSHKey
    echo_port: int
    echo_known_hosts: str

    async def connect(self, *, echo: bool = False) -> asyncssh.SSHClientConnection:
        """A connection with the verb key (or the echo key), host key pinned, no ssh config."""
        return await asyncssh.connect(
            "127.0.0.1",
            self.echo_port if echo else self.port,
            username="root",
            client_keys=[self.echo_key if echo else self.verb_key],
            known_hosts=asyncssh.import_known_hosts(
                self.echo_known_hosts if echo else self.known_hosts
            ),
            config=None,
            agent_path=None,
            connect_timeout=10,
        )


@pytest.fixture(scope="session")
def verb_sim() -> Iterator[SimPve]:
    """The simulated Proxmox both hosts drive, VM running, with a budget loose enough for the
    module's mutating verbs (the budget itself is tested in tests/verb)."""
    root = Path(tempfile.mkdtemp(prefix="bg-sshdverb-"))
    sim = SimPve.create(root / "pve", budget={"max_mutating_per_hour": 1000, "cooldown_s": 0})
    sim.set_faults(**PROXMOX_TIMINGS)
    try:
        sim.start_vm()
        yield sim
    finally:
        sim.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _wrappers(sim: SimPve) -> tuple[Path, Path]:
    """sshd does not pass the test's environment on: small scripts carry what the command needs."""
    verb = sim.root / "verb-forced.sh"
    verb.write_text(
        "#!/bin/sh\n"
        f"BREAKGLASS_VERB_CONFIG={sim.verb_config_path}\n"
        "export BREAKGLASS_VERB_CONFIG\n"
        f'exec {sys.executable} {VERB_FILE} "$@"\n'
    )
    echo = sim.root / "echo-forced.sh"
    echo.write_text(f"#!/bin/sh\nprintf '%s' \"${{SSH_ORIGINAL_COMMAND-{ECHO_MARK}}}\"\n")
    for script in (verb, echo):
        script.chmod(0o755)
    return verb, echo


@pytest.fixture(scope="session")
def openssh_pve(verb_sim: SimPve) -> Iterator[PveEndpoint]:
    """A real OpenSSH sshd on loopback, configured as the PVE host would be."""
    verb_key, echo_key = new_key("verb"), new_key("echo")
    verb, echo = _wrappers(verb_sim)
    authorized = (
        f'command="{verb}",restrict {public_line(verb_key)}\n'
        f'command="{echo}",restrict {public_line(echo_key)}\n'
    )
    # The stock Debian Subsystem line: sshd routes it to the forced command anyway.
    sshd = start_sshd(authorized, "Subsystem sftp /usr/lib/openssh/sftp-server\n")
    try:
        yield PveEndpoint(
            "openssh", sshd.port, sshd.known_hosts, verb_key, echo_key, sshd.port, sshd.known_hosts
        )
    finally:
        sshd.close()


@pytest_asyncio.fixture(scope="session")
async def lab_pve(verb_sim: SimPve) -> AsyncIterator[PveEndpoint]:
    """The lab's PVE host (asyncssh), one server per key as each has its own forced command."""
    verb_key, echo_key = new_key("verb"), new_key("echo")
    host_key = new_key("lab-pve-host")
    _, echo = _wrappers(verb_sim)
    verb_host, echo_host = LabPveHost(), LabPveHost()
    port = await verb_host.start(
        verb_argv=[sys.executable, str(VERB_FILE)],
        verb_env={"BREAKGLASS_VERB_CONFIG": str(verb_sim.verb_config_path)},
        authorized_key=public_line(verb_key),
        host_key=host_key,
    )
    echo_port = await echo_host.start(
        verb_argv=[str(echo)], verb_env={}, authorized_key=public_line(echo_key), host_key=host_key
    )
    pub = public_line(host_key)
    endpoint = PveEndpoint(
        "lab",
        port,
        f"[127.0.0.1]:{port} {pub}\n",
        verb_key,
        echo_key,
        echo_port,
        f"[127.0.0.1]:{echo_port} {pub}\n",
    )
    try:
        yield endpoint
    finally:
        await verb_host.close()
        await echo_host.close()
