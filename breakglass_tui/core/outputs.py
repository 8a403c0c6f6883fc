"""Output budgets: the model sees a head and a tail of each output, the transcript keeps it whole.

Every tool output gets an ``output_id``. Its whole (scrubbed) text is streamed to a file of its own
under ``<state_dir>/transcripts/<session_id>/`` as it arrives, so memory stays bounded however much
a command prints; only a head and a rolling tail are held. The model is shown the head and the tail
within a budget (bytes and estimated tokens), told what was elided, the exit status and the sha256
of the whole; ``read_output`` and ``grep_output`` let it look deeper without the context growing.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from breakglass_tui.core.scrub import Scrubber, StreamScrubber
from breakglass_tui.hosts.types import OutputChunk

# A conservative estimate: English text and shell output run ~3.5-4 bytes per token; dense text
# (hex, base64, non-ASCII) fewer. Dividing by 3 keeps the estimate on the high side.
BYTES_PER_TOKEN = 3.0
HEAD_SHARE = 0.4  # of the budget; the rest is the tail, where errors and summaries usually are
_OUTPUT_ID = re.compile(r"^o[0-9]{1,9}$")


def estimate_tokens(text: str | bytes) -> int:
    """A conservative token estimate for ``text``."""
    size = len(text.encode() if isinstance(text, str) else text)
    return int(size / BYTES_PER_TOKEN) + 1


def _decode(data: bytes) -> str:
    # Cuts may land inside a UTF-8 sequence: drop the broken ends rather than show U+FFFD.
    return data.decode("utf-8", errors="ignore")


@dataclass
class OutputRecord:
    """One recorded output: where the whole is, its size and digest, and the kept head/tail."""

    output_id: str
    path: Path
    raw_bytes: int  # bytes of the output as the command printed it (before scrubbing)
    stdout_bytes: int
    stderr_bytes: int
    stored_bytes: int  # bytes in the file (scrubbed)
    sha256: str  # of the whole output as printed (stdout and stderr interleaved)
    head: bytes
    tail: bytes

    @property
    def elided_bytes(self) -> int:
        return max(0, self.stored_bytes - len(self.head) - len(self.tail))


@dataclass
class OutputRecorder:
    """Streams one output to its file; keeps the head, a rolling tail, counts and a digest."""

    output_id: str
    path: Path
    scrubber: Scrubber
    head_limit: int
    tail_limit: int
    _fd: int = -1
    _sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    _streams: dict[str, StreamScrubber] = field(default_factory=dict)
    _head: bytearray = field(default_factory=bytearray)
    _tail: bytearray = field(default_factory=bytearray)
    _stored: int = 0
    _counts: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})

    def __post_init__(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def feed(self, chunk: OutputChunk) -> OutputChunk | None:
        """Record a chunk; returns the scrubbed chunk to show live (None if nothing to show yet)."""
        raw = chunk.text.encode()
        self._sha.update(raw)
        self._counts[chunk.stream] = self._counts.get(chunk.stream, 0) + len(raw)
        scrubber = self._streams.setdefault(chunk.stream, self.scrubber.stream())
        text = scrubber.feed(chunk.text)
        if not text:
            return None
        self._store(text.encode())
        return OutputChunk(stream=chunk.stream, text=text)

    def feed_text(self, text: str) -> None:
        """Record a whole text at once (verb documents, probe results)."""
        self.feed(OutputChunk(stream="stdout", text=text))

    def _store(self, data: bytes) -> None:
        os.write(self._fd, data)
        self._stored += len(data)
        room = self.head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
        self._tail += data
        if len(self._tail) > 2 * self.tail_limit:
            del self._tail[: len(self._tail) - self.tail_limit]

    def finish(self) -> tuple[OutputRecord, list[OutputChunk]]:
        """Close the file; returns the record and any last scrubbed chunks to show."""
        rest: list[OutputChunk] = []
        for stream, scrubber in self._streams.items():
            text = scrubber.flush()
            if text:
                self._store(text.encode())
                rest.append(OutputChunk(stream=stream, text=text))  # type: ignore[arg-type]
        os.close(self._fd)
        self._fd = -1
        head = bytes(self._head)
        # The tail is what follows the head, at most tail_limit bytes of it (no overlap).
        after_head = self._stored - len(head)
        keep = min(after_head, self.tail_limit)
        tail = bytes(self._tail[len(self._tail) - keep :]) if keep > 0 else b""
        total = sum(self._counts.values())
        record = OutputRecord(
            output_id=self.output_id,
            path=self.path,
            raw_bytes=total,
            stdout_bytes=self._counts.get("stdout", 0),
            stderr_bytes=self._counts.get("stderr", 0),
            stored_bytes=self._stored,
            sha256=self._sha.hexdigest(),
            head=head,
            tail=tail,
        )
        return record, rest

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OutputStore:
    """The outputs of one session: recorders, the model's budgeted view, read and grep."""

    def __init__(
        self,
        directory: Path,
        scrubber: Scrubber,
        *,
        budget_bytes: int = 8192,
        budget_tokens: int = 2048,
    ) -> None:
        self.directory = directory
        self.scrubber = scrubber
        self.budget_bytes = max(256, min(budget_bytes, int(budget_tokens * BYTES_PER_TOKEN)))
        self._count = 0
        self.records: dict[str, OutputRecord] = {}

    def recorder(self) -> OutputRecorder:
        """A recorder for a new output, with the next output_id."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._count += 1
        output_id = f"o{self._count}"
        head = int(self.budget_bytes * HEAD_SHARE)
        return OutputRecorder(
            output_id=output_id,
            path=self.directory / f"{output_id}.out",
            scrubber=self.scrubber,
            head_limit=head,
            tail_limit=self.budget_bytes - head,
        )

    def finish(self, recorder: OutputRecorder) -> tuple[OutputRecord, list[OutputChunk]]:
        record, rest = recorder.finish()
        self.records[record.output_id] = record
        return record, rest

    def view(self, record: OutputRecord, header: str) -> str:
        """The model's view of an output: a header line, head, elision note, tail."""
        sizes = f"{record.raw_bytes} bytes"
        if record.stderr_bytes:
            sizes += f" (stdout {record.stdout_bytes}, stderr {record.stderr_bytes})"
        lines = [
            f"{header} | output_id {record.output_id} | {sizes} | sha256 {record.sha256}",
        ]
        if record.stored_bytes == 0:
            lines.append("(no output)")
            return "\n".join(lines)
        if record.elided_bytes == 0:
            lines.append(_decode(record.head + record.tail))
            return "\n".join(lines)
        lines.append(_decode(record.head))
        lines.append(
            f"\n[... {record.elided_bytes} bytes elided; the whole output is kept: use"
            f" read_output(output_id={record.output_id!r}, offset, length) or"
            f" grep_output(output_id={record.output_id!r}, pattern) to see more ...]\n"
        )
        lines.append(_decode(record.tail))
        return "\n".join(lines)

    def read(self, output_id: str, offset: int, length: int) -> str:
        """Bytes ``offset..offset+length`` of a stored output, capped by the budget."""
        record = self._record(output_id)
        offset = max(0, int(offset))
        asked = int(length)
        length = max(0, min(asked, self.budget_bytes))
        with record.path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        end = offset + len(data)
        note = f"output_id {output_id}: bytes {offset}..{end} of {record.stored_bytes}"
        if asked > self.budget_bytes:
            note += f" (length capped at {self.budget_bytes})"
        return note + "\n" + _decode(data)

    def grep(self, output_id: str, pattern: str, max_matches: int = 50) -> str:
        """Lines of a stored output matching a regular expression, with line numbers and byte
        offsets, capped by the budget."""
        record = self._record(output_id)
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from (
                None
            )
        max_matches = max(1, min(int(max_matches), 500))
        found: list[str] = []
        size = 0
        matches = 0
        truncated = False
        offset = 0
        with record.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode(raw).rstrip("\n")
                if regex.search(line):
                    matches += 1
                    if len(found) < max_matches and not truncated:
                        shown = line if len(line) <= 400 else line[:400] + " [...]"
                        entry = f"{number} @{offset}: {shown}"
                        if size + len(entry) + 1 > self.budget_bytes:
                            truncated = True
                        else:
                            found.append(entry)
                            size += len(entry) + 1
                offset += len(raw)
        head = f"output_id {output_id}: {matches} matching line(s) for {pattern!r}"
        if matches > len(found):
            head += f", first {len(found)} shown"
        return "\n".join([head, *found])

    def _record(self, output_id: str) -> OutputRecord:
        if not isinstance(output_id, str) or not _OUTPUT_ID.match(output_id):
            raise ValueError(f"{output_id!r} is not an output id (they look like 'o12')")
        record = self.records.get(output_id)
        if record is None:
            known = ", ".join(list(self.records)[-5:]) or "none yet"
            raise ValueError(f"no output {output_id!r} in this session (latest: {known})")
        return record
