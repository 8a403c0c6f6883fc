"""A local fake of the Anthropic Messages API over real HTTP, for the real SDK to talk to.

The Claude API is the one part that cannot be real in tests, so this serves ``POST /v1/messages``
on 127.0.0.1 with Server-Sent Events exactly as the API frames them (an ``event:`` line and a
``data:`` line per frame; ``message_start``, ``content_block_start``/``_delta``/``_stop`` per block,
``message_delta`` with stop_reason and usage, ``message_stop``; ``event: error`` for errors
mid-stream). Each test scripts a queue of responses (streams, HTTP errors such as 529 with
``retry-after``, a stall after N frames, a connection dropped before ``message_stop``) and reads
back the request bodies it received. Point the SDK at :attr:`FakeMessagesApi.base_url`.

The server is a small asyncio HTTP/1.1 responder (``Connection: close``, no chunking), so a dropped
connection ends the body cleanly, as the real API's proxies do: the SDK sees a partial message with
``stop_reason`` None and no exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MODEL = "claude-sonnet-4-6"


@dataclass
class Sse:
    """A streamed response: these frames, then (optionally) a stall or a dropped connection."""

    frames: list[tuple[str, dict[str, Any]]]
    stall_after: int | None = None  # send this many frames, then nothing (until the client quits)
    drop_after: int | None = None  # send this many frames, then close the connection cleanly
    frame_delay_s: float = 0.0  # pause between frames (a slow stream, for cancel tests)


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


# -- building scripted responses ------------------------------------------------------------------


def _message_start(input_tokens: int, cache_read: int, cache_write: int) -> tuple[str, dict]:
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
    return [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def reply(
    text: str | None = None,
    tools: list[tuple[str, str, dict[str, Any]]] = (),  # type: ignore[assignment]
    *,
    stop_reason: str | None = None,
    input_tokens: int = 100,
    output_tokens: int = 20,
    cache_read: int = 0,
    cache_write: int = 0,
    truncate_last_tool_at: int | None = None,
    **sse: Any,
) -> Sse:
    """An assistant message: optional text, then tool_use blocks (id, name, input).

    ``stop_reason`` defaults to ``tool_use`` when there are tools, else ``end_turn``.
    ``truncate_last_tool_at`` cuts the last tool's input JSON (max_tokens mid tool input).
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
    return Sse(frames=frames, **sse)


def text(text: str, **kw: Any) -> Sse:
    """A text-only answer."""
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


# -- the server -----------------------------------------------------------------------------------


class FakeMessagesApi:
    """The fake API server. ``await start()``, script with :meth:`push`, ``await close()``."""

    def __init__(self) -> None:
        self.script: deque[Response] = deque()
        self.requests: list[Recorded] = []
        self.request_arrived = asyncio.Event()
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
        """Queue responses, answered in order, one per request."""
        self.script.extend(responses)

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
        _method, path, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        body = json.loads(raw) if raw else {}
        self.requests.append(Recorded(path=path, headers=headers, body=body))
        self.request_arrived.set()
        if not self.script:
            await self._http_error(
                writer,
                HttpError(400, "invalid_request_error", "fake API: no scripted response left"),
            )
            return
        response = self.script.popleft()
        if isinstance(response, HttpError):
            await self._http_error(writer, response)
        else:
            await self._sse(reader, writer, response)

    async def _http_error(self, writer: asyncio.StreamWriter, error: HttpError) -> None:
        payload = json.dumps(
            {"type": "error", "error": {"type": error.error_type, "message": error.message}}
        ).encode()
        headers = {
            "content-type": "application/json",
            "content-length": str(len(payload)),
            "connection": "close",
            "request-id": f"req_fake_{len(self.requests)}",
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

    async def _sse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sse: Sse
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n"
            + f"request-id: req_fake_{len(self.requests)}\r\n\r\n".encode()
        )
        await writer.drain()
        for n, (name, data) in enumerate(sse.frames):
            if sse.stall_after is not None and n >= sse.stall_after:
                # Silence until the client gives up (its read timeout) and closes.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.read(1), 120)
                return
            if sse.drop_after is not None and n >= sse.drop_after:
                return  # the connection closes in _serve: a clean end of the body
            writer.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            await writer.drain()
            if sse.frame_delay_s:
                await asyncio.sleep(sse.frame_delay_s)
