"""The session's records as the breakglass agent writes them: the audit log and the transcript
behind a writer whose failures (a full disk) never stop the rescue, and the scrubbing every event
gets once before any sink sees it."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from breakglass_tui.core.audit import JsonLines
from breakglass_tui.core.scrub import Scrubber


class Record(Protocol):
    """Where a part writes its audit records (``kind`` and fields, one JSON line)."""

    def write(self, kind: str, **fields: Any) -> None: ...


class SafeRecord:
    """The audit log or the transcript, whose write failures (disk full) never stop the rescue.

    The first failure is reported once (``on_failure``); later records are dropped while the
    disk stays full, and the next record that can be written is preceded by a count of the lost
    ones."""

    def __init__(
        self, log: JsonLines, name: str, on_failure: Callable[[str, OSError], None]
    ) -> None:
        self._log = log
        self.name = name
        self._on_failure = on_failure
        self.lost = 0
        self.failures = 0

    @property
    def path(self) -> Path:
        return self._log.path

    def write(self, kind: str, **fields: Any) -> None:
        try:
            if self.lost:
                self._log.write("records_lost", count=self.lost)
                self.lost = 0
            self._log.write(kind, **fields)
        except OSError as exc:
            self.lost += 1
            self.failures += 1
            if self.failures == 1:
                self._on_failure(self.name, exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._log.close()


T = TypeVar("T")


def scrub_event(scrubber: Scrubber, event: T) -> T:
    """``event`` with every string in it scrubbed (operator, model and host text can carry a
    key); the same object when nothing changed."""

    def scrub(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value
        if isinstance(value, str):
            return scrubber.text(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {}
            for f in dataclasses.fields(value):
                if not f.init:
                    continue
                old = getattr(value, f.name)
                new = scrub(old)
                if new is not old:
                    changes[f.name] = new
            return dataclasses.replace(value, **changes) if changes else value
        if isinstance(value, dict):
            items = {k: scrub(v) for k, v in value.items()}
            return value if all(items[k] is value[k] for k in value) else items
        if isinstance(value, list | tuple):
            seq = [scrub(v) for v in value]
            if all(a is b for a, b in zip(seq, value, strict=True)):
                return value
            return type(value)(seq) if isinstance(value, tuple) else seq
        return value

    scrubbed: T = scrub(event)
    return scrubbed
