"""A hung FUSE filesystem: a real stand-in for pmxcfs (/etc/pve) that stopped answering.

A small helper process opens /dev/fuse, mounts it (mount(2) through ctypes) and never answers a
single request, not even FUSE's INIT: every lookup, stat or open under the mount point blocks in
the kernel — killably, as it waits for the filesystem's initialisation — exactly as it does on a
PVE host whose pmxcfs hangs. Closing it kills the helper by its PID (the kernel then fails every
waiting request with ENOTCONN) and lazily unmounts the mount point.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HELPER = r"""
import ctypes, os, sys, time
target = sys.argv[1]
fd = os.open("/dev/fuse", os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
if libc.mount(b"hung-pmxcfs", target.encode(), b"fuse", 0, opts) != 0:
    print("mount failed:", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("mounted", flush=True)
time.sleep(3600)  # /dev/fuse is never read: no request is ever answered
"""


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return any(line.split()[1] == str(path) for line in fh if len(line.split()) > 1)


@contextlib.contextmanager
def hung_fuse_mount(path: Path) -> Iterator[Path]:
    """Mount a hung FUSE filesystem over `path` (created if missing) for the block's duration.
    Fails loudly if this machine cannot (no /dev/fuse or no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    helper = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", HELPER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert helper.stdout is not None
    first = helper.stdout.readline().strip()
    if first != "mounted":
        helper.kill()
        helper.wait()
        raise RuntimeError(f"could not mount a FUSE filesystem here: {first}")
    try:
        yield path
    finally:
        helper.kill()  # our own helper, by PID: every request waiting on it now fails
        helper.wait()
        deadline = time.monotonic() + 10
        while _mounted(path) and time.monotonic() < deadline:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
            time.sleep(0.05)
