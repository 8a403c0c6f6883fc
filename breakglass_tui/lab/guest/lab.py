"""The real-guest lab: a real Linux devvm under QEMU on loopback, failing for real.

:func:`start_real_lab` returns the same shape as the sandbox lab's
:class:`~breakglass_tui.lab.lab.Lab` (``devvm``, ``pve``, ``devvm_key``, ``pve_key``,
``client_keys``, ``sim``, ``scenario``, ``close()``), so the hosts layer, the breakglass agent and
the app use either. Nothing about the devvm is simulated: it is the image built by
:mod:`breakglass_tui.lab.guest.build` (a Debian kernel and userland on an ext4 root disk, OpenSSH,
sudo) run by a real ``qemu-system-x86_64``; its SSH port is QEMU's user-network forward on
127.0.0.1, its host key is pinned, and the console logs in as ``breakglass`` and runs every command
with ``sudo -n``, as on the production devvm. The PVE side is
:class:`~breakglass_tui.lab.pve_host.LabPveHost` running the real ``breakglass-verb`` with
:mod:`breakglass_tui.lab.guest.qm` as its ``qm``.

Ready in seconds. The first drill on a machine boots the guest once (about 20 s under TCG) and
saves its state (RAM and devices, QEMU's migration to a file) beside copy-on-write overlays of its
disks, in the cache. Every drill then starts QEMU from that saved state on throw-away overlays of
its own (so it starts clean), sets the guest's clock and the login key over the guest's lab
channel (a virtio-serial port, like Proxmox's guest-agent channel), and puts the scenario in
place: it enables the unit that causes the failure, as a real devvm's enabled service would be
(a reset or a cycle boots the guest from its disks, and the failure comes back), and waits until
the failure is real. ``wedged`` pauses the vCPUs over QMP (or panics the kernel); ``io-stall`` and
``read-only-root`` make the host's storage fail (a blkdebug filter under the disk, QMP): a
transient fault, after which the disk works again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect
from breakglass_tui.hosts.types import SshTarget
from breakglass_tui.lab import loopback
from breakglass_tui.lab.catalog import GUEST_SCENARIOS, SCENARIOS
from breakglass_tui.lab.guest import qm as guest_qm
from breakglass_tui.lab.guest.build import GuestBuildError, GuestImage, build, find_image
from breakglass_tui.lab.guest.plan import (
    APPEND,
    MEMORY_MB,
    SAVED_SCENARIOS,
    SavedState,
    choose_accel,
    saved_states,
)
from breakglass_tui.lab.guest.qm import GuestPaths
from breakglass_tui.lab.loopback import new_key, pinned_target, public_line
from breakglass_tui.lab.pve_host import VERB_PATH, LabPveHost
from breakglass_tui.lab.qm_standin import QmError, pid_alive, qmp, wait_gone, write_json_atomic
from breakglass_tui.lab.verb_config import lab_verb_config

__all__ = [
    "SCENARIOS",
    "GuestUnavailable",
    "RealLab",
    "RealPve",
    "SavedState",
    "ensure_saved_state",
    "start_real_lab",
    "wait_for_ssh",
]

log = logging.getLogger(__name__)

DEVVM_USER = "breakglass"  # as on the production devvm: NOPASSWD sudo, every command `sudo -n`
PVE_USER = "root"
VMID = 102
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 180.0  # a cold boot under TCG on a busy 2-core machine: usually 15-40 s
SETUP_TIMEOUT_S = 180.0  # putting a scenario in place (filling a disk under TCG)
# The blkdebug rules of the storage faults: how many of the guest's writes fail with EIO.
ROOT_FAULT_WRITES = 8  # enough to reach ext4's journal, which then aborts
DATA_FAULT_WRITES = 1  # the checkpointer's write: QEMU (werror=stop) pauses the VM
_MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes

# Over the verb's own defaults (production deadlines: QEMU's TCG is slow, but not slower than a
# loaded PVE host): a budget with a short cooldown, so a rehearsal can reset and then cycle.
VERB_CONFIG: dict[str, Any] = {"budget": {"max_mutating_per_hour": 6, "cooldown_s": 30}}

Progress = Callable[[str], None]


class GuestUnavailable(RuntimeError):
    """The real-guest lab cannot run here; the message names the cause and the next step."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(message: str) -> None:
    return None


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
        """Start the VM's QEMU (not logged as a qm call): the first time from the saved state,
        later from its disks. A running VM is left alone."""
        return self.kvm_pid() or guest_qm.start_qemu(self.paths)

    def calls(self) -> list[tuple[float, str]]:
        """Every qm call received, in order, with time.time()."""
        return self.paths.read_calls()

    def call_texts(self) -> list[str]:
        return [text for _, text in self.calls()]

    def console(self) -> str:
        """The guest's serial console so far (since the lab started it: a restored guest's boot
        happened before its state was saved)."""
        try:
            return self.console_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def boots(self) -> int:
        """How many times the guest booted in this lab (a reset or a cycle is one more)."""
        return self.console().count("breakglass-guest: ready")

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
    boot_s: float  # QEMU start (a restore) to the scenario in place
    saved: SavedState | None = None
    note: str | None = None  # what to tell the operator about this lab (one sentence)
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
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the devvm's SSH did not answer within {timeout_s:g} s (last: {last})")


# -- the guest's lab channel -------------------------------------------------------------------
class LabChannel:
    """The host end of the guest's lab channel (``lab-agent`` in the guest): one command per
    line, one answer per command."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path, timeout_s: float = 10.0) -> LabChannel:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
                return cls(reader, writer)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()

    async def command(self, line: str, timeout_s: float = 30.0) -> str:
        """Send a command and return its answer ("ok …"); RuntimeError on "error …"."""
        await self.send(line)
        verb = line.split(" ", 1)[0]
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise ConnectionError("the guest's lab channel closed")
                answer = raw.decode(errors="replace").strip()
                if answer.startswith(f"ok {verb}"):
                    return answer
                if answer.startswith(f"error {verb}"):
                    raise RuntimeError(f"the guest could not {verb}: {answer}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- availability ------------------------------------------------------------------------------
def check_available(cache: Path | None = None, progress: Progress | None = None) -> GuestImage:
    """QEMU present and the image built (building it, with progress, if need be): the image,
    else GuestUnavailable naming what to install."""
    for tool in (QEMU, "qemu-img"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(
                f"{tool} is not installed: the real devvm needs QEMU — run 'bash scripts/lab.sh'"
                " as root, or 'apt-get install qemu-system-x86 qemu-utils'"
            )
    found = find_image(cache)
    if found is not None:
        return found
    try:
        return build(cache, progress=progress or _quiet)
    except GuestBuildError as exc:
        raise GuestUnavailable(
            f"the devvm image could not be built ({exc}); run 'apt-get update', then"
            " 'python -m breakglass_tui.lab.guest.build' as root to build it into the cache"
        ) from None


# -- the saved state ---------------------------------------------------------------------------
def vm_config(
    *,
    image: GuestImage,
    accel: str,
    memory_mb: int,
    ssh_port: int,
    disks: dict[str, tuple[Path, Path]],
    run_dir: Path,
    incoming: Path | None,
) -> dict[str, Any]:
    """vm.json of the lab's VM: the image's kernel, disks as (overlay, backing) by name, a saved
    state to restore at the first start (incoming) or None for a cold boot."""
    return {
        "vmid": VMID,
        "name": "devvm",
        "qemu": shutil.which(QEMU),
        "accel": accel,
        "memory_mb": memory_mb,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "append": APPEND,
        "ssh_port": ssh_port,
        "root_disk": str(disks["root"][0]),
        "root_backing": str(disks["root"][1]),
        "data_disk": str(disks["data"][0]),
        "data_backing": str(disks["data"][1]),
        "qemu_run_dir": str(run_dir),
        "image_id": image.image_id,
        "incoming": str(incoming) if incoming else None,
    }


def overlay(path: Path, backing: Path | str) -> None:
    """A qcow2 overlay at path over backing (the backing is only read)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _run_dir(root: Path) -> tuple[Path, bool]:
    """The QEMU run dir under root, or a short one in /tmp when sockets there would not fit."""
    run_dir = root / "run"
    if len(str(run_dir / f"{VMID}.qmp")) > _MAX_SOCKET_PATH:
        return Path(tempfile.mkdtemp(prefix="bg-qrun-")), True
    run_dir.mkdir(exist_ok=True)
    return run_dir, False


async def ensure_saved_state(
    image: GuestImage,
    *,
    accel: str,
    memory_mb: int = MEMORY_MB,
    cache: Path | None = None,
    progress: Progress | None = None,
    boot_timeout_s: float = BOOT_TIMEOUT_S,
    scenario: str = "healthy",
) -> SavedState:
    """The saved state a drill of `scenario` starts from, made now if need be (saying so, with
    progress): the booted devvm's state, and for the scenarios that break the guest from the
    inside (SAVED_SCENARIOS) the state just after the failure was put in place on it, so a drill
    starts already failing. Labs starting at once wait for one another."""
    say = progress or _quiet
    states = await asyncio.to_thread(
        saved_states, image, accel=accel, memory_mb=memory_mb, scenario=scenario, cache=cache
    )
    states[0].directory.parent.mkdir(parents=True, exist_ok=True)
    base = await _ensure(
        states[0],
        lambda target: _make_base_state(image, target, accel, memory_mb, say, boot_timeout_s),
    )
    if len(states) == 1:
        return base
    return await _ensure(
        states[1],
        lambda target: _make_scenario_state(image, base, target, scenario, accel, memory_mb, say),
    )


async def _ensure(saved: SavedState, make: Callable[[SavedState], Awaitable[None]]) -> SavedState:
    if saved.complete():
        return saved
    lock = await asyncio.to_thread(_lock, saved.directory.with_name(saved.directory.name + ".lock"))
    try:
        if not saved.complete():  # else another lab made it while we waited
            await make(saved)
        return saved
    finally:
        lock.close()


def _lock(path: Path) -> Any:
    f = path.open("w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


async def _make_base_state(
    image: GuestImage,
    saved: SavedState,
    accel: str,
    memory_mb: int,
    say: Progress,
    boot_timeout_s: float,
) -> None:
    """Boot the image once and save the booted guest."""

    async def prepare(paths: GuestPaths, channel_path: Path, started: float) -> None:
        say(
            f"booting the devvm once to save its state ({accel.upper()}"
            + (", no KVM here: about 20-40 s" if accel == "tcg" else "")
            + "); later drills start from it in seconds…"
        )
        try:
            pid = await asyncio.to_thread(guest_qm.start_qemu, paths)
        except QmError as exc:
            raise GuestUnavailable(f"QEMU would not start the devvm: {exc}") from None
        await _wait_booted(paths, pid, started, boot_timeout_s, say)
        channel = await LabChannel.open(channel_path)
        try:
            await channel.command("ping", timeout_s=30)
            await channel.command("quiesce", timeout_s=60)
        finally:
            await channel.close()

    bases = {"root": image.root_disk, "data": image.data_disk}
    await _save(image, saved, bases, None, accel, memory_mb, prepare, say)


async def _make_scenario_state(
    image: GuestImage,
    base: SavedState,
    saved: SavedState,
    scenario: str,
    accel: str,
    memory_mb: int,
    say: Progress,
) -> None:
    """Restore the booted guest, put `scenario` in place, and save that."""

    async def prepare(paths: GuestPaths, channel_path: Path, started: float) -> None:
        say(f"putting {scenario} in place once, to save it; later drills of it start in seconds…")
        try:
            await asyncio.to_thread(guest_qm.start_qemu, paths)
        except QmError as exc:
            raise GuestUnavailable(f"QEMU would not restore the devvm: {exc}") from None
        channel = await LabChannel.open(channel_path)
        try:
            seed = base64.b64encode(secrets.token_bytes(64)).decode()
            await channel.command(f"time {int(time.time())} {seed}")
            await channel.command(f"scenario {scenario}", timeout_s=SETUP_TIMEOUT_S)
            await channel.command("quiesce", timeout_s=60)
        finally:
            await channel.close()

    bases = {"root": base.root_disk, "data": base.data_disk}
    await _save(image, saved, bases, base.vmstate, accel, memory_mb, prepare, say)


async def _save(
    image: GuestImage,
    saved: SavedState,
    bases: dict[str, Path],
    incoming: Path | None,
    accel: str,
    memory_mb: int,
    prepare: Callable[[GuestPaths, Path, float], Awaitable[None]],
    say: Progress,
) -> None:
    """Run a guest on new overlays of `bases` (from `incoming`, or a cold boot), let `prepare`
    bring it where it should be, and save its state and overlays as `saved`."""
    partial = saved.directory.with_name(saved.directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="bg-save-"))
    run_dir, own_run = _run_dir(work)
    paths = GuestPaths(work)
    started = time.monotonic()
    try:
        # Each overlay names its backing relative to itself: a saved state's directory can be
        # renamed when it is complete.
        for disk, base in bases.items():
            relative = os.path.relpath(base, saved.directory)  # noqa: ASYNC240  (no I/O)
            await asyncio.to_thread(overlay, partial / f"{disk}.qcow2", relative)
        write_json_atomic(
            paths.vm_json,
            vm_config(
                image=image,
                accel=accel,
                memory_mb=memory_mb,
                ssh_port=_free_port(),
                disks={disk: (partial / f"{disk}.qcow2", base) for disk, base in bases.items()},
                run_dir=run_dir,
                incoming=incoming,
            ),
        )
        await prepare(paths, guest_qm.lab_socket(paths), started)
        # The saved guest waits for its next lab on the channel, with no one connected.
        await asyncio.sleep(0.3)
        say("saving the devvm's state…")
        await asyncio.to_thread(guest_qm.save_state, paths, partial / "vmstate")
        await asyncio.to_thread(guest_qm.stop_qemu, paths)
        (partial / "console.log").write_bytes((work / "console.log").read_bytes())
        (partial / "done").write_text(f"{time.time():.0f}\n")
        shutil.rmtree(saved.directory, ignore_errors=True)
        partial.rename(saved.directory)
        say(f"saved in {time.monotonic() - started:.0f} s")
    finally:
        pid = paths.kvm_pid() if paths.vm_json.exists() else None
        if pid is not None and guest_qm.is_lab_qemu(pid, work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
        shutil.rmtree(work, ignore_errors=True)
        if own_run:
            shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)


async def _wait_booted(
    paths: GuestPaths, pid: int, started: float, timeout_s: float, say: Progress
) -> None:
    console = paths.root / "console.log"
    next_note = started + 10
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if "breakglass-guest: ready" in text:
            return
        now = time.monotonic()
        if not pid_alive(pid):
            raise GuestUnavailable(f"QEMU stopped while the devvm booted; console:\n{text[-1500:]}")
        if now - started > timeout_s:
            raise GuestUnavailable(
                f"the devvm did not finish booting within {timeout_s:g} s; console:\n{text[-1500:]}"
            )
        if now >= next_note:
            lines = [line for line in text.splitlines() if line.strip()]
            last = lines[-1][-80:] if lines else "(nothing on the console yet)"
            shown = "".join(c for c in last if c.isprintable())
            say(f"still booting ({now - started:.0f} s): {shown}")
            next_note = now + 10
        await asyncio.sleep(0.2)


# -- a drill -----------------------------------------------------------------------------------
def _lay_out(
    root: Path,
    image: GuestImage,
    saved: SavedState,
    accel: str,
    verb_overrides: dict[str, Any] | None,
    memory_mb: int,
) -> tuple[RealPve, int]:
    """Write the lab PVE directory (qm wrapper, vm.json, the drill's disk overlays, verb.toml);
    returns the RealPve and the devvm's SSH port. Blocking: run it in a thread."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir, own_run = _run_dir(root)
    (root / "state").mkdir(mode=0o700, exist_ok=True)
    pve = RealPve(root, run_dir, own_run)
    qm_path = guest_qm.write_qm_wrapper(root)
    disks = {}
    for disk, base in (("root", saved.root_disk), ("data", saved.data_disk)):
        overlay(root / f"{disk}.qcow2", base)
        disks[disk] = (root / f"{disk}.qcow2", base)
    ssh_port = _free_port()
    write_json_atomic(
        root / "vm.json",
        vm_config(
            image=image,
            accel=accel,
            memory_mb=memory_mb,
            ssh_port=ssh_port,
            disks=disks,
            run_dir=run_dir,
            incoming=saved.vmstate,
        ),
    )
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


async def _wait_qmp_status(pve: RealPve, want: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = (await asyncio.to_thread(pve.vm_state)).get("qmp_status")
        if seen == want:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the VM did not reach QMP status {want!r} in {timeout_s:g} s ({seen})")


async def _put_in_place(
    pve: RealPve,
    channel: LabChannel,
    scenario: str,
    wedge: str,
    devvm: SshTarget,
    key: asyncssh.SSHKey,
    timeout_s: float,
) -> None:
    """Make the scenario's failure real in the restored guest."""
    paths = pve.paths
    if scenario == "io-stall":
        # The checkpointer's first write meets the failing storage: QEMU pauses the VM, so the
        # guest never answers the command.
        await asyncio.to_thread(guest_qm.add_disk_fault, paths, "data", DATA_FAULT_WRITES)
        await channel.send(f"scenario {scenario}")
        await _wait_qmp_status(pve, "io-error", timeout_s)
        return
    if scenario == "read-only-root":
        await asyncio.to_thread(guest_qm.add_disk_fault, paths, "root", ROOT_FAULT_WRITES)
    if scenario == "wedged" and wedge == "panic":
        await channel.command("panic")
        deadline = time.monotonic() + 60
        while "Kernel panic" not in pve.console():
            if time.monotonic() > deadline:
                raise TimeoutError("the guest's kernel did not panic on sysrq c")
            await asyncio.sleep(0.1)
        return
    if scenario not in SAVED_SCENARIOS:  # those are in place in their saved state already
        await channel.command(f"scenario {scenario}", timeout_s=timeout_s)
    await wait_for_ssh(devvm, key, timeout_s)
    if scenario == "wedged":
        await asyncio.to_thread(pve.qmp, "stop")


async def start_real_lab(
    scenario: str = "healthy",
    *,
    workdir: Path | None = None,
    verb_overrides: dict[str, Any] | None = None,
    memory_mb: int = MEMORY_MB,
    boot_timeout_s: float = BOOT_TIMEOUT_S,
    cache: Path | None = None,
    wedge: str = "pause",
    progress: Progress | None = None,
) -> RealLab:
    """Start a drill on the real devvm in `scenario` (one of GUEST_SCENARIOS) and the lab PVE
    host. The first drill on a machine builds the image and saves a booted state (saying so
    through `progress`); later ones restore that state, in seconds.

    `wedge` chooses how ``wedged`` wedges: "pause" (QMP stop: vCPUs paused) or "panic" (a kernel
    panic, shown on the console; QEMU keeps running, the guest never answers).

    Returns once the scenario is in place: SSH answers (the in-guest scenarios), the vCPUs are
    paused or the kernel panicked (wedged), or QEMU paused the VM on the I/O error (io-stall).
    `verb_overrides` are merged into the verb's config, table by table."""
    if wedge not in ("pause", "panic"):
        raise ValueError(f"unknown wedge {wedge!r}: choose pause or panic")
    if scenario not in GUEST_SCENARIOS:
        raise ValueError(f"unknown lab scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if not VERB_PATH.exists():
        raise GuestUnavailable(f"the breakglass verb is missing at {VERB_PATH}: reinstall")
    image = await asyncio.to_thread(check_available, cache, progress)
    accel = choose_accel()
    saved = await ensure_saved_state(
        image,
        accel=accel,
        memory_mb=memory_mb,
        cache=cache,
        progress=progress,
        boot_timeout_s=boot_timeout_s,
        scenario=scenario,
    )
    devvm_key, pve_key, pve_host_key = (
        new_key(c) for c in (loopback.DEVVM_KEY, loopback.PVE_KEY, loopback.PVE_HOST_KEY)
    )
    own = workdir is None
    root = Path(workdir) if workdir is not None else None
    pve: RealPve | None = None
    pve_host = LabPveHost()
    pve_started: asyncio.Task[int] | None = None
    try:
        if root is None:
            root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="bg-realab-"))
        pve, ssh_port = await asyncio.to_thread(
            _lay_out, root, image, saved, accel, verb_overrides, memory_mb
        )
        root = pve.root
        pve_started = asyncio.create_task(
            pve_host.start_verb(pve.verb_config_path, authorized_key=pve_key, host_key=pve_host_key)
        )
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(pve.start_vm)
        except QmError as exc:
            raise GuestUnavailable(f"QEMU would not restore the devvm: {exc}") from None
        devvm = pinned_target(ssh_port, DEVVM_USER, image.host_key_line, "devvm")
        channel = await LabChannel.open(guest_qm.lab_socket(pve.paths))
        try:
            seed = base64.b64encode(secrets.token_bytes(64)).decode()
            await channel.command(f"time {int(time.time())} {seed}")
            await channel.command(
                f"key {base64.b64encode(public_line(devvm_key).encode()).decode()}"
            )
            await _put_in_place(pve, channel, scenario, wedge, devvm, devvm_key, SETUP_TIMEOUT_S)
        finally:
            await channel.close()
        boot_s = time.monotonic() - t0
        pve_port = await pve_started
    except BaseException as exc:
        if pve_started is not None and not pve_started.done():
            pve_started.cancel()
        with contextlib.suppress(BaseException):
            await pve_host.close(grace_s=0.5)
        console = ""
        if pve is not None:
            console = pve.console()[-1500:]
            await asyncio.to_thread(pve.cleanup)
        if own and root is not None:
            shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, TimeoutError | RuntimeError | ConnectionError) and not isinstance(
            exc, GuestUnavailable
        ):
            raise GuestUnavailable(
                f"the devvm did not come up in scenario {scenario}: {exc}. Its console ended"
                f" with:\n{console}"
            ) from None
        raise
    log.info(
        "real-guest lab %s: devvm on 127.0.0.1:%s (ready in %.1f s), PVE host on %s",
        scenario,
        ssh_port,
        boot_s,
        pve_port,
    )
    return RealLab(
        devvm=devvm,
        pve=pinned_target(pve_port, PVE_USER, public_line(pve_host_key), "pve"),
        devvm_key=devvm_key,
        pve_key=pve_key,
        sim=pve,
        scenario=scenario,
        image=image,
        pve_host=pve_host,
        workdir=root,
        boot_s=boot_s,
        saved=saved,
        _own_workdir=own,
    )
