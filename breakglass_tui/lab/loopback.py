"""The lab's SSH keys and the pinned targets of its hosts on 127.0.0.1, for both labs (the
simulated one and the real-guest one)."""

from __future__ import annotations

import asyncssh

from breakglass_tui.hosts.types import SshTarget

DEVVM_KEY = "breakglass-lab-devvm"  # the devvm login key's comment
PVE_KEY = "breakglass-lab-pve"
PVE_HOST_KEY = "lab-pve-host"
DEVVM_HOST_KEY = "lab-devvm-host"


def new_key(comment: str = "breakglass-lab") -> asyncssh.SSHKey:
    """A fresh ed25519 key, in memory only."""
    return asyncssh.generate_private_key("ssh-ed25519", comment=comment)


def public_line(key: asyncssh.SSHKey) -> str:
    """The key's OpenSSH public key line (``ssh-ed25519 AAAA… comment``)."""
    return key.export_public_key("openssh").decode().strip()


def pinned_target(
    port: int, user: str, host_key_line: str, name: str, key: asyncssh.SSHKey | None = None
) -> SshTarget:
    """127.0.0.1:port as an SshTarget whose known_hosts pins the host key of host_key_line; with
    ``key``, only that client key is ever offered to it (as for real targets)."""
    algorithm, blob = host_key_line.split()[:2]
    return SshTarget(
        "127.0.0.1",
        port,
        user,
        f"[127.0.0.1]:{port} {algorithm} {blob}\n",
        name=name,
        key_fingerprint=key.get_fingerprint("sha256") if key is not None else None,
    )
