"""The simulated devvm's state: files, processes, services, journal and kernel log, per scenario.

Plain data and the repairs that change it; no SSH here (devvm_sim.py serves it, shell.py reads and
changes it). Every figure is computed from the state at the moment it is asked for, so a repair
shows at once in `df`, `free`, `ps` or `systemctl status`.

Scenarios (the warm case's usual suspects):
- ``healthy``: all fine.
- ``disk-full``: ``log-spammer.service`` writes /var/log/app/runaway.log, which has filled ``/``.
  ``rm``/``truncate`` of the log frees the disk; while the writer runs the log grows again slowly.
- ``oom``: a ``memhog`` process holds nearly all memory; the kernel log has OOM-killer reports.
  ``kill`` of it frees the memory.
- ``stuck-service``: ``webapp.service`` failed on start, waiting on a stale lock; ``systemctl
  restart webapp`` fixes it.
- ``wedged``: the guest accepts TCP but sshd never sends its banner (served by devvm_sim.py).
- ``io-stall``: the virtual disk stopped answering: commands that touch the disk hang, /proc reads
  and ``uptime`` answer slowly.

A reboot (a new boot id from the simulated Proxmox) is modelled as a real one would be:
wedged and io-stall are cleared; a memhog is gone (it was no service); services start afresh and
the stale webapp lock, which lives on the /run tmpfs, is gone; but files on disk stay: a full disk
stays full until the log is removed, and ``log-spammer`` (enabled) starts writing again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

SCENARIOS = ("healthy", "disk-full", "oom", "stuck-service", "wedged", "io-stall")

HOSTNAME = "devvm"
KERNEL = "6.1.0-27-amd64"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

RUNAWAY_LOG = "/var/log/app/runaway.log"
WEBAPP_LOCK = "/run/webapp/webapp.lock"
# How fast the runaway writer fills the disk again once the log is gone: slow enough that a
# repair shows in `df`, fast enough that the operator sees it come back if the writer still runs.
SPAMMER_BYTES_PER_S = 4 * MIB
MEM_TOTAL_KB = 16_393_568
SWAP_TOTAL_KB = 2_097_148
KERNEL_MEM_KB = 360_000  # slab, page tables, kernel stacks: used but owned by no process
DISK_TOTAL_KB = 51_343_840  # /dev/vda1, ext4, 49G
DISK_RESERVED_KB = DISK_TOTAL_KB // 20  # ext4's 5% for root: `Avail` hits 0 before `Used` = size


_SIGNUM = {"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15}


@dataclass
class SimFile:
    """A file on the simulated disk. Small files carry their text; big logs synthesise lines."""

    size: int  # bytes
    mtime: float
    text: str | None = None
    line: Callable[[int], str] | None = None  # line number -> text, for big synthetic logs
    mode: str = "-rw-r--r--"
    owner: str = "root"

    def lines(self) -> int:
        """How many lines the file holds (synthetic logs: estimated from the size)."""
        if self.text is not None:
            return self.text.count("\n")
        if self.line is None or self.size == 0:
            return 0
        return max(1, self.size // len(self.line(0)))


@dataclass
class SimProcess:
    """A process in the simulated process table."""

    pid: int
    user: str
    command: str
    rss_kb: int = 4_000
    vsz_kb: int = 20_000
    cpu: float = 0.0
    stat: str = "Ss"
    start: float = 0.0
    ppid: int = 1
    pgid: int = 0
    tty: str = "?"
    swap_kb: int = 0
    unit: str | None = None  # the systemd unit it belongs to
    # For an exec channel's own process: called with a signal name to stop the simulated command.
    on_signal: Callable[[str], None] | None = None

    @property
    def comm(self) -> str:
        first = self.command.split()[0]
        return first.strip("[]:").rsplit("/", 1)[-1][:15]


@dataclass
class SimService:
    """A systemd unit of the simulated devvm."""

    name: str  # "webapp.service"
    description: str
    exec_start: str
    active: str = "active"  # active | failed | inactive | activating
    sub: str = "running"  # running | failed | dead | start
    result: str = ""  # "timeout", "exit-code" when failed
    since: float = 0.0
    main_pid: int | None = None
    rss_kb: int = 20_000
    enabled: bool = True
    restart_always: bool = False


@dataclass
class JournalEntry:
    ts: float
    ident: str  # syslog identifier: "systemd", "webapp", "kernel"
    message: str
    pid: int | None = None
    unit: str | None = None
    priority: int = 6  # syslog priority: 3 err, 4 warning, 6 info


@dataclass
class DevvmState:
    """Everything the simulated devvm's shell shows and changes."""

    scenario: str
    boot_time: float
    wedged: bool = False
    io_stall: bool = False
    files: dict[str, SimFile] = field(default_factory=dict)
    # Space used under a directory by files the simulation does not list one by one.
    dir_extra_kb: dict[str, int] = field(default_factory=dict)
    processes: dict[int, SimProcess] = field(default_factory=dict)
    services: dict[str, SimService] = field(default_factory=dict)
    journal: list[JournalEntry] = field(default_factory=list)
    dmesg: list[tuple[float, str]] = field(default_factory=list)  # (seconds since boot, text)
    next_pid: int = 4000
    boots: int = 1
    _spam_checked: float = 0.0

    # -- time and growth -------------------------------------------------------------------------

    def now(self) -> float:
        return time.time()

    def uptime_s(self) -> float:
        return max(0.0, self.now() - self.boot_time)

    def tick(self) -> None:
        """Advance what grows on its own: the runaway log, while its writer runs and space lasts."""
        now = self.now()
        elapsed = now - self._spam_checked
        self._spam_checked = now
        spammer = self.services.get("log-spammer.service")
        if spammer is None or spammer.active != "active" or elapsed <= 0:
            return
        log = self.files.get(RUNAWAY_LOG)
        if log is None:
            # The writer reopens its log (O_CREAT) at its next line.
            log = self.files[RUNAWAY_LOG] = SimFile(0, now, line=_spam_line(now))
        grow = min(int(elapsed * SPAMMER_BYTES_PER_S), self.disk_avail_kb() * KIB)
        if grow > 0:
            log.size += grow
            log.mtime = now

    def new_pid(self) -> int:
        self.next_pid += 1 + self.next_pid % 3  # gaps, as a busy system has
        return self.next_pid

    # -- disk ----------------------------------------------------------------------------------

    def disk_used_kb(self) -> int:
        files = sum(-(-f.size // 4096) * 4 for p, f in self.files.items() if not _on_tmpfs(p))
        return sum(self.dir_extra_kb.values()) + files

    def disk_avail_kb(self) -> int:
        return max(0, DISK_TOTAL_KB - DISK_RESERVED_KB - self.disk_used_kb())

    def du_kb(self, path: str) -> int | None:
        """Disk usage under `path` (None: no such file or directory)."""
        path = path.rstrip("/") or "/"
        if path in self.files:
            return -(-self.files[path].size // 4096) * 4
        if not self.is_dir(path):
            return None
        prefix = "/" if path == "/" else path + "/"
        extra = sum(kb for d, kb in self.dir_extra_kb.items() if d == path or d.startswith(prefix))
        files = sum(-(-f.size // 4096) * 4 for p, f in self.files.items() if p.startswith(prefix))
        return 4 + extra + files

    def is_dir(self, path: str) -> bool:
        path = path.rstrip("/") or "/"
        if path == "/":
            return True
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self.files) or any(
            d == path or d.startswith(prefix) for d in self.dir_extra_kb
        )

    def children(self, path: str) -> list[str]:
        """Names directly inside directory `path`."""
        path = path.rstrip("/") or "/"
        prefix = "/" if path == "/" else path + "/"
        names = {
            p[len(prefix) :].split("/", 1)[0]
            for p in [*self.files, *self.dir_extra_kb]
            if p.startswith(prefix) and len(p) > len(prefix)
        }
        return sorted(names)

    # -- memory --------------------------------------------------------------------------------

    def mem(self) -> dict[str, int]:
        """Memory figures in KiB, shaped like /proc/meminfo's."""
        rss = sum(p.rss_kb for p in self.processes.values())
        used = min(MEM_TOTAL_KB - 60_000, rss + KERNEL_MEM_KB)
        cache = max(40_000, min(2_520_000, MEM_TOTAL_KB - used - 90_000))
        free = max(52_000, MEM_TOTAL_KB - used - cache)
        swap_used = min(SWAP_TOTAL_KB, sum(p.swap_kb for p in self.processes.values()))
        return {
            "total": MEM_TOTAL_KB,
            "used": used,
            "free": free,
            "shared": 12_340,
            "buffers": cache // 12,
            "cached": cache - cache // 12,
            "buff_cache": cache,
            "available": free + cache * 6 // 10,
            "swap_total": SWAP_TOTAL_KB,
            "swap_used": swap_used,
            "swap_free": SWAP_TOTAL_KB - swap_used,
        }

    # -- pressure --------------------------------------------------------------------------------

    def memory_starved(self) -> bool:
        return self.mem()["available"] < 400_000

    def loadavg(self) -> tuple[float, float, float]:
        if self.io_stall:
            return (38.12, 31.40, 17.95)  # D-state tasks count in the load
        if self.memory_starved():
            return (9.87, 7.12, 4.03)
        return (0.08, 0.12, 0.10)

    def pressure(self, resource: str) -> tuple[float, float]:
        """(some avg10, full avg10) of /proc/pressure/<resource>."""
        if resource == "io" and self.io_stall:
            return (98.61, 97.02)
        if resource == "memory" and self.memory_starved():
            return (71.33, 64.20)
        if resource == "cpu" and self.memory_starved():
            return (12.40, 0.0)
        return (0.0, 0.0)

    # -- repairs ---------------------------------------------------------------------------------

    def remove_file(self, path: str) -> None:
        del self.files[path]

    def truncate_file(self, path: str, size: int) -> None:
        f = self.files[path]
        f.size = size
        f.mtime = self.now()
        if size == 0 and f.text is not None:
            f.text = ""

    def signal_process(self, pid: int, sig: str) -> None:
        """Deliver a signal: the process ends (the simulation's processes all die of TERM/KILL)."""
        proc = self.processes.get(pid)
        if proc is None:
            return
        if proc.on_signal is not None:
            proc.on_signal(sig)
            return
        if pid == 1 or sig in ("0", "HUP", "USR1", "USR2", "CONT", "WINCH"):
            return
        del self.processes[pid]
        for unit in self.services.values():
            if unit.main_pid == pid:
                self._service_died(unit, sig)

    def _service_died(self, unit: SimService, sig: str) -> None:
        now = self.now()
        self.log(
            "systemd",
            f"{unit.name}: Main process exited, code=killed, status={_SIGNUM.get(sig, 15)}/{sig}",
            unit=unit.name,
            priority=5,
        )
        if unit.restart_always:
            self.log(
                "systemd",
                f"{unit.name}: Scheduled restart job, restart counter is at 1.",
                unit=unit.name,
            )
            unit.active, unit.main_pid = "inactive", None
            self.start_service(unit.name)
            return
        unit.active, unit.sub, unit.result, unit.since, unit.main_pid = (
            "failed",
            "failed",
            "signal",
            now,
            None,
        )
        self.log(
            "systemd", f"{unit.name}: Failed with result 'signal'.", unit=unit.name, priority=4
        )

    def stop_service(self, name: str) -> None:
        unit = self.services[name]
        if unit.main_pid is not None:
            self.processes.pop(unit.main_pid, None)
        self.log("systemd", f"Stopping {unit.name} - {unit.description}...", unit=unit.name)
        unit.active, unit.sub, unit.result, unit.since, unit.main_pid = (
            "inactive",
            "dead",
            "",
            self.now(),
            None,
        )
        self.log("systemd", f"{unit.name}: Deactivated successfully.", unit=unit.name)
        self.log("systemd", f"Stopped {unit.name} - {unit.description}.", unit=unit.name)

    def start_service(self, name: str) -> None:
        unit = self.services[name]
        if unit.active == "active":
            return
        if name == "webapp.service":
            # The lock's holder is long gone; a fresh start clears the stale lock (ExecStartPre).
            self.files.pop(WEBAPP_LOCK, None)
        self.log("systemd", f"Starting {unit.name} - {unit.description}...", unit=unit.name)
        pid = self.new_pid()
        self.processes[pid] = SimProcess(
            pid,
            "root" if name != "webapp.service" else "www-data",
            unit.exec_start,
            rss_kb=unit.rss_kb,
            vsz_kb=unit.rss_kb * 4,
            start=self.now(),
            pgid=pid,
            unit=name,
            stat="Ssl",
            cpu=0.3,
        )
        unit.active, unit.sub, unit.result, unit.since, unit.main_pid = (
            "active",
            "running",
            "",
            self.now(),
            pid,
        )
        if name == "log-spammer.service":
            self._spam_checked = self.now()
        self.log("systemd", f"Started {unit.name} - {unit.description}.", unit=unit.name)
        if name == "webapp.service":
            self.log("webapp", "listening on 0.0.0.0:8080", pid=pid, unit=name)

    def log(
        self,
        ident: str,
        message: str,
        *,
        pid: int | None = None,
        unit: str | None = None,
        priority: int = 6,
    ) -> None:
        self.journal.append(
            JournalEntry(
                self.now(),
                ident,
                message,
                pid if pid else (1 if ident == "systemd" else None),
                unit,
                priority,
            )
        )

    def reboot(self, booted_at: float) -> None:
        """The guest rebooted (new boot id): see the module docstring for what a reboot fixes."""
        old_files = self.files
        fresh = build_state("healthy", boot_time=booted_at)
        # Files survive a reboot, except those on the /run tmpfs.
        fresh.files = {p: f for p, f in old_files.items() if not _on_tmpfs(p)}
        if "log-spammer.service" in self.services:
            spammer = self.services["log-spammer.service"]
            fresh.services["log-spammer.service"] = SimService(
                spammer.name,
                spammer.description,
                spammer.exec_start,
                enabled=spammer.enabled,
                rss_kb=spammer.rss_kb,
                restart_always=True,
                active="inactive",
                sub="dead",
            )
            if spammer.enabled:
                fresh.start_service("log-spammer.service")
        fresh.boots = self.boots + 1
        fresh.scenario = self.scenario
        fresh.next_pid = fresh.next_pid + 7 * fresh.boots
        self.__dict__.update(fresh.__dict__)


def _on_tmpfs(path: str) -> bool:
    # Paths on the simulated guest, not on this machine.
    return path.startswith(("/run/", "/dev/shm/", "/tmp/"))  # noqa: S108


def _spam_line(start: float) -> Callable[[int], str]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))

    def line(i: int) -> str:
        return (
            f"{stamp}.{i % 1000:03d}Z DEBUG app.sync: retrying upstream fetch"
            f' attempt={i} backoff_ms=0 err="connection reset by peer"\n'
        )

    return line


def _base_processes(state: DevvmState, boot: float) -> None:
    """The processes a small Debian 12 VM runs, plus a user's session."""
    rows = [
        (1, "root", "/sbin/init", 13_012, 168_024, "Ss"),
        (2, "root", "[kthreadd]", 0, 0, "S"),
        (3, "root", "[rcu_gp]", 0, 0, "I<"),
        (13, "root", "[ksoftirqd/0]", 0, 0, "S"),
        (245, "root", "[jbd2/vda1-8]", 0, 0, "S"),
        (289, "root", "/lib/systemd/systemd-journald", 31_220, 48_412, "Ss"),
        (312, "root", "/lib/systemd/systemd-udevd", 11_004, 26_516, "Ss"),
        (
            498,
            "message+",
            "/usr/bin/dbus-daemon --system --address=systemd: --nofork"
            " --nopidfile --systemd-activation --syslog-only",
            5_104,
            9_400,
            "Ss",
        ),
        (503, "root", "/lib/systemd/systemd-logind", 7_644, 16_892, "Ss"),
        (511, "root", "/usr/sbin/cron -f", 2_788, 6_688, "Ss"),
        (
            540,
            "root",
            "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
            9_332,
            15_420,
            "Ss",
        ),
        (552, "root", "/sbin/agetty -o -p -- \\u --noclear - linux", 1_956, 5_876, "Ss+"),
        (1290, "viktor", "/usr/bin/tmux new -s work", 5_560, 11_204, "Ss"),
        (1291, "viktor", "-bash", 5_312, 8_296, "Ss+"),
    ]
    for pid, user, cmd, rss, vsz, stat in rows:
        state.processes[pid] = SimProcess(
            pid,
            user,
            cmd,
            rss,
            vsz,
            stat=stat,
            start=boot,
            ppid=0 if pid in (1, 2) else (2 if cmd[0] == "[" else 1),
            pgid=pid,
        )
    units = {
        "systemd-journald.service": ("Journal Service", 289),
        "cron.service": ("Regular background program processing daemon", 511),
        "ssh.service": ("OpenBSD Secure Shell server", 540),
        "systemd-logind.service": ("User Login Management", 503),
    }
    for name, (desc, pid) in units.items():
        state.services[name] = SimService(
            name, desc, state.processes[pid].command, since=boot, main_pid=pid
        )
        state.processes[pid].unit = name


def _base_files(state: DevvmState, boot: float) -> None:
    now = state.now()
    state.dir_extra_kb.update(
        {
            "/usr": 4_912_340,
            "/var/lib": 1_733_112,
            "/var/cache": 402_220,
            "/home/viktor": 1_322_504,
            "/opt": 210_332,
            "/boot": 98_112,
            "/etc": 6_120,
            "/root": 48,
            "/srv": 4,
            "/var/log/journal": 262_144,
            "/tmp": 0,  # noqa: S108 - the simulated guest's /tmp
        }
    )
    hostname = f"{HOSTNAME}\n"
    os_release = (
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
        'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n'
    )
    syslog_line = "2026-11-28T00:00:01+00:00 devvm CRON[2210]: (root) CMD (command -v debian-sa1)\n"
    app_line = "2026-11-28T09:12:00Z INFO app: request served path=/healthz status=200\n"
    for path, text in {
        "/etc/hostname": hostname,
        "/etc/os-release": os_release,
        "/etc/webapp.toml": '[server]\nlisten = "0.0.0.0:8080"\nlock = "/run/webapp/webapp.lock"\n',
    }.items():
        state.files[path] = SimFile(len(text), boot - 86_400 * 30, text=text)
    state.files["/var/log/syslog"] = SimFile(48_211_442, now - 3, line=lambda i: syslog_line)
    state.files["/var/log/auth.log"] = SimFile(
        1_204_118,
        now - 60,
        line=lambda i: (
            "2026-11-28T14:00:00+00:00 devvm sshd[3001]:"
            " Accepted publickey for breakglass from 10.0.0.5 port 50122 ssh2\n"
        ),
    )
    state.files["/var/log/app/app.log"] = SimFile(
        18_402_224, now - 5, line=lambda i: app_line, owner="www-data", mode="-rw-r-----"
    )


def build_state(scenario: str, *, boot_time: float | None = None) -> DevvmState:
    """A devvm in `scenario` (one of SCENARIOS), booted at `boot_time` (default: 3 days ago)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown lab scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    now = time.time()
    boot = boot_time if boot_time is not None else now - (3 * 86_400 + 4 * 3600 + 12 * 60)
    state = DevvmState(scenario=scenario, boot_time=boot, _spam_checked=now)
    _base_processes(state, boot)
    _base_files(state, boot)
    state.dmesg += [
        (
            0.0,
            f"Linux version {KERNEL} (debian-kernel@lists.debian.org) (gcc-12 (Debian"
            " 12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP"
            " PREEMPT_DYNAMIC Debian 6.1.115-1 (2024-11-01)",
        ),
        (
            0.0,
            f"Command line: BOOT_IMAGE=/boot/vmlinuz-{KERNEL} root=UUID=6f1e0c3a-6d2b-4c1e-9a57"
            "-0b6f9d0e2a11 ro quiet",
        ),
        (
            0.412345,
            "virtio_blk virtio2: [vda] 104857600 512-byte logical blocks (53.7 GB/50.0 GiB)",
        ),
        (1.902113, "EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none."),
        (3.331020, "virtio_net virtio1 ens18: renamed from eth0"),
    ]
    state.log("kernel", f"Linux version {KERNEL}", priority=5)
    state.journal[-1].ts = boot
    webapp = SimService(
        "webapp.service",
        "Example web application",
        "/usr/local/bin/webapp --config /etc/webapp.toml",
        rss_kb=49_400,
        active="inactive",
        sub="dead",
    )
    state.services["webapp.service"] = webapp
    state.start_service("webapp.service")
    for e in state.journal:
        e.ts = min(e.ts, boot + 9)
    webapp.since = boot + 9
    state.processes[webapp.main_pid or 0].start = boot + 9

    if scenario == "disk-full":
        _disk_full(state)
    elif scenario == "oom":
        _oom(state)
    elif scenario == "stuck-service":
        _stuck_service(state)
    elif scenario == "wedged":
        state.wedged = True
    elif scenario == "io-stall":
        _io_stall(state)
    return state


def _disk_full(state: DevvmState) -> None:
    now = state.now()
    spammer = SimService(
        "log-spammer.service",
        "App debug log writer",
        "/usr/local/bin/log-spammer --out /var/log/app/runaway.log",
        rss_kb=9_800,
        active="inactive",
        sub="dead",
        restart_always=True,
    )
    state.services[spammer.name] = spammer
    state.start_service(spammer.name)
    spammer.since = now - 41 * 3600
    pid = spammer.main_pid or 0
    state.processes[pid].start = spammer.since
    state.processes[pid].cpu = 14.2
    log = SimFile(0, now, line=_spam_line(spammer.since))
    state.files[RUNAWAY_LOG] = log
    log.size = state.disk_avail_kb() * KIB  # exactly what was left: / is full (about 38G)
    state._spam_checked = now
    for minutes in (42, 31, 17, 3):
        state.journal.append(
            JournalEntry(
                now - minutes * 60,
                "webapp",
                "write /var/log/app/app.log: no space left on device",
                state.services["webapp.service"].main_pid,
                "webapp.service",
                3,
            )
        )
    state.journal.append(
        JournalEntry(
            now - 50,
            "systemd-journald",
            "Failed to write entry, ignoring: No space left on device",
            289,
            "systemd-journald.service",
            3,
        )
    )
    state.journal.sort(key=lambda e: e.ts)
    up = state.uptime_s()
    state.dmesg.append(
        (
            up - 1200,
            "EXT4-fs warning (device vda1): ext4_dx_add_entry:2533:"
            " Directory (ino: 131075) index full, reach max htree level :2",
        )
    )


def _oom(state: DevvmState) -> None:
    now = state.now()
    pid = 3187
    state.processes[pid] = SimProcess(
        pid,
        "viktor",
        "/home/viktor/bin/memhog --size 20G",
        rss_kb=15_402_112,
        vsz_kb=20_975_640,
        cpu=97.3,
        stat="R+",
        start=now - 2_400,
        ppid=1291,
        pgid=pid,
        tty="pts/0",
        swap_kb=2_050_000,
    )
    up = state.uptime_s()
    lines = [
        "memhog invoked oom-killer: gfp_mask=0x140dca(GFP_HIGHUSER_MOVABLE|__GFP_COMP|__GFP_ZERO),"
        " order=0, oom_score_adj=0",
        f"CPU: 1 PID: {pid} Comm: memhog Not tainted {KERNEL} #1 Debian 6.1.115-1",
        "Mem-Info:",
        "active_anon:3841021 inactive_anon:2012 isolated_anon:0",
        "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
        "global_oom,task_memcg=/system.slice/node-worker.service,task=node,pid=2744,uid=1000",
        "Out of memory: Killed process 2744 (node) total-vm:1285312kB, anon-rss:602112kB,"
        " file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:2216kB oom_score_adj:0",
        "oom_reaper: reaped process 2744 (node), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
    ]
    for i, text in enumerate(lines):
        state.dmesg.append((up - 600 + i * 0.001, text))
    state.dmesg.append(
        (
            up - 90,
            "memhog invoked oom-killer: gfp_mask=0x140dca(GFP_HIGHUSER_MOVABLE"
            "|__GFP_COMP|__GFP_ZERO), order=0, oom_score_adj=0",
        )
    )
    state.dmesg.append(
        (
            up - 89.99,
            "Out of memory: Killed process 1822 (webapp) total-vm:"
            "402112kB, anon-rss:41208kB, file-rss:0kB, shmem-rss:0kB,"
            " UID:33 pgtables:412kB oom_score_adj:0",
        )
    )
    state.journal.append(JournalEntry(now - 600, "kernel", lines[5], priority=3))
    state.journal.append(JournalEntry(now - 90, "kernel", state.dmesg[-1][1], priority=3))
    # The OOM killer took webapp's worker; systemd restarted it.
    state.journal.sort(key=lambda e: e.ts)


def _stuck_service(state: DevvmState) -> None:
    now = state.now()
    webapp = state.services["webapp.service"]
    old_pid = webapp.main_pid
    if old_pid is not None:
        state.processes.pop(old_pid, None)
    pid = 1822
    webapp.active, webapp.sub, webapp.result, webapp.since, webapp.main_pid = (
        "failed",
        "failed",
        "timeout",
        now - 17 * 60,
        None,
    )
    state.files[WEBAPP_LOCK] = SimFile(5, now - 3 * 3600, text="1411\n", owner="www-data")
    t0 = now - 17 * 60 - 90
    for dt, ident, msg, prio in [
        (0, "systemd", "Starting webapp.service - Example web application...", 6),
        (1, "webapp", "waiting for lock /run/webapp/webapp.lock held by pid 1411", 4),
        (
            31,
            "webapp",
            "still waiting for lock /run/webapp/webapp.lock (pid 1411 is not running: stale lock?)",
            4,
        ),
        (90, "systemd", "webapp.service: start operation timed out. Terminating.", 3),
        (90.2, "systemd", "webapp.service: Failed with result 'timeout'.", 4),
        (90.2, "systemd", "Failed to start webapp.service - Example web application.", 3),
    ]:
        state.journal.append(
            JournalEntry(
                t0 + dt, ident, msg, pid if ident == "webapp" else 1, "webapp.service", prio
            )
        )
    state.journal.sort(key=lambda e: e.ts)


def _io_stall(state: DevvmState) -> None:
    state.io_stall = True
    up = state.uptime_s()
    for i, task in enumerate(
        ("jbd2/vda1-8:245", "systemd-journal:289", "webapp:1822", "kworker/u4:2:4711")
    ):
        state.dmesg.append(
            (up - 300 + i * 0.02, f"INFO: task {task} blocked for more than 120 seconds.")
        )
        state.dmesg.append(
            (up - 300 + i * 0.02 + 0.001, f"      Not tainted {KERNEL} #1 Debian 6.1.115-1")
        )
    state.dmesg.append((up - 60, "virtio_blk virtio2: [vda] request timeout, resetting queue"))
    for p in (245, 289):
        state.processes[p].stat = "D"
