"""The simulated devvm: an SSH server on 127.0.0.1 whose exec requests run in the lab's shell.

What a client sees on the port follows the guest's state, like a real VM 102 would show it:

- ``ssh``: an asyncssh server (public-key auth for one user; no pty, no forwarding) whose exec
  requests run in :class:`~breakglass_tui.lab.shell.Shell` against the scenario's
  :class:`~breakglass_tui.lab.scenarios.DevvmState`. Commands wrapped by the hosts layer
  (``setsid -w sh -c <leader> breakglass <command>``, see ``hosts/devvm.py``) print the
  process-group marker first, like the real leader script, so the breakglass shell can stop them
  with ``kill -TERM -<pgid>`` on a second channel. A signal request, ``kill`` of the command's pid
  or process group, or the channel closing stops a running command.
- ``no_banner``: a plain asyncio TCP server on the same port that accepts and says nothing: the
  wedged guest (scenario ``wedged``) or a VM paused by QEMU (``qmp_status`` paused/io-error).
- ``refused``: nothing listens: the VM is stopped, or it is still booting.

With ``vm_json`` (the simulated Proxmox's ``<root>/vm.json``) the sim polls the VM's state every
``poll_s``. A new ``boot_id`` is a reboot: the scenario state is rebooted (see scenarios.py for
what a reboot fixes), open connections drop, and the port refuses until ``booted_at +
boot_delay_s``. The boot id seen first counts as already booted, so a lab is usable at once.
Every mode change drops open connections (a stopped or rebooted guest's TCP sessions die).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from breakglass_tui.hosts.devvm import PGID_MARKER, unwrap_command
from breakglass_tui.lab.scenarios import DevvmState, SimProcess, build_state
from breakglass_tui.lab.shell import Output, Shell

log = logging.getLogger(__name__)

_STOPPING_SIGNALS = frozenset(
    {"TERM", "KILL", "INT", "HUP", "QUIT", "PIPE", "ALRM", "USR1", "USR2"}
)
SSH_VERSION = "OpenSSH_9.2p1 Debian-2+deb12u3"


class _ChannelOutput(Output):
    """Writes to the SSH channel, waiting while the client's window is full."""

    def __init__(self, session: _ShellSession) -> None:
        self.session = session

    async def out(self, text: str) -> None:
        await self.session.can_write.wait()
        self.session.chan.write(text)

    async def err(self, text: str) -> None:
        await self.session.can_write.wait()
        self.session.chan.write_stderr(text)


class _ShellSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One exec (or non-pty shell) channel: one simulated process running one command line."""

    def __init__(self, sim: DevvmSim) -> None:
        self.sim = sim
        self.chan: asyncssh.SSHServerChannel[str]
        self.command: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.stdin: asyncio.Queue[str | None] = asyncio.Queue()
        self.killed_by: str | None = None
        self.pid = 0

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:  # type: ignore[override]
        self.chan = chan

    def pty_requested(self, *args: object) -> bool:
        return False  # the breakglass shell never asks for one; the lab keeps it simple

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return False

    def session_started(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: str, datatype: int | None) -> None:  # type: ignore[override]
        self.stdin.put_nowait(data)

    def eof_received(self) -> bool:
        self.stdin.put_nowait(None)
        return True  # stdin closed is not the end: the command runs on, as under sshd

    def signal_received(self, signal: str) -> None:
        self.stop(signal)

    def break_received(self, msec: int) -> bool:
        self.stop("INT")
        return True

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        # The channel closed (client gone or connection dropped): the command dies with it,
        # the way a command loses its session on a real host when sshd tears it down.
        self.can_write.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.sim.state.processes.pop(self.pid, None)

    def stop(self, signal: str) -> None:
        """Deliver a signal to this channel's process (group): the command ends with it."""
        if signal not in _STOPPING_SIGNALS:
            return
        self.killed_by = signal
        self.sim.state.processes.pop(self.pid, None)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _run(self) -> None:
        sim, state = self.sim, self.sim.state
        self.pid = state.new_pid()
        command = self.command
        state.processes[self.pid] = SimProcess(
            self.pid,
            sim.user,
            command or "-bash",
            rss_kb=3_600,
            vsz_kb=8_200,
            stat="Ss",
            start=time.time(),
            ppid=540,
            pgid=self.pid,
            on_signal=self.stop,
        )
        shell = Shell(state, user=sim.user, pid=self.pid, io_delay_s=sim.io_delay_s)
        out = _ChannelOutput(self)
        status = 0
        try:
            if command is None:
                status = await self._script(shell, out)
            else:
                inner = unwrap_command(command)
                if inner is None:
                    status = await shell.run(command, out)
                else:
                    # The hosts layer's leader script: report the process group, then run the
                    # command as root (the wrapper's `sudo -n`, or a root login).
                    root = sim.user == "root" or command.startswith("exec sudo -n ")
                    proc = state.processes.get(self.pid)
                    if proc is not None:  # what ps shows once the leader has exec'd bash
                        proc.command, proc.user = f"bash -c {inner}", "root" if root else sim.user
                    await out.out(PGID_MARKER.decode() + f"{self.pid}\n")
                    status = await shell.run(inner, out, root=root)
        except asyncio.CancelledError:
            if self.killed_by is not None:
                with contextlib.suppress(OSError, asyncssh.Error):
                    self.chan.exit_with_signal(self.killed_by)
            return
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            return  # the client went away mid-write
        finally:
            state.processes.pop(self.pid, None)
        with contextlib.suppress(OSError, asyncssh.Error):
            self.chan.exit(status)

    async def _script(self, shell: Shell, out: Output) -> int:
        """A shell request without a pty: run stdin line by line, like `sh` reading a script."""
        status = 0
        pending = ""
        while True:
            data = await self.stdin.get()
            if data is None:
                break
            pending += data
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                if line.strip():
                    status = await shell.run(line, out)
        if pending.strip():
            status = await shell.run(pending, out)
        return status


class _SshServer(asyncssh.SSHServer):
    """Public-key auth for the lab user only; everything else refused (asyncssh's defaults)."""

    def __init__(self, sim: DevvmSim) -> None:
        self.sim = sim
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.sim._ssh_conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.sim._ssh_conns.discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == self.sim.user and key.public_data in self.sim._authorized

    def session_requested(self) -> _ShellSession:
        return _ShellSession(self.sim)


class DevvmSim:
    """The simulated devvm's SSH endpoint and state. ``await start()``, then ``await close()``."""

    def __init__(
        self,
        scenario: str = "healthy",
        *,
        host_key: asyncssh.SSHKey,
        authorized_keys: Sequence[str],
        user: str = "breakglass",
        vm_json: Path | None = None,
        boot_delay_s: float = 2.0,
        io_delay_s: float = 0.4,
        poll_s: float = 0.2,
    ) -> None:
        """authorized_keys: OpenSSH public key lines allowed to log in as `user`."""
        self.state: DevvmState = build_state(scenario)
        self.scenario = scenario
        self.host_key = host_key
        self._authorized = {
            asyncssh.import_public_key(line).public_data for line in authorized_keys
        }
        self.user = user
        self.vm_json = vm_json
        self.boot_delay_s = boot_delay_s
        self.io_delay_s = io_delay_s
        self.poll_s = poll_s
        self.port = 0
        self.mode = "refused"
        self.boot_id: int | None = None
        self._first_boot_id: int | None = None
        self._last_vm: dict[str, object] | None = None
        self._booted_at = 0.0
        self._listener: asyncssh.SSHAcceptor | asyncio.Server | None = None
        self._ssh_conns: set[asyncssh.SSHServerConnection] = set()
        self._silent: set[asyncio.StreamWriter] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._mode_changed = asyncio.Condition()

    async def start(self) -> int:
        """Start listening on a free port of 127.0.0.1 (and watching vm.json); returns the port."""
        self._read_vm()
        await self._apply(self._desired_mode())
        if self.port == 0:  # the VM is off at start: reserve a port for when it comes up
            with contextlib.closing(socket.socket()) as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        if self.vm_json is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.port

    async def close(self) -> None:
        """Stop watching, stop listening, drop every connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self._apply("refused", force=True)

    async def wait_for_mode(self, mode: str, timeout_s: float = 10.0) -> None:
        """Wait until the port shows `mode` ("ssh", "no_banner" or "refused")."""
        async with asyncio.timeout(timeout_s), self._mode_changed:
            await self._mode_changed.wait_for(lambda: self.mode == mode)

    # -- the VM's state, from the simulated Proxmox ------------------------------------------

    def _read_vm(self) -> dict[str, object] | None:
        if self.vm_json is None:
            return None
        try:
            vm = json.loads(self.vm_json.read_text())
        except (OSError, ValueError):
            return self._last_vm  # mid-write or gone: keep the last state seen
        self._last_vm = vm
        boot_id = vm.get("boot_id")
        if isinstance(boot_id, int) and boot_id != self.boot_id:
            if self._first_boot_id is None:
                self._first_boot_id = boot_id  # the lab starts with the guest already up
            else:
                log.info("devvm sim: boot id %s -> %s: the guest rebooted", self.boot_id, boot_id)
                self.state.reboot(float(vm.get("booted_at") or time.time()))  # type: ignore[arg-type]
                self._drop_connections()
            self.boot_id = boot_id
            self._booted_at = float(vm.get("booted_at") or time.time())  # type: ignore[arg-type]
        return vm

    def _desired_mode(self) -> str:
        vm = self._last_vm
        if vm is not None:
            if vm.get("status") != "running" or vm.get("qmp_status") == "prelaunch":
                return "refused"
            if vm.get("qmp_status") in ("paused", "io-error"):
                return "no_banner"  # the guest's CPUs are stopped mid-connection
            booting = time.time() < self._booted_at + self.boot_delay_s
            if self.boot_id != self._first_boot_id and booting:
                return "refused"
        return "no_banner" if self.state.wedged else "ssh"

    async def _watch(self) -> None:
        while True:
            try:
                self._read_vm()
                await self._apply(self._desired_mode())
            except Exception:  # a lab that stops following the VM is worse than a log line
                log.exception("devvm sim: following vm.json failed")
            await asyncio.sleep(self.poll_s)

    # -- listeners -------------------------------------------------------------------------------

    async def _apply(self, mode: str, *, force: bool = False) -> None:
        if mode == self.mode and not force:
            return
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 2.0)
            self._listener = None
        self._drop_connections()
        port = self.port
        if mode == "ssh":
            self._listener = await asyncssh.listen(
                "127.0.0.1",
                port,
                server_factory=lambda: _SshServer(self),
                server_host_keys=[self.host_key],
                reuse_address=True,
                encoding="utf-8",
                server_version=SSH_VERSION,
                config=None,
                login_timeout=30,
                agent_forwarding=False,
                x11_forwarding=False,
            )
            self.port = self._listener.get_port()
        elif mode == "no_banner":
            self._listener = await asyncio.start_server(
                self._say_nothing, "127.0.0.1", port, reuse_address=True
            )
            self.port = self._listener.sockets[0].getsockname()[1]
        log.info("devvm sim on 127.0.0.1:%s: %s -> %s", self.port, self.mode, mode)
        async with self._mode_changed:
            self.mode = mode
            self._mode_changed.notify_all()

    def _drop_connections(self) -> None:
        for conn in list(self._ssh_conns):
            conn.abort()
        self._ssh_conns.clear()
        for writer in list(self._silent):
            writer.transport.abort()
        self._silent.clear()

    async def _say_nothing(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A wedged guest: the kernel completed the TCP handshake, sshd never answers."""
        self._silent.add(writer)
        try:
            while await reader.read(4096):
                pass
        except OSError:
            pass
        finally:
            self._silent.discard(writer)
            writer.transport.abort()
