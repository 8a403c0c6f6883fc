"""Every lab scenario diagnosed and repaired through SSH, with the hosts layer's own DevvmShell
(so its wrapper, sudo -n, and stop mechanism run against the simulated devvm)."""

from __future__ import annotations

import re

from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending, OutputChunk
from breakglass_tui.lab.scenarios import RUNAWAY_LOG


async def test_healthy_devvm_answers_like_debian(devvm_factory):
    devvm = await devvm_factory("healthy")
    out = await devvm.run("hostname && whoami && sudo -n whoami && uptime")
    assert out.ok, out
    hostname, user, root, uptime = out.stdout.splitlines()
    assert (hostname, user, root) == ("devvm", "root", "root")  # the shell runs as root (sudo -n)
    assert "load average: 0.08, 0.12, 0.10" in uptime
    out = await devvm.run("df -h / && systemctl --failed && free -m")
    assert out.ok and " 1" in out.stdout.splitlines()[1] and "0 loaded units listed." in out.stdout
    out = await devvm.run("lsof -nP")
    assert (out.ending, out.exit_status, out.stderr) == (
        Ending.EXITED,
        127,
        "sh: 1: lsof: not found\n",
    )


async def test_disk_full_diagnosed_and_repaired(lab_factory):
    lab = await lab_factory("disk-full")
    shell = DevvmShell(lab.devvm, ConnectOptions(client_keys=[lab.devvm_key]))
    try:
        df = await shell.run("df -h /")
        assert re.search(r"^/dev/vda1 +49G +4\dG +0 100% /$", df.stdout, re.M), df.stdout
        du = await shell.run("du -sh /var/log/* | sort -rh | head -n 1")
        assert du.stdout == "38G\t/var/log/app\n"
        ls = await shell.run("ls -la /var/log/app")
        assert re.search(r"-rw-r--r-- 1 root +root +4\d{10} .* runaway\.log$", ls.stdout, re.M)
        journal = await shell.run("journalctl -p err -n 20 --no-pager")
        assert "no space left on device" in journal.stdout.lower()
        ps = await shell.run("ps aux | grep log-spammer")
        assert "/usr/local/bin/log-spammer --out /var/log/app/runaway.log" in ps.stdout

        repair = await shell.run(f"rm -f {RUNAWAY_LOG} && systemctl stop log-spammer")
        assert repair.ok, repair
        df = await shell.run("df -h /")
        assert re.search(r"^/dev/vda1 +49G +8\.\dG +3\dG +\d\d% /$", df.stdout, re.M), df.stdout
        status = await shell.run("systemctl status log-spammer")
        assert status.exit_status == 3 and "Active: inactive (dead)" in status.stdout
    finally:
        await shell.close()


async def test_disk_full_log_regrows_while_the_writer_runs(devvm_factory):
    devvm = await devvm_factory("disk-full")
    assert (await devvm.run(f"truncate -s 0 {RUNAWAY_LOG}")).ok
    devvm.sim.state._spam_checked -= 1.0  # a second of writing, without waiting for it
    ls = await devvm.run(f"ls -l {RUNAWAY_LOG}")
    assert int(ls.stdout.split()[4]) >= 4 * 1024 * 1024  # the writer is still at it


async def test_oom_diagnosed_and_repaired(lab_factory):
    lab = await lab_factory("oom")
    shell = DevvmShell(lab.devvm, ConnectOptions(client_keys=[lab.devvm_key]))
    try:
        free = await shell.run("free -m")
        available = int(free.stdout.splitlines()[1].split()[-1])
        assert available < 400
        dmesg = await shell.run("dmesg -T | grep -i 'killed process'")
        assert "Out of memory: Killed process" in dmesg.stdout
        top = await shell.run("ps -eo pid,user,rss,comm --sort=-rss | head -n 2")
        pid = int(top.stdout.splitlines()[1].split()[0])
        assert top.stdout.splitlines()[1].split()[1:] == ["viktor", "15402112", "memhog"]
        psi = await shell.run("cat /proc/pressure/memory")
        assert psi.stdout.startswith("some avg10=71.33 ")

        assert (await shell.run(f"kill {pid}")).ok
        free = await shell.run("free -m")
        assert int(free.stdout.splitlines()[1].split()[-1]) > 12_000
        gone = await shell.run(f"ps -p {pid} -o pid=")
        assert gone.stdout == ""
    finally:
        await shell.close()


async def test_stuck_service_diagnosed_and_repaired(lab_factory):
    lab = await lab_factory("stuck-service")
    shell = DevvmShell(lab.devvm, ConnectOptions(client_keys=[lab.devvm_key]))
    try:
        failed = await shell.run("systemctl --failed --no-pager")
        assert "● webapp.service loaded failed failed Example web application" in failed.stdout
        status = await shell.run("systemctl status webapp --no-pager")
        assert status.exit_status == 3
        assert "Active: failed (Result: timeout)" in status.stdout
        journal = await shell.run("journalctl -u webapp -n 5 --no-pager")
        assert "stale lock?" in journal.stdout

        assert (await shell.run("systemctl restart webapp")).ok
        status = await shell.run("systemctl status webapp --no-pager")
        assert status.ok and "Active: active (running)" in status.stdout
        assert "0 loaded units listed." in (await shell.run("systemctl --failed")).stdout
    finally:
        await shell.close()


async def test_io_stall_disk_commands_hang_and_are_stopped(devvm_factory):
    devvm = await devvm_factory("io-stall", io_delay_s=0.3)
    uptime = await devvm.run("uptime", timeout_s=5)
    assert uptime.ok and uptime.duration_s >= 0.3  # /proc answers, slowly
    assert "load average: 38.12" in uptime.stdout
    dmesg = await devvm.run("dmesg | grep 'blocked for more than'")
    assert "INFO: task jbd2/vda1-8:245 blocked for more than 120 seconds." in dmesg.stdout
    psi = await devvm.run("cat /proc/pressure/io")
    assert psi.stdout.startswith("some avg10=98.61 ")

    hung = await devvm.run("df -h", timeout_s=0.8)
    assert hung.ending is Ending.TIMED_OUT, hung
    assert "the remote command was stopped" in hung.message
    ps = await devvm.run("ps -eo pid,args", timeout_s=5)
    assert "df -h" not in ps.stdout  # the stopped command is gone from the devvm
    for command in ("sync", "ls /var/log", f"cat {RUNAWAY_LOG}", "journalctl -n 5"):
        assert (await devvm.run(command, timeout_s=0.5)).ending is Ending.TIMED_OUT, command


async def test_long_output_streams_in_chunks_with_stderr_apart(devvm_factory):
    devvm = await devvm_factory("healthy")
    chunks: list[OutputChunk] = []
    out = await devvm.shell.run("seq 1 100000; nosuch", timeout_s=10, on_output=chunks.append)
    assert out.exit_status == 127
    stdout_chunks = [c for c in chunks if c.stream == "stdout"]
    assert len(stdout_chunks) > 10  # streamed, not one blob at the end
    assert "".join(c.text for c in stdout_chunks) == "".join(f"{i}\n" for i in range(1, 100001))
    assert [c.text for c in chunks if c.stream == "stderr"] == ["sh: 1: nosuch: not found\n"]
