"""The slash commands: one table, read by the agent (what each runs, and ``/help``), the chat's
completion, the command palette and the help screen. Adding a command is adding an entry.

A command is answered by the **agent** (a tool call through the same hosts layer as Claude's, or
the report) or by the **console** itself (the tab's own handlers: help, cancel, the queue, take
over, close, self-check), which the agent only names when one reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from breakglass_tui.core import manual_note, tools
from breakglass_tui.hosts.types import MUTATING_VERBS, VERBS

ToolInput = dict[str, Any]


@dataclass(frozen=True)
class SlashCommand:
    name: str  # "/probe"
    help: str  # one line: /help, the help screen, the agent's help
    args: str = ""  # what follows the name, e.g. "<command>" (required when tool_input needs it)
    by: Literal["agent", "console"] = "agent"
    # The command palette (Ctrl+P): its title and a short help; None: not offered there.
    palette: str | None = None
    palette_help: str = ""
    # For an agent command run as a tool call: the tool, and its input from the rest of the
    # line (None when the rest is missing or wrong: ``usage`` is then said).
    tool: str | None = None
    tool_input: Callable[[str], ToolInput | None] | None = None
    usage: str = ""

    @property
    def mutating(self) -> bool:
        return self.tool == "pve_verb" and self.name[1:] in MUTATING_VERBS

    @property
    def shown(self) -> str:
        return f"{self.name} {self.args}" if self.args else self.name


def _verb(verb: str, help_text: str, palette_help: str) -> SlashCommand:
    mutating = " (mutating)" if verb in MUTATING_VERBS else ""
    return SlashCommand(
        f"/{verb}",
        help_text,
        palette=f"PVE verb: {verb}{mutating}",
        palette_help=palette_help,
        tool="pve_verb",
        tool_input=lambda rest: {"verb": verb},
    )


_VERB_HELP: dict[str, tuple[str, str]] = {
    "status": ("PVE verb status: the VM's state", "the VM's state, read-only"),
    "forensics": (
        "PVE verb forensics: capture a bundle, change nothing",
        "capture a bundle, change nothing",
    ),
    "reset": (
        "PVE verb reset (mutating): hard reset of the guest, forensics first",
        "hard reset, forensics first",
    ),
    "stop": ("PVE verb stop (mutating)", "forensics first"),
    "start": ("PVE verb start (mutating, never refused by the budget)", "bring a stopped VM back"),
    "cycle": (
        "PVE verb cycle (mutating): stop then start, forensics first",
        "stop then start, forensics first",
    ),
}


COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand(
        "/probe",
        "probe the devvm's SSH: reachable, refused, no banner, …",
        palette="Probe the devvm",
        palette_help="is SSH up? refused, no banner, auth, …",
        tool="probe_devvm",
        tool_input=lambda rest: {},
    ),
    *(_verb(verb, *_VERB_HELP[verb]) for verb in VERBS),
    SlashCommand(
        "/sh",
        "run a command on the devvm (sudo shell)",
        args="<command>",
        tool="devvm_shell",
        tool_input=lambda rest: {"command": rest} if rest else None,
        usage="/sh needs a command, e.g. /sh df -h",
    ),
    SlashCommand("/cancel", "cancel the running turn or command (same as Esc)", by="console"),
    SlashCommand(
        "/drop",
        "drop the newest queued message (/drop all: every one)",
        by="console",
    ),
    SlashCommand(
        "/report",
        "write the incident report and download it",
        palette="Incident report",
        palette_help="write the report and download it",
    ),
    SlashCommand(
        "/takeover",
        "drive the incident from this tab (the driving tab becomes read-only)",
        by="console",
        palette="Take over the incident",
        palette_help="drive from this tab; the other becomes read-only",
    ),
    SlashCommand(
        "/close",
        "close the incident: this tab drives the next one at once",
        by="console",
        palette="Close the incident",
        palette_help="this tab drives the next incident at once",
    ),
    SlashCommand(
        "/selfcheck",
        "check every link of the rescue path now (changes nothing)",
        by="console",
        palette="Self-check",
        palette_help="every link of the rescue path, now; changes nothing",
    ),
    SlashCommand("/help", "list the commands", by="console"),
)


def find(command: str) -> SlashCommand | None:
    """The entry for a command word ("/Probe" too), or None."""
    word = command.split(" ", 1)[0].lower()
    return next((c for c in COMMANDS if c.name == word), None)


def help_text() -> str:
    """Every command, one line each (the agent's /help)."""
    width = max(len(c.shown) for c in COMMANDS) + 2
    lines = ["Slash commands (they work with or without Claude, through the same hosts layer):"]
    lines += [f"  {c.shown.ljust(width)}{c.help}" for c in COMMANDS]
    lines.append("Anything else is a message to Claude.")
    return "\n".join(lines)


def completions() -> list[str]:
    """The words the chat input completes (a trailing space where arguments follow)."""
    return [c.name + (" " if c.args else "") for c in COMMANDS]


async def run_manual(
    command: SlashCommand,
    rest: str,
    ctx: tools.ToolContext,
    *,
    call_id: str,
    said: str,
    pending: list[str],
) -> None:
    """Run an agent command's tool call as the operator's (``manual``), shown and audited as
    Claude's are; ``pending`` gets a line of metadata for Claude's next turn (never the host's
    text: the output is readable by its id). A missing argument is said, not run."""
    assert command.tool is not None and command.tool_input is not None
    tool_input = command.tool_input(rest)
    if tool_input is None:
        ctx.notice("error", command.usage or f"{command.name} needs {command.args}")
        return
    try:
        run = await tools.run_call(ctx, call_id, command.tool, tool_input, manual=True)
    except asyncio.CancelledError:
        pending.append(manual_note.cancelled(said))
        raise
    # [issue 15] Claude learns of it as metadata only (core.manual_note); the output itself it
    # reads by id, fenced.
    pending.append(manual_note.entry(said, command.tool, run.facts, run.record))
