"""The probe's classification of each scenario, the devvm following the simulated VM's state,
and the wedged lab recovered end to end through the PVE host's real breakglass-verb."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.pve import PveClient
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending, Reachability
from breakglass_tui.lab.devvm_sim import DevvmSim

# What the breakglass agent's first question answers for each scenario. The guest in io-stall
# still logs in and answers `uptime` (slowly, load 38): the probe says healthy, and the load
# average in its message and the commands that hang tell the rest, as on a real stalled guest.
EXPECTED = {
    "healthy": Reachability.HEALTHY,
    "disk-full": Reachability.HEALTHY,
    "oom": Reachability.HEALTHY,
    "stuck-service": Reachability.HEALTHY,
    "wedged": Reachability.NO_BANNER,
    "io-stall": Reachability.HEALTHY,
}


@pytest.mark.parametrize("scenario", list(EXPECTED))
async def test_probe_classifies_each_scenario(devvm_factory, scenario):
    devvm = await devvm_factory(scenario, io_delay_s=0.3)
    result = await probe_devvm(devvm.target, client_keys=[devvm.key], timeout_s=1.5)
    assert result.reachability is EXPECTED[scenario], result
    if scenario == "io-stall":
        assert "load average: 38.12" in result.message
    if scenario == "wedged":
        assert result.banner is None
    else:
        assert result.banner == "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"


def _write_vm(path, **vm) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"vmid": 102, **vm}))
    tmp.replace(path)


async def test_devvm_follows_the_vm_state(devvm_factory, tmp_path):
    vm_json = tmp_path / "vm.json"
    _write_vm(vm_json, status="running", qmp_status="running", boot_id=1, booted_at=time.time())
    devvm = await devvm_factory("oom", vm_json=vm_json, boot_delay_s=0.6, poll_s=0.05)
    sim: DevvmSim = devvm.sim
    assert sim.mode == "ssh"  # the first boot counts as done: the lab is usable at once
    assert (await devvm.run("pgrep memhog")).stdout == "3187\n"
    running = asyncio.create_task(devvm.run("sleep 30", timeout_s=20))
    await asyncio.sleep(0.2)

    _write_vm(vm_json, status="running", qmp_status="io-error", boot_id=1, booted_at=time.time())
    await sim.wait_for_mode("no_banner", 3)
    # The paused guest's sessions die with it: the running command's outcome says so.
    assert (await asyncio.wait_for(running, 5)).ending is Ending.DISCONNECTED
    probe = await probe_devvm(devvm.target, client_keys=[devvm.key], timeout_s=1.0)
    assert probe.reachability is Reachability.NO_BANNER

    _write_vm(vm_json, status="stopped", qmp_status="prelaunch", boot_id=1, booted_at=0.0)
    await sim.wait_for_mode("refused", 3)
    probe = await probe_devvm(devvm.target, client_keys=[devvm.key], timeout_s=1.0)
    assert probe.reachability is Reachability.REFUSED

    started = time.monotonic()
    _write_vm(vm_json, status="running", qmp_status="running", boot_id=2, booted_at=time.time())
    await sim.wait_for_mode("ssh", 5)
    assert time.monotonic() - started >= 0.5  # refused while booting
    assert sim.boot_id == 2
    out = await devvm.run("pgrep memhog; uptime")
    assert out.exit_status == 0 and "3187" not in out.stdout  # the reboot cleared the memhog
    assert " up 0 min," in out.stdout


@pytest.mark.slow
async def test_wedged_lab_recovered_end_to_end_with_reset(lab_factory):
    started = time.monotonic()
    lab = await lab_factory("wedged", boot_delay_s=1.0)
    assert time.monotonic() - started < 2.0  # start_lab is fast
    probe = await probe_devvm(lab.devvm, client_keys=[lab.devvm_key], timeout_s=1.0)
    assert probe.reachability is Reachability.NO_BANNER

    boot_id = lab.sim.vm_state()["boot_id"]
    pve = PveClient(lab.pve, ConnectOptions(client_keys=[lab.pve_key]))
    try:
        result = await pve.verb("reset")
    finally:
        await pve.close()
    assert result.ok, result
    assert result.bundle_id and "-reset-" in result.bundle_id  # forensics first
    assert lab.sim.vm_state()["boot_id"] == boot_id + 1
    assert "qmp system_reset" in lab.sim.call_texts()

    seen: list[Reachability] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = await probe_devvm(lab.devvm, client_keys=[lab.devvm_key], timeout_s=1.0)
        seen.append(probe.reachability)
        if probe.reachability is Reachability.HEALTHY:
            break
        await asyncio.sleep(0.2)
    assert seen[-1] is Reachability.HEALTHY, seen
    assert Reachability.REFUSED in seen  # booting, then up


async def test_lab_close_leaves_nothing_behind(lab_factory):
    lab = await lab_factory("healthy")
    kvm = lab.sim.kvm_pid()
    assert kvm is not None
    workdir = lab.workdir
    await lab.close()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(kvm, 0)
    assert not workdir.exists()
    probe = await probe_devvm(lab.devvm, client_keys=[lab.devvm_key], timeout_s=1.0)
    assert probe.reachability is Reachability.REFUSED


async def test_host_session_works_against_the_lab(lab_factory):
    """The way the UI and the breakglass agent use the lab: one HostSession with both keys."""
    lab = await lab_factory("stuck-service")
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        assert (await hosts.probe()).reachability is Reachability.HEALTHY
        assert (await hosts.run("systemctl is-active webapp")).stdout == "failed\n"
        status = await hosts.verb("status")
        assert status.ok and status.state_after == "running"
    finally:
        await hosts.close()
