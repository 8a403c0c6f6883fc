"""The agent-side bound on mutating verbs: a few per operator message, more only by approval.

ADR 0001 chose autonomy over a human-confirm gate, with the PVE host's budget and cooldown as the
hard limit. Host text can try to steer the model (core.fence keeps it fenced and the prompt says
it is evidence), so the breakglass agent adds a bound of its own below the host's: Claude may run
at most ``limit`` mutating verbs (``reset stop start cycle``) per operator message
(``BREAKGLASS_MAX_MUTATING_VERBS_PER_MESSAGE``, default 2). A further one waits for the driving
operator's one-key approval (``VerbApprovalAsked``; the console asks, Ctrl+Y runs it). Without an
approval — refused, no answer within ``timeout_s``, or the turn stopped — it is not run, and the
model is told so in its tool result. Every question and answer is audited. The host's budget and
cooldown still apply to an approved verb.

Counting restarts at each operator message (a message typed, or one delivered between Claude's
steps). The operator's own slash commands (``/reset`` …) are the operator's decision and are not
counted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from breakglass_tui.core.events import Event, VerbApprovalAsked, VerbApprovalEnded
from breakglass_tui.hosts.types import MUTATING_VERBS

APPROVED = "approved"
REFUSED = "refused"
NO_ANSWER = "no answer"
CANCELLED = "cancelled"
SETTING = "BREAKGLASS_MAX_MUTATING_VERBS_PER_MESSAGE"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class VerbGate:
    """Counts Claude's mutating verbs for the current operator message and asks the operator
    past the limit. One per breakglass agent; used from the agent's event loop."""

    def __init__(
        self,
        *,
        limit: int,
        timeout_s: float,
        emit: Callable[[Event], None],
        audit: Callable[..., None],
    ) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self._emit = emit
        self._audit = audit
        self.used = 0
        self._pending: dict[str, asyncio.Future[bool]] = {}

    def new_operator_message(self) -> None:
        """An operator message arrived: Claude may run ``limit`` mutating verbs again."""
        self.used = 0

    @property
    def waiting(self) -> tuple[str, ...]:
        """The ids of the questions waiting for the operator."""
        return tuple(self._pending)

    async def admit(self, call_id: str, tool: str, tool_input: dict[str, Any]) -> str | None:
        """Whether Claude's tool call may run: None to run it (a mutating verb is counted), or
        the tool result's text saying why it was not run. Past the limit this waits for the
        operator's answer (at most ``timeout_s``); cancelling it (the operator's Esc, the tab
        closing) ends the question unanswered and raises CancelledError."""
        verb = tool_input.get("verb")
        if tool != "pve_verb" or verb not in MUTATING_VERBS:
            return None
        if self.used < self.limit:
            self.used += 1
            return None
        nth = self.used + 1
        request_id = uuid.uuid4().hex[:12]
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._emit(
            VerbApprovalAsked(
                request_id=request_id,
                call_id=call_id,
                verb=verb,
                nth=nth,
                limit=self.limit,
                timeout_s=self.timeout_s,
            )
        )
        self._audit(
            "verb_approval_asked",
            request_id=request_id,
            call_id=call_id,
            verb=verb,
            nth=nth,
            limit=self.limit,
            timeout_s=self.timeout_s,
        )
        outcome = NO_ANSWER
        try:
            async with asyncio.timeout(self.timeout_s):
                outcome = APPROVED if await future else REFUSED
        except TimeoutError:
            outcome = NO_ANSWER
        except asyncio.CancelledError:
            outcome = CANCELLED
            raise
        finally:
            self._pending.pop(request_id, None)
            self._emit(VerbApprovalEnded(request_id=request_id, verb=verb, outcome=outcome))
            self._audit(
                "verb_approval", request_id=request_id, call_id=call_id, verb=verb, outcome=outcome
            )
        if outcome == APPROVED:
            self.used += 1
            return None
        why = (
            "the operator refused it"
            if outcome == REFUSED
            else f"the operator did not approve it within {self.timeout_s:g} s"
        )
        return (
            f"Not run: {verb} would be the {_ordinal(nth)} mutating verb for this operator message"
            f" (the limit is {self.limit}, {SETTING}), and {why}. Nothing was done on the PVE"
            " host. Tell the operator what you want to do and why, and wait for their word."
        )

    def answer(self, request_id: str, approved: bool) -> bool:
        """The driving operator's answer to a question (from the console); False when it is no
        longer waiting (answered, timed out or cancelled)."""
        future = self._pending.get(request_id)
        if future is None or future.done():
            return False
        future.set_result(bool(approved))
        return True
