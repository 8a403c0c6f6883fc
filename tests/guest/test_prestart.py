"""The devvm's restore started before the console's screen (lab.guest.drill.Prestart) never
outlives the console: abandoned mid-start, closed after the lab adopted it, or killed at the
stop's hard deadline, its QEMU is gone and its directory removed. Real QEMU, from the session's
saved state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from breakglass_tui.lab.guest.build import GuestImage
from breakglass_tui.lab.guest.drill import Prestart, prestart
from breakglass_tui.lab.guest.lab import start_real_lab
from breakglass_tui.lab.guest.qm import qemus_under

pytestmark = pytest.mark.slow


def _prestart(guest_image: GuestImage) -> Prestart:
    started = prestart("healthy")
    if started is None:
        pytest.fail("no saved state to restore: run 'bash scripts/setup.sh test' (it saves them)")
    return started


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _gone(root: Path) -> None:
    assert qemus_under(root) == []
    assert not root.exists()


def test_abandoned_while_qemu_starts_it_is_killed_and_removed(guest_image: GuestImage) -> None:
    started = _prestart(guest_image)
    root = started.root
    _wait(lambda: qemus_under(root), 60, "the restore's QEMU")  # no pid file needed to find it
    started.abandon()
    _gone(root)
    with pytest.raises(RuntimeError, match="abandoned"):
        started.adopt()


def test_abandoned_at_once_nothing_starts_later(guest_image: GuestImage) -> None:
    started = _prestart(guest_image)
    started.abandon()
    # The starting thread, still laying out or starting QEMU, removes what it started itself.
    _wait(started.future.done, 60, "the starting thread to end")
    _gone(started.root)


async def test_closed_after_the_lab_adopted_it_nothing_stays(guest_image: GuestImage) -> None:
    """The console ended without the lab's own close (a stop that ran out of time): the CLI's
    close of the prestart still kills the adopted QEMU."""
    started = _prestart(guest_image)
    lab = await start_real_lab("healthy", prestarted=started)
    try:
        assert started.adopted and qemus_under(started.root)
        assert lab.sim.kvm_pid() in qemus_under(started.root)
        started.close()
        _gone(started.root)
    finally:
        await lab.close()


def test_the_hard_deadlines_kill_needs_no_pid_file(guest_image: GuestImage) -> None:
    started = _prestart(guest_image)
    _wait(lambda: qemus_under(started.root), 60, "the restore's QEMU")
    started.kill_now()
    assert qemus_under(started.root) == []
    started.close()
    _gone(started.root)
