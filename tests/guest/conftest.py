"""Fixtures for the real-guest lab's tests: the image (built once, failing loudly with the next
step when QEMU or apt is missing: nothing here is skipped), a lab per scenario with its
HostSession, and the breakglass agent's fixtures (fake Messages API, settings, make_agent)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from breakglass_tui.hosts.session import HostSession
from breakglass_tui.lab.guest.build import GuestImage
from breakglass_tui.lab.guest.lab import GuestUnavailable, RealLab, check_available, start_real_lab
from tests.core.conftest import fake_api, make_agent, settings  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The devvm image (a cache hit after the first build). CI installs qemu-system-x86 with
    scripts/setup.sh test; the first build needs apt-get download."""
    try:
        return check_available()
    except GuestUnavailable as exc:
        pytest.fail(f"the real-guest tests cannot run: {exc}")


@pytest.fixture
async def real_lab(request, guest_image: GuestImage) -> AsyncIterator[tuple[RealLab, HostSession]]:
    """A real devvm booted in the scenario given by indirect parametrization, and a HostSession
    on it (the one object the breakglass agent and the UI hold)."""
    lab = await start_real_lab(request.param)
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        yield lab, hosts
    finally:
        await hosts.close()
        pids = lab.sim.paths.started_pids()
        await lab.close()
        # The lab kills the QEMU processes it started, and only those.
        from breakglass_tui.lab.qm_standin import pid_alive

        assert not [pid for pid in pids if pid_alive(pid)]
