"""Helpers for the hosts tests: targets for a real sshd, processes on loopback, silent servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from breakglass_tui.hosts.types import SshTarget
from tests.support.realparts import Sshd, new_key, public_line
from tests.support.waiting import until_sync


def target_for(sshd: Sshd, *, user: str = "root", known_hosts: str | None = None) -> SshTarget:
    """An SshTarget for sshd, pinned to its host key unless known_hosts says otherwise."""
    pinned = sshd.known_hosts if known_hosts is None else known_hosts
    return SshTarget("127.0.0.1", sshd.port, user, pinned)


def other_host_key_line(port: int) -> str:
    """A known_hosts line for [127.0.0.1]:port with a key that is not the server's."""
    pub = public_line(new_key("impostor")).split()
    return f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n"


def pids_matching(pattern: str) -> list[int]:
    """PIDs of processes whose command line contains pattern (they run on this machine: the
    sshd under test is on loopback)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pattern in cmdline and "pgrep" not in cmdline:
            found.append(int(entry.name))
    return found


async def wait_for_pids(pattern: str, *, present: bool, timeout: float = 5.0) -> list[int]:
    """Poll (without blocking the event loop) until processes matching pattern exist
    (present=True) or are gone; the PIDs found last."""
    deadline = time.monotonic() + timeout
    while True:
        pids = pids_matching(pattern)
        if bool(pids) == present or time.monotonic() > deadline:
            return pids
        await asyncio.sleep(0.05)


def kill_pids(pids: list[int]) -> None:
    """Clean up processes a test started (by PID) if the code under test left them."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def session_pids(sshd: Sshd) -> list[int]:
    """The per-connection sshd processes of this server (children of its listener)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(sshd.pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def full_backlog_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full, so further SYNs are dropped and a connect
    times out (Linux drops SYNs to a full queue while tcp_abort_on_overflow is 0)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    # Full once a handshake has completed into the queue (it holds one more than the backlog, 0).
    until_sync(lambda: accept_queue_length(port) >= 1, what="the listener's accept queue full")
    return listener, fillers


def accept_queue_length(port: int) -> int:
    """How many completed connections wait in the accept queue of the listener on 127.0.0.1:port
    (a listening socket's rx_queue in /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
            return int(fields[4].split(":")[1], 16)
    return 0


def sshd_descendants(sshd: Sshd) -> list[int]:
    """Every ``sshd:`` process below this server's listener (the per-connection monitor and its
    network child): what serves our connection."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=False
    ).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, *args in rows:
        children.setdefault(int(ppid), []).append((int(pid), args[0] if args else ""))
    found, todo = [], [sshd.pid]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            if args.startswith("sshd:"):
                found.append(pid)
                todo.append(pid)
    return found
