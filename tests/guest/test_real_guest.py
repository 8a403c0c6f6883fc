"""End to end on the real-guest lab: a real Linux devvm under QEMU fails for real, the breakglass
agent (scripted through the fake Messages API, over real HTTP, with the real anthropic SDK)
diagnoses and repairs it through the hosts layer and the real ``breakglass-verb``, and the test
then asks the guest itself whether it is really well: disk has space, the hog is gone, the service
answers, SSH works, and forensics bundles hold a real screendump PNG.

Each scripted conversation is what a good model would do; the test checks what the agent really
sent back to the model (the tool results in the fake API's recorded request bodies hold the real
``100%``, the real OOM-killer line, the real stuck state), then checks the guest on its own,
over its own SSH commands, after the agent is done.

One boot per scenario (~8-30 s each under TCG on a busy machine)."""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.core.events import BundleSaved, ProbeUpdated, ToolCallEnded, VerbCompleted
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.types import Reachability
from breakglass_tui.lab.guest.lab import RealLab, start_real_lab
from tests.core.test_loop import assert_tool_results_first
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


def assert_png_screendump(png: bytes) -> None:
    """A real PNG of a 720x400 VGA text console (QEMU's std VGA), not a placeholder image."""
    assert png.startswith(PNG_MAGIC) and len(png) > 500
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 640 and height >= 400


async def assert_bundle_has_screendump(hosts: HostSession, bundle_id: str | None) -> dict:
    """Fetch the forensics bundle through the PVE host; it holds a real PNG of the console."""
    assert bundle_id
    bundle = await hosts.bundle(bundle_id)
    assert bundle["ok"], bundle
    assert_png_screendump(base64.b64decode(bundle["files"]["screendump.png"]))
    return bundle


# -- what the agent did and what the model was sent -------------------------------------------


def sent(api: fm.FakeMessagesApi, call_id: str) -> str:
    """The tool_result the agent sent the model for tool call `call_id` (from the fake API's
    recorded request bodies: what the model really read)."""
    for body in api.bodies:
        for message in body["messages"]:
            if message["role"] != "user" or isinstance(message["content"], str):
                continue
            for block in message["content"]:
                if block["type"] == "tool_result" and block["tool_use_id"] == call_id:
                    content = block["content"]
                    if isinstance(content, list):
                        content = "".join(c.get("text", "") for c in content)
                    return content
    raise AssertionError(f"no tool_result for {call_id} was sent to the model")


def ended(h: Any, call_id: str) -> ToolCallEnded:
    (end,) = [e for e in h.of(ToolCallEnded) if e.call_id == call_id]
    return end


def shell_commands(h: Any) -> list[str]:
    """The devvm_shell commands the agent ran, from its audit log."""
    return [
        r["input"]["command"]
        for r in h.audit()
        if r["kind"] == "tool_call" and r["tool"] == "devvm_shell"
    ]


async def saved_bundle(h: Any, bundle_id: str | None, timeout_s: float = 30) -> Path:
    """The agent fetched the bundle to the operator's state dir (the forensics pane's copy),
    screendump included: its directory."""
    assert bundle_id
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        saved = {e.bundle_id: e for e in h.of(BundleSaved)}
        if bundle_id in saved:
            directory = Path(saved[bundle_id].directory)
            assert "screendump.png" in saved[bundle_id].files
            assert_png_screendump((directory / "screendump.png").read_bytes())
            return directory
        await asyncio.sleep(0.2)
    raise AssertionError(f"the agent never saved bundle {bundle_id}")


def assert_conversation(h: Any, api: fm.FakeMessagesApi, requests: int) -> None:
    """The scripted conversation ran to its end: every scripted answer was asked for, every
    tool_use answered first thing in the next message."""
    assert len(api.bodies) == requests, [r.path for r in api.requests]
    assert not api.script
    assert_tool_results_first(api.bodies)
    assert h.agent.messages[-1]["role"] == "assistant"


@pytest.mark.parametrize("real_lab", ["disk-full"], indirect=True)
async def test_disk_full_runaway_log_is_truncated_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    _lab, hosts = real_lab
    # The scenario is real before the agent starts: /data is full, writes fail.
    before = await hosts.run("df -P /data | tail -n 1; du -sk /data/log/app/*")
    assert before.ok and "100%" in before.stdout and "runaway.log" in before.stdout
    writing = await hosts.run("echo more >> /data/log/app/other.log")
    assert not writing.ok and "No space left on device" in writing.stderr

    h = make_agent(hosts)
    repair = "systemctl stop log-spammer && : > /data/log/app/runaway.log"
    verify = "sleep 2; df -h /data; echo ok >> /data/log/app/other.log && echo writable"
    fake_api.push(
        fm.tool("d1", "probe_devvm", {}),
        fm.tool("d2", "devvm_shell", {"command": "df -h /data"}),
        fm.tool("d3", "devvm_shell", {"command": "du -sh /data/log/app/*"}),
        fm.tool("d4", "devvm_shell", {"command": "ps -o pid,args"}),
        fm.reply(
            "runaway.log filled /data. Capturing forensics before I change anything.",
            [("d5", "pve_verb", {"verb": "forensics"})],
        ),
        fm.reply(
            "Stopping the log shipper that writes it, then truncating the log.",
            [("d6", "devvm_shell", {"command": repair})],
        ),
        fm.tool("d7", "devvm_shell", {"command": verify}),
        fm.text("Incident summary: /data was 100% full from runaway.log; writer stopped, emptied."),
    )
    await h.agent.handle("the devvm is acting up: the app cannot write its logs")

    assert_conversation(h, fake_api, 8)
    assert "healthy" in sent(fake_api, "d1")
    df = sent(fake_api, "d2")
    assert "exit 0" in df and re.search(r"100%\s+/data$", df, re.M), df  # the real df, full
    du = re.search(r"^(\d+(?:\.\d+)?)M\s+/data/log/app/runaway\.log$", sent(fake_api, "d3"), re.M)
    assert du and float(du.group(1)) >= 40, sent(fake_api, "d3")  # the culprit, ~48 MB
    assert "supervise log-spammer" in sent(fake_api, "d4")  # its writer, running
    forensics = {e.result.verb: e.result for e in h.of(VerbCompleted)}["forensics"]
    assert forensics.ok and forensics.state_before == "running"
    assert "pve_verb forensics: ok" in sent(fake_api, "d5")
    assert ended(h, "d6").ok and "exit 0" in sent(fake_api, "d6")
    checked = sent(fake_api, "d7")
    assert "writable" in checked and "100%" not in checked
    assert shell_commands(h)[3] == repair

    # Ask the guest ourselves, once the writer would have written again (3 s after the stop).
    await asyncio.sleep(1)
    after = await hosts.run("df -P /data | tail -n 1; systemctl is-active log-spammer")
    used_pct = int(after.stdout.split()[4].rstrip("%"))
    assert used_pct < 10 and "inactive" in after.stdout
    assert (await hosts.run("echo fine >> /data/log/app/other.log")).ok
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)
    await saved_bundle(h, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["oom"], indirect=True)
async def test_oom_hog_is_stopped_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    _lab, hosts = real_lab
    # The kernel's OOM killer really fired, on the hog, before the agent starts.
    dmesg = await eventually(hosts, "dmesg", "Out of memory", timeout_s=60)
    assert "(tail)" in dmesg
    status = await hosts.run("systemctl status memhog")
    assert "Restarts:" in status.stdout

    h = make_agent(hosts)
    verify = (
        "sleep 8; systemctl is-active memhog;"
        " ps -o pid,args | grep 'tail /dev/[z]ero' || echo 'no hog process'; free -m"
    )
    fake_api.push(
        fm.tool("m1", "probe_devvm", {}),
        fm.tool("m2", "devvm_shell", {"command": "free -m"}),
        fm.tool("m3", "devvm_shell", {"command": "dmesg | grep -iE 'out of memory|oom' | tail"}),
        fm.tool("m4", "devvm_shell", {"command": "systemctl status memhog"}),
        fm.reply(
            "The OOM killer keeps killing memhog's tail; it is restarted and leaks again."
            " Capturing forensics, then stopping it.",
            [("m5", "pve_verb", {"verb": "forensics"})],
        ),
        fm.tool("m6", "devvm_shell", {"command": "systemctl stop memhog"}),
        # Past the unit's restart delay (6 s): no hog came back.
        fm.tool("m7", "devvm_shell", {"command": verify, "timeout_s": 60}),
        fm.text("Incident summary: memhog leaked until OOM-killed, over and over; stopped."),
    )
    await h.agent.handle("the devvm is very slow")

    assert_conversation(h, fake_api, 8)
    assert "healthy" in sent(fake_api, "m1")
    assert "Mem:" in sent(fake_api, "m2")
    oom = sent(fake_api, "m3")
    assert re.search(r"Out of memory: Killed process \d+ \(tail\)", oom), oom  # the kernel's line
    memhog = sent(fake_api, "m4")
    assert "memhog.service - Report cache warmer" in memhog and "Restarts:" in memhog
    forensics = {e.result.verb: e.result for e in h.of(VerbCompleted)}["forensics"]
    assert forensics.ok
    assert ended(h, "m6").ok and "exit 0" in sent(fake_api, "m6")
    after_stop = sent(fake_api, "m7")
    assert "inactive" in after_stop and "no hog process" in after_stop
    assert "systemctl stop memhog" in shell_commands(h)

    # Ask the guest ourselves. [z]: the pattern must not match the shell running grep.
    hog = await hosts.run("ps -o pid,args | grep 'tail /dev/[z]ero'")
    assert hog.exit_status == 1 and hog.stdout == ""
    state = await hosts.run("systemctl is-active memhog; free -m | awk '/Mem:/ {print $4}'")
    lines = state.stdout.split()
    assert lines[0] == "inactive" and int(lines[1]) > 100  # MB free again
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)
    await saved_bundle(h, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["stuck-service"], indirect=True)
async def test_stuck_service_is_restarted_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    _lab, hosts = real_lab
    stuck = await hosts.run("systemctl status webapp")
    assert stuck.exit_status == 3 and "waiting for /run/webapp.lock" in stuck.stdout
    fetch = await hosts.run("wget -qO- http://127.0.0.1:8080/")
    assert not fetch.ok

    h = make_agent(hosts)
    verify = (
        "for i in $(seq 1 20); do wget -qO- http://127.0.0.1:8080/ && break; sleep 1; done;"
        " systemctl status webapp"
    )
    fake_api.push(
        fm.tool("s1", "probe_devvm", {}),
        fm.tool("s2", "devvm_shell", {"command": "netstat -ltn"}),
        fm.tool("s3", "devvm_shell", {"command": "systemctl status webapp"}),
        fm.tool("s4", "devvm_shell", {"command": "journalctl -u webapp -n 20"}),
        fm.tool("s5", "devvm_shell", {"command": "wget -qO- -T 5 http://127.0.0.1:8080/"}),
        fm.reply(
            "webapp is stuck waiting for its lock. Capturing forensics, then restarting it.",
            [("s6", "pve_verb", {"verb": "forensics"})],
        ),
        fm.tool("s7", "devvm_shell", {"command": "systemctl restart webapp"}),
        fm.tool("s8", "devvm_shell", {"command": verify, "timeout_s": 60}),
        fm.text("Incident summary: webapp was stuck on a stale lock; restarted; it serves again."),
    )
    await h.agent.handle("the web app on the devvm does not answer")

    assert_conversation(h, fake_api, 9)
    assert "healthy" in sent(fake_api, "s1")
    listening = sent(fake_api, "s2")
    assert ":22 " in listening and ":8080 " not in listening  # sshd listens, the web app not
    status = sent(fake_api, "s3")
    assert "exit 3" in status and "waiting for /run/webapp.lock" in status  # the stuck state
    assert "Started webapp.service." in sent(fake_api, "s4")
    assert not ended(h, "s5").ok and "exit 0" not in sent(fake_api, "s5")  # nothing answers
    forensics = {e.result.verb: e.result for e in h.of(VerbCompleted)}["forensics"]
    assert forensics.ok
    assert ended(h, "s7").ok and "exit 0" in sent(fake_api, "s7")
    after = sent(fake_api, "s8")
    assert "webapp ok" in after and "active (running)" in after
    assert "systemctl restart webapp" in shell_commands(h)

    # Ask the guest ourselves.
    assert "webapp ok" in await eventually(hosts, "wget -qO- http://127.0.0.1:8080/", "ok")
    status_now = await hosts.run("systemctl status webapp")
    assert status_now.ok and "active (running)" in status_now.stdout
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)
    await saved_bundle(h, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["wedged"], indirect=True)
async def test_wedged_guest_is_reset_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    lab, hosts = real_lab
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "paused"
    wedged = await hosts.probe()
    assert wedged.reachability is not Reachability.HEALTHY  # TCP accepted, no banner
    kvm_before = lab.sim.kvm_pid()
    boots_before = lab.sim.console().count("breakglass-guest: ready")
    assert boots_before == 1

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
    assert_conversation(h, fake_api, 6)
    assert wedged.reachability.value in sent(fake_api, "t1")
    assert "paused" in sent(fake_api, "t2")
    assert "pve_verb reset: ok" in sent(fake_api, "t3")
    assert "the devvm answers" in sent(fake_api, "t4")
    uptime = sent(fake_api, "t5").splitlines()[1]  # after the header: the fresh boot's uptime
    assert float(uptime.split()[0]) < 300
    # Ask the guest ourselves: a fresh boot of the same QEMU process (its serial console shows
    # the guest coming up a second time), SSH and the service up.
    assert lab.sim.kvm_pid() == kvm_before
    assert lab.sim.console().count("breakglass-guest: ready") == boots_before + 1
    check = await hosts.run("cat /proc/uptime; systemctl is-active webapp")
    assert check.ok and float(check.stdout.split()[0]) < 300 and "active" in check.stdout
    assert (await hosts.probe()).reachability is Reachability.HEALTHY
    await assert_bundle_has_screendump(hosts, reset.bundle_id)


@pytest.mark.parametrize("real_lab", ["io-stall"], indirect=True)
async def test_io_stall_forensics_then_cycle_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    """Two turns, the owner in the loop: the agent diagnoses (probe, status, forensics); the
    owner tries Proxmox's plain reset, which does not help; the agent cycles the VM."""
    lab, hosts = real_lab
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "io-error"
    block = await asyncio.to_thread(lab.sim.qmp, "query-block")
    assert {b["device"]: b.get("io-status") for b in block}["d0"] == "failed"

    h = make_agent(hosts, wait_probe_interval_s=0.5)
    fake_api.push(
        fm.tool("i1", "probe_devvm", {}),
        fm.tool("i2", "pve_verb", {"verb": "status"}),
        fm.tool("i3", "pve_verb", {"verb": "forensics"}),
        fm.text(
            "QEMU paused the VM on an I/O error of its data disk (werror=stop); a reset will not"
            " resume it. A cycle (a new QEMU process) is the recovery."
        ),
    )
    await h.agent.handle("the devvm does not answer; look first, do not power anything yet")

    assert len(fake_api.bodies) == 4
    probe = h.of(ProbeUpdated)[0].result
    assert probe.reachability is not Reachability.HEALTHY  # TCP accepted, no banner
    assert probe.reachability.value in sent(fake_api, "i1")
    verbs = {e.result.verb: e.result for e in h.of(VerbCompleted)}
    assert verbs["status"].state_after == "paused (io-error)"
    assert "paused (io-error)" in sent(fake_api, "i2")
    forensics = verbs["forensics"]
    assert forensics.ok and forensics.state_before == "paused (io-error)"
    assert forensics.document["elapsed_s"] < 20  # the verb's forensics deadline
    assert "pve_verb forensics: ok" in sent(fake_api, "i3")
    bundle = await assert_bundle_has_screendump(hosts, forensics.bundle_id)
    assert b'"failed"' in base64.b64decode(bundle["files"]["qmp_query_block.txt"])
    saved = await saved_bundle(h, forensics.bundle_id)
    assert b'"failed"' in (saved / "qmp_query_block.txt").read_bytes()

    # The owner tries Proxmox's qm reset (QMP system_reset): a VM paused by an I/O error stays
    # paused.
    reset = await asyncio.to_thread(
        subprocess.run, [str(lab.sim.qm_path), "reset", "102"], capture_output=True, timeout=30
    )
    assert reset.returncode == 0
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] != "running"

    kvm_before = lab.sim.kvm_pid()
    checkpoint = (
        "for i in $(seq 1 40); do journalctl -u dbsync -n 5 | grep -q 'records out' && break;"
        " sleep 1; done; journalctl -u dbsync -n 5"
    )
    fake_api.push(
        fm.tool("i4", "pve_verb", {"verb": "status"}),
        fm.reply("Still paused: cycling it.", [("i5", "pve_verb", {"verb": "cycle"})]),
        fm.tool("i6", "wait_for_devvm", {"timeout_s": 150}),
        fm.tool("i7", "devvm_shell", {"command": checkpoint, "timeout_s": 90}),
        fm.text("Incident summary: paused on an I/O error; cycled; SSH and dbsync's writes work."),
    )
    await h.agent.handle("a qm reset from the Proxmox UI did not help; recover it")

    assert_conversation(h, fake_api, 9)
    later = [e.result for e in h.of(VerbCompleted) if e.result.verb in ("status", "cycle")]
    status_again, cycle = later[-2:]
    assert status_again.verb == "status" and status_again.state_after.startswith("paused")
    assert status_again.state_after in sent(fake_api, "i4")
    assert cycle.verb == "cycle" and cycle.ok and cycle.state_after == "running", cycle.message
    assert "pve_verb cycle: ok" in sent(fake_api, "i5")
    assert "the devvm answers" in sent(fake_api, "i6")
    assert "records out" in sent(fake_api, "i7")  # the checkpointer writes to the data disk

    # Ask the guest ourselves: a new QEMU process, SSH works, the data disk takes writes, and
    # the VM keeps running.
    assert lab.sim.kvm_pid() not in (None, kvm_before)
    await lab.wait_for_ssh()
    assert (await hosts.probe()).reachability is Reachability.HEALTHY
    await eventually(hosts, "journalctl -u dbsync -n 5", "records out", timeout_s=40)
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "running"
    await assert_bundle_has_screendump(hosts, cycle.bundle_id)


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
