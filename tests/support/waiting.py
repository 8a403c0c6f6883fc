"""Waiting on a condition, the one way the tests wait: poll it until it holds, fail naming it.

Never a fixed sleep in its place: a loaded CI machine is slower than any sleep guessed here, and a
fast one wastes it. The bounds are generous; a condition that holds returns at once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Pause = Callable[[float], Awaitable[Any]]


async def until(
    condition: Callable[[], Any],
    *,
    what: str = "the condition",
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    pause: Pause | None = None,
    diagnostics: Callable[[], str] | None = None,
) -> Any:
    """Poll ``condition`` (a plain or an async callable) until it returns something true, and
    return that. ``pause``: how to let time pass between polls (``pilot.pause`` lets a Textual
    app process its messages; default ``asyncio.sleep``). On timeout: AssertionError naming
    ``what``, with ``diagnostics()`` if given."""
    wait = pause or asyncio.sleep
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout_s, diagnostics))
        await wait(interval_s)


def until_sync(
    condition: Callable[[], Any],
    *,
    what: str = "the condition",
    timeout_s: float = 20.0,
    interval_s: float = 0.05,
    diagnostics: Callable[[], str] | None = None,
) -> Any:
    """:func:`until` for code without an event loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout_s, diagnostics))
        time.sleep(interval_s)


def written_json(path: Path) -> Any:
    """The JSON document at ``path`` once another process has written it whole, else None (a
    condition for :func:`until`: no file yet, or half of one)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _timed_out(what: str, timeout_s: float, diagnostics: Callable[[], str] | None) -> str:
    message = f"timed out after {timeout_s:g} s waiting for {what}"
    if diagnostics is not None:
        message += f"\n{diagnostics()}"
    return message
