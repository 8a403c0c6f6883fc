"""A ``qm`` stand-in for the real-guest lab: it manages a REAL ``qemu-system-x86_64`` process.

Run through a ``#!/bin/sh`` wrapper (``<root>/bin/qm``, written by :func:`write_qm_wrapper`) that
sets ``BREAKGLASS_GUEST_PVE_DIR=<root>``; the VM's configuration is ``<root>/vm.json``, written by
the lab (:func:`write_vm_config`). QEMU runs daemonized with the pid file
``<qemu_run_dir>/<vmid>.pid`` and the QMP socket ``<qemu_run_dir>/<vmid>.qmp``, as Proxmox's kvm
does, so the real ``breakglass-verb`` reads a real ``/proc/<pid>``, real QMP and a real
``screendump`` of the guest.

The VM's disks are qcow2 overlays (the drill's) over read-only backing images, every block node
named, so the lab can put a fault filter under a disk of the running VM (:func:`add_disk_fault`).
The first ``start`` of a lab restores the saved state vm.json names (``-incoming``); later ones
boot the guest from its disks, as Proxmox does (:func:`start_qemu`, :func:`save_state`).

Subcommands, output and exit codes follow Proxmox's ``qm``, from its source, shared with the
simulated ``qm`` in :mod:`breakglass_tui.lab.qm_standin` (whose docstring cites the files):
``qm status <vmid> [--verbose]`` (``status: running``; ``qmpstatus: running`` when QMP does not
answer), ``qm start`` (quorum, HA redirection, config locks), ``qm stop [--timeout N]``
(``_do_vm_stop``: QMP ``quit``, wait, SIGTERM, SIGKILL, then the clean-up deletes the pid file
whether or not QEMU died), ``qm shutdown`` (ACPI powerdown), ``qm reset`` (QMP
``system_reset``: a VM paused by an I/O error stays paused, like Proxmox), ``qm resume`` (QMP
``cont``), ``qm suspend`` (QMP ``stop``), ``qm config``; the mutating ones in a task worker
with a UPID. Failures print one line on stderr and exit 255; an unknown VM exits 2. The fault
``kvm_survives_kill`` plays a QEMU in D state (SIGKILL would not end it): stop QEMU with SIGSTOP
to wedge it, and qm's SIGKILL is then not sent.

Standard library only: it runs under ``python -S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from breakglass_tui.lab.qm_standin import (
    TASK_ARG,
    TASK_OPTIONS,
    QmError,
    StandinRoot,
    append_line,
    check_running,
    cli_task,
    dispatch,
    entry_point,
    pid_alive,
    qmp,
    run_worker,
    status_output,
    wait_gone,
    write_json_atomic,
    write_pve_layout,
    write_wrapper,
)

EXIT_USAGE = 2
ENV_ROOT = "BREAKGLASS_GUEST_PVE_DIR"
QM_MODULE = "breakglass_tui.lab.guest.qm"
QMP_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0


class GuestPaths(StandinRoot):
    """Where one lab PVE host keeps its files (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.vm_json = self.root / "vm.json"
        self.pids_file = self.root / "qemu-pids"

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

    def qmp_timeout_s(self) -> float:
        return float(self.faults().get("qmp_timeout_s", QMP_TIMEOUT_S))

    def kvm_pid(self) -> int | None:
        """The live QEMU process per Proxmox's check_running: the pid file's process, started
        with ``-pidfile`` naming that file (no file, dead, zombie, another program: None)."""
        return check_running(self.pid_file)

    def config_text(self) -> str:
        if not self.config_path.exists():
            write_pve_layout(self.root, self.vmid, _config_lines(self))
        return super().config_text()

    def start_vm(self) -> int:
        pid = start_qemu(self)
        self.scope_add(pid)
        return pid

    def owns_process(self, pid: int) -> bool:
        return is_lab_qemu(pid, self.root)

    def kvm_survives_kill(self, pid: int) -> bool:
        return bool(self.faults().get("kvm_survives_kill"))

    def vm_details(self, pid: int) -> dict[str, Any]:
        cfg = self.config()
        return {
            "cpus": 1,
            "maxmem": int(cfg.get("memory_mb", 256)) * 1024 * 1024,
            "name": cfg.get("name", "devvm"),
            "pid": pid,
            "uptime": _uptime_s(pid),
        }

    def started_pids(self) -> list[int]:
        """Every QEMU PID a `qm start` of this root recorded."""
        pids = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.pids_file.read_text().splitlines():
                if line.strip().isdigit():
                    pids.append(int(line))
        return pids


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


def qemus_under(directory: Path) -> list[int]:
    """Live QEMU processes whose command line names a file under `directory` (a drill's root, a
    preparation's private TMPDIR: their disks, console log and sockets are there), whether or not
    they wrote a pid file yet: one still daemonizing is found too."""
    mark = str(directory).rstrip("/").encode() + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = args and b"qemu-system" in args[0] and any(mark in arg for arg in args[1:])
        if ours and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_qemus_under(directory: Path, wait_s: float = 5.0) -> list[int]:
    """SIGKILL every QEMU :func:`qemus_under` finds (a last resort: any thread, no QMP); wait up
    to `wait_s` for them to go. Returns those still alive."""
    pids = qemus_under(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    return [pid for pid in pids if not wait_gone(pid, max(0.0, deadline - time.monotonic()))]


# -- starting QEMU -------------------------------------------------------------------------------
LAB_PORT_NAME = "org.breakglass.lab"  # the virtio-serial port of the guest's lab-agent
_KVM_GET_API_VERSION = 0xAE00


def kvm_usable() -> bool:
    """Whether KVM can run a guest here: /dev/kvm opens and answers, and the CPU offers
    virtualisation (vmx/svm). Some machines expose a /dev/kvm whose guests never run (nested
    virtualisation without the CPU flag): those use TCG."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != 12:
            return False
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags


def lab_socket(paths: GuestPaths) -> Path:
    """The host end of the guest's lab channel (a unix socket QEMU listens on)."""
    return paths.run_dir / f"{paths.vmid}.lab"


def _disk(name: str, overlay: str, backing: str, device: str, errors: str) -> list[str]:
    """A virtio disk on a qcow2 overlay over a read-only backing image, every node named so the
    lab can put a fault filter (blkdebug) between the overlay and its file at run time."""
    return [
        "-blockdev",
        f"driver=qcow2,node-name={name}-base,read-only=on,file.driver=file,"
        f"file.filename={backing},file.node-name={name}-base-file",
        "-blockdev",
        f"driver=file,node-name={name}-file,filename={overlay}",
        "-blockdev",
        f"driver=qcow2,node-name={name},file={name}-file,backing={name}-base",
        "-device",
        f"virtio-blk-pci,drive={name},id={device},serial=devvm-{name}{errors}",
    ]


def qemu_argv(paths: GuestPaths, *, incoming: Path | None = None) -> list[str]:
    """The QEMU command line for the VM in vm.json: a cold boot, or (incoming) a restore of a
    saved state. Both describe the same machine, device for device, as a restore requires."""
    cfg = paths.config()
    root = paths.root
    port = int(cfg["ssh_port"])
    argv = [
        cfg["qemu"],
        "-name",
        str(cfg.get("name", "devvm")),
        "-machine",
        "pc",
        "-accel",
        "kvm" if cfg.get("accel") == "kvm" else "tcg",
        "-m",
        str(cfg.get("memory_mb", 256)),
        "-smp",
        "1",
        "-nodefaults",
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
        # restrict=on: the guest reaches neither this host nor the network; the forward to its
        # sshd still works.
        "-netdev",
        f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        "virtio-net-pci,netdev=n0,id=net0",
        *_disk("root", cfg["root_disk"], cfg["root_backing"], "vda", ""),
        # The data disk stops the VM on an I/O error (werror=stop), as Proxmox's default does.
        *_disk("data", cfg["data_disk"], cfg["data_backing"], "vdb", ",werror=stop,rerror=stop"),
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        f"socket,id=lab,path={lab_socket(paths)},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=lab,name={LAB_PORT_NAME}",
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
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return argv


def start_qemu(paths: GuestPaths) -> int:
    """Start the VM's QEMU, daemonized; wait for its pid file and QMP; return its PID.

    The first start of a lab restores the saved state named by vm.json's ``incoming`` (read
    once: a later ``qm start``, after a stop, boots the guest from its disks, as on Proxmox) and
    resumes the guest when the restore is complete."""
    cfg = paths.config()
    incoming = Path(cfg["incoming"]) if cfg.get("incoming") else None
    if incoming is not None:
        cfg["incoming"] = None
        write_json_atomic(paths.vm_json, cfg)
    with contextlib.suppress(FileNotFoundError):
        paths.pid_file.unlink()
    argv = qemu_argv(paths, incoming=incoming)
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
    append_line(paths.pids_file, str(pid))
    # QMP listens before -daemonize returns; a query proves it.
    qmp(paths, "query-status")
    if incoming is not None:
        finish_restore(paths, pid)
    return pid


def finish_restore(paths: GuestPaths, pid: int, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until QEMU has loaded the saved state, then resume the guest."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not pid_alive(pid):
            tail = (paths.root / "qemu.log").read_text(errors="replace").strip().splitlines()[-2:]
            raise QmError(f"start failed: QEMU exited while restoring: {' '.join(tail)}")
        status = (qmp(paths, "query-migrate") or {}).get("status")
        if status == "completed":
            break
        if status == "failed":
            raise QmError("start failed: QEMU could not load the saved state")
        if time.monotonic() > deadline:
            raise QmError(f"start failed: the saved state did not load within {timeout_s:g} s")
        time.sleep(0.05)
    if qmp(paths, "query-status").get("status") != "running":
        qmp(paths, "cont")


def save_state(paths: GuestPaths, vmstate: Path, timeout_s: float = 120.0) -> None:
    """Stop the VM and write its state (RAM and devices) to vmstate, for restores; the disks
    are flushed first, so the overlays and the state agree. The VM stays stopped."""
    qmp(paths, "stop")
    qmp(paths, "migrate", {"uri": f"exec:cat > {shlex.quote(str(vmstate))}"})
    deadline = time.monotonic() + timeout_s
    while True:
        info = qmp(paths, "query-migrate") or {}
        if info.get("status") == "completed":
            return
        if info.get("status") in ("failed", "cancelled"):
            raise QmError(f"saving the VM state failed: {info.get('error-desc', info)}")
        if time.monotonic() > deadline:
            raise QmError(f"saving the VM state took longer than {timeout_s:g} s")
        time.sleep(0.1)


def add_disk_fault(paths: GuestPaths, disk: str, failures: int) -> None:
    """Make the next `failures` writes of the guest's disk ("root" or "data") fail with EIO, as
    failing storage would: a blkdebug filter goes between the disk's qcow2 overlay and its file
    (QMP blockdev-add, blockdev-reopen). Each rule fails one request and is gone (once): a
    transient fault, after which the disk works again, until QEMU ends."""
    rule = {"event": "write_aio", "errno": 5, "once": True}
    qmp(
        paths,
        "blockdev-add",
        {
            "driver": "blkdebug",
            "node-name": f"{disk}-fault",
            "image": f"{disk}-file",
            "inject-error": [rule] * failures,
        },
    )
    qmp(
        paths,
        "blockdev-reopen",
        {
            "options": [
                {
                    "driver": "qcow2",
                    "node-name": disk,
                    "file": f"{disk}-fault",
                    "backing": f"{disk}-base",
                }
            ]
        },
    )


def stop_qemu(paths: GuestPaths, timeout_s: float = 10.0) -> None:
    """QMP quit, then SIGTERM, then SIGKILL by the pid file's PID; QmError if it survives."""
    pid = paths.kvm_pid()
    if pid is None:
        return
    with contextlib.suppress(QmError):
        qmp(paths, "quit", timeout_s=min(3.0, timeout_s))
    if wait_gone(pid, min(3.0, timeout_s)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_gone(pid, timeout_s):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_gone(pid, 5.0):
        raise QmError(f"VM {paths.vmid} stop failed - got timeout")


# -- the subcommands -----------------------------------------------------------------------------
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
    return status_output(paths, opts)


def _config_lines(paths: GuestPaths) -> str:
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


def cmd_config(paths: GuestPaths, opts: dict[str, str]) -> str:
    lock = paths.config_lock()
    return (f"lock: {lock}\n" if lock else "") + _config_lines(paths)


COMMANDS = {
    "status": (cmd_status, {"verbose": False}),
    "config": (cmd_config, {"current": False, "snapshot": True}),
}


def run(argv: list[str], paths: GuestPaths) -> int:
    """Run one qm call: log it, dispatch, print like Proxmox. Returns the exit code."""
    if argv[:1] == [TASK_ARG]:
        run_worker(paths, argv[1:])
    paths.log_call("qm " + " ".join(argv))
    if len(argv) < 2 or (argv[0] not in COMMANDS and argv[0] not in TASK_OPTIONS):
        print(
            "400 unable to parse command\nqm <status|start|stop|shutdown|reset|resume|suspend|"
            "config> <vmid> [OPTIONS]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if argv[0] in TASK_OPTIONS:
        return cli_task(paths, QM_MODULE, argv)
    func, known = COMMANDS[argv[0]]
    return dispatch(paths, argv[1], func, known, argv[2:], unknown_option_code=EXIT_USAGE)


def write_qm_wrapper(root: Path) -> Path:
    """Write ``<root>/bin/qm``, the #!/bin/sh wrapper the verb's config names. Returns its path."""
    return write_wrapper(
        root,
        QM_MODULE,
        ENV_ROOT,
        "qm for the real-guest lab (breakglass_tui.lab.guest.qm): manages a real QEMU.",
    )


def main() -> None:
    entry_point(
        ENV_ROOT,
        lambda argv, root: run(argv, GuestPaths(root)),
        f"qm: {ENV_ROOT} is not set (run me through <root>/bin/qm)",
    )


if __name__ == "__main__":
    main()
