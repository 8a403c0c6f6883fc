"""breakglass-verb behind a forced command, reached over SSH with asyncssh: through a real
OpenSSH sshd (``command="…",restrict``) and through the lab's LabPveHost, which must behave the
same way. Verbs work; hostile commands arrive verbatim and are refused with no qm call; shell,
subsystem, pty and forwarding requests get nothing useful."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import time
from typing import Any

import asyncssh
import pytest

from breakglass_tui.lab.sim_pve import SimPve
from tests.sshd_verb.conftest import ECHO_MARK, PveEndpoint

HOSTILE = [
    "status; rm -rf /",
    "status\nreset",
    "$(reboot)",
    "status && qm stop 102",
    "status || reboot",
    "status | tee /tmp/pwned",
    "`reboot`",
    "status > /etc/passwd",
    "reset 103",
    "qm reset 102",
    " status",
    "status ",
    "status\t",
    "STATUS",
    "Status",
    "stаtus",  # Cyrillic а
    "ｓｔａｔｕｓ",  # fullwidth
    "status\r",
    "cycle;cycle",
    "bundle ../../../etc/shadow",
    "bundle 20261128T000000Z-forensics-zzzzzz",
    "status" * 100,
    "-h",
    "'status'",
    '"reset"',
]


@pytest.fixture(params=["openssh", "lab"])
def pve(request: pytest.FixtureRequest) -> PveEndpoint:
    """Each test runs against the real sshd and against the lab's PVE host."""
    return request.getfixturevalue(f"{request.param}_pve")


async def run(
    conn: asyncssh.SSHClientConnection, command: str | None = None, **kwargs: Any
) -> asyncssh.SSHCompletedProcess:
    return await asyncio.wait_for(conn.run(command, **kwargs), 60)


async def run_all(conn: asyncssh.SSHClientConnection, commands: list[str]) -> list[Any]:
    """Run each command on its own channel, a few at once (sshd's MaxSessions is 10)."""
    results: list[Any] = []
    for start in range(0, len(commands), 8):
        batch = commands[start : start + 8]
        results += await asyncio.gather(*(run(conn, command) for command in batch))
    return results


def lock_is_free(sim: SimPve) -> bool:
    """Whether no mutating verb holds the verb's lock right now."""
    with open(sim.state_dir / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True


def document(result: asyncssh.SSHCompletedProcess) -> dict[str, Any]:
    return json.loads(result.stdout)


def assert_refused_as_bad_input(
    result: asyncssh.SSHCompletedProcess, what: str, *, stderr_line: bool = True
) -> None:
    assert result.exit_status == 2, f"{what!r}: exit {result.exit_status}, {result.stderr!r}"
    doc = document(result)
    assert doc["ok"] is False and doc["refused"] == "bad_input" and doc["exit_code"] == 2
    if stderr_line:
        # Only the verb's own lines count: sshd runs the command through root's login shell,
        # and bash sources ~/.bashrc under sshd, which on this machine can print (pyenv).
        own = [line for line in result.stderr.splitlines() if line.startswith("breakglass-verb:")]
        assert len(own) == 1, f"one line on stderr on refusal: {result.stderr!r}"


async def test_status_works(pve: PveEndpoint, verb_sim: SimPve) -> None:
    async with await pve.connect() as conn:
        result = await run(conn, "status")
    assert result.exit_status == 0, result.stderr
    doc = document(result)
    assert doc["verb"] == "status" and doc["ok"] is True and doc["vmid"] == 102
    assert doc["state_after"] == "running" and doc["refused"] is None


@pytest.mark.slow
async def test_hostile_commands_arrive_verbatim(pve: PveEndpoint) -> None:
    async with await pve.connect(echo=True) as conn:
        results = await run_all(conn, HOSTILE)
    for command, result in zip(HOSTILE, results, strict=True):
        assert result.stdout == command, f"the forced command saw {result.stdout!r}"


@pytest.mark.slow
async def test_hostile_commands_are_refused_without_a_qm_call(
    pve: PveEndpoint, verb_sim: SimPve
) -> None:
    before = len(verb_sim.calls())
    log = verb_sim.state_dir / "verb.log"  # the sim has no syslog: the verb's fallback log
    log_before = log.read_text().splitlines() if log.exists() else []
    async with await pve.connect() as conn:
        client_port = conn.get_extra_info("sockname")[1]
        results = await run_all(conn, HOSTILE)
    for command, result in zip(HOSTILE, results, strict=True):
        assert_refused_as_bad_input(result, command)
    assert verb_sim.calls()[before:] == [], "a refused command reached qm or QMP"
    # Each refusal is logged as exactly one line (newlines in the input are escaped), with the
    # connection it came from (SSH_CONNECTION names our client port).
    new_lines = log.read_text().splitlines()[len(log_before) :]
    assert len(new_lines) == len(HOSTILE), new_lines
    assert all(f"127.0.0.1 {client_port} 127.0.0.1 {pve.port}" in line for line in new_lines)


async def test_a_command_with_nul_never_reaches_qm(pve: PveEndpoint, verb_sim: SimPve) -> None:
    before = len(verb_sim.calls())
    try:
        async with await pve.connect() as conn:
            result = await run(conn, "status\x00reset")
        assert result.exit_status != 0
    except (asyncssh.Error, OSError):
        pass  # sshd may drop the request or the connection: either way nothing ran
    assert verb_sim.calls()[before:] == []


async def test_a_mutating_verb_captures_forensics_before_it_acts(
    pve: PveEndpoint, verb_sim: SimPve
) -> None:
    boot_before = verb_sim.vm_state()["boot_id"]
    before = len(verb_sim.calls())
    async with await pve.connect() as conn:
        result = await run(conn, "reset")
        assert result.exit_status == 0, result.stdout + result.stderr
        doc = document(result)
        calls = [text for _, text in verb_sim.calls()[before:]]
        fetched = await run(conn, f"bundle {doc['bundle_id']}")
    assert doc["verb"] == "reset" and doc["ok"] is True and doc["bundle_id"]
    assert verb_sim.vm_state()["boot_id"] == boot_before + 1
    action = calls.index("qm reset 102")
    forensics = [
        c for c in calls[:action] if c.startswith(("qmp query-", "qm status", "qm config"))
    ]
    assert forensics, f"no forensics before the reset: {calls}"
    # The bundle can be fetched back through the same forced command.
    assert fetched.exit_status == 0, fetched.stderr
    bundle = document(fetched)
    assert bundle["ok"] is True and bundle["bundle_id"] == doc["bundle_id"]
    assert bundle["manifest"] and bundle["files"]
    assert all(
        base64.b64decode(data, validate=True) is not None for data in bundle["files"].values()
    )


async def test_a_shell_request_runs_the_forced_command_with_no_original_command(
    pve: PveEndpoint, verb_sim: SimPve
) -> None:
    async with await pve.connect(echo=True) as conn:
        assert (await run(conn)).stdout == ECHO_MARK  # SSH_ORIGINAL_COMMAND is unset
    before = len(verb_sim.calls())
    async with await pve.connect() as conn:
        assert_refused_as_bad_input(await run(conn), "<shell>")
    assert verb_sim.calls()[before:] == []


async def test_a_subsystem_request_is_routed_to_the_forced_command_and_refused(
    pve: PveEndpoint, verb_sim: SimPve
) -> None:
    async with await pve.connect(echo=True) as conn:
        assert (await run(conn, subsystem="sftp")).stdout == "/usr/lib/openssh/sftp-server"
    before = len(verb_sim.calls())
    async with await pve.connect() as conn:
        # sshd drops a subsystem's stderr: the JSON document on stdout is all the client gets.
        result = await run(conn, subsystem="sftp")
        assert_refused_as_bad_input(result, "<sftp>", stderr_line=False)
        assert result.stderr == ""
        with pytest.raises((asyncssh.Error, OSError)):
            async with asyncio.timeout(30):
                await conn.start_sftp_client()
    assert verb_sim.calls()[before:] == []


async def test_pty_and_forwarding_are_refused(pve: PveEndpoint, verb_sim: SimPve) -> None:
    before = len(verb_sim.calls())
    async with await pve.connect() as conn:
        with pytest.raises(asyncssh.ChannelOpenError, match="PTY"):
            await conn.create_process("status", term_type="xterm")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", pve.port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", pve.port)
    assert verb_sim.calls()[before:] == []


async def test_a_key_that_is_not_authorized_is_refused(pve: PveEndpoint) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            pve.port,
            username="root",
            client_keys=[stranger],
            known_hosts=asyncssh.import_known_hosts(pve.known_hosts),
            config=None,
            agent_path=None,
            connect_timeout=10,
        )


@pytest.mark.slow
async def test_a_cycle_finishes_when_the_client_disconnects_halfway(
    pve: PveEndpoint, verb_sim: SimPve
) -> None:
    boot_before = verb_sim.vm_state()["boot_id"]
    before = len(verb_sim.calls())
    conn = await pve.connect()
    process = await conn.create_process("cycle")
    deadline = time.monotonic() + 30
    while not any(c.startswith("qm stop 102") for _, c in verb_sim.calls()[before:]):
        assert time.monotonic() < deadline, "the cycle never reached qm stop"
        await asyncio.sleep(0.01)
    conn.abort()  # the client vanishes between stop and start
    process.close()
    # A mutating verb holds <state_dir>/lock until it exits: free lock = the verb is done.
    while not lock_is_free(verb_sim) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert lock_is_free(verb_sim), "the verb is still running"
    assert verb_sim.vm_state()["boot_id"] > boot_before
    calls = [c for _, c in verb_sim.calls()[before:]]
    stop = next(i for i, c in enumerate(calls) if c.startswith("qm stop 102"))
    assert calls.index("qm start 102") > stop, calls
    assert verb_sim.vm_state()["status"] == "running", "the cycle left the VM off"
