"""The hosts' part of the self-check: each link of the rescue path tried without changing anything.

Each function answers ``(ok, sentence)``: the sentence names what works, or what broke and the next
step. None of them runs a mutating verb or changes anything on a host: the PVE host is asked its
read-only ``status`` verb, the devvm runs the probe's ``uptime`` and ``sudo -n true``, Vault is
read. The timing and the bookkeeping are the core's (``core.selfcheck``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence

import asyncssh

from breakglass_tui.hosts.probe import probe_devvm
from breakglass_tui.hosts.pve import PveClient, protocol_note
from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect
from breakglass_tui.hosts.types import Reachability, SshTarget

# `sudo -n` prints this (or "a terminal is required") when the rule asks for a password.
_SUDO_PASSWORD = re.compile(r"password|terminal is required|askpass", re.I)


async def check_pve(
    target: SshTarget, options: ConnectOptions, *, timeout_s: float
) -> tuple[bool, str]:
    """SSH to the PVE host with its pinned host key and the PVE key, run the forced command's
    read-only ``status`` verb, and compare the verb's protocol version with this console's."""
    client = PveClient(target, options, verb_timeout_s=timeout_s)
    try:
        result = await client.verb("status")
    finally:
        await client.close()
    if result.exit_code < 0:
        return False, result.message  # not reached, refused, or no answer: the message says
    if not result.document:
        return False, result.message  # no JSON: not breakglass-verb behind this key
    _, note = protocol_note(result.document)
    if note:
        return False, note
    if result.exit_code != 0:
        return False, result.message
    state = result.state_after or result.state_before or "state unknown"
    return True, (
        f"status answered (protocol {result.protocol}); VM {result.vmid or '?'} is {state}"
    )


async def check_devvm(
    target: SshTarget,
    *,
    agent_path: str | None = None,
    client_keys: Sequence[asyncssh.SSHKey] | None = None,
    timeout_s: float,
) -> tuple[bool, str]:
    """The reachability probe (TCP, banner, login, a trivial command) with the pinned host key
    and the devvm key, then ``sudo -n true``: the breakglass shell needs root without a
    password."""
    probe = await probe_devvm(
        target, agent_path=agent_path, client_keys=client_keys, timeout_s=timeout_s
    )
    if probe.reachability is not Reachability.HEALTHY:
        return False, probe.message
    if target.user == "root":
        # The breakglass shell runs as root without sudo then (hosts.devvm): nothing to ask.
        return True, f"reachable as root ({probe.elapsed_s:.1f}s probe)"
    options = ConnectOptions(
        agent_path=agent_path, client_keys=client_keys, connect_timeout_s=timeout_s
    )
    try:
        conn = await asyncio.wait_for(connect(target, options), timeout_s + 1)
    except SshConnectError as exc:
        return False, f"the probe passed but a second login failed: {exc.message}"
    except TimeoutError:
        return False, f"the probe passed but a second login took over {timeout_s:g}s"
    try:
        done = await asyncio.wait_for(conn.run("sudo -n true", check=False), timeout_s)
    except TimeoutError:
        return False, f"`sudo -n true` did not finish within {timeout_s:g}s on the devvm"
    except (asyncssh.Error, OSError) as exc:
        return False, f"running `sudo -n true` on the devvm failed ({type(exc).__name__})"
    finally:
        conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.wait_closed(), 1.0)
    if done.exit_status == 0:
        return True, f"reachable, and sudo works without a password ({probe.elapsed_s:.1f}s probe)"
    err = str(done.stderr or "").strip().splitlines()
    detail = err[0][:200] if err else f"exit status {done.exit_status}"
    if _SUDO_PASSWORD.search(detail):
        return False, (
            f"sudo asks {target.user!r} for a password on the devvm ({detail}): the breakglass"
            " shell runs `sudo -n`; give that user a NOPASSWD rule (docs/install.md)"
        )
    return False, f"`sudo -n true` failed on the devvm ({detail})"
