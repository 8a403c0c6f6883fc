"""Fixtures for the real devvm's tests: the image (built once, failing loudly with the next step
when QEMU or apt is missing: nothing here is skipped), a drill per scenario with its HostSession,
and the breakglass agent's fixtures (fake Messages API, settings, make_agent)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from breakglass_tui.hosts.session import HostSession
from breakglass_tui.lab.guest.build import GuestImage
from breakglass_tui.lab.guest.lab import GuestUnavailable, RealLab, check_available, start_real_lab
from breakglass_tui.lab.qm_standin import pid_alive
from tests.core.conftest import fake_api, make_agent, settings  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The devvm image (a cache hit after the first build: scripts/setup.sh test builds it and
    saves the drills' states)."""
    try:
        return check_available()
    except GuestUnavailable as exc:
        pytest.fail(f"the real devvm's tests cannot run: {exc}")


@pytest.fixture
async def real_lab(request, guest_image: GuestImage) -> AsyncIterator[tuple[RealLab, HostSession]]:
    """A drill on the real devvm in the scenario given by indirect parametrization, and a
    HostSession on it (the one object the breakglass agent and the UI hold)."""
    lab = await start_real_lab(request.param)
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        yield lab, hosts
    finally:
        await hosts.close()
        pids = lab.sim.paths.started_pids()
        await lab.close()
        # The lab kills the QEMU processes it started, and only those.
        assert not [pid for pid in pids if pid_alive(pid)]
