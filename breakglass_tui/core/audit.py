"""The audit log and the incident transcript: JSON lines appended as things happen.

Audit: ``<state_dir>/audit.jsonl``, one line per event, shared by every session (each line carries
the session id and the operator). Transcript: ``<state_dir>/transcripts/<session_id>.jsonl``, the
same events plus one line per output pointing at its file (``transcripts/<session_id>/<id>.out``,
the whole output up to a 16 MiB cap, with byte counts and the sha256 of all of it). Both are
opened with ``O_APPEND`` and written with one ``os.write`` per line, so a crash loses nothing
already done and concurrent sessions do not interleave within a line. Nothing here ever goes to
stdout or stderr: in the app, those are the screen (and, under textual-serve, the wire to the
browser).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from breakglass_tui.core.scrub import Scrubber


class JsonLines:
    """An append-only JSON-lines file; every line is scrubbed of secrets before it is written."""

    def __init__(self, path: Path, scrubber: Scrubber, *, base: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._scrubber = scrubber
        self._base = base
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, kind: str, **fields: Any) -> None:
        """Append one record: ``{"ts", "kind", <base fields>, <fields>}``."""
        if self._fd is None:
            return
        record = {"ts": round(time.time(), 6), "kind": kind, **self._base, **fields}
        line = json.dumps(self._scrubber.value(record), ensure_ascii=False, default=str)
        # "replace": a lone surrogate (model JSON may carry one) must not lose the record.
        os.write(self._fd, (line + "\n").encode("utf-8", "replace"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def audit_log(state_dir: Path, scrubber: Scrubber, *, session_id: str, operator: str) -> JsonLines:
    """The shared audit log of every session, ``<state_dir>/audit.jsonl``."""
    return JsonLines(
        state_dir / "audit.jsonl", scrubber, base={"session_id": session_id, "operator": operator}
    )


def transcript(state_dir: Path, scrubber: Scrubber, *, session_id: str, operator: str) -> JsonLines:
    """The session's transcript, ``<state_dir>/transcripts/<id>.jsonl``; outputs live beside it."""
    return JsonLines(
        state_dir / "transcripts" / f"{session_id}.jsonl",
        scrubber,
        base={"session_id": session_id, "operator": operator},
    )
