"""The PVE client: call one forced-command verb on the PVE host and type its JSON answer.

The PVE key can only run ``breakglass-verb`` (``command="…",restrict`` in authorized_keys), so
each call is one SSH exec of the verb's name: no pty, pinned host key, a fresh connection each
time (verbs are rare; a fresh connection has no stale state to go wrong). Nothing here raises for
host-side failures: the result says what happened. A PVE host that cannot be reached while the
cluster (where this runs) works is, most likely, the cold case: we say so, with the pointer.

A mutating verb, once begun, finishes on the host even if we disconnect; a timeout or cancel here
only stops our waiting, and the result says to run ``status``.

The verb is copied to the host by hand, so the host's copy can be older or newer than this
console: every answer carries the verb's protocol version, compared here with the version of the
verb module this console ships (one constant, ``breakglass_verb.PROTOCOL_VERSION``), and a
mismatch is said plainly in the result's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import asyncssh

from breakglass_tui.config import DEFAULT_COLD_PATH_POINTER
from breakglass_tui.hosts.ssh import ConnectOptions, SshConnectError, connect
from breakglass_tui.hosts.types import BUNDLE_ID_RE, VERBS, Reachability, SshTarget, VerbResult
from breakglass_tui.verb import breakglass_verb as verb_protocol

# No exit code: the verb never ran, or we stopped waiting for it.
NO_EXIT_CODE = -1

# The protocol version this console expects; a verb without the field is the first one (1).
PROTOCOL_VERSION = verb_protocol.PROTOCOL_VERSION
UNVERSIONED_PROTOCOL = 1

# breakglass-verb's exit codes (its protocol) and what each means to the operator.
EXIT_MEANINGS: dict[int, str] = {
    verb_protocol.EXIT_OK: "done",
    verb_protocol.EXIT_BAD_INPUT: "the PVE host refused the input as not a verb (bad input;"
    " nothing was done)",
    verb_protocol.EXIT_BUSY: "busy: another mutating verb (or a qm task it started, or another"
    " forensics capture) is running on the PVE host; wait for it, then run status",
    verb_protocol.EXIT_REFUSED: "refused by policy (the hourly budget, the cooldown after a"
    " reset, stop or cycle, the forensics budget, or a ledger the PVE host cannot write);"
    " nothing was done — wait, or recover by hand",
    verb_protocol.EXIT_ACTION_FAILED: "the action failed on the PVE host",
    verb_protocol.EXIT_CONFIG_INVALID: "breakglass-verb's config on the PVE host is invalid, so"
    " nothing was done; fix /etc/breakglass/verb.toml",
    verb_protocol.EXIT_PRECONDITION: "refused: the host's state forbids it (the VM is locked,"
    " HA-managed, the node has no quorum, /etc/pve does not answer, or a kvm lives on in D"
    " state); nothing was done — tell the owner, do not retry",
    verb_protocol.EXIT_IN_PROGRESS: "still in progress: a qm task the verb started is still"
    " running on the PVE host (it was not killed); run status to follow it",
    verb_protocol.EXIT_INTERNAL: "breakglass-verb hit an internal error; see the PVE host's"
    " journal (breakglass-verb)",
}


def protocol_note(doc: dict[str, Any]) -> tuple[int, str | None]:
    """(the host verb's protocol version, a sentence when it is not this console's)."""
    theirs = doc.get("protocol", UNVERSIONED_PROTOCOL)
    if not isinstance(theirs, int) or isinstance(theirs, bool):
        return UNVERSIONED_PROTOCOL, (
            f"breakglass-verb on the PVE host sent a protocol version this console cannot read"
            f" ({str(theirs)[:20]!r}; it expects {PROTOCOL_VERSION}): reinstall the verb from"
            " this console's version (docs/pve-host.md §1)"
        )
    if theirs < PROTOCOL_VERSION:
        return theirs, (
            f"breakglass-verb on the PVE host is OLDER than this console expects (protocol"
            f" {theirs}, expected {PROTOCOL_VERSION}): its answers may be wrong in ways this"
            " console fixed (e.g. a wedged QEMU read as running). Copy this console's"
            " breakglass_tui/verb/breakglass_verb.py to /usr/local/sbin/breakglass-verb on the"
            " host (docs/pve-host.md §1)"
        )
    if theirs > PROTOCOL_VERSION:
        return theirs, (
            f"breakglass-verb on the PVE host is NEWER than this console expects (protocol"
            f" {theirs}, expected {PROTOCOL_VERSION}): this console may misread its answers;"
            " update the console to the release that ships that verb"
        )
    return theirs, None


def parse_answer(name: str, code: int, stdout: str, stderr: str) -> VerbResult:
    """breakglass-verb's answer (its exit code and JSON document) as a typed result: the
    document's fields are the verb's own (``Run.document``), read by name."""
    try:
        doc: Any = json.loads(stdout)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        err = stderr.strip().splitlines()
        detail = f" (stderr: {err[0][:200]})" if err else ""
        return VerbResult(
            verb=name,
            ok=False,
            exit_code=code,
            message=f"{name}: the PVE host answered with no JSON document (exit {code})"
            f"{detail}; is breakglass-verb the forced command for this key?",
        )
    said = str(doc.get("message") or "").strip()
    meaning = EXIT_MEANINGS.get(code, f"breakglass-verb exited with unknown code {code}")
    ok = code == 0 and bool(doc.get("ok", True))
    message = (said or f"{name}: {meaning}") if ok else f"{name}: {meaning}"
    if not ok and said:
        message += f" — {said}"
    protocol, note = protocol_note(doc)
    if note:
        message = f"WARNING: {note}. {message}"
    ha = doc.get("ha")
    monitor = doc.get("monitor")
    return VerbResult(
        verb=str(doc.get("verb") or name),
        ok=ok,
        exit_code=code,
        message=message,
        vmid=doc.get("vmid") if isinstance(doc.get("vmid"), int) else None,
        state_before=doc.get("state_before"),
        state_after=doc.get("state_after"),
        bundle_id=doc.get("bundle_id"),
        refused=doc.get("refused"),
        cold_case=bool(doc.get("cold_case", False)),
        document=doc,
        protocol=protocol,
        protocol_note=note,
        upid=_text(doc.get("upid")),
        lock=_text(doc.get("lock")),
        ha_managed=bool(ha.get("managed")) if isinstance(ha, dict) else None,
        quorum=doc.get("quorum") if isinstance(doc.get("quorum"), bool) else None,
        monitor_unresponsive=(
            _text(monitor.get("unresponsive")) if isinstance(monitor, dict) else None
        ),
    )


def _unreachable(verb: str, exc: SshConnectError, cold_path_pointer: str) -> VerbResult:
    if exc.kind in (Reachability.AUTH_REFUSED, Reachability.HOST_KEY_MISMATCH):
        # Reached, but refused: a configuration problem, not the cold case.
        return VerbResult(
            verb=verb, ok=False, exit_code=NO_EXIT_CODE, message=f"{verb} not run: {exc.message}"
        )
    return VerbResult(
        verb=verb,
        ok=False,
        exit_code=NO_EXIT_CODE,
        cold_case=True,
        message=f"{verb} not run: the PVE host cannot be reached ({exc.message}). "
        + cold_path_pointer,
    )


def _text(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None


class PveClient:
    """Calls breakglass-verb on the PVE host over SSH (forced command, pinned host key)."""

    def __init__(
        self,
        target: SshTarget,
        options: ConnectOptions,
        *,
        verb_timeout_s: float = 600.0,
        cold_path_pointer: str = DEFAULT_COLD_PATH_POINTER,
    ) -> None:
        # A cycle's worst case on the host: forensics (20 s) + a stop task's ceiling (240 s) +
        # verification (30 s) + a start task's ceiling (240 s) + verification: under 10 min.
        self.target = target
        self.options = options
        self.verb_timeout_s = verb_timeout_s
        self.cold_path_pointer = cold_path_pointer
        self._open: set[asyncssh.SSHClientConnection] = set()

    async def _exec(
        self, command: str
    ) -> tuple[asyncssh.SSHCompletedProcess | None, str | None, SshConnectError | None]:
        """Run command once: (completed, None, None), (None, why, None) or (None, None, conn
        error)."""
        try:
            conn = await connect(self.target, self.options)
        except SshConnectError as exc:
            return None, None, exc
        self._open.add(conn)
        try:
            done = await asyncio.wait_for(
                conn.run(command, check=False, term_type=None), self.verb_timeout_s
            )
            return done, None, None
        except TimeoutError:
            return (
                None,
                (
                    f"no answer from the PVE host within {self.verb_timeout_s:g}s; a mutating verb"
                    " finishes on the host even so: run status to see the VM's state"
                ),
                None,
            )
        except (asyncssh.Error, OSError) as exc:
            return (
                None,
                (
                    f"the connection to the PVE host dropped during the call ({exc}); a mutating"
                    " verb finishes on the host even so: run status to see the VM's state"
                ),
                None,
            )
        finally:
            self._open.discard(conn)
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 2.0)

    async def verb(self, name: str) -> VerbResult:
        """Run the forced-command verb `name` (one of VERBS) and return its typed result."""
        if name not in VERBS:
            # Refused here too, before connecting: the host would refuse it anyway (exit 2).
            return VerbResult(
                verb=str(name)[:40],
                ok=False,
                exit_code=verb_protocol.EXIT_BAD_INPUT,
                refused=verb_protocol.REFUSED_BAD_INPUT,
                message=f"{str(name)[:40]!r} is not a verb; the verbs are {', '.join(VERBS)}",
            )
        done, why, conn_error = await self._exec(name)
        if conn_error is not None:
            return _unreachable(name, conn_error, self.cold_path_pointer)
        if done is None:
            return VerbResult(verb=name, ok=False, exit_code=NO_EXIT_CODE, message=why or "")
        return self._parse(name, done)

    def _parse(self, name: str, done: asyncssh.SSHCompletedProcess) -> VerbResult:
        code = done.exit_status if done.exit_status is not None else NO_EXIT_CODE
        return parse_answer(name, code, str(done.stdout or ""), str(done.stderr or ""))

    async def bundle(self, bundle_id: str) -> dict[str, Any]:
        """Fetch a forensics bundle by its exact id: breakglass-verb's document
        ``{verb: "bundle", ok, bundle_id, manifest, files: {name: base64}}``. On any failure, a
        document with ok False and a message (never raises for host-side failures)."""
        if not isinstance(bundle_id, str) or not BUNDLE_ID_RE.fullmatch(bundle_id):
            return {
                "verb": "bundle",
                "ok": False,
                "bundle_id": None,
                "message": f"{str(bundle_id)[:80]!r} is not a bundle id (like"
                " 20260612T101500Z-reset-1a2b3c)",
            }
        done, why, conn_error = await self._exec(f"bundle {bundle_id}")
        failed: dict[str, Any] = {"verb": "bundle", "ok": False, "bundle_id": bundle_id}
        if conn_error is not None:
            return {
                **failed,
                "message": _unreachable("bundle", conn_error, self.cold_path_pointer).message,
            }
        if done is None:
            return {**failed, "message": why}
        result = self._parse("bundle", done)
        if not result.document:
            return {**failed, "exit_code": result.exit_code, "message": result.message}
        return {**result.document, "ok": result.ok, "message": result.message}

    async def close(self) -> None:
        """Close any connection still open (a call in flight is abandoned; the verb goes on)."""
        for conn in list(self._open):
            conn.close()
        self._open.clear()
