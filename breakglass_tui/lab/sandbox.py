"""The sandbox devvm: this machine's own userland in a bubblewrap sandbox, with a real OpenSSH sshd.

For the fast tests, and for ``--lab`` where QEMU is missing: it starts in a fraction of a second
and runs every command for real — the host's shell and tools (read-only ``/usr``), in namespaces
of their own (PID, mount, IPC, UTS), as root with a few capabilities (what sshd needs), on a private
tmpfs root. Its "disk" is ``/data``, a size-capped tmpfs that a real writer really fills. Nothing
here reads, parses or answers a command: sshd runs them, as on any Linux host.

What it cannot be is a machine: it has no kernel of its own, so no OOM killer of its own, no
reset, no storage to fail. The scenarios it makes real are in
:data:`~breakglass_tui.lab.catalog.SANDBOX_SCENARIOS`; a power action through the lab's simulated
Proxmox "reboots" it: every process in it dies and its init starts the enabled writers and sshd
again, while ``/data`` keeps what was written, as a disk would.

Keys never touch the disk: the host key and the authorized key reach the sandbox's tmpfs through
pipes (``bwrap --file``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from breakglass_tui.lab.catalog import SANDBOX_SCENARIOS

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger(__name__)

BWRAP = "bwrap"
SSHD = "/usr/sbin/sshd"
DATA_SIZE = 32 * 1024 * 1024
# The guest's own unit scripts, run as they are (they only need a shell and coreutils).
UNITS = Path(__file__).with_name("guest") / "files" / "rootfs" / "usr" / "local" / "lib" / "lab"
SCENARIO_UNITS = {"disk-full": ("log-spammer",), "deleted-open": ("report-exporter",)}
# What sshd needs, and no more: it switches users for privilege separation, chroots its pre-auth
# child, and kills its children. No CAP_SYS_ADMIN: the read-only binds stay read-only.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE")

INIT = """#!/bin/sh
# The sandbox devvm's init (bwrap is PID 1 and reaps). It starts the enabled writers and sshd;
# on SIGHUP (a reset or cycle through the lab's Proxmox) it "reboots": every other process dies,
# /tmp and /run are emptied, /data keeps what was written, and it starts them again.
boot() {
    rm -rf /tmp/* /run/* 2> /dev/null
    mkdir -p -m 755 /run/sshd
    for unit in $(cat /var/lib/lab/enabled); do
        setsid sh /opt/lab/$unit < /dev/null >> /var/log/$unit.log 2>&1 &
    done
    if [ -n "$(cat /var/lib/lab/enabled)" ]; then
        # The writers fill /data before the devvm answers: the failure is real when it does.
        i=0
        until [ "$(df --output=pcent /data | tail -n 1 | tr -dc 0-9)" -ge 100 ] || [ $i -ge 600 ]
        do sleep 0.05; i=$((i + 1)); done
    fi
    /usr/sbin/sshd -D -r -e -f /etc/ssh/sshd_config 2>> /var/log/sshd.log &
    echo $(( $(cat /var/lib/lab/boots 2> /dev/null || echo 0) + 1 )) > /var/lib/lab/boots
}
trap 'kill -KILL -1 2> /dev/null; boot' HUP
boot
while :; do sleep 3600 & wait $!; done
"""

SSHD_CONFIG = """# The sandbox devvm's OpenSSH server: the lab's key for root, nothing else.
ListenAddress 127.0.0.1
Port {port}
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
AllowTcpForwarding no
X11Forwarding no
PermitTunnel no
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
"""

PASSWD = """root:x:0:0:root:/root:/bin/bash
sshd:x:100:65534::/run/sshd:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""  # noqa: S105  (/etc/passwd of the sandbox: no password in it)
GROUP = "root:x:0:\nnogroup:x:65534:\n"
# No password for anyone ("*"); without a shadow entry sshd counts root as a locked account.
SHADOW = "root:*:20000:0:99999:7:::\nsshd:*:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\n"
HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tdevvm\n"

_probed: dict[str, str | None] = {}  # PATH -> the probe's verdict


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here; the message names the cause and the next step."""


def sandbox_problem() -> str | None:
    """Why the sandbox devvm cannot run here, in one sentence, or None. Probed once (a real
    bwrap run: a read-only container without capabilities fails it)."""
    key = os.environ.get("PATH", "")
    if key in _probed:
        return _probed[key]
    problem: str | None = None
    if shutil.which(BWRAP) is None:
        problem = "bubblewrap is not installed (apt-get install bubblewrap)"
    elif not Path(SSHD).exists():
        problem = "OpenSSH's sshd is not installed (apt-get install openssh-server)"
    elif os.geteuid() != 0:
        problem = "the sandbox runs OpenSSH's sshd as root in it, so it needs root"
    else:
        try:
            done = subprocess.run(
                [BWRAP, *_base_args(), "--", "/bin/true"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = f"bubblewrap could not run ({exc})"
        else:
            if done.returncode != 0:
                reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                problem = f"bubblewrap cannot make a sandbox here ({reason[0]})"
    _probed[key] = problem
    return problem


def _root_links() -> list[str]:
    """/bin, /sbin, /lib, /lib64 as the host has them (links into /usr, or directories)."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib64"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    return args


def _base_args() -> list[str]:
    # Nothing of this process's environment goes in (no token, no key): a devvm's own.
    args = ["--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/root"]
    args += ["--setenv", "LANG", "C.UTF-8"]
    args += ["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
    args += ["--unshare-uts", "--hostname", "devvm", "--cap-drop", "ALL"]
    for cap in CAPS:
        args += ["--cap-add", cap]
    args += ["--ro-bind", "/usr", "/usr", *_root_links()]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run"]  # noqa: S108
    args += ["--tmpfs", "/etc", "--tmpfs", "/var", "--dir", "/root", "--chmod", "0700", "/root"]
    for path in ("/etc/ld.so.cache", "/etc/alternatives", "/etc/nsswitch.conf", "/etc/localtime"):
        args += ["--ro-bind-try", path, path]
    return args


def _pipe_with(content: bytes) -> int:
    """The read end of a pipe holding content (written and closed: the reader gets EOF)."""
    r, w = os.pipe()
    try:
        os.write(w, content)
    finally:
        os.close(w)
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sighup_default() -> None:  # in the child, before bwrap: SIGHUP as the kernel makes it
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class SandboxDevvm:
    """One sandbox devvm. ``await start()``, then ``await close()``."""

    def __init__(
        self,
        scenario: str = "healthy",
        *,
        host_key: asyncssh.SSHKey,
        authorized_keys: list[str],
        data_size: int = DATA_SIZE,
    ) -> None:
        if scenario not in SANDBOX_SCENARIOS:
            raise ValueError(
                f"the sandbox devvm cannot stage {scenario!r}: it stages"
                f" {', '.join(SANDBOX_SCENARIOS)}; the real devvm (QEMU) stages every scenario"
            )
        self.scenario = scenario
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.data_size = data_size
        self.port = 0  # sshd's port on 127.0.0.1
        self.process: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None  # the sandbox's init script, as this machine sees it
        self.boots = 0

    async def start(self, timeout_s: float = 30.0) -> int:
        """Start the sandbox; returns once its sshd listens (its port)."""
        problem = sandbox_problem()
        if problem:
            raise SandboxUnavailable(f"the sandbox devvm cannot run: {problem}")
        self.port = _free_port()
        await asyncio.to_thread(self._spawn)
        try:
            await self._wait_listening(timeout_s)
        except BaseException:
            await self.close()
            raise
        self.boots = 1
        return self.port

    def _files(self) -> dict[str, bytes]:
        enabled = " ".join(SCENARIO_UNITS.get(self.scenario, ()))
        files = {
            "/etc/passwd": PASSWD.encode(),
            "/etc/group": GROUP.encode(),
            "/etc/shadow": SHADOW.encode(),
            "/etc/hostname": b"devvm\n",
            "/etc/hosts": HOSTS.encode(),
            "/etc/ssh/sshd_config": SSHD_CONFIG.format(port=self.port).encode(),
            "/etc/ssh/ssh_host_ed25519_key": self.host_key.export_private_key("openssh"),
            "/etc/ssh/authorized_keys": ("\n".join(self.authorized_keys) + "\n").encode(),
            "/var/lib/lab/enabled": (enabled + "\n").encode(),
            "/opt/lab/init": INIT.encode(),
        }
        for unit in SCENARIO_UNITS.get(self.scenario, ()):
            files[f"/opt/lab/{unit}"] = (UNITS / unit).read_bytes()
        return files

    def _spawn(self) -> None:
        args = [*_base_args(), "--size", str(self.data_size), "--tmpfs", "/data"]
        for d in ("/data/log/app", "/var/log", "/var/lib/lab", "/etc/ssh", "/opt/lab"):
            args += ["--dir", d]
        # Each file's content goes through a pipe of its own (bwrap --file FD PATH): written to
        # the sandbox's tmpfs, never to this machine's disk. Every file is small: it fits in its
        # pipe's buffer before bwrap reads it.
        fds: list[int] = []
        for path, content in self._files().items():
            fds.append(_pipe_with(content))
            secret = path in ("/etc/shadow", "/etc/ssh/ssh_host_ed25519_key")
            args += ["--perms", "0600" if secret else "0644", "--file", str(fds[-1]), path]
        info_r, info_w = os.pipe()
        args += ["--info-fd", str(info_w)]
        # The arguments through a pipe too (bwrap --args): the sandbox's PID 1 is bwrap, and a
        # command line naming /opt/lab/log-spammer would match the `pkill -f` of a repair.
        fds.append(_pipe_with(b"".join(a.encode() + b"\0" for a in args)))
        try:
            self.process = subprocess.Popen(
                [BWRAP, "--args", str(fds[-1]), "--", "/bin/sh", "/opt/lab/init"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=[*fds, info_w],
                start_new_session=True,
                # A SIGHUP ignored by whoever started us (nohup, a CI runner) would be ignored by
                # the sandbox's init too, and sh cannot trap a signal ignored on entry: its
                # reboot (a reset or cycle) would never happen.
                preexec_fn=_sighup_default,
            )
        finally:
            for fd in fds:
                os.close(fd)
            os.close(info_w)
        with os.fdopen(info_r, "rb") as info:
            raw = info.read()
        try:
            reaper = int(json.loads(raw)["child-pid"])
        except (ValueError, KeyError, TypeError):
            err = self._stderr()
            raise SandboxUnavailable(f"bubblewrap did not start the sandbox devvm: {err}") from None
        # bwrap's child is the sandbox's PID 1, a reaper of its own; the init script is its child.
        self.init_pid = self._child_of(reaper)

    @staticmethod
    def _child_of(pid: int, timeout_s: float = 10.0) -> int:
        deadline = time.monotonic() + timeout_s
        path = Path(f"/proc/{pid}/task/{pid}/children")
        while True:
            with contextlib.suppress(OSError, ValueError):
                children = path.read_text().split()
                if children:
                    return int(children[0])
            if time.monotonic() > deadline:
                raise SandboxUnavailable("the sandbox devvm's init did not start")
            time.sleep(0.01)

    def _stderr(self) -> str:
        if self.process is None or self.process.poll() is None:
            return "(still running)"
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace").strip()[-300:]

    async def _wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise SandboxUnavailable(f"the sandbox devvm exited: {self._stderr()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the sandbox devvm's sshd did not listen within {timeout_s:g} s"
                    ) from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def _boots(self) -> int:
        """How many times the sandbox's init booted (its counter, read through /proc)."""
        try:
            return int(Path(f"/proc/{self.init_pid}/root/var/lib/lab/boots").read_text())
        except (OSError, ValueError):
            return 0

    async def reboot(self, timeout_s: float = 30.0) -> None:
        """Every process of the sandbox dies; its init starts the writers and sshd again.
        Returns once that boot is done and sshd listens."""
        if self.init_pid is None:
            return
        before = self._boots()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while self._boots() <= before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sandbox devvm did not reboot within {timeout_s:g} s")
            await asyncio.sleep(0.02)
        await self._wait_listening(timeout_s)
        self.boots += 1

    async def close(self) -> None:
        """Kill the sandbox (its bwrap by PID: every process in it dies with it)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        if proc.stderr is not None:
            proc.stderr.close()
        self.init_pid = None
