"""`breakglass-tui --lab` in a real pseudo-terminal, for the hang-up and stop tests and the bench.

The console runs as the session leader of its own session with the pty as its controlling
terminal, as under a terminal emulator or sshd. :meth:`PtyConsole.hang_up` closes the master side:
the kernel then hangs up the terminal and sends SIGHUP to the console, and its reads and writes on
the terminal fail, exactly as when an SSH session drops or a window closes. The console's state
dir and TMPDIR are private, so its journal and audit can be read and any process it leaves found.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _controlling_terminal() -> None:  # runs in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def pids_with_environ(mark: bytes, path: bytes | None = None) -> list[int]:
    """Processes whose environment holds ``mark`` (one ``NAME=value`` entry), or whose command
    line names a file under the directory ``path`` (QEMU runs with an environment of its own,
    but its disks, sockets and console log are under the console's TMPDIR)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                args = (entry / "cmdline").read_bytes().split(b"\0")[1:] if path else []
            except OSError:
                continue
            if mark in environ or any(path in arg for arg in args if path):
                pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """True unless the process is gone or a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class PtyConsole:
    """One ``breakglass-tui --lab`` process in a pty of its own."""

    def __init__(
        self,
        workdir: Path,
        *,
        scenario: str = "healthy",
        env: dict[str, str] | None = None,
        cols: int = 160,
        rows: int = 48,
        argv: list[str] | None = None,
        read: bool = True,
        lab: str = "guest",
    ) -> None:
        """``lab``: "guest" (``--lab``'s default, the real devvm under QEMU) or "sandbox"
        (``--lab --sandbox``)."""
        self.workdir = workdir
        self.state = workdir / "state"
        self.private_tmp = workdir / "tmp"
        self.private_tmp.mkdir(parents=True, exist_ok=True)
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.private_tmp),
            "BREAKGLASS_STATE_DIR": str(self.state),
            "BREAKGLASS_OPERATOR": "viktor",
            "PYTHONPATH": str(ROOT),
        }
        base.update(env or {})
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        command = argv or [
            sys.executable,
            "-m",
            "breakglass_tui.cli",
            "--lab",
            *(["--sandbox"] if lab == "sandbox" else []),
            "--scenario",
            scenario,
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            command,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=base,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=_controlling_terminal,
            close_fds=True,
        )
        os.close(slave)
        self.master: int | None = master
        self._output = bytearray()
        self._stop = threading.Event()
        self.reading = threading.Event()  # cleared: the terminal stops reading (a stalled link)
        if read:
            self.reading.set()
        self._reader = threading.Thread(target=self._read, name="pty-reader", daemon=True)
        self._reader.start()

    # -- the terminal ---------------------------------------------------------------------------
    def _read(self) -> None:
        master = self.master
        assert master is not None
        while not self._stop.is_set():
            if not self.reading.is_set():
                time.sleep(0.05)
                continue
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            self._output += data
            if len(self._output) > 4_000_000:
                del self._output[:2_000_000]

    @property
    def output(self) -> bytes:
        return bytes(self._output)

    def wait_output_end(self, timeout_s: float) -> bool:
        """Wait until everything written to the terminal has been read: the reader stops at
        the end of it, once no process holds the terminal open. False if it is still open."""
        self._reader.join(timeout_s)
        return not self._reader.is_alive()

    def type(self, text: str) -> None:
        """Type ``text`` (``\\r`` is Enter)."""
        if self.master is not None:
            os.write(self.master, text.encode())

    def resize(self, cols: int, rows: int) -> None:
        """The window changes size (the kernel sends SIGWINCH to the console)."""
        if self.master is not None:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def hang_up(self) -> float:
        """Close the terminal (the master side): the kernel sends SIGHUP. Returns the instant."""
        self._stop.set()
        self._reader.join(2)  # a read in flight would keep the terminal open
        master, self.master = self.master, None
        at = time.monotonic()
        if master is not None:
            os.close(master)
        return at

    def send(self, signum: int) -> float:
        at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)
        return at

    # -- the process and what it leaves ---------------------------------------------------------
    def wait_exit(self, timeout_s: float) -> bool:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def left_processes(self) -> list[int]:
        """Live processes started by this console (their TMPDIR is the private one)."""
        mark = f"TMPDIR={self.private_tmp}".encode()
        path = str(self.private_tmp).encode() + b"/"
        return [pid for pid in pids_with_environ(mark, path) if alive(pid) and pid != os.getpid()]

    def left_files(self) -> list[str]:
        """What the console left in its private TMPDIR (a drill's directory, a preparation's)."""
        return sorted(p.name for p in self.private_tmp.iterdir())

    def wait_no_processes(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while (left := self.left_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def close(self) -> None:
        """Kill (by PID) whatever of this console is still alive, and close the terminal."""
        if self.master is not None:
            self.hang_up()
        for pid in [self.proc.pid, *self.left_processes()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    # -- its records ----------------------------------------------------------------------------
    def records(self) -> Path:
        """Where this run keeps its records: a --lab run's own directory under the state dir's
        lab/ (runtime.lab_run_dir), else the state dir."""
        runs = sorted((self.state / "lab").glob("*")) if (self.state / "lab").is_dir() else []
        return runs[-1] if runs else self.state

    def audit(self) -> list[dict[str, Any]]:
        return _json_lines(self.records() / "audit.jsonl")

    def journal(self) -> list[dict[str, Any]]:
        """The events of the incident this console opened (all incidents, in order)."""
        records: list[dict[str, Any]] = []
        for path in sorted((self.records() / "incidents").glob("*/events.jsonl")):
            records += _json_lines(path)
        return records

    def drivers(self) -> list[Path]:
        """Driver leases still held in the state dir."""
        return [p for p in (self.records() / "incidents").glob("*/driver.json") if p.exists()]

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the console exited ({self.proc.returncode}) before {what}; its screen"
                    f" ended with: {self.output[-2000:]!r}"
                )
            if time.monotonic() > deadline:
                shown = re.sub(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]", b"", self.output[-6000:])
                raise AssertionError(
                    f"timed out waiting for {what}; journal: "
                    f"{[r.get('type') for r in self.journal()]}; audit: "
                    f"{[r.get('kind') for r in self.audit()]}; errors: "
                    f"{[r for r in self.audit() if r.get('kind') == 'ui_error']}; "
                    f"screen: {shown[-300:]!r}"
                )
            time.sleep(0.05)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def event_kinds(journal: list[dict[str, Any]]) -> list[str]:
    return [str(r.get("event") or r.get("type") or r.get("kind")) for r in journal]


# -- hang-up and stop trials (tests/ui/test_hangup.py, bench/bench_hangup.py) -------------------

PHASES = ("starting", "idle", "streaming", "command")
TYPED_FIRST = "the devvm is down, fix it"  # typed at once: queued behind the opening probe


@dataclass
class Trial:
    """What one console did when it was hung up or told to stop in one phase."""

    phase: str
    how: str  # "hangup" (the terminal closed) or "sigterm" (the terminal stays)
    stalled: bool  # the terminal had stopped reading (a stalled link) before the signal
    exited: bool = False
    exit_s: float = 0.0  # from the signal to the process gone
    returncode: int | None = None
    lab: str = "guest"  # "guest" (the real devvm under QEMU) or "sandbox"
    left: list[int] = field(default_factory=list)  # processes of the console still alive
    left_files: list[str] = field(default_factory=list)  # what it left in its private TMPDIR
    leases: list[str] = field(default_factory=list)  # driver leases still on disk
    audit: list[dict[str, Any]] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)
    screen_tail: bytes = b""

    def kinds(self) -> list[str]:
        return [str(r.get("kind")) for r in self.audit]


def _journal_has(console: PtyConsole, predicate) -> bool:
    return any(predicate(r) for r in console.journal())


def _opening_check_done(console: PtyConsole) -> bool:
    return _journal_has(
        console, lambda r: r.get("type") == "ToolCallEnded" and r.get("tool") == "pve_verb"
    )


def reach_phase(console: PtyConsole, phase: str, rng: random.Random, timeout_s: float) -> None:
    """Drive the console into ``phase`` (it was started moments ago), then let a random moment
    of it pass: the sleeps here are the trial's point (when the hang-up lands), not waits."""
    if phase == "starting":
        time.sleep(rng.uniform(0.0, 1.2))  # a random moment in the start-up
        return
    if phase == "streaming":
        console.type(TYPED_FIRST + "\r")  # typed during start-up: queued, never refused
    console.wait_for(lambda: _opening_check_done(console), timeout_s, "the opening check")
    if phase == "idle":
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment in the phase
    elif phase == "streaming":
        console.wait_for(
            lambda: _journal_has(console, lambda r: r.get("type") == "AssistantTextDelta"),
            timeout_s,
            "Claude's answer to stream",
        )
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment in the phase
    elif phase == "command":
        console.type("/sh sleep 600\r")
        console.wait_for(
            lambda: _journal_has(
                console,
                lambda r: r.get("type") == "ToolCallStarted" and "sleep 600" in str(r.get("input")),
            ),
            timeout_s,
            "the command to start",
        )
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment in the phase


def stall(console: PtyConsole) -> None:
    """The terminal stops reading (a stalled SSH link) while the console keeps drawing: the
    window is resized (a full redraw each time) and keys are typed until its output backs up
    past the pty's buffer and Textual's writer queue (30 writes) — the state in which the stock
    writer deadlocked the main thread when the terminal then went away."""
    console.reading.clear()
    for n in range(12):  # paced as a person and a window manager would: time passing, no wait
        console.resize(160 + (n % 2) * 20, 48 + (n % 2) * 4)
        for _ in range(5):
            console.type("x")
            time.sleep(0.01)
        time.sleep(0.05)
    time.sleep(0.3)  # the console keeps drawing into the unread terminal meanwhile


def run_trial(
    workdir: Path,
    phase: str,
    how: str,
    *,
    stalled: bool,
    seed: int,
    env: dict[str, str] | None = None,
    exit_timeout_s: float = 15.0,
    phase_timeout_s: float = 60.0,
    lab: str = "guest",
) -> Trial:
    """Start ``breakglass-tui --lab`` (``lab``: "guest", the real devvm; "sandbox": with
    ``--sandbox``) in a pty, bring it to ``phase``, then hang up (close the terminal) or send
    SIGTERM, and record how it ended."""
    rng = random.Random(seed)
    trial = Trial(phase, how, stalled, lab=lab)
    console = PtyConsole(workdir, env=env, lab=lab)
    try:
        reach_phase(console, phase, rng, phase_timeout_s)
        if stalled:
            stall(console)
        at = console.hang_up() if how == "hangup" else console.send(signal.SIGTERM)
        trial.exited = console.wait_exit(exit_timeout_s)
        trial.exit_s = time.monotonic() - at
        trial.returncode = console.proc.returncode
        trial.left = console.wait_no_processes(5)
        trial.left_files = console.left_files()
        trial.leases = [str(p) for p in console.drivers()]
        trial.audit = console.audit()
        trial.journal = console.journal()
        trial.screen_tail = console.output[-400:]
    finally:
        console.close()
    return trial
