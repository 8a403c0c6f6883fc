"""One tab's part in an incident, without a screen: which incident it shows, whether it drives,
and what changes that — opening or resuming, the driver lease's check, take-over, close and the
next incident, and the calls a closed tab left open.

:class:`TabSession` takes the operator's intents (:meth:`open`, :meth:`take_over`,
:meth:`close`) and the lease's clock (:meth:`check`) and answers each with what changed (the
``Tab*`` outcomes below), which the app renders; it never imports Textual. The incident files are
read and written off the event loop (``asyncio.to_thread``): they take a lock another tab's
process may hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import (
    Driver,
    Incident,
    IncidentStore,
    IncidentSummary,
    summarize,
    unfinished_calls,
    worth_resuming,
)

INTERRUPTED = "interrupted: the tab running it closed"


def clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def who(driver: Driver) -> str:
    """The driver's operator, or a stand-in while its tab does not know the name yet."""
    return driver.operator or "another tab"


# -- what changed (the app renders each) ----------------------------------------------------------


@dataclass(frozen=True)
class Following:
    """The tab shows ``incident`` now, driving it or read-only as ``driver`` says."""

    incident: Incident
    driver: Driver | None
    driving: bool
    closed: Incident | None = None  # the incident it followed before, closed by its driver


@dataclass(frozen=True)
class LostLease:
    """Another tab took over: stop the running turn, drop the agent, go read-only."""

    driver: Driver


@dataclass(frozen=True)
class DriverSeen:
    """A read-only tab's view of who drives now (None: nobody)."""

    driver: Driver | None


@dataclass(frozen=True)
class TookOver:
    before: Driver | None
    driver: Driver


@dataclass(frozen=True)
class Refused:
    """An intent that changed nothing, and why (for the operator)."""

    reason: str
    level: str = "info"


@dataclass(frozen=True)
class Closed:
    """/close: ``closed`` is over; this tab drives ``following.incident`` (fresh context)."""

    closed: Incident
    following: Following


TabChange = Following | LostLease | DriverSeen | TookOver | Refused | Closed


class TabSession:
    """One tab's incident and lease. ``operator`` says who this tab's operator is now (it may
    be known only once the backend is up); ``ask_resume`` asks whether to resume an incident
    nobody drives (the app's question screen)."""

    def __init__(
        self,
        store: IncidentStore,
        session_id: str,
        *,
        operator: Callable[[], str],
        opening_check: tuple[str, ...] = (),
        ask_resume: Callable[[IncidentSummary], Awaitable[bool]] | None = None,
        journal: Callable[[Incident, ev.Event], None] | None = None,
    ) -> None:
        self.store = store
        # How this tab writes to a journal (the app's says once when it cannot).
        self.journal = journal or (
            lambda incident, event: incident.append_event(event, by=session_id)
        )
        self.session_id = session_id
        self._operator = operator
        self.opening_check = opening_check
        self._ask_resume = ask_resume
        self.incident: Incident | None = None
        # None until the tab knows; then True while it drives the incident, False read-only.
        self.driving: bool | None = None

    # -- intents --------------------------------------------------------------------------------

    async def open(self) -> Following:
        """Join the open incident (offering to resume it when nobody drives it) or open a new
        one, driven by this tab. An incident in which nothing happened beyond the opening check
        is not worth a question: the store closes it and opens a new one, which this tab drives
        from the same step."""
        store = self.store
        while True:
            incident, new = await asyncio.to_thread(
                store.current_or_new,
                self.session_id,
                self._operator(),
                opening_check=self.opening_check,
            )
            driver = await asyncio.to_thread(incident.driver)
            if new:
                break
            if driver is None:
                events = await asyncio.to_thread(incident.read_events)
                resume = False
                if worth_resuming(events, self.opening_check) and self._ask_resume is not None:
                    resume = await self._ask_resume(summarize(events, incident.id))
                if not resume:
                    incident, driver = await asyncio.to_thread(
                        store.replace, incident, self.session_id, self._operator()
                    )
                    break
            claimed = await asyncio.to_thread(
                store.claim, incident, self.session_id, self._operator()
            )
            if claimed is not None:
                driver = claimed
                break
            # Closed meanwhile (its driver ran /close): join the next one.
        return self._follow(incident, driver)

    async def take_over(self) -> TabChange:
        """Drive the incident from this tab; the driving tab sees it on its next check."""
        incident = self.incident
        if incident is None or self.driving:
            return Refused("This tab already drives the incident.")
        before = await asyncio.to_thread(incident.driver)
        driver = await asyncio.to_thread(
            self.store.claim, incident, self.session_id, self._operator(), take_over=True
        )
        if driver is None:
            # Closed meanwhile: its lease is worth nothing, and the closing tab drives the next.
            current = await asyncio.to_thread(self.store.current)
            if current is None:
                return Refused(
                    "The incident was closed: reopen the tab to start the next one.", "warning"
                )
            return await self._follow_next(incident, current)
        self._set(incident, driver)
        # Others see it in their chat; the former driver also says it itself on its next check.
        took = f"{who(driver)} took over at {clock(driver.since)}."
        self.journal(incident, ev.Notice(level="warning", text=took))
        return TookOver(before, driver)

    async def close(self) -> TabChange:
        """/close: the incident is over; this tab drives the next one at once, and the
        read-only tabs follow it there (they see the notice this writes to the journal)."""
        incident = self.incident
        if incident is None:
            return Refused("No incident is kept in this session.", "warning")
        operator = self._operator()
        notice = ev.Notice(
            level="warning",
            text=f"Incident closed by {operator or 'the driving tab'} at {clock(time.time())};"
            " the tab that closed it drives the next one.",
        )
        self.journal(incident, notice)
        new, driver = await asyncio.to_thread(
            self.store.replace, incident, self.session_id, operator
        )
        await asyncio.to_thread(incident.release, self.session_id)
        return Closed(incident, self._follow(new, driver))

    async def check(self) -> TabChange | None:
        """The lease's clock (every second): a driver that was taken over stops; a read-only
        tab sees who drives, and goes on with the next incident when its own was closed."""
        incident = self.incident
        if incident is None:
            return None
        if not self.driving:
            current = await asyncio.to_thread(self.store.current)
            if current is not None and current.id != incident.id:
                return await self._follow_next(incident, current)
        driver = await asyncio.to_thread(incident.driver)
        if not self.driving:
            return DriverSeen(driver)
        if driver is None:  # our lease is gone (its file removed): hold it again
            driver = await asyncio.to_thread(
                self.store.claim, incident, self.session_id, self._operator()
            )
            if driver is None:  # closed: only this tab's /close does that, which moved on
                return None
        if driver.session_id != self.session_id:
            self._set(incident, driver)
            return LostLease(driver)
        return None

    async def confirm_operator(self) -> None:
        """The lease was claimed before the operator's name was known: record it (the other
        tabs' headers say who drives)."""
        if self.driving and self.incident is not None:
            await asyncio.to_thread(self.incident.claim, self.session_id, self._operator())

    def end(self) -> None:
        """The tab is closing: it drives no more (a tab reopened at once may drive straight
        away; this one's context is no longer saved)."""
        self.driving = False

    def forget(self) -> None:
        """The tab is closed: it shows no incident (nothing more is journaled from it)."""
        self.incident = None

    def release(self) -> None:
        """Give up the lease of this tab's incident, and of the store's open one, if this tab
        holds it (releasing one someone else holds does nothing). Blocking: call it in a
        thread, or where the loop may be stuck (the hard deadline)."""
        for incident in (self.incident, self.store.current()):
            if incident is not None:
                incident.release(self.session_id)

    # -- the journal ----------------------------------------------------------------------------

    def interrupted(self, events: list[ev.Event]) -> list[ev.ToolCallEnded]:
        """For a driving tab: the calls the journal shows started and never ended died with
        their tab (nobody else drives; a PVE verb finished on the host anyway). Their ends, to
        journal and show, so a tab that joins later does not show them running forever."""
        if not self.driving:
            return []
        return [
            ev.ToolCallEnded(
                call_id=call.call_id, tool=call.tool, ok=False, summary=INTERRUPTED, duration_s=0.0
            )
            for call in unfinished_calls(events)
        ]

    def save_conversation(self, messages: list[dict[str, Any]]) -> None:
        """A tab that lost the lease must not overwrite the new driver's context."""
        if self.incident is not None and self.driving:
            self.incident.save_conversation(messages)

    # -- helpers ----------------------------------------------------------------------------------

    async def _follow_next(self, closed: Incident, incident: Incident) -> Following:
        driver = await asyncio.to_thread(incident.driver)
        following = self._follow(incident, driver)
        return Following(following.incident, following.driver, following.driving, closed=closed)

    def _follow(self, incident: Incident, driver: Driver | None) -> Following:
        self._set(incident, driver)
        return Following(incident, driver, bool(self.driving))

    def _set(self, incident: Incident, driver: Driver | None) -> None:
        self.incident = incident
        self.driving = driver is not None and driver.session_id == self.session_id
