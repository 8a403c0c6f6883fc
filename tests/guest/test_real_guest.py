"""End to end on the real devvm: a Debian guest under QEMU, restored from its saved state, fails
for real; the breakglass agent (scripted through the fake Messages API, over real HTTP, with the
real anthropic SDK) diagnoses and repairs it through the hosts layer (as ``breakglass`` with
``sudo -n``, over the guest's OpenSSH) and the real ``breakglass-verb``; then the test asks the
guest itself whether it is really well.

Each scripted conversation is what a good model would do; the test checks what the agent really
sent back to the model (the tool results in the fake API's recorded request bodies hold the real
``100%``, the real OOM-killer line, the real ``Read-only file system``), then checks the guest on
its own, over its own commands, after the agent is done. One scenario per test: a drill starts in
seconds from its saved state; a reset or a cycle boots the guest for real."""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.core import fence
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
    recorded request bodies: what the model really read), fences taken out."""
    for body in api.bodies:
        for message in body["messages"]:
            if message["role"] != "user" or isinstance(message["content"], str):
                continue
            for block in message["content"]:
                if block["type"] == "tool_result" and block["tool_use_id"] == call_id:
                    content = block["content"]
                    if isinstance(content, list):
                        content = "".join(c.get("text", "") for c in content)
                    return unfenced(content)
    raise AssertionError(f"no tool_result for {call_id} was sent to the model")


def unfenced(content: str) -> str:
    """A tool result's text as read, its fence markers taken out (the host's text inside them,
    the agent's outside, in order); it must be well formed (core.fence.parse raises if not)."""
    parsed = fence.parse(content)
    pieces = [parsed.outside[0]]
    for inside, outside in zip(parsed.inside, parsed.outside[1:], strict=True):
        pieces += [inside, outside]
    return "".join(pieces)


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


def verbs_of(h: Any) -> dict[str, Any]:
    return {e.result.verb: e.result for e in h.of(VerbCompleted)}


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


async def unit_state(hosts: HostSession, unit: str) -> tuple[str, str]:
    """(is-active, is-enabled) of a unit, as the guest's service manager says."""
    out = await hosts.run(f"systemctl is-active {unit}; systemctl is-enabled {unit}")
    active, enabled = out.stdout.split()
    return active, enabled


async def data_usage(hosts: HostSession) -> tuple[int, int]:
    """(% of blocks, % of inodes) used on /data, from the guest's df."""
    out = await hosts.run("df --output=pcent,ipcent /data | tail -n 1")
    blocks, inodes = out.stdout.split()
    return int(blocks.rstrip("%")), int(inodes.rstrip("%"))


# -- the scenarios -----------------------------------------------------------------------------


@pytest.mark.parametrize("real_lab", ["healthy"], indirect=True)
async def test_healthy_devvm_is_found_healthy_and_left_alone(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    lab, hosts = real_lab
    h = make_agent(hosts)
    look = "uptime; df -h / /data; free -m; systemctl --failed; systemctl is-active webapp"
    fake_api.push(
        fm.tool("h1", "probe_devvm", {}),
        fm.tool("h2", "devvm_shell", {"command": look}),
        fm.text("The devvm is healthy: SSH answers, the disks have room, every unit runs."),
    )
    await h.agent.handle("is the devvm all right?")

    assert_conversation(h, fake_api, 3)
    assert "healthy" in sent(fake_api, "h1")
    seen = sent(fake_api, "h2")
    assert "exit 0" in seen and "load average" in seen and "/dev/vdb" in seen
    assert seen.rstrip().endswith("active")
    assert not h.of(VerbCompleted)  # nothing powered, nothing changed
    assert (await data_usage(hosts))[0] < 10
    assert await unit_state(hosts, "webapp") == ("active", "enabled")
    assert lab.sim.boots() == 0  # restored, never booted in this lab


@pytest.mark.parametrize("real_lab", ["disk-full"], indirect=True)
async def test_disk_full_survives_a_reset_and_is_repaired_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    """The failure comes from an enabled unit: a reset does not repair it (the drill must not
    teach that it would); stopping and disabling the writer and emptying its log does."""
    _lab, hosts = real_lab
    before = await hosts.run("df -P /data | tail -n 1; du -sk /data/log/app/*")
    assert before.ok and "100%" in before.stdout and "runaway.log" in before.stdout
    writing = await hosts.run("echo more >> /data/log/app/other.log")
    assert not writing.ok and "No space left on device" in writing.stderr

    h = make_agent(hosts, wait_probe_interval_s=0.5)
    repair = "systemctl disable --now log-spammer && : > /data/log/app/runaway.log"
    verify = "sleep 2; df -h /data; echo ok >> /data/log/app/other.log && echo writable"
    fake_api.push(
        fm.tool("d1", "probe_devvm", {}),
        fm.tool("d2", "devvm_shell", {"command": "df -h /data"}),
        fm.reply(
            "/data is full. You asked for a reset first: forensics, then reset.",
            [("d3", "pve_verb", {"verb": "reset"})],
        ),
        fm.tool("d4", "wait_for_devvm", {"timeout_s": 150}),
        fm.tool("d5", "devvm_shell", {"command": "df -h /data; du -sh /data/log/app/*"}),
        fm.tool("d6", "devvm_shell", {"command": "systemctl status log-spammer"}),
        fm.reply(
            "Still full after the reset: log-spammer is enabled and writes again at every boot."
            " Disabling it and emptying its log.",
            [("d7", "devvm_shell", {"command": repair})],
        ),
        fm.tool("d8", "devvm_shell", {"command": verify}),
        fm.text(
            "Incident summary: /data was 100% full from runaway.log; writer disabled, emptied."
        ),
    )
    await h.agent.handle("the devvm is acting up: the app cannot write its logs; try a reset")

    assert_conversation(h, fake_api, 9)
    assert "healthy" in sent(fake_api, "d1")
    assert re.search(r"100%\s+/data$", sent(fake_api, "d2"), re.M), sent(fake_api, "d2")
    reset = verbs_of(h)["reset"]
    assert reset.ok and reset.bundle_id  # forensics first, inside the reset
    assert "the devvm answers" in sent(fake_api, "d4")
    after_reset = sent(fake_api, "d5")
    assert re.search(r"100%\s+/data$", after_reset, re.M), after_reset  # a reset did not fix it
    du = re.search(r"^(\d+(?:\.\d+)?)M\s+/data/log/app/runaway\.log$", after_reset, re.M)
    assert du and float(du.group(1)) >= 20, after_reset
    status = sent(fake_api, "d6")
    assert "Active: active (running)" in status and "; enabled)" in status
    assert ended(h, "d7").ok and "exit 0" in sent(fake_api, "d7")
    checked = sent(fake_api, "d8")
    assert "writable" in checked and "100%" not in checked
    assert repair in shell_commands(h)

    # Ask the guest ourselves, once the writer would have written again.
    await asyncio.sleep(1)
    assert (await data_usage(hosts))[0] < 10
    assert await unit_state(hosts, "log-spammer") == ("inactive", "disabled")
    assert (await hosts.run("echo fine >> /data/log/app/other.log")).ok
    await assert_bundle_has_screendump(hosts, reset.bundle_id)


@pytest.mark.parametrize("real_lab", ["oom"], indirect=True)
async def test_oom_hog_is_stopped_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    _lab, hosts = real_lab
    # The kernel's OOM killer really fired, on the hog, before the agent starts.
    dmesg = await eventually(hosts, "dmesg", "Out of memory", timeout_s=60)
    assert "(tail)" in dmesg

    h = make_agent(hosts)
    verify = (
        "sleep 8; systemctl is-active memhog; pgrep -a -x tail || echo 'no hog process'; free -m"
    )
    fake_api.push(
        fm.tool("m1", "devvm_shell", {"command": "free -m; dmesg | grep -i 'out of memory'"}),
        fm.tool("m2", "devvm_shell", {"command": "systemctl status memhog"}),
        fm.reply(
            "The OOM killer keeps killing memhog's tail; it restarts and leaks again."
            " Capturing forensics, then disabling it.",
            [("m3", "pve_verb", {"verb": "forensics"})],
        ),
        fm.tool("m4", "devvm_shell", {"command": "systemctl disable --now memhog"}),
        # Past the unit's restart delay (6 s): no hog came back.
        fm.tool("m5", "devvm_shell", {"command": verify, "timeout_s": 60}),
        fm.text("Incident summary: memhog leaked until OOM-killed, over and over; disabled."),
    )
    await h.agent.handle("the devvm is very slow")

    assert_conversation(h, fake_api, 6)
    oom = sent(fake_api, "m1")
    assert "Mem:" in oom and re.search(r"Out of memory: Killed process \d+ \(tail\)", oom), oom
    memhog = sent(fake_api, "m2")
    assert "memhog.service - Report cache warmer" in memhog and "Restarts:" in memhog
    forensics = verbs_of(h)["forensics"]
    assert forensics.ok
    assert ended(h, "m4").ok and "exit 0" in sent(fake_api, "m4")
    after_stop = sent(fake_api, "m5")
    assert "inactive" in after_stop and "no hog process" in after_stop

    # Ask the guest ourselves.
    hog = await hosts.run("pgrep -x tail")
    assert hog.exit_status == 1 and hog.stdout == ""
    assert await unit_state(hosts, "memhog") == ("inactive", "disabled")
    free = await hosts.run("free -m | awk '/Mem:/ {print $7}'")
    assert int(free.stdout) > 100  # MB available again
    await assert_bundle_has_screendump(hosts, forensics.bundle_id)
    await saved_bundle(h, forensics.bundle_id)


@pytest.mark.parametrize("real_lab", ["stuck-service"], indirect=True)
async def test_stuck_service_is_restarted_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    _lab, hosts = real_lab
    stuck = await hosts.run("systemctl status webapp")
    assert stuck.exit_status == 3 and "activating (start)" in stuck.stdout
    assert not (await hosts.run("curl -sf -m 3 http://127.0.0.1:8080/")).ok

    h = make_agent(hosts)
    verify = (
        "for i in $(seq 1 20); do curl -sf -m 3 http://127.0.0.1:8080/ && break; sleep 1; done;"
        " systemctl status webapp"
    )
    fake_api.push(
        fm.tool("s1", "devvm_shell", {"command": "ss -ltn; curl -sS -m 5 http://127.0.0.1:8080/"}),
        fm.tool("s2", "devvm_shell", {"command": "systemctl status webapp"}),
        fm.tool("s3", "devvm_shell", {"command": "ps -o pid,args -p $(cat /run/webapp.lock/pid)"}),
        fm.reply(
            "webapp waits on a lock its stale child holds: restarting the unit kills the child.",
            [("s4", "devvm_shell", {"command": "systemctl restart webapp"})],
        ),
        fm.tool("s5", "devvm_shell", {"command": verify, "timeout_s": 60}),
        fm.text("Incident summary: webapp was stuck on a stale lock; restarted; it serves again."),
    )
    await h.agent.handle("the web app on the devvm does not answer")

    assert_conversation(h, fake_api, 6)
    listening = sent(fake_api, "s1")
    assert ":22 " in listening and ":8080 " not in listening  # sshd listens, the web app not
    status = sent(fake_api, "s2")
    assert "exit 3" in status and "waiting for /run/webapp.lock" in status  # its own log line
    assert "sleep 100000" in sent(fake_api, "s3")  # the lock's owner: the stale child, alive
    assert ended(h, "s4").ok and "exit 0" in sent(fake_api, "s4")
    after = sent(fake_api, "s5")
    assert "webapp ok" in after and "active (running)" in after

    # Ask the guest ourselves.
    assert "webapp ok" in await eventually(hosts, "curl -s -m 5 http://127.0.0.1:8080/", "ok")
    assert await unit_state(hosts, "webapp") == ("active", "enabled")


@pytest.mark.parametrize("real_lab", ["wedged"], indirect=True)
async def test_wedged_guest_is_reset_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    lab, hosts = real_lab
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "paused"
    wedged = await hosts.probe()
    assert wedged.reachability is not Reachability.HEALTHY  # TCP accepted, no banner
    kvm_before = lab.sim.kvm_pid()
    assert lab.sim.boots() == 0  # restored, not booted

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

    verbs = verbs_of(h)
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
    # Ask the guest ourselves: a fresh boot of the same QEMU process (its serial console shows
    # the guest coming up), SSH and the service up.
    assert lab.sim.kvm_pid() == kvm_before
    assert lab.sim.boots() >= 1
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
    assert {b["qdev"].split("/")[3]: b.get("io-status") for b in block}["vdb"] == "failed"

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
    verbs = verbs_of(h)
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
        "for i in $(seq 1 40); do journalctl -u dbsync -n 5 | grep -q copied && break;"
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
    assert "copied" in sent(fake_api, "i7")  # the checkpointer writes to the data disk

    # Ask the guest ourselves: a new QEMU process, SSH works, the data disk takes writes, and
    # the VM keeps running.
    assert lab.sim.kvm_pid() not in (None, kvm_before)
    await lab.wait_for_ssh()
    assert (await hosts.probe()).reachability is Reachability.HEALTHY
    assert (await hosts.run("dd if=/dev/zero of=/data/db/probe bs=4k count=4 conv=fsync")).ok
    assert (await asyncio.to_thread(lab.sim.vm_state))["qmp_status"] == "running"
    await assert_bundle_has_screendump(hosts, cycle.bundle_id)


@pytest.mark.parametrize("real_lab", ["inode-exhaustion"], indirect=True)
async def test_inode_exhaustion_is_found_and_cleared_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    _lab, hosts = real_lab
    blocks, inodes = await data_usage(hosts)
    assert inodes == 100 and blocks < 90  # space left, no inode left
    touch = await hosts.run("touch /data/log/app/probe")
    assert not touch.ok and "No space left on device" in touch.stderr

    h = make_agent(hosts)
    repair = "systemctl disable --now session-cache && find /data/cache/sessions -type f -delete"
    verify = "df -i /data; touch /data/log/app/probe && echo writable"
    fake_api.push(
        fm.tool("n1", "devvm_shell", {"command": "df -h /data; touch /data/log/app/probe"}),
        fm.tool("n2", "devvm_shell", {"command": "df -i /data"}),
        fm.tool("n3", "devvm_shell", {"command": "du --inodes -s /data/* | sort -n"}),
        fm.tool("n4", "devvm_shell", {"command": "systemctl status session-cache"}),
        fm.reply(
            "session-cache filled /data's inodes with one file per session. Forensics first.",
            [("n5", "pve_verb", {"verb": "forensics"})],
        ),
        fm.reply(
            "Disabling the unit and deleting its files.",
            [("n6", "devvm_shell", {"command": repair, "timeout_s": 120})],
        ),
        fm.tool("n7", "devvm_shell", {"command": verify}),
        fm.text("Incident summary: /data had no inodes left (session files); cleared, disabled."),
    )
    await h.agent.handle("the app says no space left on device but df shows free space")

    assert_conversation(h, fake_api, 8)
    first = sent(fake_api, "n1")
    assert "No space left on device" in first and "/dev/vdb" in first
    assert re.search(r"100%\s+/data$", sent(fake_api, "n2"), re.M), sent(fake_api, "n2")
    inodes_by_dir = sent(fake_api, "n3")
    assert re.search(r"^(\d{4})\s+/data/cache$", inodes_by_dir, re.M), inodes_by_dir
    assert "Active: active (running)" in sent(fake_api, "n4")
    assert verbs_of(h)["forensics"].ok
    assert ended(h, "n6").ok and "exit 0" in sent(fake_api, "n6")
    assert "writable" in sent(fake_api, "n7")

    # Ask the guest ourselves.
    assert (await data_usage(hosts))[1] < 10
    assert await unit_state(hosts, "session-cache") == ("inactive", "disabled")
    left = await hosts.run("find /data/cache/sessions -type f | wc -l")
    assert left.stdout.strip() == "0"
    assert (await hosts.run("touch /data/log/app/again")).ok


@pytest.mark.parametrize("real_lab", ["read-only-root"], indirect=True)
async def test_read_only_root_is_recovered_by_a_reset_and_the_boot_fsck(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    """I/O errors made ext4 abort its journal and refuse every write on /. The storage is
    healthy again; the repair is a reboot, where e2fsck checks the root before it is mounted
    read-write (ext4 cannot take / back read-write while it runs)."""
    lab, hosts = real_lab
    refused = await hosts.run("touch /var/lib/app/probe")
    assert not refused.ok and "Read-only file system" in refused.stderr

    h = make_agent(hosts, wait_probe_interval_s=0.5)
    look = (
        "dmesg | grep -m 3 'I/O error, dev'; dmesg | grep -m 1 'Aborting journal';"
        " dmesg | grep -m 1 'Remounting filesystem read-only'"
    )
    verify = "touch /var/lib/app/probe && echo writable; cat /var/log/lab/current/fsck-root.log"
    fake_api.push(
        fm.tool("r1", "probe_devvm", {}),
        fm.tool("r2", "devvm_shell", {"command": "touch /var/lib/app/probe; findmnt -no SOURCE /"}),
        fm.tool("r3", "devvm_shell", {"command": look}),
        fm.reply(
            "The root file system hit write errors and ext4 aborted its journal: writes are"
            " refused until a reboot lets e2fsck check it. Forensics, then a reset.",
            [("r4", "pve_verb", {"verb": "reset"})],
        ),
        fm.tool("r5", "wait_for_devvm", {"timeout_s": 150}),
        fm.tool("r6", "devvm_shell", {"command": verify}),
        fm.text("Incident summary: / went read-only after I/O errors; reset; e2fsck; writable."),
    )
    await h.agent.handle("nothing on the devvm can write files any more")

    assert_conversation(h, fake_api, 7)
    assert "healthy" in sent(fake_api, "r1")  # SSH still works: only writes fail
    first = sent(fake_api, "r2")
    assert "Read-only file system" in first and "/dev/vda" in first
    kernel = sent(fake_api, "r3")
    assert "I/O error, dev vda" in kernel and "Aborting journal on device vda" in kernel
    assert "Remounting filesystem read-only" in kernel
    reset = verbs_of(h)["reset"]
    assert reset.ok and reset.bundle_id
    assert "the devvm answers" in sent(fake_api, "r5")
    after = sent(fake_api, "r6")
    assert "writable" in after and "devvm-root" in after  # e2fsck checked / at boot

    # Ask the guest ourselves: / is writable, ext4 says it is clean, the guest booted again.
    assert lab.sim.boots() >= 1
    assert (await hosts.run("touch /var/lib/app/again")).ok
    state = await hosts.run("dumpe2fs -h /dev/vda 2>/dev/null | grep 'Filesystem state'")
    assert state.stdout.split(":", 1)[1].strip() == "clean", state.stdout
    await assert_bundle_has_screendump(hosts, reset.bundle_id)


@pytest.mark.parametrize("real_lab", ["pid-exhaustion"], indirect=True)
async def test_pid_exhaustion_is_stopped_at_its_cgroup_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    """A fork bomb in one unit reached its TasksMax (the cgroup's pids.max): the unit cannot
    fork, the rest of the devvm can. Stopping the unit kills its whole cgroup."""
    _lab, hosts = real_lab
    cg = "/sys/fs/cgroup/worker-pool.service"
    full = await hosts.run(f"cat {cg}/pids.current {cg}/pids.max")
    current, limit = (int(x) for x in full.stdout.split())
    assert current == limit == 96

    h = make_agent(hosts)
    count = "ps -e --no-headers | wc -l; pgrep -c -x sleep"
    fake_api.push(
        fm.tool("p1", "devvm_shell", {"command": f"uptime; {count}"}),
        fm.tool("p2", "devvm_shell", {"command": "ps -eo pid,ppid,cgroup,args --sort=-pid | head"}),
        fm.tool("p3", "devvm_shell", {"command": "systemctl status worker-pool"}),
        fm.tool("p4", "devvm_shell", {"command": f"cat {cg}/pids.events"}),
        fm.reply(
            "worker-pool forked up to its TasksMax and keeps trying. Disabling it kills the lot.",
            [("p5", "devvm_shell", {"command": "systemctl disable --now worker-pool"})],
        ),
        fm.tool("p6", "devvm_shell", {"command": count}),
        fm.text("Incident summary: a fork bomb in worker-pool, held by its cgroup; disabled."),
    )
    await h.agent.handle("builds on the devvm fail with fork errors")

    assert_conversation(h, fake_api, 7)
    counted = sent(fake_api, "p1").split()
    assert int(counted[-1]) >= 90  # the pool's workers
    assert "/worker-pool.service" in sent(fake_api, "p2")
    status = sent(fake_api, "p3")
    assert "Tasks: 96 (limit: 96)" in status and "Resource temporarily unavailable" in status
    assert re.search(r"^max \d+$", sent(fake_api, "p4"), re.M)  # forks the cgroup refused
    assert ended(h, "p5").ok and "exit 0" in sent(fake_api, "p5")
    assert int(sent(fake_api, "p6").split()[-1]) < 5

    # Ask the guest ourselves.
    assert await unit_state(hosts, "worker-pool") == ("inactive", "disabled")
    left = await hosts.run(f"cat {cg}/pids.current")
    assert left.stdout.strip() == "0"
    assert (await hosts.run("pgrep -c -x sleep")).stdout.strip() in ("0", "1", "2")


@pytest.mark.parametrize("real_lab", ["deleted-open"], indirect=True)
async def test_deleted_but_open_file_is_found_with_lsof_and_freed_by_the_agent(
    real_lab: tuple[RealLab, HostSession], make_agent, fake_api
) -> None:
    """df says /data is full, du finds almost nothing: the space belongs to a file that was
    deleted while a process still writes it. `rm` cannot free it; ending the process does."""
    _lab, hosts = real_lab
    assert (await data_usage(hosts))[0] == 100
    du = await hosts.run("du -sm /data | cut -f1")
    assert int(du.stdout) < 5

    h = make_agent(hosts)
    fake_api.push(
        fm.tool("o1", "devvm_shell", {"command": "df -h /data; du -sh /data"}),
        fm.tool("o2", "devvm_shell", {"command": "lsof -a -nP +L1 /data"}),
        fm.reply(
            "report-exporter holds a deleted spool file open. Forensics, then disabling it.",
            [("o3", "pve_verb", {"verb": "forensics"})],
        ),
        fm.tool("o4", "devvm_shell", {"command": "systemctl disable --now report-exporter"}),
        fm.tool("o5", "devvm_shell", {"command": "df -h /data; lsof -a -nP +L1 /data"}),
        fm.text("Incident summary: a deleted spool file held open filled /data; freed."),
    )
    await h.agent.handle("the devvm's data disk is full but I cannot find the files")

    assert_conversation(h, fake_api, 6)
    df_du = sent(fake_api, "o1")
    assert re.search(r"100%\s+/data$", df_du, re.M), df_du
    held = sent(fake_api, "o2")
    assert "(deleted)" in held and "report-" in held and ".spool" in held
    assert verbs_of(h)["forensics"].ok
    assert ended(h, "o4").ok and "exit 0" in sent(fake_api, "o4")
    assert "100%" not in sent(fake_api, "o5")

    # Ask the guest ourselves.
    assert (await data_usage(hosts))[0] < 10
    assert (await hosts.run("lsof -a -nP +L1 /data")).stdout == ""
    assert await unit_state(hosts, "report-exporter") == ("inactive", "disabled")


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
