"""The console's own lines in the audit log: how a session stopped, errors it survived.

The breakglass agent writes the incident's record (``core.audit``); the app writes what only it
knows — a signal or a closed tab and how the stop went (a kill that was not confirmed before the
hard deadline), an unexpected error it recovered from, a message it queued — to the same
``<state_dir>/audit.jsonl``, with the same session id and operator, scrubbed the same way. Writing
never raises: a full disk must not turn a record into a crash.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from breakglass_tui.core.audit import JsonLines, audit_log
from breakglass_tui.core.scrub import Scrubber


class UiRecord:
    """Append-only audit lines of one tab; opened once the state dir is known."""

    def __init__(self, session_id: str, options: Any) -> None:
        self.session_id = session_id
        self.operator = ""
        self._log: JsonLines | None = None
        self._state_dir: Path | None = None
        settings = getattr(options, "settings", None)
        if settings is not None:
            self.open(Path(settings.state_dir), settings.operator)

    @property
    def state_dir(self) -> Path | None:
        return self._state_dir

    def open(self, state_dir: Path, operator: str) -> None:
        """Start writing to ``state_dir``'s audit log (again, if the operator's name changed)."""
        if self._log is not None and state_dir == self._state_dir and operator == self.operator:
            return
        self.close()
        self._state_dir, self.operator = state_dir, operator
        scrubber = Scrubber([os.environ.get("ANTHROPIC_API_KEY")])
        with contextlib.suppress(OSError):
            self._log = audit_log(
                state_dir, scrubber, session_id=self.session_id, operator=operator
            )

    def write(self, kind: str, **fields: Any) -> bool:
        """Append one record; False when it could not be written (no state dir, disk full)."""
        if self._log is None:
            return False
        try:
            self._log.write(kind, **fields)
        except (OSError, ValueError, TypeError):
            return False
        return True

    def close(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
