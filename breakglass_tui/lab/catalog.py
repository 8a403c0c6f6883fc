"""The lab's drills: the names a ``--scenario`` takes and what each one breaks.

Nothing here imports anything: the command lines read it before their screen opens. What each
scenario does is real and lives elsewhere: on the real devvm (:mod:`breakglass_tui.lab.guest`,
every scenario) or on the sandbox devvm (:mod:`breakglass_tui.lab.sandbox`, the few a sandbox on
this machine can make real).
"""

from __future__ import annotations

SCENARIOS: dict[str, str] = {
    "healthy": "nothing is wrong",
    "disk-full": "a runaway log writer (an enabled unit) has filled /data",
    "oom": "a leaking unit is OOM-killed and restarted, over and over",
    "stuck-service": "the web app waits forever on a lock its stale child holds",
    "wedged": "the guest stops answering: vCPUs paused (or a kernel panic)",
    "io-stall": "the host's storage fails a write: QEMU pauses the VM with an I/O error",
    "inode-exhaustion": "/data has space left but no inodes: a session cache ate them all",
    "read-only-root": "I/O errors aborted the root file system's journal: writes are refused",
    "pid-exhaustion": "a fork bomb fills its unit's TasksMax; nothing in it can fork",
    "deleted-open": "a unit writes to a file it deleted: df says full, du finds nothing",
}
GUEST_SCENARIOS = tuple(SCENARIOS)
# What the sandbox devvm (a real shell and real tools on this machine, no kernel of its own) can
# make real: a size-capped tmpfs a real writer fills, a real deleted-but-open file, and the
# network's view of a guest that does not answer or is paused.
SANDBOX_SCENARIOS = ("healthy", "disk-full", "deleted-open", "wedged", "io-stall")


def describe() -> str:
    """One line per scenario, for --help."""
    return "; ".join(f"{name}: {what}" for name, what in SCENARIOS.items())
