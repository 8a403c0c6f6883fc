"""The simulated Proxmox ``qm``: a stand-in for ``/usr/sbin/qm`` on the lab's PVE host.

Run per call as ``python -S -m breakglass_tui.lab.sim_qm <subcommand> <vmid> [options]`` by the
``bin/qm`` wrapper that :class:`breakglass_tui.lab.sim_pve.SimPve` lays out. It must start fast,
so it imports the standard library only; the kvm stand-in (``sim_kvm``) and ``SimPve`` share its
helpers (paths, faults, VM state) instead of the other way round. What it has in common with the
real-guest ``qm`` — every behaviour taken from Proxmox's source: ``qm status`` and its
``qmpstatus`` fallback, task workers with their UPIDs, config locks, HA redirection, quorum,
``_do_vm_stop`` — is :mod:`breakglass_tui.lab.qm_standin` (its docstring cites the files).

State lives in the directory named by ``BREAKGLASS_SIM_PVE_DIR`` (``SimPve.root``):
- ``sim.json``    the vmid and the qemu run dir (written once by ``SimPve.create``)
- ``vm.json``     the simulated devvm's state, written atomically under ``vm.lock``
- ``faults.json`` the misbehaviours and Proxmox's timings, read at each call
- ``calls.log``   every qm call and every QMP command received, with ``time.time()``
- ``sim-pids``    the PIDs of sim processes (kvm, hung qm) so cleanup can find them
- ``etc-pve/``, ``lock/``, ``pve-log/tasks/``, ``cgroup/``: see ``qm_standin.StandinRoot``

Output and exit codes follow Proxmox's ``qm``: ``status: running``; ``VM 102 not running`` and
``VM 102 already running`` exit 255; an unknown VM exits 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from breakglass_tui.lab.qm_standin import (
    EXIT_ERROR,
    SOURCE_ROOT,
    TASK_ARG,
    TASK_OPTIONS,
    LineReader,
    QmError,
    QmpFailed,
    StandinRoot,
    append_line,
    check_running,
    cli_task,
    dispatch,
    entry_point,
    pid_alive,
    run_worker,
    status_output,
    write_json_atomic,
)
from breakglass_tui.lab.qm_standin import (
    FAULT_DEFAULTS as STANDIN_FAULT_DEFAULTS,
)

ENV_ROOT = "BREAKGLASS_SIM_PVE_DIR"
KVM_MODULE = "breakglass_tui.lab.sim_kvm"
QM_MODULE = "breakglass_tui.lab.sim_qm"

FAULT_DEFAULTS: dict[str, Any] = {
    **STANDIN_FAULT_DEFAULTS,
    "hang_qm": [],  # qm subcommands that never answer ("status", "reset", ...)
    # QMP commands that never answer; "all": QEMU's main loop is wedged (no client is accepted,
    # so the listen queue fills and further connects fail with EAGAIN)
    "hang_qmp": [],
    "io_error_pause": False,  # the VM is paused by an I/O error (applied when set)
    # QMP quit answers, then the kvm hangs in D state on its storage: it survives SIGTERM and
    # SIGKILL, and Proxmox's stop clean-up deletes its pid file anyway
    "stuck_on_stop": False,
    "kvm_d_state": False,  # the kvm is in D state now (applied when set): QMP wedged, unkillable
    "screendump_no_format": False,  # a QEMU before 7.1: screendump has no format (PPM only)
}
HANG_CAP_S = 3600.0  # "forever", but a forgotten hung qm still goes away on its own

QM_CONFIG = """boot: order=scsi0;net0
cores: 4
cpu: host
memory: 16384
meta: creation-qemu=8.1.5,ctime=1718000000
name: devvm
net0: virtio=BC:24:11:02:01:02,bridge=vmbr0,firewall=1
numa: 0
ostype: l26
scsi0: local-lvm:vm-{vmid}-disk-0,discard=on,iothread=1,size=200G
scsihw: virtio-scsi-single
smbios1: uuid=5f0c9a64-1d4b-4b39-9e0a-0000000{vmid}
sockets: 1
vmgenid: 8c3b5f2e-2a44-4d57-9f1c-000000000{vmid}
"""


class SimPaths(StandinRoot):
    """Where one simulated PVE host keeps its files (see the module docstring)."""

    FAULT_DEFAULTS = FAULT_DEFAULTS
    # vmstatus's queue after query-status (query-balloon last: it fails without a balloon)
    QMP_STATUS_QUEUE = (
        "query-proxmox-support",
        "query-blockstats",
        "query-machines",
        "query-version",
        "query-balloon",
    )

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        meta = json.loads((self.root / "sim.json").read_text())
        self.vmid = int(meta["vmid"])
        self.run_dir = Path(meta["qemu_run_dir"])
        self.pid_file = self.run_dir / f"{self.vmid}.pid"
        self.qmp_socket = self.run_dir / f"{self.vmid}.qmp"
        # The socket of SimPve's in-process supervisor, which starts and reaps the kvm processes.
        self.hv_socket = self.run_dir / "sim-hv.sock"
        self.vm_json = self.root / "vm.json"
        self.vm_lock = self.root / "vm.lock"
        self.pids_file = self.root / "sim-pids"
        self.kvm_program = self.root / "bin" / "kvm"

    def record_pid(self, kind: str, pid: int) -> None:
        """Remember a sim process so SimPve.cleanup can find it even if it was not its child."""
        append_line(self.pids_file, f"{kind} {pid}")

    # -- VM state ------------------------------------------------------------------------------
    def read_vm(self) -> dict[str, Any]:
        return json.loads(self.vm_json.read_text())

    @contextlib.contextmanager
    def vm_update(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write vm.json under a lock; written atomically (tmp + rename)."""
        with open(self.vm_lock, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read_vm()
            yield state
            write_json_atomic(self.vm_json, state)

    def mark_stopped(self, pid: int | None) -> None:
        """Record that the kvm process `pid` is gone (only if vm.json still names it)."""
        with self.vm_update() as vm:
            if pid is None or vm.get("pid") in (pid, None):
                vm.update(status="stopped", qmp_status="prelaunch", pid=None, d_state=False)
        if pid is not None:
            self.scope_remove(pid)

    # -- the kvm process -----------------------------------------------------------------------
    def kvm_pid(self) -> int | None:
        """Proxmox's check_running (pid file, command line with -pidfile), and the process is
        this root's sim kvm (guards against PID reuse)."""
        pid = check_running(self.pid_file)
        if pid is not None and is_sim_process(pid, KVM_MODULE, self.root):
            return pid
        return None

    def kvm_survives_kill(self, pid: int) -> bool:
        # A real kvm in D state does not die on SIGKILL; the sim's (a vfork-blocked process,
        # killable) would, so qm leaves it alone, as the kernel would.
        with contextlib.suppress(OSError, ValueError):
            vm = self.read_vm()
            return bool(vm.get("d_state")) and vm.get("pid") == pid
        return False

    def start_vm(self) -> int:
        return start_kvm(self)

    def owns_process(self, pid: int) -> bool:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"{ENV_ROOT}={self.root}".encode() in environ

    def vm_details(self, pid: int) -> dict[str, Any]:
        booted_at = self.read_vm().get("booted_at")
        return {
            "cpus": 4,
            "disk": 0,
            "maxdisk": 214748364800,
            "maxmem": 17179869184,
            "mem": 8_589_934_592,
            "name": "devvm",
            "netin": 0,
            "netout": 0,
            "pid": pid,
            "uptime": int(time.time() - float(booted_at or time.time())),
        }


def is_sim_process(pid: int, module: str, root: Path) -> bool:
    """Whether `pid` runs `module` for this sim root (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    marker = f"{ENV_ROOT}={root}".encode()
    return module.encode() in cmdline and marker in environ


def sim_env(root: Path) -> dict[str, str]:
    """The whole environment of a sim child: nothing of the caller's (no secret can leak in)."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": SOURCE_ROOT, ENV_ROOT: str(root)}


def kvm_argv(paths: SimPaths) -> list[str]:
    """The sim kvm's command line: argv[0] ends in ``kvm`` (a symlink to this Python) and it
    carries ``-pidfile <run>/<vmid>.pid``, as Proxmox's check_running requires."""
    if not paths.kvm_program.is_symlink():
        paths.kvm_program.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            paths.kvm_program.symlink_to(sys.executable)
    return [
        str(paths.kvm_program),
        "-S",
        "-m",
        KVM_MODULE,
        str(paths.root),
        "-id",
        str(paths.vmid),
        "-name",
        "devvm",
        "-pidfile",
        str(paths.pid_file),
        "-qmp",
        f"unix:{paths.qmp_socket},server=on,wait=off",
    ]


def spawn_kvm(paths: SimPaths) -> subprocess.Popen[bytes]:
    """Start a sim kvm process in its own session, detached from our stdio (a caller reading
    qm's stdout to EOF must not wait on the kvm), and return its Popen."""
    return subprocess.Popen(
        kvm_argv(paths),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=paths.run_dir,
        env=sim_env(paths.root),
    )


def wait_for_kvm(paths: SimPaths, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    """Wait until the kvm `proc` has written its pid file (it binds its QMP socket first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvm process exited with {proc.returncode} while starting")
        if paths.pid_from_file() == proc.pid and paths.qmp_socket.exists():
            return proc.pid
        time.sleep(0.01)
    raise RuntimeError(f"kvm process {proc.pid} did not start within {timeout_s}s")


def start_kvm(paths: SimPaths) -> int:
    """Start the kvm process through SimPve's supervisor (which reaps it, as systemd would), or
    directly when no supervisor is listening. Returns its PID."""
    with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20.0)
            sock.connect(str(paths.hv_socket))
            sock.sendall(b"start\n")
            try:
                reply = LineReader(sock, time.monotonic() + 20.0).read_json()
            except QmpFailed as exc:
                raise QmError(f"start failed: the sim supervisor did not answer ({exc})") from None
        if not reply.get("ok"):
            raise QmError(f"start failed: {reply.get('error')}")
        return int(reply["pid"])
    proc = spawn_kvm(paths)
    try:
        return wait_for_kvm(paths, proc)
    except RuntimeError as exc:
        raise QmError(f"start failed: {exc}") from None


# -- qm subcommands --------------------------------------------------------------------------
def _hang_forever(paths: SimPaths) -> None:
    paths.record_pid("qm", os.getpid())
    deadline = time.monotonic() + HANG_CAP_S
    while time.monotonic() < deadline:
        time.sleep(1.0)


def cmd_status(paths: SimPaths, opts: dict[str, str]) -> str:
    return status_output(paths, opts)


def cmd_config(paths: SimPaths, opts: dict[str, str]) -> str:
    return paths.config_text()


COMMANDS = {
    "status": (cmd_status, {"verbose": False}),
    "config": (cmd_config, {"current": False, "snapshot": True}),
}
SUBCOMMANDS = (*COMMANDS, *TASK_OPTIONS)


def run(argv: list[str], paths: SimPaths) -> int:
    """Run one qm call: log it, honour hang faults, dispatch. Returns the exit code."""
    if argv[:1] == [TASK_ARG]:
        run_worker(paths, argv[1:])
    paths.log_call("qm " + shlex.join(argv))
    if not argv or argv[0] not in SUBCOMMANDS:
        name = argv[0] if argv else ""
        sys.stderr.write(f"unknown command 'qm {name}'\nUSAGE: qm <COMMAND> [ARGS] [OPTIONS]\n")
        return EXIT_ERROR
    sub = argv[0]
    if sub in paths.faults()["hang_qm"]:
        _hang_forever(paths)
        return EXIT_ERROR
    if len(argv) < 2:
        sys.stderr.write(f"400 not enough arguments\nqm {sub} <vmid> [OPTIONS]\n")
        return EXIT_ERROR
    if sub in TASK_OPTIONS:
        return cli_task(paths, QM_MODULE, argv)
    func, known = COMMANDS[sub]
    return dispatch(paths, argv[1], func, known, argv[2:])


def kvm_alive(paths: SimPaths) -> int | None:
    """The PID vm.json names if that process still lives (pid file or not), else None."""
    with contextlib.suppress(OSError, ValueError):
        pid = paths.read_vm().get("pid")
        if isinstance(pid, int) and pid_alive(pid) and is_sim_process(pid, KVM_MODULE, paths.root):
            return pid
    return None


def main() -> None:
    """Entry point: ``python -m breakglass_tui.lab.sim_qm <args>``."""
    entry_point(
        ENV_ROOT,
        lambda argv, root: run(argv, SimPaths(root)),
        f"sim qm: {ENV_ROOT} is not set: run it through SimPve's bin/qm",
    )


if __name__ == "__main__":
    main()
