"""The real devvm's lab: a Debian guest under QEMU on loopback, failing for real.

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

Ready in seconds. The first drill on a machine boots the guest once (about 10-20 s under TCG)
and saves its state (RAM and devices, QEMU's migration to a file) beside copy-on-write overlays of
its disks, in the cache; for each scenario that breaks the guest from the inside it also saves
the state just after putting the failure in place (it enables the unit that causes it, as a real
devvm's enabled service would be: a reset or a cycle boots the guest from its disks, and the
failure comes back). Every drill then starts QEMU from its saved state on throw-away overlays of
its own (so it starts clean) and sets the guest's clock, random pool and login key over the
guest's lab channel (a virtio-serial port, like Proxmox's guest-agent channel). ``wedged`` pauses
the vCPUs over QMP (or panics the kernel); ``io-stall`` and ``read-only-root`` make the host's
storage fail (a blkdebug filter under the disk, QMP): a transient fault, after which the disk
works again. The light half (laying a drill out, starting QEMU) is :mod:`.drill`, so the command
line can start the restore before its screen is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
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
from breakglass_tui.lab.guest.drill import (
    Prestart,
    RealPve,
    free_port,
    lay_out,
    overlay,
    run_dir_for,
    vm_config,
    write_verb_config,
)
from breakglass_tui.lab.guest.plan import (
    MEMORY_MB,
    SAVED_SCENARIOS,
    SavedState,
    choose_accel,
    saved_states,
)
from breakglass_tui.lab.guest.qm import GuestPaths
from breakglass_tui.lab.loopback import new_key, pinned_target, public_line
from breakglass_tui.lab.pve_host import VERB_PATH, LabPveHost
from breakglass_tui.lab.qm_standin import QmError, pid_alive, wait_gone, write_json_atomic

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
QEMU = "qemu-system-x86_64"
START_TIMEOUT_S = 120.0  # a restore, prestarted in the background
BOOT_TIMEOUT_S = 180.0  # a cold boot under TCG on a busy 2-core machine: usually 15-40 s
SETUP_TIMEOUT_S = 180.0  # putting a scenario in place (filling a disk under TCG)
# The blkdebug rules of the storage faults: how many of the guest's writes fail with EIO.
ROOT_FAULT_WRITES = 8  # enough to reach ext4's journal, which then aborts
DATA_FAULT_WRITES = 1  # the checkpointer's write: QEMU (werror=stop) pauses the VM

Progress = Callable[[str], None]


class GuestUnavailable(RuntimeError):
    """The real-guest lab cannot run here; the message names the cause and the next step."""


def _quiet(message: str) -> None:
    return None


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


async def wait_for_banner(target: SshTarget, timeout_s: float) -> None:
    """Wait until target's SSH server sends its banner (TimeoutError if it does not)."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(target.host, target.port)
                try:
                    line = await reader.readline()
                finally:
                    writer.close()
            if line.startswith(b"SSH-2.0-"):
                return
            last = f"no SSH banner ({line[:40]!r})"
        except (OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the devvm's sshd did not answer within {timeout_s:g} s (last: {last})")


# -- the guest's lab channel -------------------------------------------------------------------
def _seed() -> str:
    """64 random bytes as \\xHH escapes, for the guest's random pool (its printf decodes them)."""
    return "".join(f"\\x{b:02x}" for b in secrets.token_bytes(64))


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
        prune=True,
    )
    if len(states) == 1:
        return base
    return await _ensure(
        states[1],
        lambda target: _make_scenario_state(image, base, target, scenario, accel, memory_mb, say),
    )


async def _ensure(
    saved: SavedState, make: Callable[[SavedState], Awaitable[None]], *, prune: bool = False
) -> SavedState:
    if saved.complete():
        return saved
    lock = await asyncio.to_thread(_lock, saved.directory.with_name(saved.directory.name + ".lock"))
    try:
        if not saved.complete():  # else another lab made it while we waited
            await make(saved)
            if prune:
                await asyncio.to_thread(_prune_saved, saved)
        return saved
    finally:
        lock.close()


def _prune_saved(kept: SavedState) -> None:
    """A new booted state replaces the states saved before it (for an older image, or another
    QEMU or machine): remove them, with their scenarios' states and locks."""
    for path in sorted(kept.directory.parent.iterdir()):
        if path.name.startswith(kept.directory.name):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
            await channel.command(f"time {int(time.time())} {_seed()}")
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
    run_dir, own_run = run_dir_for(work)
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
                ssh_port=free_port(),
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
        guest_qm.kill_qemus_under(work, wait_s=5.0)  # one killed mid-start: no pid file yet
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
    if scenario == "wedged":
        await asyncio.to_thread(pve.qmp, "stop")
        return
    # The restored sshd listened before the state was saved, and the key is in place: its
    # banner proves it answers (a whole login would cost a second under TCG, and the console's
    # first probe logs in anyway).
    await wait_for_banner(devvm, timeout_s)


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
    prestarted: Prestart | None = None,
) -> RealLab:
    """Start a drill on the real devvm in `scenario` (one of GUEST_SCENARIOS) and the lab PVE
    host. The first drill on a machine builds the image and saves a booted state (saying so
    through `progress`); later ones restore that state, in seconds. `prestarted`: its devvm,
    already being restored (:func:`prestart`), is adopted.

    `wedge` chooses how ``wedged`` wedges: "pause" (QMP stop: vCPUs paused) or "panic" (a kernel
    panic, shown on the console; QEMU keeps running, the guest never answers).

    Returns once the scenario is in place: the guest's sshd answers (the in-guest scenarios), the
    vCPUs are paused or the kernel panicked (wedged), or QEMU paused the VM on the I/O error
    (io-stall).
    `verb_overrides` are merged into the verb's config, table by table."""
    if wedge not in ("pause", "panic"):
        raise ValueError(f"unknown wedge {wedge!r}: choose pause or panic")
    if scenario not in GUEST_SCENARIOS:
        raise ValueError(f"unknown lab scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if not VERB_PATH.exists():
        raise GuestUnavailable(f"the breakglass verb is missing at {VERB_PATH}: reinstall")
    if prestarted is not None:
        image, saved = prestarted.image, prestarted.saved
    else:
        image = await asyncio.to_thread(check_available, cache, progress)
        saved = await ensure_saved_state(
            image,
            accel=choose_accel(),
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
    t0 = time.monotonic()
    try:
        try:
            if prestarted is not None:
                # Awaited, not waited on in a thread: a console stopping now cancels this, and
                # the restore is abandoned below (its QEMU killed) rather than left running.
                await asyncio.wait_for(asyncio.wrap_future(prestarted.future), START_TIMEOUT_S)
                pve, ssh_port = prestarted.adopt()
                root = pve.root
            else:
                if root is None:
                    root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="bg-realab-"))
                pve, ssh_port = await asyncio.to_thread(
                    lay_out, root, image, saved, choose_accel(), None, memory_mb
                )
                root = pve.root
            if verb_overrides:
                await asyncio.to_thread(write_verb_config, pve, verb_overrides)
            pve_started = asyncio.create_task(
                pve_host.start_verb(
                    pve.verb_config_path, authorized_key=pve_key, host_key=pve_host_key
                )
            )
            if prestarted is None:
                t0 = time.monotonic()
                await asyncio.to_thread(pve.start_vm)
        except QmError as exc:
            raise GuestUnavailable(f"QEMU would not restore the devvm: {exc}") from None
        devvm = pinned_target(ssh_port, DEVVM_USER, image.host_key_line, "devvm", devvm_key)
        channel = await LabChannel.open(guest_qm.lab_socket(pve.paths))
        try:
            await channel.command(f"time {int(time.time())} {_seed()}")
            await channel.command(f"key {public_line(devvm_key)}")
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
        if prestarted is not None and pve is None:  # never adopted: its QEMU goes now
            await asyncio.to_thread(prestarted.abandon)
        if pve is not None:
            console = pve.console()[-1500:]
            await asyncio.to_thread(pve.cleanup)
        if root is not None and prestarted is None:  # one still starting: no pid file yet
            await asyncio.to_thread(guest_qm.kill_qemus_under, root, 2.0)
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
        pve=pinned_target(pve_port, PVE_USER, public_line(pve_host_key), "pve", pve_key),
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
