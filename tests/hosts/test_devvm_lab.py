"""The devvm shell and the probe against the lab's sandbox devvm: a real sshd and real commands
behind the lab's port, which shows a wedged or a paused guest as the network would.

What the breakglass agent sees in the lab is what it sees on a real devvm: the shell's wrapper,
its process-group marker and its stop mechanism run against OpenSSH, not an imitation of it.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from breakglass_tui.hosts.devvm import STOP_CLOSE_WAIT_S, DevvmShell
from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending, Reachability, SshTarget
from breakglass_tui.lab.devvm_sim import DevvmSim
from breakglass_tui.lab.loopback import pinned_target
from breakglass_tui.lab.sandbox import SandboxDevvm
from tests.support.realparts import new_key, public_line
from tests.support.waiting import until

KEY = new_key("breakglass-lab-devvm")
HOST_KEY = new_key("lab-devvm-host")


async def started(scenario: str, **port: object) -> tuple[SandboxDevvm, DevvmSim, SshTarget]:
    sandbox = SandboxDevvm(
        "healthy" if scenario == "wedged" else scenario,
        host_key=HOST_KEY,
        authorized_keys=[public_line(KEY)],
    )
    upstream = await sandbox.start()
    sim = DevvmSim(upstream, wedged=scenario == "wedged", **port)  # type: ignore[arg-type]
    await sim.start()
    return sandbox, sim, pinned_target(sim.port, "root", public_line(HOST_KEY), "devvm")


async def stopped(sandbox: SandboxDevvm, sim: DevvmSim, shell: DevvmShell) -> None:
    await shell.close()
    await sim.close()
    await sandbox.close()


@pytest.mark.parametrize("scenario", ["healthy", "disk-full", "deleted-open"])
async def test_ssh_works_in_the_soft_scenarios(scenario: str):
    sandbox, sim, target = await started(scenario)
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    try:
        probe = await probe_devvm(target, client_keys=[KEY], timeout_s=3.0)
        assert probe.reachability is Reachability.HEALTHY, probe.message
        outcome = await shell.run("id; df -h /data", timeout_s=5)
        assert outcome.ok and outcome.stdout.startswith("uid=0(root)"), outcome
        assert "breakglass-pgid" not in outcome.stdout  # the marker line is the shell's own
    finally:
        await stopped(sandbox, sim, shell)


async def test_the_wedged_guest_shows_no_banner_and_commands_fail_cleanly():
    sandbox, sim, target = await started("wedged")
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=1.5))
    try:
        probe = await probe_devvm(target, client_keys=[KEY], timeout_s=2.0)
        assert probe.reachability is Reachability.NO_BANNER
        assert probe.elapsed_s < 2.5
        outcome = await shell.run("uptime")
        assert outcome.ending is Ending.FAILED and "no SSH banner" in outcome.message
    finally:
        await stopped(sandbox, sim, shell)


@pytest.mark.slow
async def test_commands_on_a_paused_guest_come_back_by_their_deadline(tmp_path):
    vm_json = tmp_path / "vm.json"
    vm = {"vmid": 102, "status": "running", "qmp_status": "running", "boot_id": 1}
    vm_json.write_text(json.dumps({**vm, "booted_at": time.time()}))
    sandbox, sim, target = await started("healthy", vm_json=vm_json, poll_s=0.05)
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=2.0))
    try:
        assert (await shell.run("true")).ok  # connected before the pause
        vm_json.write_text(json.dumps({**vm, "qmp_status": "io-error", "booted_at": time.time()}))
        await sim.wait_for_mode("no_banner", 3)
        started_at = time.monotonic()
        outcome = await shell.run("df -h /data", timeout_s=1.5)
        assert outcome.ending in (Ending.TIMED_OUT, Ending.FAILED), outcome
        assert "probe it" in outcome.message or "stopped" in outcome.message, outcome.message
        # Back by the deadline plus the stop's own bounded wait on a connection that no longer
        # answers (the paused guest holds it, as QEMU's network does): never hung.
        assert time.monotonic() - started_at < 1.5 + STOP_CLOSE_WAIT_S + 20
    finally:
        await stopped(sandbox, sim, shell)


async def test_cancel_stops_the_command_in_the_sandbox():
    sandbox, sim, target = await started("healthy")
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=2.0))
    watcher = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=2.0))

    async def sleeping() -> bool:
        return "sleep 100" in (await watcher.run("ps -eo args", timeout_s=5)).stdout

    try:

        async def gone() -> bool:
            return not await sleeping()

        task = asyncio.create_task(shell.run("sleep 100"))
        await until(sleeping, what="the command started in the sandbox")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(gone, what="the command gone from the sandbox")
    finally:
        await watcher.close()
        await stopped(sandbox, sim, shell)
