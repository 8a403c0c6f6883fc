"""An unexpected exception is never the end of the session.

Textual ends the app on any exception that escapes a message handler, and the message pump that
raised stops processing. The console is opened on the worst day: an error in one handler (a bug,
or outside text no one foresaw) must be recorded, shown, and survived. :class:`Guarded` is mixed
into the app, its screens and its own widgets; an exception in one of their handlers goes to
``BreakglassApp.report_error`` (the audit, an error notice) and the pump goes on. Exceptions that
reach Textual by another way (a stock widget's handler, a timer) meet the app's
``_handle_exception``, which does the same.
"""

from __future__ import annotations

from typing import Any


class Guarded:
    """Mixin for a Textual MessagePump: report an exception in a handler instead of dying."""

    async def _dispatch_message(self, message: Any) -> None:
        try:
            await super()._dispatch_message(message)  # type: ignore[misc]
        except Exception as error:
            report = getattr(self.app, "report_error", None)  # type: ignore[attr-defined]
            where = f"{type(self).__name__} handling {type(message).__name__}"
            if report is None or not report(error, where):
                raise
