"""The reachability probe tells each way a devvm can be unreachable apart, within its budget."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.types import Reachability, SshTarget
from tests.hosts.sshparts import full_backlog_listener, other_host_key_line, target_for
from tests.support.realparts import Sshd, free_port, new_key, public_line, start_sshd

KEY = new_key("breakglass-probe")
FAILING_KEY = new_key("breakglass-probe-forced-fail")
PINNED_ELSEWHERE = "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n"


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    # The second key may log in, but its forced command fails whatever is asked.
    failing = f'command="echo broken disk >&2; exit 1",restrict {public_line(FAILING_KEY)}'
    keys = f"{public_line(KEY)}\n{failing}\n"
    server = start_sshd(keys)
    try:
        yield server
    finally:
        server.close()


async def test_healthy(sshd: Sshd):
    result = await probe_devvm(target_for(sshd), client_keys=[KEY])
    assert result.reachability is Reachability.HEALTHY
    assert result.banner and result.banner.startswith("SSH-2.0-OpenSSH")
    assert "load average" in result.message
    assert result.elapsed_s < 3


async def test_refused_on_a_closed_port():
    target = SshTarget("127.0.0.1", free_port(), "root", PINNED_ELSEWHERE)
    result = await probe_devvm(target, client_keys=[KEY])
    assert result.reachability is Reachability.REFUSED
    assert "refused" in result.message and "status verb" in result.message


async def test_no_banner_when_tcp_is_accepted_but_nothing_is_said():
    # The wedged guest: the kernel completes the handshake, sshd never speaks.
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        target = SshTarget("127.0.0.1", port, "root", PINNED_ELSEWHERE)
        result = await probe_devvm(target, client_keys=[KEY], timeout_s=2.0)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert result.reachability is Reachability.NO_BANNER
    assert "no SSH banner" in result.message and "wedged" in result.message
    assert 1.0 < result.elapsed_s < 2.5


async def test_tcp_timeout_when_syns_go_unanswered():
    # A listener whose accept queue is full drops further SYNs: to us, a dead guest.
    listener, fillers = full_backlog_listener()
    try:
        target = SshTarget("127.0.0.1", listener.getsockname()[1], "root", PINNED_ELSEWHERE)
        result = await probe_devvm(target, client_keys=[KEY], timeout_s=1.5)
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert result.reachability is Reachability.TCP_TIMEOUT
    assert "no TCP answer" in result.message
    assert 1.4 < result.elapsed_s < 2.5


async def test_auth_refused(sshd: Sshd):
    result = await probe_devvm(target_for(sshd), client_keys=[new_key("stranger")])
    assert result.reachability is Reachability.AUTH_REFUSED
    assert result.banner is not None and "refused our key" in result.message


async def test_host_key_mismatch(sshd: Sshd):
    target = target_for(sshd, known_hosts=other_host_key_line(sshd.port))
    result = await probe_devvm(target, client_keys=[KEY])
    assert result.reachability is Reachability.HOST_KEY_MISMATCH
    assert "NOT the pinned one" in result.message


async def test_command_failed(sshd: Sshd):
    result = await probe_devvm(target_for(sshd), client_keys=[FAILING_KEY])
    assert result.reachability is Reachability.COMMAND_FAILED
    assert "exit status 1" in result.message and "broken disk" in result.message
