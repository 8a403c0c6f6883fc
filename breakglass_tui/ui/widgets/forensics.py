"""The forensics pane: this incident's verbs and bundles, and the probes' results."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static

from breakglass_tui.hosts.types import MUTATING_VERBS, ProbeResult, Reachability, VerbResult
from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.sanitize import clean, literal_text


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


class ForensicsPane(Guarded, Vertical):
    """Verbs of this incident (time, verb, state before → after, bundle) and probe results."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("d", "download", "Download bundle", id="forensics.download"),
    ]

    class DownloadRequested(Message):
        """The operator asked for a forensics bundle."""

        def __init__(self, bundle_id: str) -> None:
            super().__init__()
            self.bundle_id = bundle_id

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results: list[VerbResult] = []
        self._probes: list[Text] = []
        self._details: Text | None = None

    def compose(self) -> ComposeResult:
        yield Static("Forensics · Enter or d downloads a bundle", classes="pane-title")
        table: DataTable[Any] = DataTable(id="verbs", cursor_type="row", zebra_stripes=True)
        table.add_columns(*(Text(c) for c in ("time (UTC)", "verb", "state", "bundle")))
        yield table
        yield Static("no verb or probe yet", id="probes", markup=False)

    def add_verb(self, result: VerbResult, at: float) -> None:
        self.results.append(result)
        # Every cell is a Text: a str cell would be parsed as markup, and these come from the
        # PVE host.
        state = literal_text(
            f"{result.state_before or '?'} → {result.state_after or '?'}", newlines=False
        )
        mutating = result.verb in MUTATING_VERBS
        verb = literal_text(result.verb, "bold yellow" if mutating else "", newlines=False)
        if result.refused:
            verb.append(
                f" refused ({clean(str(result.refused), newlines=False)})", style="bold red"
            )
        elif result.cold_case:
            verb.append(" cold case", style="bold red")
        elif not result.ok:
            verb.append(" failed", style="red")
        bundle = literal_text(result.bundle_id or "—", newlines=False)
        table = self.query_one("#verbs", DataTable)
        table.add_row(Text(_clock(at)), verb, state, bundle, key=str(len(self.results) - 1))
        table.move_cursor(row=table.row_count - 1)
        self._show_details(result)

    def _show_details(self, result: VerbResult) -> None:
        """The verb's sentence and its forensics probes (timeouts marked) above the probe log."""
        lines = [literal_text(f"{result.verb}: {result.message}", "bold")]
        if result.bundle_id:
            lines.append(
                literal_text(f"bundle {result.bundle_id} (Enter or d downloads it)", "dim")
            )
        document = result.document if isinstance(result.document, dict) else {}
        probes = document.get("probes")
        # The PVE host's document is outside data: only well-formed probe entries are shown.
        probes = [p for p in probes if isinstance(p, dict)] if isinstance(probes, list) else []
        if probes:
            lines.append(self._verb_probes(result, probes))
        self._details = Text("\n").join(lines)
        self._show_probes()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        index = int(event.row_key.value or 0)
        if 0 <= index < len(self.results):
            self._show_details(self.results[index])

    @staticmethod
    def _verb_probes(result: VerbResult, probes: list[dict[str, Any]]) -> Text:
        line = Text("probes: ")
        for i, probe in enumerate(probes):
            if i:
                line.append(" · ")
            status = clean(str(probe.get("status", "?")), newlines=False, limit=40)
            name = clean(str(probe.get("name", "?")), newlines=False, limit=80)
            style = {"ok": "green", "timeout": "bold yellow", "error": "red"}.get(status, "")
            mark = {"ok": "✓", "timeout": "TIMED OUT", "error": "✗"}.get(status, status)
            line.append(f"{name} {mark}", style=style)
        return line

    def add_probe(self, result: ProbeResult, at: float) -> None:
        ok = result.reachability is Reachability.HEALTHY
        timeout = result.reachability in (Reachability.TCP_TIMEOUT, Reachability.NO_BANNER)
        style = "green" if ok else ("bold yellow" if timeout else "red")
        line = Text(f"{_clock(at)} probe devvm: ")
        line.append(result.reachability.value.replace("_", " "), style=style)
        if timeout:
            line.append(" (timed out)", style="yellow")
        line.append(f" — {clean(result.message)}", style="dim")
        self._probes.append(line)
        self._show_probes()

    def _show_probes(self) -> None:
        parts = ([self._details] if self._details is not None else []) + self._probes[-4:]
        self.query_one("#probes", Static).update(Text("\n").join(parts))

    def selected_bundle(self) -> str | None:
        table = self.query_one("#verbs", DataTable)
        if not self.results or table.cursor_row < 0:
            return None
        return self.results[min(table.cursor_row, len(self.results) - 1)].bundle_id

    def latest_bundle(self) -> str | None:
        return next((r.bundle_id for r in reversed(self.results) if r.bundle_id), None)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_download()

    def action_download(self) -> None:
        bundle_id = self.selected_bundle()
        if bundle_id is None:
            self.notify("That verb left no bundle.", severity="warning")
            return
        self.post_message(self.DownloadRequested(bundle_id))
