"""Keys per target, against real sshd and a real ssh-agent fed from a real OpenBao: the devvm key
is only ever offered to the devvm and the PVE key only to the PVE host, so a host that would
accept the wrong key (the PVE host taking the devvm key as root, without the forced command) never
gets the chance. A reload of the keys keeps each key bound to its own target.

Each sshd logs every key offered to it (LogLevel VERBOSE: "Failed publickey … SHA256:…" or
"Accepted publickey … SHA256:…"), so the tests read what each host was actually offered."""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from breakglass_tui.config import Settings
from breakglass_tui.hosts.keyagent import KeyAgent, LoadedKeys, load_keys
from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect, fingerprint
from breakglass_tui.hosts.types import Reachability, SshTarget
from breakglass_tui.hosts.vault import NoKeySource, SecretFieldInvalid
from tests.support.openbao import (  # noqa: F401 - fixtures
    BreakglassVault,
    breakglass_vault,
    openbao,
)
from tests.support.realparts import Sshd, new_key, public_line, start_sshd

# What the PVE host's authorized_keys forces for the PVE key in these tests: a command whose
# output says it ran (the real one is breakglass-verb; docs/pve-host.md).
FORCED = 'command="echo forced-command-ran",restrict '


@dataclass
class Hosts:
    """A devvm sshd and a PVE-host sshd, both as root on loopback."""

    devvm: Sshd
    pve: Sshd

    def close(self) -> None:
        self.devvm.close()
        self.pve.close()


def start_hosts(devvm_accepts: list[str], pve_accepts: list[str]) -> Hosts:
    """Two real sshds; each list is that host's authorized_keys lines."""
    devvm = start_sshd("".join(line + "\n" for line in devvm_accepts))
    try:
        pve = start_sshd("".join(line + "\n" for line in pve_accepts))
    except BaseException:
        devvm.close()
        raise
    return Hosts(devvm, pve)


def targets(hosts: Hosts, loaded: LoadedKeys) -> tuple[SshTarget, SshTarget]:
    """The two targets as the console builds them for real hosts: each bound to its own key."""
    devvm = SshTarget(
        "127.0.0.1",
        hosts.devvm.port,
        "root",
        hosts.devvm.known_hosts,
        "devvm",
        key_fingerprint=loaded.devvm_fingerprint,
    )
    pve = SshTarget(
        "127.0.0.1",
        hosts.pve.port,
        "root",
        hosts.pve.known_hosts,
        "pve",
        key_fingerprint=loaded.pve_fingerprint,
    )
    return devvm, pve


async def offered(sshd: Sshd, target: SshTarget, loaded: LoadedKeys) -> tuple[str, str]:
    """Log in to ``target`` through the agent and run ``id -u``; what came back (the command's
    output, or the refusal's kind) and the sshd's log lines for this one connection."""
    before = len(sshd.log())
    try:
        conn = await connect(target, ConnectOptions(agent_path=loaded.agent_path))
    except SshConnectError as exc:
        result = f"refused: {exc.kind}"
    else:
        async with conn:
            done = await conn.run("id -u", check=False, timeout=10)
        result = str(done.stdout).strip()
    # sshd writes its log line for the attempt before it answers the client.
    return result, sshd.log()[before:]


@pytest.fixture
def keys() -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    """A fresh devvm key and PVE key."""
    return new_key("breakglass-devvm"), new_key("breakglass-pve")


@pytest.fixture
async def loaded(
    breakglass_vault: BreakglassVault, keys: tuple[asyncssh.SSHKey, asyncssh.SSHKey], tmp_path: Path
) -> AsyncIterator[LoadedKeys]:
    """These keys loaded from Vault into the console's private ssh-agent, as in the pod."""
    devvm_key, pve_key = keys
    data = breakglass_vault.fields()
    data["devvm_private_key"] = devvm_key.export_private_key("openssh").decode()
    data["pve_private_key"] = pve_key.export_private_key("openssh").decode()
    with breakglass_vault.secret_as(data):
        loaded = await load_keys(breakglass_vault.settings(tmp_path), environ={})
    try:
        # Both keys are in the one agent: the agent alone cannot tell them apart.
        assert sorted(await loaded.agent.fingerprints()) == sorted(
            k.get_fingerprint("sha256") for k in keys
        )
        yield loaded
    finally:
        await loaded.close()


@pytest.fixture
def hosts_accepting_either(keys: tuple[asyncssh.SSHKey, asyncssh.SSHKey]) -> Iterator[Hosts]:
    """The dangerous set-up: the devvm accepts both keys, and the PVE host accepts the devvm key
    as root with no forced command beside the PVE key's forced-command line."""
    devvm_key, pve_key = keys
    hosts = start_hosts(
        [public_line(devvm_key), public_line(pve_key)],
        [FORCED + public_line(pve_key), public_line(devvm_key)],
    )
    try:
        yield hosts
    finally:
        hosts.close()


def fp(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


async def test_the_pve_host_gets_only_the_pve_key_even_when_it_would_take_the_devvm_key_as_root(
    loaded: LoadedKeys, hosts_accepting_either: Hosts, keys
) -> None:
    devvm_key, pve_key = keys
    _devvm, pve = targets(hosts_accepting_either, loaded)
    result, log = await offered(hosts_accepting_either.pve, pve, loaded)
    # The forced command ran: the login was the PVE key's, never a root shell by the devvm key.
    assert result == "forced-command-ran"
    assert "Accepted publickey for root from 127.0.0.1 port" in log and fp(pve_key) in log
    assert fp(devvm_key) not in log, "the devvm key was offered to the PVE host"


async def test_the_devvm_gets_only_the_devvm_key(
    loaded: LoadedKeys, hosts_accepting_either: Hosts, keys
) -> None:
    devvm_key, pve_key = keys
    devvm, _pve = targets(hosts_accepting_either, loaded)
    result, log = await offered(hosts_accepting_either.devvm, devvm, loaded)
    assert result == "0"
    assert fp(devvm_key) in log
    assert fp(pve_key) not in log, "the PVE key was offered to the devvm"


async def test_a_devvm_that_accepts_only_the_pve_key_refuses_the_login(
    loaded: LoadedKeys, keys
) -> None:
    """The PVE key would get in, but it is never offered: the login fails, by the devvm key."""
    devvm_key, pve_key = keys
    hosts = start_hosts([public_line(pve_key)], [FORCED + public_line(pve_key)])
    try:
        devvm, _pve = targets(hosts, loaded)
        result, log = await offered(hosts.devvm, devvm, loaded)
        assert result == f"refused: {Reachability.AUTH_REFUSED}"
        assert "Failed publickey for root from 127.0.0.1" in log and fp(devvm_key) in log
        assert fp(pve_key) not in log
    finally:
        hosts.close()


async def test_a_pve_host_that_accepts_only_the_devvm_key_refuses_the_login(
    loaded: LoadedKeys, keys
) -> None:
    """The devvm key would be root on the hypervisor; it is never offered there."""
    devvm_key, pve_key = keys
    hosts = start_hosts([public_line(devvm_key)], [public_line(devvm_key)])
    try:
        _devvm, pve = targets(hosts, loaded)
        result, log = await offered(hosts.pve, pve, loaded)
        assert result == f"refused: {Reachability.AUTH_REFUSED}"
        assert fp(pve_key) in log
        assert fp(devvm_key) not in log
    finally:
        hosts.close()


async def test_without_the_mapping_the_agent_would_have_offered_the_wrong_key(
    loaded: LoadedKeys, hosts_accepting_either: Hosts
) -> None:
    """The control: a target that names no key gets every key in the agent, and the PVE host
    above then takes the devvm key as root. This is what the mapping prevents."""
    _devvm, pve = targets(hosts_accepting_either, loaded)
    unbound = SshTarget(pve.host, pve.port, pve.user, pve.known_hosts, "pve")
    result, _log = await offered(hosts_accepting_either.pve, unbound, loaded)
    assert result == "0", "expected the unbound login to land as root (the agent's first key)"


async def test_a_reload_keeps_each_key_on_its_own_target(
    breakglass_vault: BreakglassVault, loaded: LoadedKeys, keys, tmp_path: Path
) -> None:
    old_devvm, old_pve = keys
    new_devvm, new_pve = new_key("breakglass-devvm-2"), new_key("breakglass-pve-2")
    data = breakglass_vault.fields()
    data["devvm_private_key"] = new_devvm.export_private_key("openssh").decode()
    data["pve_private_key"] = new_pve.export_private_key("openssh").decode()
    settings = breakglass_vault.settings(tmp_path)
    with breakglass_vault.secret_as(data):
        assert await loaded.reload(settings) is True
    assert (loaded.devvm_fingerprint, loaded.pve_fingerprint) == (fp(new_devvm), fp(new_pve))
    # The replaced keys are gone from the agent; the new ones are in it.
    assert sorted(await loaded.agent.fingerprints()) == sorted([fp(new_devvm), fp(new_pve)])

    hosts = start_hosts(
        [public_line(new_devvm), public_line(new_pve)],
        [FORCED + public_line(new_pve), public_line(new_devvm)],
    )
    try:
        devvm, pve = targets(hosts, loaded)
        result, log = await offered(hosts.pve, pve, loaded)
        assert result == "forced-command-ran"
        assert fp(new_devvm) not in log
        result, log = await offered(hosts.devvm, devvm, loaded)
        assert result == "0"
        assert fp(new_pve) not in log
        # A session still bound to the old key is told plainly instead of trying another key.
        stale = SshTarget(pve.host, pve.port, "root", pve.known_hosts, "pve", fp(old_pve))
        with pytest.raises(SshConnectError) as err:
            await connect(stale, ConnectOptions(agent_path=loaded.agent_path))
        assert "not among the loaded keys" in err.value.message
        assert "no other key is ever offered to the pve" in err.value.message
    finally:
        hosts.close()
    assert fp(old_devvm) not in (loaded.devvm_fingerprint, loaded.pve_fingerprint)


async def test_a_reload_that_fails_keeps_the_keys_in_use(
    breakglass_vault: BreakglassVault, loaded: LoadedKeys, keys, tmp_path: Path
) -> None:
    devvm_key, pve_key = keys
    data = breakglass_vault.fields()
    data["pve_private_key"] = data["devvm_private_key"]  # the same key twice: refused
    with breakglass_vault.secret_as(data), pytest.raises(SecretFieldInvalid, match="same key"):
        await loaded.reload(breakglass_vault.settings(tmp_path))
    assert (loaded.devvm_fingerprint, loaded.pve_fingerprint) == (fp(devvm_key), fp(pve_key))
    assert sorted(await loaded.agent.fingerprints()) == sorted([fp(devvm_key), fp(pve_key)])


async def test_one_key_for_both_targets_is_refused_at_load(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    data = breakglass_vault.fields()
    data["pve_private_key"] = data["devvm_private_key"]
    with breakglass_vault.secret_as(data), pytest.raises(SecretFieldInvalid) as err:
        await load_keys(breakglass_vault.settings(tmp_path), environ={})
    assert err.value.field == "pve_private_key"
    assert "separate key" in str(err.value)


# -- the operator's own ssh-agent: which key is whose comes from the settings --------------------


@pytest.fixture
def own_key() -> asyncssh.SSHKey:
    """The operator's own key (root on the PVE host, say): it sits in their agent too."""
    return new_key("operators-own")


@pytest.fixture
async def operator_agent(tmp_path: Path, keys, own_key) -> AsyncIterator[KeyAgent]:
    """The operator's agent: their own key first, then both breakglass keys."""
    agent = await KeyAgent.start_private(tmp_path)
    try:
        await agent.add_keys([own_key, *keys])
        yield agent
    finally:
        await agent.close()


async def test_the_operators_agent_needs_to_be_told_which_key_is_whose(
    operator_agent: KeyAgent, tmp_path: Path
) -> None:
    with pytest.raises(NoKeySource) as err:
        await load_keys(
            Settings(state_dir=tmp_path), environ={"SSH_AUTH_SOCK": operator_agent.socket_path}
        )
    text = str(err.value)
    assert "BREAKGLASS_DEVVM_KEY_FINGERPRINT and BREAKGLASS_PVE_KEY_FINGERPRINT" in text
    assert "ssh-add -l" in text


async def test_the_operators_agent_must_hold_the_named_keys(
    operator_agent: KeyAgent, tmp_path: Path, keys
) -> None:
    devvm_key, _pve_key = keys
    elsewhere = fp(new_key("not-in-the-agent"))
    settings = Settings(
        state_dir=tmp_path, devvm_key_fingerprint=fp(devvm_key), pve_key_fingerprint=elsewhere
    )
    with pytest.raises(NoKeySource, match=r"does not hold the PVE key .*BREAKGLASS_PVE_KEY"):
        await load_keys(settings, environ={"SSH_AUTH_SOCK": operator_agent.socket_path})
    same = Settings(
        state_dir=tmp_path,
        devvm_key_fingerprint=fp(devvm_key),
        pve_key_fingerprint=fp(devvm_key),
    )
    with pytest.raises(NoKeySource, match="name the same key"):
        await load_keys(same, environ={"SSH_AUTH_SOCK": operator_agent.socket_path})


async def test_the_operators_agent_keys_are_bound_per_target(
    operator_agent: KeyAgent, tmp_path: Path, keys, own_key
) -> None:
    devvm_key, pve_key = keys
    settings = Settings(
        state_dir=tmp_path,
        devvm_key_fingerprint=fp(devvm_key),
        pve_key_fingerprint=fp(pve_key),
    )
    loaded = await load_keys(settings, environ={"SSH_AUTH_SOCK": operator_agent.socket_path})
    assert loaded.source == "ssh-agent"
    assert (loaded.devvm_fingerprint, loaded.pve_fingerprint) == (fp(devvm_key), fp(pve_key))
    # The operator's own key and the devvm key would both be root on this PVE host.
    hosts = start_hosts(
        [public_line(devvm_key)],
        [public_line(own_key), public_line(devvm_key), FORCED + public_line(pve_key)],
    )
    try:
        _devvm, pve = targets(hosts, loaded)
        result, log = await offered(hosts.pve, pve, loaded)
        assert result == "forced-command-ran"
        assert fp(devvm_key) not in log and fp(own_key) not in log
        # A reload re-checks the agent and keeps the mapping.
        assert await loaded.reload(settings) is False
        assert (loaded.devvm_fingerprint, loaded.pve_fingerprint) == (fp(devvm_key), fp(pve_key))
    finally:
        hosts.close()
    await loaded.close()  # the operator's agent is left running
    assert await operator_agent.key_count() == 3


def test_a_fingerprint_is_what_ssh_add_prints(tmp_path: Path) -> None:
    """The fingerprint the hosts layer compares is OpenSSH's own, for keys in memory and in an
    agent alike (checked against `ssh-keygen -lf`)."""
    import subprocess

    key = new_key("fingerprint")
    path = tmp_path / "key.pub"
    path.write_text(public_line(key) + "\n")
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert fingerprint(key) == printed == key.get_fingerprint("sha256")


def test_a_target_refuses_a_malformed_fingerprint() -> None:
    with pytest.raises(ValueError, match="not an OpenSSH SHA256 fingerprint"):
        SshTarget("127.0.0.1", 22, "root", "x", "pve", key_fingerprint="MD5:aa:bb")
