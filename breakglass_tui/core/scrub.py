"""Keep secrets out of every record: the audit log, the transcript and what the model is shown.

Two kinds of secret can pass through the breakglass agent: the Anthropic API key (ours) and private
key material printed by a devvm command (``cat /root/.ssh/id_ed25519``). Both are replaced by a
marker before anything is written or sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*)-----.*?(?:-----END \1-----|\Z)",
    re.DOTALL,
)
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY[A-Z0-9 ]*-----")
# Anthropic key shape, in case a key other than the configured one shows up in output.
_ANTHROPIC_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")

PRIVATE_KEY_MARKER = "[private key elided]"
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
        text = _PEM_BLOCK.sub(PRIVATE_KEY_MARKER, text)
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
    """Scrubs a stream of text chunks line by line, dropping private key blocks whole."""

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._partial = ""
        self._in_key = False

    def feed(self, text: str) -> str:
        """Scrubbed complete lines of ``text`` (a trailing partial line waits for the next feed)."""
        data = self._partial + text
        cut = data.rfind("\n") + 1
        self._partial = data[cut:]
        # A very long line without newline (a progress bar, binary junk) is released anyway so
        # memory stays bounded; a key block line is never this long.
        if len(self._partial) > 65536 and not self._in_key:
            cut = len(data)
            self._partial = ""
        return self._lines(data[:cut])

    def flush(self) -> str:
        """Whatever is left at the end of the stream."""
        rest, self._partial = self._partial, ""
        out = self._lines(rest)
        if self._in_key:
            self._in_key = False
            out += PRIVATE_KEY_MARKER + "\n"
        return out

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
            if _PEM_BEGIN.search(line) and not _PEM_END.search(line):
                self._in_key = True
                continue
            out.append(self._scrubber.text(line))
        return "".join(out)
