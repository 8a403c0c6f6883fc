"""End to end on the real-guest lab: a real Linux devvm under QEMU fails for real, is repaired
through the hosts layer (or by the breakglass agent scripted through the fake Messages API), and
the test then asks the guest itself whether it is really well: disk has space, the hog is gone,
the service answers, SSH works, and forensics bundles hold a real screendump PNG.

One boot per scenario (~8-30 s each under TCG on a busy machine)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time

import pytest

from breakglass_tui.core.events import VerbCompleted
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.types import Reachability
from breakglass_tui.lab.guest.lab import RealLab, start_real_lab
from tests.support import fake_messages_api as fm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def eventually(hosts: HostSession, command: str, want: str, timeout_s: float = 30) -> str:
    """Run command on the devvm until its stdout contains want; the last stdout."""
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        outcome = await hosts.run(command, timeout_s=15)
        out = outcome.stdout
        if want in out:
            return out
        await asyncio.sleep(1)
    raise AssertionError(f"{command!r} never printed {want!r} in {timeout_s} s; last: {out!r}")


async def assert_bundle_has_screendump(hosts: HostSession, bundle_id: str | None) -> dict:
    """Fetch the forensics bundle through the PVE host; it holds a real PNG of the console."""
    assert bundle_id
    bundle = await hosts.bundle(bundle_id)
    assert bundle["ok"], bundle
    png = base64.b64decode(bundle["files"]["screendump.png"])
    assert png.startswith(PNG_MAGIC) and len(png) > 500
    # A 720x400 VGA text console (QEMU's std VGA), not a placeholder image.
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 640 and height >= 400
    return bundle


@pytest.mark.parametrize("real_lab", ["disk-full"], indirect=True)
async def test_disk_full_runaway_log_is_truncated(real_lab: tuple[RealLab, HostSession]) -> None:
    _lab, hosts = real_lab
    before = await hosts.run("df -P /data | tail -n 1; du -sk /data/log/app/*")
    assert before.ok and "100%" in before.stdout and "runaway.log" in before.stdout
    writing = await hosts.run("echo more >> /data/log/app/other.log")
    assert not writing.ok and "No space left on device" in writing.stderr

    repair = await hosts.run("systemctl stop log-spammer && : > /data/log/app/runaway.log")
    assert repair.ok, repair

    await asyncio.sleep(3)  # the writer would have written again by now
    after = await hosts.run("df -P /data | tail -n 1; systemctl is-active log-spammer")
    used_pct = int(after.stdout.split()[4].rstrip("%"))
    assert used_pct < 10 and "inactive" in after.stdout
    assert (await hosts.run("echo fine >> /data/log/app/other.log")).ok

    forensics = await hosts.verb("forensics")
    assert forensics.ok and forensics.state_before == "running"
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["oom"], indirect=True)
async def test_oom_hog_is_stopped(real_lab: tuple[RealLab, HostSession]) -> None:
    _lab, hosts = real_lab
    # The kernel's OOM killer really fired, on the hog.
    dmesg = await eventually(hosts, "dmesg", "Out of memory", timeout_s=60)
    assert "(tail)" in dmesg
    status = await hosts.run("systemctl status memhog")
    assert "Restarts:" in status.stdout

    repair = await hosts.run("systemctl stop memhog")
    assert repair.ok, repair

    await asyncio.sleep(8)  # longer than the unit's restart delay (6 s)
    # [z]: the pattern must not match the shell running grep.
    hog = await hosts.run("ps -o pid,args | grep 'tail /dev/[z]ero'")
    assert hog.exit_status == 1 and hog.stdout == ""
    state = await hosts.run("systemctl is-active memhog; free -m | awk '/Mem:/ {print $4}'")
    lines = state.stdout.split()
    assert lines[0] == "inactive" and int(lines[1]) > 100  # MB free again

    forensics = await hosts.verb("forensics")
    assert forensics.ok
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["stuck-service"], indirect=True)
async def test_stuck_service_is_restarted(real_lab: tuple[RealLab, HostSession]) -> None:
    _lab, hosts = real_lab
    stuck = await hosts.run("systemctl status webapp")
    assert stuck.exit_status == 3 and "waiting for /run/webapp.lock" in stuck.stdout
    fetch = await hosts.run("wget -qO- http://127.0.0.1:8080/")
    assert not fetch.ok

    repair = await hosts.run("systemctl restart webapp")
    assert repair.ok, repair

    assert "webapp ok" in await eventually(hosts, "wget -qO- http://127.0.0.1:8080/", "ok")
    status = await hosts.run("systemctl status webapp")
    assert status.ok and "active (running)" in status.stdout

    forensics = await hosts.verb("forensics")
    assert forensics.ok
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["wedged"], indirect=True)
async def test_wedged_guest_is_reset_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    lab, hosts = real_lab
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "paused"
    wedged = await hosts.probe()
    assert wedged.reachability is not Reachability.HEALTHY  # TCP accepted, no banner
    kvm_before = lab.sim.kvm_pid()

    h = make_agent(hosts)
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}),
        fm.tool("t2", "pve_verb", {"verb": "status"}),
        fm.reply("The VM is paused: resetting it.", [("t3", "pve_verb", {"verb": "reset"})]),
        fm.tool("t4", "wait_for_devvm", {"timeout_s": 150}),
        fm.tool("t5", "devvm_shell", {"command": "cat /proc/uptime; systemctl is-active webapp"}),
        fm.text("The devvm's vCPUs were paused; reset brought it back and SSH works."),
    )
    await h.agent.handle("the devvm does not answer")

    verbs = {e.result.verb: e.result for e in h.of(VerbCompleted)}
    assert verbs["status"].state_after == "paused"
    reset = verbs["reset"]
    assert reset.ok and reset.state_before == "paused" and reset.state_after == "running"
    steps = [s["step"] for s in reset.document["steps"]]
    assert "qm reset" in steps and "qm resume" in steps  # a paused VM stays paused after reset
    assert len(fake_api.bodies) == 6
    # Ask the guest ourselves: a fresh boot of the same QEMU process, SSH and the service up.
    assert lab.sim.kvm_pid() == kvm_before
    check = await hosts.run("cat /proc/uptime; systemctl is-active webapp")
    assert check.ok and float(check.stdout.split()[0]) < 300 and "active" in check.stdout
    assert (await hosts.probe()).reachability is Reachability.HEALTHY
    await assert_bundle_has_screendump(hosts, reset.bundle_id)


@pytest.mark.parametrize("real_lab", ["io-stall"], indirect=True)
async def test_io_stall_forensics_then_cycle(real_lab: tuple[RealLab, HostSession]) -> None:
    lab, hosts = real_lab
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "io-error"
    block = await asyncio.to_thread(lab.sim.qmp, "query-block")
    assert {b["device"]: b.get("io-status") for b in block}["d0"] == "failed"

    forensics = await hosts.verb("forensics")
    assert forensics.ok and forensics.state_before == "paused (io-error)"
    assert forensics.document["elapsed_s"] < 20  # the verb's forensics deadline
    bundle = await assert_bundle_has_screendump(hosts, forensics.bundle_id)
    assert b'"failed"' in base64.b64decode(bundle["files"]["qmp_query_block.txt"])

    # Proxmox's qm reset alone (QMP system_reset) leaves a VM paused by an I/O error paused.
    reset = await asyncio.to_thread(
        subprocess.run, [str(lab.sim.qm_path), "reset", "102"], capture_output=True, timeout=30
    )
    assert reset.returncode == 0
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] != "running"

    kvm_before = lab.sim.kvm_pid()
    cycle = await hosts.verb("cycle")
    assert cycle.ok and cycle.state_after == "running", cycle.message
    assert lab.sim.kvm_pid() not in (None, kvm_before)  # a new QEMU process
    await lab.wait_for_ssh()
    # The checkpointer writes to the data disk again, and the VM keeps running.
    await eventually(hosts, "journalctl -u dbsync -n 5", "records out", timeout_s=40)
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "running"


async def test_panicked_guest_is_reset(guest_image) -> None:
    """The other wedge: a kernel panic. QEMU runs on (QMP says running), the guest never answers;
    the console shows the panic; a reset (no resume needed) reboots it."""
    lab = await start_real_lab("wedged", wedge="panic")
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        assert "Kernel panic" in lab.sim.console()
        assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "running"
        assert (await hosts.probe()).reachability is not Reachability.HEALTHY

        reset = await hosts.verb("reset")
        assert reset.ok and reset.state_before == "running", reset.message
        assert "qm resume" not in [s["step"] for s in reset.document["steps"]]
        await assert_bundle_has_screendump(hosts, reset.bundle_id)
        await lab.wait_for_ssh()
        uptime = await hosts.run("cat /proc/uptime")
        assert uptime.ok and float(uptime.stdout.split()[0]) < 300
    finally:
        await hosts.close()
        await lab.close()
