"""Keep secrets out of every record: the audit log, the transcript and what the model is shown.

Two kinds of secret can pass through the breakglass agent: the Anthropic API key (ours) and private
key material printed by a devvm command (``cat /root/.ssh/id_ed25519``). Both are replaced by a
marker before anything is written or sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A key block looks for its END within KEY_MAX_CHARS (the largest RSA key, 16384 bits, is ~12.6
# KiB of PEM); a BEGIN line with no END that near drops at most KEY_MAX_LINES lines or
# KEY_MAX_CHARS characters, then output resumes: a stray BEGIN line must not hide everything after.
KEY_MAX_LINES = 256
KEY_MAX_CHARS = 16 * 1024
# A streamed line without a newline is held back at most this long, in key mode too.
PARTIAL_MAX_CHARS = 64 * 1024
_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*)-----.{0," + str(KEY_MAX_CHARS) + r"}?"
    r"-----END \1-----",
    re.DOTALL,
)
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*-----")
# Anthropic key shape, in case a key other than the configured one shows up in output.
_ANTHROPIC_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")

PRIVATE_KEY_MARKER = "[private key elided]"
# What replaces a BEGIN line and what followed it when no END came within the bounds.
UNENDED_KEY_MARKER = "[private key elided: no END line followed; the lines after BEGIN dropped]"
SECRET_MARKER = "[secret elided]"  # noqa: S105 - the marker, not a secret


class Scrubber:
    """Replaces known secret values and anything that looks like a private key block."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Short values would scrub ordinary words; a real secret is long.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def add(self, secret: str | None) -> None:
        """Remember one more secret value to scrub."""
        if secret and len(secret) >= 8 and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)

    def text(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, SECRET_MARKER)
        if "PRIVATE KEY" in text:
            text = _unended_keys(_PEM_BLOCK.sub(PRIVATE_KEY_MARKER, text))
        return _ANTHROPIC_KEY.sub(SECRET_MARKER, text)

    def value(self, value: object) -> object:
        """Scrub every string inside a JSON-like value."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def stream(self) -> StreamScrubber:
        """A line-buffered scrubber for a streamed output (a key block spans many chunks)."""
        return StreamScrubber(self)


class StreamScrubber:
    """Scrubs a stream of text chunks line by line, dropping private key blocks whole.

    Memory stays bounded: a line without a newline is held back at most PARTIAL_MAX_CHARS, and
    key mode (after a BEGIN line) gives up after KEY_MAX_LINES lines or KEY_MAX_CHARS characters
    without an END line, with a marker for what it dropped."""

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._partial = ""
        self._in_key = False
        self._key_lines = 0
        self._key_chars = 0

    @property
    def held_chars(self) -> int:
        """How much of an unfinished line (no newline yet) waits for the next feed."""
        return len(self._partial)

    def feed(self, text: str) -> str:
        """Scrubbed complete lines of ``text`` (a trailing partial line waits for the next feed)."""
        data = self._partial + text
        cut = data.rfind("\n") + 1
        self._partial = data[cut:]
        out = self._lines(data[:cut])
        if self._in_key and self._key_chars + len(self._partial) > KEY_MAX_CHARS:
            # A "key line" this long is not a key: drop it with the rest, leave key mode.
            self._partial = ""
            out += self._give_up()
        elif len(self._partial) > PARTIAL_MAX_CHARS:
            # A very long line without newline (a progress bar, binary junk) is released anyway
            # so memory stays bounded.
            rest, self._partial = self._partial, ""
            out += self._lines(rest)
        return out

    def flush(self) -> str:
        """Whatever is left at the end of the stream."""
        rest, self._partial = self._partial, ""
        out = self._lines(rest)
        if self._in_key:
            self._in_key = False
            out += PRIVATE_KEY_MARKER + "\n"
        return out

    def _give_up(self) -> str:
        self._in_key = False
        return UNENDED_KEY_MARKER + "\n"

    def _lines(self, data: str) -> str:
        if not data:
            return ""
        out: list[str] = []
        for line in data.splitlines(keepends=True):
            if self._in_key:
                if _PEM_END.search(line):
                    self._in_key = False
                    out.append(PRIVATE_KEY_MARKER + ("\n" if line.endswith("\n") else ""))
                    continue
                self._key_lines += 1
                self._key_chars += len(line)
                if self._key_lines > KEY_MAX_LINES or self._key_chars > KEY_MAX_CHARS:
                    out.append(self._give_up())
                continue
            if _PEM_BEGIN.search(line) and not _PEM_END.search(line):
                self._in_key = True
                self._key_lines = 0
                self._key_chars = len(line)
                continue
            out.append(self._scrubber.text(line))
        return "".join(out)


def _unended_keys(text: str) -> str:
    """``text`` with each BEGIN line that has no END after it replaced, with what follows it up
    to KEY_MAX_LINES lines or KEY_MAX_CHARS characters, by UNENDED_KEY_MARKER."""
    out: list[str] = []
    pos = 0
    for found in _PEM_BEGIN.finditer(text):
        if found.start() < pos:
            continue
        out.append(text[pos : found.start()])
        limit = min(len(text), found.end() + KEY_MAX_CHARS)
        end = found.end()
        for _ in range(KEY_MAX_LINES + 1):
            newline = text.find("\n", end, limit)
            if newline < 0:
                end = limit
                break
            end = newline + 1
        out.append(UNENDED_KEY_MARKER + ("\n" if text[end - 1 : end] == "\n" else ""))
        pos = end
    out.append(text[pos:])
    return "".join(out)
