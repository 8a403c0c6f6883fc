"""The simulated Proxmox ``qm``: a stand-in for ``/usr/sbin/qm`` on the lab's PVE host.

Run per call as ``python -S -m breakglass_tui.lab.sim_qm <subcommand> <vmid> [options]`` by the
``bin/qm`` wrapper that :class:`breakglass_tui.lab.sim_pve.SimPve` lays out. It must start fast,
so it imports the standard library only; the kvm stand-in (``sim_kvm``) and ``SimPve`` share its
helpers (paths, call log, faults, VM state, a QMP client) instead of the other way round.

State lives in the directory named by ``BREAKGLASS_SIM_PVE_DIR`` (``SimPve.root``):
- ``sim.json``    the vmid and the qemu run dir (written once by ``SimPve.create``)
- ``vm.json``     the simulated devvm's state, written atomically under ``vm.lock``
- ``faults.json`` the misbehaviours, read at each call
- ``calls.log``   every qm call and every QMP command received, with ``time.time()``
- ``sim-pids``    the PIDs of sim processes (kvm, hung qm) so cleanup can find them

Output and exit codes follow Proxmox's ``qm``: ``status: running``; ``VM 102 not running`` and
``VM 102 already running`` exit 255; an unknown VM exits 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_ROOT = "BREAKGLASS_SIM_PVE_DIR"
KVM_MODULE = "breakglass_tui.lab.sim_kvm"
QM_MODULE = "breakglass_tui.lab.sim_qm"
# The directory that holds the breakglass_tui package: sim processes are started with it on
# PYTHONPATH and with -S, so they do not pay for site-packages they never use.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])

FAULT_DEFAULTS: dict[str, Any] = {
    "hang_qm": [],  # qm subcommands that never answer ("status", "reset", ...)
    "hang_qmp": [],  # QMP commands that never answer, or "all" (not even the greeting)
    "io_error_pause": False,  # the VM is paused by an I/O error (applied when set)
    "stuck_on_stop": False,  # qm stop leaves kvm alive and still says OK: the D-state case
    "qmp_timeout_s": 5.0,  # how long the simulated qm waits for QMP (Proxmox: ~5 s for reset)
}
HANG_CAP_S = 3600.0  # "forever", but a forgotten hung qm still goes away on its own
EXIT_ERROR = 255  # what Proxmox's CLI exits with on a failed command
EXIT_NO_CONFIG = 2  # qm on a VM id that has no config

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


class SimPaths:
    """Where one simulated PVE host keeps its files (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        meta = json.loads((self.root / "sim.json").read_text())
        self.vmid = int(meta["vmid"])
        self.run_dir = Path(meta["qemu_run_dir"])
        self.pid_file = self.run_dir / f"{self.vmid}.pid"
        self.qmp_path = self.run_dir / f"{self.vmid}.qmp"
        # The socket of SimPve's in-process supervisor, which starts and reaps the kvm processes.
        self.hv_socket = self.run_dir / "sim-hv.sock"
        self.vm_json = self.root / "vm.json"
        self.vm_lock = self.root / "vm.lock"
        self.faults_json = self.root / "faults.json"
        self.calls_log = self.root / "calls.log"
        self.pids_file = self.root / "sim-pids"

    # -- call log ------------------------------------------------------------------------------
    def log_call(self, text: str) -> None:
        """Append one call with its time. One short O_APPEND write per line, so the qm and kvm
        processes can log to the same file without interleaving."""
        line = f"{time.time():.6f} {json.dumps(text)}\n".encode()
        fd = os.open(self.calls_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_calls(self) -> list[tuple[float, str]]:
        """Every logged call, in order, as (time.time(), text)."""
        try:
            raw = self.calls_log.read_text()
        except FileNotFoundError:
            return []
        calls = []
        for line in raw.splitlines():
            stamp, _, text = line.partition(" ")
            calls.append((float(stamp), json.loads(text)))
        return calls

    def record_pid(self, kind: str, pid: int) -> None:
        """Remember a sim process so SimPve.cleanup can find it even if it was not its child."""
        fd = os.open(self.pids_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{kind} {pid}\n".encode())
        finally:
            os.close(fd)

    # -- faults --------------------------------------------------------------------------------
    def faults(self) -> dict[str, Any]:
        """The current faults, defaults filled in. A missing or torn file means no faults."""
        faults = dict(FAULT_DEFAULTS)
        with contextlib.suppress(FileNotFoundError, ValueError):
            faults.update(json.loads(self.faults_json.read_text()))
        return faults

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
                vm.update(status="stopped", qmp_status="prelaunch", pid=None)

    # -- the kvm process -----------------------------------------------------------------------
    def pid_from_file(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def kvm_pid(self) -> int | None:
        """The PID of this VM's live sim kvm process, from the pid file, or None."""
        pid = self.pid_from_file()
        if pid is not None and pid_alive(pid) and is_sim_process(pid, KVM_MODULE, self.root):
            return pid
        return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not: it has exited, only unreaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


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


def spawn_kvm(paths: SimPaths) -> subprocess.Popen[bytes]:
    """Start a sim kvm process in its own session, detached from our stdio (a caller reading
    qm's stdout to EOF must not wait on the kvm), and return its Popen."""
    return subprocess.Popen(
        [sys.executable, "-S", "-m", KVM_MODULE, str(paths.root)],
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
        if paths.pid_from_file() == proc.pid and paths.qmp_path.exists():
            return proc.pid
        time.sleep(0.01)
    raise RuntimeError(f"kvm process {proc.pid} did not start within {timeout_s}s")


# -- a small QMP client (qm's own use of QMP) ----------------------------------------------------
class QmpTimeout(Exception):
    pass


def qmp_command(
    paths: SimPaths, execute: str, arguments: dict[str, Any] | None, timeout_s: float
) -> dict[str, Any]:
    """Connect, negotiate, run one command; the reply ({"return": ...} or {"error": ...}).
    Raises QmpTimeout when the whole exchange does not finish within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(paths.qmp_path))
        except (TimeoutError, OSError) as exc:
            raise QmpTimeout(str(exc)) from None
        reader = _LineReader(sock, deadline)
        reader.read_json()  # greeting
        for cmd, args in (("qmp_capabilities", None), (execute, arguments)):
            msg: dict[str, Any] = {"execute": cmd}
            if args:
                msg["arguments"] = args
            sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = reader.read_json()
                if "event" not in reply:  # asynchronous events come in between: skip them
                    break
        return reply


class _LineReader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def read_json(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeout("got timeout")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                raise QmpTimeout("got timeout") from None
            if not data:
                raise QmpTimeout("connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)


# -- qm subcommands --------------------------------------------------------------------------
class QmError(Exception):
    """A failed qm command: message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _hang_forever(paths: SimPaths) -> None:
    paths.record_pid("qm", os.getpid())
    deadline = time.monotonic() + HANG_CAP_S
    while time.monotonic() < deadline:
        time.sleep(1.0)


def _options(args: list[str], known: dict[str, bool]) -> dict[str, str]:
    """Parse ``--name value`` / ``--flag`` options (known: name -> takes a value)."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.lstrip("-")
        if not arg.startswith("-") or name not in known:
            raise QmError(f"Unknown option: {name}\n400 unable to parse option")
        if known[name]:
            if i + 1 >= len(args):
                raise QmError(f"400 Parameter verification failed.\n{name}: missing value")
            opts[name] = args[i + 1]
            i += 2
        else:
            opts[name] = "1"
            i += 1
    return opts


def _qmp_or_fail(paths: SimPaths, execute: str, args: dict[str, Any] | None = None) -> Any:
    timeout = float(paths.faults()["qmp_timeout_s"])
    try:
        reply = qmp_command(paths, execute, args, timeout)
    except QmpTimeout as exc:
        raise QmError(f"VM {paths.vmid} qmp command '{execute}' failed - {exc}") from None
    if "error" in reply:
        desc = reply["error"].get("desc", "")
        raise QmError(f"VM {paths.vmid} qmp command '{execute}' failed - {desc}")
    return reply.get("return")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def cmd_status(paths: SimPaths, opts: dict[str, str]) -> str:
    pid = paths.kvm_pid()
    if pid is None:
        return "status: stopped\n"
    if "verbose" not in opts:
        return "status: running\n"
    vm = paths.read_vm()
    info: dict[str, Any] = {
        "cpus": 4,
        "maxdisk": 214748364800,
        "maxmem": 17179869184,
        "name": "devvm",
        "pid": pid,
        "running-machine": "pc-i440fx-8.1+pve0",
        "running-qemu": "8.2.2",
        "status": "running",
        "uptime": int(time.time() - float(vm.get("booted_at") or time.time())),
        "vmid": paths.vmid,
    }
    # Like Proxmox, a QMP that does not answer leaves qmpstatus out and status says running.
    try:
        reply = qmp_command(paths, "query-status", None, float(paths.faults()["qmp_timeout_s"]))
        info["qmpstatus"] = reply["return"]["status"]
    except (QmpTimeout, KeyError, TypeError):
        pass
    return "".join(f"{k}: {info[k]}\n" for k in sorted(info))


def cmd_start(paths: SimPaths, opts: dict[str, str]) -> str:
    if paths.kvm_pid() is not None:
        raise QmError(f"VM {paths.vmid} already running")
    start_kvm(paths)
    return ""


def start_kvm(paths: SimPaths) -> int:
    """Start the kvm process through SimPve's supervisor (which reaps it, as systemd would), or
    directly when no supervisor is listening. Returns its PID."""
    with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20.0)
            sock.connect(str(paths.hv_socket))
            sock.sendall(b"start\n")
            try:
                reply = _LineReader(sock, time.monotonic() + 20.0).read_json()
            except QmpTimeout as exc:
                raise QmError(f"start failed: the sim supervisor did not answer ({exc})") from None
        if not reply.get("ok"):
            raise QmError(f"start failed: {reply.get('error')}")
        return int(reply["pid"])
    proc = spawn_kvm(paths)
    try:
        return wait_for_kvm(paths, proc)
    except RuntimeError as exc:
        raise QmError(f"start failed: {exc}") from None


def cmd_stop(paths: SimPaths, opts: dict[str, str]) -> str:
    pid = paths.kvm_pid()
    if pid is None:
        paths.mark_stopped(None)
        return ""
    if paths.faults()["stuck_on_stop"]:
        # The D-state case: kvm will not die, and qm still reports success.
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        return ""
    timeout = min(float(opts.get("timeout", 10)), 10.0)
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 5.0):
            raise QmError(f"VM {paths.vmid} stop failed - got timeout")
    paths.mark_stopped(pid)
    return ""


def cmd_shutdown(paths: SimPaths, opts: dict[str, str]) -> str:
    pid = paths.kvm_pid()
    if pid is None:
        return ""
    timeout = min(float(opts.get("timeout", 10)), 10.0)
    _qmp_or_fail(paths, "system_powerdown")
    if not _wait_gone(pid, timeout):
        raise QmError("VM quit/powerdown failed - got timeout")
    paths.mark_stopped(pid)
    return ""


def _needs_running(paths: SimPaths) -> None:
    if paths.kvm_pid() is None:
        raise QmError(f"VM {paths.vmid} not running")


def cmd_reset(paths: SimPaths, opts: dict[str, str]) -> str:
    _needs_running(paths)
    _qmp_or_fail(paths, "system_reset")
    return ""


def cmd_resume(paths: SimPaths, opts: dict[str, str]) -> str:
    _needs_running(paths)
    _qmp_or_fail(paths, "cont")
    return ""


def cmd_config(paths: SimPaths, opts: dict[str, str]) -> str:
    return QM_CONFIG.format(vmid=paths.vmid)


COMMANDS = {
    "status": (cmd_status, {"verbose": False}),
    "start": (cmd_start, {"skiplock": True, "timeout": True}),
    "stop": (cmd_stop, {"timeout": True, "skiplock": True, "keepActive": True}),
    "shutdown": (cmd_shutdown, {"timeout": True, "forceStop": True, "skiplock": True}),
    "reset": (cmd_reset, {"skiplock": True}),
    "resume": (cmd_resume, {"skiplock": True, "nocheck": True}),
    "config": (cmd_config, {"current": False, "snapshot": True}),
}


def run(argv: list[str], paths: SimPaths) -> int:
    """Run one qm call: log it, honour hang faults, dispatch. Returns the exit code."""
    paths.log_call("qm " + shlex.join(argv))
    if not argv or argv[0] not in COMMANDS:
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
    if not argv[1].isdigit() or int(argv[1]) != paths.vmid:
        sys.stderr.write(
            f"Configuration file 'nodes/pve/qemu-server/{argv[1]}.conf' does not exist\n"
        )
        return EXIT_NO_CONFIG
    func, known = COMMANDS[sub]
    try:
        out = func(paths, _options(argv[2:], known))
    except QmError as exc:
        sys.stderr.write(f"{exc}\n")
        return exc.code
    sys.stdout.write(out)
    return 0


def main() -> None:
    """Entry point: ``python -m breakglass_tui.lab.sim_qm <args>``."""
    root = os.environ.get(ENV_ROOT)
    if not root:
        sys.stderr.write(f"sim qm: {ENV_ROOT} is not set: run it through SimPve's bin/qm\n")
        sys.exit(EXIT_ERROR)
    sys.exit(run(sys.argv[1:], SimPaths(Path(root))))


if __name__ == "__main__":
    main()
