"""A simulated Proxmox VE host for tests and the lab: a ``qm``, a kvm process, VM state, faults.

``SimPve.create(root)`` lays out a directory the real ``breakglass-verb`` can be pointed at::

    root/bin/qm        #!/bin/sh wrapper: exec <python> -S -m breakglass_tui.lab.sim_qm "$@"
    root/run/          qemu_run_dir: <vmid>.pid and <vmid>.qmp of the running sim kvm
    root/state/        state_dir of the verb (0700)
    root/verb.toml     the verb's config, deadlines shortened for tests
    root/vm.json       the simulated devvm's state; root/faults.json its misbehaviours
    root/calls.log     every qm call and QMP command, in order, with time.time()

The kvm processes are started by a supervisor thread in this process (``qm start`` asks it over a
unix socket), so they are our children and are reaped when they die, as systemd reaps Proxmox's
kvm; without it a killed kvm would linger as a zombie here, and "is the process gone?" would lie.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from breakglass_tui.lab import sim_qm
from breakglass_tui.lab.qm_standin import pid_alive, write_json_atomic, write_wrapper
from breakglass_tui.lab.sim_qm import (
    ENV_ROOT,
    FAULT_DEFAULTS,
    KVM_MODULE,
    QM_MODULE,
    SimPaths,
    is_sim_process,
)
from breakglass_tui.lab.verb_config import lab_verb_config

# AF_UNIX paths are limited to 108 bytes; longer run dirs are moved to a short temp dir.
_MAX_SOCKET_PATH = 100

# Over the verb's own defaults: deadlines shortened for tests, still well above what the sim
# takes on a busy 2-core machine.
VERB_CONFIG: dict[str, Any] = {
    "deadlines": {"forensics_s": 6, "probe_s": 2, "qm_action_s": 20, "verify_s": 10},
}


class SimPve:
    """One simulated PVE host with one VM (the devvm). Build it with :meth:`create`."""

    def __init__(self, root: Path, vmid: int, qemu_run_dir: Path, own_run_dir: bool) -> None:
        self.root = root
        self.vmid = vmid
        self.qm_path = root / "bin" / "qm"
        self.qemu_run_dir = qemu_run_dir
        self.state_dir = root / "state"
        self.verb_config_path = root / "verb.toml"
        self._paths = SimPaths(root)
        self._own_run_dir = own_run_dir  # a short run dir we made in /tmp: removed by cleanup
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._reapers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, vmid: int = 102, **verb_overrides: Any) -> SimPve:
        """Lay out a simulated PVE host under `root` (the VM starts stopped: call start_vm()).

        `verb_overrides` are merged into verb.toml, tables key by key, e.g.
        ``deadlines={"forensics_s": 3}`` or ``budget={"cooldown_s": 0}``."""
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        (root / "bin").mkdir(exist_ok=True)
        run_dir = root / "run"
        own_run_dir = False
        if len(str(run_dir / "sim-hv.sock")) > _MAX_SOCKET_PATH:
            # The verb connects to <run>/<vmid>.qmp: the path must fit in sockaddr_un.
            short = Path(tempfile.mkdtemp(prefix="bg-simrun-"))
            with contextlib.suppress(FileExistsError):
                run_dir.symlink_to(short)  # so root/run still shows where it is
            run_dir, own_run_dir = short, True
        else:
            run_dir.mkdir(exist_ok=True)
        state_dir = root / "state"
        state_dir.mkdir(mode=0o700, exist_ok=True)
        write_json_atomic(root / "sim.json", {"vmid": vmid, "qemu_run_dir": str(run_dir)})
        write_json_atomic(
            root / "vm.json",
            {
                "vmid": vmid,
                "status": "stopped",
                "qmp_status": "prelaunch",
                "boot_id": 0,
                "booted_at": 0.0,
                "pid": None,
            },
        )
        write_json_atomic(root / "faults.json", dict(FAULT_DEFAULTS))
        (root / "calls.log").touch()

        qm = write_wrapper(
            root,
            QM_MODULE,
            ENV_ROOT,
            "Simulated Proxmox qm (breakglass_tui.lab.sim_qm); made by SimPve.create.",
        )
        (root / "verb.toml").write_text(
            lab_verb_config(
                root,
                vmid=vmid,
                qm=qm,
                qemu_run_dir=run_dir,
                state_dir=state_dir,
                layers=(VERB_CONFIG, verb_overrides),
            )
        )

        sim = cls(root, vmid, run_dir, own_run_dir)
        sim._start_supervisor()
        return sim

    # -- the VM --------------------------------------------------------------------------------
    def start_vm(self) -> int:
        """Start the VM's kvm process (not logged as a qm call) and return its PID. A running
        VM is left alone."""
        pid = self.kvm_pid()
        if pid is not None:
            return pid
        return self._spawn()

    def stop_vm(self) -> None:
        """Stop the VM's kvm process at once (SIGKILL; setup, not logged as a qm call)."""
        pid = self.kvm_pid()
        if pid is not None:
            self._kill(pid)
            self._paths.mark_stopped(pid)

    def vm_state(self) -> dict[str, Any]:
        """vm.json, with `status` corrected to "stopped" if its kvm process is gone, and
        `kvm_alive` telling whether a kvm process lives (it may, while status says stopped)."""
        state = self._paths.read_vm()
        pid = self.kvm_pid()
        if pid is None and state.get("status") == "running":
            state.update(status="stopped", qmp_status="prelaunch", pid=None)
        state["kvm_alive"] = pid is not None
        return state

    def kvm_pid(self) -> int | None:
        """The PID of the live sim kvm process (from the pid file), or None."""
        return self._paths.kvm_pid()

    # -- faults and the call log ---------------------------------------------------------------
    def set_faults(self, **faults: Any) -> None:
        """Change faults, keeping the ones not named. ``io_error_pause=True`` pauses the running
        VM with an I/O error at once (it stays paused until QMP cont, e.g. ``qm resume``)."""
        unknown = set(faults) - set(FAULT_DEFAULTS)
        if unknown:
            raise TypeError(
                f"unknown sim fault(s) {sorted(unknown)}; known: {sorted(FAULT_DEFAULTS)}"
            )
        hang_qmp = faults.get("hang_qmp")
        if hang_qmp is not None and hang_qmp != "all" and not isinstance(hang_qmp, list | tuple):
            raise TypeError('hang_qmp is a list of QMP command names, or "all"')
        current = self._paths.faults()
        current.update({k: list(v) if isinstance(v, tuple) else v for k, v in faults.items()})
        write_json_atomic(self._paths.faults_json, current)
        if faults.get("io_error_pause") and self.kvm_pid() is not None:
            with self._paths.vm_update() as vm:
                vm["qmp_status"] = "io-error"

    def faults(self) -> dict[str, Any]:
        """The faults in force."""
        return self._paths.faults()

    def calls(self) -> list[tuple[float, str]]:
        """Every qm invocation ("qm reset 102") and QMP command received ("qmp system_reset",
        arguments as JSON after a space), in order, with time.time()."""
        return self._paths.read_calls()

    def call_texts(self) -> list[str]:
        """calls() without the times."""
        return [text for _, text in self.calls()]

    # -- cleanup -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Stop the supervisor and kill the sim processes of this root, by PID: the kvm
        processes it started, and any kvm or hung qm recorded in sim-pids (checked to be ours).
        Safe to call twice; when it returns nothing of the sim writes under root any more."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._thread is not None:
            self._thread.join(2)
        with contextlib.suppress(OSError):
            self._paths.hv_socket.unlink()
        pids = set(self._children)
        with contextlib.suppress(FileNotFoundError):
            for line in self._paths.pids_file.read_text().splitlines():
                _, _, pid = line.partition(" ")
                if pid.isdigit():
                    pids.add(int(pid))
        for pid in pids:
            ours = pid in self._children or any(
                is_sim_process(pid, module, self.root) for module in (KVM_MODULE, sim_qm.QM_MODULE)
            )
            if ours and pid_alive(pid):
                self._kill(pid)
        for proc in list(self._children.values()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        # The reapers' last write to vm.json is done when cleanup returns: the caller may remove
        # the root right after.
        for reaper in self._reapers:
            reaper.join(5)
        if self._own_run_dir:
            shutil.rmtree(self.qemu_run_dir, ignore_errors=True)

    def __enter__(self) -> SimPve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- internals -----------------------------------------------------------------------------
    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc = self._children.get(pid)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        else:
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)

    def _spawn(self) -> int:
        with self._lock:
            live = self.kvm_pid()
            if live is not None:
                raise RuntimeError(f"VM {self.vmid} already running (kvm pid {live})")
            proc = sim_qm.spawn_kvm(self._paths)
            self._children[proc.pid] = proc
            reaper = threading.Thread(
                target=self._reap, args=(proc,), name=f"sim-kvm-reaper-{proc.pid}", daemon=True
            )
            reaper.start()
            self._reapers.append(reaper)
            try:
                return sim_qm.wait_for_kvm(self._paths, proc)
            except RuntimeError:
                self._kill(proc.pid)
                raise

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for a kvm child; when it dies, however it died, the VM is stopped."""
        proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self._paths.mark_stopped(proc.pid)
        self._children.pop(proc.pid, None)

    def _start_supervisor(self) -> None:
        path = self._paths.hv_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(8)
        listener.settimeout(0.2)  # so cleanup() can stop the thread
        self._listener = listener
        self._thread = threading.Thread(target=self._supervise, name="sim-pve-hv", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    request = conn.recv(64).strip()
                    if request != b"start":
                        reply: dict[str, Any] = {
                            "ok": False,
                            "error": f"unknown request {request!r}",
                        }
                    else:
                        reply = {"ok": True, "pid": self._spawn()}
                except (OSError, RuntimeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")
