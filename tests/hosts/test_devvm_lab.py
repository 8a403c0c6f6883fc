"""The devvm shell and the probe against the lab's simulated devvm, scenario by scenario.

The simulated devvm unwraps the shell's leader script (hosts/devvm.py) and prints the
process-group marker like the real one, so what the breakglass agent sees in the lab is what it
sees on the real devvm.
"""

from __future__ import annotations

import asyncio

import pytest

from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending, Reachability, SshTarget
from breakglass_tui.lab import devvm_sim
from tests.support.realparts import new_key, public_line

KEY = new_key("breakglass-lab-devvm")
HOST_KEY = new_key("lab-devvm-host")


async def started(scenario: str):
    sim = devvm_sim.DevvmSim(scenario, host_key=HOST_KEY, authorized_keys=[public_line(KEY)])
    port = await sim.start()
    pub = public_line(HOST_KEY).split()
    target = SshTarget("127.0.0.1", port, "breakglass", f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return sim, target


@pytest.mark.parametrize("scenario", ["healthy", "disk-full", "oom", "stuck-service"])
async def test_ssh_works_in_the_soft_scenarios(scenario: str):
    sim, target = await started(scenario)
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=2.0))
    try:
        probe = await probe_devvm(target, client_keys=[KEY], timeout_s=3.0)
        assert probe.reachability is Reachability.HEALTHY, probe.message
        outcome = await shell.run("id; df -h /", timeout_s=5)
        assert outcome.ok and outcome.stdout.startswith("uid=0(root)"), outcome
        assert "breakglass-pgid" not in outcome.stdout
    finally:
        await shell.close()
        await sim.close()


async def test_the_wedged_guest_shows_no_banner_and_commands_fail_cleanly():
    sim, target = await started("wedged")
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=1.5))
    try:
        probe = await probe_devvm(target, client_keys=[KEY], timeout_s=2.0)
        assert probe.reachability is Reachability.NO_BANNER
        assert probe.elapsed_s < 2.5
        outcome = await shell.run("uptime")
        assert outcome.ending is Ending.FAILED and "no SSH banner" in outcome.message
    finally:
        await shell.close()
        await sim.close()


async def test_io_stall_commands_come_back_by_their_deadline():
    sim, target = await started("io-stall")
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=2.0))
    try:
        outcome = await shell.run("df -h /; sync", timeout_s=1.5)
        assert outcome.ending in (Ending.TIMED_OUT, Ending.EXITED)
        assert outcome.duration_s < 1.5 + 4
    finally:
        await shell.close()
        await sim.close()


async def test_cancel_stops_the_command_in_the_simulated_guest():
    sim, target = await started("healthy")
    shell = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=2.0))

    def sleeping() -> list[str]:
        return [p.command for p in sim.state.processes.values() if "sleep 100" in p.command]

    try:
        task = asyncio.create_task(shell.run("sleep 100"))
        for _ in range(100):
            if sleeping():
                break
            await asyncio.sleep(0.02)
        assert sleeping(), "the command never started in the simulated guest"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not sleeping():
                break
            await asyncio.sleep(0.02)
        assert sleeping() == []
    finally:
        await shell.close()
        await sim.close()
