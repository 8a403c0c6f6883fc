"""A ``qm`` stand-in for the real-guest lab: it manages a REAL ``qemu-system-x86_64`` process.

Run through a ``#!/bin/sh`` wrapper (``<root>/bin/qm``, written by :func:`write_qm_wrapper`) that
sets ``BREAKGLASS_GUEST_PVE_DIR=<root>``; the VM's configuration is ``<root>/vm.json``, written by
the lab (:func:`write_vm_config`). QEMU runs daemonized with the pid file
``<qemu_run_dir>/<vmid>.pid`` and the QMP socket ``<qemu_run_dir>/<vmid>.qmp``, as Proxmox's kvm
does, so the real ``breakglass-verb`` reads a real ``/proc/<pid>``, real QMP and a real
``screendump`` of the guest.

Subcommands, output and exit codes follow Proxmox's ``qm``: ``qm status <vmid> [--verbose]``
(``status: running``), ``qm start``, ``qm stop [--timeout N]`` (QMP ``quit``, then SIGTERM, then
SIGKILL by the pid file's PID, and it checks the process is gone), ``qm shutdown`` (ACPI
powerdown), ``qm reset`` (QMP ``system_reset``: a VM paused by an I/O error stays paused, like
Proxmox), ``qm resume`` (QMP ``cont``), ``qm suspend`` (QMP ``stop``), ``qm config``. Failures
print one line on stderr and exit 255; an unknown VM exits 2.

Standard library only: it runs under ``python -S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_ERROR = 255  # what Proxmox's CLI exits with on a failed command
EXIT_USAGE = 2
QM_MODULE = "breakglass_tui.lab.guest.qm"
SOURCE_ROOT = str(Path(__file__).resolve().parents[3])
QMP_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0

# The blkdebug rules of the io-stall scenario's data disk: the first write fails with EIO (QEMU,
# werror=stop, pauses the VM with io-status "failed"); the same event moves blkdebug to state 2
# where nothing fails, so `cont` (resume) retries the write and it succeeds: a transient storage
# fault. `once` matters: an error rule left active would fail every later request.
BLKDEBUG_CONF = """\
[inject-error]
event = "write_aio"
errno = "5"
state = "1"
once = "on"

[set-state]
event = "write_aio"
state = "1"
new_state = "2"
"""


class QmError(Exception):
    """A failed qm command: the message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class GuestPaths:
    """Where one lab PVE host keeps its files (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.vm_json = self.root / "vm.json"
        self.calls_log = self.root / "calls.log"
        self.pids_file = self.root / "qemu-pids"
        self.faults_json = self.root / "faults.json"

    def config(self) -> dict[str, Any]:
        return json.loads(self.vm_json.read_text())

    @property
    def vmid(self) -> int:
        return int(self.config()["vmid"])

    @property
    def run_dir(self) -> Path:
        return Path(self.config()["qemu_run_dir"])

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.vmid}.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / f"{self.vmid}.qmp"

    def log_call(self, text: str) -> None:
        # O_APPEND: concurrent qm calls (the verb and the lab) each write whole lines.
        with self.calls_log.open("a") as f:
            f.write(f"{time.time():.6f} {text}\n")

    def read_calls(self) -> list[tuple[float, str]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.calls_log.read_text().splitlines():
                stamp, _, text = line.partition(" ")
                out.append((float(stamp), text))
        return out

    def faults(self) -> dict[str, Any]:
        try:
            return json.loads(self.faults_json.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def kvm_pid(self) -> int | None:
        """The live QEMU process from the pid file, or None (no file, dead, zombie)."""
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if pid_alive(pid) else None

    def started_pids(self) -> list[int]:
        """Every QEMU PID a `qm start` of this root recorded."""
        pids = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.pids_file.read_text().splitlines():
                if line.strip().isdigit():
                    pids.append(int(line))
        return pids


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie is not: it has exited, only unreaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return False
    state = raw[raw.rfind(")") + 2 :][:1]
    return state not in ("Z", "X", "")


def is_lab_qemu(pid: int, root: Path) -> bool:
    """Whether pid is a QEMU process started for this lab root (its cmdline names the root's
    run dir): the lab kills only those."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not cmdline or b"qemu-system" not in cmdline[0]:
        return False
    paths = GuestPaths(root)
    return any(str(paths.qmp_socket).encode() in arg for arg in cmdline)


# -- QMP -----------------------------------------------------------------------------------------
class QmpClient:
    """One QMP connection (QEMU serves one client at a time), every read bounded by a deadline."""

    def __init__(self, path: Path, timeout_s: float = QMP_TIMEOUT_S) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        try:
            self._timeout()
            self.sock.connect(str(path))
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmError(f"unexpected QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _timeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("got timeout")
        self.sock.settimeout(left)

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self._timeout()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and return its reply (events in between are skipped)."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._timeout()
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qmp(
    paths: GuestPaths,
    command: str,
    arguments: dict[str, Any] | None = None,
    timeout_s: float = QMP_TIMEOUT_S,
) -> Any:
    """Run one QMP command on the VM; QmError (Proxmox's wording) when it fails or times out."""
    try:
        with QmpClient(paths.qmp_socket, timeout_s) as client:
            reply = client.execute(command, arguments)
    except (OSError, ValueError) as exc:
        raise QmError(f"VM {paths.vmid} qmp command '{command}' failed - {exc}") from None
    if "error" in reply:
        desc = reply["error"].get("desc", "")
        raise QmError(f"VM {paths.vmid} qmp command '{command}' failed - {desc}")
    return reply.get("return")


# -- starting QEMU -------------------------------------------------------------------------------
def kvm_usable() -> bool:
    """Whether /dev/kvm can be opened (else QEMU runs with TCG, much slower)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_argv(paths: GuestPaths, *, io_fault: bool) -> list[str]:
    """The QEMU command line for the VM in vm.json (io_fault: the data disk behind blkdebug)."""
    cfg = paths.config()
    root = paths.root
    port = int(cfg["ssh_port"])
    drive = "if=none,id=d0,format=raw,werror=stop,rerror=stop,"
    if io_fault:
        conf = root / "blkdebug.conf"
        conf.write_text(BLKDEBUG_CONF)
        drive += (
            f"file.driver=blkdebug,file.config={conf},"
            f"file.image.driver=file,file.image.filename={cfg['data_disk']}"
        )
    else:
        drive += f"file={cfg['data_disk']}"
    return [
        cfg["qemu"],
        "-name",
        str(cfg.get("name", "devvm")),
        "-machine",
        "pc",
        "-accel",
        "kvm" if cfg.get("accel") == "kvm" and kvm_usable() else "tcg",
        "-m",
        str(cfg.get("memory_mb", 256)),
        "-smp",
        "1",
        "-display",
        "none",
        "-vga",
        "std",
        "-kernel",
        cfg["kernel"],
        "-initrd",
        cfg["initrd"],
        "-append",
        cfg["append"],
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-drive",
        drive,
        "-device",
        "virtio-blk-pci,drive=d0,serial=devvm-data",
        "-chardev",
        f"file,id=ser0,path={root / 'console.log'},append=on",
        "-serial",
        "chardev:ser0",
        "-qmp",
        f"unix:{paths.qmp_socket},server=on,wait=off",
        "-pidfile",
        str(paths.pid_file),
        "-daemonize",
    ]


def start_qemu(paths: GuestPaths) -> int:
    """Start the VM's QEMU, daemonized; wait for its pid file and QMP; return its PID.

    The io fault (io-stall) is armed once, at the next start: a cycle boots on healthy storage,
    as after a transient fault on the host."""
    faults = paths.faults()
    io_fault = bool(faults.get("io_error_once"))
    if io_fault:
        faults["io_error_once"] = False
        write_json_atomic(paths.faults_json, faults)
    with contextlib.suppress(FileNotFoundError):
        paths.pid_file.unlink()
    argv = qemu_argv(paths, io_fault=io_fault)
    with (paths.root / "qemu.log").open("ab") as log:
        log.write(f"{time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            # stdio to the log file, never to our caller's pipes: the daemon would hold them open
            # and the verb reading qm's output would wait for its deadline.
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=START_TIMEOUT_S,
                env={"PATH": "/usr/bin:/bin", "LANG": "C"},
            )
        except FileNotFoundError:
            raise QmError(
                f"start failed: {argv[0]} is missing (apt-get install qemu-system-x86)"
            ) from None
        except subprocess.TimeoutExpired:
            raise QmError(
                f"start failed: QEMU did not daemonize within {START_TIMEOUT_S:g} s"
            ) from None
    if done.returncode != 0:
        tail = (paths.root / "qemu.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise QmError(f"start failed: QEMU exited with code {done.returncode}: {' '.join(tail)}")
    pid = paths.kvm_pid()
    if pid is None:
        raise QmError("start failed: QEMU daemonized but its pid file names no live process")
    with paths.pids_file.open("a") as f:
        f.write(f"{pid}\n")
    # QMP listens before -daemonize returns; a query proves it.
    qmp(paths, "query-status")
    return pid


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def stop_qemu(paths: GuestPaths, timeout_s: float = 10.0) -> None:
    """QMP quit, then SIGTERM, then SIGKILL by the pid file's PID; QmError if it survives."""
    pid = paths.kvm_pid()
    if pid is None:
        return
    with contextlib.suppress(QmError):
        qmp(paths, "quit", timeout_s=min(3.0, timeout_s))
    if _wait_gone(pid, min(3.0, timeout_s)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, 5.0):
        raise QmError(f"VM {paths.vmid} stop failed - got timeout")


# -- the subcommands -----------------------------------------------------------------------------
def _options(args: list[str], known: dict[str, bool]) -> dict[str, str]:
    """Parse ``--name value`` / ``--flag`` options (known: name -> takes a value)."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.lstrip("-")
        if not arg.startswith("-") or name not in known:
            raise QmError(f"Unknown option: {name}\n400 unable to parse option", EXIT_USAGE)
        if known[name]:
            if i + 1 >= len(args):
                raise QmError(f"400 Parameter verification failed.\n{name}: missing value")
            opts[name] = args[i + 1]
            i += 2
        else:
            opts[name] = "1"
            i += 1
    return opts


def _needs_running(paths: GuestPaths) -> int:
    pid = paths.kvm_pid()
    if pid is None:
        raise QmError(f"VM {paths.vmid} not running")
    return pid


def _uptime_s(pid: int) -> int:
    """Seconds since the process started (/proc/<pid>/stat starttime and the system uptime)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        start_ticks = int(raw[raw.rfind(")") + 2 :].split()[19])
        system_up = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, int(system_up - start_ticks / os.sysconf("SC_CLK_TCK")))


def cmd_status(paths: GuestPaths, opts: dict[str, str]) -> str:
    pid = paths.kvm_pid()
    if pid is None:
        return "status: stopped\n"
    if "verbose" not in opts:
        return "status: running\n"
    cfg = paths.config()
    info: dict[str, Any] = {
        "cpus": 1,
        "maxmem": int(cfg.get("memory_mb", 256)) * 1024 * 1024,
        "name": cfg.get("name", "devvm"),
        "pid": pid,
        "running-machine": "pc",
        "running-qemu": "7.2",
        "status": "running",
        "uptime": _uptime_s(pid),
        "vmid": paths.vmid,
    }
    # Like Proxmox, a QMP that does not answer leaves qmpstatus out and status says running.
    with contextlib.suppress(QmError):
        info["qmpstatus"] = qmp(paths, "query-status")["status"]
    return "".join(f"{k}: {info[k]}\n" for k in sorted(info))


def cmd_start(paths: GuestPaths, opts: dict[str, str]) -> str:
    if paths.kvm_pid() is not None:
        raise QmError(f"VM {paths.vmid} already running")
    start_qemu(paths)
    return ""


def cmd_stop(paths: GuestPaths, opts: dict[str, str]) -> str:
    stop_qemu(paths, float(opts.get("timeout", 10)))
    return ""


def cmd_shutdown(paths: GuestPaths, opts: dict[str, str]) -> str:
    pid = paths.kvm_pid()
    if pid is None:
        return ""
    qmp(paths, "system_powerdown")
    if not _wait_gone(pid, float(opts.get("timeout", 60))):
        if opts.get("forceStop") in ("1", "true"):
            stop_qemu(paths)
            return ""
        raise QmError("VM quit/powerdown failed - got timeout")
    return ""


def cmd_reset(paths: GuestPaths, opts: dict[str, str]) -> str:
    _needs_running(paths)
    qmp(paths, "system_reset")
    return ""


def cmd_resume(paths: GuestPaths, opts: dict[str, str]) -> str:
    _needs_running(paths)
    qmp(paths, "cont")
    return ""


def cmd_suspend(paths: GuestPaths, opts: dict[str, str]) -> str:
    _needs_running(paths)
    qmp(paths, "stop")
    return ""


def cmd_config(paths: GuestPaths, opts: dict[str, str]) -> str:
    cfg = paths.config()
    lines = {
        "boot": "order=virtio0",
        "cores": "1",
        "kvm": "1" if cfg.get("accel") == "kvm" else "0",
        "memory": str(cfg.get("memory_mb", 256)),
        "name": str(cfg.get("name", "devvm")),
        "net0": "virtio,bridge=vmbr0,firewall=1",
        "ostype": "l26",
        "serial0": "socket",
        "virtio0": f"local:{paths.vmid}/vm-{paths.vmid}-disk-0.raw,werror=stop,rerror=stop",
        "vmgenid": "00000000-0000-4000-8000-000000000102",
    }
    return "".join(f"{k}: {v}\n" for k, v in sorted(lines.items()))


COMMANDS = {
    "status": (cmd_status, {"verbose": False}),
    "start": (cmd_start, {"skiplock": False, "timeout": True}),
    "stop": (cmd_stop, {"timeout": True, "skiplock": False, "keepActive": False}),
    "shutdown": (cmd_shutdown, {"timeout": True, "forceStop": True, "skiplock": False}),
    "reset": (cmd_reset, {"skiplock": False}),
    "resume": (cmd_resume, {"skiplock": False, "nocheck": False}),
    "suspend": (cmd_suspend, {"skiplock": False}),
    "config": (cmd_config, {"current": False, "snapshot": True}),
}


def run(argv: list[str], paths: GuestPaths) -> int:
    """Run one qm call: log it, dispatch, print like Proxmox. Returns the exit code."""
    paths.log_call("qm " + " ".join(argv))
    if len(argv) < 2 or argv[0] not in COMMANDS:
        print(
            "400 unable to parse command\nqm <status|start|stop|shutdown|reset|resume|suspend|"
            "config> <vmid> [OPTIONS]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    sub, vmid, rest = argv[0], argv[1], argv[2:]
    func, known = COMMANDS[sub]
    try:
        if not vmid.isdigit() or int(vmid) != paths.vmid:
            raise QmError(
                f"Configuration file 'nodes/pve/qemu-server/{vmid}.conf' does not exist", EXIT_USAGE
            )
        out = func(paths, _options(rest, known))
    except QmError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    sys.stdout.write(out)
    return 0


def write_qm_wrapper(root: Path) -> Path:
    """Write ``<root>/bin/qm``, the #!/bin/sh wrapper the verb's config names. Returns its path."""
    qm = Path(root) / "bin" / "qm"
    qm.parent.mkdir(parents=True, exist_ok=True)
    qm.write_text(
        "#!/bin/sh\n"
        "# qm for the real-guest lab (breakglass_tui.lab.guest.qm): manages a real QEMU.\n"
        f"BREAKGLASS_GUEST_PVE_DIR={shlex.quote(str(root))}\n"
        f"PYTHONPATH={shlex.quote(SOURCE_ROOT)}\n"
        "export BREAKGLASS_GUEST_PVE_DIR PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -S -m {QM_MODULE} "$@"\n'
    )
    qm.chmod(0o755)
    return qm


def main() -> None:
    root = os.environ.get("BREAKGLASS_GUEST_PVE_DIR")
    if not root:
        print(
            "qm: BREAKGLASS_GUEST_PVE_DIR is not set (run me through <root>/bin/qm)",
            file=sys.stderr,
        )
        sys.exit(EXIT_ERROR)
    sys.exit(run(sys.argv[1:], GuestPaths(Path(root))))


if __name__ == "__main__":
    main()
