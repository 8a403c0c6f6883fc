"""Command-palette entries (Ctrl+P): the verbs, the probe, the incident report."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from breakglass_tui.ui.app import BreakglassApp

ENTRIES: tuple[tuple[str, str, str], ...] = (
    ("Probe the devvm", "/probe", "is SSH up? refused, no banner, auth, …"),
    ("PVE verb: status", "/status", "the VM's state, read-only"),
    ("PVE verb: forensics", "/forensics", "capture a bundle, change nothing"),
    ("PVE verb: reset (mutating)", "/reset", "hard reset, forensics first"),
    ("PVE verb: stop (mutating)", "/stop", "forensics first"),
    ("PVE verb: start (mutating)", "/start", "bring a stopped VM back"),
    ("PVE verb: cycle (mutating)", "/cycle", "stop then start, forensics first"),
    ("Incident report", "/report", "write the report and download it"),
    ("Take over the incident", "/takeover", "drive from this tab; the other becomes read-only"),
    ("Close the incident", "/close", "this tab drives the next incident at once"),
    ("Self-check", "/selfcheck", "every link of the rescue path, now; changes nothing"),
)


class BreakglassCommands(Provider):
    """The breakglass agent's actions as palette entries."""

    @property
    def _app(self) -> BreakglassApp:
        return self.app  # type: ignore[return-value]

    def _entries(self):
        for title, command, help_text in ENTRIES:
            yield title, partial(self._app.submit, command), help_text
        yield "Download latest forensics bundle", self._app.action_download_bundle, "as JSON"
        yield "Help: keys and slash commands", self._app.action_help, "F1"

    async def discover(self) -> Hits:
        for title, callback, help_text in self._entries():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self._entries():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
