"""The devvm shell against a real OpenSSH sshd on loopback, with a real shell behind it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from breakglass_tui.hosts.devvm import DevvmShell, stop_command, unwrap_command, wrap_command
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending, OutputChunk, SshTarget
from tests.hosts.sshparts import (
    kill_pids,
    other_host_key_line,
    pids_matching,
    session_pids,
    sshd_descendants,
    target_for,
    wait_for_pids,
)
from tests.support.realparts import SshAgent, Sshd, new_key, public_line, start_sshd
from tests.support.waiting import until

KEY = new_key("breakglass-devvm")


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    server = start_sshd(public_line(KEY) + "\n")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def shell(sshd: Sshd):
    devvm = DevvmShell(target_for(sshd), ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    try:
        yield devvm
    finally:
        await devvm.close()


async def test_streams_stdout_and_stderr_apart_in_order_with_exit_status(shell: DevvmShell):
    chunks: list[OutputChunk] = []
    outcome = await shell.run(
        "echo one; sleep 0.2; echo err >&2; sleep 0.2; echo two; exit 3", on_output=chunks.append
    )
    assert outcome.ending is Ending.EXITED
    assert outcome.exit_status == 3 and not outcome.ok
    assert [(c.stream, c.text) for c in chunks] == [
        ("stdout", "one\n"),
        ("stderr", "err\n"),
        ("stdout", "two\n"),
    ]
    # The whole output is kept for the transcript; the process-group marker line is stripped.
    assert outcome.stdout == "one\ntwo\n" and outcome.stderr == "err\n"
    assert (outcome.stdout_bytes, outcome.stderr_bytes) == (8, 4)
    assert not outcome.kept_tail_only


async def test_output_arrives_while_the_command_still_runs(shell: DevvmShell):
    started = time.monotonic()
    seen: list[float] = []
    outcome = await shell.run(
        "echo first; sleep 1; echo second", on_output=lambda c: seen.append(time.monotonic())
    )
    assert outcome.ok
    assert seen and seen[0] - started < outcome.duration_s - 0.7


async def test_runs_as_root_and_exit_zero_is_ok(shell: DevvmShell):
    outcome = await shell.run("id -u")
    assert outcome.ok and outcome.stdout == "0\n"


async def test_multibyte_characters_split_across_reads_survive(shell: DevvmShell):
    chunks: list[OutputChunk] = []
    outcome = await shell.run(
        r"printf '\303'; sleep 0.3; printf '\251t\342\202'; sleep 0.3; printf '\254 \377\n'",
        on_output=chunks.append,
    )
    assert outcome.stdout == "ét€ \ufffd\n"
    assert "".join(c.text for c in chunks) == outcome.stdout
    assert outcome.stdout_bytes == 9


async def test_deadline_stops_the_remote_command(shell: DevvmShell):
    marker = "sleep 777.101"
    try:
        outcome = await shell.run(f"echo started; {marker}", timeout_s=1.0)
        assert outcome.ending is Ending.TIMED_OUT
        assert "1s deadline" in outcome.message and "stopped" in outcome.message
        assert outcome.stdout == "started\n"
        assert "setsid" not in outcome.stderr
        assert outcome.duration_s < 4
        assert await wait_for_pids(marker, present=False) == []
    finally:
        kill_pids(pids_matching(marker))


async def test_cancel_stops_the_remote_command_and_its_quiet_children(shell: DevvmShell):
    # A quiet background child, double-forked, that closing the channel would never reach.
    marker, child = "sleep 876.501", "sleep 876.502"
    task = asyncio.create_task(shell.run(f"({child} >/dev/null 2>&1 &); {marker}"))
    try:
        assert await wait_for_pids(marker, present=True), "the remote command never started"
        assert await wait_for_pids(child, present=True)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Gone on the devvm itself (the sshd is on loopback: its processes are ours to see).
        assert await wait_for_pids(marker, present=False) == []
        assert await wait_for_pids(child, present=False) == []
    finally:
        kill_pids(pids_matching(marker))
        kill_pids(pids_matching(child))
    # The shell is still usable after a cancel.
    assert (await shell.run("echo after")).stdout == "after\n"


def start_quiet_command(sshd: Sshd, marker: str) -> tuple[DevvmShell, asyncio.Task, list[str]]:
    """A new shell running `echo started; <marker>` (a command that then stays quiet), and
    the output it has streamed so far."""
    devvm = DevvmShell(target_for(sshd), ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    seen: list[str] = []
    task = asyncio.create_task(
        devvm.run(f"echo started; {marker}", on_output=lambda chunk: seen.append(chunk.text))
    )
    return devvm, task, seen


async def test_close_right_after_a_cancel_still_stops_the_remote_command(sshd: Sshd):
    """The app cancels the running command and closes the shell at once when it quits: close()
    must wait for the kill to be sent, or the quiet command outlives the closed channel."""
    marker = "sleep 4712.25"
    devvm, task, seen = start_quiet_command(sshd, marker)
    try:
        assert await wait_for_pids(marker, present=True), "the remote command never started"
        # Its process-group line comes before its first output: once that is here, so is the line.
        await until(lambda: "started" in "".join(seen), what="the command's first output")
        task.cancel()
        await asyncio.sleep(0)  # the cancel is delivered: run() has started stopping it
        await devvm.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Gone on the devvm itself, not merely our channel closed.
        assert await wait_for_pids(marker, present=False, timeout=3.0) == []
    finally:
        kill_pids(pids_matching(marker))
        await devvm.close()


async def test_close_waits_only_a_bounded_time_for_a_stuck_stop(
    sshd: Sshd, monkeypatch: pytest.MonkeyPatch
):
    """A stop that cannot finish (a wedged guest: the kill itself hangs) delays close() by its
    bound, not forever."""
    import breakglass_tui.hosts.devvm as devvm_module

    monkeypatch.setattr(devvm_module, "STOP_CLOSE_WAIT_S", 0.3)
    stuck_kill = "sleep 4713.5"  # what the devvm makes of the kill: it never returns
    monkeypatch.setattr(devvm_module, "stop_command", lambda pgid, *, as_root: stuck_kill)
    marker = "sleep 4712.75"
    devvm, task, seen = start_quiet_command(sshd, marker)
    try:
        await until(lambda: "started" in "".join(seen), what="the command's first output")
        task.cancel()
        assert await wait_for_pids(stuck_kill, present=True), "the stop never began"
        started = time.monotonic()
        await devvm.close()  # a stop in flight that will never end
        assert time.monotonic() - started < 2.0
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        kill_pids(pids_matching(marker))
        kill_pids(pids_matching(stuck_kill))
        await devvm.close()


async def test_keep_output_false_keeps_a_bounded_tail_and_counts_every_byte(shell: DevvmShell):
    streamed = 0

    def count(chunk: OutputChunk) -> None:
        nonlocal streamed
        streamed += len(chunk.text)

    outcome = await shell.run(
        "head -c 300000 /dev/zero | tr '\\0' x; echo end; echo oops >&2",
        on_output=count,
        keep_output=False,
    )
    assert outcome.ok and outcome.kept_tail_only
    assert outcome.stdout_bytes == 300004 and streamed == 300004 + 5
    assert len(outcome.stdout) == 64 * 1024 and outcome.stdout.endswith("xxend\n")
    assert outcome.stderr == "oops\n"


async def test_a_failing_output_consumer_does_not_break_the_command(shell: DevvmShell):
    def broken(chunk: OutputChunk) -> None:
        raise RuntimeError("the UI fell over")

    outcome = await shell.run("echo still; exit 0", on_output=broken)
    assert outcome.ok and outcome.stdout == "still\n"


async def test_host_key_mismatch_is_refused_with_a_message(sshd: Sshd):
    target = target_for(sshd, known_hosts=other_host_key_line(sshd.port))
    devvm = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    outcome = await devvm.run("echo should-not-run")
    await devvm.close()
    assert outcome.ending is Ending.FAILED
    assert "NOT the pinned one" in outcome.message and "refusing" in outcome.message
    assert outcome.stdout == ""


async def test_unknown_host_key_is_refused_with_a_message(sshd: Sshd):
    target = target_for(sshd, known_hosts=other_host_key_line(sshd.port + 1))
    devvm = DevvmShell(target, ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    outcome = await devvm.run("echo should-not-run")
    await devvm.close()
    assert outcome.ending is Ending.FAILED
    assert "unknown to the pinned known_hosts" in outcome.message


async def test_a_target_without_pinned_host_key_is_refused(sshd: Sshd):
    target = SshTarget("127.0.0.1", sshd.port, "root", None)
    outcome = await DevvmShell(target, ConnectOptions(client_keys=[KEY])).run("true")
    assert outcome.ending is Ending.FAILED
    assert "no pinned host key" in outcome.message


async def test_auth_failure_says_the_key_was_refused(sshd: Sshd):
    devvm = DevvmShell(
        target_for(sshd), ConnectOptions(client_keys=[new_key("stranger")], connect_timeout_s=3.0)
    )
    outcome = await devvm.run("true")
    await devvm.close()
    assert outcome.ending is Ending.FAILED
    assert "refused our key" in outcome.message and "authorized_keys" in outcome.message


async def test_keys_come_from_the_named_ssh_agent(sshd: Sshd, ssh_agent: SshAgent):
    import asyncssh

    agent = await asyncssh.connect_agent(ssh_agent.socket_path)
    assert agent is not None
    try:
        await agent.add_keys([KEY])
        devvm = DevvmShell(target_for(sshd), ConnectOptions(agent_path=ssh_agent.socket_path))
        outcome = await devvm.run("echo via-agent")
        await devvm.close()
        assert outcome.ok and outcome.stdout == "via-agent\n"
    finally:
        await agent.remove_all()
        agent.close()


async def test_an_empty_agent_is_reported_not_mistaken_for_auth_failure(
    sshd: Sshd, ssh_agent: SshAgent
):
    devvm = DevvmShell(target_for(sshd), ConnectOptions(agent_path=ssh_agent.socket_path))
    outcome = await devvm.run("true")
    assert outcome.ending is Ending.FAILED and "holds no key" in outcome.message


async def test_no_keys_at_all_is_refused_before_connecting(sshd: Sshd):
    outcome = await DevvmShell(target_for(sshd), ConnectOptions()).run("true")
    assert outcome.ending is Ending.FAILED and "no SSH key" in outcome.message


async def test_refused_connection_is_a_failed_outcome_not_an_exception():
    from tests.support.realparts import free_port

    target = SshTarget("127.0.0.1", free_port(), "root", "[127.0.0.1]:1 ssh-ed25519 AAAA\n")
    outcome = await DevvmShell(target, ConnectOptions(client_keys=[KEY])).run("true")
    assert outcome.ending is Ending.FAILED and "refused the connection" in outcome.message


async def test_dropped_connection_fails_the_command_and_the_next_run_reconnects():
    server = start_sshd(public_line(KEY) + "\n")
    marker = "sleep 654.301"
    devvm = DevvmShell(target_for(server), ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    try:
        started = asyncio.Event()
        task = asyncio.create_task(
            devvm.run(f"echo going; {marker}", on_output=lambda chunk: started.set())
        )
        await asyncio.wait_for(started.wait(), 5)
        # Kill the sshd process serving our connection: the network dropping under us.
        for pid in session_pids(server):
            os.kill(pid, signal.SIGKILL)
        outcome = await asyncio.wait_for(task, 10)
        assert outcome.ending is Ending.DISCONNECTED
        assert "dropped" in outcome.message and "reconnects" in outcome.message
        assert outcome.stdout == "going\n"
        again = await devvm.run("echo back")
        assert again.ok and again.stdout == "back\n"
    finally:
        await devvm.close()
        kill_pids(pids_matching(marker))
        server.close()


async def test_stopped_sshd_gives_a_refused_outcome_not_an_exception():
    server = start_sshd(public_line(KEY) + "\n")
    devvm = DevvmShell(target_for(server), ConnectOptions(client_keys=[KEY], connect_timeout_s=3.0))
    try:
        assert (await devvm.run("true")).ok
        for pid in session_pids(server):
            os.kill(pid, signal.SIGKILL)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(5)
        outcome = await devvm.run("true")
        assert outcome.ending in (Ending.FAILED, Ending.DISCONNECTED)
        assert "refused" in outcome.message
    finally:
        await devvm.close()
        server.close()


def test_the_wrapper_round_trips_for_the_simulated_devvm():
    command = "df -h / && echo 'it''s' \"$HOME\" | tee /tmp/x"
    assert unwrap_command(wrap_command(command, as_root=True)) == command
    wrapped = wrap_command(command, as_root=False)
    assert wrapped.startswith("exec sudo -n -- setsid -w ")
    assert unwrap_command(wrapped) == command
    assert unwrap_command("uptime") is None
    assert stop_command(42, as_root=False).startswith("sudo -n -- sh -c ")


async def test_a_command_that_ignores_term_is_killed(shell: DevvmShell):
    marker = "sleep 432.101"
    try:
        outcome = await shell.run(f"trap '' TERM; {marker}; echo survived", timeout_s=0.5)
        assert outcome.ending is Ending.TIMED_OUT
        assert "survived" not in outcome.stdout
        assert await wait_for_pids(marker, present=False) == []
    finally:
        kill_pids(pids_matching(marker))


async def test_a_silently_dead_link_is_detected_by_keepalives_and_the_next_run_reconnects():
    # SIGSTOP the sshd processes serving our connection: TCP stays up, nothing answers — a
    # guest frozen under us. Keepalives (0.5 s x 2) must notice without the 120 s deadline.
    server = start_sshd(public_line(KEY) + "\n")
    marker = "sleep 598.101"
    devvm = DevvmShell(
        target_for(server),
        ConnectOptions(client_keys=[KEY], keepalive_interval_s=0.5, keepalive_count_max=2),
    )
    frozen: list[int] = []
    try:
        started = asyncio.Event()
        task = asyncio.create_task(
            devvm.run(f"echo going; {marker}", on_output=lambda chunk: started.set())
        )
        await asyncio.wait_for(started.wait(), 5)
        frozen = sshd_descendants(server)
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        outcome = await asyncio.wait_for(task, 6)
        assert outcome.ending is Ending.DISCONNECTED and "dropped" in outcome.message
        assert outcome.duration_s < 5
        again = await devvm.run("echo back")
        assert again.ok and again.stdout == "back\n"
    finally:
        await devvm.close()
        kill_pids(frozen)
        kill_pids(pids_matching(marker))
        server.close()


async def test_host_session_takes_its_timers_from_settings(sshd: Sshd):
    from breakglass_tui.config import Settings
    from breakglass_tui.hosts.session import HostSession

    settings = Settings(command_timeout_s=0.5)
    pve = SshTarget("127.0.0.1", 9, "breakglass", "[127.0.0.1]:9 ssh-ed25519 AAAA\n", name="pve")
    session = HostSession(target_for(sshd), pve, client_keys=[KEY], settings=settings)
    marker = "sleep 597.101"
    try:
        outcome = await session.run(f"echo hi; {marker}", keep_output=False)
        assert outcome.ending is Ending.TIMED_OUT and "0.5s deadline" in outcome.message
        assert outcome.stdout == "hi\n" and outcome.kept_tail_only
        assert (await session.probe()).reachability.value == "healthy"
    finally:
        await session.close()
        kill_pids(pids_matching(marker))


async def test_a_command_killed_by_a_signal_says_which(shell: DevvmShell):
    # What the OOM killer does to a command: SIGKILL from outside.
    outcome = await shell.run("echo before; kill -KILL $$; echo after")
    assert outcome.ending is Ending.EXITED and outcome.signal == "KILL"
    assert "killed by signal KILL" in outcome.message
    assert outcome.stdout == "before\n" and "setsid" not in outcome.stderr
