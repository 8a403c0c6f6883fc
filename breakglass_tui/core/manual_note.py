"""What Claude learns of the operator's manual commands: metadata, never host text.

When the operator drives the tools with slash commands (``/sh``, ``/reset`` …), Claude is told at
its next operator message, in that message's user-role text. User-role text is where the
operator's own words are, so nothing the host wrote may appear there: each entry holds only what
the agent itself knows — the operator's command, the tool, the exit status or verb outcome, the
sizes, the duration and the ``output_id``. Claude reads the output itself with
``read_output``/``grep_output``, where it arrives fenced (core.fence) like every host output.
The facts come from the tool's handler (``facts`` of the agent's tool run): never the host's
messages.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from breakglass_tui.core.fence import escape
from breakglass_tui.core.outputs import OutputRecord

if TYPE_CHECKING:  # the SDK's types for the type checker only (no SDK import at run time)
    from anthropic.types.beta import BetaTextBlockParam

INTRO = (
    "While you were not involved, the operator ran these commands manually. Listed here is only"
    " what the breakglass agent knows of them (command, outcome, sizes, output_id); what the"
    " hosts wrote is in the outputs: read them with read_output/grep_output, where they arrive"
    " fenced like every host output."
)
_WORD = re.compile(r"[a-z_]{1,32}")
_SIGNAL = re.compile(r"[A-Z0-9]{1,12}")
_BUNDLE = re.compile(r"[0-9]{8}T[0-9]{6}Z-[a-z]{1,16}-[0-9a-f]{6}")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def entry(command: str, tool: str, facts: dict[str, Any], record: OutputRecord | None) -> str:
    """One line for a manual command that ran. ``command`` is the operator's (scrubbed);
    ``facts`` are the handler's: ``ending``, ``exit_status``, ``signal``, ``duration_s`` (shell),
    ``verb``, ``ok``, ``exit_code``, ``bundle_id``, ``refused`` (verb), ``reachability``
    (probe)."""
    parts = [tool]
    ending = facts.get("ending")
    if isinstance(ending, str) and _WORD.fullmatch(ending):
        signal = facts.get("signal")
        if ending == "exited" and signal:
            named = isinstance(signal, str) and _SIGNAL.fullmatch(signal)
            parts.append(f"killed by signal {signal}" if named else "killed by a signal")
        elif ending == "exited" and isinstance(facts.get("exit_status"), int):
            parts.append(f"exit {facts['exit_status']}")
        else:
            parts.append(ending.replace("_", " "))
    if "verb" in facts:
        ok = "ok" if facts.get("ok") else "failed"
        parts.append(f"{ok} (exit {int(facts.get('exit_code') or 0)})")
        refused = facts.get("refused")
        if isinstance(refused, str) and _WORD.fullmatch(refused):
            parts.append(f"refused: {refused}")
        bundle = facts.get("bundle_id")
        if isinstance(bundle, str) and _BUNDLE.fullmatch(bundle):
            parts.append(f"forensics bundle {bundle}")
    reachability = facts.get("reachability")
    if isinstance(reachability, str) and _WORD.fullmatch(reachability):
        parts.append(reachability)
    if record is not None:
        sizes = _size(record.raw_bytes)
        if record.stderr_bytes:
            sizes += f" (stdout {_size(record.stdout_bytes)}, stderr {_size(record.stderr_bytes)})"
        parts.append(sizes)
    duration = facts.get("duration_s")
    if isinstance(duration, int | float):
        parts.append(f"{duration:.1f} s")
    if record is not None:
        parts.append(f"output_id {record.output_id}")
    return f"- {escape(command)}: {', '.join(parts)}"


def cancelled(command: str) -> str:
    """The line for a manual command the operator cancelled."""
    return f"- {escape(command)}: cancelled by the operator"


def context_block(entries: list[str]) -> BetaTextBlockParam | None:
    """The text block that tells Claude of the manual commands, or None when there were none."""
    if not entries:
        return None
    return {"type": "text", "text": INTRO + "\n" + "\n".join(entries)}
