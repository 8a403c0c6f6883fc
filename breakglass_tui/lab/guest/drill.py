"""A drill's PVE host directory on the real devvm, laid out and started: the light half of
:mod:`breakglass_tui.lab.guest.lab` (standard library and the lab's own stdlib-only parts), so
the command line can start QEMU restoring the saved state while the console itself starts.

What is where, under a drill's root: ``vm.json`` (the VM's QEMU configuration), ``bin/qm`` (the
``qm`` stand-in), ``verb.toml`` (the verb's config), ``root.qcow2``/``data.qcow2`` (the drill's
throw-away overlays over the saved state's disks), ``state/`` (the verb's bundles, ledger and
log), ``console.log`` (the guest's serial console), ``qemu.log``, ``calls.log`` (every ``qm``
call).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from breakglass_tui.lab.guest import qm as guest_qm
from breakglass_tui.lab.guest.build import GuestImage, find_image
from breakglass_tui.lab.guest.plan import APPEND, MEMORY_MB, SavedState, choose_accel, saved_states
from breakglass_tui.lab.guest.qm import GuestPaths
from breakglass_tui.lab.qm_standin import QmError, pid_alive, qmp, wait_gone, write_json_atomic
from breakglass_tui.lab.verb_config import lab_verb_config

QEMU = "qemu-system-x86_64"
VMID = 102
_MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes

# Over the verb's own defaults (production deadlines: QEMU's TCG is slow, but not slower than a
# loaded PVE host): a budget with a short cooldown, so a rehearsal can reset and then cycle.
VERB_CONFIG: dict[str, Any] = {"budget": {"max_mutating_per_hour": 6, "cooldown_s": 30}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealPve:
    """The lab's PVE host directory and its real QEMU (the ``sim`` of :class:`RealLab`).

    Attributes as :class:`~breakglass_tui.lab.sim_pve.SimPve`: root, vmid, qm_path,
    qemu_run_dir, state_dir, verb_config_path."""

    def __init__(self, root: Path, qemu_run_dir: Path, own_run_dir: bool) -> None:
        self.root = root
        self.vmid = VMID
        self.qm_path = root / "bin" / "qm"
        self.qemu_run_dir = qemu_run_dir
        self.state_dir = root / "state"
        self.verb_config_path = root / "verb.toml"
        self.console_log_path = root / "console.log"
        self.paths = GuestPaths(root)
        self._own_run_dir = own_run_dir

    def kvm_pid(self) -> int | None:
        """The PID of the live QEMU process (from the pid file), or None."""
        return self.paths.kvm_pid()

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on the VM (blocking; raises QmError)."""
        return qmp(self.paths, command, arguments)

    def vm_state(self) -> dict[str, Any]:
        """{"status": "running"|"stopped", "qmp_status": ..., "pid": ...} from /proc and QMP."""
        pid = self.kvm_pid()
        if pid is None:
            return {"vmid": self.vmid, "status": "stopped", "qmp_status": None, "pid": None}
        try:
            qmp_status = self.qmp("query-status")["status"]
        except QmError:
            qmp_status = None
        return {"vmid": self.vmid, "status": "running", "qmp_status": qmp_status, "pid": pid}

    def start_vm(self) -> int:
        """Start the VM's QEMU (not logged as a qm call): the first time from the saved state,
        later from its disks. A running VM is left alone."""
        return self.kvm_pid() or guest_qm.start_qemu(self.paths)

    def calls(self) -> list[tuple[float, str]]:
        """Every qm call received, in order, with time.time()."""
        return self.paths.read_calls()

    def call_texts(self) -> list[str]:
        return [text for _, text in self.calls()]

    def console(self) -> str:
        """The guest's serial console so far (since the lab started it: a restored guest's boot
        happened before its state was saved)."""
        try:
            return self.console_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def boots(self) -> int:
        """How many times the guest booted in this lab (a reset or a cycle is one more)."""
        return self.console().count("breakglass-guest: ready")

    def cleanup(self) -> None:
        """Kill the QEMU processes this lab started (by PID, checked to be ours)."""
        for pid in self.paths.started_pids():
            if not guest_qm.is_lab_qemu(pid, self.root) or not pid_alive(pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._own_run_dir:
            shutil.rmtree(self.qemu_run_dir, ignore_errors=True)


def vm_config(
    *,
    image: GuestImage,
    accel: str,
    memory_mb: int,
    ssh_port: int,
    disks: dict[str, tuple[Path, Path]],
    run_dir: Path,
    incoming: Path | None,
) -> dict[str, Any]:
    """vm.json of the lab's VM: the image's kernel, disks as (overlay, backing) by name, a saved
    state to restore at the first start (incoming) or None for a cold boot."""
    return {
        "vmid": VMID,
        "name": "devvm",
        "qemu": shutil.which(QEMU),
        "accel": accel,
        "memory_mb": memory_mb,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "append": APPEND,
        "ssh_port": ssh_port,
        "root_disk": str(disks["root"][0]),
        "root_backing": str(disks["root"][1]),
        "data_disk": str(disks["data"][0]),
        "data_backing": str(disks["data"][1]),
        "qemu_run_dir": str(run_dir),
        "image_id": image.image_id,
        "incoming": str(incoming) if incoming else None,
    }


def overlay(path: Path, backing: Path | str) -> None:
    """A qcow2 overlay at path over backing (the backing is only read)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def run_dir_for(root: Path) -> tuple[Path, bool]:
    """The QEMU run dir under root, or a short one in /tmp when sockets there would not fit."""
    run_dir = root / "run"
    if len(str(run_dir / f"{VMID}.qmp")) > _MAX_SOCKET_PATH:
        return Path(tempfile.mkdtemp(prefix="bg-qrun-")), True
    run_dir.mkdir(exist_ok=True)
    return run_dir, False


def lay_out(
    root: Path,
    image: GuestImage,
    saved: SavedState,
    accel: str,
    verb_overrides: dict[str, Any] | None,
    memory_mb: int,
) -> tuple[RealPve, int]:
    """Write the lab PVE directory (qm wrapper, vm.json, the drill's disk overlays, verb.toml);
    returns the RealPve and the devvm's SSH port. Blocking: run it in a thread."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir, own_run = run_dir_for(root)
    (root / "state").mkdir(mode=0o700, exist_ok=True)
    pve = RealPve(root, run_dir, own_run)
    qm_path = guest_qm.write_qm_wrapper(root)
    disks = {}
    for disk, base in (("root", saved.root_disk), ("data", saved.data_disk)):
        overlay(root / f"{disk}.qcow2", base)
        disks[disk] = (root / f"{disk}.qcow2", base)
    ssh_port = free_port()
    write_json_atomic(
        root / "vm.json",
        vm_config(
            image=image,
            accel=accel,
            memory_mb=memory_mb,
            ssh_port=ssh_port,
            disks=disks,
            run_dir=run_dir,
            incoming=saved.vmstate,
        ),
    )
    write_verb_config(pve, verb_overrides, qm_path)
    return pve, ssh_port


def write_verb_config(
    pve: RealPve, verb_overrides: dict[str, Any] | None, qm_path: Path | None = None
) -> None:
    """The drill's verb.toml: the verb's defaults, the lab's budget, then `verb_overrides`."""
    pve.verb_config_path.write_text(
        lab_verb_config(
            pve.root,
            vmid=VMID,
            qm=qm_path or pve.qm_path,
            qemu_run_dir=pve.qemu_run_dir,
            state_dir=pve.state_dir,
            layers=(VERB_CONFIG, verb_overrides),
        )
    )


class Prestart:
    """A drill's devvm being restored in the background: laid out and QEMU started (from the
    saved state) in a thread, for :func:`~breakglass_tui.lab.guest.lab.start_real_lab` to
    adopt (:meth:`adopt`). The lab calls :meth:`abandon` when it will not adopt it; the command
    line calls :meth:`close` once the console has ended, and :meth:`kill_now` is the stop's
    last resort at the hard deadline. Its QEMU is found by its command line, which names this
    drill's root, even while it is still starting (no pid file yet)."""

    def __init__(self, image: GuestImage, saved: SavedState, accel: str, memory_mb: int) -> None:
        self.image = image
        self.saved = saved
        self.accel = accel
        self.memory_mb = memory_mb
        self.root = Path(tempfile.mkdtemp(prefix="bg-realab-")).resolve()
        self._lock = threading.Lock()
        self._abandoned = False
        self.adopted = False
        self._pve: RealPve | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lab-prestart")
        self.future: concurrent.futures.Future[tuple[RealPve, int]] = self._pool.submit(self._run)
        self._pool.shutdown(wait=False)  # its one task runs; nothing waits for the thread

    def _run(self) -> tuple[RealPve, int]:
        try:
            pve, port = lay_out(self.root, self.image, self.saved, self.accel, None, self.memory_mb)
            self._pve = pve
            if self._abandoned:
                raise RuntimeError("abandoned before its QEMU started")
            pve.start_vm()
            return pve, port
        finally:
            if self._abandoned:  # abandoned meanwhile: what it started goes at once
                self._remove()

    def adopt(self) -> tuple[RealPve, int]:
        """Take the restored devvm (its future is done): the caller now owns its QEMU and root.
        RuntimeError when it was abandoned first (the console is stopping)."""
        with self._lock:
            if self._abandoned:
                raise RuntimeError("the devvm's restore was abandoned: the console is stopping")
            pve, port = self.future.result(0)
            self.adopted = True
        return pve, port

    def abandon(self, wait_s: float = 3.0) -> None:
        """Not adopted (the lab will not take it): stop its QEMU at once, even mid-start, and
        remove its directory. Bounded: it waits at most `wait_s` for the starting thread (which
        removes what it started after that itself)."""
        with self._lock:
            if self.adopted or self._abandoned:
                return
            self._abandoned = True
        self._remove()
        with contextlib.suppress(Exception):
            self.future.result(wait_s)
        self._remove()  # one that daemonized meanwhile

    def close(self, wait_s: float = 3.0) -> None:
        """The console has ended: nothing of this drill may stay, adopted or not (the lab's own
        close normally removed it already; this is the guarantee)."""
        with self._lock:
            self._abandoned = True
        self._remove()
        if not self.future.done():
            with contextlib.suppress(Exception):
                self.future.result(wait_s)
            self._remove()

    def kill_now(self) -> None:
        """The stop's last resort (any thread, the loop may be stuck, the process about to
        end): SIGKILL this drill's QEMU, adopted or not, and remove its directory."""
        self._abandoned = True
        self._remove()

    def _remove(self) -> None:
        guest_qm.kill_qemus_under(self.root, wait_s=2.0)
        pve = self._pve
        if pve is not None:
            with contextlib.suppress(Exception):
                pve.cleanup()  # by its pid file too; and its run dir when it had its own
        shutil.rmtree(self.root, ignore_errors=True)


def prestart(scenario: str, *, cache: Path | None = None) -> Prestart | None:
    """Start restoring a drill's devvm in the background (lay-out and QEMU, no more) if its
    saved states are ready, for start_real_lab(prestarted=...) to adopt; else None."""
    image = find_image(cache)
    if image is None:
        return None
    accel = choose_accel()
    states = saved_states(image, accel=accel, scenario=scenario, cache=cache)
    if not all(s.complete() for s in states):
        return None
    return Prestart(image, states[-1], accel, MEMORY_MB)
