"""The real-guest lab's `qm` stand-in, called as the verb calls it (the #!/bin/sh wrapper), on a
real QEMU process; and the lab's refusal, with the next step, when QEMU or the image is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from breakglass_tui.lab.guest import qm as guest_qm
from breakglass_tui.lab.guest.build import GuestImage
from breakglass_tui.lab.guest.drill import overlay, vm_config
from breakglass_tui.lab.guest.lab import GuestUnavailable, check_available, start_real_lab
from breakglass_tui.lab.guest.qm import QMP_TIMEOUT_S
from breakglass_tui.lab.qm_standin import (
    QmpClient,
    pid_alive,
    set_quorum,
    wait_gone,
    write_json_atomic,
)
from tests.support.realparts import free_port


@pytest.fixture
def pve_root(tmp_path: Path, guest_image: GuestImage) -> Iterator[Path]:
    """A lab PVE directory with vm.json for the guest image, its disks on overlays of the
    image's (QEMU not started; a `qm start` boots it)."""
    root = tmp_path / "pve"
    (root / "run").mkdir(parents=True)
    disks = {}
    for disk, base in (("root", guest_image.root_disk), ("data", guest_image.data_disk)):
        overlay(root / f"{disk}.qcow2", base)
        disks[disk] = (root / f"{disk}.qcow2", base)
    write_json_atomic(
        root / "vm.json",
        vm_config(
            image=guest_image,
            accel="tcg",
            memory_mb=128,
            ssh_port=free_port(),
            disks=disks,
            run_dir=root / "run",
            incoming=None,
        ),
    )
    guest_qm.write_qm_wrapper(root)
    try:
        yield root
    finally:
        paths = guest_qm.GuestPaths(root)
        for pid in paths.started_pids():
            if guest_qm.is_lab_qemu(pid, root) and pid_alive(pid):
                os.kill(pid, 9)


def qm(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "bin" / "qm"), *args], capture_output=True, text=True, timeout=60, env={}
    )


def verbose(root: Path) -> dict[str, str]:
    done = qm(root, "status", "102", "--verbose")
    assert done.returncode == 0, done.stderr
    # top-level "key: value" lines (blockstat's are nested, indented with tabs)
    return dict(
        line.split(": ", 1)
        for line in done.stdout.splitlines()
        if line[:1].isalpha() and ": " in line
    )


@pytest.mark.slow
def test_qm_drives_a_real_qemu_like_proxmox(pve_root: Path) -> None:
    root = pve_root
    assert qm(root, "status", "102").stdout == "status: stopped\n"
    not_running = qm(root, "reset", "102")
    assert not_running.returncode == 255 and "VM 102 not running" in not_running.stderr

    assert qm(root, "start", "102").returncode == 0
    pid = int((root / "run" / "102.pid").read_text())
    assert b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    info = verbose(root)
    assert info["status"] == "running" and info["pid"] == str(pid)
    assert info["qmpstatus"] == "running" and 0 <= int(info["uptime"]) < 120
    again = qm(root, "start", "102")
    assert again.returncode == 255 and "already running" in again.stderr

    # Paused (QMP stop): a reset does not run it, as on Proxmox (QEMU 7.2 even reports a reset
    # paused VM as "prelaunch", not "paused"); resume does.
    assert qm(root, "suspend", "102").returncode == 0
    assert verbose(root)["qmpstatus"] == "paused"
    assert qm(root, "reset", "102").returncode == 0
    assert verbose(root)["qmpstatus"] == "prelaunch"
    assert qm(root, "resume", "102").returncode == 0
    assert verbose(root)["qmpstatus"] == "running"

    config = qm(root, "config", "102")
    assert "name: devvm" in config.stdout and "memory: 128" in config.stdout
    unknown = qm(root, "status", "999")
    assert unknown.returncode == 2 and "does not exist" in unknown.stderr

    stop = qm(root, "stop", "102", "--timeout", "5")
    assert stop.returncode == 0, stop.stderr
    assert not pid_alive(pid)  # verified gone, not just asked to go
    assert qm(root, "status", "102").stdout == "status: stopped\n"
    calls = [text for _, text in guest_qm.GuestPaths(root).read_calls()]
    assert calls[0] == "qm status 102" and calls[-1] == "qm status 102"


@pytest.mark.slow
def test_qm_status_says_running_when_qmp_does_not_answer(pve_root: Path) -> None:
    """Like Proxmox (PVE/QemuServer.pm vmstatus): QMP busy (QEMU serves one client, two more
    wait in its listen queue, the next gets EAGAIN) -> qmpstatus is the plain status, running;
    only running-qemu and running-machine are missing."""
    root = pve_root
    assert qm(root, "start", "102").returncode == 0
    healthy = verbose(root)
    assert healthy["qmpstatus"] == "running" and healthy["running-qemu"].startswith("7.")
    paths = guest_qm.GuestPaths(root)
    with QmpClient(paths.qmp_socket, QMP_TIMEOUT_S):  # hold QEMU's only QMP client slot
        queued = [socket.socket(socket.AF_UNIX) for _ in range(3)]
        for sock in queued:
            sock.setblocking(False)
        results = []
        for sock in queued:
            try:
                sock.connect(str(paths.qmp_socket))
                results.append("queued")
            except BlockingIOError:
                results.append("EAGAIN")
        assert results == ["queued", "queued", "EAGAIN"]  # QEMU's backlog of one, for real
        t0 = time.monotonic()
        info = verbose(root)
        assert time.monotonic() - t0 < 15
        for sock in queued:
            sock.close()
    assert info["status"] == "running" and info["qmpstatus"] == "running"
    assert "running-qemu" not in info and "running-machine" not in info
    assert qm(root, "stop", "102").returncode == 0


@pytest.mark.slow
def test_qm_over_real_qemu_plays_locks_ha_quorum_and_a_stop_that_leaves_kvm_alive(
    pve_root: Path,
) -> None:
    root = pve_root
    paths = guest_qm.GuestPaths(root)
    write_json_atomic(
        paths.faults_json,
        {
            "config_lock_wait_s": 0.5,
            "quit_timeout_s": 1.0,
            "sigterm_wait_s": 0.5,
            "status_qmp_timeout_s": 0.5,
        },
    )
    assert qm(root, "start", "102").returncode == 0
    pid = int((root / "run" / "102.pid").read_text())
    # A lock in the VM's config (PVE/AbstractConfig.pm check_lock).
    paths.set_config_lock("backup")
    locked = qm(root, "reset", "102")
    assert (locked.returncode, locked.stderr) == (255, "VM is locked (backup)\n")
    assert "lock: backup" in qm(root, "config", "102").stdout
    paths.set_config_lock(None)
    # HA: stop only asks the HA stack (PVE/API2/Qemu.pm); reset is not redirected.
    paths.set_ha_state("started")
    ha_stop = qm(root, "stop", "102")
    assert (ha_stop.returncode, ha_stop.stdout) == (0, "Requesting HA stop for VM 102\n")
    assert pid_alive(pid) and paths.ha_resource() == {"state": "stopped"}
    assert qm(root, "reset", "102").returncode == 0
    paths.set_ha_state(None)
    # A QEMU that will not die (SIGSTOPped here, and qm's SIGKILL withheld as the kernel would
    # ignore it for a process in D state): the stop's clean-up deletes its pid file anyway.
    os.kill(pid, signal.SIGSTOP)
    faults = json.loads(paths.faults_json.read_text())
    write_json_atomic(paths.faults_json, {**faults, "kvm_survives_kill": True})
    stop = qm(root, "stop", "102", "--timeout", "1")
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout == (
        "VM quit/powerdown failed - terminating now with SIGTERM\n"
        "VM still running - terminating now with SIGKILL\n"
    )
    assert pid_alive(pid) and not (root / "run" / "102.pid").exists()
    assert qm(root, "status", "102").stdout == "status: stopped\n"
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, 10)
    # No quorum: start fails at once (pve-cluster PVE/Cluster.pm check_cfs_quorum).
    set_quorum(root, False)
    no_quorum = qm(root, "start", "102")
    assert (no_quorum.returncode, no_quorum.stderr) == (255, "cluster not ready - no quorum?\n")
    set_quorum(root, True)
    write_json_atomic(paths.faults_json, {})
    assert qm(root, "start", "102").returncode == 0
    assert qm(root, "stop", "102").returncode == 0


def test_missing_qemu_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no qemu-system-x86_64
    with pytest.raises(GuestUnavailable, match=r"apt-get install qemu-system-x86"):
        check_available()


async def test_unbuildable_image_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU is there but apt-get is not (an empty cache must be filled): a clear refusal from
    start_real_lab, not a traceback, and nothing left running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for qemu in ("qemu-system-x86_64", "qemu-img"):
        (bin_dir / qemu).symlink_to(shutil.which(qemu))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("BREAKGLASS_GUEST_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(GuestUnavailable) as caught:
        await start_real_lab("healthy", workdir=tmp_path / "lab")
    message = str(caught.value)
    assert "apt-get" in message and "python -m breakglass_tui.lab.guest.build" in message
    assert not (tmp_path / "lab" / "run" / "102.pid").exists()
    assert "Traceback" not in message
