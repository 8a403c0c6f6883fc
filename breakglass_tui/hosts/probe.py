"""The reachability probe: the breakglass agent's first question, answered within seconds.

It tells apart, in this order: connection refused, no TCP answer, TCP accepted but no SSH banner
(the classic wedged guest: the kernel's TCP stack answers, sshd cannot), banner but our key or
host key refused, logged in but a trivial command failed or hung, and healthy. We do the TCP
connect and banner read ourselves first, because asyncssh folds all of those into one timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Sequence

import asyncssh

from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect
from breakglass_tui.hosts.types import ProbeResult, Reachability, SshTarget

# Share of the probe's budget the banner may take; the rest is for login and the command.
_BANNER_SHARE = 0.6
_MIN_STEP_S = 0.5
# RFC 4253 allows other lines before the version line; a real sshd sends it at once.
_MAX_PRE_BANNER_LINES = 20


async def _read_banner(reader: asyncio.StreamReader) -> str | None:
    """The server's SSH version line, or None if it closed without one."""
    for _ in range(_MAX_PRE_BANNER_LINES):
        line = await reader.readline()
        if not line:
            return None
        if line.startswith(b"SSH-"):
            return line.decode("ascii", "replace").strip()
    return None


async def probe_devvm(
    target: SshTarget,
    *,
    agent_path: str | None = None,
    client_keys: Sequence[asyncssh.SSHKey] | None = None,
    timeout_s: float = 5.0,
) -> ProbeResult:
    """Classify how reachable the devvm is (see :class:`Reachability`), within about timeout_s."""
    started = time.monotonic()
    where = f"{target.name} ({target.host}:{target.port})"

    def remaining() -> float:
        return max(_MIN_STEP_S, timeout_s - (time.monotonic() - started))

    def result(kind: Reachability, message: str, banner: str | None = None) -> ProbeResult:
        return ProbeResult(kind, time.monotonic() - started, message, banner)

    # 1. TCP.
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), remaining()
        )
    except ConnectionRefusedError:
        return result(
            Reachability.REFUSED,
            f"the {where} refused the TCP connection: sshd is not listening (the guest is off,"
            " booting, or sshd died); check the VM's state with the status verb",
        )
    except TimeoutError:
        return result(
            Reachability.TCP_TIMEOUT,
            f"no TCP answer from the {where} within {timeout_s:g}s: the guest (or its network)"
            " is dead; check the VM's state with the status verb",
        )
    except OSError as exc:
        kind = Reachability.REFUSED if exc.errno == errno.ECONNREFUSED else Reachability.TCP_TIMEOUT
        return result(
            kind,
            f"cannot reach the {where}: {exc.strerror or exc}; check the VM's state with the"
            " status verb",
        )

    # 2. The SSH banner.
    banner: str | None = None
    try:
        banner = await asyncio.wait_for(_read_banner(reader), remaining() * _BANNER_SHARE)
    except (TimeoutError, OSError, ValueError):
        banner = None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 0.5)
    if banner is None:
        return result(
            Reachability.NO_BANNER,
            f"the {where} accepted TCP but sent no SSH banner: the guest's kernel answers but"
            " sshd cannot (the classic wedged guest: memory, disk or I/O stall); consider the"
            " forensics verb, then reset",
        )

    # 3. Log in and run a trivial command.
    options = ConnectOptions(
        agent_path=agent_path,
        client_keys=client_keys,
        connect_timeout_s=remaining(),
        keepalive_interval_s=max(1.0, timeout_s),
        keepalive_count_max=1,
    )
    try:
        conn = await asyncio.wait_for(connect(target, options), remaining() + 0.5)
    except SshConnectError as exc:
        if exc.kind in (Reachability.AUTH_REFUSED, Reachability.HOST_KEY_MISMATCH):
            return result(exc.kind, exc.message, banner)
        return result(
            Reachability.COMMAND_FAILED,
            f"the {where} sent its SSH banner but the login did not complete ({exc.message})",
            banner,
        )
    except TimeoutError:
        return result(
            Reachability.COMMAND_FAILED,
            f"the {where} sent its SSH banner but the login did not complete within"
            f" {timeout_s:g}s (a guest too loaded or stalled to start a session); retry once,"
            " then consider the forensics verb",
            banner,
        )
    try:
        try:
            done = await asyncio.wait_for(conn.run("uptime", check=False), remaining())
        except TimeoutError:
            return result(
                Reachability.COMMAND_FAILED,
                f"logged in to the {where}, but `uptime` did not finish within {timeout_s:g}s:"
                " the guest hangs on simple work (an I/O stall?); look at dmesg, or consider the"
                " forensics verb",
                banner,
            )
        except (asyncssh.Error, OSError) as exc:
            return result(
                Reachability.COMMAND_FAILED,
                f"logged in to the {where}, but running `uptime` failed ({exc}); retry once",
                banner,
            )
        if done.exit_status != 0:
            err = str(done.stderr or "").strip().splitlines()
            detail = f": {err[0][:200]}" if err else ""
            return result(
                Reachability.COMMAND_FAILED,
                f"logged in to the {where}, but `uptime` failed with exit status"
                f" {done.exit_status}{detail}",
                banner,
            )
        up = str(done.stdout or "").strip()
        return result(Reachability.HEALTHY, f"the {where} is up: {up[:200]}", banner)
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.wait_closed(), 1.0)
