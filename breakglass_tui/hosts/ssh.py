"""Shared SSH connect options for the devvm and the PVE host.

One place decides how we connect, so every connection in the hosts layer is the same hardened
kind: IP literal, pinned host key (never ``known_hosts=None``), ``~/.ssh/config`` ignored,
connect timeout and keepalives on, public-key authentication only, keys from memory or from one
named ssh-agent (never the ``~/.ssh`` default keys, never a stray ``SSH_AUTH_SOCK``) — and of
those, only the key whose fingerprint the target names (:func:`keys_for`): the devvm key is never
offered to the PVE host, nor the PVE key to the devvm.

Failures become :class:`SshConnectError` with a :class:`~breakglass_tui.hosts.types.Reachability`
kind and a sentence naming the cause and the next step.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncssh

from breakglass_tui.hosts.types import Reachability, SshTarget


class SshConnectError(Exception):
    """We could not get an authenticated SSH connection. ``kind`` says why, the text says what
    to do next. Never carries key material."""

    def __init__(self, kind: Reachability, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ConnectOptions:
    """How to connect: the keys (one named ssh-agent and/or keys in memory) and the timers. One
    value serves DevvmShell, PveClient and the probe, so they log in alike."""

    agent_path: str | None = None
    client_keys: Sequence[asyncssh.SSHKey] | None = None
    connect_timeout_s: float = 6.0
    keepalive_interval_s: float = 5.0
    keepalive_count_max: int = 3

    def __post_init__(self) -> None:
        # A private copy: a caller's list changing later must not change how we log in.
        keys = tuple(self.client_keys) if self.client_keys else None
        object.__setattr__(self, "client_keys", keys)


def pinned_known_hosts(target: SshTarget) -> asyncssh.SSHKnownHosts:
    """The target's pinned host keys as an asyncssh known-hosts object (text, never a file)."""
    if not target.known_hosts or not target.known_hosts.strip():
        raise SshConnectError(
            Reachability.HOST_KEY_MISMATCH,
            f"no pinned host key for the {target.name} ({target.host}:{target.port}): refusing to"
            " connect to an unverified host; set its known_hosts line (the Vault secret's"
            f" {target.name}_known_hosts field or BREAKGLASS_{target.name.upper()}_HOST_KEY)",
        )
    try:
        return asyncssh.import_known_hosts(target.known_hosts)
    except (ValueError, asyncssh.KeyImportError) as exc:
        raise SshConnectError(
            Reachability.HOST_KEY_MISMATCH,
            f"the pinned host key for the {target.name} is not valid known_hosts text ({exc});"
            " fix the known_hosts line",
        ) from None


def _host_is_pinned(known: asyncssh.SSHKnownHosts, target: SshTarget) -> bool:
    """Whether the pinned text has any entry for this host and port (to tell 'unknown host' from
    'key changed')."""
    matched = known.match(target.host, target.host, target.port)
    host_keys, ca_keys = matched[0], matched[1]
    return bool(host_keys or ca_keys)


async def _agent_keys(
    agent_path: str, target: SshTarget
) -> tuple[asyncssh.SSHAgentClient, list[asyncssh.SSHKeyPair]]:
    """The ssh-agent at agent_path and the keys it holds.

    We list them ourselves instead of passing ``agent_path`` with ``client_keys=()``: asyncssh
    would then also load the default keys from ``~/.ssh`` (and ``client_keys=None`` turns public
    key auth, agent included, off altogether). The caller closes the agent client after auth:
    the key pairs sign through it."""
    try:
        agent = await asyncssh.connect_agent(agent_path)
    except OSError as exc:
        raise SshConnectError(
            Reachability.AUTH_REFUSED,
            f"cannot reach the ssh-agent at {agent_path} ({exc.strerror or exc}): the keys were"
            " not loaded; restart the console so it loads them again",
        ) from None
    if agent is None:  # pragma: no cover - only for agent_path=''
        raise SshConnectError(Reachability.AUTH_REFUSED, "no ssh-agent is configured")
    try:
        keys = list(await agent.get_keys())
    except (OSError, asyncssh.Error, ValueError) as exc:
        agent.close()
        raise SshConnectError(
            Reachability.AUTH_REFUSED,
            f"the ssh-agent at {agent_path} did not list its keys ({exc}); restart the console",
        ) from None
    if not keys:
        agent.close()
        raise SshConnectError(
            Reachability.AUTH_REFUSED,
            f"the ssh-agent at {agent_path} holds no key, so the {target.name} cannot be logged"
            " in to; load the breakglass keys (Vault) or ssh-add the key",
        )
    return agent, keys


def _classify_os_error(exc: OSError, target: SshTarget) -> SshConnectError:
    where = f"{target.name} ({target.host}:{target.port})"
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return SshConnectError(
            Reachability.REFUSED,
            f"the {where} refused the connection: sshd is not listening (down, or the guest is"
            " booting or off); probe again, or check the VM's state with the status verb",
        )
    if isinstance(exc, TimeoutError) or exc.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH):
        return SshConnectError(
            Reachability.TCP_TIMEOUT,
            f"no answer from the {where} ({exc.strerror or 'timed out'}): the guest or the"
            " network is dead; check the VM's state with the status verb",
        )
    return SshConnectError(
        Reachability.TCP_TIMEOUT,
        f"cannot reach the {where}: {exc.strerror or exc}; check the address and the network",
    )


Key = asyncssh.SSHKeyPair | asyncssh.SSHKey


def fingerprint(key: Key) -> str:
    """The OpenSSH SHA256 fingerprint of a key in memory or of a key an ssh-agent holds (a
    certificate's underlying key for a certificate)."""
    blob = key.public_data if isinstance(key, asyncssh.SSHKey) else key.key_public_data
    # What `ssh-add -l` prints: the unpadded base64 of the SHA-256 of the public key blob.
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def keys_for(target: SshTarget, keys: Sequence[Key]) -> list[Key]:
    """The keys to offer ``target``: only the one its ``key_fingerprint`` names (every key when it
    names none). Raises :class:`SshConnectError` when that key is not among ``keys``."""
    if target.key_fingerprint is None:
        return list(keys)
    chosen = [key for key in keys if fingerprint(key) == target.key_fingerprint][:1]
    if not chosen:
        raise SshConnectError(
            Reachability.AUTH_REFUSED,
            f"the {target.name} key ({target.key_fingerprint}) is not among the loaded keys, and"
            f" no other key is ever offered to the {target.name}: the keys were not loaded, or were"
            " replaced since this session started; open the console again (a new tab, or restart"
            " it) so it uses the keys loaded now (docs/keys.md)",
        )
    return chosen


async def connect(target: SshTarget, options: ConnectOptions) -> asyncssh.SSHClientConnection:
    """An authenticated connection to target, or :class:`SshConnectError` saying why not."""
    known = pinned_known_hosts(target)
    keys: list[Key] = list(options.client_keys or ())
    agent: asyncssh.SSHAgentClient | None = None
    if options.agent_path:
        agent, agent_keys = await _agent_keys(options.agent_path, target)
        keys.extend(agent_keys)
    if not keys:
        raise SshConnectError(
            Reachability.AUTH_REFUSED,
            f"no SSH key to log in to the {target.name} with: give an ssh-agent or in-memory keys",
        )
    where = f"{target.name} ({target.host}:{target.port})"
    try:
        keys = keys_for(target, keys)
    except SshConnectError:
        if agent is not None:
            agent.close()
        raise
    try:
        return await asyncssh.connect(
            target.host,
            target.port,
            username=target.user,
            known_hosts=known,
            config=None,  # never read ~/.ssh/config
            client_keys=keys,
            agent_path=None,  # keys come only from the list above, never $SSH_AUTH_SOCK
            agent_forwarding=False,
            pkcs11_provider=None,
            password=None,
            password_auth=False,
            kbdint_auth=False,
            gss_auth=False,
            host_based_auth=False,
            preferred_auth="publickey",
            connect_timeout=options.connect_timeout_s,
            login_timeout=options.connect_timeout_s,
            keepalive_interval=options.keepalive_interval_s,
            keepalive_count_max=options.keepalive_count_max,
        )
    except asyncssh.HostKeyNotVerifiable:
        if _host_is_pinned(known, target):
            raise SshConnectError(
                Reachability.HOST_KEY_MISMATCH,
                f"the {where} presented a host key that is NOT the pinned one: refusing to log in"
                " (a reinstalled guest, or someone in the middle); verify the key out of band"
                " and update the pinned known_hosts line",
            ) from None
        raise SshConnectError(
            Reachability.HOST_KEY_MISMATCH,
            f"the {where} is unknown to the pinned known_hosts (no entry for this address and"
            " port): refusing to log in; add its known_hosts line",
        ) from None
    except asyncssh.PermissionDenied:
        raise SshConnectError(
            Reachability.AUTH_REFUSED,
            f"the {where} refused our key for user {target.user!r}"
            + (
                f" (the {target.name} key {target.key_fingerprint}, the only one offered to it)"
                if target.key_fingerprint
                else ""
            )
            + f": check that the breakglass {target.name} public key is in that user's"
            " authorized_keys",
        ) from None
    except asyncssh.DisconnectError as exc:
        raise SshConnectError(
            Reachability.NO_BANNER,
            f"the {where} dropped the SSH handshake ({exc.reason}); probe it, then retry",
        ) from None
    except TimeoutError:
        raise SshConnectError(
            Reachability.TCP_TIMEOUT,
            f"no SSH login to the {where} within {options.connect_timeout_s:g}s (no answer, or"
            " no SSH banner: a wedged guest); probe it, or check the VM's state with the status"
            " verb",
        ) from None
    except OSError as exc:
        raise _classify_os_error(exc, target) from None
    except (asyncssh.Error, ValueError) as exc:
        raise SshConnectError(
            Reachability.NO_BANNER,
            f"SSH to the {where} failed: {exc}; probe it, then retry",
        ) from None
    finally:
        if agent is not None:
            agent.close()
            with contextlib.suppress(Exception):
                await agent.wait_closed()
