"""LabPveHost's own duties beyond the shared forced-command tests: a clean child environment,
output streamed as it comes, exit status and signals passed through, a clear refusal of bad
arguments."""

from __future__ import annotations

import asyncio
import time

import asyncssh
import pytest

from breakglass_tui.lab.pve_host import LabPveHost
from tests.support.realparts import new_key, public_line
from tests.support.waiting import until

SCRIPT = r"""
case "$SSH_ORIGINAL_COMMAND" in
  env) env ;;
  slow) echo first; sleep 0.8; echo second ;;
  fail) echo oops >&2; exit 7 ;;
  signal) kill -TERM $$ ;;
esac
"""


async def test_child_environment_streaming_and_exit_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A secret in the server's own environment must not reach the forced command.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-must-not-leak")
    client_key, host_key = new_key("client"), new_key("host")
    host = LabPveHost()
    port = await host.start(
        verb_argv=["/bin/sh", "-c", SCRIPT],
        verb_env={"BREAKGLASS_VERB_CONFIG": "/tmp/verb.toml"},
        authorized_key=f'command="ignored",restrict {public_line(client_key)}',
        host_key=host_key,
    )
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username="root",
            client_keys=[client_key],
            known_hosts=asyncssh.import_known_hosts(f"[127.0.0.1]:{port} {public_line(host_key)}"),
            config=None,
            agent_path=None,
        ) as conn:
            env = (await conn.run("env", env={"SSH_ORIGINAL_COMMAND": "reset"})).stdout
            assert "sk-must-not-leak" not in env
            assert "SSH_ORIGINAL_COMMAND=env\n" in env
            assert "BREAKGLASS_VERB_CONFIG=/tmp/verb.toml\n" in env
            assert "SSH_CONNECTION=127.0.0.1 " in env and f" 127.0.0.1 {port}\n" in env

            process = await conn.create_process("slow")
            started = time.monotonic()
            assert await asyncio.wait_for(process.stdout.readline(), 5) == "first\n"
            first_at = time.monotonic() - started
            assert (await process.wait()).stdout == "second\n"
            assert first_at < 0.6, "output must stream, not arrive at exit"

            failed = await conn.run("fail")
            assert (failed.exit_status, failed.stderr) == (7, "oops\n")
            killed = await conn.run("signal")
            # The forced command runs under /bin/sh -c, as with sshd: the shell reports 128+15.
            signalled = killed.exit_signal is not None and killed.exit_signal[0] == "TERM"
            assert signalled or killed.exit_status == 143, killed
    finally:
        await host.close()


async def test_start_refuses_what_it_cannot_serve() -> None:
    host = LabPveHost()
    with pytest.raises(ValueError, match="verb_argv is empty"):
        await host.start(verb_argv=[], verb_env={}, authorized_key="x", host_key=new_key())
    with pytest.raises(ValueError, match="not an OpenSSH public key line"):
        await host.start(
            verb_argv=["true"], verb_env={}, authorized_key="not a key", host_key=new_key()
        )


async def test_close_lets_a_running_command_finish_then_kills_a_laggard(tmp_path) -> None:
    client_key, host_key = new_key("client"), new_key("host")
    marker = tmp_path / "finished"
    host = LabPveHost()
    port = await host.start(
        # "quick" finishes within the grace period; anything else outlives it.
        verb_argv=[
            "/bin/sh",
            "-c",
            f'if [ "$SSH_ORIGINAL_COMMAND" = quick ]; then sleep 0.3; touch {marker};'
            " else exec sleep 60; fi",
        ],
        verb_env={},
        authorized_key=public_line(client_key),
        host_key=host_key,
    )
    conn = await asyncssh.connect(
        "127.0.0.1",
        port,
        username="root",
        client_keys=[client_key],
        known_hosts=asyncssh.import_known_hosts(f"[127.0.0.1]:{port} {public_line(host_key)}"),
        config=None,
        agent_path=None,
    )
    await conn.create_process("quick")
    await conn.create_process("slow")
    children = await until(
        lambda: len(host.running_commands) == 2 and host.running_commands,
        what="both commands running",
    )
    started = time.monotonic()
    await host.close(grace_s=1.5)
    assert time.monotonic() - started < 10
    assert marker.exists(), "a command running at close() must be let finish"
    assert all(child.returncode is not None for child in children)
    conn.close()
