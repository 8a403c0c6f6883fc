"""The breakglass keys flow Vault -> memory -> a private ssh-agent, and an SSH login through that
agent works against a real sshd; nothing of the keys is left on disk, in the environment, in logs
or in error text. Without Vault, the operator's own ssh-agent is used."""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from breakglass_tui.config import Settings
from breakglass_tui.hosts.keyagent import KeyAgent, LoadedKeys, load_keys
from breakglass_tui.hosts.vault import AgentStartError, KeysError, NoKeySource, VaultSealed
from tests.support.openbao import (  # noqa: F401 - fixtures
    BreakglassVault,
    breakglass_vault,
    find_needles,
    key_material_needles,
    openbao,
)
from tests.support.realparts import Sshd, new_key, public_line, start_sshd
from tests.support.waiting import until


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; one reaped since the kill above is gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def child_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


async def ssh_echo(sshd: Sshd, agent_path: str, known_hosts: str, text: str = "ok") -> str:
    """Log in through the agent only: the key exists nowhere else (not in ~/.ssh, not on disk)."""
    async with asyncssh.connect(
        "127.0.0.1",
        sshd.port,
        username="root",
        known_hosts=asyncssh.import_known_hosts(known_hosts),
        agent_path=agent_path,
        config=None,
        connect_timeout=5,
    ) as conn:
        result = await conn.run(f"echo {text}", check=True, timeout=10)
    return str(result.stdout).strip()


@pytest.fixture
def devvm_sshd(breakglass_vault: BreakglassVault) -> Iterator[Sshd]:
    """A real sshd that accepts the breakglass devvm key, with the secret pinning its host key."""
    server = start_sshd(public_line(breakglass_vault.devvm_key) + "\n")
    data = breakglass_vault.fields()
    data["devvm_known_hosts"] = server.known_hosts
    try:
        with breakglass_vault.secret_as(data):
            yield server
    finally:
        server.close()


# -- KeyAgent --------------------------------------------------------------------------------------


async def test_private_agent_lives_in_a_0700_directory_with_a_scrubbed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "s.must-not-reach-the-agent")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-must-not-reach-the-agent")
    monkeypatch.setenv("BREAKGLASS_VAULT_ADDR", "http://127.0.0.1:8200")
    agent = await KeyAgent.start_private(tmp_path)
    try:
        assert agent.pid is not None and agent.private
        directory = Path(agent.socket_path).parent
        assert directory.parent == tmp_path
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(agent.socket_path).st_mode)
        env = child_environ(agent.pid)
        assert set(env) <= {"PATH", "LANG", "LC_ALL", "TZ", "PWD"}  # PWD: the keeper shell sets it
        assert not any("must-not-reach" in value for value in env.values())
        assert await agent.key_count() == 0
    finally:
        await agent.close()
    assert not pid_alive(agent.pid)
    assert not directory.exists()
    await agent.close()  # twice is fine


async def test_closing_an_existing_agent_leaves_it_running(ssh_agent) -> None:
    agent = KeyAgent.existing(ssh_agent.socket_path)
    assert agent.pid is None and not agent.private
    await agent.close()
    assert pid_alive(ssh_agent.pid)
    assert os.path.exists(ssh_agent.socket_path)


async def test_add_keys_refuses_an_empty_list(tmp_path: Path) -> None:
    agent = await KeyAgent.start_private(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"~/\.ssh"):
            await agent.add_keys([])
        assert await agent.key_count() == 0
    finally:
        await agent.close()


async def test_agent_cannot_start_without_ssh_agent_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AgentStartError, match="openssh-client"):
        await KeyAgent.start_private(tmp_path)


async def test_agent_cannot_start_in_a_directory_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(AgentStartError, match="BREAKGLASS_AGENT_SOCKET_DIR"):
        await KeyAgent.start_private(not_a_dir)


async def test_agent_cannot_start_when_the_socket_path_is_too_long(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(AgentStartError, match="longer than a Unix socket allows"):
        await KeyAgent.start_private(deep)
    assert list(deep.iterdir()) == []  # the private directory was cleaned up


# -- load_keys with Vault --------------------------------------------------------------------------


async def test_vault_keys_reach_the_agent_and_an_ssh_login_works_leaving_no_trace(
    breakglass_vault: BreakglassVault,
    devvm_sshd: Sshd,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    started = time.time() - 1
    settings = breakglass_vault.settings(tmp_path)
    jwt = settings.vault_sa_token_file.read_text()
    loaded = await load_keys(settings, environ={})
    try:
        assert isinstance(loaded, LoadedKeys)
        assert loaded.source == "vault"
        assert loaded.agent.private
        assert loaded.devvm_known_hosts == devvm_sshd.known_hosts
        assert loaded.pve_known_hosts == breakglass_vault.pve_known_hosts
        assert await loaded.agent.key_count() == 2
        agent_dir = Path(loaded.agent_path).parent
        assert agent_dir.parent == tmp_path  # under settings.agent_socket_dir

        assert await ssh_echo(devvm_sshd, loaded.agent_path, loaded.devvm_known_hosts) == "ok"

        # No key material on disk: the test's dirs, the agent's dir, the state dir, and every
        # temp entry created since the test began.
        needles = key_material_needles(breakglass_vault.devvm_key, breakglass_vault.pve_key)
        tmp = Path(tempfile.gettempdir())
        fresh = [p for p in tmp.iterdir() if _mtime(p) >= started and p != devvm_sshd.workdir]
        scanned = [tmp_path, agent_dir, settings.state_dir, Path.cwd() / "breakglass-state"]
        assert find_needles(scanned + fresh, needles) == []
        # Nor in this process's environment, nor in anything logged.
        for value in os.environ.values():
            assert not any(needle.decode(errors="ignore") in value for needle in needles)
        logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
        assert not any(needle.decode(errors="ignore") in logged for needle in needles)
        assert jwt not in logged
        assert "VAULT_TOKEN" not in os.environ
    finally:
        await loaded.close()
    assert not pid_alive(loaded.agent.pid)
    assert not agent_dir.exists()


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


async def test_a_vault_outage_after_loading_does_not_affect_the_session(
    breakglass_vault: BreakglassVault, devvm_sshd: Sshd, tmp_path: Path
) -> None:
    settings = breakglass_vault.settings(tmp_path)
    loaded = await load_keys(settings, environ={})
    try:
        breakglass_vault.bao.seal()
        try:
            # Loading again now fails, with its message...
            settings.vault_sa_token_file.write_text(breakglass_vault.bao.tokenreview.issue())
            with pytest.raises(VaultSealed):
                await load_keys(settings, environ={})
            # ...but the session keeps working: the keys are in the agent.
            assert await ssh_echo(devvm_sshd, loaded.agent_path, loaded.devvm_known_hosts) == "ok"
        finally:
            breakglass_vault.bao.unseal()
    finally:
        await loaded.close()


async def test_no_private_agent_is_started_when_vault_fails(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    data = breakglass_vault.fields()
    del data["pve_known_hosts"]
    settings = breakglass_vault.settings(tmp_path, agent_socket_dir=tmp_path / "agents")
    with breakglass_vault.secret_as(data), pytest.raises(KeysError):
        await load_keys(settings, environ={})
    agents_dir = tmp_path / "agents"
    assert not agents_dir.exists() or not any(agents_dir.glob("bg-agent-*"))


async def test_agent_start_failure_after_vault_is_its_own_error(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    settings = breakglass_vault.settings(tmp_path, agent_socket_dir=blocker)
    with pytest.raises(AgentStartError) as info:
        await load_keys(settings, environ={})
    text = str(info.value)
    for needle in key_material_needles(breakglass_vault.devvm_key, breakglass_vault.pve_key):
        assert needle not in text.encode()


# -- load_keys without Vault: the operator's ssh-agent ---------------------------------------------


async def test_without_vault_the_operators_agent_is_used_and_left_running(
    tmp_path: Path,
) -> None:
    operator_agent = await KeyAgent.start_private(tmp_path)
    try:
        devvm_key, pve_key = new_key("operator-devvm"), new_key("operator-pve")
        await operator_agent.add_keys([devvm_key, pve_key])
        settings = Settings(
            devvm_host_key="127.0.0.1 ssh-ed25519 AAAA\n",
            state_dir=tmp_path,
            devvm_key_fingerprint=devvm_key.get_fingerprint("sha256"),
            pve_key_fingerprint=pve_key.get_fingerprint("sha256"),
        )
        loaded = await load_keys(settings, environ={"SSH_AUTH_SOCK": operator_agent.socket_path})
        assert loaded.source == "ssh-agent"
        assert loaded.agent_path == operator_agent.socket_path
        assert not loaded.agent.private
        assert loaded.devvm_known_hosts == "127.0.0.1 ssh-ed25519 AAAA\n"
        assert loaded.pve_known_hosts is None
        await loaded.close()
        assert pid_alive(operator_agent.pid)
    finally:
        await operator_agent.close()


async def test_without_vault_or_agent_the_message_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NoKeySource) as info:
        await load_keys(Settings(state_dir=tmp_path), environ={})
    assert "set BREAKGLASS_VAULT_ADDR or start an ssh-agent with the breakglass keys" in str(
        info.value
    )


async def test_a_dead_ssh_auth_sock_is_reported(tmp_path: Path) -> None:
    with pytest.raises(NoKeySource, match="not a live ssh-agent socket"):
        await load_keys(
            Settings(state_dir=tmp_path), environ={"SSH_AUTH_SOCK": str(tmp_path / "gone")}
        )


async def test_an_empty_operator_agent_is_reported(tmp_path: Path) -> None:
    empty = await KeyAgent.start_private(tmp_path)
    try:
        with pytest.raises(NoKeySource, match="holds no keys"):
            await load_keys(
                Settings(state_dir=tmp_path), environ={"SSH_AUTH_SOCK": empty.socket_path}
            )
    finally:
        await empty.close()


async def test_the_private_agent_dies_with_the_console(tmp_path: Path) -> None:
    """A console killed outright (OOM, SIGKILL) must not leave an agent holding the keys."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from breakglass_tui.hosts.keyagent import KeyAgent\n"
        "async def main():\n"
        f"    agent = await KeyAgent.start_private(Path({str(tmp_path)!r}))\n"
        "    print(agent.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    console = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, cwd=Path.cwd()
    )
    try:
        assert console.stdout is not None
        line = await asyncio.wait_for(console.stdout.readline(), 20)
        agent_pid = int(line)
        assert pid_alive(agent_pid)
    finally:
        console.kill()
        await console.wait()
    try:
        await until(
            lambda: not pid_alive(agent_pid), what="the agent to die with the console", timeout_s=5
        )
    finally:
        if pid_alive(agent_pid):  # clean up before failing: it is a process this test started
            os.kill(agent_pid, 9)
