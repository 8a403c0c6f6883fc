"""Checks before a screen opens: one clear sentence for a condition the console cannot work in.

A console that cannot keep its record (an unwritable or full state directory) or cannot draw (no
terminal, ``TERM=dumb``, a non-UTF-8 terminal) would otherwise fail halfway, behind or inside the
screen, with a traceback. Each check returns the sentence to print (cause and fix) or None.
Standard library only: these run before anything heavy is imported.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

# A state dir with less free space than this is full in practice: the audit log, the transcript
# and the incident journal must have room for the incident that is about to start.
MIN_FREE_BYTES = 1 << 20
MIN_COLUMNS, MIN_ROWS = 40, 12
_PROBE = ".breakglass-write-check"


def state_dir_problem(state_dir: Path, *, setting: str = "BREAKGLASS_STATE_DIR") -> str | None:
    """Why ``state_dir`` cannot hold the audit log and the incident, or None."""
    where = str(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = state_dir / f"{_PROBE}.{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
        stats = os.statvfs(state_dir)
    except OSError as exc:
        return _os_problem(exc, where, setting)
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        return (
            f"the disk holding the state directory {where} is full ({free // 1024} KiB free):"
            f" the audit log and the incident cannot be written. Free space there, or set"
            f" {setting} to a directory on another disk."
        )
    return None


def _os_problem(exc: OSError, where: str, setting: str) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the disk holding the state directory {where} is full (no space left): the audit"
            f" log and the incident cannot be written. Free space there, or set {setting} to a"
            " directory on another disk."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"the state directory {where} is not writable (permission denied): give this user"
            f" write access to it, or set {setting} to a writable directory."
        )
    if exc.errno == errno.EROFS:
        return (
            f"the state directory {where} is on a read-only file system: set {setting} to a"
            " directory on a writable disk."
        )
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return (
            f"the state directory {where} is not a directory (a file is in the way): set"
            f" {setting} to a directory."
        )
    return (
        f"the state directory {where} cannot be written ({exc.strerror or exc}): set {setting}"
        " to a writable directory."
    )


def terminal_problem() -> str | None:
    """Why this process cannot draw the console in its terminal, or None. Skipped under
    breakglass-serve (``TEXTUAL_DRIVER`` names the web driver: the browser is the terminal)."""
    if os.environ.get("TEXTUAL_DRIVER"):
        return None
    if not (_isatty(sys.stdin) and _isatty(sys.stderr)):
        return (
            "this is not a terminal (input or output is redirected): run breakglass-tui in a"
            " terminal (over SSH: ssh -t), or use breakglass-serve to open it in a browser."
        )
    term = os.environ.get("TERM", "")
    if term in ("", "dumb", "unknown"):
        shown = f"TERM={term}" if term else "TERM is not set"
        return (
            f"{shown}: this terminal cannot draw the console (no cursor movement or colour)."
            " Set TERM=xterm-256color, or run it in a full terminal."
        )
    encoding = (getattr(sys.stderr, "encoding", "") or "").lower().replace("-", "")
    if encoding not in ("utf8", "utf8sig"):
        return (
            f"the terminal's encoding is {sys.stderr.encoding}, not UTF-8: the console's text"
            " cannot be shown. Set LANG=C.UTF-8 (or another UTF-8 locale) and start it again."
        )
    size = shutil.get_terminal_size((0, 0))
    if 0 < size.columns < MIN_COLUMNS or 0 < size.lines < MIN_ROWS:
        return (
            f"the terminal is {size.columns}×{size.lines}: the console needs at least"
            f" {MIN_COLUMNS}×{MIN_ROWS}. Enlarge the window and start it again."
        )
    return None


def _isatty(stream: object) -> bool:
    try:
        return bool(stream is not None and stream.isatty())  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return False
