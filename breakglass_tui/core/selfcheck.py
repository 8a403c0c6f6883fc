"""The self-check: every link of the rescue path tried, timed on its own, without touching the VM.

A break-glass path that is never exercised rots (a Vault policy edited, a key rotated on one side,
a PVE host reinstalled, the API key revoked). ``breakglass-serve`` runs this on a schedule
(:func:`run_schedule`), at start and on ``/selfcheck``; ``--check`` runs it once.

The links, in the order the rescue needs them (:data:`LINKS`): Vault (the keys), the PVE host
(the forced command's ``status`` verb), the devvm (the probe and ``sudo -n true``), the Messages
API (the key and the model) and, optionally, the serving path (the public URL through the
ingress). Each link's check is a plain coroutine given by the wiring (the hosts layer does the
I/O); this module runs them at once, each under its own deadline, and keeps per link the status,
the latency, the last success and since when it is broken. A link the setup does not have (the lab
has no Vault) is **not used**, never a failure. A state change is what gets audited
(:attr:`SelfCheck.run` returns the changes), not every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("breakglass.selfcheck")

LINKS: tuple[str, ...] = ("vault", "pve", "devvm", "api", "serving")
LINK_TITLES: dict[str, str] = {
    "vault": "Vault",
    "pve": "PVE host",
    "devvm": "devvm",
    "api": "Messages API",
    "serving": "serving path",
}
DEFAULT_TIMEOUT_S = 20.0
MAX_MESSAGE = 500
# A link's sentence can carry a host's words (a verb's message, sudo's stderr): it reaches a
# terminal (--check), the header, the chat and the audit, so no escape sequence, control or
# BiDi character survives, and no newline.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
# The files breakglass-serve shares with its tabs' app processes (in the state dir): the latest
# results, and a request for a run now (/selfcheck in a tab).
STATUS_FILE = "selfcheck/status.json"
REQUEST_FILE = "selfcheck/request"


class LinkStatus(enum.StrEnum):
    OK = "ok"
    BROKEN = "broken"
    NOT_USED = "not_used"  # the setup has no such link (the lab's Vault, the API without a key)


@dataclass(frozen=True)
class Outcome:
    """What one link's check found: its status and one sentence (what works, or what broke and
    the next step)."""

    status: LinkStatus
    message: str
    # Something the run did that the audit must record even without a change of status
    # ("keys_reloaded": the keys changed in Vault and were reloaded).
    event: str | None = None

    @classmethod
    def of(cls, ok: bool, message: str, event: str | None = None) -> Outcome:
        return cls(LinkStatus.OK if ok else LinkStatus.BROKEN, message, event)


Check = Callable[[], Awaitable[Outcome]]


def plain(text: str) -> str:
    """One line of outside text made safe to show anywhere (see _UNSAFE), at most MAX_MESSAGE."""
    text = _ESCAPES.sub("", str(text)).replace("\n", " ").replace("\t", " ")
    return _UNSAFE.sub("\ufffd", text)[:MAX_MESSAGE]


def not_used(reason: str) -> Check:
    """A check for a link this setup does not have."""

    async def check() -> Outcome:
        return Outcome(LinkStatus.NOT_USED, reason)

    return check


@dataclass
class LinkState:
    """One link as last checked."""

    link: str
    status: LinkStatus | None = None  # None: not checked yet
    message: str = "not checked yet"
    latency_s: float | None = None
    checked_at: float | None = None
    last_success: float | None = None
    broken_since: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "link": self.link,
            "title": LINK_TITLES.get(self.link, self.link),
            "status": self.status.value if self.status else "unknown",
            "message": self.message,
            "latency_s": None if self.latency_s is None else round(self.latency_s, 4),
            "checked_at": self.checked_at,
            "last_success": self.last_success,
            "broken_since": self.broken_since,
        }


@dataclass(frozen=True)
class Change:
    """A link whose status changed in a run, or whose check did something to record (what the
    audit records)."""

    link: str
    before: LinkStatus | None
    after: LinkStatus
    message: str
    event: str | None = None


@dataclass
class SelfCheck:
    """The links' checks and their last results. :meth:`run` checks every link at once."""

    checks: Mapping[str, Check]
    timeout_s: float = DEFAULT_TIMEOUT_S
    clock: Callable[[], float] = time.time
    links: dict[str, LinkState] = field(default_factory=dict)
    last_run: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.checks) - set(LINKS)
        if unknown:
            raise ValueError(f"unknown self-check links: {sorted(unknown)}")
        for link in self.ordered():
            self.links.setdefault(link, LinkState(link))

    def ordered(self) -> list[str]:
        return [link for link in LINKS if link in self.checks]

    async def run(self) -> list[Change]:
        """Check every link (at once, each under its own deadline) and return the links whose
        status changed. Never raises for a link's failure: it is that link's broken result.
        Two callers at once share one run's lock: the second runs after the first."""
        async with self._lock:
            links = self.ordered()
            outcomes = await asyncio.gather(*(self._one(link) for link in links))
            changes: list[Change] = []
            for link, (outcome, latency, at) in zip(links, outcomes, strict=True):
                state = self.links[link]
                before = state.status
                state.status, state.message = outcome.status, outcome.message
                state.latency_s, state.checked_at = latency, at
                if outcome.status is LinkStatus.OK:
                    state.last_success, state.broken_since = at, None
                elif outcome.status is LinkStatus.BROKEN:
                    if state.broken_since is None:
                        state.broken_since = at
                else:
                    state.broken_since = None
                if before is not outcome.status or outcome.event:
                    changes.append(
                        Change(link, before, outcome.status, outcome.message, outcome.event)
                    )
            self.last_run = self.clock()
            return changes

    async def _one(self, link: str) -> tuple[Outcome, float, float]:
        at = self.clock()
        started = time.monotonic()
        try:
            outcome = await asyncio.wait_for(self.checks[link](), self.timeout_s)
        except TimeoutError:
            outcome = Outcome(
                LinkStatus.BROKEN,
                f"no answer within {self.timeout_s:g}s (BREAKGLASS_SELFCHECK_TIMEOUT_S)",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a check's own bug must not hide the other links
            log.warning("self-check of %s failed: %s", link, type(exc).__name__)
            outcome = Outcome(
                LinkStatus.BROKEN,
                f"the check itself failed ({type(exc).__name__}): see breakglass-serve's log",
            )
        outcome = Outcome(outcome.status, plain(outcome.message), outcome.event)
        return outcome, time.monotonic() - started, at

    @property
    def ok(self) -> bool:
        """No link is broken (not-used links do not count; unchecked ones do not either)."""
        return all(s.status is not LinkStatus.BROKEN for s in self.links.values())

    def snapshot(self) -> dict[str, Any]:
        """What ``/checks`` serves and the tabs read: every link's status, latency and last
        success."""
        return {
            "ok": self.ok,
            "checked_at": self.last_run,
            "links": [self.links[link].as_dict() for link in self.ordered()],
        }


# -- how it reads -------------------------------------------------------------------------------


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M", time.gmtime(at)) if at else "?"


def summary(snapshot: Mapping[str, Any]) -> tuple[str, bool | None]:
    """The header's words for a snapshot, and whether all is well (None: not checked yet):
    "rescue path: all links OK, checked 12:05" or the broken link with the time it broke."""
    links = [link for link in snapshot.get("links") or [] if isinstance(link, Mapping)]
    if not snapshot.get("checked_at") or not links:
        return "rescue path: not checked yet", None
    broken = [link for link in links if link.get("status") == LinkStatus.BROKEN.value]
    if not broken:
        return f"rescue path: all links OK, checked {_clock(snapshot['checked_at'])}", True
    first = broken[0]
    title = str(first.get("title") or first.get("link"))
    more = f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""
    return (
        f"rescue path: {title} BROKEN since {_clock(first.get('broken_since'))}{more},"
        f" checked {_clock(snapshot['checked_at'])}",
        False,
    )


def report_lines(snapshot: Mapping[str, Any]) -> list[str]:
    """One line per link, for ``--check`` and the chat: status, link, latency, the sentence."""
    lines = []
    for link in snapshot.get("links") or []:
        status = {"ok": "OK", "broken": "BROKEN", "not_used": "not used"}.get(
            str(link.get("status")), str(link.get("status"))
        )
        latency = link.get("latency_s")
        took = f"{latency:6.2f}s" if isinstance(latency, int | float) else "      "
        title = link.get("title", link.get("link"))
        lines.append(f"{status:<8} {title:<13} {took}  {link['message']}")
    return lines


# -- what breakglass-serve and its tabs share ---------------------------------------------------


def write_status(state_dir: Path, snapshot: Mapping[str, Any]) -> None:
    """Write the snapshot for the tabs (atomically: a tab never reads half a file)."""
    path = state_dir / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot))
    tmp.replace(path)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The latest snapshot breakglass-serve wrote, or None."""
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads((state_dir / STATUS_FILE).read_text())
        if isinstance(doc, dict):
            return doc
    return None


def request_run(state_dir: Path) -> float:
    """Ask breakglass-serve for a run now (``/selfcheck`` in a tab); returns the request's
    time."""
    path = state_dir / REQUEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = time.time()
    path.write_text(str(now))
    return now


def take_request(state_dir: Path) -> bool:
    """Whether a tab asked for a run (the request is consumed)."""
    path = state_dir / REQUEST_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


# -- the schedule -------------------------------------------------------------------------------


def next_delay(interval_s: float, jitter: float, rng: random.Random | None = None) -> float:
    """The wait before the next run: the interval, give or take ``jitter`` of it (so checks of
    several pods, or of one pod and its CronJob, do not fall on the same second)."""
    spread = interval_s * max(0.0, min(jitter, 0.5))
    rand = rng.uniform(-spread, spread) if rng else random.uniform(-spread, spread)  # noqa: S311
    return max(1.0, interval_s + rand)


async def run_schedule(
    selfcheck: SelfCheck,
    *,
    interval_s: float,
    jitter: float,
    on_run: Callable[[list[Change]], Any],
    wake: asyncio.Event,
    poll_request: Callable[[], bool] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Run at once, then every ``interval_s`` (jittered), and whenever ``wake`` is set or
    ``poll_request`` says a tab asked. ``on_run`` gets each run's changes. Runs until
    cancelled."""
    while True:
        try:
            changes = await selfcheck.run()
            result = on_run(changes)
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the schedule must survive a bad run
            log.error("self-check run failed: %s", type(exc).__name__)
        deadline = time.monotonic() + next_delay(interval_s, jitter)
        wake.clear()
        while time.monotonic() < deadline:
            if poll_request is not None and poll_request():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(poll_s, deadline - time.monotonic()))
                break


def changed_links(changes: Iterable[Change]) -> list[dict[str, Any]]:
    """The audit's view of a run's changes."""
    return [
        {
            "link": c.link,
            "before": c.before.value if c.before else None,
            "after": c.after.value,
            "message": c.message,
            **({"event": c.event} if c.event else {}),
        }
        for c in changes
    ]
