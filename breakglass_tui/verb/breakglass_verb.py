#!/usr/bin/env python3
"""breakglass-verb: the forced-command program on the Proxmox VE host.

The breakglass agent's PVE key can run this program and nothing else (``command="…",restrict`` in
``authorized_keys``). It reads ``SSH_ORIGINAL_COMMAND``, accepts exactly one forced-command verb
for the one VM named in its config, and answers with one JSON document on stdout.

    status | forensics | reset | stop | start | cycle      (the VM id comes from the config)
    bundle <bundle_id>                                      (read-only: fetch a forensics bundle)

Exit codes: 0 OK, 2 BAD_INPUT (refused input: no qm call, no lock), 3 BUSY (another mutating verb
holds the lock), 4 REFUSED (budget, cooldown, or a budget ledger that cannot be written or read),
5 ACTION_FAILED (includes "kvm would not die: host-level recovery, the cold path, is needed"),
6 CONFIG_INVALID (nothing done), 70 INTERNAL.

Mutating verbs (reset stop start cycle): lock, budget, forensics bundle first (unconditionally),
act, verify, record in the ledger, log. Once begun they finish even if the SSH client goes away.

This file is copied as-is to the host: standard library only, Python 3.11+.
Config: $BREAKGLASS_VERB_CONFIG or /etc/breakglass/verb.toml (see DEFAULT_CONFIG below).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_BUSY = 3
EXIT_REFUSED = 4
EXIT_ACTION_FAILED = 5
EXIT_CONFIG_INVALID = 6
EXIT_INTERNAL = 70

VERBS = ("status", "forensics", "reset", "stop", "start", "cycle")
MUTATING_VERBS = frozenset({"reset", "stop", "start", "cycle"})
# stop is here too: otherwise stop then start (exempt when stopped) is a cycle with no cooldown.
COOLDOWN_VERBS = frozenset({"reset", "stop", "cycle"})
BUDGET_WINDOW_S = 3600

# The whole accepted language. fullmatch on the raw string: no strip, no case folding, no shlex.
MAX_COMMAND_LEN = 128
VERB_RE = re.compile(r"status|forensics|reset|stop|start|cycle")
BUNDLE_ID_PATTERN = r"[0-9]{8}T[0-9]{6}Z-(?:forensics|reset|stop|start|cycle)-[0-9a-f]{6}"
BUNDLE_ID_RE = re.compile(BUNDLE_ID_PATTERN)
BUNDLE_RE = re.compile(r"bundle (" + BUNDLE_ID_PATTERN + r")")

DEFAULT_CONFIG_PATH = "/etc/breakglass/verb.toml"
CONFIG_ENV = "BREAKGLASS_VERB_CONFIG"
COLD_PATH = "host-level recovery — the cold path — is needed"

DEFAULT_CONFIG: dict[str, Any] = {
    "vmid": 102,
    "qm": "/usr/sbin/qm",
    "qemu_run_dir": "/var/run/qemu-server",
    "state_dir": "/var/lib/breakglass",
    "budget": {"max_mutating_per_hour": 4, "cooldown_s": 300},
    "deadlines": {"forensics_s": 20, "probe_s": 5, "qm_action_s": 90, "verify_s": 30},
    "retention": {
        "keep_bundles": 20,
        "max_bundle_bytes": 8_000_000,
        "max_total_bytes": 100_000_000,
    },
    "log": {"syslog_socket": "/dev/log"},
}
_PATH_KEYS = ("qm", "qemu_run_dir", "state_dir", "log.syslog_socket")

# Children get a minimal, fixed environment: nothing of the SSH session leaks into qm.
CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}
JOURNAL_LINES = 200
DMESG_LINES = 200
MAX_THREADS_READ = 64
QMP_MAX_MESSAGE = 4_000_000


class BadInput(Exception):
    """SSH_ORIGINAL_COMMAND is not one of the accepted commands."""


class ConfigInvalid(Exception):
    """The verb's TOML config is unusable; the message names the key."""


# ----------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Command:
    """A parsed, accepted command: a verb, or ``bundle`` with an exact bundle id."""

    verb: str
    bundle_id: str | None = None


def parse_command(raw: str | None) -> Command:
    """Parse SSH_ORIGINAL_COMMAND exactly; raise BadInput for anything else.

    Unset (a shell request) and empty are refused. No stripping, no case folding, no shell
    parsing: the raw string must fullmatch one accepted form.
    """
    if raw is None:
        raise BadInput("no command given (a shell or subsystem request): name one verb")
    if raw == "":
        raise BadInput("empty command: name one verb")
    if len(raw) > MAX_COMMAND_LEN:
        raise BadInput(f"command longer than {MAX_COMMAND_LEN} characters")
    if VERB_RE.fullmatch(raw):
        return Command(verb=raw)
    m = BUNDLE_RE.fullmatch(raw)
    if m:
        return Command(verb="bundle", bundle_id=m.group(1))
    raise BadInput(
        "not an accepted command: expected one of " + "|".join(VERBS) + " or bundle <id>"
    )


def escape(text: str | None, limit: int = 512) -> str:
    """One printable ASCII line for the log: JSON-escaped, cut at `limit` characters."""
    if text is None:
        return "<unset>"
    cut = text[:limit]
    out = json.dumps(cut, ensure_ascii=True)
    if len(text) > limit:
        out += f"...(+{len(text) - limit} chars)"
    return out


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    """The validated verb config."""

    vmid: int
    qm: str
    qemu_run_dir: str
    state_dir: str
    max_mutating_per_hour: int
    cooldown_s: float
    forensics_s: float
    probe_s: float
    qm_action_s: float
    verify_s: float
    keep_bundles: int
    max_bundle_bytes: int
    max_total_bytes: int
    syslog_socket: str

    @property
    def pid_file(self) -> Path:
        return Path(self.qemu_run_dir) / f"{self.vmid}.pid"

    @property
    def qmp_socket(self) -> Path:
        return Path(self.qemu_run_dir) / f"{self.vmid}.qmp"

    @property
    def bundles_dir(self) -> Path:
        return Path(self.state_dir) / "bundles"


def _check_number(key: str, value: Any, *, integer: bool, minimum: float, positive: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ConfigInvalid(f"config key {key} must be {kind}, got {value!r}")
    if value < minimum or (positive and value <= 0):
        bound = "> 0" if positive else f">= {minimum}"
        raise ConfigInvalid(f"config key {key} must be {bound}, got {value!r}")


def validate_config(data: dict[str, Any]) -> Config:
    """Validate parsed TOML against DEFAULT_CONFIG's shape; raise ConfigInvalid naming the key."""
    merged: dict[str, Any] = {}
    for key, value in data.items():
        if key not in DEFAULT_CONFIG:
            raise ConfigInvalid(f"unknown config key {key!r}: allowed are {sorted(DEFAULT_CONFIG)}")
        default = DEFAULT_CONFIG[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigInvalid(f"config key {key} must be a table [{key}]")
            for sub in value:
                if sub not in default:
                    raise ConfigInvalid(
                        f"unknown config key {key}.{sub}: allowed are {sorted(default)}"
                    )
        elif isinstance(value, dict):
            raise ConfigInvalid(f"config key {key} must be a value, not a table")
    for key, default in DEFAULT_CONFIG.items():
        given = data.get(key)
        merged[key] = {**default, **(given or {})} if isinstance(default, dict) else given
        if merged[key] is None:
            merged[key] = default

    vmid = merged["vmid"]
    _check_number("vmid", vmid, integer=True, minimum=100, positive=True)
    if vmid > 999_999_999:
        raise ConfigInvalid(f"config key vmid must be <= 999999999 (Proxmox's range), got {vmid}")
    for dotted in _PATH_KEYS:
        value = merged
        for part in dotted.split("."):
            value = value[part]
        if not isinstance(value, str) or not value:
            raise ConfigInvalid(f"config key {dotted} must be a path string, got {value!r}")
        if not os.path.isabs(value):
            raise ConfigInvalid(f"config key {dotted} must be an absolute path, got {value!r}")
        if "\x00" in value:
            raise ConfigInvalid(f"config key {dotted} contains a NUL byte")
    b, d, r = merged["budget"], merged["deadlines"], merged["retention"]
    _check_number(
        "budget.max_mutating_per_hour",
        b["max_mutating_per_hour"],
        integer=True,
        minimum=1,
        positive=True,
    )
    _check_number("budget.cooldown_s", b["cooldown_s"], integer=False, minimum=0, positive=False)
    for name in ("forensics_s", "probe_s", "qm_action_s", "verify_s"):
        _check_number(f"deadlines.{name}", d[name], integer=False, minimum=0, positive=True)
    for name in ("keep_bundles", "max_bundle_bytes", "max_total_bytes"):
        _check_number(f"retention.{name}", r[name], integer=True, minimum=1, positive=True)
    return Config(
        vmid=vmid,
        qm=merged["qm"],
        qemu_run_dir=merged["qemu_run_dir"],
        state_dir=merged["state_dir"],
        max_mutating_per_hour=b["max_mutating_per_hour"],
        cooldown_s=float(b["cooldown_s"]),
        forensics_s=float(d["forensics_s"]),
        probe_s=float(d["probe_s"]),
        qm_action_s=float(d["qm_action_s"]),
        verify_s=float(d["verify_s"]),
        keep_bundles=r["keep_bundles"],
        max_bundle_bytes=r["max_bundle_bytes"],
        max_total_bytes=r["max_total_bytes"],
        syslog_socket=merged["log"]["syslog_socket"],
    )


def load_config(environ: dict[str, str] | None = None) -> Config:
    """Read the config named by $BREAKGLASS_VERB_CONFIG, else /etc/breakglass/verb.toml.

    A missing default file means the documented defaults; a named file that is missing is an
    error (someone meant a config and we must not silently act on another VM's defaults).
    """
    env = os.environ if environ is None else environ
    path = env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if path == DEFAULT_CONFIG_PATH and CONFIG_ENV not in env:
            return validate_config({})
        raise ConfigInvalid(
            f"config file {path} does not exist: create it or fix {CONFIG_ENV}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigInvalid(f"config file {path} cannot be read: {exc.strerror}") from None
    return validate_config(data)


# ----------------------------------------------------------------------------- output and log


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to fd; raise OSError if it cannot be (ENOSPC, EIO, a short write)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def write_fd(fd: int, data: bytes) -> None:
    """Write all of `data` to fd; a gone reader (EPIPE, closed pipe) is not an error here.

    Only for stdout, stderr and the fallback log: never for the ledger (see write_all)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return  # the SSH client went away: the verb still completes and logs
        view = view[n:]


class Logger:
    """Log decisions to syslog over the /dev/log datagram socket, else to state_dir/verb.log."""

    FACILITY_AUTHPRIV = 10

    def __init__(self, syslog_socket: str, state_dir: str | None) -> None:
        self.syslog_socket = syslog_socket
        self.state_dir = state_dir

    def log(self, level: int, fields: dict[str, Any]) -> None:
        """Send one escaped JSON line; never raises."""
        line = json.dumps(fields, ensure_ascii=True, sort_keys=True, default=str)
        msg = f"<{self.FACILITY_AUTHPRIV * 8 + level}>breakglass-verb[{os.getpid()}]: {line}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.connect(self.syslog_socket)
                s.send(msg.encode("ascii", "replace")[:8192])
            return
        except OSError:
            pass
        if self.state_dir is None:
            return
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            fd = os.open(
                os.path.join(self.state_dir, "verb.log"),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                0o600,
            )
            try:
                write_fd(fd, f"{stamp} {msg}\n".encode("ascii", "replace"))
            finally:
                os.close(fd)
        except OSError:
            pass


# ----------------------------------------------------------------------------- bounded children


@dataclass
class RunResult:
    """How a time-boxed child ended. status: ok (exited 0) | error | timeout."""

    status: str
    returncode: int | None
    output: bytes
    elapsed_s: float
    detail: str = ""
    truncated: bool = False


def run_bounded(argv: list[str], deadline_s: float, max_bytes: int = 1_000_000) -> RunResult:
    """Run argv with our own deadline; past it, kill its process group and ABANDON it.

    Never subprocess.run(timeout=): that waits without bound for a child stuck in D state.
    We stop reading as soon as the child exits (a daemon it forked may keep the pipe open).
    """
    t0 = time.monotonic()
    end = t0 + max(deadline_s, 0.0)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=CHILD_ENV,
            start_new_session=True,  # our own group to kill; no signals of ours reach it
            close_fds=True,
        )
    except OSError as exc:
        return RunResult("error", None, b"", time.monotonic() - t0, f"cannot run {argv[0]}: {exc}")
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    truncated = False
    eof = False
    timed_out = False

    def drain() -> bool:
        nonlocal size, truncated
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            if size < max_bytes:
                chunks.append(data[: max_bytes - size])
            if size + len(data) > max_bytes:
                truncated = True
            size += len(data)

    while True:
        if proc.poll() is not None:
            drain()
            break
        remaining = end - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        if eof:
            time.sleep(min(0.02, remaining))
            continue
        try:
            ready, _, _ = select.select([fd], [], [], min(0.05, remaining))
        except InterruptedError:
            continue
        if ready:
            eof = drain()
    proc.stdout.close()
    elapsed = time.monotonic() - t0
    output = b"".join(chunks)
    if timed_out:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        # A child in D state does not die on SIGKILL: give it a moment, then abandon it.
        grace = time.monotonic() + 0.1
        while time.monotonic() < grace and proc.poll() is None:
            time.sleep(0.01)
        return RunResult(
            "timeout", None, output, elapsed, f"no answer within {deadline_s:g} s", truncated
        )
    rc = proc.returncode
    status = "ok" if rc == 0 else "error"
    return RunResult(status, rc, output, elapsed, "" if rc == 0 else f"exit status {rc}", truncated)


# ----------------------------------------------------------------------------- QMP


class QmpError(Exception):
    """QEMU answered a QMP command with an error, or the monitor misbehaved."""


class QmpTimeout(QmpError):
    """QEMU's monitor did not answer within the deadline."""


class Qmp:
    """A minimal QMP client over the unix socket, every operation under a socket timeout."""

    def __init__(self, path: str, deadline: float) -> None:
        self.deadline = deadline
        self.buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._set_timeout(deadline)
            self.sock.connect(path)
            greeting = self._read_message(deadline)
            if "QMP" not in greeting:
                raise QmpError("the socket did not greet like QEMU's QMP")
            self.execute("qmp_capabilities", deadline=deadline)
        except BaseException:
            self.close()
            raise

    def _set_timeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QmpTimeout("QMP did not answer in time")
        self.sock.settimeout(remaining)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            self._set_timeout(deadline)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise QmpTimeout("QMP did not answer in time") from None
            if not data:
                raise QmpError("QMP closed the connection")
            self.buf += data
            if len(self.buf) > QMP_MAX_MESSAGE:
                raise QmpError("QMP message too large")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError("QMP sent something that is not JSON") from None
        if not isinstance(msg, dict):
            raise QmpError("QMP sent a JSON value that is not an object")
        return msg

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, deadline: float
    ) -> Any:
        """Run one QMP command and return its "return" value (events are skipped)."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._set_timeout(deadline)
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except TimeoutError:
            raise QmpTimeout("QMP did not accept the command in time") from None
        except OSError as exc:
            raise QmpError(f"QMP connection failed: {exc}") from None
        while True:
            msg = self._read_message(deadline)
            if "event" in msg:
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise QmpError(f"QMP {command} failed: {desc}")
            if "return" in msg:
                return msg["return"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def qmp_query_status(cfg: Config, timeout_s: float) -> dict[str, Any]:
    """query-status over a fresh QMP connection, time-boxed; raises QmpError/OSError."""
    deadline = time.monotonic() + timeout_s
    try:
        qmp = Qmp(str(cfg.qmp_socket), deadline)
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise QmpTimeout("QMP did not answer in time") from None
        raise
    try:
        result = qmp.execute("query-status", deadline=deadline)
    finally:
        qmp.close()
    if not isinstance(result, dict):
        raise QmpError("query-status returned something unexpected")
    return result


# ----------------------------------------------------------------------------- the kvm process


@dataclass(frozen=True)
class Kvm:
    """The VM's kvm process, identified by pid and start time (a pid can be reused)."""

    pid: int
    starttime: int
    state: str  # R S D Z T ...


def _read_stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def find_kvm(cfg: Config) -> Kvm | None:
    """The live kvm process from the pid file and /proc, or None (no file, dead, zombie)."""
    try:
        text = cfg.pid_file.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) <= 1:
        return None
    pid = int(text)
    stat = _read_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return None
    return Kvm(pid, stat[1], stat[0])


def kvm_alive(kvm: Kvm) -> Kvm | None:
    """The same process (pid and start time) if it still lives, with its current state."""
    stat = _read_stat(kvm.pid)
    if stat is None or stat[1] != kvm.starttime or stat[0] in ("Z", "X"):
        return None
    return Kvm(kvm.pid, kvm.starttime, stat[0])


def describe_qmp_status(status: dict[str, Any]) -> str:
    """QMP query-status -> the document's state words."""
    s = str(status.get("status", "unknown"))
    if s == "running" or status.get("running") is True:
        return "running"
    if s == "io-error":
        return "paused (io-error)"
    if s in ("paused", "suspended", "prelaunch", "inmigrate", "postmigrate"):
        return "paused" if s == "paused" else f"paused ({s})"
    return s


def parse_qm_status(text: str) -> str | None:
    """`qm status <vmid> --verbose` output -> state words, or None if it says nothing useful."""
    fields = dict(re.findall(r"^\s*([a-z_-]+):\s*(\S+)\s*$", text, re.MULTILINE))
    qmp = fields.get("qmpstatus")
    if qmp:
        return describe_qmp_status({"status": qmp})
    status = fields.get("status")
    if status == "running":
        # qm says running when QMP does not answer: not proof that the guest runs.
        return "running (QMP not answering)"
    if status == "stopped":
        return status
    return None


# ----------------------------------------------------------------------------- forensics


@dataclass
class Probe:
    """One forensics probe's manifest entry."""

    name: str
    command: str
    status: str = "error"
    elapsed_s: float = 0.0
    bytes: int = 0
    file: str | None = None
    detail: str = ""
    truncated: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "elapsed_s": round(self.elapsed_s, 3),
            "bytes": self.bytes,
        }


@dataclass
class Bundle:
    """A captured forensics bundle."""

    bundle_id: str
    path: Path
    probes: list[Probe] = field(default_factory=list)
    elapsed_s: float = 0.0
    qm_status_text: str | None = None
    qmp_status: dict[str, Any] | None = None


class _Budget:
    """Bytes left for one bundle (shared by concurrent probes)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.lock = threading.Lock()

    def take(self, want: int) -> int:
        with self.lock:
            got = max(0, min(want, self.left))
            self.left -= got
            return got


def new_bundle_dir(cfg: Config, verb: str) -> tuple[str, Path]:
    """Create a fresh, unique bundle directory (exclusive mkdir: captures never share one)."""
    cfg.bundles_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(100):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        bundle_id = f"{stamp}-{verb}-{secrets.token_hex(3)}"
        path = cfg.bundles_dir / bundle_id
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return bundle_id, path
    raise OSError("could not create a unique bundle directory")


def _save(path: Path, probe: Probe, data: bytes, budget: _Budget, truncated: bool) -> None:
    allowed = budget.take(len(data))
    if allowed < len(data):
        truncated = True
        data = data[:allowed]
    probe.file = f"{probe.name}.txt"
    (path / probe.file).write_bytes(data)
    probe.bytes = len(data)
    probe.truncated = truncated


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(1_000_000)


def _safe_reads(cfg: Config, kvm: Kvm | None) -> list[tuple[str, str, list[str]]]:
    """(probe name, description, files) for the reads that cannot hang, in order."""
    probes: list[tuple[str, str, list[str]]] = []
    if kvm is not None:
        base = f"/proc/{kvm.pid}"
        for leaf in ("stat", "status", "wchan", "io"):
            probes.append((f"proc_{leaf}", f"read {base}/{leaf}", [f"{base}/{leaf}"]))
        try:
            tids = sorted(os.listdir(f"{base}/task"), key=lambda t: int(t) if t.isdigit() else 0)
        except OSError:
            tids = []
        files = [
            f"{base}/task/{tid}/{leaf}"
            for tid in tids[:MAX_THREADS_READ]
            for leaf in ("stat", "wchan", "stack")
        ]
        probes.append(("proc_threads", f"read {base}/task/*/{{stat,wchan,stack}}", files))
    probes.append(
        (
            "host_pressure",
            "read /proc/pressure/{cpu,memory,io}",
            [f"/proc/pressure/{k}" for k in ("cpu", "memory", "io")],
        )
    )
    scope = f"/sys/fs/cgroup/qemu.slice/{cfg.vmid}.scope"
    probes.append(
        (
            "vm_cgroup_pressure",
            f"read {scope}/{{cpu,memory,io}}.pressure",
            [f"{scope}/{k}.pressure" for k in ("cpu", "memory", "io")],
        )
    )
    probes.append(("meminfo", "read /proc/meminfo", ["/proc/meminfo"]))
    probes.append(("loadavg", "read /proc/loadavg", ["/proc/loadavg"]))
    return probes


def _run_safe_read(path: Path, name: str, desc: str, files: list[str], budget: _Budget) -> Probe:
    probe = Probe(name, desc)
    t0 = time.monotonic()
    parts: list[bytes] = []
    errors = 0
    for f in files:
        try:
            data = _read_file(f)
        except OSError as exc:
            errors += 1
            data = f"<unreadable: {exc.strerror}>\n".encode()
        parts.append(f"==> {f} <==\n".encode() + data + (b"" if data.endswith(b"\n") else b"\n"))
    if len(files) == 1:
        parts = [parts[0].split(b"\n", 1)[1]] if errors == 0 else parts
    _save(path, probe, b"".join(parts), budget, truncated=False)
    probe.status = "ok" if errors < len(files) else "error"
    if errors:
        probe.detail = f"{errors} of {len(files)} files unreadable"
    probe.elapsed_s = time.monotonic() - t0
    return probe


def _tail(data: bytes, lines: int) -> bytes:
    return b"\n".join(data.splitlines()[-lines:]) + b"\n"


def _run_child_probe(
    path: Path, probe: Probe, argv: list[str], deadline: float, budget: _Budget, tail: int = 0
) -> None:
    res = run_bounded(argv, min(deadline - time.monotonic(), 1e9), max_bytes=budget.left or 1)
    data = _tail(res.output, tail) if tail and res.status == "ok" else res.output
    _save(path, probe, data, budget, res.truncated)
    probe.status, probe.elapsed_s, probe.detail = res.status, res.elapsed_s, res.detail


def _run_qmp_probes(
    cfg: Config, path: Path, probes: list[Probe], deadline_for: Any, budget: _Budget, bundle: Bundle
) -> None:
    """query-status, query-block, query-blockstats, screendump over one QMP connection.

    QMP serves one client at a time and a hung command blocks those behind it: after a timeout
    the remaining QMP probes are recorded as timeouts without waiting again.
    """
    qmp: Qmp | None = None
    hung = ""
    skip_status = "timeout"
    for probe in probes:
        start = time.monotonic()
        deadline = deadline_for()
        if hung:
            probe.status, probe.detail = skip_status, hung
            continue
        try:
            if qmp is None:
                qmp = Qmp(str(cfg.qmp_socket), deadline)
            if probe.name == "qmp_screendump":
                png = path / "screendump.png"
                qmp.execute(
                    "screendump", {"filename": str(png), "format": "png"}, deadline=deadline
                )
                size = png.stat().st_size if png.exists() else 0
                if budget.take(size) < size:
                    png.unlink(missing_ok=True)
                    probe.truncated, probe.detail = True, "dropped: over the bundle's byte cap"
                    probe.status = "error"
                else:
                    probe.file, probe.bytes, probe.status = png.name, size, "ok"
            else:
                result = qmp.execute(
                    probe.name.removeprefix("qmp_").replace("_", "-"), deadline=deadline
                )
                if probe.name == "qmp_query_status" and isinstance(result, dict):
                    bundle.qmp_status = result
                _save(path, probe, json.dumps(result, indent=1).encode(), budget, False)
                probe.status = "ok"
        except QmpTimeout as exc:
            probe.status, probe.detail = "timeout", str(exc)
            hung = f"skipped: QMP did not answer {probe.name}"
        except TimeoutError:
            probe.status, probe.detail = "timeout", "QMP did not answer in time"
            hung = f"skipped: QMP did not answer {probe.name}"
        except (QmpError, OSError) as exc:
            probe.status, probe.detail = "error", str(exc)
            if qmp is None:
                hung, skip_status = f"skipped: QMP unavailable ({exc})", "error"
        finally:
            probe.elapsed_s = time.monotonic() - start
    if qmp is not None:
        qmp.close()


def capture_forensics(cfg: Config, verb: str) -> Bundle:
    """Capture a forensics bundle under cfg.forensics_s; never blocks past it.

    Safe reads first, then the probes that can hang, run concurrently, each under min(probe_s,
    what is left of forensics_s). A probe past its deadline is recorded as a timeout and its
    child abandoned.
    """
    t0 = time.monotonic()
    overall = t0 + cfg.forensics_s
    bundle_id, path = new_bundle_dir(cfg, verb)
    bundle = Bundle(bundle_id, path)
    budget = _Budget(cfg.max_bundle_bytes - 16_384)  # room for the manifest
    kvm = find_kvm(cfg)

    for name, desc, files in _safe_reads(cfg, kvm):
        bundle.probes.append(_run_safe_read(path, name, desc, files, budget))

    def probe_deadline() -> float:
        return min(time.monotonic() + cfg.probe_s, overall)

    vmid = str(cfg.vmid)
    journal_of = ["journalctl", "--no-pager", "-o", "short-iso", "-n", str(JOURNAL_LINES), "-u"]
    children = [
        ("dmesg", ["dmesg", "--ctime"], DMESG_LINES),
        ("qm_status", [cfg.qm, "status", vmid, "--verbose"], 0),
        ("qm_config", [cfg.qm, "config", vmid], 0),
        ("journal_vm_scope", [*journal_of, f"{vmid}.scope"], 0),
        ("journal_pvestatd", [*journal_of, "pvestatd"], 0),
    ]
    threads: list[tuple[threading.Thread, Probe, float]] = []
    child_probes: list[Probe] = []
    for name, argv, tail in children:
        probe = Probe(name, " ".join(argv))
        child_probes.append(probe)
        deadline = probe_deadline()
        th = threading.Thread(
            target=_run_child_probe,
            args=(path, probe, argv, deadline, budget, tail),
            daemon=True,
            name=name,
        )
        th.start()
        threads.append((th, probe, deadline))
    qmp_probes = [
        Probe(n, f"QMP {c} via {cfg.qmp_socket}")
        for n, c in (
            ("qmp_query_status", "query-status"),
            ("qmp_query_block", "query-block"),
            ("qmp_query_blockstats", "query-blockstats"),
            ("qmp_screendump", "screendump (png)"),
        )
    ]
    qth = threading.Thread(
        target=_run_qmp_probes,
        args=(cfg, path, qmp_probes, probe_deadline, budget, bundle),
        daemon=True,
        name="qmp",
    )
    qth.start()
    for th, probe, deadline in threads:
        th.join(max(0.0, deadline - time.monotonic()) + 0.5)
        if th.is_alive():  # should not happen (run_bounded keeps its deadline); never wait on
            probe.status, probe.detail = "timeout", "abandoned past the capture deadline"
    qth.join(max(0.0, overall - time.monotonic()) + 0.5)
    if qth.is_alive():
        for probe in qmp_probes:
            if probe.status != "ok":
                probe.status, probe.detail = "timeout", "abandoned past the capture deadline"
    bundle.probes.extend(child_probes)
    bundle.probes.extend(qmp_probes)
    qm_probe = next(p for p in child_probes if p.name == "qm_status")
    if qm_probe.status == "ok" and qm_probe.file:
        with contextlib.suppress(OSError):
            bundle.qm_status_text = (path / qm_probe.file).read_text("utf-8", "replace")
    bundle.elapsed_s = time.monotonic() - t0
    write_manifest(cfg, bundle, verb)
    enforce_retention(cfg, keep=bundle_id)
    return bundle


def write_manifest(cfg: Config, bundle: Bundle, verb: str) -> None:
    """manifest.json, written last and atomically: its presence marks a complete bundle."""
    files = {}
    for p in bundle.probes:
        if p.file:
            with contextlib.suppress(OSError):
                files[p.file] = hashlib.sha256((bundle.path / p.file).read_bytes()).hexdigest()
    manifest = {
        "bundle_id": bundle.bundle_id,
        "verb": verb,
        "vmid": cfg.vmid,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(bundle.elapsed_s, 3),
        "deadline_s": cfg.forensics_s,
        "probes": [
            {
                "name": p.name,
                "command": p.command,
                "status": p.status,
                "elapsed_s": round(p.elapsed_s, 3),
                "bytes": p.bytes,
                "file": p.file,
                "detail": p.detail,
                "truncated": p.truncated,
            }
            for p in bundle.probes
        ],
        "sha256": files,
    }
    tmp = bundle.path / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, bundle.path / "manifest.json")


def _dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _remove_bundle(path: Path) -> None:
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        os.rmdir(path)


def enforce_retention(cfg: Config, keep: str) -> None:
    """Keep the newest keep_bundles complete bundles within max_total_bytes; never `keep`."""
    try:
        names = sorted(n for n in os.listdir(cfg.bundles_dir) if BUNDLE_ID_RE.fullmatch(n))
    except OSError:
        return

    # Only complete bundles (manifest present) are candidates: a capture in progress elsewhere
    # must not lose its directory under it.
    # Age is the manifest's mtime (ids only say the second, then sort by verb); a bundle that
    # vanished under a concurrent verb sorts as oldest. `keep` counts as the newest.
    def age(name: str) -> tuple[int, str]:
        try:
            return (cfg.bundles_dir / name / "manifest.json").stat().st_mtime_ns, name
        except OSError:
            return 0, name

    complete = [n for n in names if (cfg.bundles_dir / n / "manifest.json").exists() and n != keep]
    complete.sort(key=age)
    complete.append(keep)
    doomed = complete[: max(0, len(complete) - cfg.keep_bundles)]
    survivors = complete[len(doomed) :]
    total = sum(_dir_bytes(cfg.bundles_dir / n) for n in survivors)
    for n in list(survivors):
        if total <= cfg.max_total_bytes:
            break
        if n == keep:
            continue
        total -= _dir_bytes(cfg.bundles_dir / n)
        doomed.append(n)
    for n in doomed:
        if n != keep:
            _remove_bundle(cfg.bundles_dir / n)


def read_bundle(cfg: Config, bundle_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A stored bundle's manifest and its files (base64). Raises FileNotFoundError."""
    if not BUNDLE_ID_RE.fullmatch(bundle_id):
        raise FileNotFoundError(bundle_id)
    path = cfg.bundles_dir / bundle_id
    manifest = json.loads((path / "manifest.json").read_text())
    files: dict[str, str] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            files[entry.name] = base64.b64encode(fh.read(cfg.max_bundle_bytes)).decode("ascii")
    return manifest, files


# ----------------------------------------------------------------------------- lock and budget


def take_lock(cfg: Config) -> int | None:
    """flock the state_dir lock without blocking; the fd, or None when another verb holds it."""
    fd = os.open(os.path.join(cfg.state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def ledger_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "ledger.jsonl")


def read_ledger(cfg: Config) -> list[dict[str, Any]]:
    """Ledger entries (one JSON object a line); unreadable lines are skipped.

    A ledger that cannot be read (other than missing) raises OSError: the caller fails closed."""
    entries = []
    try:
        with open(ledger_path(cfg), encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict) and isinstance(obj.get("ts"), int | float):
                        entries.append(obj)
    except FileNotFoundError:
        pass
    return entries


def append_ledger(cfg: Config, entry: dict[str, Any]) -> None:
    """Append one entry as one whole line; raise OSError if it cannot be recorded.

    The budget and the cooldown are computed from this file, so a lost entry must be known (a
    full disk must not silently turn them off). A line cut short by a full disk is taken back;
    a torn tail left anyway is closed with a newline first so it cannot swallow this entry.
    No fsync: it can block without a deadline on stalled storage while the lock is held, and
    the ledger need not survive a host crash. Callers hold the lock: one writer at a time.
    """
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(ledger_path(cfg), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            write_all(fd, line)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # take back a partial line
            raise
    finally:
        os.close(fd)


def budget_state(cfg: Config, now: float | None = None) -> dict[str, Any]:
    """{used, limit, window_s, cooldown_remaining_s} from the ledger's begun mutating verbs."""
    now = time.time() if now is None else now
    begun = [e for e in read_ledger(cfg) if e.get("phase") == "begun"]
    # Entries stamped in the future (the clock went back) still count: fail closed.
    recent = [e for e in begun if e["ts"] > now - BUDGET_WINDOW_S]
    last_cool = max((e["ts"] for e in begun if e.get("verb") in COOLDOWN_VERBS), default=None)
    remaining = 0.0
    if last_cool is not None:
        remaining = min(cfg.cooldown_s, max(0.0, last_cool + cfg.cooldown_s - now))
    return {
        "used": len(recent),
        "limit": cfg.max_mutating_per_hour,
        "window_s": BUDGET_WINDOW_S,
        "cooldown_remaining_s": round(remaining, 1),
    }


# ----------------------------------------------------------------------------- the run


class Run:
    """One invocation: the document it builds and the steps it took."""

    def __init__(self, cfg: Config | None, verb: str | None) -> None:
        self.cfg = cfg
        self.verb = verb
        self.t0 = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self.state_before = "unknown"
        self.state_after = "unknown"
        self.bundle_id: str | None = None
        self.cold_case = False
        self.extra: dict[str, Any] = {}

    def step(self, name: str, ok: bool, elapsed_s: float, detail: str = "") -> None:
        self.steps.append(
            {"step": name, "ok": ok, "elapsed_s": round(elapsed_s, 3), "detail": detail}
        )

    def document(
        self, exit_code: int, message: str, refused: str | None = None, *, budget: bool = True
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "verb": self.verb,
            "vmid": self.cfg.vmid if self.cfg else None,
            "ok": exit_code == EXIT_OK,
            "exit_code": exit_code,
            "message": message,
            "state_before": self.state_before,
            "state_after": self.state_after,
            "bundle_id": self.bundle_id,
            "refused": refused,
            "cold_case": self.cold_case,
            "probes": self.probes,
            "steps": self.steps,
            "elapsed_s": round(time.monotonic() - self.t0, 3),
            "budget": None,
        }
        if self.cfg is not None and budget:
            with contextlib.suppress(OSError):
                doc["budget"] = budget_state(self.cfg)
        doc.update(self.extra)
        return doc


def qm(cfg: Config, run: Run, sub: str, *args: str, deadline_s: float) -> RunResult:
    """Run `qm <sub> <vmid> args…` time-boxed and record it as a step."""
    res = run_bounded([cfg.qm, sub, str(cfg.vmid), *args], deadline_s, max_bytes=65536)
    text = res.output.decode("utf-8", "replace").strip()[-300:]
    detail = res.detail if res.status != "ok" else ""
    if text and res.status != "ok":
        detail = f"{detail}: {text}" if detail else text
    run.step(f"qm {sub}", res.status == "ok", res.elapsed_s, detail)
    return res


def observe_state(cfg: Config, timeout_s: float) -> tuple[str, Kvm | None, str]:
    """(state words, kvm, how we know) from /proc, then QMP, then `qm status --verbose`."""
    kvm = find_kvm(cfg)
    if kvm is None:
        return "stopped", None, "no live kvm process"
    deadline = time.monotonic() + timeout_s
    try:
        return describe_qmp_status(qmp_query_status(cfg, timeout_s)), kvm, "QMP query-status"
    except (QmpError, OSError) as exc:
        why = f"QMP: {exc}"
    left = deadline - time.monotonic()
    if left > 0.2:
        res = run_bounded([cfg.qm, "status", str(cfg.vmid), "--verbose"], left, 65536)
        if res.status == "ok":
            state = parse_qm_status(res.output.decode("utf-8", "replace"))
            if state:
                return state, kvm, f"qm status ({why})"
    return "unknown", kvm, why


def verify_running(cfg: Config, run: Run) -> bool:
    """Poll until the VM runs (QMP, else qm status) or verify_s passes."""
    t0 = time.monotonic()
    end = t0 + cfg.verify_s
    state = "unknown"
    how = ""
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        state, _, how = observe_state(cfg, min(cfg.probe_s, left))
        if state == "running":
            run.step("verify running", True, time.monotonic() - t0, how)
            run.state_after = state
            return True
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
    run.state_after = state
    run.step("verify running", False, time.monotonic() - t0, f"last seen {state} ({how})")
    return False


def verify_gone(cfg: Config, run: Run, kvm: Kvm | None) -> Kvm | None:
    """Poll /proc until the kvm process is gone or verify_s passes; the survivor, or None."""
    t0 = time.monotonic()
    end = t0 + cfg.verify_s
    current = kvm_alive(kvm) if kvm else None
    while current is not None and time.monotonic() < end:
        time.sleep(0.1)
        current = kvm_alive(current)
    if current is None:
        # qm stop may have started nothing, or a new kvm may have come: trust /proc's answer.
        run.step("verify kvm gone", True, time.monotonic() - t0, "no kvm process")
        return None
    run.step(
        "verify kvm gone",
        False,
        time.monotonic() - t0,
        f"kvm pid {current.pid} still alive in state {current.state}",
    )
    return current


def do_stop(cfg: Config, run: Run, kvm: Kvm | None) -> tuple[int, str]:
    """qm stop, then verify the kvm process is gone. (exit code, message)."""
    res = qm(cfg, run, "stop", deadline_s=cfg.qm_action_s)
    survivor = verify_gone(cfg, run, kvm)
    if survivor is not None:
        run.cold_case = True
        run.state_after = f"kvm alive ({survivor.state})"
        said = "qm stop reported success" if res.status == "ok" else f"qm stop: {res.detail}"
        return EXIT_ACTION_FAILED, (
            f"kvm would not die: pid {survivor.pid} is still alive in state {survivor.state} "
            f"{cfg.verify_s:g} s after qm stop ({said}); {COLD_PATH}"
        )
    run.state_after = "stopped"
    return EXIT_OK, "the VM is stopped and its kvm process is gone"


def do_start(cfg: Config, run: Run) -> tuple[int, str]:
    res = qm(cfg, run, "start", deadline_s=cfg.qm_action_s)
    if verify_running(cfg, run):
        return EXIT_OK, "the VM is running"
    why = "qm start succeeded" if res.status == "ok" else f"qm start failed ({res.detail})"
    return EXIT_ACTION_FAILED, (
        f"{why} but the VM is not running after {cfg.verify_s:g} s (last seen {run.state_after})"
    )


def do_reset(cfg: Config, run: Run) -> tuple[int, str]:
    res = qm(cfg, run, "reset", deadline_s=cfg.qm_action_s)
    if res.status != "ok":
        observed, _, _ = observe_state(cfg, cfg.probe_s)
        run.state_after = observed
        if observed == "stopped":
            return EXIT_ACTION_FAILED, (
                f"qm reset failed ({res.detail}): the VM is stopped, start brings it back"
            )
        return EXIT_ACTION_FAILED, (
            f"qm reset failed ({res.detail}); the VM is {observed}: if QEMU's monitor is hung, "
            "cycle is the next step"
        )
    # Proxmox's reset is QMP system_reset: a VM paused by an I/O error stays paused. Resume it.
    observed, _, _ = observe_state(cfg, cfg.probe_s)
    if observed.startswith("paused") or run.state_before.startswith("paused"):
        qm(cfg, run, "resume", deadline_s=cfg.qm_action_s)
    if verify_running(cfg, run):
        return EXIT_OK, "the VM was reset and is running"
    return EXIT_ACTION_FAILED, (
        f"the VM was reset but is not running after {cfg.verify_s:g} s (last seen "
        f"{run.state_after}): cycle is the next step"
    )


def do_cycle(cfg: Config, run: Run, kvm: Kvm | None) -> tuple[int, str]:
    code, message = do_stop(cfg, run, kvm)
    if code != EXIT_OK:
        return code, message + "; the VM was not started again"
    code, message = do_start(cfg, run)
    if code == EXIT_OK:
        return code, "the VM was stopped, its kvm process went away, and it is running again"
    return code, message


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing (unlike SIG_IGN it is not inherited by qm across exec)."""


def _finish(doc: dict[str, Any], stderr_line: str | None = None) -> int:
    write_fd(1, (json.dumps(doc, ensure_ascii=True) + "\n").encode())
    if stderr_line:
        write_fd(2, (stderr_line + "\n").encode("ascii", "replace"))
    return int(doc["exit_code"])


def execute(cfg: Config, cmd: Command, logger: Logger, raw: str, conn: str | None) -> int:
    """Run an accepted command under the config and return its exit code."""
    run = Run(cfg, cmd.verb)
    base = {"command": escape(raw), "connection": escape(conn), "verb": cmd.verb, "vmid": cfg.vmid}
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)

    def done(code: int, message: str, refused: str | None = None, level: int = 5) -> int:
        doc = run.document(code, message, refused)
        logger.log(
            level,
            {
                **base,
                "outcome": "ok" if code == 0 else (refused or "failed"),
                "exit_code": code,
                "message": message,
                "bundle_id": run.bundle_id,
                "state_before": run.state_before,
                "state_after": run.state_after,
            },
        )
        return _finish(doc, f"breakglass-verb: {message}" if code else None)

    if cmd.verb == "bundle":
        assert cmd.bundle_id is not None
        try:
            manifest, files = read_bundle(cfg, cmd.bundle_id)
        except (OSError, ValueError):
            return done(EXIT_ACTION_FAILED, f"no forensics bundle {cmd.bundle_id} on this host")
        run.bundle_id = cmd.bundle_id
        run.extra = {"manifest": manifest, "files": files}
        run.state_before = run.state_after = "unknown"
        return done(EXIT_OK, f"forensics bundle {cmd.bundle_id} ({len(files)} files)")

    if cmd.verb == "status":
        t0 = time.monotonic()
        kvm = find_kvm(cfg)
        run.step(
            "kvm process",
            kvm is not None,
            time.monotonic() - t0,
            f"pid {kvm.pid} state {kvm.state}" if kvm else "no live kvm process",
        )
        res = qm(cfg, run, "status", "--verbose", deadline_s=cfg.probe_s)
        qm_state = (
            parse_qm_status(res.output.decode("utf-8", "replace")) if res.status == "ok" else None
        )
        state = "stopped" if kvm is None else (qm_state or "unknown")
        run.state_before = run.state_after = state
        run.extra["kvm"] = {"pid": kvm.pid, "state": kvm.state} if kvm else None
        if res.status == "timeout":
            msg = f"qm status did not answer within {cfg.probe_s:g} s; " + (
                f"kvm pid {kvm.pid} is alive in state {kvm.state}: QEMU may be wedged"
                if kvm
                else "no kvm process is running"
            )
        else:
            msg = f"the VM is {state}" + (f" (kvm pid {kvm.pid}, state {kvm.state})" if kvm else "")
        return done(EXIT_OK, msg)

    if cmd.verb == "forensics":
        bundle = capture_forensics(cfg, "forensics")
        run.bundle_id = bundle.bundle_id
        run.probes = [p.public() for p in bundle.probes]
        state = _state_from_bundle(cfg, bundle)
        run.state_before = run.state_after = state
        run.step("forensics", True, bundle.elapsed_s, f"bundle {bundle.bundle_id}")
        timeouts = sum(p.status == "timeout" for p in bundle.probes)
        return done(
            EXIT_OK,
            f"forensics bundle {bundle.bundle_id} captured in "
            f"{bundle.elapsed_s:.1f} s ({timeouts} probes timed out)",
        )

    # Mutating verbs: once begun, finish even if the SSH client goes away.
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    lock = take_lock(cfg)
    if lock is None:
        return done(
            EXIT_BUSY,
            "another mutating verb is running on this VM: try again when it has finished",
            refused="busy",
            level=4,
        )
    try:
        t0 = time.monotonic()
        kvm = find_kvm(cfg)
        run.step(
            "kvm process",
            True,
            time.monotonic() - t0,
            f"pid {kvm.pid} state {kvm.state}" if kvm else "no live kvm process",
        )
        exempt = cmd.verb == "start" and kvm is None  # bringing a stopped VM back: never refused
        ledger_failed = ""  # set when the ledger is unusable: only the exempt start goes on

        def ledger_refusal(what: str) -> int:
            return done(
                EXIT_REFUSED,
                f"{cmd.verb} refused: ledger, the budget ledger {ledger_path(cfg)} {what}; "
                "without it the hourly budget and the cooldown cannot hold, so nothing was done."
                f" Free space in the state directory {cfg.state_dir} (or fix whatever else "
                "keeps the ledger from being read or written), then try again; start of a "
                "stopped VM still works",
                refused="ledger",
                level=3,
            )

        if not exempt:
            try:
                budget = budget_state(cfg)
            except OSError as exc:
                return ledger_refusal(f"cannot be read ({exc.strerror or exc})")
            if cmd.verb in COOLDOWN_VERBS and budget["cooldown_remaining_s"] > 0:
                return done(
                    EXIT_REFUSED,
                    f"{cmd.verb} refused: cooldown, the last reset, stop or cycle"
                    f" was under {cfg.cooldown_s:g} s ago ({budget['cooldown_remaining_s']}"
                    " s left)",
                    refused="cooldown",
                    level=4,
                )
            if budget["used"] >= budget["limit"]:
                return done(
                    EXIT_REFUSED,
                    f"{cmd.verb} refused: budget, {budget['used']} mutating "
                    f"verbs in the last hour (limit {budget['limit']})",
                    refused="budget",
                    level=4,
                )
        t0 = time.monotonic()
        try:
            append_ledger(
                cfg,
                {
                    "ts": time.time(),
                    "phase": "begun",
                    "verb": cmd.verb,
                    "exempt": exempt,
                    "pid": os.getpid(),
                },
            )
        except OSError as exc:
            # Unrecorded, this verb would not count: fail closed, except the exempt start.
            if not exempt:
                return ledger_refusal(f"cannot be written ({exc.strerror or exc})")
            ledger_failed = f"cannot be written ({exc.strerror or exc})"
            run.step("ledger begun", False, time.monotonic() - t0, ledger_failed)
        logger.log(5, {**base, "outcome": "begun", "ledger": ledger_failed or "ok"})

        # Forensics first, unconditionally. A capture that cannot be stored (say the host's disk
        # is full) is reported, but does not stand between the VM and its recovery.
        t0 = time.monotonic()
        try:
            bundle = capture_forensics(cfg, cmd.verb)
        except OSError as exc:
            run.step("forensics", False, time.monotonic() - t0, f"no bundle stored: {exc}")
            run.state_before, _, _ = observe_state(cfg, cfg.probe_s)
        else:
            run.bundle_id = bundle.bundle_id
            run.probes = [p.public() for p in bundle.probes]
            run.state_before = _state_from_bundle(cfg, bundle)
            run.step("forensics", True, bundle.elapsed_s, f"bundle {bundle.bundle_id}")

        if cmd.verb == "reset":
            code, message = do_reset(cfg, run)
        elif cmd.verb == "stop":
            code, message = do_stop(cfg, run, find_kvm(cfg) or kvm)
        elif cmd.verb == "start":
            if find_kvm(cfg) is not None and run.state_before == "running":
                run.state_after = "running"
                code, message = EXIT_OK, "the VM is already running: nothing to start"
            else:
                code, message = do_start(cfg, run)
        else:
            code, message = do_cycle(cfg, run, find_kvm(cfg) or kvm)
        # The action is done: a ledger that cannot take its outcome is reported, not fatal
        # (budget and cooldown count the "begun" entries).
        t0 = time.monotonic()
        try:
            append_ledger(
                cfg,
                {
                    "ts": time.time(),
                    "phase": "done",
                    "verb": cmd.verb,
                    "exit_code": code,
                    "bundle_id": run.bundle_id,
                    "state_before": run.state_before,
                    "state_after": run.state_after,
                    "cold_case": run.cold_case,
                },
            )
        except OSError as exc:
            ledger_failed = ledger_failed or f"cannot be written ({exc.strerror or exc})"
            run.step("ledger done", False, time.monotonic() - t0, f"{exc.strerror or exc}")
        if ledger_failed:
            message += (
                f"; the budget ledger {ledger_path(cfg)} {ledger_failed}: free space in the "
                f"state directory {cfg.state_dir}, or further mutating verbs are refused"
            )
        return done(code, message, level=5 if code == EXIT_OK else 3)
    finally:
        os.close(lock)


def _state_from_bundle(cfg: Config, bundle: Bundle) -> str:
    if find_kvm(cfg) is None:
        return "stopped"
    if bundle.qmp_status is not None:
        return describe_qmp_status(bundle.qmp_status)
    if bundle.qm_status_text:
        return parse_qm_status(bundle.qm_status_text) or "unknown"
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the forced command: returns the exit code (see module docstring)."""
    del argv  # the command comes from SSH_ORIGINAL_COMMAND, never from argv
    # A gone client must not kill us mid-verb: SIGPIPE stays ignored (Python's default) and
    # writes tolerate EPIPE; SIGHUP is ignored from the start.
    signal.signal(signal.SIGHUP, _ignore)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    raw = os.environ.get("SSH_ORIGINAL_COMMAND")
    conn = os.environ.get("SSH_CONNECTION")
    cfg: Config | None = None
    cfg_error: ConfigInvalid | None = None
    try:
        cfg = load_config()
    except ConfigInvalid as exc:
        cfg_error = exc
    logger = Logger(
        cfg.syslog_socket if cfg else DEFAULT_CONFIG["log"]["syslog_socket"],
        cfg.state_dir if cfg else None,
    )
    try:
        cmd = parse_command(raw)
    except BadInput as exc:
        run = Run(cfg, None)
        message = f"refused: {exc}"
        logger.log(
            4,
            {
                "command": escape(raw),
                "connection": escape(conn),
                "outcome": "bad_input",
                "exit_code": EXIT_BAD_INPUT,
                "message": message,
            },
        )
        # A refusal reads nothing of the host's state (no ledger, no lock, no qm).
        doc = run.document(EXIT_BAD_INPUT, message, refused="bad_input", budget=False)
        return _finish(doc, f"breakglass-verb: {message}")
    if cfg is None:
        assert cfg_error is not None
        run = Run(None, cmd.verb)
        message = f"invalid config, nothing done: {cfg_error}"
        logger.log(
            3,
            {
                "command": escape(raw),
                "connection": escape(conn),
                "outcome": "config_invalid",
                "exit_code": EXIT_CONFIG_INVALID,
                "message": message,
            },
        )
        return _finish(run.document(EXIT_CONFIG_INVALID, message), f"breakglass-verb: {message}")
    try:
        return execute(cfg, cmd, logger, raw or "", conn)
    except Exception as exc:
        message = (
            f"internal error ({type(exc).__name__}: {exc}); the verb's log on the host has "
            "the decision trail"
        )
        logger.log(
            3,
            {
                "command": escape(raw),
                "connection": escape(conn),
                "outcome": "internal",
                "exit_code": EXIT_INTERNAL,
                "message": message,
            },
        )
        return _finish(
            Run(cfg, cmd.verb).document(EXIT_INTERNAL, message), f"breakglass-verb: {message}"
        )


if __name__ == "__main__":
    sys.exit(main())
