"""The lab's PVE SSH host: an asyncssh server on loopback that applies a forced command as
OpenSSH's ``command="…",restrict`` does, so the real ``breakglass-verb`` runs behind it.

asyncssh's own server is not a faithful stand-in (docs/architecture.md §6): given a key option
``command=`` it replaces the original command and drops it, and with a process factory it refuses
sftp and allows a pty. So the key carries no option here and each session is handled by hand:

- exec request     -> ``/bin/sh -c <forced command>`` with ``SSH_ORIGINAL_COMMAND`` = the exact
                      command (a command holding NUL is refused, as sshd cannot carry it)
- shell request    -> the forced command with ``SSH_ORIGINAL_COMMAND`` unset
- subsystem        -> a known one (sftp) is routed to the forced command with
                      ``SSH_ORIGINAL_COMMAND`` = its server path, as sshd does (its stderr is
                      read and dropped, as sshd does for subsystems); others refused
- pty, X11, agent and TCP/unix forwarding -> refused (``restrict``)
- only the one authorized key; no password or keyboard-interactive login.

The child gets a clean environment (PATH, HOME, USER, LOGNAME, SHELL, SSH_CONNECTION,
SSH_CLIENT, then ``verb_env``): nothing of this process's environment, where secrets may live,
and none of the client's ``env`` requests. Output streams back as it comes; the exit status (or
signal) passes through. When the client goes away mid-command the child is not killed: its pipes
close, as with sshd, and it runs to its end (a ``cycle`` must not be cut between stop and start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import asyncssh

from breakglass_tui.lab.loopback import public_line
from breakglass_tui.verb.breakglass_verb import CONFIG_ENV

log = logging.getLogger(__name__)

# What a stock Debian sshd_config routes: ``Subsystem sftp /usr/lib/openssh/sftp-server``.
SUBSYSTEMS = {"sftp": "/usr/lib/openssh/sftp-server"}
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The real breakglass-verb, run as the forced command by both labs.
VERB_PATH = Path(__file__).resolve().parent.parent / "verb" / "breakglass_verb.py"


class LabPveHost:
    """A forced-command SSH server on 127.0.0.1 standing in for the PVE host."""

    def __init__(self) -> None:
        self._server: asyncssh.SSHAcceptor | None = None
        self._children: set[asyncio.subprocess.Process] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self.port: int | None = None

    @property
    def running_commands(self) -> tuple[asyncio.subprocess.Process, ...]:
        """The forced commands running now (one process per SSH session), for a caller that
        must see them end."""
        return tuple(self._children)

    async def start(
        self,
        *,
        verb_argv: list[str],
        verb_env: dict[str, str],
        authorized_key: str,
        host_key: asyncssh.SSHKey,
        port: int = 0,
    ) -> int:
        """Listen on 127.0.0.1 (`port` 0: any free port) and return the port.

        `verb_argv` is the forced command (joined with shell quoting and run by /bin/sh -c, as
        sshd does with ``command="…"``); `authorized_key` the one OpenSSH public key line allowed
        in (options in front of it are not honoured: this server applies its own)."""
        if not verb_argv:
            raise ValueError("verb_argv is empty: give the forced command to run, e.g. the verb")
        forced = shlex.join(verb_argv)
        allowed = _public_key(authorized_key)
        host = self

        class _Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                self._conn = conn
                host._conns.add(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                host._conns.discard(self._conn)

            def begin_auth(self, username: str) -> bool:
                return True

            def public_key_auth_supported(self) -> bool:
                return True

            def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
                return key.public_data == allowed.public_data

            def password_auth_supported(self) -> bool:
                return False

            def kbdint_auth_supported(self) -> bool:
                return False

            def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
                return _ForcedCommandSession(host, self._conn, forced, verb_env)

        self._server = await asyncssh.create_server(
            _Server,
            "127.0.0.1",
            port,
            server_host_keys=[host_key],
            encoding=None,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            keepalive_interval=0,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("lab PVE host listening on 127.0.0.1:%s, forced command %s", self.port, forced)
        return self.port

    async def start_verb(
        self, verb_config: Path, *, authorized_key: asyncssh.SSHKey, host_key: asyncssh.SSHKey
    ) -> int:
        """Listen with the real ``breakglass-verb`` (configured by `verb_config`) as the forced
        command of `authorized_key`, as on the PVE host; return the port."""
        return await self.start(
            verb_argv=[sys.executable, str(VERB_PATH)],
            verb_env={CONFIG_ENV: str(verb_config)},
            authorized_key=public_line(authorized_key),
            host_key=host_key,
        )

    async def close(self, *, grace_s: float = 30.0) -> None:
        """Stop listening, drop connections, let running verbs finish (up to `grace_s`: they
        have deadlines of their own), then kill the ones still running, by PID."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            conn.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for child in list(self._children):
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    await child.wait()
        for task in list(self._tasks):
            task.cancel()


def _public_key(line: str) -> asyncssh.SSHKey:
    """The key of an OpenSSH public key line (options in front of it are skipped)."""
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                return asyncssh.import_public_key(f"{word} {words[i + 1]}")
            except (asyncssh.KeyImportError, ValueError):
                break
    raise ValueError(
        "authorized_key is not an OpenSSH public key line (ssh-ed25519 AAAA... comment)"
    )


def _drop(data: bytes) -> None:
    pass


def _existing_dir(path: str) -> str:
    return path if os.path.isdir(path) else "/"


class _ForcedCommandSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One session channel: every request kind runs the forced command, as sshd does."""

    def __init__(
        self,
        host: LabPveHost,
        conn: asyncssh.SSHServerConnection,
        forced: str,
        verb_env: dict[str, str],
    ) -> None:
        self._host = host
        self._conn = conn
        self._forced = forced
        self._verb_env = verb_env
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._original: str | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._closed = False
        self._stdin_pending: list[bytes] = []
        self._stdin_eof = False
        self._subsystem = False

    # -- requests ------------------------------------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False  # restrict: no-pty

    def shell_requested(self) -> bool:
        self._original = None
        return True

    def exec_requested(self, command: str) -> bool:
        if "\0" in command:
            return False
        self._original = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem not in SUBSYSTEMS:
            return False
        self._original = SUBSYSTEMS[subsystem]
        self._subsystem = True
        return True

    def session_started(self) -> None:
        task = asyncio.ensure_future(self._run())
        self._host._tasks.add(task)
        task.add_done_callback(self._host._tasks.discard)

    # -- data from the client --------------------------------------------------------------------
    def data_received(self, data: bytes, datatype: Any) -> None:
        if self._child is not None and self._child.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._child.stdin.write(data)
        else:
            self._stdin_pending.append(data)

    def eof_received(self) -> bool:
        self._stdin_eof = True
        if self._child is not None and self._child.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._child.stdin.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        # As sshd does when the client goes: close the child's pipes; do not signal it.
        child = self._child
        if child is not None and child.returncode is None:
            for fd in (0, 1, 2):
                pipe = child._transport.get_pipe_transport(fd)  # type: ignore[attr-defined]
                if pipe is not None:
                    pipe.close()

    # -- the forced command ----------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        peer = self._conn.get_extra_info("peername") or ("127.0.0.1", 0)
        sock = self._conn.get_extra_info("sockname") or ("127.0.0.1", 0)
        user = self._conn.get_extra_info("username") or "root"
        env = {
            "PATH": CHILD_PATH,
            "HOME": os.path.expanduser("~"),
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/sh",
            "SSH_CONNECTION": f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}",
            "SSH_CLIENT": f"{peer[0]} {peer[1]} {sock[1]}",
            **self._verb_env,
        }
        env.pop("SSH_ORIGINAL_COMMAND", None)
        if self._original is not None:
            env["SSH_ORIGINAL_COMMAND"] = self._original
        return env

    async def _run(self) -> None:
        chan = self._chan
        assert chan is not None
        log.info(
            "forced command for %s: original command %r",
            self._conn.get_extra_info("peername"),
            self._original,
        )
        env = self._environment()
        home = _existing_dir(env["HOME"])
        try:
            child = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                self._forced,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=home,  # sshd starts the command in the user's home
                start_new_session=True,  # sshd's child calls setsid()
            )
        except OSError as exc:
            chan.write_stderr(f"forced command could not start: {exc}\n".encode())
            chan.exit(127)
            return
        self._child = child
        self._host._children.add(child)
        try:
            assert child.stdin is not None
            for data in self._stdin_pending:
                child.stdin.write(data)
            if self._stdin_eof:
                child.stdin.close()
            await asyncio.gather(
                self._pump(child.stdout, chan.write),
                # sshd reads a subsystem's stderr and drops it (CHAN_EXTENDED_IGNORE).
                self._pump(child.stderr, _drop if self._subsystem else chan.write_stderr),
            )
            code = await child.wait()
        finally:
            self._host._children.discard(child)
        if self._closed:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            if code < 0:
                name = signal.Signals(-code).name.removeprefix("SIG")
                chan.exit_with_signal(name)
            else:
                chan.exit(code)

    async def _pump(self, stream: asyncio.StreamReader | None, write: Any) -> None:
        assert stream is not None
        while True:
            try:
                data = await stream.read(65536)
            except (OSError, ValueError):
                return
            if not data:
                return
            if not self._closed:
                with contextlib.suppress(OSError, asyncssh.Error):
                    write(data)
