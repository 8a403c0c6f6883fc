"""The sandbox devvm runs real commands: this machine's shell and tools under a real OpenSSH sshd,
in namespaces of their own, on a size-capped tmpfs that real writers really fill. Nothing answers
a command but the command itself."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import asyncssh
import pytest

from breakglass_tui.hosts.devvm import PGID_MARKER, wrap_command
from breakglass_tui.hosts.types import Ending, OutputChunk
from breakglass_tui.lab.catalog import SANDBOX_SCENARIOS, SCENARIOS
from breakglass_tui.lab.sandbox import SandboxDevvm, sandbox_problem
from tests.support.realparts import new_key, public_line
from tests.support.waiting import until


def test_the_sandbox_runs_here():
    """CI runs as root with bubblewrap and sshd installed (scripts/setup.sh test): the sandbox
    must run, or the fast tests below mean nothing."""
    assert sandbox_problem() is None


def test_the_sandbox_stages_only_what_it_can_make_real():
    assert set(SANDBOX_SCENARIOS) < set(SCENARIOS)
    with pytest.raises(ValueError, match="cannot stage 'oom'"):
        SandboxDevvm("oom", host_key=new_key(), authorized_keys=[])


async def test_real_commands_in_namespaces_of_their_own(devvm_factory):
    devvm = await devvm_factory("healthy")
    out = await devvm.run("hostname; id -u; cat /proc/1/comm; ps -e --no-headers | wc -l; uptime")
    assert out.ok, out
    hostname, uid, init, count, uptime = out.stdout.splitlines()
    assert (hostname, uid, init) == ("devvm", "0", "bwrap")  # its own UTS and PID namespaces
    assert int(count) < 20  # its own processes only, not this machine's
    assert "load average" in uptime
    # This machine's /usr, read-only; the rest is the sandbox's own tmpfs.
    ro = await devvm.run("touch /usr/bin/breakglass-test")
    assert not ro.ok and "Read-only file system" in ro.stderr
    df = await devvm.run("df -h /data; findmnt -no FSTYPE /data")
    assert re.search(r"^tmpfs\s+32M\s", df.stdout, re.M) and df.stdout.endswith("tmpfs\n"), df
    missing = await devvm.run("nosuch-command")
    assert missing.exit_status == 127 and "nosuch-command: command not found" in missing.stderr


async def test_disk_full_is_a_real_full_tmpfs_and_a_real_writer(lab_factory):
    lab = await lab_factory("disk-full")
    from breakglass_tui.hosts.session import HostSession

    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        df = await hosts.run("df -h /data")
        assert re.search(r"100% /data$", df.stdout, re.M), df.stdout
        write = await hosts.run("echo more >> /data/log/app/other.log")
        assert not write.ok and "No space left on device" in write.stderr
        ps = await hosts.run("ps -eo pid,args")
        assert "sh /opt/lab/log-spammer" in ps.stdout
        # The repair: stop the writer (the pattern must not match this command's own line),
        # empty the log; the space is back.
        repair = await hosts.run(
            "pkill -f 'sh /opt/lab/[l]og-spammer'; : > /data/log/app/runaway.log; df -h /data"
        )
        assert repair.ok and not re.search(r"100% /data$", repair.stdout, re.M), repair
        assert "sh /opt/lab/log-spammer" not in (await hosts.run("ps -eo args")).stdout
    finally:
        await hosts.close()


async def test_deleted_open_file_holds_the_space_until_its_writer_ends(devvm_factory):
    devvm = await devvm_factory("deleted-open")
    df = await devvm.run("df --output=pcent /data | tail -n 1; du -sk /data | cut -f1")
    used, du_kb = df.stdout.split()
    assert used == "100%" and int(du_kb) < 1024  # df full, du finds nothing
    held = await devvm.run("ls -l /proc/*/fd/ 2>/dev/null | grep -c 'report-.*spool (deleted)'")
    assert int(held.stdout) >= 1
    # Its whole process group (its children inherit the descriptor), as stopping a unit would.
    freed = await devvm.run(
        "kill -- -$(pgrep -f 'opt/lab/[r]eport-exporter'); sleep 0.3;"
        " df --output=pcent /data | tail -n 1"
    )
    assert int(freed.stdout.strip().rstrip("%")) < 10


async def test_long_output_streams_in_chunks_with_stderr_apart(devvm_factory):
    devvm = await devvm_factory("healthy")
    chunks: list[OutputChunk] = []
    out = await devvm.shell.run("seq 1 100000; nosuch", timeout_s=10, on_output=chunks.append)
    assert out.exit_status == 127
    stdout_chunks = [c for c in chunks if c.stream == "stdout"]
    assert len(stdout_chunks) > 1  # streamed, not one blob at the end
    assert "".join(c.text for c in stdout_chunks) == "".join(f"{i}\n" for i in range(1, 100001))
    assert "".join(c.text for c in chunks if c.stream == "stderr").endswith(
        "nosuch: command not found\n"
    )


async def test_cancelling_run_stops_the_remote_command(devvm_factory):
    devvm = await devvm_factory("healthy")

    async def sleeping() -> bool:
        ps = await devvm.run("ps -eo args", timeout_s=5)
        return "sleep 300" in ps.stdout

    async def stopped() -> bool:
        return not await sleeping()

    task = asyncio.create_task(devvm.run("sleep 300", timeout_s=60))
    await until(sleeping, what="the command in ps")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(stopped, what="the command gone from ps")


async def test_the_process_group_marker_and_kill_of_the_group(devvm_factory):
    """The hosts layer's wrapper runs under the real sshd: it reports its process group first,
    and `kill -TERM -<pgid>` on a second channel ends the command."""
    devvm = await devvm_factory("healthy")
    conn = await devvm.connect()
    try:
        process = await conn.create_process(wrap_command("sleep 300", as_root=True))
        marker = await asyncio.wait_for(process.stdout.readline(), 5)
        assert marker.startswith(PGID_MARKER.decode())
        pgid = int(marker.split()[-1])
        killer = await conn.run(f"kill -TERM -{pgid}", check=False)
        assert killer.exit_status == 0, killer.stderr
        result = await asyncio.wait_for(process.wait(), 5)
        assert result.exit_status != 0
        assert (await conn.run(f"kill -0 -{pgid}", check=False)).exit_status == 1
    finally:
        conn.close()


async def test_only_the_lab_key_and_root_log_in(devvm_factory):
    devvm = await devvm_factory("healthy")
    known = asyncssh.import_known_hosts(devvm.target.known_hosts or "")
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            devvm.sim.port,
            username="root",
            client_keys=[stranger],
            known_hosts=known,
            config=None,
        )
    with pytest.raises(asyncssh.PermissionDenied):
        await devvm.connect(user="breakglass")
    conn = await devvm.connect()
    try:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 22)
    finally:
        conn.close()


async def test_keys_reach_the_sandbox_through_pipes_not_the_disk(tmp_path, monkeypatch):
    """The host key is written into the sandbox's tmpfs, never to a file of this machine; and
    nothing of this process's environment (a token, say) goes into the sandbox."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-for-the-devvm")
    host_key = new_key("lab-devvm-host")
    sandbox = SandboxDevvm("healthy", host_key=host_key, authorized_keys=[public_line(new_key())])
    await sandbox.start()
    try:
        secret = host_key.export_private_key("openssh")
        for path in tmp_path.rglob("*"):
            assert not path.is_file() or secret not in path.read_bytes()
        environ = Path(f"/proc/{sandbox.init_pid}/environ").read_bytes()
        assert b"hvs.not-for-the-devvm" not in environ and b"PATH=/usr/local/sbin" in environ
    finally:
        await sandbox.close()


async def test_a_reboot_keeps_data_and_starts_the_writers_again(devvm_factory):
    devvm = await devvm_factory("disk-full")
    before = await devvm.run("pgrep -f 'sh /opt/lab/[l]og-spammer'")
    await devvm.run(": > /data/log/app/runaway.log; pkill -f 'sh /opt/lab/[l]og-spammer'")
    await devvm.sandbox.reboot()
    after = await devvm.run("pgrep -f 'sh /opt/lab/[l]og-spammer'; df --output=pcent /data")
    assert after.ok, after
    assert after.stdout.split()[0] != before.stdout.strip()  # a new writer, started at boot
    assert "100%" in after.stdout  # it filled /data again before the devvm answered
    assert devvm.sandbox.boots == 2


async def test_closing_leaves_no_process(devvm_factory):
    devvm = await devvm_factory("disk-full")
    pid = devvm.sandbox.process.pid if devvm.sandbox.process else None
    assert pid is not None
    await devvm.sandbox.close()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
    # Every process of the sandbox died with it (its PID namespace went with its init).
    probe = await devvm.run("true", timeout_s=3)
    assert probe.ending is not Ending.EXITED


async def test_a_reboot_happens_when_whoever_started_the_lab_ignored_sighup(devvm_factory):
    """Under nohup or a CI runner that ignores SIGHUP, the sandbox's init must still trap it (sh
    cannot trap a signal ignored on entry): its reboot is how a reset or a cycle works."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        devvm = await devvm_factory("healthy")
    finally:
        signal.signal(signal.SIGHUP, previous)
    await devvm.sandbox.reboot()
    assert devvm.sandbox.boots == 2
    assert (await devvm.run("echo back")).stdout == "back\n"
