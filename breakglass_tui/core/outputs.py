"""Output views: the model sees a head and a tail of each output, the transcript keeps it whole.

Every tool output gets an ``output_id``, unique across the sessions that share a state dir (an
incident driven from several tabs, resumed or taken over, has one session per agent): ``o<n>-<tag>``
where the tag names the session (:func:`session_tag`). A restored conversation's ids therefore
never alias the new session's outputs, and an earlier session's output stays readable by its id
(its file is found under ``<state_dir>/transcripts/<that session>/``).

Its (scrubbed) text is streamed to a file of its own under ``<state_dir>/transcripts/<session_id>/``
as it arrives, so memory stays bounded however much a command prints; only a head and a rolling tail
are held. The file is the one stored copy of the output (the session's transcript refers to it), and
it is capped at :data:`MAX_STORED_BYTES`: the state volume is small, and one ``cat`` of a huge log
must not fill it. Beyond the cap bytes are counted and hashed but not written, and the record says
it was truncated. The model is shown the head and the (real) tail within a view limit (bytes and
estimated tokens), told what was elided, the exit status and the sha256 of the whole;
``read_output`` and ``grep_output`` let it look deeper into the stored part without the context
growing. ``grep_output`` runs the model's pattern in a child process with a deadline: a catastrophic
pattern cannot freeze the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from breakglass_tui.core.fence import Fence, escape
from breakglass_tui.core.scrub import Scrubber, StreamScrubber
from breakglass_tui.hosts.types import OutputChunk

# A conservative estimate: English text and shell output run ~3.5-4 bytes per token; dense text
# (hex, base64, non-ASCII) fewer. Dividing by 3 keeps the estimate on the high side.
BYTES_PER_TOKEN = 3.0
HEAD_SHARE = 0.4  # of the view; the rest is the tail, where errors and summaries usually are
# o<n>-<session tag>; a bare o<n> is from before ids named their session (a restored conversation).
_OUTPUT_ID = re.compile(r"^o([0-9]{1,9})(?:-([0-9a-f]{8}))?$")
_TAG = re.compile(r"-([0-9a-f]{8})$")
# What one output's facts file (beside its .out file) is called: read by later sessions.
_FACTS_SUFFIX = ".json"
# At most this much of one output is written to disk; the rest is counted and hashed only.
MAX_STORED_BYTES = 16 * 1024 * 1024
# grep_output: the pattern's deadline (the child running it is killed after), the part of each
# line it is run on, and the longest pattern accepted.
GREP_TIMEOUT_S = 5.0
GREP_MAX_LINE = 4096
GREP_MAX_PATTERN = 1000

# The grep child: standard library only, run with ``python -I -S`` and an empty environment.
# Reads one JSON request on stdin, writes one JSON answer on stdout.
_GREP_CHILD = r"""
import json, re, sys
a = json.loads(sys.stdin.readline())
rx = re.compile(a["pattern"])
found, size, matches, full, offset, cut = [], 0, 0, False, 0, 0
with open(a["path"], "rb") as f:
    for number, raw in enumerate(f, start=1):
        line = raw.decode("utf-8", errors="ignore").rstrip("\n")
        cut += len(line) > a["max_line"]
        if rx.search(line[: a["max_line"]]):
            matches += 1
            if len(found) < a["max_matches"] and not full:
                shown = line if len(line) <= 400 else line[:400] + " [...]"
                entry = f"{number} @{offset}: {shown}"
                if size + len(entry) + 1 > a["limit"]:
                    full = True
                else:
                    found.append(entry)
                    size += len(entry) + 1
        offset += len(raw)
sys.stdout.write(json.dumps({"matches": matches, "found": found, "cut": cut}))
"""


def estimate_tokens(text: str | bytes) -> int:
    """A conservative token estimate for ``text``."""
    size = len(text.encode() if isinstance(text, str) else text)
    return int(size / BYTES_PER_TOKEN) + 1


def session_tag(session_id: str) -> str:
    """The short tag naming a session in its output ids: the random part of a session id
    (``20261128T162159Z-1a2b3c4d`` -> ``1a2b3c4d``), else 8 hex digits of its sha256."""
    found = _TAG.search(session_id)
    if found:
        return found.group(1)
    return hashlib.sha256(session_id.encode()).hexdigest()[:8]


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
    stored_bytes: int  # bytes in the file (scrubbed): at most the cap
    sha256: str  # of the whole output as printed (stdout and stderr interleaved)
    head: bytes
    tail: bytes  # the real end of the output, even when the file was truncated
    scrubbed_bytes: int = -1  # bytes of the whole scrubbed output; -1 = stored_bytes
    store_error: str | None = None  # why writing the file stopped early (disk full), if it did

    def __post_init__(self) -> None:
        if self.scrubbed_bytes < 0:
            self.scrubbed_bytes = self.stored_bytes

    @property
    def truncated(self) -> bool:
        """The file holds only the first part of the output."""
        return self.stored_bytes < self.scrubbed_bytes

    @property
    def elided_bytes(self) -> int:
        return max(0, self.scrubbed_bytes - len(self.head) - len(self.tail))


@dataclass
class OutputRecorder:
    """Streams one output to its file; keeps the head, a rolling tail, counts and a digest."""

    output_id: str
    path: Path
    scrubber: Scrubber
    head_limit: int
    tail_limit: int
    max_stored: int = MAX_STORED_BYTES
    _fd: int = -1
    _sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    _streams: dict[str, StreamScrubber] = field(default_factory=dict)
    _head: bytearray = field(default_factory=bytearray)
    _tail: bytearray = field(default_factory=bytearray)
    _stored: int = 0  # bytes written to the file
    _seen: int = 0  # bytes of scrubbed output, written or not
    _store_error: str | None = None
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

    @property
    def stored_bytes(self) -> int:
        return self._stored

    def _store(self, data: bytes) -> None:
        self._seen += len(data)
        room = self.max_stored - self._stored
        if room > 0 and self._store_error is None and self._fd >= 0:
            part = memoryview(data)[:room]
            try:
                while part:
                    written = os.write(self._fd, part)
                    self._stored += written
                    part = part[written:]
            except OSError as exc:  # disk full: the rescue goes on, the record says so
                self._store_error = f"{exc.__class__.__name__}: {exc.strerror or exc}"
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
        after_head = self._seen - len(head)
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
            scrubbed_bytes=self._seen,
            store_error=self._store_error,
        )
        return record, rest

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OutputStore:
    """The outputs of one session: recorders, the model's bounded view, read and grep.

    ``shared_root`` (``<state_dir>/transcripts``) is where the other sessions' output
    directories are: an id of an earlier session is read from there. ``tag`` defaults to
    :func:`session_tag` of the directory's name (the session id)."""

    def __init__(
        self,
        directory: Path,
        scrubber: Scrubber,
        *,
        view_bytes: int = 8192,
        view_tokens: int = 2048,
        max_stored_bytes: int = MAX_STORED_BYTES,
        shared_root: Path | None = None,
        tag: str | None = None,
    ) -> None:
        self.directory = directory
        self.max_stored_bytes = max_stored_bytes
        self.scrubber = scrubber
        self.view_bytes = max(256, min(view_bytes, int(view_tokens * BYTES_PER_TOKEN)))
        self.shared_root = shared_root
        self.tag = tag or session_tag(directory.name)
        if not re.fullmatch(r"[0-9a-f]{8}", self.tag):
            raise ValueError(f"session tag {self.tag!r} is not 8 hex digits")
        # A session id used again (a tab that drives again after a take-over builds a new
        # agent): go on after the outputs already there, never append to one of them.
        self._count = self._highest_stored()
        self.records: dict[str, OutputRecord] = {}

    def id_for(self, n: int) -> str:
        """The output id of this session's ``n``-th output."""
        return f"o{n}-{self.tag}"

    def _highest_stored(self) -> int:
        highest = 0
        with contextlib.suppress(OSError):
            for path in self.directory.glob(f"o*-{self.tag}.out"):
                found = _OUTPUT_ID.match(path.stem)
                if found and found.group(2) == self.tag:
                    highest = max(highest, int(found.group(1)))
        return highest

    @staticmethod
    def is_legacy_id(output_id: str) -> bool:
        """An id from before ids named their session (``o3``): not readable in a later one."""
        found = _OUTPUT_ID.match(output_id)
        return found is not None and found.group(2) is None

    def recorder(self) -> OutputRecorder:
        """A recorder for a new output, with the next output_id."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._count += 1
        output_id = self.id_for(self._count)
        while (self.directory / f"{output_id}.out").exists():  # written meanwhile by a twin
            self._count += 1
            output_id = self.id_for(self._count)
        head = int(self.view_bytes * HEAD_SHARE)
        return OutputRecorder(
            output_id=output_id,
            path=self.directory / f"{output_id}.out",
            scrubber=self.scrubber,
            head_limit=head,
            tail_limit=self.view_bytes - head,
            max_stored=self.max_stored_bytes,
        )

    def finish(self, recorder: OutputRecorder) -> tuple[OutputRecord, list[OutputChunk]]:
        record, rest = recorder.finish()
        self.records[record.output_id] = record
        _write_facts(record)
        return record, rest

    def view(self, record: OutputRecord, header: str, fence: Fence) -> str:
        """The model's view of an output: the agent's header line, then its head and tail inside
        ``fence`` (core.fence), with the elision note between them outside it."""
        sizes = f"{record.raw_bytes} bytes"
        if record.stderr_bytes:
            sizes += f" (stdout {record.stdout_bytes}, stderr {record.stderr_bytes})"
        lines = [
            f"{header} | output_id {record.output_id} | {sizes} | sha256 {record.sha256}",
        ]
        if record.truncated:
            lines.append(_truncation_note(record))
        if record.scrubbed_bytes == 0:
            lines.append("(no output)")
            return "\n".join(lines)
        if record.elided_bytes == 0:
            lines.append(fence.wrap(_decode(record.head + record.tail)))
            return "\n".join(lines)
        lines.append(fence.wrap(_decode(record.head)))
        kept = (
            f"the first {record.stored_bytes} bytes are kept"
            if record.truncated
            else "the whole output is kept"
        )
        lines.append(
            f"[... {record.elided_bytes} bytes elided; {kept}: use"
            f" read_output(output_id={record.output_id!r}, offset, length) or"
            f" grep_output(output_id={record.output_id!r}, pattern) to see more ...]"
        )
        lines.append(fence.wrap(_decode(record.tail)))
        return "\n".join(lines)

    def read(self, output_id: str, offset: int, length: int, fence: Fence) -> str:
        """Bytes ``offset..offset+length`` of a stored output, capped by the budget: a note line,
        then the bytes inside ``fence``."""
        record = self._record(output_id)
        offset = max(0, int(offset))
        asked = int(length)
        length = max(0, min(asked, self.view_bytes))
        with record.path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        end = offset + len(data)
        note = f"output_id {output_id}: bytes {offset}..{end} of {record.stored_bytes}"
        if output_id not in self.records:
            note += " (an earlier session's output)"
        if asked > self.view_bytes:
            note += f" (length capped at {self.view_bytes})"
        if record.truncated:
            note += f" (only these were kept, of {record.scrubbed_bytes})"
        return note + "\n" + fence.wrap(_decode(data))

    async def grep(
        self,
        output_id: str,
        pattern: str,
        max_matches: int = 50,
        *,
        fence: Fence,
        timeout_s: float | None = None,
    ) -> str:
        """Lines of a stored output matching a regular expression, with line numbers and byte
        offsets, capped by the budget. The pattern comes from the model: it runs in a child
        process (CPython's ``re`` holds the GIL, so a thread would not help) on at most
        GREP_MAX_LINE characters of each line, and a pattern that takes longer than the deadline
        is stopped and reported as a ValueError."""
        record = self._record(output_id)
        if len(pattern) > GREP_MAX_PATTERN:
            raise ValueError(f"the pattern is longer than {GREP_MAX_PATTERN} characters")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from (
                None
            )
        max_matches = max(1, min(int(max_matches), 500))
        deadline = GREP_TIMEOUT_S if timeout_s is None else timeout_s
        request = {
            "pattern": pattern,
            "path": str(record.path),
            "max_matches": max_matches,
            "limit": self.view_bytes,
            "max_line": GREP_MAX_LINE,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            "-c",
            _GREP_CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={},
        )
        try:
            async with asyncio.timeout(deadline):
                out, err = await proc.communicate(json.dumps(request).encode() + b"\n")
        except TimeoutError:
            raise ValueError(
                f"grep_output stopped: the pattern {pattern!r} ran longer than {deadline:g} s on"
                f" output {output_id} (catastrophic backtracking?). Use a simpler pattern (no"
                " nested or overlapping quantifiers), or read_output."
            ) from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise ValueError(f"grep_output failed: {last[0][:300]}")
        answer = json.loads(out)
        found: list[str] = answer["found"]
        matches: int = answer["matches"]
        head = f"output_id {output_id}: {matches} matching line(s) for {escape(repr(pattern))}"
        if matches > len(found):
            head += f", first {len(found)} shown"
        notes = []
        if answer["cut"]:
            notes.append(
                f"{answer['cut']} line(s) longer than {GREP_MAX_LINE} characters were searched"
                " in their first part only"
            )
        if record.truncated:
            notes.append(f"only the kept first {record.stored_bytes} bytes were searched")
        if notes:
            head += f" ({'; '.join(notes)})"
        if not found:
            return head
        return head + "\n" + fence.wrap("\n".join(found))

    def _record(self, output_id: str) -> OutputRecord:
        found = _OUTPUT_ID.match(output_id) if isinstance(output_id, str) else None
        if found is None:
            raise ValueError(
                f"{output_id!r} is not an output id (they look like {self.id_for(12)!r})"
            )
        record = self.records.get(output_id)
        if record is not None:
            return record
        tag = found.group(2)
        if tag is None:
            # From before ids named their session: it cannot be told which session's it was.
            raise ValueError(
                f"output {output_id!r} belongs to an earlier tab's session and is not readable"
                f" here (its id does not say which session; this session's ids look like"
                f" {self.id_for(1)!r})"
            )
        record = self._earlier_record(output_id)
        if record is not None:
            return record
        if tag != self.tag:
            raise ValueError(
                f"output {output_id!r} belongs to an earlier tab's session and is not readable"
                " here (its file is not in this state dir)"
            )
        known = ", ".join(list(self.records)[-5:]) or "none yet"
        raise ValueError(f"no output {output_id!r} in this session (latest: {known})")

    def _earlier_record(self, output_id: str) -> OutputRecord | None:
        """An earlier session's output (or this session id's earlier agent's), from its file
        under ``shared_root/<session>/`` and the facts written beside it (a file still being
        written counts as what it holds now)."""
        own = self.directory / f"{output_id}.out"  # this session id's earlier agent
        try:
            if own.is_file() and not own.is_symlink():
                paths = [own]
            elif self.shared_root is None:
                return None
            else:
                paths = [
                    p
                    for p in self.shared_root.glob(f"*/{output_id}.out")
                    if p.is_file() and not p.is_symlink()
                ]
        except OSError:
            return None
        if len(paths) != 1:  # none, or (an id collision) more than one: never guess
            return None
        path = paths[0]
        try:
            size = path.stat().st_size
        except OSError:
            return None
        facts: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.with_suffix(_FACTS_SUFFIX).read_text())
            if isinstance(loaded, dict):
                facts = loaded

        def number(key: str, default: int) -> int:
            value = facts.get(key)
            return value if isinstance(value, int) and value >= 0 else default

        error = facts.get("store_error")
        return OutputRecord(
            output_id=output_id,
            path=path,
            raw_bytes=number("raw_bytes", size),
            stdout_bytes=number("stdout_bytes", 0),
            stderr_bytes=number("stderr_bytes", 0),
            stored_bytes=size,
            sha256=str(facts.get("sha256", "")),
            head=b"",
            tail=b"",
            scrubbed_bytes=max(size, number("scrubbed_bytes", size)),
            store_error=error if isinstance(error, str) else None,
        )


def _write_facts(record: OutputRecord) -> None:
    """The facts of a finished output beside its file, for later sessions that read it."""
    facts = {
        "output_id": record.output_id,
        "raw_bytes": record.raw_bytes,
        "stdout_bytes": record.stdout_bytes,
        "stderr_bytes": record.stderr_bytes,
        "stored_bytes": record.stored_bytes,
        "scrubbed_bytes": record.scrubbed_bytes,
        "sha256": record.sha256,
        "store_error": record.store_error,
    }
    with contextlib.suppress(OSError):  # disk full: the output itself is what matters
        path = record.path.with_suffix(_FACTS_SUFFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(facts).encode())
        finally:
            os.close(fd)


def _truncation_note(record: OutputRecord) -> str:
    why = (
        f"writing it failed ({record.store_error})"
        if record.store_error
        else f"it passed the cap of {record.stored_bytes} bytes per output"
    )
    return (
        f"[TRUNCATED: only the first {record.stored_bytes} of {record.scrubbed_bytes} bytes are"
        f" kept ({why}); the rest was counted and is in the sha256, but read_output and"
        " grep_output see only the kept part; the tail below is the real end of the output]"
    )
