"""Operator messages typed while the breakglass agent works: queued, never refused.

The console holds one :class:`OperatorQueue` per tab. What the operator sends while the opening
probe, a model turn or a command runs goes into it and is shown as queued; it can be edited or
dropped until it is delivered. Delivery happens at the next turn boundary:

- inside Claude's tool loop, at the step boundary: the messages at the head of the queue that are
  not slash commands are taken by :func:`take_steering` and sent as text blocks *after* the
  tool_result blocks of the next user message (the Messages API allows text after the results),
  so Claude reads them before its next step — this is how the operator steers a running incident;
- otherwise, when the running turn or command ends (or is cancelled), the console runs the next
  queued message or slash command as a new turn, in order.

Either way a delivered message counts as a new operator message (emitted and audited as such).
Slash commands are never delivered to Claude mid-loop: they run, in order, after the turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anthropic.types.beta import BetaTextBlockParam

# What Claude is told about a message that arrives between its steps.
STEERING_NOTE = (
    "[The operator sent this message while you were working; it arrived after the tool results"
    " above. Take it into account before your next step.]"
)


@dataclass
class QueuedMessage:
    """One queued operator message or slash command."""

    id: int
    text: str
    at: float = field(default_factory=time.time)

    @property
    def slash(self) -> bool:
        return self.text.lstrip().startswith("/")


class OperatorQueue:
    """The queue of one tab, in order. Not thread-safe: the UI and the agent share one loop."""

    def __init__(self) -> None:
        self._items: list[QueuedMessage] = []
        self._next_id = 1
        self._listeners: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def items(self) -> tuple[QueuedMessage, ...]:
        return tuple(self._items)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener`` is called after every change (to redraw the queued messages)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def add(self, text: str) -> QueuedMessage:
        item = QueuedMessage(self._next_id, text)
        self._next_id += 1
        self._items.append(item)
        self._changed()
        return item

    def get(self, item_id: int) -> QueuedMessage | None:
        return next((item for item in self._items if item.id == item_id), None)

    def edit(self, item_id: int, text: str) -> bool:
        """Replace a queued message's text (empty text drops it); False if it is gone."""
        item = self.get(item_id)
        if item is None:
            return False
        if not text.strip():
            return self.drop(item_id)
        item.text = text
        self._changed()
        return True

    def drop(self, item_id: int) -> bool:
        item = self.get(item_id)
        if item is None:
            return False
        self._items.remove(item)
        self._changed()
        return True

    def take(self, item_id: int) -> QueuedMessage | None:
        """Remove and return one message (to edit it in the input)."""
        item = self.get(item_id)
        if item is not None:
            self._items.remove(item)
            self._changed()
        return item

    def take_last(self) -> QueuedMessage | None:
        return self.take(self._items[-1].id) if self._items else None

    def take_all(self) -> list[QueuedMessage]:
        items, self._items = self._items, []
        if items:
            self._changed()
        return items

    def next(self) -> QueuedMessage | None:
        """The oldest message, removed: the next turn to run."""
        if not self._items:
            return None
        item = self._items.pop(0)
        self._changed()
        return item

    def take_steering(self) -> list[QueuedMessage]:
        """The messages at the head that are not slash commands (stopping at the first slash
        command, so the operator's order is kept), removed."""
        taken: list[QueuedMessage] = []
        while self._items and not self._items[0].slash:
            taken.append(self._items.pop(0))
        if taken:
            self._changed()
        return taken


def steering_blocks(
    queue: OperatorQueue | None, deliver: Callable[[str], str]
) -> list[BetaTextBlockParam]:
    """Text blocks for the messages the operator queued while Claude worked, to append after the
    tool results of the next user message. ``deliver`` records one message as delivered (emit,
    audit) and returns the text Claude may see (scrubbed)."""
    if queue is None:
        return []
    return [
        {"type": "text", "text": f"{STEERING_NOTE}\n{deliver(item.text)}"}
        for item in queue.take_steering()
    ]
