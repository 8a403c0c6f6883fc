"""The breakglass agent's system prompt (the warm-case runbook) and its tool definitions."""

from __future__ import annotations

from typing import Any

from breakglass_tui.config import COLD_PATH_POINTER
from breakglass_tui.hosts.types import VERBS

RUNBOOK = """\
You are the breakglass agent: a rescue console for the owner's development VM ("the devvm",
Proxmox VM {vmid}) when it is wedged while the Kubernetes cluster is healthy (the warm case). The
operator watching this console is the owner. You act on your own judgement: there is no
confirmation gate on the power verbs; the PVE host's budget and cooldown are the bound.

Tools: `devvm_shell` runs a command as root (sudo) on the devvm; `pve_verb` runs one
forced-command verb on the Proxmox host for VM {vmid} only (status, forensics, reset, stop, start,
cycle); `probe_devvm` checks reachability and `wait_for_devvm` waits for it; `read_output` and
`grep_output` look deeper into an earlier output by its output_id (you are shown only a head and a
tail of long outputs).

Warm-case runbook:
1. Probe the devvm (`probe_devvm`).
2. If SSH works, diagnose: memory (`free -m`, OOM kills in `dmesg`/`journalctl -k`), disk
   (`df -h`, `df -i`, the biggest directories), failed units (`systemctl --failed`), the kernel
   log, pressure (`/proc/pressure/*`), load. Repair softly: free disk space (old logs, caches,
   journal vacuum), restart the stuck service, kill the runaway process. Keep commands bounded
   (no interactive programs; use timeouts, `head`, `tail`, `--no-pager`).
3. If SSH does not work, or a soft repair fails: `pve_verb status`, then `pve_verb forensics`
   (every mutating verb also captures forensics first), then `reset` when the guest is hung but
   QEMU is alive, or `cycle` when QEMU itself is stuck (I/O stall, paused on an I/O error, QMP not
   answering) or a reset did not help. `start` brings a stopped VM back.
4. Verify the devvm is back: `wait_for_devvm` (a boot takes a while; it probes until SSH
   answers), then a command over SSH.
5. End with a short incident summary: what was wrong, what you did, the current state, anything
   the owner should follow up.

PVE verb outcomes: "stop still in progress, start not attempted" (exit 8) means a qm task still
runs on the host and was not killed: run `status` until it shows the VM stopped, then call
`start`, which completes the cycle. A refusal for the host's state (exit 7: locked, HA-managed,
no quorum, /etc/pve not answering, or "kvm alive (D state)") means tell the owner what it says
and do not retry; `reset` still works on an HA-managed VM or without quorum. A state of "monitor
unresponsive" means QEMU itself is stuck: `cycle`, not `reset`.

Cold case: if the PVE host itself cannot be reached (a verb reports cold_case, or the PVE host
is unreachable), say plainly that this is the cold case, out of scope for this console, and
stop. {cold}

Be brief in prose; the operator sees every command and its output live.
"""


def system_prompt(vmid: int) -> list[dict[str, Any]]:
    """The system blocks; the last one carries cache_control (prompt caching)."""
    return [
        {
            "type": "text",
            "text": RUNBOOK.format(vmid=vmid, cold=COLD_PATH_POINTER),
            "cache_control": {"type": "ephemeral"},
        }
    ]


def tool_definitions() -> list[dict[str, Any]]:
    """The agent's tools; the last one carries cache_control (the tool list is cached)."""
    tools: list[dict[str, Any]] = [
        {
            "name": "devvm_shell",
            "description": (
                "Run a shell command as root on the devvm over SSH (non-interactive, no pty). The"
                " output streams to the operator's live-output pane; you see its head and tail"
                " within a budget, the exit status and an output_id for read_output/grep_output."
            ),
            "input_schema": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The shell command."},
                    "timeout_s": {
                        "type": "integer",
                        "description": "Deadline in seconds (default from config).",
                        "minimum": 1,
                        "maximum": 3600,
                    },
                },
                "required": ["command"],
            },
        },
        {
            "name": "pve_verb",
            "description": (
                "Run one forced-command verb on the Proxmox host for the devvm's VM only. status"
                " and forensics are read-only; reset, stop, start and cycle are mutating, each"
                " captures a forensics bundle first and is bounded by the host's budget and"
                " cooldown. reset = guest reset (QEMU stays); cycle = stop and start the QEMU"
                " process (for a stuck QEMU or when reset did not help)."
            ),
            "input_schema": {
                "type": "object",
                "properties": {"verb": {"type": "string", "enum": list(VERBS)}},
                "required": ["verb"],
            },
        },
        {
            "name": "probe_devvm",
            "description": (
                "Probe the devvm's reachability: TCP, SSH banner, login and a trivial command."
                " Says healthy, refused, tcp_timeout, no_banner, auth_refused, host_key_mismatch"
                " or command_failed."
            ),
            "input_schema": {"type": "object", "properties": {}},
        },
        {
            "name": "wait_for_devvm",
            "description": (
                "Probe the devvm repeatedly until SSH answers (healthy) or the timeout passes;"
                " use it after reset, cycle or start, while the guest boots."
            ),
            "input_schema": {
                "type": "object",
                "properties": {
                    "timeout_s": {"type": "integer", "minimum": 1, "maximum": 600},
                },
            },
        },
        {
            "name": "read_output",
            "description": (
                "Read a byte range of an earlier tool output by its output_id (up to its first"
                " 16 MiB are kept; you were shown only its head and tail). Length is capped by"
                " the budget."
            ),
            "input_schema": {
                "type": "object",
                "properties": {
                    "output_id": {"type": "string"},
                    "offset": {"type": "integer", "minimum": 0},
                    "length": {"type": "integer", "minimum": 1},
                },
                "required": ["output_id", "offset", "length"],
            },
        },
        {
            "name": "grep_output",
            "description": (
                "Search an earlier tool output by its output_id for lines matching a Python"
                " regular expression; returns line numbers, byte offsets and the lines. The"
                " pattern sees the first 4096 characters of each line, and a pattern that runs"
                " longer than a few seconds is stopped: avoid nested quantifiers."
            ),
            "input_schema": {
                "type": "object",
                "properties": {
                    "output_id": {"type": "string"},
                    "pattern": {"type": "string"},
                    "max_matches": {"type": "integer", "minimum": 1, "maximum": 500},
                },
                "required": ["output_id", "pattern"],
            },
        },
    ]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    return tools
