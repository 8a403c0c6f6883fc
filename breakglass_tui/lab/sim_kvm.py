"""The simulated kvm process of the devvm: a real long-lived process with a pid file and a QMP
unix socket in the qemu run dir, one client at a time, like QEMU.

Started by the simulated ``qm start`` as ``<root>/bin/kvm -S -m breakglass_tui.lab.sim_kvm <root>
-id 102 … -pidfile <run>/102.pid …`` (``bin/kvm`` is a symlink to Python: Proxmox only believes a
pid file whose process is a ``kvm`` started with that ``-pidfile``). It joins the VM's cgroup scope
(``<root>/cgroup/qemu.slice/<vmid>.scope/cgroup.procs``) and answers the greeting,
``qmp_capabilities``, ``query-status``, ``query-block``, ``query-blockstats``, ``query-version``,
``query-machines``, ``query-proxmox-support``, ``query-balloon``, ``screendump`` (a real PNG, or
QEMU's default PPM), ``system_reset``, ``system_powerdown``, ``stop``, ``cont``, ``quit``, and
sends the events QEMU sends (RESET, STOP, RESUME, SHUTDOWN) after the reply.

Its QMP socket behaves as QEMU's (``chardev/char-socket.c``): ``listen()`` with a backlog of one
and one client served at a time; while a client is served, or while the main loop is wedged,
further clients wait in the kernel's queue (two fit), and once it is full every further connect
fails at once with EAGAIN — also for clients that have given up and closed, until QEMU accepts.

Faults (``faults.json``, read at each command): a command named in ``hang_qmp`` is logged and
never answered; the connection is held until the client gives up. ``"all"``: the main loop is
wedged and no client is accepted at all. SIGUSR1 (sent when the ``kvm_d_state`` fault is set, and
after ``quit`` under ``stuck_on_stop``) puts the process in real D state: its main thread blocks in
``vfork()`` (the child never execs), so ``/proc/<pid>/stat`` says ``D``, SIGTERM stays pending and
nothing is answered. That state is killable, unlike a kvm stuck on its storage, so the simulated
``qm`` does not send it the SIGKILL a real kernel would ignore (``vm.json`` ``d_state``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from breakglass_tui.lab.sim_qm import SimPaths

GREETING = {
    "QMP": {
        "version": {
            "qemu": {"micro": 2, "minor": 2, "major": 8},
            "package": "pve-qemu-kvm_8.2.2-1",
        },
        "capabilities": [],
    }
}
DRIVE = "drive-scsi0"
ACCEPT_POLL_S = 0.05

_paths: SimPaths | None = None


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def enter_d_state() -> None:
    """Block this process in the kernel for good, in real D state: vfork() a child that never
    execs (the parent waits uninterruptibly, only a fatal signal ends it). vm.json records it
    first, so the simulated qm knows SIGKILL would not help."""
    if _paths is not None:
        with _paths.vm_update() as vm:
            vm["d_state"] = True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.vfork() == 0:  # the child: shares our memory, so it must not return into Python
        while True:
            libc.pause()


def _on_sigusr1(signum: int, frame: object) -> None:
    enter_d_state()


def png(width: int, height: int, rgb_rows: list[bytes]) -> bytes:
    """A real PNG (8-bit RGB) from rows of raw pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + row for row in rgb_rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def console_image(qmp_status: str, boot_id: int) -> bytes:
    """A 320x200 "console": dark, with text-like bars; a red band when paused by an I/O error."""
    width, height = 320, 200
    rows = []
    for y in range(height):
        if qmp_status == "io-error" and y < 12:
            rows.append(b"\xc0\x20\x20" * width)
        elif y % 10 < 6 and (y // 10) <= (boot_id % 15) + 3:
            line = (y // 10) * 37 % 200 + 60
            rows.append(b"\xb0\xb0\xb0" * line + b"\x10\x10\x10" * (width - line))
        else:
            rows.append(b"\x10\x10\x10" * width)
    return png(width, height, rows)


class Kvm:
    """One kvm process serving QMP for the simulated VM."""

    def __init__(self, paths: SimPaths) -> None:
        self.paths = paths
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def boot(self) -> None:
        """Bind QMP, record the boot in vm.json, then write the pid file (readiness)."""
        with contextlib.suppress(FileNotFoundError):
            self.paths.qmp_socket.unlink()
        self.listener.bind(str(self.paths.qmp_socket))
        self.listener.listen(1)  # QEMU's char-socket listener: a backlog of one
        self.paths.scope_add(os.getpid())
        with self.paths.vm_update() as vm:
            vm.update(
                status="running",
                qmp_status="running",
                boot_id=int(vm.get("boot_id", 0)) + 1,
                booted_at=time.time(),
                pid=os.getpid(),
            )
        self.paths.record_pid("kvm", os.getpid())
        tmp = self.paths.pid_file.with_name(f".{self.paths.pid_file.name}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.paths.pid_file)

    def shutdown(self) -> None:
        """What QEMU leaves behind on a clean exit: no pid file, no socket, VM stopped."""
        if self.paths.pid_from_file() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.paths.pid_file.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.paths.qmp_socket.unlink()
        self.paths.mark_stopped(os.getpid())

    def serve_forever(self) -> None:
        self.listener.settimeout(ACCEPT_POLL_S)  # look at the faults between accepts
        while True:
            if self.paths.faults()["hang_qmp"] == "all":
                time.sleep(
                    ACCEPT_POLL_S
                )  # the main loop is wedged: nobody accepts, the queue fills
                continue
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            # A client that leaves with replies unread resets the connection: that is its
            # business, not a reason for the VM to die.
            with conn, contextlib.suppress(ConnectionError):
                self.serve(conn)

    # -- one client ----------------------------------------------------------------------------
    def serve(self, conn: socket.socket) -> None:
        self.send(conn, GREETING)
        negotiated = False
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                    execute = msg["execute"]
                    args = msg.get("arguments") or {}
                except (ValueError, KeyError, TypeError):
                    self.send(conn, _error("GenericError", "JSON parse error, expecting execute"))
                    continue
                self.paths.log_call(
                    f"qmp {execute}" + (f" {json.dumps(args, sort_keys=True)}" if args else "")
                )
                hang = self.paths.faults()["hang_qmp"]
                if hang == "all" or execute in hang:
                    self.hold(conn)
                    return
                if not negotiated and execute != "qmp_capabilities":
                    reply = _error(
                        "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )
                    events: list[tuple[str, dict[str, Any]]] = []
                elif execute == "qmp_capabilities":
                    if negotiated:
                        reply = _error(
                            "CommandNotFound",
                            "Capabilities negotiation is already complete, command ignored",
                        )
                    else:
                        negotiated, reply = True, {"return": {}}
                    events = []
                else:
                    reply, events = self.execute(execute, args)
                if "id" in msg:
                    reply["id"] = msg["id"]
                self.send(conn, reply)
                for name, data_ in events:
                    self.send(conn, _event(name, data_))
                if execute == "quit" and self.paths.faults()["stuck_on_stop"]:
                    enter_d_state()  # QEMU's teardown drains the block layer: stuck there
                if execute in ("quit", "system_powerdown") and "return" in reply:
                    raise SystemExit(0)

    def hold(self, conn: socket.socket) -> None:
        """Never answer: wait for the client to give up (EOF), reading and dropping its input."""
        while conn.recv(65536):
            pass

    def execute(self, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list]:
        vm = self.paths.read_vm()
        status = vm.get("qmp_status", "running")
        if name == "query-status":
            return {
                "return": {"status": status, "singlestep": False, "running": status == "running"}
            }, []
        if name == "query-block":
            return {"return": [_block(status)]}, []
        if name == "query-blockstats":
            return {"return": [_blockstats(vm, status)]}, []
        if name == "query-name":
            return {"return": {"name": "devvm"}}, []
        if name == "query-version":
            return {"return": GREETING["QMP"]["version"]}, []
        if name == "query-machines":
            return {
                "return": [
                    {"name": "pc-i440fx-8.1", "is-current": True, "cpu-max": 1024},
                    {"name": "pc-q35-8.1", "cpu-max": 1024},
                ]
            }, []
        if name == "query-proxmox-support":
            return {
                "return": {
                    "pbs-dirty-bitmap": True,
                    "query-bitmap-info": True,
                    "backup-max-workers": True,
                }
            }, []
        if name == "query-balloon":
            return {"return": {"actual": 17179869184}}, []
        if name == "screendump":
            return self.screendump(args, status, int(vm.get("boot_id", 0))), []
        if name == "system_reset":
            # A reset reboots the guest but keeps the run state: a VM paused by an I/O error
            # stays paused (it needs cont), as Proxmox's qm reset leaves it.
            with self.paths.vm_update() as state:
                state.update(boot_id=int(state.get("boot_id", 0)) + 1, booted_at=time.time())
            return {"return": {}}, [("RESET", {"guest": False, "reason": "host-qmp-system-reset"})]
        if name == "stop":
            with self.paths.vm_update() as state:
                if state.get("qmp_status") == "running":
                    state["qmp_status"] = "paused"
            return {"return": {}}, [("STOP", {})]
        if name == "cont":
            with self.paths.vm_update() as state:
                state["qmp_status"] = "running"
            return {"return": {}}, [("RESUME", {})]
        if name == "system_powerdown":
            if status != "running":  # a paused guest cannot act on the ACPI button
                return {"return": {}}, [("POWERDOWN", {})]
            return {"return": {}}, [("POWERDOWN", {}), ("SHUTDOWN", {"guest": True})]
        if name == "quit":
            return {"return": {}}, [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
        return _error("CommandNotFound", f"The command {name} has not been found"), []

    def screendump(self, args: dict[str, Any], status: str, boot_id: int) -> dict[str, Any]:
        filename = args.get("filename")
        if not filename:
            return _error("GenericError", "Parameter 'filename' is missing")
        if "format" in args and self.paths.faults()["screendump_no_format"]:
            return _error("GenericError", "Parameter 'format' is unexpected")
        fmt = args.get("format", "ppm")
        image = console_image(status, boot_id)
        if fmt == "ppm":  # QEMU's default format: keep it real, if plain
            image = b"P6\n1 1\n255\n\x10\x10\x10"
        elif fmt != "png":
            return _error("GenericError", f"Parameter 'format' does not accept value '{fmt}'")
        try:
            Path(filename).write_bytes(image)
        except OSError as exc:
            return _error("GenericError", f"Could not open '{filename}': {exc.strerror}")
        return {"return": {}}

    @staticmethod
    def send(conn: socket.socket, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a client that left early is its own problem
            conn.sendall(json.dumps(msg).encode() + b"\r\n")


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    msg: dict[str, Any] = {
        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        "event": name,
    }
    if data:
        msg["data"] = data
    return msg


def _block(status: str) -> dict[str, Any]:
    return {
        "device": DRIVE,
        "qdev": "scsi0",
        "locked": False,
        "removable": False,
        "io-status": "failed" if status == "io-error" else "ok",
        "inserted": {
            "node-name": "#block123",
            "drv": "raw",
            "file": "/dev/pve/vm-102-disk-0",
            "ro": False,
            "encrypted": False,
            "detect_zeroes": "unmap",
            "image": {
                "filename": "/dev/pve/vm-102-disk-0",
                "format": "raw",
                "virtual-size": 214748364800,
            },
        },
        "type": "unknown",
    }


def _blockstats(vm: dict[str, Any], status: str) -> dict[str, Any]:
    up = max(0.0, time.time() - float(vm.get("booted_at") or time.time()))
    return {
        "device": DRIVE,
        "qdev": "scsi0",
        "stats": {
            "rd_bytes": int(up * 1_000_000),
            "wr_bytes": int(up * 400_000),
            "rd_operations": int(up * 120),
            "wr_operations": int(up * 40),
            "failed_rd_operations": 0,
            "failed_wr_operations": 3 if status == "io-error" else 0,
            "flush_operations": int(up * 2),
            "rd_total_time_ns": int(up * 9_000_000),
            "wr_total_time_ns": int(up * 5_000_000),
        },
    }


def main() -> None:
    """Entry point: ``python -m breakglass_tui.lab.sim_kvm <root> [QEMU-like options]``."""
    global _paths
    paths = _paths = SimPaths(Path(sys.argv[1]))
    # Proxmox's kvm is not a child of anything that would pass it SIGHUP/SIGINT: ignore them.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGUSR1, _on_sigusr1)
    kvm = Kvm(paths)
    try:
        kvm.boot()
        kvm.serve_forever()
    finally:
        kvm.shutdown()


if __name__ == "__main__":
    main()
