"""A local fake of the Anthropic Messages API over real HTTP, as strict as the current models.

The Claude API is the one part that cannot be real in tests, so this serves ``POST /v1/messages``
(and the beta path ``/v1/messages?beta=true``) on 127.0.0.1 with Server-Sent Events exactly as the
API frames them (an ``event:`` line and a ``data:`` line per frame; ``message_start``,
``content_block_start``/``_delta``/``_stop`` per block, ``message_delta`` with stop_reason and
usage, ``message_stop``; ``event: error`` for errors mid-stream). Each test scripts a queue of
answers (streams, HTTP errors such as 529 with ``retry-after``, a stall after N frames, a
connection dropped before ``message_stop``) and reads back the request bodies it received. Point
the SDK at :attr:`FakeMessagesApi.base_url`.

It behaves as the Anthropic documentation says Claude Sonnet 5.5 and Opus 5.5 behave ("What's new
in Claude Sonnet 5.5", "Thinking in tool and multi-turn workflows", "Preserved thinking", "Prefix
checks on thinking blocks", "Context editing", "Prompt caching", "Claude API errors"):

- Every scripted assistant turn begins with a **signed thinking block** (``reply(thinking=...)``;
  ``redacted=True`` adds a ``redacted_thinking`` block). Its text is returned only when the
  request asks for ``thinking.display: "summarized"`` (the default display on these models is
  ``omitted``: an empty text with a signature). The signature is an HMAC, under a key of this
  fake (its "account"), over the model, the block and its **prefix**: ``system``, ``tools``,
  every earlier message and the blocks before it in its own message (``cache_control`` markers
  and ``null`` fields aside).
- A request that sends a thinking block back is checked: a block whose model the requested model
  cannot read is dropped without an error (reported in ``input_transformations``); a block whose
  prefix changed, or whose text or signature changed, is a **400** ("The block is bound to a
  different conversation"), unless ``thinking.block_binding.prefix_mismatch_behavior`` is
  ``drop_block`` (beta ``thinking-binding-controls-2026-08-01``); an assistant message that holds
  a block this fake produced must be the message as it was returned, every block in order; an
  assistant message of the current tool loop (no operator text after it) must come back with its
  thinking blocks when the same model reads them.
- 400 also, in the API's error shape (``{"type": "error", "error": {"type":
  "invalid_request_error", "message": ...}, "request_id": ...}`` and a ``request-id`` header), for
  ``thinking`` disabled or given a budget, ``between_tools`` at ``xhigh``/``max``, a forced
  ``tool_choice`` (``any``/``tool``), ``temperature``/``top_p``/``top_k``, an assistant prefill,
  fields the API does not know (``_basis`` on a message, say), empty text, a ``tool_use`` without
  its ``tool_result`` first in the next message, more than four ``cache_control`` breakpoints,
  an image whose bytes are not its media type, and ``context_management`` without its beta.
- **Context editing** (``clear_tool_uses_20250919``, beta ``context-management-2025-06-27``) is
  applied server-side as documented: past the trigger, the oldest tool results but the last
  ``keep`` are replaced by a placeholder (unless fewer than ``clear_at_least`` tokens would go),
  and reported in ``context_management.applied_edits``. The usage then counts what the model
  sees: :attr:`FakeMessagesApi.seen_tokens` keeps it per request.
- **Prompt caching** is simulated on what the model sees: a prefix up to a ``cache_control``
  breakpoint (512 tokens at least) is written once and read by later requests that share it,
  looking back up to 20 blocks from a breakpoint.

Token counts are an approximation (a token per four characters of the JSON, images by their
pixels / 750): good enough to see what grows and what stays bounded.

``reply(thinking=())`` (or ``FakeMessagesApi(legacy=True)``) is the legacy shape without thinking,
for the SDK-shape tests that need it. The server is a small asyncio HTTP/1.1 responder
(``Connection: close``, no chunking), so a dropped connection ends the body cleanly, as the real
API's proxies do: the SDK sees a partial message with ``stop_reason`` None and no exception.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import hashlib
import hmac
import json
import secrets
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

MODEL = "claude-sonnet-5-5"
# The Models API's catalogue (GET /v1/models, GET /v1/models/{model_id}), newest first as the API
# lists them: (id, display_name, created_at as RFC 3339), and the aliases it resolves.
MODELS: tuple[tuple[str, str, str], ...] = (
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-11-18T00:00:00Z"),
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-11-18T00:00:00Z"),
    ("claude-fable-5-1", "Claude Fable 5.1", "2026-09-30T00:00:00Z"),
    ("claude-sonnet-5", "Claude Sonnet 5", "2026-06-02T00:00:00Z"),
    ("claude-opus-5", "Claude Opus 5", "2026-06-02T00:00:00Z"),
)
MODEL_ALIASES: dict[str, str] = {}
DEFAULT_THINKING = "The operator says the devvm is in trouble; I will look before I act."
MAX_OUTPUT_TOKENS = 128_000
MIN_CACHEABLE_TOKENS = 512
CACHE_LOOKBACK_BLOCKS = 20
MAX_BREAKPOINTS = 4
CONTEXT_MANAGEMENT_BETA = "context-management-2025-06-27"
BINDING_BETA = "thinking-binding-controls-2026-08-01"
DISPLAY_UPDATES_BETA = "thinking-display-updates-2026-08-18"
CLEARED_PLACEHOLDER = "[This tool result was cleared to save context.]"
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# Which other models' thinking blocks a model reads ("Preserved thinking": a fixed set per
# model). None is listed for the models the tests use: each reads only its own.
READS: dict[str, frozenset[str]] = {}

_TOP_LEVEL = {
    "model",
    "max_tokens",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "stream",
    "metadata",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "thinking",
    "output_config",
    "context_management",
    "service_tier",
    "container",
}
_BLOCK_KEYS = {
    "text": {"type", "text", "cache_control", "citations"},
    "image": {"type", "source", "cache_control"},
    "tool_use": {"type", "id", "name", "input", "cache_control"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"},
    "thinking": {"type", "thinking", "signature"},
    "redacted_thinking": {"type", "data"},
}
_IMAGE_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
MAX_IMAGE_BYTES = 5 * 1024 * 1024


@dataclass
class Sse:
    """A streamed answer: these frames, then (optionally) a stall or a dropped connection.

    ``frames`` are the answer's own frames without thinking; the fake puts the signed thinking
    blocks (``thinking``, and a ``redacted_thinking`` one if ``redacted``) first when it serves
    them, since a signature depends on the request. ``stall_after``/``drop_after`` count the
    frames of ``frames`` (the thinking frames are inserted after ``message_start`` and served
    whole); ``drop_in_thinking`` closes the connection in the middle of the first thinking block,
    before its signature."""

    frames: list[tuple[str, dict[str, Any]]]
    stall_after: int | None = None  # send this many frames, then nothing (until the client quits)
    drop_after: int | None = None  # send this many frames, then close the connection cleanly
    frame_delay_s: float = 0.0  # pause between frames (a slow stream, for cancel tests)
    thinking: tuple[str, ...] = (DEFAULT_THINKING,)
    redacted: bool = False
    drop_in_thinking: bool = False


@dataclass
class HttpError:
    """A non-200 answer before any stream, e.g. 529 overloaded with a retry-after."""

    status: int
    error_type: str
    message: str = "scripted error"
    retry_after_ms: int | None = 0
    headers: dict[str, str] = field(default_factory=dict)


Response = Sse | HttpError


@dataclass
class Recorded:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class _Produced:
    """An answer the fake gave: who produced it and its content as returned (canonical)."""

    model: str
    content: str
    has_thinking: bool


class Rejected(Exception):
    """The request is invalid: answered with this status and message in the API's shape."""

    def __init__(self, message: str, status: int = 400, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type


# -- building scripted answers --------------------------------------------------------------------


def _message_start(input_tokens: int | None, cache_read: int, cache_write: int) -> tuple[str, dict]:
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    # None: the fake counts what the model sees when it serves the answer.
                    "input_tokens": input_tokens,
                    "output_tokens": 1,
                    "cache_creation_input_tokens": cache_write,
                    "cache_read_input_tokens": cache_read,
                },
            },
        },
    )


def _text_frames(index: int, text: str, pieces: int = 3) -> list[tuple[str, dict]]:
    frames: list[tuple[str, dict]] = [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        )
    ]
    step = max(1, -(-len(text) // pieces))
    for i in range(0, len(text), step):
        frames.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": text[i : i + step]},
                },
            )
        )
    frames.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return frames


def _tool_frames(
    index: int, call_id: str, name: str, tool_input: dict[str, Any], *, cut: int | None = None
) -> list[tuple[str, dict]]:
    raw = json.dumps(tool_input)
    if cut is not None:
        raw = raw[:cut]
    frames: list[tuple[str, dict]] = [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    step = max(1, -(-len(raw) // 3))
    for i in range(0, len(raw), step):
        frames.append(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": raw[i : i + step]},
                },
            )
        )
    frames.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return frames


def _end(stop_reason: str | None, output_tokens: int) -> list[tuple[str, dict]]:
    delta: dict[str, Any] = {"stop_reason": stop_reason, "stop_sequence": None}
    if stop_reason == "refusal":
        delta["stop_details"] = {
            "type": "refusal",
            "category": "cyber",
            "explanation": "This request was declined because it could enable cyber harm.",
        }
    return [
        (
            "message_delta",
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def reply(
    text: str | None = None,
    tools: list[tuple[str, str, dict[str, Any]]] = (),  # type: ignore[assignment]
    *,
    stop_reason: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int = 20,
    cache_read: int = 0,
    cache_write: int = 0,
    truncate_last_tool_at: int | None = None,
    thinking: str | tuple[str, ...] | None = DEFAULT_THINKING,
    **sse: Any,
) -> Sse:
    """An assistant message: signed thinking block(s), optional text, then tool_use blocks (id,
    name, input).

    ``stop_reason`` defaults to ``tool_use`` when there are tools, else ``end_turn``.
    ``truncate_last_tool_at`` cuts the last tool's input JSON (max_tokens mid tool input).
    ``thinking`` is the text of the thinking block (a tuple: several blocks; None or ``()``: the
    legacy shape without thinking). ``input_tokens`` None: the fake counts what the model sees;
    a number: that number is reported (and no cache is simulated).
    """
    frames = [_message_start(input_tokens, cache_read, cache_write)]
    index = 0
    if text is not None:
        frames += _text_frames(index, text)
        index += 1
    tools = list(tools)
    for n, (call_id, name, tool_input) in enumerate(tools):
        cut = truncate_last_tool_at if n == len(tools) - 1 else None
        frames += _tool_frames(index, call_id, name, tool_input, cut=cut)
        index += 1
    if stop_reason is None:
        stop_reason = "tool_use" if tools else "end_turn"
    frames += _end(stop_reason, output_tokens)
    if thinking is None:
        blocks: tuple[str, ...] = ()
    elif isinstance(thinking, str):
        blocks = (thinking,)
    else:
        blocks = tuple(thinking)
    return Sse(frames=frames, thinking=blocks, **sse)


def text(text: str, **kw: Any) -> Sse:
    """A text-only answer (after its thinking block)."""
    return reply(text, **kw)


def tool(call_id: str, name: str, tool_input: dict[str, Any], **kw: Any) -> Sse:
    """One tool call (with a short lead-in text unless ``text=None`` is given)."""
    lead = kw.pop("text", "Let me check.")
    return reply(lead, [(call_id, name, tool_input)], **kw)


def error_midstream(error_type: str = "overloaded_error", after: int = 3) -> Sse:
    """A stream that starts, then sends ``event: error`` (status 200 already sent)."""
    base = reply("I will look at the dev", input_tokens=50).frames[:after]
    base.append(
        ("error", {"type": "error", "error": {"type": error_type, "message": "Overloaded"}})
    )
    return Sse(frames=base)


def stalled(after: int = 3) -> Sse:
    """A stream that sends ``after`` frames and then nothing."""
    return Sse(frames=reply("Looking at the devvm now, one moment").frames, stall_after=after)


def dropped(after: int = 4) -> Sse:
    """A stream whose connection closes cleanly before ``message_stop``."""
    return Sse(frames=reply("Looking at the devvm now, one moment").frames, drop_after=after)


def dropped_in_thinking() -> Sse:
    """A stream whose connection closes in the middle of its thinking block: the client holds a
    thinking block without its signature."""
    return Sse(frames=reply("never sent").frames, drop_in_thinking=True)


# -- canonical forms, tokens -------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """``value`` without ``cache_control`` markers and ``null`` fields: what a binding compares."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k != "cache_control" and v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def canonical(value: Any) -> str:
    return json.dumps(_clean(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _image_tokens(block: dict[str, Any]) -> int:
    data = (block.get("source") or {}).get("data") or ""
    with contextlib.suppress(binascii.Error, ValueError, struct.error):
        raw = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4))
        if raw.startswith(b"\x89PNG") and len(raw) >= 24:
            width, height = struct.unpack(">II", raw[16:24])
            return max(1, min(width * height, 1568 * 1568) // 750)
    return 1600


def tokens(value: Any) -> int:
    """Approximate tokens of a JSON value as the model sees it (images by their pixels)."""
    if isinstance(value, dict):
        if value.get("type") == "image":
            return _image_tokens(value)
        return 2 + sum(tokens(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(tokens(v) for v in value)
    if isinstance(value, str):
        return len(value) // 4 + 1
    return 1


# -- the server -----------------------------------------------------------------------------------


class FakeMessagesApi:
    """The fake API server. ``await start()``, script with :meth:`push`, ``await close()``.

    ``requests``/``bodies``: every request received; ``rejections``: the (status, message) of
    every request the fake refused as invalid (a correct client sees none: see
    :meth:`assert_no_rejections`); ``seen_tokens``: per request answered, the input tokens the
    model saw (after context editing); ``transformations``: the ``input_transformations`` each
    answered request reported (thinking blocks the API dropped)."""

    def __init__(self, *, legacy: bool = False, api_key: str | None = None) -> None:
        """``api_key``: the one key this fake's "account" accepts (``x-api-key``); any other
        is answered 401 ``authentication_error`` as the API does. None accepts any key."""
        self.api_key = api_key
        self.script: deque[Response] = deque()
        self.requests: list[Recorded] = []
        self.rejections: list[tuple[int, str]] = []
        self.unscripted = 0
        self.seen_tokens: list[int] = []
        self.transformations: list[list[dict[str, Any]]] = []
        self.applied_edits: list[list[dict[str, Any]]] = []
        self.request_arrived = asyncio.Event()
        self.legacy = legacy
        self._key = secrets.token_bytes(32)
        self._produced: dict[str, _Produced] = {}  # by signature / redacted data
        self._by_tool_id: dict[str, _Produced] = {}
        self._cache: set[tuple[str, str]] = set()  # (model, prefix digest)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests]

    def push(self, *responses: Response) -> None:
        """Queue answers, given in order, one per valid request."""
        self.script.extend(responses)

    def assert_no_rejections(self) -> None:
        """Fail if any request was refused as invalid (what the real API would answer 400)."""
        assert not self.rejections, f"the strict fake refused requests: {self.rejections}"

    async def start(self) -> FakeMessagesApi:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        self.requests.append(Recorded(path=path, headers=headers, body=body))
        self.request_arrived.set()
        try:
            self._authenticate(headers)
            route = urlsplit(path).path
            if route == "/v1/models" or route.startswith("/v1/models/"):
                await self._models(writer, method, path, headers)
                return
            if route != "/v1/messages":
                raise Rejected(f"Not found: {path}", 404, "not_found_error")
            if method != "POST":
                raise Rejected(f"Method {method} is not allowed on {route}", 405, "not_found_error")
            if not isinstance(body, dict) or not body:
                raise Rejected("The request body is not valid JSON.")
            dropped = self._validate(body, headers)
        except Rejected as exc:
            self.rejections.append((exc.status, exc.message))
            await self._http_error(writer, HttpError(exc.status, exc.error_type, exc.message))
            return
        if not self.script:
            self.unscripted += 1
            await self._http_error(
                writer,
                HttpError(400, "invalid_request_error", "fake API: no scripted response left"),
            )
            return
        response = self.script.popleft()
        if isinstance(response, HttpError):
            await self._http_error(writer, response)
        else:
            await self._sse(reader, writer, response, body, dropped)

    # -- authentication and the Models API ---------------------------------------------------

    def _authenticate(self, headers: dict[str, str]) -> None:
        """401 ``authentication_error`` without the account's key, as the API answers. The key
        comes as ``x-api-key`` or, as the current SDK sends it, ``Authorization: Bearer``."""
        if self.api_key is None:
            return
        bearer = headers.get("authorization", "")
        given = headers.get("x-api-key") or (
            bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else ""
        )
        if not given:
            raise Rejected("x-api-key header is required", 401, "authentication_error")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise Rejected("invalid x-api-key", 401, "authentication_error")

    @staticmethod
    def _model_info(model_id: str, display_name: str, created_at: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model_id,
            "display_name": display_name,
            "created_at": created_at,
        }

    async def _models(
        self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str]
    ) -> None:
        """``GET /v1/models`` (a page: ``data``, ``has_more``, ``first_id``, ``last_id``; the
        ``limit`` 1-1000, default 20, ``after_id`` / ``before_id`` cursors) and ``GET
        /v1/models/{model_id}`` (a ModelInfo, or 404 ``not_found_error``). GET only, with the
        ``anthropic-version`` header, as the API documents them. Nothing is generated."""
        if method != "GET":
            raise Rejected(
                f"Method {method} is not allowed on the Models API", 405, "not_found_error"
            )
        if not headers.get("anthropic-version"):
            raise Rejected("anthropic-version: header is required")
        parts = urlsplit(path)
        catalogue = [self._model_info(*model) for model in MODELS]
        if parts.path.startswith("/v1/models/"):
            wanted = parts.path.removeprefix("/v1/models/")
            wanted = MODEL_ALIASES.get(wanted, wanted)
            for info in catalogue:
                if info["id"] == wanted:
                    await self._json(writer, info)
                    return
            raise Rejected(f"model: {wanted[:100]}", 404, "not_found_error")
        query = dict(parse_qsl(parts.query))
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise Rejected("limit: Input should be a valid integer") from None
        if not 1 <= limit <= 1000:
            raise Rejected("limit: Input should be between 1 and 1000")
        ids = [info["id"] for info in catalogue]
        start, end = 0, len(catalogue)
        if "after_id" in query:
            if query["after_id"] not in ids:
                raise Rejected(f"after_id: no model {query['after_id'][:100]}")
            start = ids.index(query["after_id"]) + 1
        if "before_id" in query:
            if query["before_id"] not in ids:
                raise Rejected(f"before_id: no model {query['before_id'][:100]}")
            end = ids.index(query["before_id"])
        window = catalogue[start:end]
        page = (
            window[-limit:] if "before_id" in query and "after_id" not in query else window[:limit]
        )
        await self._json(
            writer,
            {
                "data": page,
                "has_more": len(window) > len(page),
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            },
        )

    async def _json(self, writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        payload = json.dumps(doc).encode()
        request_id = f"req_fake{len(self.requests):04d}{secrets.token_hex(6)}"
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n"
            f"request-id: {request_id}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()

    # -- validation ---------------------------------------------------------------------------

    def _validate(self, body: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
        """Refuse what the API refuses; return the thinking blocks it drops without an error."""
        betas = {b.strip() for b in headers.get("anthropic-beta", "").split(",") if b.strip()}
        unknown = sorted(set(body) - _TOP_LEVEL)
        if unknown:
            raise Rejected(f"{unknown[0]}: Extra inputs are not permitted")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise Rejected("model: Field required")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise Rejected("max_tokens: Field required (a positive integer)")
        if max_tokens > MAX_OUTPUT_TOKENS:
            raise Rejected(
                f"max_tokens: {max_tokens} > {MAX_OUTPUT_TOKENS}, which is the maximum allowed"
                f" number of output tokens for {model}"
            )
        for name in ("temperature", "top_p", "top_k"):
            if name in body and not (name == "temperature" and body[name] == 1):
                raise Rejected(
                    f"`{name}` is not supported on {model}: remove it (sampling parameters are"
                    " fixed on this model)."
                )
        self._validate_thinking(body, model, betas)
        effort = (body.get("output_config") or {}).get("effort")
        if effort is not None and effort not in EFFORTS:
            raise Rejected(f"output_config.effort: Input should be one of {', '.join(EFFORTS)}")
        choice = body.get("tool_choice")
        if choice is not None:
            kind = choice.get("type") if isinstance(choice, dict) else None
            if kind in ("any", "tool"):
                raise Rejected(
                    f"tool_choice.type {kind!r} is not supported on {model}: forced tool use is"
                    " not available with thinking. Use 'auto' or 'none'."
                )
            if kind not in ("auto", "none"):
                raise Rejected("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        self._validate_context_management(body, betas)
        tool_names = self._validate_tools(body)
        self._validate_messages(body, tool_names)
        return self._check_thinking_blocks(body, betas)

    def _validate_thinking(self, body: dict[str, Any], model: str, betas: set[str]) -> None:
        thinking = body.get("thinking")
        if thinking is None:
            return
        if not isinstance(thinking, dict):
            raise Rejected("thinking: Input should be an object")
        kind = thinking.get("type")
        if kind == "disabled":
            raise Rejected(
                f"thinking.type 'disabled' is not supported on {model}. To turn off up-front"
                ' thinking, send thinking: {"type": "between_tools"}.'
            )
        if kind == "enabled" or "budget_tokens" in thinking:
            raise Rejected(
                f"thinking.type 'enabled' and budget_tokens are not supported on {model}. Use"
                ' thinking: {"type": "adaptive"} and output_config.effort.'
            )
        if kind == "between_tools":
            effort = (body.get("output_config") or {}).get("effort")
            if effort in ("xhigh", "max"):
                raise Rejected(
                    f"thinking.type 'between_tools' is not available at effort {effort!r}: use"
                    " adaptive thinking for xhigh or max."
                )
            if set(thinking) - {"type"}:
                raise Rejected("thinking: between_tools takes no other field")
            return
        if kind != "adaptive":
            raise Rejected("thinking.type: Input should be 'adaptive' or 'between_tools'")
        extra = set(thinking) - {"type", "display", "block_binding"}
        if extra:
            raise Rejected(f"thinking.{sorted(extra)[0]}: Extra inputs are not permitted")
        display = thinking.get("display")
        allowed = ("summarized", "omitted", None)
        if display == "updates" and DISPLAY_UPDATES_BETA not in betas:
            raise Rejected(f"thinking.display 'updates' needs the beta {DISPLAY_UPDATES_BETA}")
        if display not in (*allowed, "updates"):
            raise Rejected("thinking.display: Input should be 'summarized' or 'omitted'")
        if thinking.get("block_binding") is not None and BINDING_BETA not in betas:
            raise Rejected(f"thinking.block_binding needs the beta header {BINDING_BETA}")

    def _validate_context_management(self, body: dict[str, Any], betas: set[str]) -> None:
        cm = body.get("context_management")
        if cm is None:
            return
        if CONTEXT_MANAGEMENT_BETA not in betas:
            raise Rejected(
                "context_management: Extra inputs are not permitted (it needs the beta header"
                f" anthropic-beta: {CONTEXT_MANAGEMENT_BETA})"
            )
        for n, edit in enumerate((cm or {}).get("edits") or []):
            if edit.get("type") not in ("clear_tool_uses_20250919", "clear_thinking_20251015"):
                raise Rejected(f"context_management.edits.{n}.type: unknown strategy")

    def _validate_tools(self, body: dict[str, Any]) -> set[str]:
        names: set[str] = set()
        for n, t in enumerate(body.get("tools") or []):
            if not isinstance(t, dict) or not t.get("name") or "input_schema" not in t:
                raise Rejected(f"tools.{n}: a tool needs a name and an input_schema")
            if t["name"] in names:
                raise Rejected(f"tools: Tool names must be unique ({t['name']!r} repeats)")
            names.add(t["name"])
        return names

    def _validate_messages(self, body: dict[str, Any], tool_names: set[str]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Rejected("messages: at least one message is required")
        breakpoints = sum(1 for t in body.get("tools") or [] if "cache_control" in t)
        system = body.get("system")
        if isinstance(system, list):
            breakpoints += sum(1 for b in system if isinstance(b, dict) and "cache_control" in b)
        pending: list[str] = []  # tool_use ids the next message must answer first
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise Rejected(f"messages.{i}: Input should be an object")
            extra = sorted(set(m) - {"role", "content"})
            if extra:
                raise Rejected(f"messages.{i}.{extra[0]}: Extra inputs are not permitted")
            role = m.get("role")
            if role not in ("user", "assistant"):
                raise Rejected(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            content = m.get("content")
            if isinstance(content, str):
                if not content:
                    raise Rejected(f"messages.{i}: all messages must have non-empty content")
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list) or not content:
                raise Rejected(f"messages.{i}: all messages must have non-empty content")
            if pending:
                head = [b.get("tool_use_id") for b in content[: len(pending)]]
                if role != "user" or sorted(map(str, head)) != sorted(pending):
                    raise Rejected(
                        f"messages.{i}: `tool_use` ids were found without `tool_result` blocks"
                        f" immediately after: {', '.join(pending)}. Each `tool_use` block must"
                        " have a corresponding `tool_result` block in the next message, and the"
                        " tool_result blocks must come first."
                    )
            pending = []
            seen_other = False
            for j, b in enumerate(content):
                where = f"messages.{i}.content.{j}"
                kind = b.get("type") if isinstance(b, dict) else None
                if kind not in _BLOCK_KEYS:
                    raise Rejected(f"{where}.type: unknown content block type {kind!r}")
                extra = sorted(set(b) - _BLOCK_KEYS[kind])
                if extra:
                    raise Rejected(f"{where}.{extra[0]}: Extra inputs are not permitted")
                if "cache_control" in b:
                    breakpoints += 1
                if kind == "text" and not b.get("text"):
                    raise Rejected(f"{where}: text content blocks must be non-empty")
                if kind in ("thinking", "redacted_thinking", "tool_use") and role != "assistant":
                    raise Rejected(f"{where}: {kind} blocks are only allowed in assistant turns")
                if kind == "tool_result":
                    if role != "user":
                        raise Rejected(f"{where}: tool_result blocks belong in user turns")
                    if seen_other:
                        raise Rejected(
                            f"{where}: tool_result blocks must come first in the content, before"
                            " any text"
                        )
                    self._validate_result_content(b, where)
                else:
                    seen_other = True
                if kind in ("tool_use", "tool_result") and not tool_names:
                    raise Rejected(
                        "Requests which include `tool_use` or `tool_result` blocks must define"
                        " tools."
                    )
                if kind == "tool_use":
                    if not isinstance(b.get("input"), dict):
                        raise Rejected(f"{where}.input: Input should be an object")
                    pending.append(str(b.get("id")))
                if kind == "image":
                    self._validate_image(b, where)
                if kind == "thinking" and not b.get("signature"):
                    raise Rejected(f"{where}.signature: Field required")
        if pending:
            raise Rejected(
                f"messages.{len(messages) - 1}: `tool_use` ids were found without `tool_result`"
                f" blocks immediately after: {', '.join(pending)}."
            )
        if messages[-1].get("role") != "user":
            raise Rejected(
                f"This model does not support assistant message prefill: the conversation must"
                f" end with a user message (messages.{len(messages) - 1} is an assistant turn)."
            )
        if breakpoints > MAX_BREAKPOINTS:
            raise Rejected(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided."
                f" Found {breakpoints}."
            )

    def _validate_result_content(self, block: dict[str, Any], where: str) -> None:
        content = block.get("content")
        if content is None or isinstance(content, str):
            return
        if not isinstance(content, list):
            raise Rejected(f"{where}.content: Input should be a string or a list of blocks")
        for k, inner in enumerate(content):
            kind = inner.get("type") if isinstance(inner, dict) else None
            if kind == "text":
                if not inner.get("text"):
                    raise Rejected(f"{where}.content.{k}: text content blocks must be non-empty")
            elif kind == "image":
                self._validate_image(inner, f"{where}.content.{k}")
            else:
                raise Rejected(f"{where}.content.{k}.type: expected text or image")

    def _validate_image(self, block: dict[str, Any], where: str) -> None:
        source = block.get("source") or {}
        if source.get("type") != "base64":
            raise Rejected(f"{where}.source.type: only base64 images are accepted here")
        media = source.get("media_type")
        if media not in _IMAGE_MAGIC:
            raise Rejected(
                f"{where}.source.media_type: Input should be one of {list(_IMAGE_MAGIC)}"
            )
        try:
            raw = base64.b64decode(source.get("data") or "", validate=True)
        except (binascii.Error, ValueError):
            raise Rejected(f"{where}.source.data: invalid base64 data") from None
        if not raw:
            raise Rejected(f"{where}.source.data: the image is empty")
        if len(raw) > MAX_IMAGE_BYTES:
            raise Rejected(f"{where}.source: image exceeds 5 MB maximum: {len(raw)} bytes")
        if not raw.startswith(_IMAGE_MAGIC[media]):
            raise Rejected(f"{where}.source: Image does not match the provided media type {media}")

    # -- thinking blocks: signatures, binding ---------------------------------------------------

    def _mac(self, model: str, prefix: str, payload: str) -> str:
        message = f"{model}\0{prefix}\0{payload}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    @staticmethod
    def _prefix(body: dict[str, Any], messages: list[Any], partial: list[Any]) -> str:
        """The digest of a block's prefix: system, tools, earlier messages, earlier blocks."""
        doc = [body.get("system"), body.get("tools"), messages, partial]
        return hashlib.sha256(canonical(doc).encode()).hexdigest()

    @staticmethod
    def _tag(model: str) -> str:
        return base64.urlsafe_b64encode(model.encode()).decode().rstrip("=")

    @staticmethod
    def _model_of(token: str) -> str | None:
        parts = token.split(".")
        if len(parts) < 3 or parts[0] not in ("fake1", "fakeR"):
            return None
        with contextlib.suppress(binascii.Error, ValueError, UnicodeDecodeError):
            return base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)).decode()
        return None

    def _sign(self, model: str, prefix: str, block: dict[str, Any]) -> dict[str, Any]:
        if block["type"] == "thinking":
            mac = self._mac(model, prefix, "thinking:" + block["thinking"])
            return {**block, "signature": f"fake1.{self._tag(model)}.{mac}"}
        nonce = secrets.token_hex(8)
        mac = self._mac(model, prefix, "redacted:" + nonce)
        return {**block, "data": f"fakeR.{self._tag(model)}.{nonce}.{mac}"}

    def _verify(self, model: str, prefix: str, block: dict[str, Any]) -> bool:
        if block["type"] == "thinking":
            token = str(block.get("signature") or "")
            parts = token.split(".")
            if len(parts) != 3:
                return False
            expected = self._mac(model, prefix, "thinking:" + str(block.get("thinking", "")))
            return hmac.compare_digest(parts[2], expected)
        parts = str(block.get("data") or "").split(".")
        if len(parts) != 4:
            return False
        return hmac.compare_digest(parts[3], self._mac(model, prefix, "redacted:" + parts[2]))

    def _check_thinking_blocks(self, body: dict[str, Any], betas: set[str]) -> list[dict[str, Any]]:
        model = body["model"]
        messages = body["messages"]
        binding = (body.get("thinking") or {}).get("block_binding") or {}
        drop_mode = binding.get("prefix_mismatch_behavior") == "drop_block"
        readable = {model} | READS.get(model, frozenset())
        dropped: list[dict[str, Any]] = []
        invalid = False  # a failing block invalidates every later one
        # The current tool loop: the assistant turns after the last operator text.
        loop_start = 0
        for i, m in enumerate(messages):
            content = m["content"] if isinstance(m["content"], list) else [{"type": "text"}]
            if m["role"] == "user" and any(b.get("type") != "tool_result" for b in content):
                loop_start = i + 1
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not isinstance(m["content"], list):
                continue
            content = m["content"]
            thinking_at = [
                j for j, b in enumerate(content) if b["type"] in ("thinking", "redacted_thinking")
            ]
            for j in thinking_at:
                block = content[j]
                where = f"messages.{i}.content.{j}"
                token = block.get("signature") if block["type"] == "thinking" else block.get("data")
                made_by = self._model_of(str(token or ""))
                if made_by is None:
                    raise Rejected(f"{where}: Invalid `signature` in `{block['type']}` block.")
                if made_by not in readable:
                    dropped.append(
                        {
                            "type": "thinking_dropped",
                            "path": where,
                            "reason": "model_binding_mismatch",
                        }
                    )
                    continue
                prefix = self._prefix(body, messages[:i], content[:j])
                if invalid or not self._verify(made_by, prefix, block):
                    if drop_mode:
                        invalid = True
                        dropped.append(
                            {
                                "type": "thinking_dropped",
                                "path": where,
                                "reason": "prefix_binding_mismatch",
                            }
                        )
                        continue
                    raise Rejected(
                        f"{where}: Invalid `signature` in `{block['type']}` block. The block is"
                        " bound to a different conversation. Remove the block, or set"
                        ' `thinking.block_binding.prefix_mismatch_behavior` to "drop_block".'
                    )
            if thinking_at:
                first = content[thinking_at[0]]
                token = first.get("signature") if first["type"] == "thinking" else first.get("data")
                produced = self._produced.get(str(token))
                if produced is not None and canonical(content) != produced.content:
                    raise Rejected(
                        f"messages.{i}: the assistant message differs from the one the API"
                        " returned. Send assistant turns back exactly as received: every"
                        " thinking and redacted_thinking block, unmodified and in order, with the"
                        " rest of the turn."
                    )
            elif i >= loop_start:
                for b in content:
                    produced = (
                        self._by_tool_id.get(str(b.get("id"))) if b["type"] == "tool_use" else None
                    )
                    if (
                        produced is not None
                        and produced.has_thinking
                        and produced.model in readable
                    ):
                        raise Rejected(
                            f"messages.{i}.content.0.type: Expected `thinking` or"
                            f" `redacted_thinking`, but found `{content[0]['type']}`. When"
                            " returning tool results, the assistant message that asked for them"
                            " must come back with its thinking blocks, complete and unmodified."
                        )
        return dropped

    # -- what the model sees: context editing, tokens, cache ------------------------------------

    def _model_view(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The request as the model sees it after context editing, and the edits applied."""
        view = copy.deepcopy(body)
        applied: list[dict[str, Any]] = []
        edits = (body.get("context_management") or {}).get("edits") or []
        for edit in edits:
            if edit.get("type") != "clear_tool_uses_20250919":
                continue
            applied_edit = self._clear_tool_uses(view, edit)
            if applied_edit is not None:
                applied.append(applied_edit)
        return view, applied

    @staticmethod
    def _clear_tool_uses(view: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any] | None:
        messages = view["messages"]
        uses: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
        results: dict[str, dict[str, Any]] = {}
        for m in messages:
            if m["role"] == "user" and isinstance(m["content"], list):
                for b in m["content"]:
                    if b.get("type") == "tool_result":
                        results[str(b.get("tool_use_id"))] = b
        for m in messages:
            if m["role"] == "assistant" and isinstance(m["content"], list):
                for b in m["content"]:
                    if b.get("type") == "tool_use":
                        uses.append((b, results.get(str(b.get("id")))))
        trigger = edit.get("trigger") or {"type": "input_tokens", "value": 100_000}
        total = tokens([view.get("system"), view.get("tools"), messages])
        measure = total if trigger.get("type") == "input_tokens" else len(uses)
        if measure <= int(trigger.get("value", 0)):
            return None
        keep = int((edit.get("keep") or {"value": 3}).get("value", 3))
        exclude = set(edit.get("exclude_tools") or [])
        candidates = uses[: max(0, len(uses) - keep)]
        chosen = [
            (use, result)
            for use, result in candidates
            if result is not None
            and use.get("name") not in exclude
            and result.get("content") != CLEARED_PLACEHOLDER
        ]
        cleared = sum(tokens(r.get("content")) for _, r in chosen if r is not None)
        cleared -= len(chosen) * tokens(CLEARED_PLACEHOLDER)
        at_least = (edit.get("clear_at_least") or {}).get("value")
        if not chosen or (at_least is not None and cleared < int(at_least)):
            return None
        for use, result in chosen:
            assert result is not None
            result["content"] = CLEARED_PLACEHOLDER
            if edit.get("clear_tool_inputs") is True:
                use["input"] = {}
        return {
            "type": "clear_tool_uses_20250919",
            "cleared_tool_uses": len(chosen),
            "cleared_input_tokens": max(0, cleared),
        }

    def _usage(self, view: dict[str, Any]) -> tuple[int, int, int, int]:
        """(input, cache write, cache read, total) tokens of what the model sees, with prompt
        caching simulated at the request's breakpoints."""
        segments: list[Any] = []
        marked: list[bool] = []
        for t in view.get("tools") or []:
            segments.append(t)
            marked.append("cache_control" in t)
        system = view.get("system")
        for b in system if isinstance(system, list) else [system] if system else []:
            segments.append(b)
            marked.append(isinstance(b, dict) and "cache_control" in b)
        for m in view["messages"]:
            content = m["content"] if isinstance(m["content"], list) else [m["content"]]
            for b in content:
                segments.append([m["role"], b])
                marked.append(isinstance(b, dict) and "cache_control" in b)
        model = view["model"]
        running = hashlib.sha256()
        cumulative = 0
        digests: list[str] = []
        counts: list[int] = []
        for seg in segments:
            running.update(canonical(seg).encode())
            cumulative += tokens(seg)
            digests.append(running.copy().hexdigest())
            counts.append(cumulative)
        total = cumulative
        breakpoints = [k for k, is_marked in enumerate(marked) if is_marked]
        read = 0
        for bp in breakpoints:
            for k in range(bp, max(-1, bp - CACHE_LOOKBACK_BLOCKS), -1):
                if (model, digests[k]) in self._cache:
                    read = max(read, counts[k])
                    break
        write = 0
        if breakpoints and counts[breakpoints[-1]] >= MIN_CACHEABLE_TOKENS:
            write = max(0, counts[breakpoints[-1]] - read)
        for bp in breakpoints:
            if counts[bp] >= MIN_CACHEABLE_TOKENS:
                self._cache.add((model, digests[bp]))
        return total - read - write, write, read, total

    # -- answering ------------------------------------------------------------------------------

    async def _http_error(self, writer: asyncio.StreamWriter, error: HttpError) -> None:
        request_id = f"req_fake{len(self.requests):04d}{secrets.token_hex(6)}"
        payload = json.dumps(
            {
                "type": "error",
                "error": {"type": error.error_type, "message": error.message},
                "request_id": request_id,
            }
        ).encode()
        headers = {
            "content-type": "application/json",
            "content-length": str(len(payload)),
            "connection": "close",
            "request-id": request_id,
            **error.headers,
        }
        if error.retry_after_ms is not None:
            headers["retry-after-ms"] = str(error.retry_after_ms)
        if error.status == 400:
            headers["x-should-retry"] = "false"
        head = f"HTTP/1.1 {error.status} Error\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()

    def _render(
        self, sse: Sse, body: dict[str, Any], dropped: list[dict[str, Any]]
    ) -> tuple[list[tuple[str, dict[str, Any]]], int]:
        """The frames to send for ``sse`` to this request: usage counted, model named, thinking
        blocks signed and put first; and how many frames were inserted after message_start."""
        model = body["model"]
        frames = copy.deepcopy(sse.frames)
        view, applied = self._model_view(body)
        scripted = None
        for _name, data in frames:
            if data.get("type") == "message_start":
                data["message"]["model"] = model
                scripted = data["message"]["usage"].get("input_tokens")
        if scripted is None:
            fresh, write, read, total = self._usage(view)
        else:
            fresh, write, read = scripted, None, None
            total = tokens([view.get("system"), view.get("tools"), view["messages"]])
        self.seen_tokens.append(total)
        self.transformations.append(dropped)
        self.applied_edits.append(applied)
        for _name, data in frames:
            if data.get("type") == "message_start":
                usage = data["message"]["usage"]
                usage["input_tokens"] = fresh
                if write is not None:
                    usage["cache_creation_input_tokens"] = write
                    usage["cache_read_input_tokens"] = read
            if data.get("type") == "message_delta":
                usage = data["usage"]
                usage.update(
                    {
                        "input_tokens": fresh,
                        "cache_creation_input_tokens": write
                        if write is not None
                        else frames[0][1]["message"]["usage"]["cache_creation_input_tokens"],
                        "cache_read_input_tokens": read
                        if read is not None
                        else frames[0][1]["message"]["usage"]["cache_read_input_tokens"],
                    }
                )
                if applied:
                    data["context_management"] = {"applied_edits": applied}
                if dropped:
                    data["input_transformations"] = dropped
        texts = () if self.legacy else sse.thinking
        display = (body.get("thinking") or {}).get("display") or "omitted"
        shown = display in ("summarized", "updates")
        head: list[tuple[str, dict[str, Any]]] = []
        produced: list[dict[str, Any]] = []
        blocks: list[dict[str, Any]] = [
            {"type": "thinking", "thinking": t if shown else "", "signature": ""} for t in texts
        ]
        if sse.redacted and not self.legacy:
            blocks.append({"type": "redacted_thinking", "data": ""})
        for index, block in enumerate(blocks):
            signed = self._sign(model, self._prefix(body, body["messages"], produced), block)
            produced.append(signed)
            if signed["type"] == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                head.append(_block_start(index, start))
                words = signed["thinking"]
                half = len(words) // 2
                for piece in (words[:half], words[half:]) if words else ():
                    if piece:
                        head.append(_delta(index, {"type": "thinking_delta", "thinking": piece}))
                head.append(
                    _delta(index, {"type": "signature_delta", "signature": signed["signature"]})
                )
            else:
                head.append(_block_start(index, signed))
            head.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        shift = len(blocks)
        for _name, data in frames:
            if "index" in data:
                data["index"] += shift
        content = produced + _accumulate(frames)
        record = _Produced(model, canonical(content), bool(produced))
        for block in produced:
            token = block.get("signature") or block.get("data")
            self._produced[str(token)] = record
        for block in content:
            if block.get("type") == "tool_use":
                self._by_tool_id[str(block.get("id"))] = record
        return [frames[0], *head, *frames[1:]], len(head)

    async def _sse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sse: Sse,
        body: dict[str, Any],
        dropped: list[dict[str, Any]],
    ) -> None:
        frames, inserted = self._render(sse, body, dropped)
        request_id = f"req_fake{len(self.requests):04d}{secrets.token_hex(6)}"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n"
            + f"request-id: {request_id}\r\n\r\n".encode()
        )
        await writer.drain()
        stall_at = None if sse.stall_after is None else _shifted(sse.stall_after, inserted)
        drop_at = None if sse.drop_after is None else _shifted(sse.drop_after, inserted)
        if sse.drop_in_thinking and inserted:
            # Just before the first block's signature: the client holds unsigned thinking.
            drop_at = next(
                n
                for n, (_name, data) in enumerate(frames)
                if data.get("delta", {}).get("type") == "signature_delta"
            )
        for n, (name, data) in enumerate(frames):
            if stall_at is not None and n >= stall_at:
                # Silence until the client gives up (its read timeout) and closes.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.read(1), 120)
                return
            if drop_at is not None and n >= drop_at:
                return  # the connection closes in _serve: a clean end of the body
            writer.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            await writer.drain()
            if sse.frame_delay_s:
                await asyncio.sleep(sse.frame_delay_s)


def _shifted(count: int, inserted: int) -> int:
    """A count of scripted frames as a position in the served frames (thinking inserted after
    message_start, served whole)."""
    return count if count < 1 else count + inserted


def _block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": dict(block)},
    )


def _delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _accumulate(frames: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The content blocks ``frames`` deliver (text and tool_use), as the client accumulates
    them."""
    blocks: dict[int, dict[str, Any]] = {}
    raw: dict[int, str] = {}
    for _name, data in frames:
        kind = data.get("type")
        if kind == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"])
            raw[data["index"]] = ""
        elif kind == "content_block_delta":
            block, delta = blocks.get(data["index"]), data["delta"]
            if block is None:
                continue
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                raw[data["index"]] += delta["partial_json"]
        elif kind == "content_block_stop":
            block = blocks.get(data["index"])
            if block is not None and block["type"] == "tool_use":
                with contextlib.suppress(ValueError):
                    block["input"] = json.loads(raw[data["index"]] or "{}")
    return [blocks[k] for k in sorted(blocks)]
