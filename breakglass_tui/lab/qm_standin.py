"""What the two ``qm`` stand-ins share: the simulated one (:mod:`breakglass_tui.lab.sim_qm`, a
simulated kvm) and the real-guest one (:mod:`breakglass_tui.lab.guest.qm`, a real QEMU).

Both play Proxmox's ``qm`` for the real ``breakglass-verb``, so they parse options, word their
errors, exit and print ``qm status`` the same way, talk QMP with the same small client, and keep
the same files under their root (a call log, faults, a pid file in the qemu run dir). That lives
here, once. The verb's own QMP client stays apart on purpose: the stand-ins are the verb's test
bench, and a bench that shared the verb's code could not catch its mistakes.

Standard library only, and nothing heavy: each stand-in imports this under ``python -S`` once per
qm call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

EXIT_ERROR = 255  # what Proxmox's CLI exits with on a failed command
EXIT_NO_CONFIG = 2  # qm on a VM id that has no config
# The directory that holds the breakglass_tui package: the stand-ins run with it on PYTHONPATH
# and with -S, so they do not pay for site-packages they never use.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


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


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie is not: it has exited, only unreaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return False
    state = raw[raw.rfind(")") + 2 :][:1]
    return state not in ("Z", "X", "")


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait up to timeout_s for pid to die; whether it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


class StandinRoot:
    """The files of one stand-in PVE host under ``root``: the call log (``calls.log``), the
    faults (``faults.json``) and the VM's pid file and QMP socket in the qemu run dir.

    A stand-in names its VM (``vmid``), where its files are (``pid_file``, ``qmp_socket``), how
    long it waits for QMP (:meth:`qmp_timeout_s`) and which process is its VM's
    (:meth:`kvm_pid`)."""

    FAULT_DEFAULTS: Mapping[str, Any] = {}
    vmid: int
    pid_file: Path
    qmp_socket: Path

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.calls_log = self.root / "calls.log"
        self.faults_json = self.root / "faults.json"

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
        faults = dict(self.FAULT_DEFAULTS)
        with contextlib.suppress(FileNotFoundError, ValueError):
            faults.update(json.loads(self.faults_json.read_text()))
        return faults

    def pid_from_file(self) -> int | None:
        return read_pid_file(self.pid_file)

    def kvm_pid(self) -> int | None:
        """The PID of the VM's live process, or None."""
        raise NotImplementedError

    def qmp_timeout_s(self) -> float:
        """How long a qm call waits for QMP (Proxmox: about 5 s)."""
        raise NotImplementedError


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
                raise QmpFailed("connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError as exc:
            raise QmpFailed(f"bad QMP message ({exc})") from None


class QmpClient:
    """One QMP connection (QEMU serves one client at a time), negotiated, under one deadline."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reader = LineReader(self.sock, time.monotonic() + timeout_s)
        try:
            self.reader.remaining()
            try:
                self.sock.connect(str(path))
            except OSError as exc:
                raise QmpFailed(str(exc)) from None
            greeting = self.reader.read_json()
            if "QMP" not in greeting:
                raise QmpFailed(f"unexpected QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
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
    try:
        with QmpClient(host.qmp_socket, timeout) as client:
            reply = client.execute(command, arguments)
    except QmpFailed as exc:
        raise QmError(f"VM {host.vmid} qmp command '{command}' failed - {exc}") from None
    if "error" in reply:
        desc = reply["error"].get("desc", "")
        raise QmError(f"VM {host.vmid} qmp command '{command}' failed - {desc}")
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
                f"Configuration file 'nodes/pve/qemu-server/{vmid_arg}.conf' does not exist",
                EXIT_NO_CONFIG,
            )
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


def qmp_subcommand(execute: str) -> Subcommand[StandinRoot]:
    """A subcommand that runs one QMP command on the running VM (reset, resume, suspend)."""

    def run(host: StandinRoot, opts: dict[str, str]) -> str:
        needs_running(host)
        qmp(host, execute)
        return ""

    return run


def status_output(
    host: StandinRoot, opts: dict[str, str], details: Callable[[int], dict[str, Any]]
) -> str:
    """``qm status``: ``status: running`` or ``status: stopped``; with --verbose, `details` of
    the running VM and its QMP status, a ``key: value`` line each, sorted."""
    pid = host.kvm_pid()
    if pid is None:
        return "status: stopped\n"
    if "verbose" not in opts:
        return "status: running\n"
    info = details(pid)
    # Like Proxmox, a QMP that does not answer leaves qmpstatus out and status says running.
    with contextlib.suppress(QmError, KeyError, TypeError):
        info["qmpstatus"] = qmp(host, "query-status")["status"]
    return "".join(f"{k}: {info[k]}\n" for k in sorted(info))


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


def entry_point(env_name: str, run: Callable[[list[str], Path], int], not_set: str) -> NoReturn:
    """Entry point of a stand-in: its root from `env_name` (else `not_set` on stderr), then one
    qm call."""
    root = os.environ.get(env_name)
    if not root:
        sys.stderr.write(f"{not_set}\n")
        sys.exit(EXIT_ERROR)
    sys.exit(run(sys.argv[1:], Path(root)))
