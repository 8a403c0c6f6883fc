"""Textual drivers that never wait on a terminal that is gone.

:class:`TerminalDriver` (a terminal) replaces the stock writer thread, whose bounded queue makes the
main thread wait forever once the terminal stops reading and then goes away (``ui.stopping`` has the
story). Its writes wait in short slices and give up as soon as the terminal is known gone or a stop
is under way; a failed write (EIO after a hang-up) marks the terminal gone and asks for a stop; the
input thread treats EOF or EIO on the terminal as the hang-up it is, instead of spinning or ending
the app with a traceback.

:class:`WebDriver` (a browser tab under breakglass-serve) turns the server's "quit" (the tab closed,
the websocket dropped) and the loss of its pipes into the same orderly stop.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import signal
import threading
from codecs import getincrementaldecoder
from typing import TYPE_CHECKING, Any

from textual._xterm_parser import XTermParser
from textual.drivers.linux_driver import LinuxDriver
from textual.drivers.web_driver import WebDriver as _TextualWebDriver

if TYPE_CHECKING:
    from breakglass_tui.ui.stopping import Stopper

MAX_QUEUED_WRITES = 30  # as Textual's own writer: backpressure on a slow terminal
WRITE_SLICE_S = 0.1  # a waiting write looks up at least this often
STOPPING_WRITE_WAIT_S = 0.3  # once a stop is under way, a write waits at most this long
CLOSE_JOIN_S = 0.5


def _stopper_of(app: Any) -> Stopper | None:
    return getattr(app, "stopper", None)


class _Writer(threading.Thread):
    """Writes to the terminal in the background; never lets the main thread wait on a dead one.

    It writes to its own copy of the terminal's file descriptor with ``os.write``: a write stuck
    on a stalled terminal then holds no lock that other code writing to ``sys.stderr`` needs."""

    def __init__(self, fd: int, gone: threading.Event, on_gone: Any) -> None:
        super().__init__(daemon=True, name="breakglass-terminal-writer")
        self._queue: queue.Queue[str | None] = queue.Queue(MAX_QUEUED_WRITES)
        self._fd = os.dup(fd)
        self._gone = gone
        self._on_gone = on_gone

    def write(self, text: str, *, stopping: Any) -> None:
        """Queue ``text``; wait while the terminal is slow, but never once it is gone, and at
        most STOPPING_WRITE_WAIT_S once ``stopping()`` says a stop is under way."""
        waited = 0.0
        while not self._gone.is_set():
            try:
                self._queue.put(text, timeout=WRITE_SLICE_S)
                return
            except queue.Full:
                waited += WRITE_SLICE_S
                if not self.is_alive():
                    self._on_gone("the terminal stopped taking output")
                elif stopping() and waited >= STOPPING_WRITE_WAIT_S:
                    # Stopping, and the terminal is not reading: it is as good as gone; nothing
                    # more is written to it rather than hold up the stop.
                    self._on_gone("the terminal stopped reading")

    def run(self) -> None:
        fd = self._fd
        try:
            while True:
                text = self._queue.get()
                if text is None or self._gone.is_set():
                    return
                data = memoryview(text.encode("utf-8", "replace"))
                while data:
                    data = data[os.write(fd, data) :]
        except OSError:  # EIO after a hang-up
            self._on_gone("the terminal hung up")
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self.join(CLOSE_JOIN_S)  # a write stuck on a stalled terminal is left behind (daemon)


class TerminalDriver(LinuxDriver):
    """Textual's Linux driver with writes and reads that survive the terminal going away."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._writer: _Writer | None = None
        stopper = _stopper_of(app)
        self.gone: threading.Event = stopper.terminal_gone if stopper else threading.Event()
        self._silenced = False

    def _terminal_gone(self, reason: str = "the terminal went away") -> None:
        self.gone.set()
        self._silence()
        stopper = _stopper_of(self._app)
        if stopper is not None:
            # A hang-up, whether the kernel's SIGHUP or our own read got there first.
            stopper.request(reason, signum=signal.SIGHUP, terminal_gone=True)

    def _silence(self) -> None:
        """Point this process's stdout and stderr at /dev/null: whatever writes to the terminal
        from now on (an error report, a log line, the interpreter's exit) neither fails nor
        waits on it."""
        if self._silenced:
            return
        self._silenced = True
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    os.dup2(null, fd)
            os.close(null)

    def _stopping(self) -> bool:
        stopper = _stopper_of(self._app)
        return bool(stopper and stopper.requested.is_set())

    def start_application_mode(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            self._writer = _Writer(self._file.fileno(), self.gone, self._terminal_gone)
            self._writer.start()
        super().start_application_mode()

    def write(self, data: str) -> None:
        writer = self._writer
        if self.gone.is_set():
            self._silence()
            return
        if writer is not None:
            writer.write(data, stopping=self._stopping)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        # Textual's own writer thread idled (every write came here); its last act is a flush of
        # stderr, which can wait on a stalled terminal: stop it without waiting on it.
        closer = threading.Thread(target=super().close, name="textual-writer-stop", daemon=True)
        closer.start()
        closer.join(CLOSE_JOIN_S)

    def run_input_thread(self) -> None:
        """Textual's input loop, except that EOF or an error on the terminal is a hang-up (the
        stock loop spins on EOF and turns EIO into a traceback)."""
        selector = selectors.SelectSelector()
        selector.register(self.fileno, selectors.EVENT_READ)
        parser = XTermParser(self._debug)
        decode = getincrementaldecoder("utf-8")(errors="replace").decode
        try:
            while not self.exit_event.is_set():
                for _key, mask in selector.select(0.1):
                    if mask & selectors.EVENT_READ:
                        try:
                            data = os.read(self.fileno, 4096)
                        except OSError:
                            data = b""
                        if not data:
                            self._terminal_gone("the terminal hung up")
                            return
                        for event in parser.feed(decode(data)):
                            self.process_message(event)
                for event in parser.tick():
                    self.process_message(event)
        finally:
            selector.close()

    def _run_input_thread(self) -> None:
        try:
            self.run_input_thread()
        except Exception:
            # Not a traceback on a terminal that may be gone: the console stops in order.
            self._terminal_gone("the terminal's input failed")


class WebDriver(_TextualWebDriver):
    """Textual's web driver (breakglass-serve's app processes) with the tab's end as a stop."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._stopping_input = False

    def _gone(self, reason: str) -> None:
        stopper = _stopper_of(self._app)
        if stopper is not None:
            stopper.request(reason, signum=signal.SIGHUP, terminal_gone=True)

    def write(self, data: str) -> None:
        try:
            super().write(data)
        except OSError:  # the server closed our pipe
            self._gone("breakglass-serve closed the tab's pipe")

    def write_meta(self, data: dict[str, object]) -> None:
        try:
            super().write_meta(data)
        except OSError:
            self._gone("breakglass-serve closed the tab's pipe")

    def write_binary_encoded(self, data: tuple[str | bytes, ...]) -> None:
        try:
            super().write_binary_encoded(data)
        except OSError:
            self._gone("breakglass-serve closed the tab's pipe")

    def start_application_mode(self) -> None:
        super().start_application_mode()
        stopper = _stopper_of(self._app)
        if stopper is not None:
            stopper.install()  # Textual's web driver just replaced the SIGTERM handler

    def stop_application_mode(self) -> None:
        self._stopping_input = True
        super().stop_application_mode()

    def run_input_thread(self) -> None:
        super().run_input_thread()
        if not self._stopping_input:
            # The server's end of our stdin closed: nobody will ever see this tab again.
            self._gone("the connection to breakglass-serve closed")

    def on_meta(self, packet_type: str, payload: dict[str, object]) -> None:
        if packet_type == "quit":
            # The tab closed or its websocket dropped: the same orderly, bounded stop as SIGTERM.
            stopper = _stopper_of(self._app)
            if stopper is not None:
                stopper.request("the browser tab closed")
                return
        super().on_meta(packet_type, payload)
