"""Messages the app posts to itself: the agent's events, wrapped, and the backend's arrival."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

from breakglass_tui.core.events import Event

if TYPE_CHECKING:
    from breakglass_tui.ui.backend import Backend


class AgentEvent(Message):
    """One ``core.events`` event from the breakglass agent (same loop: posted, not threaded)."""

    def __init__(self, event: Event, *, own: bool = True) -> None:
        super().__init__()
        self.event = event
        # False: replayed from the incident's journal or followed from the driving tab.
        self.own = own


class BackendReady(Message):
    """The hosts session and the breakglass agent are built."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
