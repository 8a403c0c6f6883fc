"""Real parts for tests: an OpenSSH ``sshd`` and an OpenSSH ``ssh-agent`` on loopback.

Each helper starts a process of its own, remembers its PID and kills only that PID on close.
Recipes: docs/architecture.md §7.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from breakglass_tui.lab.loopback import new_key, pinned_target, public_line
from tests.support.waiting import until_sync

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    try:
        until_sync(listening, what=f"a listener on 127.0.0.1:{port}", timeout_s=timeout)
    except AssertionError as exc:
        raise TimeoutError(str(exc)) from None


@dataclass
class Sshd:
    """A running OpenSSH sshd on 127.0.0.1."""

    port: int
    pid: int
    workdir: Path
    host_key: asyncssh.SSHKey
    log_path: Path
    proc: subprocess.Popen[bytes]

    @property
    def known_hosts(self) -> str:
        """known_hosts text pinning this server's host key."""
        return pinned_target(self.port, "root", public_line(self.host_key), "sshd").known_hosts

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_sshd(
    authorized_keys: str,
    extra_config: str = "",
    *,
    user: str = "root",
    port: int | None = None,
    host_key: asyncssh.SSHKey | None = None,
) -> Sshd:
    """Start ``sshd -D`` with its own host key, port and authorized_keys text (lines as written
    to a real ``authorized_keys``, options such as ``command="…",restrict`` included). ``port``
    and ``host_key`` bring a stopped server back as it was."""
    if not Path(SSHD).exists():
        raise RuntimeError("OpenSSH sshd is missing: apt-get install openssh-server")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bg-sshd-"))
    host_key = host_key or new_key("sshd-host")
    host_key_path = workdir / "host_ed25519"
    host_key.write_private_key(str(host_key_path))
    host_key_path.chmod(0o600)
    ak = workdir / "authorized_keys"
    ak.write_text(authorized_keys)
    port = port or free_port()
    cfg = workdir / "sshd_config"
    log_path = workdir / "sshd.log"
    cfg.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key_path}
PidFile {workdir}/sshd.pid
AuthorizedKeysFile {ak}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin yes
AllowUsers {user}
LogLevel VERBOSE
{extra_config}
"""
    )
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(cfg), "-E", str(log_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"sshd did not start: {log_path.read_text(errors='replace')}") from None
    return Sshd(port, proc.pid, workdir, host_key, log_path, proc)


@dataclass
class SshAgent:
    """A running OpenSSH ssh-agent with a socket in a private directory."""

    socket_path: str
    pid: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_ssh_agent() -> SshAgent:
    workdir = Path(tempfile.mkdtemp(prefix="bg-agent-"))
    workdir.chmod(0o700)
    sock = str(workdir / "agent.sock")
    # -D: foreground, so the PID we hold is the agent's own.
    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", sock],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("ssh-agent did not create its socket")
        time.sleep(0.02)
    return SshAgent(sock, proc.pid, proc, workdir)


@contextlib.contextmanager
def running_sshd(authorized_keys: str, extra_config: str = "") -> Iterator[Sshd]:
    server = start_sshd(authorized_keys, extra_config)
    try:
        yield server
    finally:
        server.close()
