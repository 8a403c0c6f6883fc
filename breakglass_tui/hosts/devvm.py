"""The devvm shell: run a command as root over SSH, stream its output, stop it for real.

How a command is stopped (deadline or cancel). Closing an SSH channel does not stop a quiet
remote process, and OpenSSH does not deliver signals to exec sessions. So every command is
wrapped (:func:`wrap_command`) to run in a session of its own (``setsid -w``) whose leader first
prints its process-group id on a marker line (stripped from the output we show). To stop the
command we open a second channel on the same connection and kill that process group (TERM, then
KILL after 2 s) as root. We chose this over a pty (where hang-up would reach the command) because
a pty merges stderr into stdout, rewrites newlines and invites terminal escapes; the breakglass
agent needs the two streams told apart.

The wrapped command, for a login user that is not root::

    exec sudo -n -- setsid -w sh -c '<leader script>' breakglass '<command>'

(``sudo -n`` never prompts: a missing NOPASSWD rule fails at once with a clear outcome.) The
command itself runs under ``bash --norc --noprofile -c`` when bash exists, else ``sh -c``. A
simulated devvm can recover the operator's command with :func:`unwrap_command`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import re
import shlex
import signal
import time
from collections import deque
from collections.abc import Callable

import asyncssh

from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect
from breakglass_tui.hosts.types import CommandOutcome, Ending, OutputChunk, SshTarget, Stream

# First stdout line of every wrapped command: RS (0x1e), a tag and the process-group id.
PGID_MARKER = b"\x1ebreakglass-pgid "
# With keep_output=False, CommandOutcome.stdout/stderr keep at most this many characters each.
TAIL_CHARS = 64 * 1024
# How long stopping a command may take before we give up on it and say so.
STOP_GRACE_S = 2.0
STOP_DEADLINE_S = 8.0
# The longest one stop takes: the wait for the process-group id, the kill, the channel's close.
STOP_CLOSE_WAIT_S = STOP_DEADLINE_S + 2 * STOP_GRACE_S

# --norc/--noprofile: bash started under sshd sources ~/.bashrc even for `bash -c`; a rescue must
# not depend on (or wait for) the user's rc files, which may hang on a wedged guest.
_LEADER_SCRIPT = (
    'printf "\\036breakglass-pgid %s\\n" "$$"; '
    'if command -v bash >/dev/null 2>&1; then exec bash --norc --noprofile -c "$1"; fi; '
    'exec sh -c "$1"'
)
_WRAP_ARGV0 = "breakglass"


def wrap_command(command: str, *, as_root: bool) -> str:
    """The remote command line that runs command as root in its own process group and reports
    that group's id on a marker line first."""
    sudo = "" if as_root else "sudo -n -- "
    return (
        f"exec {sudo}setsid -w sh -c {shlex.quote(_LEADER_SCRIPT)} {_WRAP_ARGV0}"
        f" {shlex.quote(command)}"
    )


def unwrap_command(remote: str) -> str | None:
    """The operator's command inside a line made by :func:`wrap_command`, or None if remote is
    not such a line (for the lab's simulated devvm shell)."""
    try:
        argv = shlex.split(remote)
    except ValueError:
        return None
    if argv[:2] == ["exec", "sudo"]:
        argv = ["exec", *argv[4:]] if argv[2:4] == ["-n", "--"] else []
    if argv[:6] == ["exec", "setsid", "-w", "sh", "-c", _LEADER_SCRIPT] and len(argv) == 8:
        return argv[7] if argv[6] == _WRAP_ARGV0 else None
    return None


def stop_command(pgid: int, *, as_root: bool) -> str:
    """The remote command line that stops process group pgid: TERM, then KILL if still there."""
    tries = int(STOP_GRACE_S / 0.1)
    script = (
        # Alive = a member that is not a zombie: where PID 1 does not reap orphans (containers),
        # killed background children linger as zombies and `kill -0` would still say yes.
        "alive() { ps -e -o pgid= -o stat= | "
        f"awk '$1 == {pgid} && $2 !~ /^Z/ {{ f = 1 }} END {{ exit !f }}'; }}; "
        f"command -v ps >/dev/null 2>&1 || alive() {{ kill -0 -{pgid} 2>/dev/null; }}; "
        # No "--" before the negative pid: dash's kill builtin refuses it.
        f"kill -TERM -{pgid} 2>/dev/null || exit 0; i=0; "
        f"while [ $i -lt {tries} ]; do alive || exit 0; sleep 0.1; i=$((i+1)); done; "
        f"kill -KILL -{pgid} 2>/dev/null; exit 0"
    )
    sudo = "" if as_root else "sudo -n -- "
    return f"{sudo}sh -c {shlex.quote(script)}"


_SETSID_KILLED = re.compile(r"setsid: child \d+ did not exit normally[^\n]*\n?\Z")
_SUDO_REFUSED = re.compile(r"^sudo: .*(password|not allowed|may not run|not in the sudoers)", re.M)


class _Collector:
    """Decodes and keeps one command's output, strips the marker line, feeds on_output."""

    def __init__(self, on_output: Callable[[OutputChunk], None] | None, keep_output: bool) -> None:
        self.on_output = on_output
        self.keep_output = keep_output
        self.decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self.parts: dict[Stream, deque[str]] = {"stdout": deque(), "stderr": deque()}
        self.kept: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        self.nbytes: dict[Stream, int] = {"stdout": 0, "stderr": 0}
        self.pgid: int | None = None
        self.pgid_known = asyncio.Event()
        self.head: bytes | None = b""  # stdout bytes before the marker decision; None = decided
        self.callback_error: BaseException | None = None

    def feed(self, stream: Stream, data: bytes) -> None:
        if stream == "stdout" and self.head is not None:
            data = self._strip_marker(data)
            if not data:
                return
        self.nbytes[stream] += len(data)
        self._emit(stream, self.decoders[stream].decode(data))

    def _strip_marker(self, data: bytes) -> bytes:
        assert self.head is not None
        head = self.head + data
        if PGID_MARKER.startswith(head[: len(PGID_MARKER)]):
            newline = head.find(b"\n")
            if newline < 0 and len(head) < 64:
                self.head = head  # wait for the rest of the marker line
                return b""
            if newline >= 0:
                with contextlib.suppress(ValueError):
                    self.pgid = int(head[len(PGID_MARKER) : newline])
                    self.pgid_known.set()
                    self.head = None
                    return head[newline + 1 :]
        self.head = None  # not our marker (a server that does not wrap): output as is
        return head

    def _emit(self, stream: Stream, text: str) -> None:
        if not text:
            return
        parts = self.parts[stream]
        parts.append(text)
        self.kept[stream] += len(text)
        if not self.keep_output:
            # Drop whole leading pieces while the rest still covers the tail: no copying.
            while len(parts) > 1 and self.kept[stream] - len(parts[0]) >= TAIL_CHARS:
                self.kept[stream] -= len(parts.popleft())
        if self.on_output is not None:
            try:
                self.on_output(OutputChunk(stream, text))
            except Exception as exc:  # a broken consumer must not kill the command's channel
                self.callback_error = exc

    def finish(self) -> None:
        if self.head:  # output shorter than a marker line, and never completed: it is output
            head, self.head = self.head, None
            self.nbytes["stdout"] += len(head)
            self._emit("stdout", self.decoders["stdout"].decode(head))
        self.head = None
        for stream in ("stdout", "stderr"):
            self._emit(stream, self.decoders[stream].decode(b"", final=True))

    def text(self, stream: Stream) -> str:
        joined = "".join(self.parts[stream])
        return joined if self.keep_output else joined[-TAIL_CHARS:]


class _Session(asyncssh.SSHClientSession[bytes]):
    def __init__(self, collector: _Collector, closed: asyncio.Future[Exception | None]) -> None:
        self._collector = collector
        self._closed = closed

    def data_received(self, data: bytes, datatype: int | None) -> None:
        stream: Stream = "stderr" if datatype == asyncssh.EXTENDED_DATA_STDERR else "stdout"
        self._collector.feed(stream, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(exc)


class DevvmShell:
    """A root shell on the devvm over one SSH connection, reconnecting when it drops."""

    def __init__(
        self,
        target: SshTarget,
        options: ConnectOptions,
        *,
        default_timeout_s: float = 120.0,
    ) -> None:
        self.target = target
        self.options = options
        self.default_timeout_s = default_timeout_s
        self.as_root = target.user == "root"
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        # Stops in flight (a cancelled or timed-out command being killed on the devvm): close()
        # waits for them, or closing the connection would leave the command running.
        self._stops: set[asyncio.Task[str]] = set()

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and self._conn.is_closed():
                self._conn = None
            if self._conn is None:
                self._conn = await connect(self.target, self.options)
            return self._conn

    def _forget(self, conn: asyncssh.SSHClientConnection) -> None:
        if self._conn is conn:
            self._conn = None
        conn.abort()

    async def run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        on_output: Callable[[OutputChunk], None] | None = None,
        keep_output: bool = True,
    ) -> CommandOutcome:
        """Run command as root on the devvm, streaming its output to on_output as it comes.

        Never raises for remote failures: the outcome's ``ending`` and ``message`` say what
        happened. On the deadline (timeout_s, default default_timeout_s) or when the awaiting
        task is cancelled, the remote command is stopped on the devvm; cancellation is then
        re-raised. keep_output=False keeps only a 64 KiB tail of each stream in the outcome
        (the caller took the whole stream through on_output)."""
        started = time.monotonic()
        deadline_s = self.default_timeout_s if timeout_s is None else timeout_s
        collector = _Collector(on_output, keep_output)

        def outcome(ending: Ending, message: str = "", **fields: object) -> CommandOutcome:
            collector.finish()
            return CommandOutcome(
                command=command,
                ending=ending,
                stdout=collector.text("stdout"),
                stderr=collector.text("stderr"),
                duration_s=time.monotonic() - started,
                message=message,
                stdout_bytes=collector.nbytes["stdout"],
                stderr_bytes=collector.nbytes["stderr"],
                kept_tail_only=not keep_output,
                **fields,  # type: ignore[arg-type]
            )

        loop = asyncio.get_running_loop()
        closed: asyncio.Future[Exception | None] = loop.create_future()
        chan: asyncssh.SSHClientChannel[bytes] | None = None
        conn: asyncssh.SSHClientConnection | None = None
        for attempt in (1, 2):  # a connection that died while idle is replaced once
            closed = loop.create_future()  # fresh: a failed attempt may have resolved the last
            try:
                conn = await self._connection()
            except SshConnectError as exc:
                return outcome(Ending.FAILED, f"could not run the command: {exc.message}")
            try:
                chan, _ = await conn.create_session(
                    functools.partial(_Session, collector, closed),
                    wrap_command(command, as_root=self.as_root),
                    encoding=None,
                )
                break
            except (asyncssh.Error, OSError) as exc:
                self._forget(conn)
                if attempt == 2:
                    return outcome(
                        Ending.DISCONNECTED,
                        f"the devvm connection failed while starting the command ({exc});"
                        " the next command reconnects",
                    )
        assert chan is not None and conn is not None
        chan.write_eof()  # the command gets no stdin: nothing waits on the operator's keyboard

        try:
            async with asyncio.timeout(deadline_s):
                lost = await asyncio.shield(closed)
        except TimeoutError:
            note = await asyncio.shield(self._stop_task(conn, chan, closed, collector))
            self._killed_by(collector, chan.get_exit_status() or 0)  # drops setsid's report
            return outcome(
                Ending.TIMED_OUT,
                f"the command did not finish within its {deadline_s:g}s deadline; {note}",
            )
        except asyncio.CancelledError:
            await asyncio.shield(self._stop_task(conn, chan, closed, collector))
            raise

        status, exit_signal = chan.get_exit_status(), chan.get_exit_signal()
        if exit_signal is not None:
            return outcome(
                Ending.EXITED,
                f"the command was killed by signal {exit_signal[0]}",
                exit_status=status,
                signal=exit_signal[0],
            )
        if status is None:
            self._forget(conn)
            reason = f" ({lost})" if lost else ""
            return outcome(
                Ending.DISCONNECTED,
                "the connection to the devvm dropped while the command ran"
                f"{reason}; its outcome is unknown (it may still be running); the next command"
                " reconnects",
            )
        killed = self._killed_by(collector, status)
        if killed is not None:
            return outcome(
                Ending.EXITED,
                f"the command was killed by signal {killed}"
                + (" (the kernel's OOM killer?)" if killed == "KILL" else ""),
                exit_status=status,
                signal=killed,
            )
        if collector.pgid is None and status != 0:
            failed = self._start_failure(collector, status)
            if failed:
                return outcome(Ending.FAILED, failed, exit_status=status)
        return outcome(Ending.EXITED, exit_status=status)

    @staticmethod
    def _killed_by(collector: _Collector, status: int) -> str | None:
        """The signal that killed the command, from ``setsid -w``'s report, or None.

        The command's death by signal does not reach us as an SSH exit-signal (setsid stands
        between): ``setsid -w`` says "child N did not exit normally" and exits with the wait
        status, which for a killed child is the signal number. The line is dropped from the
        kept stderr (it was streamed already)."""
        if collector.pgid is None or not 0 < status < 128:
            return None
        kept = collector.parts["stderr"]
        # err(3) writes its line in pieces: look at the last few.
        pieces = [kept.pop() for _ in range(min(8, len(kept)))][::-1]
        tail = "".join(pieces)
        found = _SETSID_KILLED.search(tail)
        if found:
            tail = tail[: found.start()] + tail[found.end() :]
        if tail:
            kept.append(tail)
        if not found:
            return None
        try:
            return signal.Signals(status).name.removeprefix("SIG")
        except ValueError:
            return str(status)

    def _start_failure(self, collector: _Collector, status: int) -> str:
        """Why the wrapper could not start the command (no marker line came), or ''."""
        stderr = "".join(collector.parts["stderr"])
        if not self.as_root and _SUDO_REFUSED.search(stderr):
            return (
                f"sudo refused to run the command as root for user {self.target.user!r} without"
                " a password (sudo -n); give that user a NOPASSWD sudo rule on the devvm"
            )
        if status == 127 and ("setsid" in stderr or "sudo" in stderr):
            return (
                "the devvm lacks setsid (util-linux) or sudo, which the breakglass shell needs to"
                " run and stop commands; install them, or log in as root"
            )
        return ""

    def _stop_task(
        self,
        conn: asyncssh.SSHClientConnection,
        chan: asyncssh.SSHClientChannel[bytes],
        closed: asyncio.Future[Exception | None],
        collector: _Collector,
    ) -> asyncio.Task[str]:
        """Start stopping the command as a task of its own, tracked until done: the caller
        awaits it shielded (a second cancel must not abandon the kill half-way) and close()
        waits for it before closing the connection the kill is sent over."""
        task = asyncio.create_task(self._stop(conn, chan, closed, collector))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)
        return task

    async def _stop(
        self,
        conn: asyncssh.SSHClientConnection,
        chan: asyncssh.SSHClientChannel[bytes],
        closed: asyncio.Future[Exception | None],
        collector: _Collector,
    ) -> str:
        """Stop the running command on the devvm; a sentence saying how that went."""
        note = "the remote command was stopped"
        if closed.done():
            return "it had just ended"
        if collector.pgid is None and not conn.is_closed():
            # Stopped right after it started: the marker line is the leader's first act, so it
            # is on its way unless sudo or the guest is stuck.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collector.pgid_known.wait(), STOP_GRACE_S)
        if collector.pgid is None or conn.is_closed():
            note = (
                "its process group was not yet known, so only our channel was closed: the"
                " command may still run on the devvm; check with ps"
            )
        else:
            try:
                await asyncio.wait_for(
                    conn.run(stop_command(collector.pgid, as_root=self.as_root), check=False),
                    STOP_DEADLINE_S,
                )
            except (TimeoutError, asyncssh.Error, OSError) as exc:
                note = (
                    f"stopping its process group {collector.pgid} failed ({exc!r}): it may"
                    " still run on the devvm; check with ps"
                )
        with contextlib.suppress(TimeoutError):
            # The killed command's channel closes by itself; give its last output a moment.
            await asyncio.wait_for(asyncio.shield(closed), STOP_GRACE_S)
        chan.close()
        return note

    async def close(self) -> None:
        """Close the connection (a running command's channel closes with it).

        A command being stopped (its caller was cancelled, or its deadline passed) is killed over
        this connection: close() first waits for those stops, at most as long as one stop may
        take, so quitting right after a cancel does not leave the command running as root."""
        stops = [t for t in self._stops if not t.done()]
        if stops:
            with contextlib.suppress(Exception):
                await asyncio.wait(stops, timeout=STOP_CLOSE_WAIT_S)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()
