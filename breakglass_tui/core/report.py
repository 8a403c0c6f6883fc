"""The Markdown incident report (/report): Claude's account when it could write one (summary, root
cause with the output_ids that prove it, actions, follow-ups), then the record: outcome, commands
and exit codes, verbs and bundles, cost, timeline."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from breakglass_tui.core.agent import BreakglassAgent


def _ts(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + "Z"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def render(agent: BreakglassAgent, *, written: str | None = None) -> str:
    """The incident report so far, as Markdown: the whole incident when the agent was given its
    earlier events (``history``: resume, take-over), else ``agent``'s session. ``written``:
    Claude's own report, put first; the record follows as its appendix."""
    started = agent.timeline[0][0] if agent.timeline else time.time()
    scope = "incident" if agent.incident_id else "session"
    lines = [
        f"# Incident report — devvm (VM {agent.settings.vmid})",
        "",
    ]
    if agent.incident_id:
        lines.append(f"- Incident: `{agent.incident_id}`{' (lab)' if agent.lab else ''}")
    earlier = [(s, op) for s, op in agent.sessions if s != agent.session_id]
    if earlier:
        lines.append(
            "- Earlier sessions: " + ", ".join(f"`{s}` ({_cell(op)})" for s, op in earlier)
        )
    lines += [
        f"- Session: `{agent.session_id}`{' (lab)' if agent.lab and not agent.incident_id else ''}",
        f"- Operator: {agent.operator}",
        f"- Started: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(started))} UTC",
        f"- Model: {agent.settings.model}"
        + (f" (fallback {agent.settings.fallback_model})" if agent.settings.fallback_model else ""),
        "",
    ]
    record = "##"
    if written:
        lines += ["*Written by Claude from the incident's conversation; the record follows.*", ""]
        lines += [written.strip(), "", "## Appendix: the record", ""]
        record = "###"
    lines += [f"{record} Outcome", ""]
    if agent.last_probe is not None:
        lines.append(
            f"- Last probe: **{agent.last_probe.reachability.value}** — {agent.last_probe.message}"
        )
    else:
        lines.append(f"- The devvm was not probed in this {scope}.")
    if any(v.cold_case for v in agent.verbs):
        lines.append("- The cold case was detected: host-level recovery, out of scope here.")
    if agent.last_assistant_text:
        lines += ["", "Claude's last word:", ""]
        lines += ["> " + ln for ln in agent.last_assistant_text.strip().splitlines()]
    lines += ["", f"{record} Commands", ""]
    commands = [c for c in agent.calls if c["tool"] == "devvm_shell"]
    if commands:
        lines += ["| by | command | result | exit | output |", "|---|---|---|---|---|"]
        for c in commands:
            exit_status = c["exit_status"] if c["exit_status"] is not None else "—"
            lines.append(
                f"| {'operator' if c['manual'] else 'Claude'} | `{_cell(c['label'])}` |"
                f" {_cell(c['summary'])} | {exit_status} | {c['output_id'] or '—'} |"
            )
    else:
        lines.append("No devvm command was run.")
    lines += ["", f"{record} Forced-command verbs and forensics bundles", ""]
    if agent.verbs:
        lines += ["| verb | ok | state | bundle | message |", "|---|---|---|---|---|"]
        for v in agent.verbs:
            lines.append(
                f"| {v.verb} | {'yes' if v.ok else 'no'} (exit {v.exit_code}) |"
                f" {v.state_before or '?'} → {v.state_after or '?'} | {v.bundle_id or '—'} |"
                f" {_cell(v.message)} |"
            )
    else:
        lines.append("No PVE verb was run.")
    u = agent.total_usage
    lines += [
        "",
        f"{record} Cost",
        "",
        f"- Input tokens: {u.input_tokens} (cache writes {u.cache_creation_input_tokens},"
        f" cache reads {u.cache_read_input_tokens})",
        f"- Output tokens: {u.output_tokens}",
        f"- Cost: ${u.cost_usd:.4f} (limit ${agent.settings.max_cost_usd:.2f})"
        if u.cost_known and agent.cost_known
        else "- Cost: unknown (a model without a known price was used)",
        "",
        f"{record} Timeline",
        "",
    ]
    for t, text in agent.timeline:
        first = text.strip().splitlines()[0] if text.strip() else ""
        lines.append(f"- {_ts(t)} {first[:300]}")
    return "\n".join(lines) + "\n"
