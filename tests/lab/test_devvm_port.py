"""The sandbox lab's devvm port shows what the network shows of VM 102 in each state (refused,
no banner, paused, dropped), in front of the sandbox's real sshd; and the sandbox lab end to end
through the PVE host's real breakglass-verb."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.pve import PveClient
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending, Reachability
from breakglass_tui.lab.sandbox import SandboxUnavailable
from tests.support.waiting import until


def _write_vm(path, **vm) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"vmid": 102, **vm}))
    tmp.replace(path)


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [("healthy", Reachability.HEALTHY), ("wedged", Reachability.NO_BANNER)],
)
async def test_probe_classifies_the_port(devvm_factory, scenario, expected):
    devvm = await devvm_factory(scenario)
    result = await probe_devvm(devvm.target, client_keys=[devvm.key], timeout_s=3.0)
    assert result.reachability is expected, result
    if scenario == "wedged":
        assert result.banner is None
    else:
        assert result.banner and result.banner.startswith("SSH-2.0-OpenSSH_")  # the real sshd


async def test_the_port_follows_the_vm_state(devvm_factory, tmp_path):
    vm_json = tmp_path / "vm.json"
    _write_vm(vm_json, status="running", qmp_status="running", boot_id=1, booted_at=time.time())
    devvm = await devvm_factory("disk-full", vm_json=vm_json, boot_delay_s=0.6, poll_s=0.05)
    sim = devvm.sim
    assert sim.mode == "ssh"  # the first boot counts as done: the lab is usable at once
    assert (await devvm.run("pgrep -f 'sh /opt/lab/[l]og-spammer'")).ok

    # Paused (an I/O error): a running command's bytes are held, new connections hear nothing;
    # resumed, the command's output arrives.
    seen: list[str] = []
    running = asyncio.create_task(
        devvm.shell.run(
            "echo started; sleep 1; echo after-the-pause",
            timeout_s=30,
            on_output=lambda chunk: seen.append(chunk.text),
        )
    )
    await until(lambda: "started" in "".join(seen), what="the command running on the devvm")
    _write_vm(vm_json, status="running", qmp_status="io-error", boot_id=1, booted_at=time.time())
    await sim.wait_for_mode("no_banner", 3)
    probe = await probe_devvm(devvm.target, client_keys=[devvm.key], timeout_s=1.0)
    assert probe.reachability is Reachability.NO_BANNER
    # Must not happen within 1.5 s: the command's own second would have ended it, were its
    # bytes not held.
    await asyncio.sleep(1.5)
    assert not running.done()  # held while paused
    _write_vm(vm_json, status="running", qmp_status="running", boot_id=1, booted_at=time.time())
    await sim.wait_for_mode("ssh", 3)
    done = await asyncio.wait_for(running, 10)
    assert done.ok and "after-the-pause" in done.stdout

    _write_vm(vm_json, status="stopped", qmp_status="prelaunch", boot_id=1, booted_at=0.0)
    await sim.wait_for_mode("refused", 3)
    probe = await probe_devvm(devvm.target, client_keys=[devvm.key], timeout_s=1.0)
    assert probe.reachability is Reachability.REFUSED

    await devvm.run(": > /data/log/app/runaway.log", timeout_s=2)  # refused: nothing happens
    started = time.monotonic()
    _write_vm(vm_json, status="running", qmp_status="running", boot_id=2, booted_at=time.time())
    await sim.wait_for_mode("ssh", 10)
    assert time.monotonic() - started >= 0.5  # refused while booting
    assert sim.boot_id == 2 and devvm.sandbox.boots == 2
    out = await devvm.run("df --output=pcent /data | tail -n 1; pgrep -fc 'sh /opt/lab/[l]og'")
    assert out.ok and out.stdout.split() == ["100%", "1"]  # the disk kept, the writer restarted


async def test_a_dropped_link_ends_the_running_command_as_disconnected(devvm_factory):
    devvm = await devvm_factory("healthy")
    seen: list[str] = []
    running = asyncio.create_task(
        devvm.shell.run(
            "echo started; sleep 30", timeout_s=20, on_output=lambda chunk: seen.append(chunk.text)
        )
    )
    await until(lambda: "started" in "".join(seen), what="the command running on the devvm")
    devvm.sim.drop()
    assert (await asyncio.wait_for(running, 10)).ending is Ending.DISCONNECTED
    assert (await devvm.run("echo back")).stdout == "back\n"  # a new connection works


@pytest.mark.slow
async def test_wedged_lab_recovered_end_to_end_with_reset(lab_factory):
    lab = await lab_factory("wedged", boot_delay_s=1.0)
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

    async def healthy() -> bool:
        probe = await probe_devvm(lab.devvm, client_keys=[lab.devvm_key], timeout_s=1.0)
        seen.append(probe.reachability)
        return probe.reachability is Reachability.HEALTHY

    await until(
        healthy,
        what="the devvm healthy again",
        timeout_s=15,
        interval_s=0.2,
        diagnostics=lambda: f"seen: {seen}",
    )
    assert Reachability.REFUSED in seen  # booting, then up


async def test_io_stall_lab_is_a_vm_paused_by_an_io_error(lab_factory):
    lab = await lab_factory("io-stall")
    assert lab.sim.vm_state()["qmp_status"] == "io-error"
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        assert (await hosts.probe()).reachability is Reachability.NO_BANNER
        status = await hosts.verb("status")
        assert status.ok and status.state_after == "paused (io-error)"
    finally:
        await hosts.close()


async def test_lab_close_leaves_nothing_behind(lab_factory):
    lab = await lab_factory("disk-full")
    kvm = lab.sim.kvm_pid()
    bwrap = lab.sandbox.process.pid if lab.sandbox.process else None
    assert kvm is not None and bwrap is not None
    workdir = lab.workdir
    await lab.close()
    for pid in (kvm, bwrap):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not workdir.exists()
    probe = await probe_devvm(lab.devvm, client_keys=[lab.devvm_key], timeout_s=1.0)
    assert probe.reachability is Reachability.REFUSED


async def test_host_session_works_against_the_lab(lab_factory):
    """The way the UI and the breakglass agent use the lab: one HostSession with both keys."""
    lab = await lab_factory("healthy")
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        assert (await hosts.probe()).reachability is Reachability.HEALTHY
        assert (await hosts.run("hostname")).stdout == "devvm\n"
        status = await hosts.verb("status")
        assert status.ok and status.state_after == "running"
    finally:
        await hosts.close()


async def test_a_scenario_the_sandbox_cannot_stage_is_refused_with_the_next_step(lab_factory):
    with pytest.raises(ValueError, match="the real devvm stages"):
        await lab_factory("oom")


async def test_without_bubblewrap_the_sandbox_says_what_to_install(tmp_path, monkeypatch):
    from breakglass_tui.lab.sandbox import SandboxDevvm
    from tests.support.realparts import new_key

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on this PATH
    sandbox = SandboxDevvm("healthy", host_key=new_key(), authorized_keys=[])
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        await sandbox.start()
