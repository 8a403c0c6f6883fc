"""Plain result types shared by the hosts layer, the lab and the breakglass agent.

These are the contract between layers: the agent (core) consumes them, the UI renders them. No
Textual, no SDK: dataclasses only, so they can be built in tests and serialised to the audit log.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from breakglass_tui.verb import breakglass_verb as verb_protocol

Stream = Literal["stdout", "stderr"]

# An OpenSSH SHA256 key fingerprint as `ssh-add -l` and `ssh-keygen -lf` print it.
FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@dataclass(frozen=True)
class SshTarget:
    """One SSH endpoint, addressed by IP literal (no DNS: the ADR's hardening)."""

    host: str
    port: int
    user: str
    # known_hosts text pinning the host key. None only in the lab, never for real targets.
    known_hosts: str | None
    name: str = "devvm"
    # The SHA256 fingerprint of the one key offered to this target (docs/keys.md: keys per
    # target). The devvm key is never offered to the PVE host, nor the PVE key to the devvm, so
    # a key that a host would wrongly accept cannot skip the forced command. None offers every
    # key given (tests, and the lab's own helpers); real targets always name one.
    key_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.key_fingerprint is not None and not FINGERPRINT_RE.fullmatch(self.key_fingerprint):
            raise ValueError(
                f"the {self.name} key fingerprint is not an OpenSSH SHA256 fingerprint"
                " (SHA256: and 43 base64 characters, as `ssh-add -l` prints it)"
            )
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(
                f"{self.name} host {self.host!r} is not an IP literal: targets are addressed by IP"
                " so a DNS outage cannot stop the rescue; give the address, not a name"
            ) from None
        if not 0 < self.port < 65536:
            raise ValueError(f"{self.name} port {self.port} is out of range (1-65535)")


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a running command's output, decoded with replacement."""

    stream: Stream
    text: str


class Ending(enum.StrEnum):
    """How a devvm command ended."""

    EXITED = "exited"  # the remote command exited; see exit_status / signal
    TIMED_OUT = "timed_out"  # our deadline expired; the remote command was stopped
    CANCELLED = "cancelled"  # the operator cancelled; the remote command was stopped
    DISCONNECTED = "disconnected"  # the connection dropped while it ran
    FAILED = "failed"  # it could not be started (no connection, sudo refused, ...)


@dataclass
class CommandOutcome:
    """The result of one devvm command. `stdout`/`stderr` hold the whole output."""

    command: str
    ending: Ending
    exit_status: int | None = None
    signal: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    message: str = ""  # one human sentence for anything but a plain exit
    # Byte counts of the whole output, and whether stdout/stderr above hold only a tail because
    # the caller took the stream through on_output and asked run() not to keep it all.
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    kept_tail_only: bool = False

    @property
    def ok(self) -> bool:
        return self.ending is Ending.EXITED and self.exit_status == 0


class Reachability(enum.StrEnum):
    """What the reachability probe found, in the order the breakglass agent reasons about it."""

    HEALTHY = "healthy"  # SSH works and a trivial command ran
    REFUSED = "refused"  # TCP connection refused: sshd down or the guest is booting/off
    TCP_TIMEOUT = "tcp_timeout"  # no TCP answer at all: guest or network dead
    NO_BANNER = "no_banner"  # TCP accepted, no SSH banner: the classic wedged guest
    AUTH_REFUSED = "auth_refused"  # banner seen, our key refused
    HOST_KEY_MISMATCH = "host_key_mismatch"  # the host key is not the pinned one
    COMMAND_FAILED = "command_failed"  # logged in, but the trivial command failed or hung


@dataclass
class ProbeResult:
    reachability: Reachability
    elapsed_s: float
    message: str
    banner: str | None = None


# The forced-command protocol is the verb's own (one stdlib-only file, copied to the PVE host):
# the verbs, the mutating ones, the bundle id, the exit codes and the protocol version are
# imported from it, never copied (tests/hosts/test_verb_protocol.py checks the client agrees).
VERBS: tuple[str, ...] = verb_protocol.VERBS
MUTATING_VERBS: frozenset[str] = verb_protocol.MUTATING_VERBS
BUNDLE_ID_RE: re.Pattern[str] = verb_protocol.BUNDLE_ID_RE


@dataclass
class VerbResult:
    """A forced-command verb's outcome, parsed from breakglass-verb's JSON document."""

    verb: str
    ok: bool
    exit_code: int
    message: str
    vmid: int | None = None
    state_before: str | None = None
    state_after: str | None = None
    bundle_id: str | None = None
    # Why the verb did nothing: by policy ("bad_input" | "busy" | "budget" | "cooldown" |
    # "ledger" | "forensics_budget") or by the host's state ("locked" | "ha_managed" |
    # "no_quorum" | "pmxcfs" | "kvm_alive": tell the owner, do not retry). The names are
    # breakglass_verb's REFUSED_* constants.
    refused: str | None = None
    cold_case: bool = False  # the PVE host could not be reached, or host-level recovery needed
    document: dict[str, Any] = field(default_factory=dict)  # the verb's whole JSON document
    protocol: int | None = None  # the host verb's protocol version (1: it sent none)
    protocol_note: str | None = None  # set when the host's verb is older/newer than expected
    upid: str | None = None  # the Proxmox task (qm stop/start/reset) the verb started
    lock: str | None = None  # the VM config's lock (backup, migrate, snapshot, ...)
    ha_managed: bool | None = None  # whether the HA stack manages the VM (None: not said)
    quorum: bool | None = None  # whether the PVE node has quorum (None: not said)
    # "queue full" | "no answer" | "connection refused" | "no socket" when QMP did not answer
    monitor_unresponsive: str | None = None
