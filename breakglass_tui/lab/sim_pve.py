"""A simulated Proxmox VE host for tests and the lab: a ``qm``, a kvm process, VM state, faults.

``SimPve.create(root)`` lays out a directory the real ``breakglass-verb`` can be pointed at::

    root/bin/qm        #!/bin/sh wrapper: exec <python> -S -m breakglass_tui.lab.sim_qm "$@"
    root/bin/kvm       a symlink to Python: the sim kvm's argv[0] (Proxmox checks it ends in kvm)
    root/run/          qemu_run_dir: <vmid>.pid and <vmid>.qmp of the running sim kvm
    root/state/        state_dir of the verb (0700)
    root/verb.toml     the verb's config, deadlines shortened for tests
    root/vm.json       the simulated devvm's state; root/faults.json its misbehaviours
    root/calls.log     every qm call and QMP command, in order, with time.time()
    root/etc-pve/      /etc/pve: local (quorum), qemu-server/<vmid>.conf (lock:), ha/resources.cfg
    root/lock/         /var/lock/qemu-server (lock-<vmid>.conf, flocked by qm's tasks)
    root/pve-log/tasks/active   /var/log/pve/tasks/active: qm's task workers by UPID
    root/cgroup/qemu.slice/<vmid>.scope/cgroup.procs   the VM's scope: which processes are its

The kvm processes are started by a supervisor thread in this process (``qm start`` asks it over a
unix socket), so they are our children and are reaped when they die, as systemd reaps Proxmox's
kvm; without it a killed kvm would linger as a zombie here, and "is the process gone?" would lie.
A second thread plays the HA stack for an HA-managed VM: it carries out the requested state
(``ha/resources.cfg``) ``ha_delay_s`` after it changed, as the CRM and LRM do on their loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from breakglass_tui.lab import sim_qm
from breakglass_tui.lab.qm_standin import (
    pid_alive,
    proc_stat,
    set_quorum,
    write_json_atomic,
    write_pve_layout,
    write_wrapper,
)
from breakglass_tui.lab.sim_qm import (
    ENV_ROOT,
    FAULT_DEFAULTS,
    KVM_MODULE,
    QM_CONFIG,
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
    "deadlines": {
        "forensics_s": 6,
        "probe_s": 2,
        "qm_action_s": 60,
        "qm_stop_timeout_s": 10,
        "verify_s": 10,
        "ha_verify_s": 20,
    },
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
        self._ha_thread: threading.Thread | None = None
        self._pollers: list[socket.socket] = []

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
                "d_state": False,
            },
        )
        write_json_atomic(root / "faults.json", dict(FAULT_DEFAULTS))
        (root / "calls.log").touch()
        write_pve_layout(root, vmid, QM_CONFIG.format(vmid=vmid))

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
        sim._ha_thread = threading.Thread(target=sim._ha_loop, name="sim-pve-ha", daemon=True)
        sim._ha_thread.start()
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
        pid = self.kvm_pid() or sim_qm.kvm_alive(self._paths)
        if pid is not None:
            self._kill(pid)
            self._paths.mark_stopped(pid)
            self._paths.stop_cleanup()

    def vm_state(self) -> dict[str, Any]:
        """vm.json, with `status` as Proxmox sees it (the pid file and the process's command
        line), and `kvm_alive` telling whether the VM's kvm process lives — it may while status
        says stopped: Proxmox's stop clean-up deletes the pid file of a kvm that survived."""
        state = self._paths.read_vm()
        if self.kvm_pid() is None and state.get("status") == "running":
            state.update(status="stopped", qmp_status="prelaunch")
        alive = sim_qm.kvm_alive(self._paths)
        state["kvm_alive"] = alive is not None
        state["kvm_state"] = (proc_stat(alive) or ("?",))[0] if alive else None
        return state

    def kvm_pid(self) -> int | None:
        """The PID of the live sim kvm process (from the pid file), or None."""
        return self._paths.kvm_pid()

    def live_kvm_pid(self) -> int | None:
        """The PID of the VM's kvm process while it lives, pid file or not."""
        return sim_qm.kvm_alive(self._paths)

    # -- the rest of the host: locks, HA, quorum ---------------------------------------------
    @property
    def pve_dir(self) -> Path:
        return self._paths.pve_dir

    def set_lock(self, lock: str | None) -> None:
        """Set (or clear) the ``lock:`` of the VM's config, as vzdump (backup), a migration or a
        snapshot does for as long as it runs."""
        self._paths.set_config_lock(lock)

    @contextlib.contextmanager
    def config_lock_held(self) -> Iterator[None]:
        """Hold the VM's ``lock-<vmid>.conf`` flock, as another Proxmox task does while it runs:
        qm's own tasks wait for it (config_lock_wait_s) and then give up."""
        self._paths.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self._paths.config_lock_file, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def set_ha(self, state: str | None) -> None:
        """Make the VM HA-managed with the requested state ("started", "stopped", "ignored"),
        or not HA-managed (None)."""
        self._paths.set_ha_state(state)

    def ha_state(self) -> str | None:
        """The requested HA state, or None when the VM is not HA-managed."""
        section = self._paths.ha_resource()
        return None if section is None else section.get("state", "started")

    def set_quorum(self, quorate: bool) -> None:
        """Give the node quorum, or take it away (/etc/pve/local read-only)."""
        set_quorum(self.root, quorate)

    def scope_pids(self) -> list[int]:
        """The PIDs listed in the VM's cgroup scope."""
        procs = self._paths.scope_dir / "cgroup.procs"
        with contextlib.suppress(FileNotFoundError):
            return [int(p) for p in procs.read_text().split() if p.isdigit()]
        return []

    def pvestatd_polls(self, count: int = 2) -> int:
        """Connect to the VM's QMP socket as pvestatd's polls do, and give up without reading
        (the connections stay in QEMU's listen queue until QEMU accepts them). Returns how many
        connects succeeded; the rest failed with EAGAIN."""
        made = 0
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(self._paths.qmp_socket))
                made += 1
            except OSError:
                sock.close()
                continue
            self._pollers.append(sock)
        for sock in self._pollers:
            sock.close()  # gave up: closed, but still queued in the listener
        self._pollers.clear()
        return made

    # -- faults and the call log ---------------------------------------------------------------
    def set_faults(self, **faults: Any) -> None:
        """Change faults, keeping the ones not named. ``io_error_pause=True`` pauses the running
        VM with an I/O error at once (it stays paused until QMP cont, e.g. ``qm resume``)."""
        unknown = set(faults) - set(FAULT_DEFAULTS)
        if unknown:
            raise TypeError(
                f"unknown sim fault(s) {sorted(unknown)}; known: {sorted(FAULT_DEFAULTS)}"
            )
        if "d_state" in faults:
            raise TypeError("the D state is the kvm_d_state fault")
        hang_qmp = faults.get("hang_qmp")
        if hang_qmp is not None and hang_qmp != "all" and not isinstance(hang_qmp, list | tuple):
            raise TypeError('hang_qmp is a list of QMP command names, or "all"')
        current = self._paths.faults()
        current.update({k: list(v) if isinstance(v, tuple) else v for k, v in faults.items()})
        write_json_atomic(self._paths.faults_json, current)
        if faults.get("hang_qmp") == "all":
            time.sleep(0.2)  # the kvm looks at its faults between accepts (every 50 ms)
        if faults.get("io_error_pause") and self.kvm_pid() is not None:
            with self._paths.vm_update() as vm:
                vm["qmp_status"] = "io-error"
        if faults.get("kvm_d_state"):
            pid = self.live_kvm_pid()
            if pid is not None:
                os.kill(pid, signal.SIGUSR1)  # it blocks in vfork(): real D state
                deadline = time.monotonic() + 10
                while (proc_stat(pid) or ("D",))[0] != "D" and time.monotonic() < deadline:
                    time.sleep(0.01)

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
        if self._ha_thread is not None:
            self._ha_thread.join(2)
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
        # A kvm in (simulated) D state is blocked in vfork(): its child goes too.
        children = [c for c in _children_of(pid) if is_sim_process(c, KVM_MODULE, self.root)]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
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

    def _ha_loop(self) -> None:
        """The HA stack: carry out the requested state ha_delay_s after it last changed."""
        seen: tuple[str | None, float] = (None, 0.0)
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError, ValueError):
                state = self.ha_state()
                if state != seen[0]:
                    seen = (state, time.monotonic())
                    continue
                if state is None or time.monotonic() - seen[1] < float(
                    self._paths.faults()["ha_delay_s"]
                ):
                    continue
                running = self.kvm_pid() is not None
                if state in ("started", "enabled") and not running:
                    self._spawn()
                elif state in ("stopped", "disabled") and running:
                    pid = self.kvm_pid()
                    if pid is not None:
                        os.kill(pid, signal.SIGTERM)

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


def _children_of(pid: int) -> list[int]:
    """The PIDs whose parent is pid."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == pid:
                children.append(int(entry))
    return children
