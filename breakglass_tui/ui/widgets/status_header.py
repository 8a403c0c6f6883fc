"""The status header: what the owner needs to see at a glance on the worst day."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from breakglass_tui.core.events import Usage
from breakglass_tui.hosts.types import ProbeResult, Reachability, VerbResult
from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.sanitize import clean


def _shown(text: str) -> str:
    # Header fields hold outside text (the operator's name, targets, the API's reason).
    return clean(text, newlines=False, limit=300)


class StatusHeader(Guarded, Widget):
    """Two lines: devvm reachability, VM state, Claude; keys, operator, targets."""

    devvm: reactive[str] = reactive("devvm: not probed yet")
    devvm_ok: reactive[bool | None] = reactive(None)
    vm_state: reactive[str] = reactive("VM: state unknown")
    vm_ok: reactive[bool | None] = reactive(None)
    claude: reactive[str] = reactive("Claude: starting…")
    claude_ok: reactive[bool | None] = reactive(None)
    keys: reactive[str] = reactive("keys: loading…")
    operator: reactive[str] = reactive("")
    targets: reactive[str] = reactive("")
    usage: reactive[str] = reactive("")
    usage_level: reactive[str] = reactive("")  # "", "warning" (80 % of the spend limit), "error"
    spend_limit: reactive[float | None] = reactive(None)
    # Set in a read-only tab: who drives the incident, since when (empty while this tab drives).
    driver: reactive[str] = reactive("")
    # breakglass-serve's self-check of the rescue path ("" when none runs: a terminal console).
    rescue: reactive[str] = reactive("")
    rescue_ok: reactive[bool | None] = reactive(None)

    def render(self) -> Text:
        def mark(ok: bool | None) -> str:
            return {True: "green", False: "bold red", None: "yellow"}[ok]

        first = Text(no_wrap=True, overflow="ellipsis")
        first.append("● ", style=mark(self.devvm_ok))
        first.append(_shown(self.devvm))
        first.append("   ● ", style=mark(self.vm_ok))
        first.append(_shown(self.vm_state))
        first.append("   ● ", style=mark(self.claude_ok))
        first.append(_shown(self.claude))
        if self.usage:
            style = {"warning": "bold yellow", "error": "bold red"}.get(self.usage_level, "dim")
            first.append(f" · {_shown(self.usage)}", style=style)
        second = Text(no_wrap=True, overflow="ellipsis", style="dim")
        if self.rescue:
            style = {True: "not dim green", False: "not dim bold red", None: "yellow"}
            second.append(_shown(self.rescue), style=style[self.rescue_ok])
            second.append(" · ")
        if self.driver:
            second.append(_shown(self.driver), style="not dim bold yellow")
            second.append(" · ")
        second.append(_shown(self.keys))
        if self.operator:
            second.append(f" · operator {_shown(self.operator)}")
        if self.targets:
            second.append(" · ")
            second.append(_shown(self.targets), style="bold" if "lab" not in self.targets else "")
        joined = Text("\n").join([first, second])
        joined.no_wrap, joined.overflow = True, "ellipsis"  # join() drops both
        return joined

    def show_probe(self, result: ProbeResult) -> None:
        ok = result.reachability is Reachability.HEALTHY
        self.devvm_ok = ok
        text = "devvm: reachable" if ok else f"devvm: {result.reachability.value.replace('_', ' ')}"
        self.devvm = text

    def show_verb(self, result: VerbResult) -> None:
        state = result.state_after or result.state_before
        if result.cold_case:
            self.vm_state = "VM: PVE unreachable (cold case)"
            self.vm_ok = False
        elif state:
            self.vm_state = f"VM {result.vmid or 102}: {state}"
            self.vm_ok = state == "running"

    def show_claude(self, *, manual: bool, model: str, reason: str | None = None) -> None:
        reason = short_reason(reason) if reason else None
        if manual:
            self.claude = f"Claude: manual mode — {reason}" if reason else "Claude: manual mode"
            self.claude_ok = False
        else:
            self.claude = f"Claude: ready ({model})"
            self.claude_ok = True

    def show_rescue_path(self, snapshot: dict | None) -> None:
        """The self-check's last word (``core.selfcheck`` snapshot): all links OK and when, or
        the broken link in red with the time it broke."""
        from breakglass_tui.core.selfcheck import summary

        if snapshot is None:
            self.rescue, self.rescue_ok = "rescue path: not checked yet", None
            return
        self.rescue, self.rescue_ok = summary(snapshot)

    def show_driver(self, text: str) -> None:
        """Read-only: who drives (``""`` when this tab drives)."""
        self.driver = text

    def show_usage(self, usage: Usage) -> None:
        """Tokens and cost so far, against the spend limit: "cost unknown" (never $0.00) when a
        model without a known price was used; yellow from 80 % of the limit, red at it."""
        tokens = usage.input_tokens + usage.output_tokens
        tokens += usage.cache_creation_input_tokens + usage.cache_read_input_tokens
        limit = self.spend_limit
        if not usage.cost_known:
            cost, level = "cost unknown", ""
        elif limit:
            cost = f"${usage.cost_usd:.2f} of ${limit:.2f}"
            share = usage.cost_usd / limit
            level = "error" if share >= 1 else "warning" if share >= 0.8 else ""
        else:
            cost, level = f"${usage.cost_usd:.2f}", ""
        self.usage_level = level
        self.usage = f"{tokens:,} tokens · {cost}"


def short_reason(reason: str) -> str:
    """The first sentence of a mode change's reason, without the words "manual mode" that the
    header already shows."""
    first = reason.split(". ")[0].rstrip(".").split(" (")[0]  # the details are in the chat
    for phrase in (": manual mode", " manual mode", "manual mode"):
        first = first.replace(phrase, "")
    return first.strip(" :;—-") or reason
