"""One incident, many tabs: the incident's event journal, its driver lease, its saved context.

Under textual-serve each browser tab is its own process, and a closed tab ends its process. So the
incident lives on disk, in ``<state_dir>/incidents/<incident id>/``:

- ``events.jsonl`` — every event the breakglass agent emitted, as it happened. A second tab follows
  it live (read-only); a reopened tab replays it to restore the chat, outputs and bundles.
- ``conversation.json`` — the model's context (the Messages API conversation), saved after each
  step, so a reopened tab rebuilds the agent where the closed one left it.
- ``driver.json`` — which session drives (runs the agent and verbs) and since when. Only the
  driver acts; the others watch. Taking over is explicit, and the former driver sees it on its
  next check and becomes read-only. A driver whose process is gone holds nothing.

``<state_dir>/incidents/current`` names the open incident. Closing it (``/close``, or the operator
starting afresh) and opening the next one happen under one lock, and a new incident is claimed by
the session that opens it in the same step: an open incident is never driverless for a moment in
which another tab could judge it abandoned.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from breakglass_tui.core import events as ev

# The journal's codec is the events' own (one codec for the journal and the transcript).
EVENT_TYPES = ev.EVENT_TYPES
event_to_json = ev.to_json
event_from_json = ev.from_json

# The journal key naming the session that wrote a line (not an event field).
BY_KEY = "_by"

# Live output is journaled so followers see it, but one call's share is capped: a 10 MB output
# must not make every follower and every resume replay 10 MB. The transcript keeps it whole.
MAX_JOURNALED_OUTPUT_PER_CALL = 256 * 1024


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, held while the block runs (``flock`` on ``path``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Driver:
    """Who drives the incident."""

    session_id: str
    operator: str
    since: float
    pid: int

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class Incident:
    """One incident's directory. Safe to use from several processes at once."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.id = directory.name
        self.events_path = directory / "events.jsonl"
        self._journaled: dict[str, int] = {}

    # -- the event journal ----------------------------------------------------------------------
    def append_event(self, event: ev.Event, *, by: str | None = None) -> None:
        """Journal one event (one line, O_APPEND: whole lines even with several writers).

        ``by`` names the session that wrote it, so that session's own follower can skip what it
        has already shown."""
        if isinstance(event, ev.ToolOutput):
            used = self._journaled.get(event.call_id, 0)
            if used >= MAX_JOURNALED_OUTPUT_PER_CALL:
                return
            self._journaled[event.call_id] = used + len(event.chunk.text)
        doc = event_to_json(event)
        if by is not None:
            doc[BY_KEY] = by
        line = json.dumps(doc, ensure_ascii=False) + "\n"
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # "replace": a lone surrogate (model JSON may carry one) is never valid UTF-8 text.
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)

    def read_events(self) -> list[ev.Event]:
        """Every journaled event, in order (a torn last line is skipped)."""
        return [e for e, _, _ in self._iter_from(0)]

    def _iter_from(self, offset: int) -> Iterator[tuple[ev.Event, int, str | None]]:
        try:
            f = self.events_path.open("rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    return  # a line still being written
                offset += len(raw)
                try:
                    doc = json.loads(raw)
                    event = event_from_json(doc)
                except (ValueError, TypeError, AttributeError):
                    continue
                if event is not None:
                    by = doc.get(BY_KEY)
                    yield event, offset, by if isinstance(by, str) else None

    def replay(self, *, skip_by: str | None = None) -> tuple[list[ev.Event], int]:
        """Every journaled event so far (but those written ``by`` the session ``skip_by``: a
        tab's own, already shown), and the offset to :meth:`follow` on from."""
        events: list[ev.Event] = []
        offset = 0
        for event, end, by in self._iter_from(0):
            if skip_by is None or by != skip_by:
                events.append(event)
            offset = end
        return events, offset

    async def follow(
        self,
        *,
        poll_s: float = 0.2,
        skip_by: str | None = None,
        offset: int = 0,
    ) -> AsyncIterator[ev.Event]:
        """Yield journaled events as they are written, until cancelled; those written ``by``
        the session ``skip_by`` (a tab's own, already shown) are left out. ``offset`` (from
        :meth:`replay`) starts right after what was replayed; 0, from the start."""
        while True:
            for event, next_offset, by in self._iter_from(offset):
                offset = next_offset
                if skip_by is None or by != skip_by:
                    yield event
            await asyncio.sleep(poll_s)

    # -- the model's context --------------------------------------------------------------------
    def save_conversation(self, messages: list[dict[str, Any]]) -> None:
        tmp = self.dir / f".conversation.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(messages, ensure_ascii=False))
        tmp.replace(self.dir / "conversation.json")

    def load_conversation(self) -> list[dict[str, Any]]:
        try:
            loaded: list[dict[str, Any]] = json.loads((self.dir / "conversation.json").read_text())
            return loaded
        except FileNotFoundError:
            return []

    # -- the driver lease -------------------------------------------------------------------------
    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _flocked(self.dir / "driver.lock")

    def driver(self) -> Driver | None:
        """The session that drives now, or None if nobody (alive) does."""
        try:
            doc = json.loads((self.dir / "driver.json").read_text())
            current = Driver(**doc)
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return current if current.alive() else None

    def claim(self, session_id: str, operator: str, *, take_over: bool = False) -> Driver:
        """Become the driver if nobody drives (or ``take_over``); return who drives now. The
        driver claiming again keeps its ``since`` and records ``operator`` when one is given
        (a tab learns its operator's name only once its backend is up)."""
        with self._locked():
            current = self.driver()
            if current is not None and current.session_id != session_id and not take_over:
                return current
            me = Driver(session_id, operator, time.time(), os.getpid())
            if current is not None and current.session_id == session_id:
                me = dataclasses.replace(current, operator=operator or current.operator)
                if me == current:
                    return current
            tmp = self.dir / f".driver.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(dataclasses.asdict(me)))
            tmp.replace(self.dir / "driver.json")
            return me

    def release(self, session_id: str) -> None:
        with self._locked():
            current = self.driver()
            if current is not None and current.session_id == session_id:
                (self.dir / "driver.json").unlink(missing_ok=True)


class IncidentStore:
    """The incidents under a state directory, and which one is open."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "incidents"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return _flocked(self.root / ".lock")

    def current_or_new(
        self, session_id: str, operator: str, *, opening_check: tuple[str, ...] = ()
    ) -> tuple[Incident, bool]:
        """The open incident, or a new one driven by ``session_id``; True when it is new.

        Atomic across processes: two tabs opened at once join one incident rather than each
        starting one, and a new incident is claimed before the lock is let go, so it is never
        seen without a driver. An open incident nobody drives in which nothing happened beyond
        the tabs' ``opening_check`` is not worth resuming: it is closed and replaced, under the
        same lock."""
        with self._locked():
            current = self.current()
            if current is not None and (
                current.driver() is not None or worth_resuming(current.read_events(), opening_check)
            ):
                return current, False
            if current is not None:
                self._close_current()
            return self._open_claimed(session_id, operator), True

    def claim(
        self, incident: Incident, session_id: str, operator: str, *, take_over: bool = False
    ) -> Driver | None:
        """:meth:`Incident.claim` on ``incident`` if it is still the open incident; None if it
        was closed meanwhile (its lease is worth nothing then)."""
        with self._locked():
            if not self._is_current(incident):
                return None
            return incident.claim(session_id, operator, take_over=take_over)

    def replace(
        self, incident: Incident, session_id: str, operator: str
    ) -> tuple[Incident, Driver | None]:
        """Close ``incident`` and open the next one, driven by ``session_id`` (``/close``, or
        "start a new incident"); one step under the lock. If another tab drives ``incident``
        now (it answered "resume" first), or it was already closed and another tab opened the
        next one, that one is joined instead (driven if nobody does); returns the incident
        joined and who drives it."""
        with self._locked():
            driver = incident.driver()
            if self._is_current(incident) and (driver is None or driver.session_id == session_id):
                self._close_current()
            current = self.current()
            if current is None:
                new = self._open_claimed(session_id, operator)
                return new, new.driver()
            return current, current.claim(session_id, operator)

    def current(self) -> Incident | None:
        """The open incident, if any."""
        try:
            incident_id = (self.root / "current").read_text().strip()
        except FileNotFoundError:
            return None
        directory = self.root / incident_id
        if not incident_id or not directory.is_dir():
            return None
        return Incident(directory)

    def _is_current(self, incident: Incident) -> bool:
        current = self.current()
        return current is not None and current.id == incident.id

    def _open_claimed(self, session_id: str, operator: str) -> Incident:
        incident = self.open_new()
        incident.claim(session_id, operator)
        return incident

    def open_new(self) -> Incident:
        """Start a new incident and make it the open one (nobody drives it yet: tabs use
        :meth:`current_or_new` or :meth:`replace`, which claim it at once)."""
        incident_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        directory = self.root / incident_id
        directory.mkdir(mode=0o700)
        (directory / "events.jsonl").touch(mode=0o600)
        tmp = self.root / f".current.{os.getpid()}.tmp"
        tmp.write_text(incident_id)
        tmp.replace(self.root / "current")
        return Incident(directory)

    def _close_current(self) -> None:
        (self.root / "current").unlink(missing_ok=True)


@dataclass(frozen=True)
class IncidentSummary:
    """What a reopened tab says about the open incident before offering to resume it."""

    started_at: float | None
    operator: str | None
    events: int
    last: str | None


def summarize(events: list[ev.Event], incident_id: str | None = None) -> IncidentSummary:
    """Who started the incident and when (its id's timestamp, else the first event's), how
    many events, and the last notable one."""
    started_at: float | None = None
    if incident_id:
        with contextlib.suppress(ValueError):
            started_at = float(calendar.timegm(time.strptime(incident_id[:16], "%Y%m%dT%H%M%SZ")))
    operator = last = None
    for event in events:
        if isinstance(event, ev.SessionStarted) and operator is None:
            operator = event.operator
        started_at = started_at if started_at is not None else event.at
        last = describe_event(event) or last
    return IncidentSummary(started_at, operator, len(events), last)


def worth_resuming(events: list[ev.Event], opening_check: tuple[str, ...] = ()) -> bool:
    """Did anything happen beyond a tab's automatic opening check (``opening_check``: the
    commands a tab runs by itself, e.g. ``/probe``, ``/status``)? Every action starts with an
    operator message, so an incident without another one holds nothing to resume."""
    return any(
        isinstance(event, ev.OperatorMessage) and event.text.strip() not in opening_check
        for event in events
    )


def unfinished_calls(events: list[ev.Event]) -> list[ev.ToolCallStarted]:
    """Tool calls the journal shows started and never ended (their tab closed mid-call)."""
    open_calls: dict[str, ev.ToolCallStarted] = {}
    for event in events:
        if isinstance(event, ev.ToolCallStarted):
            open_calls[event.call_id] = event
        elif isinstance(event, ev.ToolCallEnded):
            open_calls.pop(event.call_id, None)
    return list(open_calls.values())


def describe_event(event: ev.Event) -> str | None:
    """One short line for an event worth naming as "last", else None."""
    match event:
        case ev.OperatorMessage():
            return f"operator: {_short(event.text)}"
        case ev.ToolCallEnded():
            return f"{event.tool}: {_short(event.summary)}"
        case ev.VerbCompleted():
            state = event.result.state_after or event.result.state_before or "state unknown"
            return f"verb {event.result.verb}: {state}"
        case ev.ReportReady():
            return f"report {event.filename}"
        case ev.Notice() if event.level != "info":
            return _short(event.text)
    return None


def _short(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
