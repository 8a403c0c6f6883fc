"""Which devvm a ``--lab`` drill runs on: the real one wherever QEMU is installed, else the
sandbox, else none; and the one sentence the console shows about it.

Quick and light (no asyncssh, nothing started): the command lines ask before their screen opens.
"""

from __future__ import annotations

from dataclasses import dataclass

from breakglass_tui.lab.catalog import SANDBOX_SCENARIOS
from breakglass_tui.lab.guest.plan import guest_problem
from breakglass_tui.lab.sandbox import sandbox_problem

GET_QEMU = "run 'bash scripts/lab.sh' as root, which installs QEMU"


@dataclass(frozen=True)
class LabChoice:
    """Which devvm a ``--lab`` drill runs on, and the one sentence to show about it (None when
    it is the real devvm as asked)."""

    devvm: str | None  # "guest", "sandbox", or None: none can run here
    note: str | None = None
    scenario: str = "healthy"


def choose_devvm(scenario: str = "healthy", devvm: str = "auto") -> LabChoice:
    """The devvm for a drill of `scenario`: "guest" (the real devvm) wherever QEMU is installed,
    else "sandbox" (saying how to get QEMU), else None (saying why: the lab then runs without a
    devvm, its PVE host and the console working). `devvm` forces one.
    Cheap: it looks for programs and the cached image; it builds and starts nothing."""
    if devvm not in ("auto", "guest", "sandbox"):
        raise ValueError(f"unknown devvm {devvm!r}: choose auto, guest or sandbox")
    problem = None  # why the real devvm cannot run (None: it can, or the sandbox was asked for)
    if devvm in ("auto", "guest"):
        problem = guest_problem()
        if problem is None:
            return LabChoice("guest", None, scenario)
        if devvm == "guest":
            return LabChoice(None, f"The real devvm cannot run here: {problem}.", scenario)
    sandbox = sandbox_problem()
    if sandbox is not None:
        return LabChoice(
            None,
            f"The lab has no devvm here: {problem or 'the real devvm was not asked for'} and"
            f" {sandbox}; on a Debian machine, {GET_QEMU}.",
            scenario,
        )
    if scenario not in SANDBOX_SCENARIOS:
        why = f"{problem}; for the real devvm, which stages every scenario, {GET_QEMU}"
        if problem is None:
            why = "the real devvm (--lab without --sandbox) stages every scenario"
        note = f"The sandboxed shell cannot stage {scenario}, so this drill runs on a healthy one:"
        note += f" {why}."
        return LabChoice("sandbox", note, "healthy")
    if problem is None:
        return LabChoice("sandbox", None, scenario)
    note = f"{problem}, so this drill runs on a sandboxed shell on this machine;"
    note += f" for the real devvm, {GET_QEMU}."
    return LabChoice("sandbox", note[0].upper() + note[1:], scenario)
