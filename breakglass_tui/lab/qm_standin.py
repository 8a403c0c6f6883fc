"""What the two ``qm`` stand-ins share: the simulated one (:mod:`breakglass_tui.lab.sim_qm`, a
simulated kvm) and the real-guest one (:mod:`breakglass_tui.lab.guest.qm`, a real QEMU).

Both play Proxmox's ``qm`` for the real ``breakglass-verb``. What real ``qm`` does is taken from
Proxmox's own source, and where this file and that source disagree, this file is the bug:

- ``qm status [--verbose]`` (``PVE/CLI/qm.pm`` ``status``; ``PVE/QemuServer.pm`` ``vmstatus``):
  ``status`` is ``running`` when the pid file names a live process whose command line carries
  ``-pidfile <that file>`` (``PVE/QemuServer/Helpers.pm`` ``vm_running_locally``). QMP is asked
  on one connection with a 3 s budget (``PVE/QMPClient.pm`` ``queue_execute``); when it does not
  answer, ``qmpstatus`` is silently set to ``status`` (``running``) and only ``running-qemu``,
  ``running-machine`` and ``blockstat`` are missing. Without ``--verbose`` it prints
  ``status: <qmpstatus>``. ``lock: <name>`` is printed when the config holds one.
- QMP connections (``PVE/QMPClient.pm`` ``open_connection``): a non-blocking connect, retried every
  100 ms while it fails with EAGAIN (QEMU's listen queue is full), until the command's timeout:
  ``unable to connect to VM 102 qmp socket - timeout after N retries``; any other error at once.
  Errors read ``VM 102 qmp command 'system_reset' failed - got timeout``.
- Mutating subcommands run in a task worker (``PVE/RESTEnvironment.pm`` ``fork_worker``, in
  pve-common): forked, ``setsid()``, its command line ``task UPID:…``, listed in
  ``/var/log/pve/tasks/active``, its output passed through this parent to stdout; ``TASK ERROR:
  <msg>`` ends as ``<msg>`` on stderr and exit 255. The worker dies on its next write when the
  parent is gone (SIGPIPE), and the parent's SIGTERM/SIGINT kill the worker's group.
- Config lock (``PVE/AbstractConfig.pm`` in pve-guest-common, ``lock_config``/``check_lock``):
  flock ``lock-<vmid>.conf`` for up to 10 s (``trying to acquire lock...`` on the task's output,
  then ``can't lock file '…/lock-102.conf' - got timeout``); a ``lock:`` in the VM's config fails
  the task with ``VM is locked (backup)`` unless ``--skiplock``.
- HA (``PVE/API2/Qemu.pm`` ``vm_start``/``vm_stop``): for a VM in ``/etc/pve/ha/resources.cfg``
  (state not ``ignored``), ``start`` and ``stop`` only request it of the HA stack (``Requesting HA
  start for VM 102``) and return at once; ``reset`` is not redirected.
- Quorum (``PVE/Cluster.pm`` ``check_cfs_quorum``, in pve-cluster): ``start`` checks that
  ``/etc/pve/local`` is writable (lstat, mode & 0200) and fails with ``cluster not ready - no
  quorum?``; ``stop`` and ``reset`` do not check.
- Stop (``PVE/QemuServer.pm`` ``_do_vm_stop``/``vm_stop_cleanup``): QMP ``quit`` (60 s), wait
  ``--timeout`` (60 s) for the process to go, else SIGTERM (``VM still running - terminating now
  with SIGTERM``), 10 s, SIGKILL, 1 s, then the clean-up unlinks the pid file and the sockets —
  whether or not the process died (a kvm in D state survives SIGKILL), and the task says OK.

Timings are faults (``FAULT_DEFAULTS``) so tests can shrink them. The verb's own QMP client stays
apart on purpose: the stand-ins are the verb's test bench, and a bench that shared the verb's code
could not catch its mistakes.

Standard library only, and nothing heavy: each stand-in imports this under ``python -S`` once per
qm call.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

EXIT_ERROR = 255  # what Proxmox's CLI exits with on a failed command
EXIT_NO_CONFIG = 2  # qm on a VM id that has no config
# The directory that holds the breakglass_tui package: the stand-ins run with it on PYTHONPATH
# and with -S, so they do not pay for site-packages they never use.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
NODE = "pve"  # the node name in UPIDs and in nodes/<node>/ under the stand-in's /etc/pve
TASK_ARG = "__task__"  # argv[1] of a task worker (see run_task)
TASK_FD = 3  # the worker's control pipe: "TASK OK" / "TASK ERROR: <msg>"

# Proxmox's timings (see the module docstring), as faults: tests shrink them.
FAULT_DEFAULTS: dict[str, Any] = {
    "qmp_timeout_s": 5.0,  # QMPClient.pm cmd(): the default per command
    "status_qmp_timeout_s": 3.0,  # vmstatus: queue_execute's default
    "quit_timeout_s": 60.0,  # QMPClient.pm cmd(): 'quit' (qemu-server 9.2)
    "stop_wait_s": 60.0,  # _do_vm_stop: default --timeout after quit
    "sigterm_wait_s": 10.0,  # _do_vm_stop: after SIGTERM, before SIGKILL
    "config_lock_wait_s": 10.0,  # AbstractConfig lock_config
    "ha_delay_s": 10.0,  # how long the HA stack takes to act on a request (CRM/LRM loop)
    "scope_wait_s": 20.0,  # vm_start_nolock: wait_for_unit_removed("<vmid>.scope", 20)
}


class QmError(Exception):
    """A failed qm command: the message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- files ---------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to path so a concurrent reader sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_line(path: Path, line: str) -> None:
    """Append one line in one O_APPEND write, so processes sharing the file never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_pid_file(path: Path) -> int | None:
    """The PID a pid file names, or None (no file, or not a number)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, start time in ticks) of a process, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie is not: it has exited, only unreaped)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait up to timeout_s for pid to die; whether it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def check_running(pid_file: Path) -> int | None:
    """Proxmox's ``vm_running_locally``: the pid file's PID if that process is alive and is a kvm
    started with ``-pidfile <pid_file>`` (argv[0] ends in ``kvm`` or is ``qemu-*``), else None.
    A pid file alone is not liveness: a reused PID is some other program."""
    pid = read_pid_file(pid_file)
    if pid is None or pid <= 1:
        return None
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not args or not re.search(rb"(kvm$|(^|/)qemu-[^/]+$)", args[0]):
        return None
    for i, arg in enumerate(args[:-1]):
        if arg.lstrip(b"-") == b"pidfile" and arg.startswith(b"-"):
            if args[i + 1] == str(pid_file).encode() and pid_alive(pid):
                return pid
            return None
    return None


# -- /etc/pve: the VM's config, HA and quorum -----------------------------------------------------
class StandinRoot:
    """The files of one stand-in PVE host under ``root``: the call log (``calls.log``), the
    faults (``faults.json``), its ``/etc/pve`` (``etc-pve/``: the VM's config with its ``lock:``,
    ``ha/resources.cfg``, ``local`` for quorum), ``/var/lock/qemu-server`` (``lock/``),
    ``/var/log/pve/tasks`` (``pve-log/tasks/``), the VM's cgroup scope
    (``cgroup/qemu.slice/<vmid>.scope/cgroup.procs``) and the pid file and QMP socket in the
    qemu run dir.

    A stand-in names its VM (``vmid``), where its files are (``pid_file``, ``qmp_socket``), which
    process is its VM's (:meth:`kvm_pid`), how it starts one (:meth:`start_vm`) and whether
    SIGKILL ends it (:meth:`kvm_survives_kill`)."""

    FAULT_DEFAULTS: Mapping[str, Any] = FAULT_DEFAULTS
    QMP_STATUS_QUEUE: tuple[str, ...] = ("query-blockstats", "query-machines", "query-version")
    vmid: int
    pid_file: Path
    qmp_socket: Path

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.calls_log = self.root / "calls.log"
        self.faults_json = self.root / "faults.json"
        self.pve_dir = self.root / "etc-pve"
        self.lock_dir = self.root / "lock"
        self.tasks_dir = self.root / "pve-log" / "tasks"
        self.cgroup_dir = self.root / "cgroup"

    # -- the call log and faults ------------------------------------------------------------------
    def log_call(self, text: str) -> None:
        """Append one call with its time (concurrent qm calls and QMP servers share the log)."""
        append_line(self.calls_log, f"{time.time():.6f} {json.dumps(text)}")

    def read_calls(self) -> list[tuple[float, str]]:
        """Every logged call, in order, as (time.time(), text)."""
        calls = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.calls_log.read_text().splitlines():
                stamp, _, text = line.partition(" ")
                calls.append((float(stamp), json.loads(text)))
        return calls

    def faults(self) -> dict[str, Any]:
        """The current faults, defaults filled in. A missing or torn file means no faults."""
        faults = dict(FAULT_DEFAULTS)
        faults.update(self.FAULT_DEFAULTS)
        with contextlib.suppress(FileNotFoundError, ValueError):
            faults.update(json.loads(self.faults_json.read_text()))
        return faults

    def qmp_timeout_s(self) -> float:
        """How long a qm call waits for a QMP command (Proxmox: 5 s)."""
        return float(self.faults()["qmp_timeout_s"])

    # -- the VM's process -------------------------------------------------------------------------
    def pid_from_file(self) -> int | None:
        return read_pid_file(self.pid_file)

    def kvm_pid(self) -> int | None:
        """The PID of the VM's live process per Proxmox's check_running, or None."""
        return check_running(self.pid_file)

    @property
    def scope_dir(self) -> Path:
        return self.cgroup_dir / "qemu.slice" / f"{self.vmid}.scope"

    def scope_add(self, pid: int) -> None:
        """Put pid in the VM's scope (systemd does this for Proxmox's kvm)."""
        self.scope_dir.mkdir(parents=True, exist_ok=True)
        append_line(self.scope_dir / "cgroup.procs", str(pid))

    def scope_live_pids(self) -> list[int]:
        """The live processes in the VM's scope."""
        with contextlib.suppress(FileNotFoundError):
            pids = (self.scope_dir / "cgroup.procs").read_text().split()
            return [int(p) for p in pids if p.isdigit() and pid_alive(int(p))]
        return []

    def scope_remove(self, pid: int) -> None:
        """Take a process that died out of the scope (the kernel does this for a real cgroup)."""
        procs = self.scope_dir / "cgroup.procs"
        with contextlib.suppress(FileNotFoundError):
            keep = [p for p in procs.read_text().split() if p != str(pid)]
            write_text_atomic(procs, "".join(f"{p}\n" for p in keep))

    def start_vm(self) -> int:
        """Start the VM's kvm process; its PID (QmError when it cannot)."""
        raise NotImplementedError

    def owns_process(self, pid: int) -> bool:
        """Whether pid was started for this stand-in (the only processes it may signal)."""
        return False

    def kvm_survives_kill(self, pid: int) -> bool:
        """Whether SIGKILL would leave this kvm alive (a process in D state)."""
        return False

    def vm_details(self, pid: int) -> dict[str, Any]:
        """``vmstatus``'s fields of a running VM that need no QMP (pid, uptime, cpus, ...)."""
        return {"pid": pid}

    def stop_cleanup(self) -> None:
        """``vm_stop_cleanup``: unlink the pid file and the sockets, whatever the process did."""
        run_dir = self.pid_file.parent
        for ext in ("mon", "qmp", "pid", "vnc", "qga"):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / f"{self.vmid}.{ext}").unlink()

    # -- /etc/pve ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.pve_dir / "qemu-server" / f"{self.vmid}.conf"

    def config_text(self) -> str:
        try:
            return self.config_path.read_text()
        except FileNotFoundError:
            raise QmError(
                f"Configuration file 'nodes/{NODE}/qemu-server/{self.vmid}.conf' does not exist",
                EXIT_NO_CONFIG,
            ) from None

    def config_lock(self) -> str | None:
        """The ``lock:`` of the VM's config (current section only), or None."""
        for line in self.config_text().splitlines():
            if line.startswith("["):
                break  # a snapshot section
            m = re.fullmatch(r"lock:\s*(\S+)\s*", line)
            if m:
                return m.group(1)
        return None

    def set_config_lock(self, lock: str | None) -> None:
        """Write or remove the ``lock:`` line of the VM's config (what vzdump, migrate, snapshot
        do through ``set_lock``)."""
        lines = [ln for ln in self.config_text().splitlines() if not ln.startswith("lock:")]
        if lock:
            lines.insert(0, f"lock: {lock}")
        write_text_atomic(self.config_path, "\n".join(lines) + "\n")

    def ha_resource(self) -> dict[str, str] | None:
        """The VM's section of ``ha/resources.cfg`` when it is HA-managed (state not
        ``ignored``, per ``PVE/HA/Config.pm``), else None."""
        try:
            text = (self.pve_dir / "ha" / "resources.cfg").read_text()
        except FileNotFoundError:
            return None
        section: dict[str, str] | None = None
        for line in text.splitlines():
            head = re.fullmatch(r"(\S+):\s*(\S+)\s*", line)
            if head:
                if section is not None:
                    break
                if head.group(1).lower() in ("vm", "ct") and head.group(2) == str(self.vmid):
                    section = {}
                continue
            prop = re.fullmatch(r"\s+(\S+)\s+(.*?)\s*", line)
            if section is not None and prop:
                section[prop.group(1)] = prop.group(2)
        if section is None or section.get("state") == "ignored":
            return None
        return section

    def set_ha_state(self, state: str | None) -> None:
        """Make the VM HA-managed with the requested `state` (None: not HA-managed)."""
        path = self.pve_dir / "ha" / "resources.cfg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if state is None:
            path.unlink(missing_ok=True)
        else:
            write_text_atomic(path, f"vm: {self.vmid}\n\tstate {state}\n")

    def quorate(self) -> bool:
        """``check_cfs_quorum``: lstat ``/etc/pve/local``, quorate if its mode has 0200."""
        try:
            return bool(os.lstat(self.pve_dir / "local").st_mode & 0o200)
        except OSError:
            return False

    # -- /var/lock/qemu-server --------------------------------------------------------------------
    @property
    def config_lock_file(self) -> Path:
        return self.lock_dir / f"lock-{self.vmid}.conf"

    @contextlib.contextmanager
    def lock_config(self) -> Iterator[None]:
        """``lock_config``: flock lock-<vmid>.conf, waiting up to config_lock_wait_s."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with open(self.config_lock_file, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("trying to acquire lock...", flush=True)
                deadline = time.monotonic() + float(self.faults()["config_lock_wait_s"])
                while True:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise QmError(
                                f"can't lock file '{self.config_lock_file}' - got timeout"
                            ) from None
                        time.sleep(0.05)
                print(" OK", flush=True)
            yield

    def check_lock(self) -> None:
        """``check_lock``: a ``lock:`` in the config fails the task."""
        lock = self.config_lock()
        if lock:
            raise QmError(f"VM is locked ({lock})")

    # -- /var/log/pve/tasks/active ----------------------------------------------------------------
    def task_started(self, upid: str) -> None:
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        with open(self.tasks_dir / ".active.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            active = self.tasks_dir / "active"
            text = active.read_text() if active.exists() else ""
            write_text_atomic(active, text + f"{upid} 0\n")

    def task_ended(self, upid: str, status: str) -> None:
        with open(self.tasks_dir / ".active.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            active = self.tasks_dir / "active"
            lines = active.read_text().splitlines() if active.exists() else []
            end = f"{upid} 1 {int(time.time()):08X} {status}"
            write_text_atomic(
                active, "".join(f"{end if ln.split()[0] == upid else ln}\n" for ln in lines)
            )


# -- QMP -----------------------------------------------------------------------------------------
class QmpFailed(Exception):
    """QMP did not answer (no socket, no reply in time, the connection closed): the text is what
    Proxmox prints after "failed - "."""


class LineReader:
    """JSON lines from a socket, every read bounded by one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def remaining(self) -> float:
        """Set the socket's timeout to what is left of the deadline (QmpFailed when nothing)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise QmpFailed("got timeout")
        self.sock.settimeout(left)
        return left

    def read_json(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self.remaining()
            try:
                data = self.sock.recv(65536)
            except OSError:  # TimeoutError included
                raise QmpFailed("got timeout") from None
            if not data:
                raise QmpFailed("client closed connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError as exc:
            raise QmpFailed(f"bad QMP message ({exc})") from None


def connect_unix(path: Path, timeout_s: float, peer: str) -> socket.socket:
    """Proxmox's ``open_connection``: a non-blocking connect, retried every 100 ms while the
    listen queue is full (EAGAIN) or interrupted, until `timeout_s`; other errors at once."""
    start = time.monotonic()
    count = 0
    while True:
        count += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
            return sock
        except (BlockingIOError, InterruptedError):
            sock.close()
        except OSError as exc:
            sock.close()
            why = exc.strerror or str(exc)
            raise QmpFailed(f"unable to connect to {peer} qmp socket - {why}") from None
        if time.monotonic() - start >= timeout_s:
            raise QmpFailed(
                f"unable to connect to {peer} qmp socket - timeout after {count} retries"
            )
        time.sleep(0.1)


class QmpClient:
    """One QMP connection (QEMU serves one client at a time), negotiated, under one deadline."""

    def __init__(self, path: Path, timeout_s: float, peer: str = "VM") -> None:
        deadline = time.monotonic() + timeout_s
        self.sock = connect_unix(path, timeout_s, peer)
        self.reader = LineReader(self.sock, deadline)
        try:
            greeting = self.reader.read_json()
            if "QMP" not in greeting:
                raise QmpFailed(f"unexpected QMP greeting: {greeting}")
            reply = self.execute("qmp_capabilities")
            if "error" in reply:
                raise QmpFailed(str(reply["error"].get("desc", "")))
        except BaseException:
            self.sock.close()
            raise

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and return its reply, {"return": ...} or {"error": ...} (events in
        between are skipped)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.reader.remaining()
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpFailed(str(exc)) from None
        while True:
            reply = self.reader.read_json()
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qmp(
    host: StandinRoot,
    command: str,
    arguments: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Run one QMP command on the VM and return its "return"; QmError, in Proxmox's words, when
    it fails or times out (timeout_s: the host's qmp_timeout_s unless given)."""
    timeout = host.qmp_timeout_s() if timeout_s is None else timeout_s
    peer = f"VM {host.vmid}"
    try:
        with QmpClient(host.qmp_socket, timeout, peer) as client:
            reply = client.execute(command, arguments)
    except QmpFailed as exc:
        raise QmError(f"{peer} qmp command '{command}' failed - {exc}") from None
    if "error" in reply:
        desc = reply["error"].get("desc", "")
        raise QmError(f"{peer} qmp command '{command}' failed - {desc}")
    return reply.get("return")


# -- the qm command line -------------------------------------------------------------------------
Host = TypeVar("Host", bound=StandinRoot)
Subcommand = Callable[[Host, dict[str, str]], str]


def parse_options(
    args: list[str], known: dict[str, bool], unknown_code: int = EXIT_ERROR
) -> dict[str, str]:
    """Parse ``--name value`` / ``--flag`` options (known: name -> takes a value)."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.lstrip("-")
        if not arg.startswith("-") or name not in known:
            raise QmError(f"Unknown option: {name}\n400 unable to parse option", unknown_code)
        if known[name]:
            if i + 1 >= len(args):
                raise QmError(f"400 Parameter verification failed.\n{name}: missing value")
            opts[name] = args[i + 1]
            i += 2
        else:
            opts[name] = "1"
            i += 1
    return opts


def dispatch(
    host: Host,
    vmid_arg: str,
    func: Subcommand[Host],
    known: dict[str, bool],
    args: list[str],
    unknown_option_code: int = EXIT_ERROR,
) -> int:
    """Run one subcommand for the VM named on the command line: its output on stdout, or its
    error on stderr. Returns the exit code."""
    try:
        if not vmid_arg.isdigit() or int(vmid_arg) != host.vmid:
            raise QmError(
                f"Configuration file 'nodes/{NODE}/qemu-server/{vmid_arg}.conf' does not exist",
                EXIT_NO_CONFIG,
            )
        host.config_text()  # "test if VM exists"
        out = func(host, parse_options(args, known, unknown_option_code))
    except QmError as exc:
        sys.stderr.write(f"{exc}\n")
        return exc.code
    sys.stdout.write(out)
    return 0


def needs_running(host: StandinRoot) -> int:
    """The VM's PID; QmError as Proxmox words it when the VM is not running."""
    pid = host.kvm_pid()
    if pid is None:
        raise QmError(f"VM {host.vmid} not running")
    return pid


def needs_stopped(host: StandinRoot) -> None:
    if host.kvm_pid() is not None:
        raise QmError(f"VM {host.vmid} already running")


def skiplock(opts: dict[str, str]) -> bool:
    return opts.get("skiplock") in ("1", "true", "yes")


# -- task workers (fork_worker in the CLI's sync mode) ---------------------------------------------
def proc_starttime(pid: int) -> int:
    stat = proc_stat(pid)
    return stat[2] if stat else 0


def run_task(host: StandinRoot, module: str, dtype: str, argv: list[str]) -> int:
    """Run the task `argv` (``<sub> <vmid> [options]``) in a worker as Proxmox's ``fork_worker``
    does for the CLI: a forked child that calls ``setsid()``, names itself ``task UPID:…``
    (re-executed as ``python -S -m <module> __task__ <argv>``) and writes its output into a pipe
    this parent copies to stdout. Returns the exit code (0, or 255 after ``TASK ERROR``)."""
    out_r, out_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            os.setsid()
            upid = (
                f"UPID:{NODE}:{os.getpid():08X}:{proc_starttime(os.getpid()):08X}:"
                f"{int(time.time()):08X}:{dtype}:{host.vmid}:root@pam:"
            )
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.dup2(ctl_w, TASK_FD)
            os.dup2(go_r, 4)
            os.write(1, f"{upid}\n".encode())
            argv0 = f"task {upid}"  # Proxmox's worker: $0 = "task $upid"
            os.execv(sys.executable, [argv0, "-S", "-m", module, TASK_ARG, dtype, *argv])  # noqa: S606
        finally:
            os._exit(1)
    for fd in (out_w, ctl_w, go_r):
        os.close(fd)

    def kill_worker(signum: int, frame: object) -> None:
        # tee_worker: a signal to qm is passed to the worker's whole group.
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, kill_worker)
    reader = os.fdopen(out_r, "rb", buffering=0)
    first = b""
    while not first.endswith(b"\n"):
        chunk = reader.read(1)
        if not chunk:
            break
        first += chunk
    upid = first.decode().strip()
    if upid.startswith("UPID:"):
        host.task_started(upid)
    os.write(go_w, b"OK")
    os.close(go_w)
    while True:
        data = reader.read(4096)
        if not data:
            break
        try:
            os.write(1, data)
        except BrokenPipeError:
            # tee_worker: "broken pipe" kills the worker's group (TERM).
            kill_worker(signal.SIGPIPE, None)
            break
    reader.close()
    with os.fdopen(ctl_r, "rb") as ctl:
        control = ctl.read().decode(errors="replace")
    os.waitpid(pid, 0)
    if control.startswith("TASK OK"):
        status, code = "OK", 0
    else:
        msg = control.removeprefix("TASK ERROR: ").strip() or "received interrupt"
        sys.stderr.write(f"{msg}\n")
        status, code = msg, EXIT_ERROR
    if upid.startswith("UPID:"):
        with contextlib.suppress(OSError):
            host.task_ended(upid, status)
    return code


def task_worker(host: Host, commands: Mapping[str, Any], argv: list[str]) -> NoReturn:
    """The worker side of run_task: ``<dtype> <sub> <vmid> [options]``; writes ``TASK OK`` or
    ``TASK ERROR: <msg>`` to the control pipe and exits."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Perl's default: a write to a gone parent kills

    def interrupted(signum: int, frame: object) -> None:
        raise QmError("received interrupt")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, interrupted)
    os.read(4, 2)  # wait for the parent's "OK" (it has registered the task)
    sub, _vmid, *rest = argv[1:]
    _, known, body = commands[sub]
    try:
        body(host, parse_options(rest, known))
        msg = "TASK OK\n"
    except QmError as exc:
        msg = "TASK ERROR: " + str(exc).replace("\n", " ") + "\n"
    sys.stdout.flush()
    os.write(TASK_FD, msg.encode())
    os._exit(0 if msg.startswith("TASK OK") else 255)


# -- the subcommands, as Proxmox runs them ---------------------------------------------------------
def status_output(host: StandinRoot, opts: dict[str, str]) -> str:
    """``qm status`` (see the module docstring)."""
    pid = host.kvm_pid()
    d: dict[str, Any] = {"vmid": host.vmid, "status": "running" if pid else "stopped"}
    lock = host.config_lock()
    if lock:
        d["lock"] = lock
    if pid is not None:
        d.update(host.vm_details(pid))
        d.update(_status_via_qmp(host))
    d.setdefault("qmpstatus", d["status"])  # vmstatus: QMP said nothing -> the plain status
    if "verbose" not in opts:
        return f"status: {d['qmpstatus']}\n"
    lines: list[str] = []
    for key in sorted(d):
        if key not in ("cpu", "relcpu"):
            _print_recursive(lines, "", d[key], key)
    return "".join(lines)


def _print_recursive(lines: list[str], prefix: str, value: Any, key: str | None) -> None:
    """PVE/CLI/qm.pm print_recursive_hash."""
    if isinstance(value, dict):
        if key is not None:
            lines.append(f"{prefix}{key}:\n")
        for k in sorted(value):
            _print_recursive(lines, f"\t{prefix}", value[k], k)
    elif isinstance(value, list):
        if key is not None:
            lines.append(f"{prefix}{key}:\n")
        for item in value:
            _print_recursive(lines, f"\t{prefix}", item, None)
    elif value is not None:
        text = str(int(value)) if isinstance(value, bool) else str(value)
        lines.append(f"{prefix}{key}: {text}\n" if key is not None else f"{prefix}{text}\n")


def _status_via_qmp(host: StandinRoot) -> dict[str, Any]:
    """vmstatus's QMP part: query-status, then the queue, on one connection, 3 s for all; any
    failure ends it silently (what was learnt before stays)."""
    out: dict[str, Any] = {}
    timeout = float(host.faults()["status_qmp_timeout_s"])
    try:
        with QmpClient(host.qmp_socket, timeout, f"VM {host.vmid}") as client:
            status = client.execute("query-status").get("return", {}).get("status")
            if status is None:
                return out
            out["qmpstatus"] = status
            for command in host.QMP_STATUS_QUEUE:
                reply = client.execute(command)
                if "error" in reply:
                    return out  # a failed command aborts the rest of the queue
                _status_callback(out, command, reply["return"])
    except QmpFailed:
        pass
    return out


def _status_callback(out: dict[str, Any], command: str, result: Any) -> None:
    if command == "query-version":
        v = result.get("qemu", {})
        out["running-qemu"] = f"{v.get('major')}.{v.get('minor')}.{v.get('micro')}"
    elif command == "query-machines":
        current = [m for m in result if m.get("is-current")]
        out["running-machine"] = current[0]["name"] if current else "unknown"
    elif command == "query-blockstats":
        out["blockstat"] = {}
        for entry in result:
            drive = (entry.get("device") or entry.get("qdev") or "?").removeprefix("drive-")
            out["blockstat"][drive] = entry.get("stats", {})
        out["diskread"] = sum(e.get("stats", {}).get("rd_bytes", 0) for e in result)
        out["diskwrite"] = sum(e.get("stats", {}).get("wr_bytes", 0) for e in result)
    elif command == "query-proxmox-support":
        out["proxmox-support"] = result


def ha_request(host: StandinRoot, verb: str) -> str:
    """What ``qm start``/``qm stop`` do for an HA-managed VM: ask the HA stack and return."""
    print(f"Requesting HA {verb} for VM {host.vmid}", flush=True)
    host.set_ha_state("started" if verb == "start" else "stopped")
    return ""


def task_start(host: StandinRoot, opts: dict[str, str]) -> None:
    """vm_start in its worker (PVE/QemuServer.pm)."""
    with host.lock_config():
        lock = host.config_lock()
        running = host.kvm_pid() is not None
        if lock == "backup" and running:
            qmp(host, "cont")  # "attempt to start the guest in the existing QEMU instance"
            return
        if lock and lock != "suspended" and not skiplock(opts):
            host.check_lock()
        if running:
            raise QmError(f"VM {host.vmid} already running")
        # vm_start_nolock: systemctl stop <vmid>.scope (SIGTERM to what is left in it), then
        # wait up to 20 s for the unit to go; a process stuck in D state keeps it there.
        for pid in host.scope_live_pids():
            if host.owns_process(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + float(host.faults()["scope_wait_s"])
        while host.scope_live_pids():
            if time.monotonic() >= deadline:
                raise QmError("timeout waiting on systemd")
            time.sleep(0.05)
        host.start_vm()


def task_stop(host: StandinRoot, opts: dict[str, str]) -> None:
    """vm_stop / _do_vm_stop in its worker (PVE/QemuServer.pm), force on (qm stop)."""
    faults = host.faults()
    with host.lock_config():
        pid = host.kvm_pid()
        if pid is None:
            return
        if not skiplock(opts):
            host.check_lock()
        timeout = float(opts["timeout"]) if "timeout" in opts else float(faults["stop_wait_s"])
        try:
            qmp(host, "quit", timeout_s=float(faults["quit_timeout_s"]))
            quit_failed = False
        except QmError:
            quit_failed = True
        if not quit_failed:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and host.kvm_pid() is not None:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if host.kvm_pid() is None:
                host.stop_cleanup()
                return
            print("VM still running - terminating now with SIGTERM", flush=True)
        elif host.kvm_pid() is None:
            print("Unexpected: VM shutdown command failed, but VM not running anymore..")
            return
        else:
            print("VM quit/powerdown failed - terminating now with SIGTERM", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + float(faults["sigterm_wait_s"])
        while time.monotonic() < deadline and host.kvm_pid() is not None:
            time.sleep(0.05)
        if host.kvm_pid() is not None:
            print("VM still running - terminating now with SIGKILL", flush=True)
            if not host.kvm_survives_kill(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(min(1.0, float(faults["sigterm_wait_s"])))
        host.stop_cleanup()  # unlinks the pid file even if the process lives on


def task_reset(host: StandinRoot, opts: dict[str, str]) -> None:
    """vm_reset in its worker: lock, check_lock, QMP system_reset."""
    with host.lock_config():
        if not skiplock(opts):
            host.check_lock()
        qmp(host, "system_reset")


def task_resume(host: StandinRoot, opts: dict[str, str]) -> None:
    """vm_resume in its worker: lock, check_lock (a backup lock is fine), QMP cont."""
    with host.lock_config():
        status = qmp(host, "query-status", timeout_s=host.qmp_timeout_s())
        if status and status.get("status") == "running":
            return
        if not skiplock(opts) and host.config_lock() not in (None, "backup"):
            host.check_lock()
        qmp(host, "cont")


def task_suspend(host: StandinRoot, opts: dict[str, str]) -> None:
    with host.lock_config():
        if not skiplock(opts):
            host.check_lock()
        qmp(host, "stop")


def task_shutdown(host: StandinRoot, opts: dict[str, str]) -> None:
    """vm_shutdown: system_powerdown, wait --timeout; --forceStop then stops it."""
    with host.lock_config():
        pid = host.kvm_pid()
        if pid is None:
            return
        if not skiplock(opts):
            host.check_lock()
        qmp(host, "system_powerdown")
        if wait_gone(pid, float(opts.get("timeout", 60))):
            host.stop_cleanup()
            return
    if opts.get("forceStop") in ("1", "true"):
        task_stop(host, {k: v for k, v in opts.items() if k == "skiplock"})
        return
    raise QmError("VM quit/powerdown failed - got timeout")


# The task subcommands: name -> (task type in the UPID, options (name -> takes a value), body).
TASK_OPTIONS = {
    "start": ("qmstart", {"skiplock": True, "timeout": True}, task_start),
    "stop": (
        "qmstop",
        {"timeout": True, "skiplock": True, "keepActive": True, "overrule-shutdown": True},
        task_stop,
    ),
    "reset": ("qmreset", {"skiplock": True}, task_reset),
    "resume": ("qmresume", {"skiplock": True, "nocheck": True}, task_resume),
    "suspend": ("qmsuspend", {"skiplock": True}, task_suspend),
    "shutdown": (
        "qmshutdown",
        {"timeout": True, "forceStop": True, "skiplock": True, "keepActive": True},
        task_shutdown,
    ),
}


def cli_task(host: StandinRoot, module: str, argv: list[str]) -> int:
    """A mutating subcommand as the API method does it before (and instead of) forking its
    worker: the checks that fail at once, HA redirection, then the task."""
    sub, vmid_arg, rest = argv[0], argv[1], argv[2:]
    dtype, known, _ = TASK_OPTIONS[sub]
    try:
        if not vmid_arg.isdigit() or int(vmid_arg) != host.vmid:
            raise QmError(
                f"Configuration file 'nodes/{NODE}/qemu-server/{vmid_arg}.conf' does not exist",
                EXIT_NO_CONFIG,
            )
        host.config_text()
        opts = parse_options(rest, known)
        if sub == "start":
            if not host.quorate():
                raise QmError("cluster not ready - no quorum?")
            if host.ha_resource() is not None:
                return _ha_task(host, module, "hastart", argv)
        elif sub == "stop" and host.ha_resource() is not None:
            return _ha_task(host, module, "hastop", argv)
        elif sub in ("reset", "suspend") or (sub == "resume" and "nocheck" not in opts):
            needs_running(host)
    except QmError as exc:
        sys.stderr.write(f"{exc}\n")
        return exc.code
    return run_task(host, module, dtype, argv)


def _ha_task(host: StandinRoot, module: str, dtype: str, argv: list[str]) -> int:
    return run_task(host, module, dtype, [f"__{dtype}__", argv[1]])


# What the worker of an HA-managed VM's start/stop runs (``ha-manager set``/``crm-command``).
HA_TASKS = {
    "__hastart__": ("hastart", {}, lambda host, opts: ha_request(host, "start")),
    "__hastop__": ("hastop", {}, lambda host, opts: ha_request(host, "stop")),
}


def run_worker(host: Host, argv: list[str]) -> NoReturn:
    """Entry of a task worker (argv after ``__task__``)."""
    task_worker(host, {**TASK_OPTIONS, **HA_TASKS}, argv)


def write_wrapper(root: Path, module: str, env_name: str, comment: str) -> Path:
    """Write ``<root>/bin/qm``: a #!/bin/sh wrapper that runs `module` under ``python -S`` with
    `env_name` naming root (the verb's config names it as its qm). Returns its path."""
    qm = Path(root) / "bin" / "qm"
    qm.parent.mkdir(parents=True, exist_ok=True)
    qm.write_text(
        "#!/bin/sh\n"
        f"# {comment}\n"
        f"{env_name}={shlex.quote(str(root))}\n"
        f"PYTHONPATH={shlex.quote(SOURCE_ROOT)}\n"
        f"export {env_name} PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -S -m {module} "$@"\n'
    )
    qm.chmod(0o755)
    return qm


def write_pve_layout(root: Path, vmid: int, config: str) -> None:
    """Lay out a stand-in's /etc/pve (quorate, not HA-managed, the VM's config), lock and task
    dirs, and the VM's cgroup scope. Existing files are kept."""
    host = StandinRoot(root)
    node = host.pve_dir / "nodes" / NODE
    (node / "qemu-server").mkdir(parents=True, exist_ok=True)
    (host.pve_dir / "ha").mkdir(exist_ok=True)
    (host.pve_dir / "priv").mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (host.pve_dir / "local").symlink_to(f"nodes/{NODE}")  # lstat: 0777, quorate
    with contextlib.suppress(FileExistsError):
        (host.pve_dir / "qemu-server").symlink_to(f"nodes/{NODE}/qemu-server")
    conf = node / "qemu-server" / f"{vmid}.conf"
    if not conf.exists():
        conf.write_text(config)
    host.lock_dir.mkdir(parents=True, exist_ok=True)
    host.tasks_dir.mkdir(parents=True, exist_ok=True)
    (host.tasks_dir / "active").touch()
    (host.cgroup_dir / "qemu.slice").mkdir(parents=True, exist_ok=True)


def set_quorum(root: Path, quorate: bool) -> None:
    """Make the stand-in's /etc/pve/local say quorate or not. pmxcfs shows a symlink that is
    writable (0777) with quorum and read-only without; a symlink's mode cannot be changed here,
    so without quorum ``local`` becomes a 0555 directory (what ``check_cfs_quorum`` reads is the
    lstat mode's 0200 bit either way)."""
    local = StandinRoot(root).pve_dir / "local"
    if local.is_symlink():
        local.unlink()
    elif local.is_dir():
        local.chmod(0o755)
        local.rmdir()
    if quorate:
        local.symlink_to(f"nodes/{NODE}")
    else:
        local.mkdir(mode=0o555)
        local.chmod(0o555)


def entry_point(env_name: str, run: Callable[[list[str], Path], int], not_set: str) -> NoReturn:
    """Entry point of a stand-in: its root from `env_name` (else `not_set` on stderr), then one
    qm call."""
    root = os.environ.get(env_name)
    if not root:
        sys.stderr.write(f"{not_set}\n")
        sys.exit(EXIT_ERROR)
    sys.exit(run(sys.argv[1:], Path(root)))
