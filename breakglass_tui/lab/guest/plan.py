"""Before a drill on the real devvm: can it run here, and is it ready to start in seconds?

Standard library only, and quick: the command lines ask before their screen opens. A drill
starts from a saved state (:class:`SavedState`: the guest's RAM and devices, and overlays of its
disks); the first drill on a machine builds the image and saves the states it needs (a minute or
so, saying what it does). :func:`prepare` does that up front, so the console then starts in
seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from breakglass_tui.lab.guest import qm as guest_qm
from breakglass_tui.lab.guest.build import (
    SHM,
    GuestImage,
    default_cache,
    find_image,
    staging_prefix,
)

QEMU = "qemu-system-x86_64"
BUILD_TOOLS = ("apt-get", "dpkg-deb", "mke2fs", "debugfs")
MEMORY_MB = 256
# Kernel messages on the VGA console too (tty0), so the forensics screendump shows OOM reports
# and panics; the serial console (last: /dev/console) is console.log. init_on_free=1: freed pages
# are zeroed, so the saved state (which QEMU writes without zero pages) stays small.
APPEND = "console=tty0 console=ttyS0 root=/dev/vda ro quiet init_on_free=1"
# The scenarios that break the guest from the inside: each has a saved state of its own, taken
# just after the failure was put in place, so a drill starts already failing (the others start
# from the booted guest's state and are put in place by the host: a paused or panicked guest,
# failing storage).
SAVED_SCENARIOS = (
    "disk-full",
    "oom",
    "stuck-service",
    "inode-exhaustion",
    "pid-exhaustion",
    "deleted-open",
)


def guest_problem(cache: Path | None = None) -> str | None:
    """Why the real devvm cannot run here, as a phrase ("QEMU is not installed"), or None."""
    if shutil.which(QEMU) is None or shutil.which("qemu-img") is None:
        return "QEMU is not installed"
    if find_image(cache) is not None:
        return None
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the devvm image is not built and {', '.join(missing)} cannot build it here"
    if os.geteuid() != 0:
        return "the devvm image is not built yet, and building it needs root"
    return None


def choose_accel() -> str:
    """ "kvm" where KVM runs guests here, else "tcg"; BREAKGLASS_GUEST_ACCEL=tcg|kvm decides."""
    asked = os.environ.get("BREAKGLASS_GUEST_ACCEL", "").strip().lower()
    if asked in ("tcg", "kvm"):
        return asked
    return "kvm" if guest_qm.kvm_usable() else "tcg"


@dataclass(frozen=True)
class SavedState:
    """A devvm's saved state (RAM and devices) and its disks (overlays over the image), from
    which drills start. Everything a restore depends on is keyed into its directory's name."""

    directory: Path

    @property
    def root_disk(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def data_disk(self) -> Path:
        return self.directory / "data.qcow2"

    @property
    def vmstate(self) -> Path:
        return self.directory / "vmstate"

    def complete(self) -> bool:
        return (self.directory / "done").exists()


@functools.cache
def _qemu_version(qemu: str) -> str:
    done = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def saved_state_key(image: GuestImage, accel: str, memory_mb: int, qemu: str) -> str:
    """What a booted state depends on: the image, the accelerator, the memory, QEMU's version
    and the machine QEMU is told to make (a restore needs the same devices)."""
    h = hashlib.sha256()
    for part in (
        image.image_id,
        accel,
        str(memory_mb),
        APPEND,
        _qemu_version(qemu),
        inspect.getsource(guest_qm.qemu_argv),
        inspect.getsource(guest_qm._disk),
    ):
        h.update(part.encode() + b"\0")
    return f"{image.image_id}-{accel}-{h.hexdigest()[:12]}"


def saved_states(
    image: GuestImage,
    *,
    accel: str,
    memory_mb: int = MEMORY_MB,
    scenario: str = "healthy",
    cache: Path | None = None,
) -> list[SavedState]:
    """The saved states a drill of `scenario` needs, in the order they are made: the booted
    guest's, then (SAVED_SCENARIOS) the scenario's own, on top of it."""
    key = saved_state_key(image, accel, memory_mb, shutil.which(QEMU) or QEMU)
    saved = (cache or default_cache()) / "saved"
    states = [SavedState(saved / key)]
    if scenario in SAVED_SCENARIOS:
        states.append(SavedState(saved / f"{key}.{scenario}"))
    return states


def ready(scenario: str = "healthy", cache: Path | None = None) -> bool:
    """Whether a drill of `scenario` can start in seconds: the image and its saved states are
    there."""
    image = find_image(cache)
    if image is None:
        return False
    return all(s.complete() for s in saved_states(image, accel=choose_accel(), scenario=scenario))


def prepare(
    scenario: str = "healthy",
    *,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Build the image and save the states `scenario` starts from, if they are not there yet
    (progress gets a line per step). GuestUnavailable when that fails."""
    import asyncio
    import warnings

    with warnings.catch_warnings():  # asyncssh's import warns about DSA keys, which we never use
        warnings.simplefilter("ignore")
        from breakglass_tui.lab.guest.lab import check_available, ensure_saved_state

    image = check_available(cache, progress)
    asyncio.run(
        ensure_saved_state(
            image, accel=choose_accel(), cache=cache, progress=progress, scenario=scenario
        )
    )


class PreparationFailed(RuntimeError):
    """The first run's preparation failed; the message says why (from the preparation itself)."""


class PreparationStopped(RuntimeError):
    """The console was told to stop while the first run's preparation ran: it was ended."""


class Preparation:
    """:func:`prepare` in a child process of its own, so that a console told to stop (a hang-up,
    SIGTERM) can end it at once and leave nothing behind: the child runs in a session of its
    own with a private TMPDIR, so :meth:`kill` ends its process group (apt, dpkg-deb, qemu-img),
    any QEMU it started (a daemon in a session of its own, found by its command line, which
    names that TMPDIR), and removes its temporary directories (TMPDIR, the image build's
    staging directory in /dev/shm) and the half-made states in the cache nobody is making.

    Its progress lines come back through a pipe, never the terminal (a gone terminal must not
    stop or fail the preparation; the parent relays them)."""

    def __init__(self, scenario: str = "healthy", *, cache: Path | None = None) -> None:
        self.scenario = scenario
        self.cache = cache or default_cache()
        self.tmp = Path(tempfile.mkdtemp(prefix="bg-prep-"))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._killed = threading.Lock()
        self._done = False
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1")
        env["BREAKGLASS_GUEST_CACHE"] = str(self.cache)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "breakglass_tui.lab.guest.plan", scenario],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # no SIGHUP from our terminal; its group ends as one
        )
        self._reader = threading.Thread(target=self._read, name="lab-prepare-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(Exception):
            for raw in self.proc.stderr:
                self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def run(self, progress: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        """Wait for the preparation, passing each line of progress on (control characters
        removed); PreparationStopped as soon as `stopped()` is true (the child ended first),
        PreparationFailed when it failed."""
        said: list[str] = []
        try:
            while True:
                if stopped():
                    raise PreparationStopped("the console was told to stop")
                try:
                    line = self._lines.get(timeout=0.1)
                except queue.Empty:
                    continue
                if line is None:
                    break
                said.append(line)
                if line.startswith("lab: "):
                    progress(_printable(line.removeprefix("lab: ")))
            code = self.proc.wait()
            if stopped():
                raise PreparationStopped("the console was told to stop")
            if code != 0:
                raise PreparationFailed(_failure(said, code))
        finally:
            self.kill()

    def kill(self) -> None:
        """End the child and everything it started, remove what it left (any thread, at most
        a few seconds; again: nothing more to do)."""
        with self._killed:
            if self._done:
                return
            self._done = True
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            guest_qm.kill_qemus_under(self.tmp, wait_s=3.0)
            for staging in Path(SHM).glob(staging_prefix(self.proc.pid) + "*"):
                shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            remove_abandoned_partials(self.cache)


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())


def _failure(said: list[str], code: int) -> str:
    """What the child said last about why it failed: its last "lab:" message with the lines
    that follow it (a console's tail), else the last line (a traceback's)."""
    lines = [line for line in said if line.strip()]
    if not lines:
        return f"the preparation exited with code {code}"
    starts = [i for i, line in enumerate(lines) if line.startswith("lab: ")]
    tail = lines[starts[-1] :] if starts else []
    if tail and not any(line.startswith("Traceback") for line in tail):
        return "\n".join(_printable(line) for line in tail).removeprefix("lab: ")[:1500]
    return _printable(lines[-1])[:1500]


def remove_abandoned_partials(cache: Path) -> None:
    """Remove the half-made images and saved states (``*.partial``) of the cache that nobody is
    making: their lock is free (a killed preparation's; a running one holds it)."""
    for folder in (cache / "images", cache / "saved"):
        for partial in folder.glob("*.partial"):
            lock_path = partial.with_name(partial.name.removesuffix(".partial") + ".lock")
            try:
                lock = lock_path.open("a")
            except OSError:
                continue
            with lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # being made now
                shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m breakglass_tui.lab.guest.plan [SCENARIO…]``: build the image and save the
    states the drills start from (every scenario's by default), saying what it does."""
    import sys

    from breakglass_tui.lab.catalog import GUEST_SCENARIOS
    from breakglass_tui.lab.guest.lab import GuestUnavailable

    scenarios = argv if argv is not None else sys.argv[1:]
    try:
        for scenario in scenarios or GUEST_SCENARIOS:
            prepare(scenario, progress=lambda line: print(f"lab: {line}", file=sys.stderr))
    except GuestUnavailable as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
