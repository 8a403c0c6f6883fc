"""Ending the console promptly, whatever it is doing: SIGHUP, SIGTERM, a closed tab, Ctrl+Q.

Measured (issue 12): a SIGHUP handler that calls ``App.exit()`` from the event loop can deadlock.
When the terminal stops reading (a stalled SSH link), Textual's writer thread blocks on the pty,
its bounded queue fills, and the main thread blocks in ``Queue.put``; when the terminal then goes
away the writer thread dies, the queue never drains, the loop never runs again, and neither the
SIGHUP nor a later SIGTERM is ever handled. The process keeps the incident's driver lease and the
lab's processes.

So a stop is requested from a plain ``signal.signal`` handler (it runs in the main thread even
while that thread waits on a lock), or from the terminal driver's threads, never only from the
loop. A request:

- marks the terminal gone on a hang-up, so no write waits on it again (``ui.terminal``);
- starts a watchdog thread with a hard deadline (:data:`HARD_DEADLINE_S`): if the orderly stop has
  not finished by then (a loop that cannot run, a cleanup that cannot finish on a wedged devvm),
  the watchdog runs the last-resort steps the app registered (an audit record saying the kill was
  not confirmed, the lab's processes killed by PID, the lease released) and ends the process;
- asks the app, through the loop, to stop in order (``BreakglassApp.begin_stop``): cancel the
  running step (the remote command is killed), release the lease, close the agent (the audit's
  ``session_end``), the hosts and the lab, within :data:`CLOSE_TIME_S`. The stop runs in the
  app's own context, whoever asked: a signal can land in the middle of the agent worker's step,
  and a stop that inherited that worker as Textual's active worker could not wait for it (it
  closed the agent before the running command's cancel was recorded).

The stopper is created by the CLI before anything heavy is imported, so a signal during start-up
is not lost: the app acts on it as soon as it is mounted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

# The orderly stop's time, and the hard deadline after which the process ends regardless.
# breakglass-serve gives an app QUIT_GRACE_S (8 s) before it kills it: both fit within it.
CLOSE_TIME_S = 4.0
HARD_DEADLINE_S = 6.0

SIGNAL_NAMES = {signal.SIGHUP: "SIGHUP", signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Stopper:
    """One per process: turns a signal, a closed terminal or a closed tab into one orderly stop
    bounded by a hard deadline."""

    def __init__(self, *, hard_deadline_s: float = HARD_DEADLINE_S, hard_exit: bool = True) -> None:
        """``hard_exit``: the watchdog ends the process at the deadline (the console script);
        False for an app run inside another program (the tests), where it only runs the
        last-resort steps."""
        self.hard_deadline_s = hard_deadline_s
        self.hard_exit = hard_exit
        self.requested = threading.Event()
        self.terminal_gone = threading.Event()
        self.finished = threading.Event()
        self.reason = ""
        self.signum: int | None = None
        self.requested_at: float | None = None
        self._lock = threading.Lock()
        self._on_request: Callable[[], None] | None = None
        self._last_resort: list[Callable[[], None]] = []
        self._watchdog: threading.Thread | None = None

    # -- installing --------------------------------------------------------------------------
    def install(self) -> None:
        """Handle SIGHUP and SIGTERM with :meth:`request` (main thread only). Called again after
        anything that may have replaced the handlers (Textual's web driver adds its own)."""
        for signum in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def attach(self, on_request: Callable[[], None]) -> None:
        """``on_request`` starts the orderly stop (thread-safe: it schedules onto the loop). A
        stop requested before this is acted on now."""
        self._on_request = on_request
        if self.requested.is_set():
            on_request()

    def add_last_resort(self, step: Callable[[], None]) -> None:
        """A synchronous step the watchdog runs when the deadline passes (best effort)."""
        self._last_resort.append(step)

    # -- requesting ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        reason = "the terminal hung up" if signum == signal.SIGHUP else f"{name} received"
        self.request(reason, signum=signum, terminal_gone=signum == signal.SIGHUP)

    def request(
        self, reason: str, *, signum: int | None = None, terminal_gone: bool = False
    ) -> None:
        """Ask for a stop (any thread, or a signal handler). Only the first request counts; a
        later hang-up still marks the terminal gone."""
        if terminal_gone:
            self.terminal_gone.set()
        with self._lock:
            if self.requested.is_set():
                return
            self.reason = reason
            self.signum = signum
            self.requested_at = time.monotonic()
            self.requested.set()
            self._watchdog = threading.Thread(
                target=self._watch, name="breakglass-stop-deadline", daemon=True
            )
            self._watchdog.start()
        on_request = self._on_request
        if on_request is not None:
            on_request()

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it; else 0."""
        return 128 + self.signum if self.signum is not None else 0

    @property
    def signal_name(self) -> str | None:
        return SIGNAL_NAMES.get(self.signum) if self.signum is not None else None

    def remaining(self, time_s: float = CLOSE_TIME_S) -> float:
        """Seconds left of ``time_s`` since the stop was requested (the whole of it if none)."""
        if self.requested_at is None:
            return time_s
        return max(0.0, time_s - (time.monotonic() - self.requested_at))

    def done(self) -> None:
        """The orderly stop finished: the process is about to exit by itself."""
        self.finished.set()

    # -- the deadline ----------------------------------------------------------------------------
    def _watch(self) -> None:
        if self.finished.wait(self.hard_deadline_s):
            return
        for step in self._last_resort:
            with contextlib.suppress(BaseException):
                step()
        if self.hard_exit:
            # No flush of stdio: on a stalled terminal it would block this thread too.
            os._exit(self.exit_code or 1)
