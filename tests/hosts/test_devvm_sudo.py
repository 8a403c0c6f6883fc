"""The devvm shell as a non-root user through a real `sudo -n` (the production shape: the
breakglass user with a NOPASSWD rule), against a real OpenSSH sshd on loopback.

The test creates two throwaway local users — one with a NOPASSWD sudo rule, one without — and
removes them and the rule afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import Ending
from tests.hosts.sshparts import kill_pids, target_for, wait_for_pids
from tests.support.realparts import Sshd, new_key, public_line, start_sshd

KEY = new_key("sudo-test")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[str, str]]:
    """(user with NOPASSWD sudo, user without sudo rights)."""
    if not shutil.which("sudo"):
        pytest.fail("sudo is missing: apt-get install sudo (scripts/setup.sh test installs it)")
    tag = secrets.token_hex(3)
    allowed, refused = f"bgsudo{tag}", f"bgnosudo{tag}"
    rule = Path(f"/etc/sudoers.d/breakglass-test-{tag}")
    try:
        for user in (allowed, refused):
            # "*": no password, but not a locked account (sshd without PAM refuses locked ones).
            _run("useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", user)
        rule.write_text(f"{allowed} ALL=(root) NOPASSWD: ALL\n")
        rule.chmod(0o440)
        yield allowed, refused
    finally:
        rule.unlink(missing_ok=True)
        for user in (allowed, refused):
            subprocess.run(["userdel", "--remove", user], capture_output=True, check=False)


@pytest.fixture(scope="module")
def sshd(users: tuple[str, str]) -> Iterator[Sshd]:
    server = start_sshd(
        public_line(KEY) + "\n", extra_config=f"AllowUsers root {users[0]} {users[1]}\n"
    )
    # sshd reads authorized_keys as the logging-in user: let the test users read it.
    server.workdir.chmod(0o755)
    (server.workdir / "authorized_keys").chmod(0o644)
    try:
        yield server
    finally:
        server.close()


@contextlib.asynccontextmanager
async def shell_as(sshd: Sshd, user: str):
    shell = DevvmShell(
        target_for(sshd, user=user), ConnectOptions(client_keys=[KEY], connect_timeout_s=5)
    )
    try:
        yield shell
    finally:
        await shell.close()


async def test_commands_run_as_root_through_sudo(sshd: Sshd, users: tuple[str, str]) -> None:
    async with shell_as(sshd, users[0]) as shell:
        outcome = await shell.run("id -u; echo to-stderr >&2; exit 3")
    assert outcome.ending is Ending.EXITED and outcome.exit_status == 3
    assert outcome.stdout.strip() == "0"
    assert outcome.stderr.strip() == "to-stderr"


async def test_cancel_through_sudo_stops_the_remote_process(
    sshd: Sshd, users: tuple[str, str]
) -> None:
    marker = f"sleep {4000 + secrets.randbelow(900)}"
    async with shell_as(sshd, users[0]) as shell:
        task = asyncio.create_task(shell.run(marker))
        running = await wait_for_pids(marker, present=True, timeout=10)
        assert running, "the command never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    left = await wait_for_pids(marker, present=False, timeout=10)
    kill_pids(left)
    assert not left, f"the remote command survived the cancel: {left}"


async def test_a_user_without_a_nopasswd_rule_gets_a_clear_outcome(
    sshd: Sshd, users: tuple[str, str]
) -> None:
    async with shell_as(sshd, users[1]) as shell:
        outcome = await asyncio.wait_for(shell.run("id -u"), 20)
    assert outcome.ending is Ending.FAILED
    assert "NOPASSWD" in outcome.message and users[1] in outcome.message
