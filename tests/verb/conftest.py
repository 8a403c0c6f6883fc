"""Fixtures for breakglass-verb: run the verb as the real subprocess sshd would run, against a
`qm` that records its calls or against the simulated Proxmox (breakglass_tui.lab.sim_pve)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The verb under test; BREAKGLASS_VERB_UNDER_TEST points these tests at another copy (e.g. an
# older verb from git history, to see which tests it fails).
VERB_PATH = Path(
    os.environ.get("BREAKGLASS_VERB_UNDER_TEST")
    or Path(__file__).resolve().parents[2] / "breakglass_tui" / "verb" / "breakglass_verb.py"
)


@dataclass
class VerbRun:
    """One finished breakglass-verb process."""

    exit_code: int
    doc: dict[str, Any]
    stderr: str
    elapsed_s: float


def verb_env(config: Path, command: str | None, **extra: str) -> dict[str, str]:
    """The environment sshd gives a forced command: SSH_ORIGINAL_COMMAND (or unset)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BREAKGLASS_VERB_CONFIG": str(config)}
    env["SSH_CONNECTION"] = "127.0.0.1 50000 127.0.0.1 22"
    if command is not None:
        env["SSH_ORIGINAL_COMMAND"] = command
    env.update(extra)
    return env


def run_verb(config: Path, command: str | None, timeout: float = 60.0, **extra: str) -> VerbRun:
    """Run breakglass_verb.py as a real subprocess and parse its one JSON document."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(VERB_PATH)],
        env=verb_env(config, command, **extra),
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout.decode()
    assert out.count("\n") == 1, f"expected one JSON line, got {out!r} / {proc.stderr!r}"
    return VerbRun(proc.returncode, json.loads(out), proc.stderr.decode(), elapsed)


@dataclass
class RecordingHost:
    """A host whose `qm` only records that it was called (for refusal tests)."""

    root: Path
    config: Path
    calls_file: Path
    state_dir: Path

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture
def recording_host(tmp_path: Path) -> RecordingHost:
    root = tmp_path / "host"
    (root / "run").mkdir(parents=True)
    calls = root / "qm-calls.log"
    qm = root / "qm"
    qm.write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho "status: stopped"\n')
    qm.chmod(0o755)
    config = write_config(
        root / "verb.toml",
        f'vmid = 102\nqm = "{qm}"\nqemu_run_dir = "{root / "run"}"\n'
        f'state_dir = "{root / "state"}"\n[log]\nsyslog_socket = "{root / "no-syslog"}"\n',
    )
    return RecordingHost(root, config, calls, root / "state")


# Proxmox's own timings (a 10 s config-lock wait, 60 s for QMP quit, 10 s after SIGTERM, 20 s
# for the VM's scope, ...) shrunk, so that no test waits minutes; their order is kept.
PROXMOX_TIMINGS: dict[str, float] = {
    "qmp_timeout_s": 1.0,
    "status_qmp_timeout_s": 0.8,
    "quit_timeout_s": 2.0,
    "stop_wait_s": 3.0,
    "sigterm_wait_s": 1.0,
    "config_lock_wait_s": 1.0,
    "ha_delay_s": 1.0,
    "scope_wait_s": 1.0,
}
# The verb's deadlines for tests: the qm task ceiling well above the shrunk Proxmox timings.
FAST_DEADLINES: dict[str, float] = {
    "forensics_s": 4,
    "probe_s": 1.5,
    "qm_action_s": 15,
    "qm_stop_timeout_s": 1,
    "verify_s": 5,
    "ha_verify_s": 8,
}


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Any]:
    """The simulated Proxmox with VM 102 running; its kvm processes are killed after."""
    from breakglass_tui.lab.sim_pve import SimPve

    pve = SimPve.create(tmp_path / "pve", 102)
    pve.set_faults(**PROXMOX_TIMINGS)
    try:
        pve.start_vm()
        yield pve
    finally:
        pve.cleanup()


def sim_with(tmp_path: Path, **overrides: Any) -> Any:
    """A SimPve with verb config overrides and Proxmox's timings shrunk (caller cleans up)."""
    from breakglass_tui.lab.sim_pve import SimPve

    pve = SimPve.create(tmp_path / "pve", 102, **overrides)
    pve.set_faults(**PROXMOX_TIMINGS)
    return pve
