#!/usr/bin/env python3
"""breakglass-verb: the forced-command program on the Proxmox VE host.

The breakglass agent's PVE key can run this program and nothing else (``command="…",restrict`` in
``authorized_keys``). It reads ``SSH_ORIGINAL_COMMAND``, accepts exactly one forced-command verb
for the one VM named in its config, and answers with one JSON document on stdout, which carries
``protocol`` (PROTOCOL_VERSION: the console checks it; this file is copied to the host by hand).

    status | forensics | reset | stop | start | cycle      (the VM id comes from the config)
    bundle <bundle_id>                                      (read-only: fetch a forensics bundle)

Run by the owner on the host, ``breakglass-verb --preflight`` checks read-only what the verb
relies on, one line per check, and exits 1 if any check fails (0 otherwise);
``breakglass-verb --version`` prints this file's release and protocol.

Exit codes: 0 OK, 2 BAD_INPUT (refused input: no qm call, no lock), 3 BUSY (another mutating verb,
or another forensics capture, holds the lock), 4 REFUSED (budget, cooldown, forensics budget, or
a budget ledger that cannot be written or read), 5 ACTION_FAILED (includes "kvm would not die:
host-level recovery, the cold path, is needed"), 6 CONFIG_INVALID (nothing done),
7 PRECONDITION (the host's state forbids it, nothing done: the VM is locked, HA-managed, the node
has no quorum, /etc/pve does not answer, or a kvm is alive in D state — tell the owner, do not
retry), 8 IN_PROGRESS (a qm task the verb started is still running past its ceiling; it was not
killed: after a cycle, "stop still in progress, start not attempted" — call start once status
shows the VM stopped), 70 INTERNAL.

Mutating verbs (reset stop start cycle): lock, preconditions (lock, HA, quorum, liveness), budget,
forensics bundle first (unconditionally), act, verify, record in the ledger, log. Once begun they
finish even if the SSH client goes away, and a qm task they start is never killed.

How Proxmox behaves, and where its source says so (proxmox/qemu-server unless named):
- ``qm status --verbose`` sets ``qmpstatus`` to ``running`` when QMP does not answer within 3 s;
  only ``running-qemu``/``running-machine``/``blockstat`` go missing (``PVE/QemuServer.pm``
  vmstatus). The verb trusts ``qmpstatus`` only beside ``running-qemu``, and asks QMP itself.
- QEMU's monitor takes one client and a listen backlog of one (QEMU ``chardev/char-socket.c``):
  further connects fail at once with EAGAIN; ``PVE/QMPClient.pm`` retries them every 100 ms.
- A pid file is not liveness: Proxmox checks ``/proc/<pid>/cmdline`` for ``-pidfile``
  (``PVE/QemuServer/Helpers.pm`` vm_running_locally), and the stop clean-up unlinks the pid file
  even when a kvm in D state survived SIGKILL (``_do_vm_stop``, ``vm_stop_cleanup``). The VM's
  scope (``/sys/fs/cgroup/qemu.slice/<vmid>.scope/cgroup.procs``) tells the truth.
- ``qm`` runs its work in a task worker that calls ``setsid()`` and writes through its parent
  (pve-common ``PVE/RESTEnvironment.pm`` fork_worker): killing ``qm`` kills the worker at its next
  write, half done. A stop may take 10 (lock) + 60 (QMP quit) + ``--timeout`` + 10 s and more.
- A ``lock:`` in the VM's config fails qm's tasks with ``VM is locked (backup)``; the config's
  flock is waited for 10 s (pve-guest-common ``PVE/AbstractConfig.pm``).
- For an HA-managed VM (``/etc/pve/ha/resources.cfg``) ``qm start``/``qm stop`` only ask the HA
  stack and return at once; ``qm reset`` is not redirected (``PVE/API2/Qemu.pm``).
- ``qm start`` needs quorum (``/etc/pve/local`` writable: pve-cluster ``PVE/Cluster.pm``
  check_cfs_quorum, "cluster not ready - no quorum?"); stop does not.

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
import stat
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The version of the JSON document and the exit codes: bumped when either changes meaning. The
# console (breakglass_tui.hosts.pve) compares it with its own copy of this module's value.
# 1: the first verb (no "protocol" field). 2: protocol, exit codes 7 and 8, lock/ha/quorum/
# monitor/upid fields, states from QMP and the VM's scope.
PROTOCOL_VERSION = 2

EXIT_OK = 0
EXIT_PREFLIGHT_FAILED = 1  # --preflight only
EXIT_BAD_INPUT = 2
EXIT_BUSY = 3
EXIT_REFUSED = 4
EXIT_ACTION_FAILED = 5
EXIT_CONFIG_INVALID = 6
EXIT_PRECONDITION = 7
EXIT_IN_PROGRESS = 8
EXIT_INTERNAL = 70

VERBS = ("status", "forensics", "reset", "stop", "start", "cycle")
MUTATING_VERBS = frozenset({"reset", "stop", "start", "cycle"})
# stop is here too: otherwise stop then start (exempt when stopped) is a cycle with no cooldown.
COOLDOWN_VERBS = frozenset({"reset", "stop", "cycle"})
BUDGET_WINDOW_S = 3600

# The document's "refused" values: why nothing was done.
REFUSED_BAD_INPUT = "bad_input"
REFUSED_BUSY = "busy"
REFUSED_BUDGET = "budget"
REFUSED_COOLDOWN = "cooldown"
REFUSED_LEDGER = "ledger"
REFUSED_FORENSICS_BUDGET = "forensics_budget"
REFUSED_LOCKED = "locked"  # a lock: in the VM's config (backup, migrate, snapshot, ...)
REFUSED_HA = "ha_managed"  # stop/cycle of a VM the HA stack manages
REFUSED_NO_QUORUM = "no_quorum"  # cycle/start/stop without quorum: start could not follow
REFUSED_PMXCFS = "pmxcfs"  # /etc/pve did not answer: every qm call would hang on it
REFUSED_KVM_ALIVE = "kvm_alive"  # a kvm (D state) lives on in the VM's scope
# Refusals that come from the host's state: tell the owner; retrying does not help.
PRECONDITION_REFUSALS = frozenset(
    {REFUSED_LOCKED, REFUSED_HA, REFUSED_NO_QUORUM, REFUSED_PMXCFS, REFUSED_KVM_ALIVE}
)
# Policy refusals: they clear with time (or with free space for the ledger).
POLICY_REFUSALS = frozenset(
    {REFUSED_BUDGET, REFUSED_COOLDOWN, REFUSED_LEDGER, REFUSED_FORENSICS_BUDGET}
)
# Locks an owner may let `stop` skip (policy.stop_skips_backup_lock): a backup only, never
# migrate, snapshot, suspend or the rest.
SKIPPABLE_LOCKS = frozenset({"backup"})

# State words of the document's state_before/state_after.
STATE_STOPPED = "stopped"
STATE_RUNNING = "running"
STATE_UNKNOWN = "unknown"
STATE_KVM_ALIVE_D = "kvm alive (D state)"
STATE_MONITOR_QUEUE_FULL = "monitor unresponsive (queue full)"
STATE_MONITOR_NO_ANSWER = "monitor unresponsive (no answer)"
STATE_MONITOR_REFUSED = "monitor unresponsive (connection refused)"
STATE_MONITOR_NO_SOCKET = "monitor unresponsive (no socket)"

# Left in state_dir when a cycle stopped the VM but did not start it: the next start completes
# the cycle, and status reports it (pending_start).
PENDING_START_MARKER = "pending-start.json"

# The whole accepted language. fullmatch on the raw string: no strip, no case folding, no shlex.
MAX_COMMAND_LEN = 128
VERB_RE = re.compile(r"status|forensics|reset|stop|start|cycle")
BUNDLE_ID_PATTERN = r"[0-9]{8}T[0-9]{6}Z-(?:forensics|reset|stop|start|cycle)-[0-9a-f]{6}"
BUNDLE_ID_RE = re.compile(BUNDLE_ID_PATTERN)
BUNDLE_RE = re.compile(r"bundle (" + BUNDLE_ID_PATTERN + r")")
PREFLIGHT_ARG = "--preflight"
# This file's release (it is copied alone onto the host: no package metadata to ask there). The
# same as the project's version (tests/packaging checks it); `breakglass-verb --version` prints it.
VERSION = "0.1.0"
VERSION_ARG = "--version"

DEFAULT_CONFIG_PATH = "/etc/breakglass/verb.toml"
CONFIG_ENV = "BREAKGLASS_VERB_CONFIG"
COLD_PATH = "host-level recovery — the cold path — is needed"

DEFAULT_CONFIG: dict[str, Any] = {
    "vmid": 102,
    "qm": "/usr/sbin/qm",
    "qemu_run_dir": "/var/run/qemu-server",
    "state_dir": "/var/lib/breakglass",
    "pve_dir": "/etc/pve",
    "cgroup_dir": "/sys/fs/cgroup",
    "pve_log_dir": "/var/log/pve",
    "budget": {"max_mutating_per_hour": 4, "cooldown_s": 300, "max_forensics_per_hour": 12},
    "deadlines": {
        "forensics_s": 20,
        "probe_s": 5,
        "qm_action_s": 240,
        "qm_stop_timeout_s": 30,
        "verify_s": 30,
        "ha_verify_s": 120,
    },
    "retention": {
        "keep_bundles": 20,
        "keep_action_bundles": 50,
        "max_bundle_bytes": 8_000_000,
        "max_total_bytes": 100_000_000,
    },
    "policy": {"stop_skips_backup_lock": False},
    "log": {"syslog_socket": "/dev/log"},
    "preflight": {"sshd": "/usr/sbin/sshd", "sshd_config": "/etc/ssh/sshd_config"},
}
_PATH_KEYS = (
    "qm",
    "qemu_run_dir",
    "state_dir",
    "pve_dir",
    "cgroup_dir",
    "pve_log_dir",
    "log.syslog_socket",
    "preflight.sshd",
    "preflight.sshd_config",
)

# Children get a minimal, fixed environment: nothing of the SSH session leaks into qm.
CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}
JOURNAL_LINES = 200
DMESG_LINES = 200
MAX_THREADS_READ = 64
QMP_MAX_MESSAGE = 4_000_000
QMP_EAGAIN_RETRY_S = 1.0  # how long a connect is retried while QEMU's queue is full
TASK_LOGS_KEPT = 50
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre"}
)


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
    pve_dir: str
    cgroup_dir: str
    pve_log_dir: str
    max_mutating_per_hour: int
    cooldown_s: float
    max_forensics_per_hour: int
    forensics_s: float
    probe_s: float
    qm_action_s: float
    qm_stop_timeout_s: int
    verify_s: float
    ha_verify_s: float
    keep_bundles: int
    keep_action_bundles: int
    max_bundle_bytes: int
    max_total_bytes: int
    stop_skips_backup_lock: bool
    syslog_socket: str
    sshd: str
    sshd_config: str

    @property
    def pid_file(self) -> Path:
        return Path(self.qemu_run_dir) / f"{self.vmid}.pid"

    @property
    def qmp_socket(self) -> Path:
        return Path(self.qemu_run_dir) / f"{self.vmid}.qmp"

    @property
    def bundles_dir(self) -> Path:
        return Path(self.state_dir) / "bundles"

    @property
    def scope_dir(self) -> Path:
        return Path(self.cgroup_dir) / "qemu.slice" / f"{self.vmid}.scope"

    @property
    def vm_config_file(self) -> Path:
        return Path(self.pve_dir) / "qemu-server" / f"{self.vmid}.conf"

    @property
    def tasks_active_file(self) -> Path:
        return Path(self.pve_log_dir) / "tasks" / "active"


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
    b, d, r, p = merged["budget"], merged["deadlines"], merged["retention"], merged["policy"]
    for name in ("max_mutating_per_hour", "max_forensics_per_hour"):
        _check_number(f"budget.{name}", b[name], integer=True, minimum=1, positive=True)
    _check_number("budget.cooldown_s", b["cooldown_s"], integer=False, minimum=0, positive=False)
    for name in ("forensics_s", "probe_s", "qm_action_s", "verify_s", "ha_verify_s"):
        _check_number(f"deadlines.{name}", d[name], integer=False, minimum=0, positive=True)
    # qm stop --timeout takes whole seconds
    _check_number(
        "deadlines.qm_stop_timeout_s",
        d["qm_stop_timeout_s"],
        integer=True,
        minimum=1,
        positive=True,
    )
    for name in ("keep_bundles", "keep_action_bundles", "max_bundle_bytes", "max_total_bytes"):
        _check_number(f"retention.{name}", r[name], integer=True, minimum=1, positive=True)
    if not isinstance(p["stop_skips_backup_lock"], bool):
        raise ConfigInvalid(
            "config key policy.stop_skips_backup_lock must be true or false, got "
            f"{p['stop_skips_backup_lock']!r}"
        )
    return Config(
        vmid=vmid,
        qm=merged["qm"],
        qemu_run_dir=merged["qemu_run_dir"],
        state_dir=merged["state_dir"],
        pve_dir=merged["pve_dir"],
        cgroup_dir=merged["cgroup_dir"],
        pve_log_dir=merged["pve_log_dir"],
        max_mutating_per_hour=b["max_mutating_per_hour"],
        cooldown_s=float(b["cooldown_s"]),
        max_forensics_per_hour=b["max_forensics_per_hour"],
        forensics_s=float(d["forensics_s"]),
        probe_s=float(d["probe_s"]),
        qm_action_s=float(d["qm_action_s"]),
        qm_stop_timeout_s=int(d["qm_stop_timeout_s"]),
        verify_s=float(d["verify_s"]),
        ha_verify_s=float(d["ha_verify_s"]),
        keep_bundles=r["keep_bundles"],
        keep_action_bundles=r["keep_action_bundles"],
        max_bundle_bytes=r["max_bundle_bytes"],
        max_total_bytes=r["max_total_bytes"],
        stop_skips_backup_lock=p["stop_skips_backup_lock"],
        syslog_socket=merged["log"]["syslog_socket"],
        sshd=merged["preflight"]["sshd"],
        sshd_config=merged["preflight"]["sshd_config"],
    )


def config_path(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(environ: dict[str, str] | None = None) -> Config:
    """Read the config named by $BREAKGLASS_VERB_CONFIG, else /etc/breakglass/verb.toml.

    A missing default file means the documented defaults; a named file that is missing is an
    error (someone meant a config and we must not silently act on another VM's defaults).
    """
    env = os.environ if environ is None else environ
    path = config_path(env)
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


# ----------------------------------------------------------------------------- mutating qm tasks


@dataclass
class TaskResult:
    """How a mutating qm call went. status: ok | error | running (still at work past the
    ceiling: left to finish, never killed) | unstarted (it could not be run at all)."""

    status: str
    returncode: int | None
    output: str
    elapsed_s: float
    upid: str | None = None
    pid: int | None = None
    starttime: int | None = None
    detail: str = ""
    log_file: str | None = None


def _children(pid: int) -> list[int]:
    """The PIDs whose parent is pid (a /proc scan)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            st = read_stat(int(entry))
            if st is not None and st[2] == pid:
                found.append(int(entry))
    return found


def _read_cmdline(pid: int, limit: int = 4096) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read(limit)
    except OSError:
        return None


def active_task_upids(cfg: Config) -> set[str]:
    """The UPIDs listed in /var/log/pve/tasks/active (running and recently ended tasks)."""
    path = cfg.tasks_active_file
    with contextlib.suppress(OSError), open(path, encoding="ascii", errors="replace") as fh:
        return {line.split()[0] for line in fh.read(1_000_000).splitlines() if line.split()}
    return set()


def find_task_upid(cfg: Config, qm_pid: int, dtype: str, known: set[str]) -> str | None:
    """The UPID of the task worker `qm` forked: its command line is ``task UPID:…``
    (pve-common PVE/RESTEnvironment.pm fork_worker), else the newest task of this type and VM
    in /var/log/pve/tasks/active that was not there before (`known`)."""
    for child in _children(qm_pid):
        raw = _read_cmdline(child) or b""
        first = raw.split(b"\0")[0].decode("ascii", "replace")
        if first.startswith("task UPID:"):
            return first[5:].split()[0]
    best: tuple[int, str] | None = None
    for upid in active_task_upids(cfg) - known:
        parts = upid.split(":")
        if len(parts) < 8 or parts[5] != dtype or parts[6] != str(cfg.vmid):
            continue
        with contextlib.suppress(ValueError):
            started = int(parts[4], 16)
            if best is None or started >= best[0]:
                best = (started, upid)
    return best[1] if best else None


def run_qm_task(cfg: Config, argv: list[str], dtype: str, tag: str) -> TaskResult:
    """Run a mutating ``qm`` call and wait for it up to the ceiling (deadlines.qm_action_s) —
    but NEVER kill it: qm's worker would die half done (a stop killed between its SIGTERM and
    SIGKILL of a hung kvm). Its output goes to a file under state_dir/tasks, not to a pipe of
    ours, so it can outlive us; past the ceiling the result is "running" with the UPID."""
    t0 = time.monotonic()
    known = active_task_upids(cfg)
    log_file: str | None = None
    out_fd = -1
    with contextlib.suppress(OSError):
        tasks = Path(cfg.state_dir) / "tasks"
        tasks.mkdir(mode=0o700, exist_ok=True)
        log_file = str(tasks / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{tag}.log")
        out_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    if out_fd < 0:
        log_file = None
        out_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            env=CHILD_ENV,
            start_new_session=True,  # our signals never reach it; it is not ours to kill
            close_fds=True,
        )
    except OSError as exc:
        return TaskResult(
            "unstarted", None, "", time.monotonic() - t0, detail=f"cannot run {argv[0]}: {exc}"
        )
    finally:
        os.close(out_fd)
    st = read_stat(proc.pid)
    upid: str | None = None
    end = t0 + cfg.qm_action_s
    next_look = 0.0
    while proc.poll() is None and time.monotonic() < end:
        if upid is None and time.monotonic() >= next_look:
            upid = find_task_upid(cfg, proc.pid, dtype, known)
            next_look = time.monotonic() + 0.1
        time.sleep(0.02)
    output = ""
    if log_file:
        with contextlib.suppress(OSError), open(log_file, "rb") as fh:
            output = fh.read(65536).decode("utf-8", "replace")
    if proc.returncode is None:
        upid = upid or find_task_upid(cfg, proc.pid, dtype, known)
        return TaskResult(
            "running",
            None,
            output,
            time.monotonic() - t0,
            upid=upid,
            pid=proc.pid,
            starttime=st[1] if st else None,
            detail=f"still running after {cfg.qm_action_s:g} s (not killed)",
            log_file=log_file,
        )
    if upid is None:
        upid = find_task_upid(cfg, proc.pid, dtype, known)
    rc = proc.returncode
    text = output.strip()[-300:]
    detail = "" if rc == 0 else (f"exit status {rc}: {text}" if text else f"exit status {rc}")
    return TaskResult(
        "ok" if rc == 0 else "error",
        rc,
        output,
        time.monotonic() - t0,
        upid=upid,
        pid=proc.pid,
        detail=detail,
        log_file=log_file,
    )


def prune_task_logs(cfg: Config) -> None:
    with contextlib.suppress(OSError):
        tasks = Path(cfg.state_dir) / "tasks"
        logs = sorted(p for p in os.listdir(tasks) if p.endswith(".log"))
        for name in logs[: max(0, len(logs) - TASK_LOGS_KEPT)]:
            with contextlib.suppress(OSError):
                os.unlink(tasks / name)


def hold_lock_while_task_runs(lock_fd: int, task: TaskResult, cfg: Config) -> None:
    """Keep the verb's lock for as long as a qm task it started runs, after the verb itself has
    answered: a detached child holds the lock's file description until the task has ended,
    then records the end in the ledger and exits."""
    if task.pid is None:
        return
    worker = _upid_pid(task.upid)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fork() with threads alive: the child runs no locks
            pid = os.fork()
    except OSError:
        return  # the lock goes with us; the task still runs, untouched
    if pid != 0:
        return
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        end = time.monotonic() + 6 * 3600  # a task that runs for hours is the cold path's
        while time.monotonic() < end:
            st = read_stat(task.pid)
            qm_alive = (
                st is not None
                and st[0] not in ("Z", "X")
                and (task.starttime is None or st[1] == task.starttime)
            )
            worker_alive = worker is not None and _live(worker) is not None
            if not qm_alive and not worker_alive:
                break
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            append_ledger(
                cfg,
                {"ts": time.time(), "phase": "task_ended", "upid": task.upid, "pid": task.pid},
            )
    finally:
        os._exit(0)


def _upid_pid(upid: str | None) -> int | None:
    parts = (upid or "").split(":")
    if len(parts) >= 3:
        with contextlib.suppress(ValueError):
            return int(parts[2], 16)
    return None


# ----------------------------------------------------------------------------- isolated reads


def call_isolated(fn: Any, deadline_s: float) -> tuple[str, Any]:
    """Run fn() in a forked child and return ("ok", its JSON-able result), ("error", message)
    or ("timeout", None) past `deadline_s`. For reads that can block for good — a hung pmxcfs
    (FUSE) under /etc/pve — and would leave a thread stuck in D state, so that the verb could not
    even exit: the child holds none of our file descriptors (stdio to /dev/null, the lock and the
    SSH pipes closed) and is abandoned when it hangs."""
    try:
        r, w = os.pipe()
    except OSError as exc:
        return "error", f"cannot make a pipe: {exc}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fork() while forensics threads may be alive
            pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        return "error", f"cannot fork a reader: {exc}"
    if pid == 0:
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.closerange(3, w)
            os.closerange(w + 1, 4096)
            try:
                payload = {"ok": fn()}
            except Exception as exc:
                payload = {"error": f"{type(exc).__name__}: {exc}"}
            write_all(w, json.dumps(payload, default=str).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    end = time.monotonic() + max(0.0, deadline_s)
    chunks: list[bytes] = []
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return "timeout", None
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                data = os.read(r, 65536)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(r)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError:
        return "error", "the reading process died"
    if "error" in payload:
        return "error", payload["error"]
    return "ok", payload.get("ok")


def read_with_deadline(path: str, deadline_s: float, limit: int = 65536) -> bytes | None:
    """Read a /proc file in a thread and give up past the deadline (None). A read of
    /proc/<pid>/cmdline waits for the process's memory map lock, which a kvm stuck in the kernel
    can hold; that wait is killable, so an abandoned thread cannot keep us from exiting."""
    box: list[bytes | None] = [None]

    def read() -> None:
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            box[0] = fh.read(limit)

    th = threading.Thread(target=read, daemon=True, name="read-" + path)
    th.start()
    th.join(deadline_s)
    return box[0] if not th.is_alive() else None


# ----------------------------------------------------------------------------- QMP


class QmpError(Exception):
    """QEMU answered a QMP command with an error, or the monitor misbehaved."""


class QmpTimeout(QmpError):
    """QEMU's monitor did not answer within the deadline."""


class QmpUnavailable(QmpError):
    """The monitor could not be connected to. `kind`: "queue full" (EAGAIN: QEMU's listen
    queue is full — its main loop is not accepting), "connection refused", "no socket"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def qmp_connect(path: str, deadline: float) -> socket.socket:
    """Connect to QEMU's monitor as Proxmox's QMPClient does: non-blocking, retried every 100 ms
    while the listen queue is full (EAGAIN) — but briefly (QMP_EAGAIN_RETRY_S), never past the
    deadline. Raises QmpUnavailable."""
    give_up = min(deadline, time.monotonic() + QMP_EAGAIN_RETRY_S)
    tries = 0
    while True:
        tries += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            return sock
        except (BlockingIOError, InterruptedError):
            sock.close()
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ECONNREFUSED:
                raise QmpUnavailable(
                    "connection refused", f"QMP refused the connection: {exc}"
                ) from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise QmpUnavailable("no socket", f"no QMP socket at {path}") from None
            raise QmpUnavailable("error", f"QMP connect failed: {exc}") from None
        if time.monotonic() >= give_up:
            raise QmpUnavailable(
                "queue full",
                f"QMP connect failed with EAGAIN {tries} times in {QMP_EAGAIN_RETRY_S:g} s: "
                "QEMU's monitor queue is full (its main loop is not accepting)",
            )
        time.sleep(0.1)


class Qmp:
    """A minimal QMP client over the unix socket, every operation under a socket timeout."""

    def __init__(self, path: str, deadline: float) -> None:
        self.deadline = deadline
        self.buf = b""
        self.sock = qmp_connect(path, deadline)
        try:
            self._set_timeout(deadline)
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
            except OSError as exc:
                raise QmpError(f"QMP connection failed: {exc}") from None
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


@dataclass
class Monitor:
    """What the verb's own QMP check found: ok with QEMU's run state, or why not."""

    ok: bool
    status: dict[str, Any] | None = None
    kind: str = ""  # when not ok: queue full | no answer | connection refused | no socket | error
    detail: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "status": (self.status or {}).get("status") if self.ok else None,
            "unresponsive": None if self.ok else self.kind,
            "detail": self.detail,
        }


def monitor_from_error(exc: BaseException) -> Monitor:
    if isinstance(exc, QmpUnavailable):
        return Monitor(False, kind=exc.kind, detail=str(exc))
    if isinstance(exc, QmpTimeout | TimeoutError):
        return Monitor(False, kind="no answer", detail=str(exc) or "QMP did not answer in time")
    return Monitor(False, kind="error", detail=str(exc))


def check_monitor(cfg: Config, timeout_s: float) -> Monitor:
    """The verb-side QMP check: one short connection (greeting, capabilities, query-status),
    closed at once — QEMU serves one client, and pvestatd, the GUI and qm wait behind it."""
    deadline = time.monotonic() + timeout_s
    try:
        qmp = Qmp(str(cfg.qmp_socket), deadline)
    except (QmpError, OSError) as exc:
        return monitor_from_error(exc)
    try:
        result = qmp.execute("query-status", deadline=deadline)
    except (QmpError, OSError) as exc:
        return monitor_from_error(exc)
    finally:
        qmp.close()
    if not isinstance(result, dict):
        return Monitor(False, kind="error", detail="query-status returned something unexpected")
    return Monitor(True, status=result, detail="QMP query-status")


def qmp_query_status(cfg: Config, timeout_s: float) -> dict[str, Any]:
    """query-status over a fresh QMP connection, time-boxed; raises QmpError/OSError."""
    monitor = check_monitor(cfg, timeout_s)
    if not monitor.ok or monitor.status is None:
        raise QmpError(monitor.detail)
    return monitor.status


# ----------------------------------------------------------------------------- the kvm process


@dataclass(frozen=True)
class Kvm:
    """A kvm process, identified by pid and start time (a pid can be reused)."""

    pid: int
    starttime: int
    state: str  # R S D Z T ...


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, start time in ticks, parent pid) from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[19]), int(rest[1])
    except (IndexError, ValueError):
        return None


def _live(pid: int) -> Kvm | None:
    st = read_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return None
    return Kvm(pid, st[1], st[0])


def cmdline_is_vm_kvm(raw: bytes, pid_file: Path) -> bool:
    """Proxmox's check (PVE/QemuServer/Helpers.pm parse_cmdline, vm_running_locally): argv[0]
    ends in ``kvm`` or is ``qemu-*``, and ``-pidfile`` names this VM's pid file."""
    args = raw.split(b"\0")
    if not args or not re.search(rb"(kvm$|(^|/)qemu-[^/]+$)", args[0]):
        return False
    for i, arg in enumerate(args[:-1]):
        if arg in (b"-pidfile", b"--pidfile"):
            return args[i + 1] == str(pid_file).encode()
    return False


@dataclass
class VmProcesses:
    """The VM's processes: the pid file's kvm (checked like Proxmox), and the live processes of
    the VM's cgroup scope, which outlive a pid file that Proxmox's stop clean-up deleted."""

    kvm: Kvm | None
    scope: list[Kvm]
    pid_file_pid: int | None
    detail: str

    @property
    def orphans(self) -> list[Kvm]:
        return [k for k in self.scope if self.kvm is None or k.pid != self.kvm.pid]

    @property
    def survivor(self) -> Kvm | None:
        """A process of the VM that lives on without a (valid) pid file; D state first."""
        if self.kvm is not None or not self.scope:
            return None
        return sorted(self.scope, key=lambda k: k.state != "D")[0]

    def public(self) -> dict[str, Any] | None:
        k = self.kvm or self.survivor
        if k is None:
            return None
        return {"pid": k.pid, "state": k.state, "pid_file": self.kvm is not None}


def scope_processes(cfg: Config) -> list[Kvm]:
    """Live kvm processes listed in the VM's scope (cgroup v2: qemu.slice/<vmid>.scope). A helper
    the scope may also hold (swtpm, say) is not the VM; a command line that cannot be read in
    time — the read waits on a stuck kvm's memory lock — is taken for the kvm's."""
    try:
        with open(cfg.scope_dir / "cgroup.procs", encoding="ascii", errors="replace") as fh:
            pids = [int(p) for p in fh.read(65536).split() if p.isdigit()]
    except OSError:
        return []
    found = []
    for kvm in (_live(p) for p in pids[:64]):
        if kvm is None:
            continue
        raw = read_with_deadline(f"/proc/{kvm.pid}/cmdline", 0.5)
        args = raw.split(b"\0") if raw else []
        if raw is None or (args and re.search(rb"(kvm$|(^|/)qemu-[^/]+$)", args[0])):
            found.append(kvm)
    return found


def vm_processes(cfg: Config, cmdline_deadline_s: float = 1.0) -> VmProcesses:
    """The pid file's process if it is this VM's kvm (its command line carries ``-pidfile``
    with this pid file; a command line that cannot be read in time — the read waits on a
    stuck kvm's memory lock — is taken as the kvm's), and the scope's live processes."""
    scope = scope_processes(cfg)
    try:
        text = cfg.pid_file.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return VmProcesses(None, scope, None, "no pid file")
    if not text.isdigit() or int(text) <= 1:
        return VmProcesses(None, scope, None, "the pid file holds no pid")
    pid = int(text)
    kvm = _live(pid)
    if kvm is None:
        return VmProcesses(None, scope, pid, f"the pid file's process {pid} is gone")
    raw = read_with_deadline(f"/proc/{pid}/cmdline", cmdline_deadline_s)
    if raw is None:
        return VmProcesses(kvm, scope, pid, "its command line could not be read in time")
    if not cmdline_is_vm_kvm(raw, cfg.pid_file):
        return VmProcesses(None, scope, pid, f"pid {pid} is not this VM's kvm (its command line)")
    return VmProcesses(kvm, scope, pid, "pid file and command line")


def find_kvm(cfg: Config) -> Kvm | None:
    """The VM's live kvm process per its pid file (checked like Proxmox), or None."""
    return vm_processes(cfg).kvm


def kvm_alive(kvm: Kvm) -> Kvm | None:
    """The same process (pid and start time) if it still lives, with its current state."""
    now = _live(kvm.pid)
    if now is None or now.starttime != kvm.starttime:
        return None
    return now


def describe_qmp_status(status: dict[str, Any]) -> str:
    """QMP query-status -> the document's state words."""
    s = str(status.get("status", "unknown"))
    if s == "running" or status.get("running") is True:
        return STATE_RUNNING
    if s == "io-error":
        return "paused (io-error)"
    if s in ("paused", "suspended", "prelaunch", "inmigrate", "postmigrate"):
        return "paused" if s == "paused" else f"paused ({s})"
    return s


def kvm_alive_words(state: str) -> str:
    return STATE_KVM_ALIVE_D if state == "D" else f"kvm alive ({state} state)"


def monitor_words(monitor: Monitor) -> str:
    return {
        "queue full": STATE_MONITOR_QUEUE_FULL,
        "no answer": STATE_MONITOR_NO_ANSWER,
        "connection refused": STATE_MONITOR_REFUSED,
        "no socket": STATE_MONITOR_NO_SOCKET,
    }.get(monitor.kind, f"monitor unresponsive ({monitor.kind or 'error'})")


def decide_state(procs: VmProcesses, monitor: Monitor | None) -> str:
    """The VM's state from its processes and the verb's own QMP check. A stopped VM has no
    process in its scope; a VM whose pid file is gone but whose kvm lives is "kvm alive"; a
    live kvm is what QMP says, else the monitor's trouble — or D state, when its kvm is in D."""
    if procs.kvm is None:
        survivor = procs.survivor
        return kvm_alive_words(survivor.state) if survivor else STATE_STOPPED
    if monitor is not None and monitor.ok and monitor.status is not None:
        return describe_qmp_status(monitor.status)
    if procs.kvm.state == "D":
        return STATE_KVM_ALIVE_D
    if monitor is None:
        return STATE_UNKNOWN
    return monitor_words(monitor)


def parse_qm_status_fields(text: str) -> dict[str, str]:
    """The top-level ``key: value`` lines of ``qm status --verbose`` (nested ones are indented)."""
    return dict(re.findall(r"^([a-z][a-z0-9_-]*):[ \t]*(\S+)[ \t]*$", text, re.MULTILINE))


def parse_qm_status(text: str) -> str | None:
    """`qm status <vmid> --verbose` output -> state words, or None if it says nothing useful.

    vmstatus sets qmpstatus to the plain status when QMP did not answer: it is QEMU's word only
    when running-qemu (learnt over the same QMP connection) is there too."""
    fields = parse_qm_status_fields(text)
    qmp = fields.get("qmpstatus")
    status = fields.get("status")
    if qmp and "running-qemu" in fields:
        return describe_qmp_status({"status": qmp})
    if status == "running":
        return "running (QMP not answering)"
    if status == "stopped":
        return STATE_STOPPED
    return None


# ----------------------------------------------------------------------------- /etc/pve


def read_pve_facts(cfg: Config) -> dict[str, Any]:
    """What /etc/pve says of the VM: its config's lock, HA, quorum. Runs in a child process
    (call_isolated): pmxcfs is a FUSE filesystem that can hang."""
    facts: dict[str, Any] = {"config": False, "lock": None, "ha": None, "quorate": None}
    try:
        st = os.lstat(os.path.join(cfg.pve_dir, "local"))
        # PVE/Cluster.pm check_cfs_quorum: lstat, writable bit (root's -w is always true)
        facts["quorate"] = bool(st.st_mode & stat.S_IWUSR)
        facts["pmxcfs"] = "mounted"
    except FileNotFoundError:
        facts["quorate"] = False
        facts["pmxcfs"] = f"{cfg.pve_dir}/local is missing: pmxcfs is not mounted"
    try:
        with open(cfg.vm_config_file, encoding="utf-8", errors="replace") as fh:
            text = fh.read(1_000_000)
        facts["config"] = True
        for line in text.splitlines():
            if line.startswith("["):
                break  # snapshots follow the current config
            m = re.fullmatch(r"lock:\s*(\S+)\s*", line)
            if m:
                facts["lock"] = m.group(1)
    except FileNotFoundError:
        pass
    facts["ha"] = _read_ha(cfg)
    return facts


def _read_ha(cfg: Config) -> dict[str, Any] | None:
    """The VM's HA resource (pve-ha-manager PVE/HA/Config.pm: a ``vm: <id>`` section whose
    state is not ``ignored``, no cluster-wide disarm in ignore mode), with the CRM's state."""
    try:
        with open(os.path.join(cfg.pve_dir, "ha", "resources.cfg"), encoding="utf-8") as fh:
            text = fh.read(1_000_000)
    except OSError:
        return None
    section: dict[str, str] | None = None
    for line in text.splitlines():
        head = re.fullmatch(r"(\S+):\s*(\S+)\s*", line)
        if head:
            if section is not None:
                break
            if head.group(1).lower() in ("vm", "ct") and head.group(2) == str(cfg.vmid):
                section = {}
            continue
        prop = re.fullmatch(r"\s+(\S+)\s+(.*?)\s*", line)
        if section is not None and prop:
            section[prop.group(1)] = prop.group(2)
    if section is None:
        return None
    requested = section.get("state", "started")
    if requested == "ignored":
        return None
    ha: dict[str, Any] = {"managed": True, "requested": requested, "crm_state": None}
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        with open(os.path.join(cfg.pve_dir, "ha", "manager_status"), encoding="utf-8") as fh:
            ms = json.loads(fh.read(4_000_000))
        if (ms.get("disarm") or {}).get("mode") == "ignore":
            return None
        ha["crm_state"] = ms["service_status"][f"vm:{cfg.vmid}"]["state"]
    return ha


@dataclass
class PveFacts:
    """read_pve_facts' answer, or why there is none (pmxcfs hung: "timeout")."""

    status: str  # ok | timeout | error
    lock: str | None = None
    ha: dict[str, Any] | None = None
    quorate: bool | None = None
    config: bool | None = None
    detail: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "lock": self.lock,
            "ha": self.ha,
            "quorum": self.quorate,
            "pve": "ok" if self.status == "ok" else self.detail,
        }


def pve_facts(cfg: Config, deadline_s: float) -> PveFacts:
    """/etc/pve's facts, read in a child that is abandoned past the deadline."""
    status, result = call_isolated(lambda: read_pve_facts(cfg), deadline_s)
    if status == "ok" and isinstance(result, dict):
        return PveFacts(
            "ok",
            lock=result.get("lock"),
            ha=result.get("ha"),
            quorate=result.get("quorate"),
            config=result.get("config"),
            detail=str(result.get("pmxcfs", "")),
        )
    if status == "timeout":
        return PveFacts(
            "timeout",
            detail=f"{cfg.pve_dir} (pmxcfs) did not answer within {deadline_s:g} s",
        )
    return PveFacts("error", detail=f"{cfg.pve_dir} could not be read: {result}")


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
    monitor: Monitor | None = None
    procs: VmProcesses | None = None
    note: str = ""


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
    scope = str(cfg.scope_dir)
    probes.append(
        (
            "vm_cgroup_pressure",
            f"read {scope}/{{cpu,memory,io}}.pressure",
            [f"{scope}/{k}.pressure" for k in ("cpu", "memory", "io")],
        )
    )
    probes.append(("vm_scope_procs", f"read {scope}/cgroup.procs", [f"{scope}/cgroup.procs"]))
    probes.append(("meminfo", "read /proc/meminfo", ["/proc/meminfo"]))
    probes.append(("loadavg", "read /proc/loadavg", ["/proc/loadavg"]))
    # Which Proxmox task holds the VM (a backup, a migration, a qm of ours still at work).
    tasks = str(cfg.tasks_active_file)
    probes.append(("pve_tasks_active", f"read {tasks}", [tasks]))
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


def _screendump(qmp: Qmp, path: Path, probe: Probe, budget: _Budget, deadline: float) -> None:
    """screendump as PNG (QEMU 7.1+); a QEMU that does not know ``format`` writes its PPM."""
    png = path / "screendump.png"
    try:
        qmp.execute("screendump", {"filename": str(png), "format": "png"}, deadline=deadline)
        shot = png
    except QmpTimeout:
        raise
    except QmpError as exc:
        if "format" not in str(exc):
            raise
        shot = path / "screendump.ppm"
        qmp.execute("screendump", {"filename": str(shot)}, deadline=deadline)
        probe.detail = "PPM: this QEMU has no screendump format option"
    size = shot.stat().st_size if shot.exists() else 0
    if budget.take(size) < size:
        shot.unlink(missing_ok=True)
        probe.truncated, probe.detail = True, "dropped: over the bundle's byte cap"
        probe.status = "error"
    else:
        probe.file, probe.bytes, probe.status = shot.name, size, "ok"


def _run_qmp_probes(
    cfg: Config, path: Path, probes: list[Probe], deadline_for: Any, budget: _Budget, bundle: Bundle
) -> None:
    """query-status, query-block, query-blockstats, screendump over ONE short QMP connection,
    closed at once: QEMU serves one client and everything else (pvestatd, the GUI, qm) waits
    behind it. After a timeout the remaining probes are recorded as timeouts without waiting
    again; a monitor that cannot be connected to is recorded once, as the bundle's monitor."""
    qmp: Qmp | None = None
    hung = ""
    skip_status = "timeout"
    try:
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
                    _screendump(qmp, path, probe, budget, deadline)
                else:
                    result = qmp.execute(
                        probe.name.removeprefix("qmp_").replace("_", "-"), deadline=deadline
                    )
                    if probe.name == "qmp_query_status" and isinstance(result, dict):
                        bundle.monitor = Monitor(True, status=result, detail="QMP query-status")
                    _save(path, probe, json.dumps(result, indent=1).encode(), budget, False)
                    probe.status = "ok"
            except (QmpTimeout, TimeoutError) as exc:
                probe.status, probe.detail = "timeout", str(exc) or "QMP did not answer in time"
                hung = f"skipped: QMP did not answer {probe.name}"
                if bundle.monitor is None:
                    bundle.monitor = monitor_from_error(exc)
            except (QmpError, OSError) as exc:
                probe.status, probe.detail = "error", str(exc)
                if qmp is None:
                    bundle.monitor = monitor_from_error(exc)
                    hung, skip_status = f"skipped: QMP unavailable ({exc})", "error"
            finally:
                probe.elapsed_s = time.monotonic() - start
    finally:
        if qmp is not None:
            qmp.close()


def take_forensics_lock(cfg: Config, wait_s: float) -> int | None:
    """flock state_dir/forensics.lock, waiting up to wait_s: one capture at a time, so two of
    them never queue on QEMU's one QMP client slot. The fd, or None."""
    fd = os.open(
        os.path.join(cfg.state_dir, "forensics.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    end = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= end:
                os.close(fd)
                return None
            time.sleep(0.05)


def capture_forensics(
    cfg: Config, verb: str, facts: PveFacts | None = None, note: str = ""
) -> Bundle:
    """Capture a forensics bundle under cfg.forensics_s; never blocks past it.

    Safe reads first, then the child probes (qm status, qm config, dmesg, the journal) in
    parallel, then — once qm status and qm config are done, so they are not kept off QMP — the
    QMP probes on one connection, each under min(probe_s, what is left of forensics_s). A probe
    past its deadline is recorded as a timeout and its child abandoned. The caller holds the
    forensics lock (or notes why not)."""
    t0 = time.monotonic()
    overall = t0 + cfg.forensics_s
    bundle_id, path = new_bundle_dir(cfg, verb)
    bundle = Bundle(bundle_id, path, note=note)
    budget = _Budget(cfg.max_bundle_bytes - 16_384)  # room for the manifest
    procs = vm_processes(cfg, min(1.0, cfg.probe_s))
    bundle.procs = procs

    for name, desc, files in _safe_reads(cfg, procs.kvm or procs.survivor):
        bundle.probes.append(_run_safe_read(path, name, desc, files, budget))
    facts_probe = Probe("host_facts", "pid file, command line, scope; /etc/pve lock, HA, quorum")
    facts_doc = {
        "vm_processes": {
            "kvm": procs.public(),
            "scope": [k.__dict__ for k in procs.scope],
            "pid_file_pid": procs.pid_file_pid,
            "detail": procs.detail,
        },
        "pve": facts.public() if facts else None,
    }
    _save(path, facts_probe, json.dumps(facts_doc, indent=1).encode(), budget, False)
    facts_probe.status = "ok"
    bundle.probes.append(facts_probe)

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
        ("journal_qmeventd", [*journal_of, "qmeventd"], 0),
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
    # qm status and qm config talk to QMP and /etc/pve themselves: QMP waits for them.
    for th, probe, deadline in threads:
        if probe.name in ("qm_status", "qm_config"):
            th.join(max(0.0, deadline - time.monotonic()) + 0.5)
    qmp_probes = [
        Probe(n, f"QMP {c} via {cfg.qmp_socket}")
        for n, c in (
            ("qmp_query_status", "query-status"),
            ("qmp_query_block", "query-block"),
            ("qmp_query_blockstats", "query-blockstats"),
            ("qmp_screendump", "screendump (png, else ppm)"),
        )
    ]
    if procs.kvm is not None:
        qth = threading.Thread(
            target=_run_qmp_probes,
            args=(cfg, path, qmp_probes, probe_deadline, budget, bundle),
            daemon=True,
            name="qmp",
        )
        qth.start()
    else:
        for probe in qmp_probes:
            probe.status, probe.detail = "error", "skipped: no kvm process (the VM is stopped)"
        qth = None
    for th, probe, deadline in threads:
        th.join(max(0.0, deadline - time.monotonic()) + 0.5)
        if th.is_alive():  # should not happen (run_bounded keeps its deadline); never wait on
            probe.status, probe.detail = "timeout", "abandoned past the capture deadline"
    if qth is not None:
        qth.join(max(0.0, overall - time.monotonic()) + 0.5)
        if qth.is_alive():
            for probe in qmp_probes:
                if probe.status != "ok":
                    probe.status, probe.detail = "timeout", "abandoned past the capture deadline"
            if bundle.monitor is None:
                bundle.monitor = Monitor(False, kind="no answer", detail="QMP did not answer")
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
        "protocol": PROTOCOL_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(bundle.elapsed_s, 3),
        "deadline_s": cfg.forensics_s,
        "note": bundle.note,
        "monitor": bundle.monitor.public() if bundle.monitor else None,
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


def bundle_verb(bundle_id: str) -> str:
    return bundle_id.split("-")[1] if bundle_id.count("-") >= 2 else ""


def enforce_retention(cfg: Config, keep: str) -> None:
    """Keep the newest keep_bundles bundles of the forensics verb and, apart from them, the
    newest keep_action_bundles of mutating verbs — repeated forensics cannot push the evidence
    of a reset out — all within max_total_bytes (forensics bundles go first); never `keep`."""
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
    doomed: list[str] = []
    for group, limit in (
        ([n for n in complete if bundle_verb(n) == "forensics"], cfg.keep_bundles),
        ([n for n in complete if bundle_verb(n) != "forensics"], cfg.keep_action_bundles),
    ):
        doomed += [n for n in group[: max(0, len(group) - limit)] if n != keep]
    survivors = [n for n in complete if n not in doomed]
    total = sum(_dir_bytes(cfg.bundles_dir / n) for n in survivors)
    by_age = sorted(survivors, key=lambda n: (bundle_verb(n) != "forensics", age(n)))
    for n in by_age:
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
    the ledger need not survive a host crash. Callers hold a lock: one writer at a time.
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
    """{used, limit, window_s, cooldown_remaining_s, forensics_used, forensics_limit} from the
    ledger: begun mutating verbs, and forensics captures (a budget of their own)."""
    now = time.time() if now is None else now
    entries = read_ledger(cfg)
    begun = [e for e in entries if e.get("phase") == "begun"]
    # Entries stamped in the future (the clock went back) still count: fail closed.
    recent = [e for e in begun if e["ts"] > now - BUDGET_WINDOW_S]
    forensics = [
        e for e in entries if e.get("phase") == "forensics" and e["ts"] > now - BUDGET_WINDOW_S
    ]
    last_cool = max((e["ts"] for e in begun if e.get("verb") in COOLDOWN_VERBS), default=None)
    remaining = 0.0
    if last_cool is not None:
        remaining = min(cfg.cooldown_s, max(0.0, last_cool + cfg.cooldown_s - now))
    return {
        "used": len(recent),
        "limit": cfg.max_mutating_per_hour,
        "window_s": BUDGET_WINDOW_S,
        "cooldown_remaining_s": round(remaining, 1),
        "forensics_used": len(forensics),
        "forensics_limit": cfg.max_forensics_per_hour,
    }


# ----------------------------------------------------------------------------- the pending start


def pending_start_path(cfg: Config) -> Path:
    return Path(cfg.state_dir) / PENDING_START_MARKER


def read_pending_start(cfg: Config) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(pending_start_path(cfg).read_text())
        if isinstance(doc, dict):
            return doc
    return None


def write_pending_start(cfg: Config, doc: dict[str, Any]) -> str:
    """Leave the marker; '' or why it could not be left."""
    try:
        tmp = pending_start_path(cfg).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, pending_start_path(cfg))
    except OSError as exc:
        return f"the pending-start marker could not be written ({exc.strerror or exc})"
    return ""


def clear_pending_start(cfg: Config) -> None:
    with contextlib.suppress(OSError):
        pending_start_path(cfg).unlink()


# ----------------------------------------------------------------------------- the run


class Run:
    """One invocation: the document it builds and the steps it took."""

    def __init__(self, cfg: Config | None, verb: str | None) -> None:
        self.cfg = cfg
        self.verb = verb
        self.t0 = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []
        self.state_before = STATE_UNKNOWN
        self.state_after = STATE_UNKNOWN
        self.bundle_id: str | None = None
        self.cold_case = False
        self.upid: str | None = None
        self.task: TaskResult | None = None  # the last mutating qm task
        self.extra: dict[str, Any] = {}

    def step(self, name: str, ok: bool, elapsed_s: float, detail: str = "") -> None:
        self.steps.append(
            {"step": name, "ok": ok, "elapsed_s": round(elapsed_s, 3), "detail": detail}
        )

    def document(
        self, exit_code: int, message: str, refused: str | None = None, *, budget: bool = True
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
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
            "upid": self.upid,
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

    def facts(self, facts: PveFacts) -> None:
        self.extra.update(facts.public())


def qm(cfg: Config, run: Run, sub: str, *args: str, deadline_s: float) -> RunResult:
    """Run a read-only `qm <sub> <vmid> args…` time-boxed and record it as a step."""
    res = run_bounded([cfg.qm, sub, str(cfg.vmid), *args], deadline_s, max_bytes=65536)
    text = res.output.decode("utf-8", "replace").strip()[-300:]
    detail = res.detail if res.status != "ok" else ""
    if text and res.status != "ok":
        detail = f"{detail}: {text}" if detail else text
    run.step(f"qm {sub}", res.status == "ok", res.elapsed_s, detail)
    return res


def qm_task(cfg: Config, run: Run, sub: str, *args: str) -> TaskResult:
    """Run a mutating `qm <sub> <vmid> args…` (never killed) and record it as a step."""
    res = run_qm_task(
        cfg, [cfg.qm, sub, str(cfg.vmid), *args], f"qm{sub}", f"{run.verb or 'verb'}-{sub}"
    )
    detail = res.detail
    run.task = res
    if res.upid:
        detail = f"{res.upid} {detail}".strip()
        run.upid = res.upid
    run.step(f"qm {sub}", res.status == "ok", res.elapsed_s, detail)
    return res


def observe_state(cfg: Config, timeout_s: float) -> tuple[str, VmProcesses, str]:
    """(state words, the VM's processes, how we know), from /proc and the VM's scope, then the
    verb's own QMP check. No `qm status`: its qmpstatus is the plain status when QMP is down."""
    procs = vm_processes(cfg, min(1.0, timeout_s))
    if procs.kvm is None:
        return decide_state(procs, None), procs, procs.detail
    monitor = check_monitor(cfg, timeout_s)
    return decide_state(procs, monitor), procs, monitor.detail


def verify_running(cfg: Config, run: Run, window_s: float | None = None) -> bool:
    """Poll until the VM runs (QMP says so) or the window (verify_s) passes."""
    t0 = time.monotonic()
    end = t0 + (cfg.verify_s if window_s is None else window_s)
    state = STATE_UNKNOWN
    how = ""
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        state, _, how = observe_state(cfg, min(cfg.probe_s, left))
        if state == STATE_RUNNING:
            run.step("verify running", True, time.monotonic() - t0, how)
            run.state_after = state
            return True
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
    run.state_after = state
    run.step("verify running", False, time.monotonic() - t0, f"last seen {state} ({how})")
    return False


def verify_gone(cfg: Config, run: Run, kvm: Kvm | None) -> Kvm | None:
    """Poll until the kvm process is gone and the VM's scope holds no live process, or
    verify_s passes; the survivor, or None. The pid file is not asked: Proxmox's stop clean-up
    deletes it even when the kvm survived."""
    t0 = time.monotonic()
    end = t0 + cfg.verify_s

    def survivor() -> Kvm | None:
        current = kvm_alive(kvm) if kvm else None
        if current is not None:
            return current
        scope = scope_processes(cfg)
        return sorted(scope, key=lambda k: k.state != "D")[0] if scope else None

    current = survivor()
    while current is not None and time.monotonic() < end:
        time.sleep(0.1)
        current = survivor()
    if current is None:
        run.step("verify kvm gone", True, time.monotonic() - t0, "no kvm process, empty scope")
        return None
    run.step(
        "verify kvm gone",
        False,
        time.monotonic() - t0,
        f"kvm pid {current.pid} still alive in state {current.state}",
    )
    return current


# ----------------------------------------------------------------------------- preconditions


@dataclass
class Refusal:
    """Why a verb is not done: the document's refused value, the message, the exit code."""

    reason: str
    message: str
    code: int = EXIT_PRECONDITION
    cold_case: bool = False


def precondition_refusal(
    cfg: Config, verb: str, facts: PveFacts, procs: VmProcesses
) -> Refusal | None:
    """The host states under which a mutating verb must not act (nothing is done; the owner is
    told). Checked before the budget, so a refusal costs none."""
    survivor = procs.survivor
    if survivor is not None:
        words = kvm_alive_words(survivor.state)
        return Refusal(
            REFUSED_KVM_ALIVE,
            f"{verb} refused: {words} — pid {survivor.pid} lives on in the VM's scope "
            f"({cfg.scope_dir}) although Proxmox no longer lists it (its pid file is gone). "
            + (
                "qm start would block on that scope and qm stop/reset see no VM. "
                if verb in ("start", "cycle")
                else "qm sees no VM to act on. "
            )
            + f"Tell the owner: {COLD_PATH}",
            cold_case=True,
        )
    if facts.status == "timeout":
        return Refusal(
            REFUSED_PMXCFS,
            f"{verb} refused: {facts.detail}; every qm call reads the VM's config there and "
            f"would hang. Tell the owner: pmxcfs (pve-cluster) needs attention — {COLD_PATH}",
            cold_case=True,
        )
    lock = facts.lock
    if lock:
        skippable = (verb == "stop" and lock in SKIPPABLE_LOCKS and cfg.stop_skips_backup_lock) or (
            verb == "start" and lock == "suspended"
        )
        if not skippable:
            return Refusal(
                REFUSED_LOCKED,
                f"{verb} refused: locked ({lock}) — the VM's config ({cfg.vm_config_file}) "
                f'holds lock: {lock}, so Proxmox would refuse with "VM is locked ({lock})". '
                "A backup, migration or snapshot is at work (see the tasks in "
                f"{cfg.tasks_active_file}). Tell the owner; do not retry until it has finished",
            )
    ha = facts.ha
    if ha and verb in ("stop", "cycle"):
        return Refusal(
            REFUSED_HA,
            f"{verb} refused: the VM is HA-managed (requested state {ha.get('requested')}), "
            'and qm stop only asks the HA stack — the VM would be left "requested stopped", '
            "and a cycle cannot start it again. Tell the owner to act through ha-manager "
            f"(ha-manager crm-command stop vm:{cfg.vmid} 0, then ha-manager set vm:{cfg.vmid} "
            "--state started), or take the VM out of HA; reset still works here",
        )
    if facts.quorate is False and verb in ("cycle", "start", "stop"):
        unmounted = "not mounted" in facts.detail
        what = {
            "cycle": "a cycle would stop the VM and could not start it again",
            "start": 'qm start refuses: "cluster not ready - no quorum?"',
            "stop": "the VM could not be started again until quorum returns",
        }[verb]
        why = facts.detail if unmounted else f"{cfg.pve_dir}/local is read-only"
        return Refusal(
            REFUSED_NO_QUORUM,
            f"{verb} refused: this node has no quorum ({why}), and {what}. Tell the owner "
            "(pvecm status); reset still works",
        )
    return None


def classify_qm_error(output: str) -> Refusal | None:
    """qm's own refusals, when they came anyway (a race with the checks before)."""
    m = re.search(r"VM is locked \(([^)]*)\)", output)
    if m:
        return Refusal(
            REFUSED_LOCKED,
            f'refused: locked ({m.group(1)}) — Proxmox said "VM is locked ({m.group(1)})". '
            "Tell the owner; do not retry until the task holding it has finished",
        )
    if "no quorum" in output:
        return Refusal(
            REFUSED_NO_QUORUM,
            'refused: this node has no quorum ("cluster not ready - no quorum?"). Tell the '
            "owner (pvecm status)",
        )
    return None


def config_lock_busy(output: str) -> str:
    m = re.search(r"can't lock file '([^']*)' - got timeout", output)
    if not m:
        return ""
    return (
        f"qm could not take the VM's config lock {m.group(1)} within its 10 s: another Proxmox "
        "task holds it (see pve_tasks_active in the forensics bundle). Nothing was done by this "
        "call; try again when that task has finished"
    )


# ----------------------------------------------------------------------------- the actions


def do_stop(cfg: Config, run: Run, kvm: Kvm | None, skiplock: bool = False) -> tuple[int, str]:
    """qm stop (--timeout set, never killed), then verify the kvm process is gone."""
    args = ["--timeout", str(cfg.qm_stop_timeout_s)]
    if skiplock:
        args += ["--skiplock", "1"]
    res = qm_task(cfg, run, "stop", *args)
    if res.status == "running":
        run.state_after = "stopping"
        return EXIT_IN_PROGRESS, (
            f"stop still in progress: qm stop (task {res.upid or 'UPID unknown'}) is still "
            f"running after {cfg.qm_action_s:g} s; it was not killed (that would leave it half "
            "done) and it holds the verb's lock until it ends. Run status to follow it"
        )
    if res.status == "unstarted":
        run.state_after, _, _ = observe_state(cfg, cfg.probe_s)
        return EXIT_ACTION_FAILED, f"qm stop could not be run: {res.detail}"
    if res.status == "error":
        refusal = classify_qm_error(res.output)
        busy = config_lock_busy(res.output)
        if refusal or busy:
            run.state_after, _, _ = observe_state(cfg, cfg.probe_s)
            return (refusal.code, refusal.message) if refusal else (EXIT_ACTION_FAILED, busy)
    survivor = verify_gone(cfg, run, kvm)
    if survivor is not None:
        run.cold_case = True
        run.state_after = kvm_alive_words(survivor.state)
        said = "qm stop reported success" if res.status == "ok" else f"qm stop: {res.detail}"
        gone = "" if cfg.pid_file.exists() else " (Proxmox's clean-up deleted its pid file)"
        return EXIT_ACTION_FAILED, (
            f"kvm would not die: pid {survivor.pid} is still alive in state {survivor.state}"
            f"{gone} {cfg.verify_s:g} s after qm stop ({said}); {COLD_PATH}"
        )
    run.state_after = STATE_STOPPED
    return EXIT_OK, "the VM is stopped and its kvm process is gone"


def do_start(cfg: Config, run: Run, ha: dict[str, Any] | None) -> tuple[int, str]:
    """qm start (never killed); an HA-managed VM's start is an HA request: verify longer."""
    res = qm_task(cfg, run, "start")
    if res.status == "running":
        run.state_after = "starting"
        return EXIT_IN_PROGRESS, (
            f"start still in progress: qm start (task {res.upid or 'UPID unknown'}) is still "
            f"running after {cfg.qm_action_s:g} s; it was not killed. Run status to follow it"
        )
    if res.status == "error":
        refusal = classify_qm_error(res.output)
        busy = config_lock_busy(res.output)
        if refusal or busy:
            run.state_after, _, _ = observe_state(cfg, cfg.probe_s)
            return (refusal.code, refusal.message) if refusal else (EXIT_ACTION_FAILED, busy)
    requested_ha = ha is not None or "Requesting HA start" in res.output
    window = cfg.ha_verify_s if requested_ha else cfg.verify_s
    if verify_running(cfg, run, window):
        return EXIT_OK, (
            "the VM is running (started by the HA stack)" if requested_ha else "the VM is running"
        )
    if res.status == "unstarted":
        return EXIT_ACTION_FAILED, f"qm start could not be run: {res.detail}"
    why = "qm start succeeded" if res.status == "ok" else f"qm start failed ({res.detail})"
    if requested_ha:
        why = "qm start asked the HA stack (ha-manager) to start it"
    return EXIT_ACTION_FAILED, (
        f"{why} but the VM is not running after {window:g} s (last seen {run.state_after})"
    )


def do_reset(cfg: Config, run: Run) -> tuple[int, str]:
    res = qm_task(cfg, run, "reset")
    if res.status == "running":
        run.state_after = STATE_UNKNOWN
        return EXIT_IN_PROGRESS, (
            f"reset still in progress: qm reset (task {res.upid or 'UPID unknown'}) is still "
            f"running after {cfg.qm_action_s:g} s; it was not killed. Run status to follow it"
        )
    if res.status != "ok":
        observed, _, _ = observe_state(cfg, cfg.probe_s)
        run.state_after = observed
        refusal = classify_qm_error(res.output)
        if refusal:
            return refusal.code, refusal.message
        busy = config_lock_busy(res.output)
        if busy:
            return EXIT_ACTION_FAILED, busy
        if observed == STATE_STOPPED:
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
        qm_task(cfg, run, "resume")
    if verify_running(cfg, run):
        return EXIT_OK, "the VM was reset and is running"
    return EXIT_ACTION_FAILED, (
        f"the VM was reset but is not running after {cfg.verify_s:g} s (last seen "
        f"{run.state_after}): cycle is the next step"
    )


def do_cycle(cfg: Config, run: Run, kvm: Kvm | None) -> tuple[int, str]:
    """Stop; start only once the stop task has ended and the kvm is gone."""
    code, message = do_stop(cfg, run, kvm)
    if code == EXIT_IN_PROGRESS:
        marker = write_pending_start(
            cfg,
            {
                "since": time.time(),
                "verb": "cycle",
                "reason": "stop still in progress",
                "upid": run.upid,
                "bundle_id": run.bundle_id,
            },
        )
        return code, (
            f"stop still in progress, start not attempted (task {run.upid or 'UPID unknown'}): "
            f"qm stop has run for {cfg.qm_action_s:g} s and was not killed. Run status until "
            "it shows the VM stopped, then call start: it completes this cycle"
            + (f" ({marker})" if marker else "")
        )
    if code != EXIT_OK:
        return code, message + "; the VM was not started again"
    code, message = do_start(cfg, run, None)
    if code == EXIT_OK:
        return code, "the VM was stopped, its kvm process went away, and it is running again"
    if run.state_after in (STATE_STOPPED, "starting"):
        write_pending_start(
            cfg,
            {
                "since": time.time(),
                "verb": "cycle",
                "reason": "start failed",
                "upid": run.upid,
                "bundle_id": run.bundle_id,
            },
        )
    return code, message + "; the VM was stopped and is not running: call start"


# ----------------------------------------------------------------------------- the verbs


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing (unlike SIG_IGN it is not inherited by qm across exec)."""


def _finish(doc: dict[str, Any], stderr_line: str | None = None) -> int:
    write_fd(1, (json.dumps(doc, ensure_ascii=True) + "\n").encode())
    if stderr_line:
        write_fd(2, (stderr_line + "\n").encode("ascii", "replace"))
    return int(doc["exit_code"])


def _qm_status_view(text: str | None) -> dict[str, Any] | None:
    """What `qm status --verbose` said, and whether its qmpstatus is QEMU's word."""
    if text is None:
        return None
    fields = parse_qm_status_fields(text)
    return {
        "status": fields.get("status"),
        "qmpstatus": fields.get("qmpstatus"),
        "qmpstatus_trusted": "running-qemu" in fields,
        "lock": fields.get("lock"),
    }


def status_message(cfg: Config, state: str, procs: VmProcesses, monitor: Monitor | None) -> str:
    kvm = procs.kvm or procs.survivor
    where = f" (kvm pid {kvm.pid}, state {kvm.state})" if kvm else ""
    msg = f"VM {cfg.vmid}: {state}{where}"
    if procs.kvm is None and procs.survivor is not None:
        msg += (
            f"; its pid file is gone but pid {procs.survivor.pid} lives on in the VM's scope, "
            f"and start would block on it: {COLD_PATH}"
        )
    elif monitor is not None and not monitor.ok:
        msg += f"; {monitor.detail}"
        if monitor.kind == "queue full":
            msg += "; QEMU's main loop is not taking monitor clients: cycle is the next step"
    return msg


def do_status(cfg: Config, run: Run) -> tuple[int, str]:
    """status: the VM's processes, /etc/pve (lock, HA, quorum), qm status, then one short QMP
    check of the verb's own (it decides responsiveness)."""
    facts = pve_facts(cfg, cfg.probe_s)
    run.facts(facts)
    t0 = time.monotonic()
    procs = vm_processes(cfg, min(1.0, cfg.probe_s))
    kvm = procs.kvm or procs.survivor
    run.step(
        "kvm process",
        kvm is not None,
        time.monotonic() - t0,
        (f"pid {kvm.pid} state {kvm.state} ({procs.detail})" if kvm else procs.detail),
    )
    res = qm(cfg, run, "status", "--verbose", deadline_s=cfg.probe_s)
    qm_text = res.output.decode("utf-8", "replace") if res.status == "ok" else None
    monitor: Monitor | None = None
    if procs.kvm is not None:
        t0 = time.monotonic()
        monitor = check_monitor(cfg, cfg.probe_s)
        run.step("QMP", monitor.ok, time.monotonic() - t0, monitor.detail)
    state = decide_state(procs, monitor)
    run.state_before = run.state_after = state
    run.extra["kvm"] = procs.public()
    run.extra["scope_pids"] = [k.pid for k in procs.scope]
    run.extra["monitor"] = monitor.public() if monitor else None
    run.extra["qm_status"] = _qm_status_view(qm_text)
    pending = read_pending_start(cfg)
    run.extra["pending_start"] = pending if pending and state == STATE_STOPPED else None
    msg = status_message(cfg, state, procs, monitor)
    if res.status == "timeout":
        msg += f"; qm status did not answer within {cfg.probe_s:g} s"
    if facts.status != "ok":
        msg += f"; {facts.detail}"
    else:
        if facts.lock:
            msg += f"; locked ({facts.lock})"
        if facts.ha:
            msg += f"; HA-managed (requested {facts.ha.get('requested')})"
        if facts.quorate is False:
            msg += "; no quorum"
    if run.extra["pending_start"]:
        msg += "; an interrupted cycle left it stopped: call start to complete it"
    return EXIT_OK, msg


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
                "upid": run.upid,
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
        return done(EXIT_OK, f"forensics bundle {cmd.bundle_id} ({len(files)} files)")

    if cmd.verb == "status":
        code, message = do_status(cfg, run)
        return done(code, message)

    if cmd.verb == "forensics":
        return forensics_verb(cfg, run, done)

    return mutating_verb(cfg, cmd, run, logger, base, done)


def forensics_verb(cfg: Config, run: Run, done: Callable[..., int]) -> int:
    """forensics: its own lock (one capture at a time) and its own budget in the ledger."""
    flock = take_forensics_lock(cfg, cfg.forensics_s)
    if flock is None:
        return done(
            EXIT_BUSY,
            f"another forensics capture is running and did not finish within {cfg.forensics_s:g}"
            " s: try again when it has finished",
            refused=REFUSED_BUSY,
            level=4,
        )
    try:
        try:
            budget = budget_state(cfg)
        except OSError as exc:
            return done(
                EXIT_REFUSED,
                f"forensics refused: ledger, the budget ledger {ledger_path(cfg)} cannot be read"
                f" ({exc.strerror or exc}); free space or fix the state directory {cfg.state_dir}",
                refused=REFUSED_LEDGER,
                level=4,
            )
        if budget["forensics_used"] >= budget["forensics_limit"]:
            return done(
                EXIT_REFUSED,
                f"forensics refused: forensics budget, {budget['forensics_used']} captures in "
                f"the last hour (limit {budget['forensics_limit']}); every mutating verb "
                "still captures its own bundle first",
                refused=REFUSED_FORENSICS_BUDGET,
                level=4,
            )
        try:
            append_ledger(cfg, {"ts": time.time(), "phase": "forensics", "pid": os.getpid()})
        except OSError as exc:
            return done(
                EXIT_REFUSED,
                f"forensics refused: ledger, the budget ledger {ledger_path(cfg)} cannot be "
                f"written ({exc.strerror or exc}): free space in the state directory "
                f"{cfg.state_dir}",
                refused=REFUSED_LEDGER,
                level=4,
            )
        facts = pve_facts(cfg, cfg.probe_s)
        run.facts(facts)
        bundle = capture_forensics(cfg, "forensics", facts)
    finally:
        os.close(flock)
    run.bundle_id = bundle.bundle_id
    run.probes = [p.public() for p in bundle.probes]
    state = _state_from_bundle(bundle)
    run.state_before = run.state_after = state
    run.extra["monitor"] = bundle.monitor.public() if bundle.monitor else None
    run.step("forensics", True, bundle.elapsed_s, f"bundle {bundle.bundle_id}")
    timeouts = sum(p.status == "timeout" for p in bundle.probes)
    return done(
        EXIT_OK,
        f"forensics bundle {bundle.bundle_id} captured in "
        f"{bundle.elapsed_s:.1f} s ({timeouts} probes timed out); the VM is {state}",
    )


def mutating_verb(
    cfg: Config,
    cmd: Command,
    run: Run,
    logger: Logger,
    base: dict[str, Any],
    done: Callable[..., int],
) -> int:
    # Once begun, finish even if the SSH client goes away.
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    lock = take_lock(cfg)
    if lock is None:
        return done(
            EXIT_BUSY,
            "another mutating verb (or a qm task one started) is running on this VM: try "
            "again when it has finished",
            refused=REFUSED_BUSY,
            level=4,
        )
    try:
        t0 = time.monotonic()
        facts = pve_facts(cfg, cfg.probe_s)
        run.facts(facts)
        procs = vm_processes(cfg, min(1.0, cfg.probe_s))
        kvm = procs.kvm
        seen = kvm or procs.survivor
        run.step(
            "kvm process",
            True,
            time.monotonic() - t0,
            f"pid {seen.pid} state {seen.state} ({procs.detail})" if seen else procs.detail,
        )
        refusal = precondition_refusal(cfg, cmd.verb, facts, procs)
        if refusal is not None:
            run.cold_case = refusal.cold_case
            state, _, _ = observe_state(cfg, min(1.0, cfg.probe_s))
            run.state_before = run.state_after = state
            return done(refusal.code, refusal.message, refused=refusal.reason, level=4)
        # Bringing a stopped VM back is never refused by the budget, the cooldown or the ledger.
        exempt = cmd.verb == "start" and kvm is None
        ledger_failed = ""  # set when the ledger is unusable: only the exempt start goes on

        def ledger_refusal(what: str) -> int:
            return done(
                EXIT_REFUSED,
                f"{cmd.verb} refused: ledger, the budget ledger {ledger_path(cfg)} {what}; "
                "without it the hourly budget and the cooldown cannot hold, so nothing was done."
                f" Free space in the state directory {cfg.state_dir} (or fix whatever else "
                "keeps the ledger from being read or written), then try again; start of a "
                "stopped VM still works",
                refused=REFUSED_LEDGER,
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
                    refused=REFUSED_COOLDOWN,
                    level=4,
                )
            if budget["used"] >= budget["limit"]:
                return done(
                    EXIT_REFUSED,
                    f"{cmd.verb} refused: budget, {budget['used']} mutating "
                    f"verbs in the last hour (limit {budget['limit']})",
                    refused=REFUSED_BUDGET,
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
        # is full) is reported, but does not stand between the VM and its recovery; nor does a
        # forensics capture that holds its lock past forensics_s.
        t0 = time.monotonic()
        flock = take_forensics_lock(cfg, cfg.forensics_s)
        note = "" if flock is not None else "captured beside another capture holding its lock"
        try:
            bundle = capture_forensics(cfg, cmd.verb, facts, note)
        except OSError as exc:
            run.step("forensics", False, time.monotonic() - t0, f"no bundle stored: {exc}")
            run.state_before, _, _ = observe_state(cfg, cfg.probe_s)
        else:
            run.bundle_id = bundle.bundle_id
            run.probes = [p.public() for p in bundle.probes]
            run.state_before = _state_from_bundle(bundle)
            run.step("forensics", True, bundle.elapsed_s, f"bundle {bundle.bundle_id}")
        finally:
            if flock is not None:
                os.close(flock)

        pending = read_pending_start(cfg)
        skiplock = bool(facts.lock) and cmd.verb == "stop"
        if cmd.verb == "reset":
            code, message = do_reset(cfg, run)
        elif cmd.verb == "stop":
            code, message = do_stop(cfg, run, find_kvm(cfg) or kvm, skiplock=skiplock)
        elif cmd.verb == "start":
            now = find_kvm(cfg)
            if now is not None:
                run.state_after = run.state_before
                clear_pending_start(cfg)
                code, message = (
                    EXIT_OK,
                    (
                        f"the VM's kvm process is alive ({run.state_before}): nothing to start"
                        + (
                            ""
                            if run.state_before == STATE_RUNNING
                            else "; reset or cycle it instead"
                        )
                    ),
                )
            else:
                code, message = do_start(cfg, run, facts.ha)
                if code == EXIT_OK:
                    clear_pending_start(cfg)
                    if pending:
                        message += (
                            " — the interrupted cycle is complete (its stop task "
                            f"{pending.get('upid') or 'unknown'})"
                        )
        else:
            code, message = do_cycle(cfg, run, find_kvm(cfg) or kvm)
            if code == EXIT_OK:
                clear_pending_start(cfg)
        if code == EXIT_IN_PROGRESS and run.task is not None:
            # The qm task runs on; a detached child of ours holds the lock until it ends.
            hold_lock_while_task_runs(lock, run.task, cfg)
        prune_task_logs(cfg)
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
                    "upid": run.upid,
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
        refused = classify_refused(code, message)
        return done(code, message, refused=refused, level=5 if code == EXIT_OK else 3)
    finally:
        os.close(lock)  # a detached task holder keeps its own copy of the lock's description


def classify_refused(code: int, message: str) -> str | None:
    """A precondition qm itself raised during the action (a race): the refused value."""
    if code != EXIT_PRECONDITION:
        return None
    if "locked (" in message:
        return REFUSED_LOCKED
    if "no quorum" in message:
        return REFUSED_NO_QUORUM
    return None


def _state_from_bundle(bundle: Bundle) -> str:
    procs = bundle.procs or VmProcesses(None, [], None, "")
    monitor = bundle.monitor
    if procs.kvm is not None and monitor is None and bundle.qm_status_text:
        # No QMP probe ran; qm status's qmpstatus counts only beside running-qemu.
        words = parse_qm_status(bundle.qm_status_text)
        if words and "QMP not answering" not in words:
            return words
    return decide_state(procs, monitor)


# ----------------------------------------------------------------------------- --preflight


@dataclass
class Check:
    """One line of --preflight: ok | warn | FAIL, a name, what was found (and what to do)."""

    result: str
    name: str
    detail: str

    def line(self) -> str:
        detail = " ".join(self.detail.split())  # one line, whatever the host's text holds
        return f"{self.result:<4} {self.name}: {detail}"


def _mount_of(path: str) -> tuple[str, str, str] | None:
    """(mount point, filesystem type, source) of the mount holding path (/proc/self/mountinfo)."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: tuple[str, str, str] | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 2:
            continue
        point = parts[4].encode().decode("unicode_escape")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, rparts[0], rparts[1])
    return best


def _vm_storage_pools(cfg: Config) -> list[tuple[str, str, str]]:
    """(storage id, kind, pool or VG) of the ZFS and LVM storages in <pve_dir>/storage.cfg."""

    def read() -> list[tuple[str, str, str]]:
        found: list[tuple[str, str, str]] = []
        current: tuple[str, str] | None = None
        with open(os.path.join(cfg.pve_dir, "storage.cfg"), encoding="utf-8") as fh:
            for line in fh.read(1_000_000).splitlines():
                head = re.fullmatch(r"(\S+):\s*(\S+)\s*", line)
                if head:
                    current = (head.group(1), head.group(2))
                    continue
                prop = re.fullmatch(r"\s+(pool|vgname)\s+(\S+)\s*", line)
                if current and prop:
                    found.append((current[1], current[0], prop.group(2)))
        return found

    status, result = call_isolated(read, 5.0)
    return [tuple(x) for x in result] if status == "ok" and result else []


def _lvm_vg(source: str) -> str | None:
    """The VG of a /dev/mapper/<vg>-<lv> source (LVM doubles a dash inside a name)."""
    name = source.removeprefix("/dev/mapper/")
    if name == source:
        m = re.fullmatch(r"/dev/([^/]+)/[^/]+", source)
        return m.group(1) if m else None
    m = re.match(r"((?:[^-]|--)+)-", name)
    return m.group(1).replace("--", "-") if m else None


def check_state_dir(cfg: Config) -> list[Check]:
    checks = []
    path = cfg.state_dir
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [
            Check(
                "warn",
                "state dir",
                f"{path} does not exist yet (the verb creates it 0700): create it now with "
                f"install -d -o root -g root -m 0700 {path}, then run --preflight again",
            )
        ]
    except OSError as exc:
        return [Check("FAIL", "state dir", f"{path} cannot be examined: {exc.strerror}")]
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0 or mode & 0o077:
        checks.append(
            Check(
                "FAIL",
                "state dir",
                f"{path} is owned by uid {st.st_uid} with mode {mode:o}: it holds console "
                f"screenshots and the budget ledger; chown root:root {path}; chmod 0700 {path}",
            )
        )
    else:
        checks.append(Check("ok", "state dir", f"{path} root-owned, mode {mode:o}"))
    mount = _mount_of(path)
    if mount is None:
        checks.append(Check("warn", "state dir disk", f"the mount of {path} could not be found"))
        return checks
    point, fstype, source = mount
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse"):
        checks.append(
            Check(
                "FAIL",
                "state dir disk",
                f"{path} is on {fstype} ({source} at {point}): storage that can stall would "
                "hang the verb while it holds its lock; put it on the host's local root disk",
            )
        )
        return checks
    shared = []
    for sid, kind, pool in _vm_storage_pools(cfg):
        if fstype == "zfs" and kind == "zfspool" and source.split("/")[0] == pool.split("/")[0]:
            shared.append(f"ZFS pool {pool.split('/')[0]} (storage {sid})")
        if kind in ("lvm", "lvmthin") and _lvm_vg(source) == pool:
            shared.append(f"LVM volume group {pool} (storage {sid})")
    if shared:
        checks.append(
            Check(
                "warn",
                "state dir disk",
                f"{path} is on {fstype} {source}, which shares {', '.join(shared)} with the VMs' "
                "disks: a stall of that storage can stall the verb too (docs/pve-host.md §3: "
                "keep the state dir small, or on a separate disk or partition)",
            )
        )
    else:
        checks.append(Check("ok", "state dir disk", f"{path} is on local {fstype} ({source})"))
    with contextlib.suppress(OSError):
        fs = os.statvfs(path)
        free = fs.f_bavail * fs.f_frsize
        if free < cfg.max_total_bytes + 10_000_000:
            checks.append(
                Check(
                    "warn",
                    "state dir space",
                    f"{free // 1_000_000} MB free, retention may need "
                    f"{cfg.max_total_bytes // 1_000_000} MB: free space or lower "
                    "retention.max_total_bytes",
                )
            )
    return checks


def _expand_keys_file(pattern: str, user: str, home: str) -> str:
    """sshd's AuthorizedKeysFile tokens (%% %u %h), relative to the home directory."""
    out = pattern.replace("%%", "\0").replace("%u", user).replace("%h", home).replace("\0", "%")
    return out if out.startswith("/") else os.path.join(home, out)


def check_sshd(cfg: Config, verb_path: str) -> list[Check]:
    """sshd -T: the key files in order — the one holding the breakglass key must be on local
    disk and come before any file on /etc/pve (sshd reads them in order, so a hung pmxcfs
    listed first blocks the login even when the key is in a later file)."""
    argv = [
        cfg.sshd,
        "-T",
        "-f",
        cfg.sshd_config,
        "-C",
        "user=root,host=localhost,addr=127.0.0.1,laddr=127.0.0.1,lport=22",
    ]
    res = run_bounded(argv, 10.0, 1_000_000)
    text = res.output.decode("utf-8", "replace")
    if res.status != "ok":
        return [
            Check(
                "FAIL",
                "sshd -T",
                f"{' '.join(argv)} failed ({res.detail}): {text.strip()[-200:]}",
            )
        ]
    settings: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), value.strip())
    checks = []
    permit = settings.get("permitrootlogin", "")
    if permit == "no":
        checks.append(
            Check("FAIL", "sshd root login", "PermitRootLogin no: the key cannot log in as root")
        )
    else:
        checks.append(Check("ok", "sshd root login", f"PermitRootLogin {permit}"))
    files = settings.get("authorizedkeysfile", "").split()
    if not files or files == ["none"]:
        return [*checks, Check("FAIL", "sshd key files", "AuthorizedKeysFile is none")]
    home = os.path.expanduser("~root")
    paths = [_expand_keys_file(f, "root", home) for f in files]
    pve = os.path.realpath(cfg.pve_dir)

    def inspect() -> list[dict[str, Any]]:
        out = []
        for p in paths:
            real = os.path.realpath(p)
            entry: dict[str, Any] = {"path": p, "real": real, "key": False, "restrict": False}
            with contextlib.suppress(OSError), open(real, encoding="utf-8", errors="replace") as fh:
                for line in fh.read(1_000_000).splitlines():
                    m = re.match(r'\s*(\S*command="([^"]*)"\S*)\s', line)
                    if m and ("breakglass-verb" in m.group(2) or verb_path in m.group(2)):
                        entry["key"] = True
                        entry["restrict"] = "restrict" in m.group(1).split(",")
            out.append(entry)
        return out

    status, found = call_isolated(inspect, 10.0)
    if status != "ok" or not isinstance(found, list):
        return [
            *checks,
            Check(
                "FAIL",
                "sshd key files",
                f"the key files {' '.join(paths)} could not be read in time ({status}): a hung "
                "/etc/pve (pmxcfs) in that list blocks logins",
            ),
        ]
    order = " then ".join(
        f"{e['path']}" + (f" (-> {e['real']})" if e["real"] != e["path"] else "") for e in found
    )
    holder = next((i for i, e in enumerate(found) if e["key"]), None)

    def on_pve(e: dict[str, Any]) -> bool:
        return bool(e["real"] == pve or e["real"].startswith(pve.rstrip("/") + "/"))

    if holder is None:
        checks.append(
            Check(
                "FAIL",
                "sshd key files",
                f'no key file holds a command="…breakglass-verb" line; sshd reads {order}',
            )
        )
    elif on_pve(found[holder]):
        checks.append(
            Check(
                "FAIL",
                "sshd key files",
                f"the breakglass key is in {found[holder]['path']}, which is on {cfg.pve_dir} "
                "(pmxcfs): when pmxcfs is down or hung every key login fails or hangs. Put it in "
                "/etc/ssh/authorized_keys.d/root and list that file first (docs/pve-host.md §5)",
            )
        )
    elif any(on_pve(e) for e in found[:holder]):
        checks.append(
            Check(
                "FAIL",
                "sshd key files",
                f"sshd reads {order}: a file on {cfg.pve_dir} comes before the one holding the "
                "breakglass key, so a hung pmxcfs blocks the login; list the local file first",
            )
        )
    else:
        checks.append(
            Check(
                "ok",
                "sshd key files",
                f"the breakglass key is in {found[holder]['path']} on local disk, read first of "
                f"{order}",
            )
        )
        if not found[holder]["restrict"]:
            checks.append(
                Check(
                    "FAIL",
                    "sshd key options",
                    'the breakglass key\'s line lacks restrict: add command="…",restrict',
                )
            )
    return checks


def preflight(environ: dict[str, str] | None = None) -> int:
    """``breakglass-verb --preflight``: read-only checks of what the verb relies on, one line
    each on stdout; exit 1 if any check fails, else 0."""
    checks: list[Check] = []

    def emit() -> int:
        out = "".join(c.line() + "\n" for c in checks)
        write_fd(1, out.encode("utf-8", "replace"))
        failed = sum(c.result == "FAIL" for c in checks)
        summary = (
            f"preflight: {failed} check(s) failed\n" if failed else "preflight: all checks passed\n"
        )
        write_fd(1, summary.encode())
        return EXIT_PREFLIGHT_FAILED if failed else EXIT_OK

    path = config_path(environ)
    try:
        cfg = load_config(environ)
    except ConfigInvalid as exc:
        checks.append(Check("FAIL", "config", f"{exc}"))
        return emit()
    checks.append(Check("ok", "config", f"{path} (vmid {cfg.vmid})"))
    checks.append(
        Check("ok", "running as root", "euid 0")
        if os.geteuid() == 0
        else Check("warn", "running as root", f"euid {os.geteuid()}: run --preflight as root")
    )
    me = os.path.realpath(__file__)
    bad = []
    for p in (me, os.path.dirname(me)):
        with contextlib.suppress(OSError):
            st = os.stat(p)
            if st.st_uid != 0 or st.st_mode & 0o022:
                bad.append(f"{p} (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
    checks.append(
        Check(
            "FAIL",
            "program",
            f"writable by someone other than root: {', '.join(bad)}; whoever can change "
            "it owns the hypervisor: chown root:root and chmod go-w",
        )
        if bad
        else Check("ok", "program", f"{me}, root-owned, not group/world-writable")
    )
    checks.append(
        Check("ok", "qm", cfg.qm)
        if os.access(cfg.qm, os.X_OK)
        else Check("FAIL", "qm", f"{cfg.qm} is not an executable: fix the config key qm")
    )
    checks.append(
        Check("ok", "qemu run dir", cfg.qemu_run_dir)
        if os.path.isdir(cfg.qemu_run_dir)
        else Check("FAIL", "qemu run dir", f"{cfg.qemu_run_dir} is not a directory")
    )
    facts = pve_facts(cfg, cfg.probe_s)
    if facts.status != "ok":
        checks.append(Check("FAIL", "pmxcfs", facts.detail))
    else:
        checks.append(
            Check("ok", "vm config", str(cfg.vm_config_file))
            if facts.config
            else Check(
                "FAIL",
                "vm config",
                f"{cfg.vm_config_file} does not exist: is vmid {cfg.vmid} a VM of this node?",
            )
        )
        checks.append(
            Check("ok", "quorum", f"{cfg.pve_dir}/local is writable")
            if facts.quorate
            else Check(
                "FAIL",
                "quorum",
                f"no quorum ({facts.detail or cfg.pve_dir + '/local is read-only'}): start, "
                "stop and cycle are refused until it returns (pvecm status)",
            )
        )
        checks.append(
            Check(
                "warn",
                "vm lock",
                f"locked ({facts.lock}): mutating verbs are refused while it lasts",
            )
            if facts.lock
            else Check("ok", "vm lock", "no lock in the VM's config")
        )
        checks.append(
            Check(
                "warn",
                "ha",
                f"the VM is HA-managed (requested {facts.ha.get('requested')}): stop and cycle "
                "are refused (ha-manager owns its power state); reset and start work",
            )
            if facts.ha
            else Check("ok", "ha", "the VM is not HA-managed")
        )
    procs = vm_processes(cfg, 1.0)
    if procs.kvm is not None:
        listed = any(k.pid == procs.kvm.pid for k in procs.scope)
        checks.append(
            Check("ok", "vm scope", f"{cfg.scope_dir}/cgroup.procs lists kvm pid {procs.kvm.pid}")
            if listed
            else Check(
                "FAIL",
                "vm scope",
                f"{cfg.scope_dir}/cgroup.procs does not list kvm pid {procs.kvm.pid}: a kvm that "
                "survives a stop could not be seen; check config key cgroup_dir (cgroup v2)",
            )
        )
    elif procs.survivor is not None:
        checks.append(
            Check(
                "FAIL",
                "vm scope",
                f"{kvm_alive_words(procs.survivor.state)}: pid {procs.survivor.pid} is in the "
                "VM's scope without a pid file",
            )
        )
    else:
        detail = procs.detail
        checks.append(
            Check("ok", "vm scope", f"the VM is stopped ({detail}); its scope is empty")
            if os.path.isdir(os.path.join(cfg.cgroup_dir, "qemu.slice"))
            else Check(
                "warn",
                "vm scope",
                f"{cfg.cgroup_dir}/qemu.slice does not exist: is cgroup_dir the cgroup v2 root?",
            )
        )
    res = run_bounded([cfg.qm, "status", str(cfg.vmid)], cfg.probe_s, 65536)
    said = res.output.decode("utf-8", "replace").strip()
    checks.append(
        Check("ok", "qm status", said)
        if res.status == "ok"
        else Check("FAIL", "qm status", f"{res.detail}: {said[-200:]}")
    )
    checks.extend(check_state_dir(cfg))
    checks.extend(check_sshd(cfg, me))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(cfg.syslog_socket)
        checks.append(Check("ok", "syslog", cfg.syslog_socket))
    except OSError as exc:
        checks.append(
            Check(
                "warn",
                "syslog",
                f"{cfg.syslog_socket}: {exc.strerror}; decisions go to {cfg.state_dir}/verb.log",
            )
        )
    return emit()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the forced command: returns the exit code (see module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    if args == [PREFLIGHT_ARG]:
        return preflight()
    if args == [VERSION_ARG]:
        print(f"breakglass-verb {VERSION} (protocol {PROTOCOL_VERSION})")
        return 0
    # Otherwise the command comes from SSH_ORIGINAL_COMMAND, never from argv.
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
                "outcome": REFUSED_BAD_INPUT,
                "exit_code": EXIT_BAD_INPUT,
                "message": message,
            },
        )
        # A refusal reads nothing of the host's state (no ledger, no lock, no qm).
        doc = run.document(EXIT_BAD_INPUT, message, refused=REFUSED_BAD_INPUT, budget=False)
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
