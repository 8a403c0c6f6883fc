"""The breakglass keys in an ssh-agent: a private one fed from Vault, or the operator's own.

Keys go Vault -> memory -> ssh-agent over its socket (docs/keys.md); they are never written to a
file. Once loaded, the SSH connections sign through the agent and the Vault token is gone, so a
Vault outage after that does not touch the session. The ADR's point stands: the agent is hygiene,
the narrow Vault policy is the control.

Each key belongs to one target: :class:`LoadedKeys` names the devvm key and the PVE key by
fingerprint, and the hosts layer offers each target only its own (``SshTarget.key_fingerprint``).
A reload (:meth:`LoadedKeys.reload`) keeps that mapping.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from breakglass_tui.config import Settings
from breakglass_tui.hosts.ssh import fingerprint
from breakglass_tui.hosts.vault import (
    AgentStartError,
    KeysError,
    NoKeySource,
    read_breakglass_keys,
)

__all__ = ["KeyAgent", "KeysError", "LoadedKeys", "load_keys"]

# The agent child gets these variables and nothing else: no VAULT_*, ANTHROPIC_*, BREAKGLASS_*.
AGENT_ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "TZ")
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
START_TIMEOUT_S = 5.0
# The keeper: a shell that starts the agent, says its PID, and kills it when its stdin (a pipe
# only this process holds) reaches EOF — i.e. when the console exits, however it dies. Needed
# because ssh-agent is setgid on Debian, and the kernel drops PR_SET_PDEATHSIG across a setgid
# exec. The agent stays the keeper's unreaped child, so its PID cannot be reused while the
# keeper lives.
_KEEPER = (
    '"$1" -D -a "$2" </dev/null >/dev/null 2>&1 &'
    " echo $!;"
    " read -r _;"  # blocks until the console closes the pipe (or dies)
    " kill -TERM $! 2>/dev/null"
)


class KeyAgent:
    """An ssh-agent the breakglass connections sign through.

    ``pid`` is set only for an agent this object started (:meth:`start_private`); :meth:`close`
    then kills that PID and removes its private directory. An :meth:`existing` agent (the
    operator's ``SSH_AUTH_SOCK``) is left alone.

    A private agent never outlives the console: if the process exits without :meth:`close`
    (even by SIGKILL), the agent is stopped too.
    """

    def __init__(
        self,
        socket_path: str,
        pid: int | None = None,
        *,
        _keeper: subprocess.Popen[bytes] | None = None,
        _directory: Path | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.pid = pid
        self._keeper = _keeper
        self._directory = _directory

    def __repr__(self) -> str:
        return f"KeyAgent(socket_path={self.socket_path!r}, pid={self.pid})"

    @property
    def private(self) -> bool:
        """True when this process started the agent (and will stop it)."""
        return self.pid is not None

    @classmethod
    def existing(cls, path: str | os.PathLike[str]) -> KeyAgent:
        """An agent someone else runs (e.g. ``SSH_AUTH_SOCK``); :meth:`close` will not stop it."""
        return cls(os.fspath(path))

    @classmethod
    async def start_private(cls, directory: Path | None = None) -> KeyAgent:
        """Start ``ssh-agent -D`` with its socket in a new 0700 directory (inside ``directory``,
        e.g. settings.agent_socket_dir, or the system temp dir). Raises AgentStartError."""
        keeper, private_dir, socket_path = _spawn_agent(directory)
        agent = cls(socket_path, None, _keeper=keeper, _directory=private_dir)
        try:
            assert keeper.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(keeper.stdout.readline), 5)
            agent.pid = int(line)
        except (TimeoutError, ValueError):
            await agent.close()
            raise AgentStartError(
                "cannot start ssh-agent: its starter shell did not report a PID: check /bin/sh"
                " and the OpenSSH client are installed"
            ) from None
        deadline = time.monotonic() + START_TIMEOUT_S
        # Not just the socket file: bind() makes it before listen(), and a connect in between is
        # refused. Wait until the agent accepts.
        while not _accepts(socket_path):
            if not _alive(agent.pid) or time.monotonic() > deadline:
                why = "it exited at once" if not _alive(agent.pid) else "no socket within 5 s"
                await agent.close()
                raise AgentStartError(
                    f"cannot start ssh-agent: {why} (socket {socket_path}): check the directory"
                    " is writable and local (not NFS), then retry"
                )
            await asyncio.sleep(0.02)
        return agent

    async def add_keys(self, keys: Sequence[asyncssh.SSHKey]) -> None:
        """Add private keys held in memory to the agent. Never reads a file: an empty list is
        refused (asyncssh would load ~/.ssh keys)."""
        keylist = list(keys)
        if not keylist:
            raise ValueError("add_keys needs at least one key (an empty list would load ~/.ssh)")
        try:
            async with asyncssh.connect_agent(self.socket_path) as agent:
                await agent.add_keys(keylist)
        except (OSError, ValueError, asyncssh.Error) as exc:
            raise AgentStartError(
                f"the ssh-agent at {self.socket_path} would not take the keys"
                f" ({type(exc).__name__}): restart the console; if it persists, check the agent"
                " supports the key types (docs/keys.md)"
            ) from None

    async def key_count(self) -> int:
        """How many keys the agent holds (public keys only are fetched)."""
        return len(await self.fingerprints())

    async def fingerprints(self) -> list[str]:
        """The SHA256 fingerprints of the keys the agent holds, in its order."""
        async with asyncssh.connect_agent(self.socket_path) as agent:
            return [fingerprint(key) for key in await agent.get_keys()]

    async def replace_keys(self, keys: Sequence[asyncssh.SSHKey]) -> None:
        """Make ``keys`` the agent's only keys: add them first, then remove every other one, so
        a connection starting meanwhile always finds its key."""
        await self.add_keys(keys)
        keep = {key.get_fingerprint("sha256") for key in keys}
        try:
            async with asyncssh.connect_agent(self.socket_path) as agent:
                stale = [key for key in await agent.get_keys() if fingerprint(key) not in keep]
                if stale:
                    await agent.remove_keys(stale)
        except (OSError, ValueError, asyncssh.Error) as exc:
            raise AgentStartError(
                f"the ssh-agent at {self.socket_path} would not drop the replaced keys"
                f" ({type(exc).__name__}): restart the console"
            ) from None

    async def close(self) -> None:
        """Stop the agent if this object started it (by its PID) and remove its directory;
        for an existing agent, do nothing. Safe to call twice."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            pid = self.pid
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                if not await _gone(pid, 5.0):
                    os.kill(pid, signal.SIGKILL)
            # EOF to the keeper: it exits (its kill finds only a zombie) and init reaps both.
            if keeper.stdin is not None:
                keeper.stdin.close()
            if keeper.stdout is not None:
                keeper.stdout.close()
            try:
                await asyncio.to_thread(keeper.wait, 5)
            except subprocess.TimeoutExpired:
                keeper.kill()
                await asyncio.to_thread(keeper.wait, 5)
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


async def _gone(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to stop running (it is not our child: poll)."""
    for _ in range(int(timeout_s / 0.02)):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _spawn_agent(directory: Path | None) -> tuple[subprocess.Popen[bytes], Path, str]:
    """Create the private 0700 directory and start the keeper shell, which starts
    ``ssh-agent -D -a <dir>/agent.sock`` (fork+exec: quick)."""
    binary = shutil.which("ssh-agent")
    if binary is None:
        raise AgentStartError(
            "cannot start ssh-agent: it is not installed (PATH has no ssh-agent); install the"
            " OpenSSH client (Debian: openssh-client)"
        )
    try:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        private_dir = Path(tempfile.mkdtemp(prefix="bg-agent-", dir=directory))
        private_dir.chmod(0o700)  # mkdtemp makes it 0700 already; say so explicitly
    except OSError as exc:
        raise AgentStartError(
            f"cannot start ssh-agent: cannot create a private directory in"
            f" {directory or tempfile.gettempdir()} ({exc.strerror}): check"
            " BREAKGLASS_AGENT_SOCKET_DIR is a writable directory (an emptyDir in the pod)"
        ) from None
    socket_path = str(private_dir / "agent.sock")
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        shutil.rmtree(private_dir, ignore_errors=True)
        raise AgentStartError(
            f"cannot start ssh-agent: the socket path {socket_path} is longer than a Unix"
            f" socket allows ({MAX_SOCKET_PATH} bytes): set BREAKGLASS_AGENT_SOCKET_DIR to a"
            " shorter directory"
        )
    env = {name: os.environ[name] for name in AGENT_ENV_ALLOWLIST if name in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    try:
        # -D keeps the agent in the foreground, so the PID the keeper reports is the agent's own.
        keeper = subprocess.Popen(
            ["/bin/sh", "-c", _KEEPER, "breakglass-agent-keeper", binary, socket_path],
            env=env,
            cwd=private_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError as exc:
        shutil.rmtree(private_dir, ignore_errors=True)
        raise AgentStartError(
            f"cannot start ssh-agent ({exc.strerror}): check /bin/sh and the OpenSSH client are"
            " installed and executable"
        ) from None
    return keeper, private_dir, socket_path


def _accepts(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    if not _is_socket(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass
class LoadedKeys:
    """Where the breakglass connections get their keys, which key is whose, and the pinned host
    keys.

    ``source`` is ``"vault"`` (a private agent fed from Vault) or ``"ssh-agent"`` (the operator's
    SSH_AUTH_SOCK). ``devvm_fingerprint`` / ``pve_fingerprint`` name the one key each target is
    offered (give them to ``SshTarget.key_fingerprint``). ``*_known_hosts`` come from the Vault
    secret, or from BREAKGLASS_DEVVM_HOST_KEY / BREAKGLASS_PVE_HOST_KEY without Vault (None if
    unset).
    """

    agent: KeyAgent
    devvm_known_hosts: str | None
    pve_known_hosts: str | None
    source: str
    devvm_fingerprint: str
    pve_fingerprint: str

    @property
    def agent_path(self) -> str:
        """The agent socket to pass as ``agent_path`` to the hosts layer."""
        return self.agent.socket_path

    async def reload(self, settings: Settings) -> bool:
        """Load the keys again (Vault: read the secret anew; the operator's agent: check it
        still holds the configured keys) and keep each key bound to its own target. True when a
        key changed. On any error nothing changes: the keys loaded before stay in use."""
        if self.source != "vault":
            devvm, pve = await _operator_fingerprints(self.agent, settings)
            changed = (devvm, pve) != (self.devvm_fingerprint, self.pve_fingerprint)
            self.devvm_fingerprint, self.pve_fingerprint = devvm, pve
            self.devvm_known_hosts = settings.devvm_host_key
            self.pve_known_hosts = settings.pve_host_key
            return changed
        return await self._from_vault(settings, always=True)

    async def check_vault(self, settings: Settings) -> bool:
        """The self-check's Vault link: log in with the projected token, read the breakglass
        secret and compare its keys' fingerprints (and pinned host keys) with those loaded,
        and with what the ssh-agent holds. On a difference the keys are replaced in the agent,
        each still bound to its own target, and True is returned. Raises a KeysError naming
        what failed (sealed, login refused, policy, secret); nothing changes then."""
        return await self._from_vault(settings, always=False)

    async def _from_vault(self, settings: Settings, *, always: bool) -> bool:
        keys = await asyncio.to_thread(read_breakglass_keys, settings)
        devvm, pve = (
            keys.devvm_key.get_fingerprint("sha256"),
            keys.pve_key.get_fingerprint("sha256"),
        )
        changed = (devvm, pve) != (self.devvm_fingerprint, self.pve_fingerprint) or (
            keys.devvm_known_hosts,
            keys.pve_known_hosts,
        ) != (self.devvm_known_hosts, self.pve_known_hosts)
        held = set(await self.agent.fingerprints())
        if always or changed or not {devvm, pve} <= held:
            await self.agent.replace_keys([keys.devvm_key, keys.pve_key])
        self.devvm_fingerprint, self.pve_fingerprint = devvm, pve
        self.devvm_known_hosts, self.pve_known_hosts = keys.devvm_known_hosts, keys.pve_known_hosts
        del keys
        return changed or not {devvm, pve} <= held

    async def close(self) -> None:
        """Stop the private agent (an operator's agent is left running)."""
        await self.agent.close()


async def load_keys(settings: Settings, *, environ: Mapping[str, str] | None = None) -> LoadedKeys:
    """Load the breakglass keys once, at start.

    With BREAKGLASS_VAULT_ADDR: read the secret from Vault (token revoked and dropped), start a
    private ssh-agent and add both keys from memory. Without it: use the operator's running
    ssh-agent (``SSH_AUTH_SOCK``), which must hold the keys BREAKGLASS_DEVVM_KEY_FINGERPRINT and
    BREAKGLASS_PVE_KEY_FINGERPRINT name. Raises a :class:`KeysError` subclass with a readable
    message.
    """
    env = os.environ if environ is None else environ
    if settings.vault_addr:
        keys = await asyncio.to_thread(read_breakglass_keys, settings)
        agent = await KeyAgent.start_private(settings.agent_socket_dir)
        try:
            await agent.add_keys([keys.devvm_key, keys.pve_key])
        except BaseException:
            await agent.close()
            raise
        loaded = LoadedKeys(
            agent,
            keys.devvm_known_hosts,
            keys.pve_known_hosts,
            "vault",
            devvm_fingerprint=keys.devvm_key.get_fingerprint("sha256"),
            pve_fingerprint=keys.pve_key.get_fingerprint("sha256"),
        )
        del keys  # the agent holds the keys now; drop our references
        return loaded
    sock = env.get("SSH_AUTH_SOCK", "")
    if not sock:
        raise NoKeySource(
            "no breakglass keys: set BREAKGLASS_VAULT_ADDR or start an ssh-agent with the"
            " breakglass keys (`eval $(ssh-agent)` then `ssh-add` them) and run again"
        )
    if not _is_socket(sock):
        raise NoKeySource(
            f"SSH_AUTH_SOCK names {sock}, which is not a live ssh-agent socket: start an ssh-agent"
            " with the breakglass keys, or set BREAKGLASS_VAULT_ADDR"
        )
    agent = KeyAgent.existing(sock)
    devvm, pve = await _operator_fingerprints(agent, settings)
    return LoadedKeys(
        agent,
        settings.devvm_host_key,
        settings.pve_host_key,
        "ssh-agent",
        devvm_fingerprint=devvm,
        pve_fingerprint=pve,
    )


async def _operator_fingerprints(agent: KeyAgent, settings: Settings) -> tuple[str, str]:
    """The devvm and PVE key fingerprints the settings name, checked against what the operator's
    agent holds. Raises NoKeySource naming what is missing."""
    sock = agent.socket_path
    try:
        held = await agent.fingerprints()
    except (OSError, asyncssh.Error):
        raise NoKeySource(
            f"the ssh-agent at SSH_AUTH_SOCK ({sock}) does not answer: restart it and add the"
            " breakglass keys, or set BREAKGLASS_VAULT_ADDR"
        ) from None
    if not held:
        raise NoKeySource(
            f"the ssh-agent at SSH_AUTH_SOCK ({sock}) holds no keys: `ssh-add` the breakglass"
            " keys, or set BREAKGLASS_VAULT_ADDR"
        )
    devvm, pve = settings.devvm_key_fingerprint, settings.pve_key_fingerprint
    if not devvm or not pve:
        missing = [
            name
            for name, value in (
                ("BREAKGLASS_DEVVM_KEY_FINGERPRINT", devvm),
                ("BREAKGLASS_PVE_KEY_FINGERPRINT", pve),
            )
            if not value
        ]
        raise NoKeySource(
            f"{' and '.join(missing)} not set: with your own ssh-agent the console must know which"
            " key is the devvm's and which the PVE host's (each is offered only to its own host);"
            " set them to the SHA256 fingerprints `ssh-add -l` shows, or set BREAKGLASS_VAULT_ADDR"
        )
    if devvm == pve:
        raise NoKeySource(
            "BREAKGLASS_DEVVM_KEY_FINGERPRINT and BREAKGLASS_PVE_KEY_FINGERPRINT name the same key:"
            " the PVE host's key must be a separate key that can only run the forced command"
            " (docs/keys.md)"
        )
    for name, value in (("devvm", devvm), ("PVE", pve)):
        if value not in held:
            raise NoKeySource(
                f"the ssh-agent at SSH_AUTH_SOCK ({sock}) does not hold the {name} key"
                f" ({value}): `ssh-add` it (`ssh-add -l` lists what the agent holds), or fix"
                f" BREAKGLASS_{name.upper()}_KEY_FINGERPRINT"
            )
    return devvm, pve
