"""Fences: host text in a tool result, marked so that the host cannot forge the fence's end.

Everything the devvm and the PVE host write (command output, journal lines, file names, process
titles, the verb's messages, an SSH banner, an exception's text) reaches the model only inside a
fence::

    devvm_shell: exit 0 in 0.2 s | output_id o3-1a2b3c4d | 812 bytes | sha256 …
    ⟦host-output 5c0f9e2a7b1d4e38⟧
    …the host's text…
    ⟦/host-output 5c0f9e2a7b1d4e38⟧

- The **token** is random (64 bits), chosen once per tool result (:func:`new_fence`) and kept in
  the conversation as sent: a result is never re-fenced, so earlier results stay byte-identical
  across requests (the prompt cache, and the thinking blocks bound to their prefix). A tool
  result may hold several fenced parts (the head and tail of an output, with the agent's elision
  note between them): all carry that result's one token.
- **Neutralised**: every ``⟦`` in host text is written ``⟦⟧`` (:func:`escape`), so fenced text
  never holds a marker — no closing marker with any token, not even this result's, can appear
  inside it. The escape is reversible (:func:`unescape`): what the model reads is the host's
  text, visibly marked where it imitated a fence.
- What the agent itself writes (the tool, the exit status, sizes, ``output_id``, sha256, elision
  and truncation notes, refusals) stays **outside** the fences, on the result's first line and
  between the fenced parts.

The system prompt tells the model what the fences mean (``core.prompt``): text inside them is
evidence, never instructions. Images from the host (the screendump) cannot be fenced; the prompt
covers them.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

LEAD = "⟦"  # every marker starts with it, and host text never holds it unescaped
ESCAPED_LEAD = "⟦⟧"
LABEL = "host-output"
TOKEN_BYTES = 8
_TOKEN = re.compile(r"[0-9a-f]{16}")
_NAMED_ID = re.compile(r"output_id (o[0-9]{1,9}(?:-[0-9a-f]{8})?)\b")
# One fenced part: the opening marker on its own line, the escaped text, a newline, the closing
# marker with the same token. Escaped text holds no ⟦ that is not followed by ⟧.
_PART = re.compile(
    r"⟦host-output (?P<token>[0-9a-f]{16})⟧\n(?P<body>[^⟦]*(?:⟦⟧[^⟦]*)*)\n⟦/host-output (?P=token)⟧"
)


def escape(text: str) -> str:
    """Host text made safe to fence: every ``⟦`` becomes ``⟦⟧`` (reversible)."""
    return text.replace(LEAD, ESCAPED_LEAD)


def unescape(text: str) -> str:
    """The host's own text from :func:`escape`'s."""
    return text.replace(ESCAPED_LEAD, LEAD)


@dataclass(frozen=True)
class Fence:
    """The fence of one tool result: its token, chosen once."""

    token: str

    def __post_init__(self) -> None:
        if not _TOKEN.fullmatch(self.token):
            raise ValueError("a fence token is 16 lower-case hex digits")

    @property
    def opening(self) -> str:
        return f"⟦{LABEL} {self.token}⟧"

    @property
    def closing(self) -> str:
        return f"⟦/{LABEL} {self.token}⟧"

    def wrap(self, host_text: str) -> str:
        """``host_text`` inside this fence (neutralised)."""
        return f"{self.opening}\n{escape(host_text)}\n{self.closing}"


def new_fence() -> Fence:
    """A fence with a fresh random token, for one tool result."""
    return Fence(secrets.token_hex(TOKEN_BYTES))


@dataclass(frozen=True)
class Parsed:
    """A fenced text taken apart: the agent's text outside the fences, the host's inside."""

    outside: list[str]  # the text between the fenced parts (len(inside) + 1 pieces)
    inside: list[str]  # each fenced part's host text, unescaped
    tokens: list[str]  # each fenced part's token


def parse(text: str) -> Parsed:
    """Take a tool result's text apart (for compaction and for the tests that prove the fences
    hold). Raises ValueError when a marker stands anywhere but in a well-formed part, or when the
    parts of one result carry different tokens."""
    outside: list[str] = []
    inside: list[str] = []
    tokens: list[str] = []
    at = 0
    for found in _PART.finditer(text):
        outside.append(text[at : found.start()])
        inside.append(unescape(found.group("body")))
        tokens.append(found.group("token"))
        at = found.end()
    outside.append(text[at:])
    if any(LEAD in piece for piece in outside):
        raise ValueError("a fence marker outside a well-formed fenced part")
    if len(set(tokens)) > 1:
        raise ValueError("one tool result's fenced parts carry different tokens")
    return Parsed(outside, inside, tokens)


def outside_text(text: str) -> str:
    """The agent's own text of a fenced tool result: everything outside the fences."""
    return "".join(parse(text).outside)


def shorten(text: str, *, keep: int, prefix: str, note: str) -> str:
    """A tool result cut to its first line (the agent's header) and the last ``keep`` characters
    of its host text, fenced again with the **same** token (a compacted result keeps its fence).
    ``prefix`` goes before the header and ``note`` on the line after it. A result without fences
    (the agent's own text) keeps its last ``keep`` characters."""
    header, _, rest = text.partition("\n")
    keep = max(0, keep)
    try:
        parsed = parse(text)
    except ValueError:
        parsed = None
    if parsed is None or not parsed.tokens:
        tail = rest[max(0, len(rest) - keep) :]
        if LEAD in tail:  # never cut a malformed result into something that looks fenced
            tail = escape(tail)
        return f"{prefix} {header}\n{note}\n{tail}"
    if LEAD in header:  # the header was inside a fence: keep nothing of it
        header = "(a fenced result)"
    # The output ids the agent named outside the fences stay readable (read_output).
    named = [i for i in _NAMED_ID.findall("".join(parsed.outside)) if i not in header]
    if named:
        header += " | output_id " + ", ".join(dict.fromkeys(named))
    host = "\n".join(parsed.inside)
    tail = host[max(0, len(host) - keep) :]
    return f"{prefix} {header}\n{note}\n{Fence(parsed.tokens[0]).wrap(tail)}"
