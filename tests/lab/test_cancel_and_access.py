"""A running simulated command stops when the operator cancels, when the channel closes, on a
signal request, or on `kill` of its pid; and only the authorized key gets in."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from breakglass_tui.hosts.devvm import PGID_MARKER, wrap_command


async def _commands(devvm) -> str:
    ps = await devvm.run("ps -eo pid,pgid,args", timeout_s=5)
    assert ps.ok, ps
    return ps.stdout


async def test_cancelling_run_stops_the_remote_command(devvm_factory):
    devvm = await devvm_factory("healthy")
    task = asyncio.create_task(devvm.run("sleep 300", timeout_s=60))
    for _ in range(50):
        if "sleep 300" in await _commands(devvm):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the command never showed in ps")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "sleep 300" not in await _commands(devvm)


async def test_closing_the_channel_stops_the_command(devvm_factory):
    devvm = await devvm_factory("io-stall")
    conn = await devvm.connect()
    try:
        process = await conn.create_process("sync")
        await asyncio.sleep(0.2)
        assert "sync" in await _commands(devvm)
        process.close()
        await process.wait_closed()
        await asyncio.sleep(0.05)
        assert " sync" not in await _commands(devvm)
    finally:
        conn.close()


async def test_signal_request_and_kill_of_the_pid_stop_the_command(devvm_factory):
    devvm = await devvm_factory("healthy")
    conn = await devvm.connect()
    try:
        process = await conn.create_process("sleep 300")
        await asyncio.sleep(0.1)
        process.send_signal("TERM")
        result = await asyncio.wait_for(process.wait(), 5)
        assert result.exit_signal[0] == "TERM"

        # The hosts layer's wrapper reports the process group; kill -TERM -<pgid> ends it.
        process = await conn.create_process(wrap_command("sleep 300", as_root=False))
        marker = await asyncio.wait_for(process.stdout.readline(), 5)
        assert marker.startswith(PGID_MARKER.decode())
        pgid = int(marker.split()[-1])
        killer = await conn.run(f"sudo -n kill -TERM -{pgid}", check=False)
        assert killer.exit_status == 0, killer.stderr
        result = await asyncio.wait_for(process.wait(), 5)
        assert result.exit_signal[0] == "TERM"
        assert (await conn.run(f"kill -0 -{pgid}", check=False)).exit_status == 1
    finally:
        conn.close()


async def test_only_the_lab_key_and_user_log_in(devvm_factory):
    devvm = await devvm_factory("healthy")
    known = asyncssh.import_known_hosts(devvm.target.known_hosts)
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            devvm.sim.port,
            username="breakglass",
            client_keys=[stranger],
            known_hosts=known,
            config=None,
        )
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            devvm.sim.port,
            username="root",
            client_keys=[devvm.key],
            known_hosts=known,
            config=None,
        )
    conn = await devvm.connect()
    try:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 22)
    finally:
        conn.close()
