"""The Markdown incident report (/report): Claude's account when it could write one (summary, root
cause with the output_ids that prove it, actions, follow-ups), then the record: outcome, commands
and exit codes, verbs and bundles, cost, timeline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from breakglass_tui.config import Settings
from breakglass_tui.core import prompt
from breakglass_tui.core.timeline import Timeline
from breakglass_tui.core.turn import Asker


@dataclass(frozen=True)
class About:
    """What the report says about where it was written (the session and its settings)."""

    vmid: int
    model: str
    fallback_model: str | None
    max_cost_usd: float
    session_id: str
    operator: str
    lab: bool
    incident_id: str | None

    @classmethod
    def of(
        cls, settings: Settings, session_id: str, operator: str, lab: bool, incident_id: str | None
    ) -> About:
        return cls(
            settings.vmid,
            settings.model,
            settings.fallback_model,
            settings.max_cost_usd,
            session_id,
            operator,
            lab,
            incident_id,
        )


def write(
    timeline: Timeline,
    about: About,
    state_dir: Path,
    *,
    written: str | None,
    scrub: Callable[[str], str],
) -> tuple[Path, str]:
    """Write the report to ``<state_dir>/reports/incident-<id>.md``; its path and Markdown."""
    markdown = scrub(render(timeline, about, written=written))
    directory = state_dir / "reports"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"incident-{about.incident_id or about.session_id}.md"
    path.write_text(markdown)
    return path, markdown


def _ts(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + "Z"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def render(timeline: Timeline, about: About, *, written: str | None = None) -> str:
    """The incident report so far, as Markdown: the whole incident when the timeline was given
    its earlier events (resume, take-over), else this session's. ``written``: Claude's own
    report, put first; the record follows as its appendix."""
    notes = sorted(timeline.notes, key=lambda note: note[0])
    started = notes[0][0] if notes else time.time()
    scope = "incident" if about.incident_id else "session"
    lines = [
        f"# Incident report — devvm (VM {about.vmid})",
        "",
    ]
    if about.incident_id:
        lines.append(f"- Incident: `{about.incident_id}`{' (lab)' if about.lab else ''}")
    earlier = [(s, op) for s, op in timeline.sessions if s != about.session_id]
    if earlier:
        lines.append(
            "- Earlier sessions: " + ", ".join(f"`{s}` ({_cell(op)})" for s, op in earlier)
        )
    lines += [
        f"- Session: `{about.session_id}`{' (lab)' if about.lab and not about.incident_id else ''}",
        f"- Operator: {about.operator}",
        f"- Started: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(started))} UTC",
        f"- Model: {about.model}"
        + (f" (fallback {about.fallback_model})" if about.fallback_model else ""),
        "",
    ]
    record = "##"
    if written:
        lines += ["*Written by Claude from the incident's conversation; the record follows.*", ""]
        lines += [written.strip(), "", "## Appendix: the record", ""]
        record = "###"
    lines += [f"{record} Outcome", ""]
    probe = timeline.last_probe
    if probe is not None:
        lines.append(f"- Last probe: **{probe.reachability.value}** — {probe.message}")
    else:
        lines.append(f"- The devvm was not probed in this {scope}.")
    if any(v.cold_case for v in timeline.verbs):
        lines.append("- The cold case was detected: host-level recovery, out of scope here.")
    if timeline.last_assistant_text:
        lines += ["", "Claude's last word:", ""]
        lines += ["> " + ln for ln in timeline.last_assistant_text.strip().splitlines()]
    lines += ["", f"{record} Commands", ""]
    commands = [c for c in timeline.calls if c.tool == "devvm_shell"]
    if commands:
        lines += ["| by | command | result | exit | output |", "|---|---|---|---|---|"]
        for c in commands:
            exit_status = c.exit_status if c.exit_status is not None else "—"
            lines.append(
                f"| {'operator' if c.manual else 'Claude'} | `{_cell(c.label)}` |"
                f" {_cell(c.summary)} | {exit_status} | {c.output_id or '—'} |"
            )
    else:
        lines.append("No devvm command was run.")
    lines += ["", f"{record} Forced-command verbs and forensics bundles", ""]
    if timeline.verbs:
        lines += ["| verb | ok | state | bundle | message |", "|---|---|---|---|---|"]
        for v in timeline.verbs:
            lines.append(
                f"| {v.verb} | {'yes' if v.ok else 'no'} (exit {v.exit_code}) |"
                f" {v.state_before or '?'} → {v.state_after or '?'} | {v.bundle_id or '—'} |"
                f" {_cell(v.message)} |"
            )
    else:
        lines.append("No PVE verb was run.")
    u = timeline.usage
    lines += [
        "",
        f"{record} Cost",
        "",
        f"- Input tokens: {u.input_tokens} (cache writes {u.cache_creation_input_tokens},"
        f" cache reads {u.cache_read_input_tokens})",
        f"- Output tokens: {u.output_tokens}",
        f"- Cost: ${u.cost_usd:.4f} (limit ${about.max_cost_usd:.2f})"
        if u.cost_known
        else "- Cost: unknown (a model without a known price was used)",
        "",
        f"{record} Timeline",
        "",
    ]
    for t, text in notes:
        first = text.strip().splitlines()[0] if text.strip() else ""
        lines.append(f"- {_ts(t)} {first[:300]}")
    return "\n".join(lines) + "\n"


async def ask_claude(
    asker: Asker, timeline: Timeline, notice: Callable[[str, str], None]
) -> str | None:
    """Claude's written report: one extra turn with the same system prompt and tools and
    ``tool_choice: none`` (the prefix stays intact; nothing is kept in the conversation).
    None when Claude could not write it (the record alone is the report then)."""
    notice("info", "Asking Claude to write the incident report…")
    last_word = timeline.last_assistant_text
    try:
        reply = await asker.ask(
            use_tools=False, extra=[{"type": "text", "text": prompt.REPORT_REQUEST}]
        )
    finally:  # the report is not the incident's last word
        timeline.last_assistant_text = last_word
    if reply is not None and reply.text.strip():
        return reply.text.strip()
    notice("warning", "Claude could not write the report: the record alone.")
    return None
