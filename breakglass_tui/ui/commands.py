"""Command-palette entries (Ctrl+P): the slash commands that name a palette title (core.slash),
the latest bundle's download and help."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

from breakglass_tui.core import slash

if TYPE_CHECKING:
    from breakglass_tui.ui.app import BreakglassApp


class BreakglassCommands(Provider):
    """The breakglass agent's actions as palette entries."""

    @property
    def _app(self) -> BreakglassApp:
        return self.app  # type: ignore[return-value]

    def _entries(self):
        for command in slash.COMMANDS:  # the one table of slash commands
            if command.palette is not None:
                yield command.palette, partial(self._app.submit, command.name), command.palette_help
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
