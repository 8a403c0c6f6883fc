"""``--check`` as a newcomer runs it: the installed commands in a child process, on the lab.

The sandbox lab (real sshd, the real verb) proves the lines and the exit status quickly; the
real devvm under QEMU — what ``--lab`` means by default — is proven once (slow)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.fake_messages_api import FakeMessagesApi

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(300)


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "BREAKGLASS_STATE_DIR": str(tmp_path / "state"),
    }
    env.update(extra)
    return env


async def check(command: str, *args: str, env: dict[str, str], timeout: float = 120) -> tuple:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / command),
        *args,
        "--check",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


def lines_by_link(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        for title in ("Vault", "PVE host", "devvm", "Messages API", "serving path"):
            if line[9:].startswith(title):
                found[title] = line.split()[0] if not line.startswith("not used") else "not used"
    return found


@pytest.mark.parametrize("command", ["breakglass-serve", "breakglass-tui"])
async def test_lab_check_prints_every_link_the_lab_has_as_ok(command: str, tmp_path: Path) -> None:
    code, out, err = await check(command, "--lab", "--sandbox", env=child_env(tmp_path))
    assert code == 0, out + err
    assert lines_by_link(out) == {
        "Vault": "not used",
        "PVE host": "OK",
        "devvm": "OK",
        "Messages API": "not used",
        "serving path": "not used",
    }, out
    assert out.splitlines()[-1] == "rescue path: all links OK"
    assert err.strip() == "", err  # nothing but the lines: a CronJob's log stays readable


async def test_lab_check_exits_1_naming_the_api_when_it_answers_401(tmp_path: Path) -> None:
    api = await FakeMessagesApi(api_key="sk-ant-good-" + secrets.token_hex(8)).start()
    try:
        env = child_env(
            tmp_path,
            ANTHROPIC_API_KEY="sk-ant-revoked-" + secrets.token_hex(8),
            ANTHROPIC_BASE_URL=api.base_url,
        )
        code, out, _ = await check("breakglass-serve", "--lab", "--sandbox", env=env)
    finally:
        await api.close()
    assert code == 1, out
    links = lines_by_link(out)
    assert links["Messages API"] == "BROKEN" and links["PVE host"] == links["devvm"] == "OK"
    assert "401" in out and out.splitlines()[-1] == "rescue path BROKEN: api"
    assert env["ANTHROPIC_API_KEY"] not in out


async def test_a_bad_setting_is_exit_2_not_a_broken_link(tmp_path: Path) -> None:
    env = child_env(tmp_path, BREAKGLASS_SELFCHECK_TIMEOUT_S="-1")
    code, _, err = await check("breakglass-serve", "--lab", "--sandbox", env=env)
    assert code == 2 and "BREAKGLASS_SELFCHECK_TIMEOUT_S" in err, err


@pytest.mark.slow
async def test_lab_check_on_the_real_devvm(tmp_path: Path) -> None:
    """``--lab`` as shipped: the real Debian guest under QEMU (restored from its cached state),
    its breakglass user's sudo checked for real."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("QEMU is missing: scripts/setup.sh test installs it")
    code, out, err = await check("breakglass-serve", "--lab", env=child_env(tmp_path), timeout=280)
    assert code == 0, out + err
    links = lines_by_link(out)
    assert links["PVE host"] == links["devvm"] == "OK", out
    assert "sudo works without a password" in out
