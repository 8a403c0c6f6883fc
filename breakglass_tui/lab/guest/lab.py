"""The real-guest lab: a real Linux devvm under QEMU on loopback, failing for real.

:func:`start_real_lab` returns the same shape as the simulated lab's
:class:`~breakglass_tui.lab.lab.Lab` (``devvm``, ``pve``, ``devvm_key``, ``pve_key``,
``client_keys``, ``sim``, ``scenario``, ``close()``), so the hosts layer, the breakglass agent and
the app use either. Nothing about the devvm is simulated: it is the image built by
:mod:`breakglass_tui.lab.guest.build` (a Debian kernel, busybox and dropbear) booted by a real
``qemu-system-x86_64``; its SSH port is QEMU's user-network forward on 127.0.0.1, fixed for the
lab's lifetime, and its dropbear host key is pinned. The PVE side is B's
:class:`~breakglass_tui.lab.pve_host.LabPveHost` running the real ``breakglass-verb`` with
:mod:`breakglass_tui.lab.guest.qm` as its ``qm``.

Scenarios: ``disk-full``, ``oom``, ``stuck-service`` are set up inside the guest at boot
(``bg_scenario=`` on the kernel command line; a reset brings them back, like an enabled service
would: repair them in the guest). ``wedged``: the lab pauses the vCPUs over QMP (``stop``) once
SSH answers — QEMU still accepts TCP, the banner never comes. ``io-stall``: the data disk sits on
blkdebug, which fails the guest's first write with EIO; QEMU (``werror=stop``) pauses the VM with
an I/O error. The fault is transient: a resume (the verb's ``reset`` does one) or a ``cycle``
brings the guest back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect
from breakglass_tui.hosts.types import SshTarget
from breakglass_tui.lab import loopback
from breakglass_tui.lab.guest import qm as guest_qm
from breakglass_tui.lab.guest.build import GuestBuildError, GuestImage, build
from breakglass_tui.lab.guest.qm import GuestPaths
from breakglass_tui.lab.loopback import new_key, pinned_target, public_line
from breakglass_tui.lab.pve_host import VERB_PATH, LabPveHost
from breakglass_tui.lab.qm_standin import QmError, pid_alive, qmp, wait_gone, write_json_atomic
from breakglass_tui.lab.scenarios import SCENARIOS
from breakglass_tui.lab.verb_config import lab_verb_config

__all__ = [
    "SCENARIOS",
    "GuestUnavailable",
    "RealLab",
    "RealPve",
    "start_real_lab",
    "wait_for_ssh",
]

log = logging.getLogger(__name__)

DEVVM_USER = "root"  # the guest has no sudo; the hosts layer then runs commands without it
PVE_USER = "root"
VMID = 102
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 180.0  # TCG on a busy 2-core machine: usually 8-30 s
DATA_DISK_BYTES = 16 * 1024 * 1024
_MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes

# Over the verb's own defaults (production deadlines: QEMU's TCG is slow, but not slower than a
# loaded PVE host): a budget with a short cooldown, so a rehearsal can reset and then cycle.
VERB_CONFIG: dict[str, Any] = {"budget": {"max_mutating_per_hour": 6, "cooldown_s": 30}}


class GuestUnavailable(RuntimeError):
    """The real-guest lab cannot run here; the message names the cause and the next step."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealPve:
    """The lab's PVE host directory and its real QEMU (the ``sim`` of :class:`RealLab`).

    Attributes as :class:`~breakglass_tui.lab.sim_pve.SimPve`: root, vmid, qm_path,
    qemu_run_dir, state_dir, verb_config_path."""

    def __init__(self, root: Path, qemu_run_dir: Path, own_run_dir: bool) -> None:
        self.root = root
        self.vmid = VMID
        self.qm_path = root / "bin" / "qm"
        self.qemu_run_dir = qemu_run_dir
        self.state_dir = root / "state"
        self.verb_config_path = root / "verb.toml"
        self.console_log_path = root / "console.log"
        self.paths = GuestPaths(root)
        self._own_run_dir = own_run_dir

    def kvm_pid(self) -> int | None:
        """The PID of the live QEMU process (from the pid file), or None."""
        return self.paths.kvm_pid()

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on the VM (blocking; raises QmError)."""
        return qmp(self.paths, command, arguments)

    def vm_state(self) -> dict[str, Any]:
        """{"status": "running"|"stopped", "qmp_status": ..., "pid": ...} from /proc and QMP."""
        pid = self.kvm_pid()
        if pid is None:
            return {"vmid": self.vmid, "status": "stopped", "qmp_status": None, "pid": None}
        try:
            qmp_status = self.qmp("query-status")["status"]
        except QmError:
            qmp_status = None
        return {"vmid": self.vmid, "status": "running", "qmp_status": qmp_status, "pid": pid}

    def start_vm(self) -> int:
        """Start the VM's QEMU (not logged as a qm call); a running VM is left alone."""
        return self.kvm_pid() or guest_qm.start_qemu(self.paths)

    def calls(self) -> list[tuple[float, str]]:
        """Every qm call received, in order, with time.time()."""
        return self.paths.read_calls()

    def call_texts(self) -> list[str]:
        return [text for _, text in self.calls()]

    def console(self) -> str:
        """The guest's serial console so far."""
        try:
            return self.console_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Kill the QEMU processes this lab started (by PID, checked to be ours)."""
        for pid in self.paths.started_pids():
            if not guest_qm.is_lab_qemu(pid, self.root) or not pid_alive(pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._own_run_dir:
            shutil.rmtree(self.qemu_run_dir, ignore_errors=True)


@dataclass
class RealLab:
    """A running real-guest lab. Close it with ``await lab.close()``."""

    devvm: SshTarget
    pve: SshTarget
    devvm_key: asyncssh.SSHKey = field(repr=False)
    pve_key: asyncssh.SSHKey = field(repr=False)
    sim: RealPve
    scenario: str
    image: GuestImage
    pve_host: LabPveHost = field(repr=False)
    workdir: Path
    boot_s: float  # QEMU start to the first successful SSH command
    _own_workdir: bool = field(default=True, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def client_keys(self) -> list[asyncssh.SSHKey]:
        """Both private keys (devvm first), for a hosts layer without an ssh-agent."""
        return [self.devvm_key, self.pve_key]

    async def wait_for_ssh(self, timeout_s: float = BOOT_TIMEOUT_S) -> float:
        """Wait until the devvm runs a command over SSH; seconds waited (TimeoutError if not)."""
        return await wait_for_ssh(self.devvm, self.devvm_key, timeout_s)

    async def close(self) -> None:
        """Stop the PVE host and kill the QEMU processes the lab started; remove its workdir."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.pve_host.close(grace_s=2.0)
        await asyncio.to_thread(self.sim.cleanup)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> RealLab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def wait_for_ssh(target: SshTarget, key: asyncssh.SSHKey, timeout_s: float) -> float:
    """Poll until `true` runs on target over SSH (host key pinned); return the seconds waited."""
    t0 = time.monotonic()
    last = "no attempt"
    login = ConnectOptions(client_keys=[key], connect_timeout_s=6)
    while time.monotonic() - t0 < timeout_s:
        try:
            async with asyncio.timeout(8):
                async with await connect(target, login) as conn:
                    done = await conn.run("true", check=False)
                    if done.exit_status == 0:
                        return time.monotonic() - t0
                    last = f"`true` exited {done.exit_status}"
        except (SshConnectError, OSError, asyncssh.Error, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the devvm's SSH did not answer within {timeout_s:g} s (last: {last})")


async def _wait_qmp_status(pve: RealPve, want: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = (await asyncio.to_thread(pve.vm_state)).get("qmp_status")
        if seen == want:
            return
        await asyncio.sleep(0.3)
    raise TimeoutError(f"the VM did not reach QMP status {want!r} in {timeout_s:g} s ({seen})")


async def _panic(pve: RealPve, devvm: SshTarget, key: asyncssh.SSHKey) -> None:
    """Panic the guest's kernel (sysrq c) and wait until the console shows it."""
    with contextlib.suppress(SshConnectError, OSError, asyncssh.Error, TimeoutError):
        async with asyncio.timeout(5):
            async with await connect(devvm, ConnectOptions(client_keys=[key])) as conn:
                # The connection dies with the kernel: the command never returns.
                await conn.run("echo c > /proc/sysrq-trigger", check=False)
    deadline = time.monotonic() + 30
    while "Kernel panic" not in pve.console():
        if time.monotonic() > deadline:
            raise TimeoutError("the guest's kernel did not panic on sysrq c")
        await asyncio.sleep(0.2)


def check_available(cache: Path | None = None) -> GuestImage:
    """QEMU present and the image built (or buildable): the image, else GuestUnavailable."""
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(
            f"{QEMU} is not installed: the real-guest lab needs QEMU "
            "(apt-get install qemu-system-x86), or use the simulated lab (--lab without "
            "--real-guest)"
        )
    try:
        return build(cache, quiet=True)
    except GuestBuildError as exc:
        raise GuestUnavailable(
            f"the devvm guest image could not be built ({exc}); run 'apt-get update', then "
            "'python -m breakglass_tui.lab.guest.build' to build it into the cache"
        ) from None


def _lay_out(
    root: Path,
    scenario: str,
    image: GuestImage,
    devvm_key: asyncssh.SSHKey,
    verb_overrides: dict[str, Any] | None,
    memory_mb: int,
) -> tuple[RealPve, int]:
    """Write the lab PVE directory (qm wrapper, vm.json, faults, data disk, verb.toml); returns
    the RealPve and the devvm's SSH port. Blocking: run it in a thread."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    own_run = len(str(run_dir / f"{VMID}.qmp")) > _MAX_SOCKET_PATH
    if own_run:
        run_dir = Path(tempfile.mkdtemp(prefix="bg-qrun-"))
    run_dir.mkdir(exist_ok=True)
    (root / "state").mkdir(mode=0o700, exist_ok=True)
    pve = RealPve(root, run_dir, own_run)
    qm_path = guest_qm.write_qm_wrapper(root)
    with (root / "data.raw").open("wb") as f:
        f.truncate(DATA_DISK_BYTES)
    ssh_port = _free_port()
    authkey = base64.b64encode(public_line(devvm_key).encode()).decode()
    write_json_atomic(
        root / "vm.json",
        {
            "vmid": VMID,
            "name": "devvm",
            "qemu": shutil.which(QEMU),
            # TCG unless asked: here /dev/kvm opens but guests hang under it.
            "accel": os.environ.get("BREAKGLASS_GUEST_ACCEL", "tcg"),
            "memory_mb": memory_mb,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            # Kernel messages on the VGA console too (tty0), so the forensics screendump shows
            # OOM reports and panics; the serial console (last: /dev/console) is console.log.
            "append": (
                f"console=tty0 console=ttyS0 quiet bg_scenario={scenario} bg_authkey={authkey}"
            ),
            "ssh_port": ssh_port,
            "data_disk": str(root / "data.raw"),
            "qemu_run_dir": str(run_dir),
            "image_id": image.image_id,
        },
    )
    write_json_atomic(root / "faults.json", {"io_error_once": scenario == "io-stall"})
    pve.verb_config_path.write_text(
        lab_verb_config(
            root,
            vmid=VMID,
            qm=qm_path,
            qemu_run_dir=run_dir,
            state_dir=root / "state",
            layers=(VERB_CONFIG, verb_overrides),
        )
    )

    return pve, ssh_port


async def start_real_lab(
    scenario: str = "healthy",
    *,
    workdir: Path | None = None,
    verb_overrides: dict[str, Any] | None = None,
    memory_mb: int = 256,
    boot_timeout_s: float = BOOT_TIMEOUT_S,
    cache: Path | None = None,
    wedge: str = "pause",
) -> RealLab:
    """Boot the real devvm in `scenario` (one of SCENARIOS) and start the lab PVE host.

    `wedge` chooses how ``wedged`` wedges: "pause" (QMP stop: vCPUs paused) or "panic" (a kernel
    panic, shown on the console; QEMU keeps running, the guest never answers).

    Returns once the scenario is in place: SSH answers (healthy, disk-full, oom,
    stuck-service), the vCPUs are paused (wedged), or QEMU paused the VM on the I/O error
    (io-stall). `verb_overrides` are merged into the verb's config, table by table."""
    if wedge not in ("pause", "panic"):
        raise ValueError(f"unknown wedge {wedge!r}: choose pause or panic")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown lab scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if not VERB_PATH.exists():
        raise GuestUnavailable(f"the breakglass verb is missing at {VERB_PATH}: reinstall")
    image = await asyncio.to_thread(check_available, cache)
    devvm_key, pve_key, pve_host_key = (
        new_key(c) for c in (loopback.DEVVM_KEY, loopback.PVE_KEY, loopback.PVE_HOST_KEY)
    )
    own = workdir is None
    root = Path(workdir) if workdir is not None else None
    pve: RealPve | None = None
    pve_host: LabPveHost | None = None
    try:
        if root is None:
            root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="bg-realab-"))
        pve, ssh_port = await asyncio.to_thread(
            _lay_out, root, scenario, image, devvm_key, verb_overrides, memory_mb
        )
        root = pve.root
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(pve.start_vm)
        except QmError as exc:
            raise GuestUnavailable(f"QEMU would not start the devvm: {exc}") from None
        devvm = pinned_target(ssh_port, DEVVM_USER, image.host_key_line, "devvm", devvm_key)
        boot_s = 0.0
        if scenario == "io-stall":
            # The checkpointer's first write fails a few seconds after dropbear starts.
            await _wait_qmp_status(pve, "io-error", boot_timeout_s)
            boot_s = time.monotonic() - t0
        else:
            await wait_for_ssh(devvm, devvm_key, boot_timeout_s)
            boot_s = time.monotonic() - t0
            if scenario == "wedged" and wedge == "panic":
                await _panic(pve, devvm, devvm_key)
            elif scenario == "wedged":
                await asyncio.to_thread(pve.qmp, "stop")
        pve_host = LabPveHost()
        pve_port = await pve_host.start_verb(
            pve.verb_config_path, authorized_key=pve_key, host_key=pve_host_key
        )
    except BaseException as exc:
        if pve_host is not None:
            await pve_host.close(grace_s=0.5)
        console = ""
        if pve is not None:
            console = pve.console()[-1500:]
            await asyncio.to_thread(pve.cleanup)
        if own and root is not None:
            shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, TimeoutError):
            raise GuestUnavailable(
                f"the devvm did not come up: {exc}. Its console ended with:\n{console}"
            ) from None
        raise
    log.info(
        "real-guest lab %s: devvm on 127.0.0.1:%s (booted in %.1f s), PVE host on %s",
        scenario,
        ssh_port,
        boot_s,
        pve_port,
    )
    return RealLab(
        devvm=devvm,
        pve=pinned_target(pve_port, PVE_USER, public_line(pve_host_key), "pve", pve_key),
        devvm_key=devvm_key,
        pve_key=pve_key,
        sim=pve,
        scenario=scenario,
        image=image,
        pve_host=pve_host,
        workdir=root,
        boot_s=boot_s,
        _own_workdir=own,
    )
