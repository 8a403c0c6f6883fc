"""Forward new audit lines to the server's stdout as structured log lines.

The app processes append their audit records to ``<state_dir>/audit.jsonl`` (never to their
stdout, which is the wire to the browser). The server tails that file and writes each new complete
line to its own stdout wrapped as ``{"log": "audit", "record": {...}}`` for the cluster's log
pipeline. It starts at the file's end (older lines were forwarded by an earlier run) and flushes
what is left when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

POLL_S = 0.25
MAX_LINE = 1 << 20  # a longer "line" is cut: the pipeline must not choke on one record


class AuditForwarder:
    def __init__(
        self,
        path: Path,
        out: TextIO,
        *,
        poll_s: float = POLL_S,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_record`` sees every forwarded record (the metrics count verbs and tokens)."""
        self.path = path
        self.on_record = on_record
        self.out = out
        self.poll_s = poll_s
        self._offset: int | None = None
        self._inode: int | None = None
        self._partial = b""
        self._task: asyncio.Task[None] | None = None
        self.forwarded = 0

    def start(self) -> None:
        try:
            st = self.path.stat()
            self._offset, self._inode = st.st_size, st.st_ino
        except FileNotFoundError:
            self._offset, self._inode = 0, None
        self._task = asyncio.create_task(self._run(), name="audit-forwarder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.pump()

    async def _run(self) -> None:
        while True:
            self.pump()
            await asyncio.sleep(self.poll_s)

    def pump(self) -> int:
        """Forward every complete line written since the last call; return how many."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        if self._inode != st.st_ino or (self._offset or 0) > st.st_size:
            self._offset, self._inode, self._partial = 0, st.st_ino, b""  # new or rotated file
        if st.st_size == self._offset:
            return 0
        with self.path.open("rb") as f:
            f.seek(self._offset or 0)
            data = f.read(st.st_size - (self._offset or 0))
        self._offset = (self._offset or 0) + len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial[:MAX_LINE])
            self._partial = b""
        count = 0
        for raw in lines:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"unparsed": raw[:MAX_LINE].decode("utf-8", "replace")}
            if self.on_record is not None and isinstance(record, dict):
                with contextlib.suppress(Exception):  # counting must never stop the forwarding
                    self.on_record(record)
            self.out.write(json.dumps({"log": "audit", "record": record}, ensure_ascii=False))
            self.out.write("\n")
            count += 1
        if count:
            self.out.flush()
        self.forwarded += count
        return count
