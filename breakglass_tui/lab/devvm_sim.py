"""The sandbox lab's devvm port: what the network shows of a VM in each state, in front of a real
sshd (the sandbox devvm's). It relays bytes and nothing else: it never reads a command.

What a client sees on the port follows the simulated Proxmox's ``vm.json``, as VM 102 would show
it:

- ``ssh``: each connection is relayed to the sandbox devvm's OpenSSH sshd.
- ``no_banner``: the TCP handshake completes and nothing is ever said: a wedged guest, or a VM
  paused by QEMU (``qmp_status`` paused or io-error). Connections open when the VM paused stay
  open and silent (their bytes are held, not relayed) and go on when it resumes.
- ``refused``: nothing listens: the VM is stopped, or it is still booting.

A new ``boot_id`` is a reboot: every connection drops, the sandbox devvm reboots (its processes
die and start again; its ``/data`` stays), and the port refuses until ``booted_at +
boot_delay_s``. The boot id seen first counts as already booted, so a lab is usable at once.
:meth:`DevvmSim.drop` drops every connection at once (a dropped link mid-command).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)


class _Relay:
    """One client connection and, in ssh mode, its upstream connection to sshd."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.upstream: asyncio.StreamWriter | None = None
        self.resumed = asyncio.Event()
        self.resumed.set()

    def abort(self) -> None:
        self.writer.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()


class DevvmSim:
    """The devvm's port on 127.0.0.1. ``await start()``, then ``await close()``."""

    def __init__(
        self,
        upstream_port: int,
        *,
        wedged: bool = False,
        vm_json: Path | None = None,
        boot_delay_s: float = 2.0,
        poll_s: float = 0.2,
        on_reboot: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """upstream_port: the sandbox devvm's sshd on 127.0.0.1. wedged: its guest never
        answers (no banner), whatever the VM's state."""
        self.upstream_port = upstream_port
        self.wedged = wedged
        self.vm_json = vm_json
        self.boot_delay_s = boot_delay_s
        self.poll_s = poll_s
        self.on_reboot = on_reboot
        self.port = 0
        self.mode = "refused"
        self.paused = False
        self.boot_id: int | None = None
        self._first_boot_id: int | None = None
        self._last_vm: dict[str, object] | None = None
        self._booted_at = 0.0
        self._rebooting: asyncio.Task[None] | None = None
        self._listener: asyncio.Server | None = None
        self._relays: set[_Relay] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._mode_changed = asyncio.Condition()

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1 (and follow vm.json); returns the port."""
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._read_vm()
        await self._apply(self._desired_mode())
        if self.vm_json is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.port

    async def close(self) -> None:
        """Stop following the VM, stop listening, drop every connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._rebooting is not None:
            self._rebooting.cancel()
            with contextlib.suppress(BaseException):
                await self._rebooting
        await self._apply("refused", force=True)

    def drop(self) -> None:
        """Drop every open connection now, as a broken link would."""
        for relay in list(self._relays):
            relay.abort()
        self._relays.clear()

    async def wait_for_mode(self, mode: str, timeout_s: float = 10.0) -> None:
        """Wait until the port shows `mode` ("ssh", "no_banner" or "refused")."""
        async with asyncio.timeout(timeout_s), self._mode_changed:
            await self._mode_changed.wait_for(lambda: self.mode == mode)

    # -- the VM's state, from the simulated Proxmox ------------------------------------------

    def _read_vm(self) -> dict[str, object] | None:
        if self.vm_json is None:
            return None
        try:
            vm = json.loads(self.vm_json.read_text())
        except (OSError, ValueError):
            return self._last_vm  # mid-write or gone: keep the last state seen
        self._last_vm = vm
        boot_id = vm.get("boot_id")
        if isinstance(boot_id, int) and boot_id != self.boot_id:
            if self._first_boot_id is None:
                self._first_boot_id = boot_id  # the lab starts with the guest already up
            else:
                log.info("devvm: boot id %s -> %s: the guest rebooted", self.boot_id, boot_id)
                self.drop()
                self.wedged = False  # a reboot brings a wedged guest back
                if self.on_reboot is not None:
                    self._rebooting = asyncio.get_running_loop().create_task(self.on_reboot())
            self.boot_id = boot_id
            self._booted_at = float(vm.get("booted_at") or time.time())  # type: ignore[arg-type]
        return vm

    def _desired_mode(self) -> str:
        vm = self._last_vm
        self.paused = False
        if vm is not None:
            if vm.get("status") != "running" or vm.get("qmp_status") == "prelaunch":
                return "refused"
            if vm.get("qmp_status") in ("paused", "io-error"):
                self.paused = True
                return "no_banner"  # the guest's CPUs are stopped
            booting = time.time() < self._booted_at + self.boot_delay_s
            rebooting = self._rebooting is not None and not self._rebooting.done()
            if self.boot_id != self._first_boot_id and (booting or rebooting):
                return "refused"
        return "no_banner" if self.wedged else "ssh"

    async def _watch(self) -> None:
        while True:
            try:
                self._read_vm()
                await self._apply(self._desired_mode())
            except Exception:  # a lab that stops following the VM is worse than a log line
                log.exception("devvm: following vm.json failed")
            await asyncio.sleep(self.poll_s)

    # -- the port ------------------------------------------------------------------------------

    async def _apply(self, mode: str, *, force: bool = False) -> None:
        for relay in self._relays:  # a paused VM holds its connections' bytes; a resumed one not
            if self.paused:
                relay.resumed.clear()
            else:
                relay.resumed.set()
        if mode == self.mode and not force:
            return
        if (mode == "refused" or self.mode == "refused" or force) and self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 2.0)
            self._listener = None
        if mode == "refused" or force:
            self.drop()
        if mode != "refused" and self._listener is None:
            self._listener = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )
        log.info("devvm on 127.0.0.1:%s: %s -> %s", self.port, self.mode, mode)
        async with self._mode_changed:
            self.mode = mode
            self._mode_changed.notify_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = _Relay(reader, writer)
        self._relays.add(relay)
        try:
            # The VM as it is now, not as the last poll saw it: a connection made right after a
            # reset must not reach the guest that was reset (a real one stops answering at once).
            self._read_vm()
            desired = self._desired_mode()
            if desired == "refused":
                return  # stopped or booting: nothing listens (the next poll closes the port)
            if self.mode != "ssh" or desired != "ssh":
                # The kernel completed the handshake; sshd never answers.
                while await reader.read(4096):
                    pass
                return
            try:
                upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return
            relay.upstream = upstream[1]
            await asyncio.gather(
                self._pipe(relay, reader, upstream[1]), self._pipe(relay, upstream[0], writer)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._relays.discard(relay)
            relay.abort()

    async def _pipe(
        self, relay: _Relay, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await source.read(65536):
                await relay.resumed.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            relay.abort()
