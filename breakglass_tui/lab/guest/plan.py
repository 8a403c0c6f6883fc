"""Before a drill on the real devvm: can it run here, and is it ready to start in seconds?

Standard library only, and quick: the command lines ask before their screen opens. A drill
starts from a saved state (:class:`SavedState`: the guest's RAM and devices, and overlays of its
disks); the first drill on a machine builds the image and saves the states it needs (a minute or
so, saying what it does). :func:`prepare` does that up front, so the console then starts in
seconds.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from breakglass_tui.lab.guest import qm as guest_qm
from breakglass_tui.lab.guest.build import GuestImage, default_cache, find_image

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
