"""Session ids: one per tab (and per terminal run), shared by the UI, the agent's audit lines and
transcripts, and the incident journal. The last 8 hex digits are random (output ids use them)."""

from __future__ import annotations

import time
import uuid


def new_session_id() -> str:
    """``20261128T170102Z-1a2b3c4d``: sortable by start time, unique by its random tail."""
    return time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
