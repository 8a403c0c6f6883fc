"""One model turn: the request, one streamed answer under a deadline, and what went wrong.

:class:`ModelClient` owns the SDK (imported lazily: ``import anthropic`` costs seconds and every
browser tab is a new process) and the client; :meth:`ModelClient.stream` asks once and returns a
:class:`Reply`, or raises :class:`TurnFailed` with the failure's kind (the retries, the fallback
model and manual mode are the agent's). It takes an ``emit`` callable and knows no agent.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from breakglass_tui.config import Settings
from breakglass_tui.core import conversation
from breakglass_tui.core.events import (
    ApiError,
    AssistantTextDelta,
    AssistantThinkingDelta,
    AssistantThinkingEnded,
    AssistantThinkingStarted,
    AssistantTurnEnded,
    AssistantTurnStarted,
    Event,
    ModelSwitched,
    Usage,
)
from breakglass_tui.core.pricing import add, cost_usd
from breakglass_tui.core.records import Record

MAX_TOKENS_CAP = 128_000
# Ask for the thinking text back: on Sonnet 5.5 and Opus 5.5 the text between tool calls comes in
# thinking blocks, empty under the default display ("omitted"); "summarized" returns it.
THINKING = {"type": "adaptive", "display": "summarized"}


class TurnFailed(Exception):
    """One attempt at a model turn failed in a way worth telling the operator about."""

    def __init__(self, kind: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable


@dataclass
class Reply:
    """One assistant message: its content as the SDK accumulated it (kept verbatim for the
    conversation), how it ended, and what the stream showed on the way."""

    turn_id: str
    model: str
    basis: str  # the digest of the request that produced it (conversation.request_messages)
    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    got_message_stop: bool = False
    usage: Usage = field(default_factory=Usage)
    # Per content index: the tool call's raw JSON and whether its block was closed.
    tool_json: dict[int, str] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)
    streamed_text: list[str] = field(default_factory=list)
    streamed_thinking: list[str] = field(default_factory=list)
    thinking_since: float | None = None
    thinking_s: float = 0.0
    applied_edits: list[dict[str, Any]] = field(default_factory=list)
    dropped_by_api: list[dict[str, Any]] = field(default_factory=list)
    block_types: dict[int, str] = field(default_factory=dict)
    refusal_category: str | None = None

    @property
    def text(self) -> str:
        if self.content:
            return "".join(b.get("text", "") for b in self.content if b.get("type") == "text")
        return "".join(self.streamed_text)

    @property
    def thinking(self) -> str:
        return "".join(self.streamed_thinking)

    @property
    def tool_uses(self) -> list[dict[str, Any]]:
        return [b for b in self.content if b.get("type") == "tool_use"]

    def truncated_tool_use(self) -> bool:
        """A tool call cut short (max_tokens inside its input, or a block never closed)."""
        for index, block in enumerate(self.content):
            if block.get("type") != "tool_use":
                continue
            if index not in self.closed:
                return True
            raw = self.tool_json.get(index, "")
            try:
                value = json.loads(raw) if raw.strip() else {}
            except ValueError:
                return True
            if not isinstance(value, dict):
                return True
        last_is_tool = bool(self.content) and self.content[-1].get("type") == "tool_use"
        return self.stop_reason == "max_tokens" and last_is_tool

    def unsigned_thinking(self) -> bool:
        """A thinking block without its signature: never to be kept or sent back."""
        return any(
            (b.get("type") == "thinking" and not b.get("signature"))
            or (b.get("type") == "redacted_thinking" and not b.get("data"))
            for b in self.content
        )

    def worth_keeping(self) -> bool:
        """Text or a tool call: a turn of only thinking adds nothing to the conversation."""
        return any(b.get("type") in ("text", "tool_use") for b in self.content)


def check_reply(reply: Reply) -> TurnFailed | None:
    """What is wrong with a streamed reply that the stream itself did not say, or None."""
    if not reply.got_message_stop or reply.stop_reason is None:
        return TurnFailed(
            "dropped",
            "the API stream ended before message_stop (a partial message); it was discarded",
        )
    if reply.unsigned_thinking():
        return TurnFailed(
            "dropped", "a thinking block came without its signature; the message was discarded"
        )
    if reply.truncated_tool_use():
        return TurnFailed(
            "max_tokens",
            "the reply hit max_tokens in the middle of a tool call's input; the truncated"
            " call was not executed",
        )
    if reply.stop_reason == "refusal":
        category = f", category {reply.refusal_category}" if reply.refusal_category else ""
        # The same request would be refused again: no retry on this model.
        return TurnFailed(
            "refusal", f"stop_reason refusal{category} from {reply.model}", retryable=False
        )
    return None


def thinking_binding_error(failure: TurnFailed) -> bool:
    """A 400 about a thinking block sent back ("bound to a different conversation", an invalid
    signature): repairable by leaving the earlier turns' thinking out."""
    text = failure.message.lower()
    return (
        failure.kind == "bad_request"
        and "thinking" in text
        and ("bound to a different conversation" in text or "invalid `signature`" in text)
    )


def classify_status(exc: Any) -> TurnFailed:
    status = getattr(exc, "status_code", None)
    etype = getattr(exc, "type", None) or ""
    detail = getattr(exc, "message", str(exc))
    if status == 200:
        # An `error` event in the middle of the stream: the SDK does not retry these.
        return TurnFailed(
            "overloaded" if etype == "overloaded_error" else "stream_error",
            f"the API sent an error event mid-stream ({etype or 'unknown'}): {detail}",
        )
    if status == 429:
        return TurnFailed("rate_limited", f"rate limited by the API (429): {detail}")
    if status == 529 or etype == "overloaded_error":
        return TurnFailed("overloaded", f"the API is overloaded ({status}): {detail}")
    if status in (401, 403):
        return TurnFailed(
            "auth",
            f"the API refused the key ({status}): check ANTHROPIC_API_KEY",
            retryable=False,
        )
    if status is not None and 400 <= status < 500 and status not in (408, 409):
        return TurnFailed(
            "bad_request", f"the API rejected the request ({status}): {detail}", retryable=False
        )
    return TurnFailed("server_error", f"the API failed ({status}): {detail}")


@dataclass(frozen=True)
class ContextLimits:
    """The API's context editing inside one tool loop (conversation.context_management)."""

    trigger_tokens: int
    keep_recent_results: int
    clear_at_least_tokens: int


def build_request(
    messages: list[dict[str, Any]],
    *,
    settings: Settings,
    model: str,
    tools: list[dict[str, Any]],
    use_tools: bool,
    max_tokens: int,
    limits: ContextLimits,
    extra: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], str]:
    """The request for the next turn, and the basis its reply's thinking is bound to.
    ``use_tools`` False asks with ``tool_choice: none``; ``extra`` is user content sent after
    the conversation for this request only (the /report turn)."""
    system = _system_prompt(settings)
    stored = list(messages)
    if extra:
        if stored and stored[-1]["role"] == "user":
            last = stored[-1]
            stored[-1] = {**last, "content": [*last["content"], *extra]}
        else:
            stored.append({"role": "user", "content": list(extra)})
    sent, basis = conversation.request_messages(stored, model=model, system=system, tools=tools)
    last_blocks = cast("list[dict[str, Any]]", sent[-1]["content"] if sent else [])
    if last_blocks:  # the conversation's content is lists of blocks, never a bare string
        # A cache breakpoint on the last block: the growing history is cached too.
        last_blocks[-1]["cache_control"] = {"type": "ephemeral"}
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "system": system,
        "tools": tools,
        "messages": sent,
        "thinking": dict(THINKING),
        "betas": [conversation.CONTEXT_MANAGEMENT_BETA],
        "context_management": conversation.context_management(
            trigger_tokens=limits.trigger_tokens,
            keep=limits.keep_recent_results,
            clear_at_least=limits.clear_at_least_tokens,
        ),
    }
    if settings.effort:
        params["output_config"] = {"effort": settings.effort}
    if not use_tools:
        # The tool list stays (the history holds tool_use blocks, the prefix and its cache
        # stay intact); tool_choice none keeps Claude from calling them. Forcing a tool is
        # a 400 on the current models.
        params["tool_choice"] = {"type": "none"}
    return params, basis


def _system_prompt(settings: Settings) -> list[dict[str, Any]]:
    from breakglass_tui.core import prompt

    return prompt.system_prompt(
        settings.vmid,
        settings.cold_path_pointer,
        verbs_per_message=settings.max_mutating_verbs_per_message,
    )


class ModelClient:
    """The SDK and its client, made on the first request and again when the key changes."""

    def __init__(
        self,
        api_key: Callable[[], str | None],
        *,
        base_url: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        sdk_max_retries: int = 2,
        on_new_key: Callable[[str], None] = lambda key: None,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.sdk_max_retries = sdk_max_retries
        self._on_new_key = on_new_key
        self._modules: tuple[Any, Any] | None = None
        self._client: Any = None
        self._client_key: str | None = None

    async def _sdk(self) -> tuple[Any, Any]:
        # Lazy import (seconds), off the event loop so the UI keeps painting meanwhile.
        if self._modules is None:
            anthropic = await asyncio.to_thread(importlib.import_module, "anthropic")
            self._modules = (anthropic, importlib.import_module("httpx2"))
        return self._modules

    def _get_client(self, anthropic: Any, httpx2: Any) -> Any:
        key = self._api_key()
        if self._client is None or key != self._client_key:
            if key:
                self._on_new_key(key)
            self._client = anthropic.AsyncAnthropic(
                api_key=key,
                base_url=self._base_url or os.environ.get("ANTHROPIC_BASE_URL") or None,
                max_retries=self.sdk_max_retries,
                timeout=httpx2.Timeout(
                    connect=self.connect_timeout_s,
                    read=self.read_timeout_s,
                    write=30.0,
                    pool=10.0,
                ),
            )
            self._client_key = key
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def stream(
        self,
        params: dict[str, Any],
        *,
        basis: str,
        deadline_s: float,
        emit: Callable[[Event], None],
        finish: Callable[[Reply, str], None],
    ) -> Reply:
        """One streamed request under ``deadline_s`` (the SDK's few retries apply
        before the stream starts). ``finish(reply, outcome)`` runs whatever happened: the
        outcome is the stop reason, "cancelled", "incomplete" or "error"."""
        anthropic, httpx2 = await self._sdk()
        client = self._get_client(anthropic, httpx2)
        reply = Reply(turn_id=uuid.uuid4().hex[:12], model=params["model"], basis=basis)
        emit(AssistantTurnStarted(turn_id=reply.turn_id))
        outcome = "error"
        try:
            async with asyncio.timeout(deadline_s):
                async with client.beta.messages.stream(**params) as stream:
                    async for event in stream:
                        on_stream_event(reply, event, emit)
                    # The message as the SDK accumulated it, every block as the API sent it:
                    # what goes back to the API (a rebuilt turn is a 400).
                    snapshot = stream.current_message_snapshot
                    reply.content = [
                        b.model_dump(mode="json", exclude_none=True) for b in snapshot.content
                    ]
            outcome = reply.stop_reason or "incomplete"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except TimeoutError:
            raise TurnFailed(
                "deadline",
                f"no complete answer within {deadline_s:g} s (BREAKGLASS_API_DEADLINE_S plus"
                f" {params['max_tokens']} max_tokens at 80 tokens/s)",
            ) from None
        except anthropic.APIStatusError as exc:
            raise classify_status(exc) from None
        except (anthropic.APITimeoutError, httpx2.TimeoutException):
            raise TurnFailed(
                "stalled",
                f"the API sent nothing for {self.read_timeout_s:g} s (stream read timeout)",
            ) from None
        except (anthropic.APIConnectionError, httpx2.TransportError) as exc:
            raise TurnFailed(
                "dropped" if reply.streamed_text or reply.usage.input_tokens else "connection",
                f"the connection to the API failed: {exc.__class__.__name__}: {exc}",
            ) from None
        except anthropic.AnthropicError as exc:
            raise TurnFailed("api_error", f"{exc.__class__.__name__}: {exc}") from None
        finally:
            finish(reply, outcome)
        return reply


def on_stream_event(reply: Reply, event: Any, emit: Callable[[Event], None]) -> None:
    """Show the stream as it comes (text, thinking, how long Claude thinks) and note what the
    accumulated message cannot say (whether each tool call's input was whole)."""
    kind = event.type
    if kind == "message_start":
        u = event.message.usage
        reply.usage = Usage(
            input_tokens=u.input_tokens or 0,
            output_tokens=u.output_tokens or 0,
            cache_creation_input_tokens=u.cache_creation_input_tokens or 0,
            cache_read_input_tokens=u.cache_read_input_tokens or 0,
        )
    elif kind == "content_block_start":
        cb = event.content_block
        reply.block_types[event.index] = cb.type
        if cb.type == "text" and cb.text:
            reply.streamed_text.append(cb.text)
            emit(AssistantTextDelta(turn_id=reply.turn_id, text=cb.text))
        elif cb.type == "tool_use":
            reply.tool_json[event.index] = ""
        elif cb.type in conversation.THINKING_TYPES:
            reply.thinking_since = time.monotonic()
            emit(
                AssistantThinkingStarted(
                    turn_id=reply.turn_id, redacted=cb.type == "redacted_thinking"
                )
            )
    elif kind == "content_block_delta":
        delta = event.delta
        if delta.type == "text_delta":
            reply.streamed_text.append(delta.text)
            emit(AssistantTextDelta(turn_id=reply.turn_id, text=delta.text))
        elif delta.type == "input_json_delta":
            reply.tool_json[event.index] = reply.tool_json.get(event.index, "") + delta.partial_json
        elif delta.type == "thinking_delta" and delta.thinking:
            reply.streamed_thinking.append(delta.thinking)
            emit(AssistantThinkingDelta(turn_id=reply.turn_id, text=delta.thinking))
    elif kind == "content_block_stop":
        reply.closed.add(event.index)
        if reply.block_types.get(event.index) in conversation.THINKING_TYPES:
            took = time.monotonic() - (reply.thinking_since or time.monotonic())
            reply.thinking_since = None
            reply.thinking_s += took
            emit(AssistantThinkingEnded(turn_id=reply.turn_id, duration_s=took))
    elif kind == "message_delta":
        reply.stop_reason = event.delta.stop_reason
        details = getattr(event.delta, "stop_details", None)
        if details is not None:
            reply.refusal_category = getattr(details, "category", None)
        u = event.usage
        reply.usage = Usage(
            input_tokens=(u.input_tokens if u.input_tokens is not None else 0)
            or reply.usage.input_tokens,
            output_tokens=u.output_tokens or 0,
            cache_creation_input_tokens=(u.cache_creation_input_tokens or 0)
            or reply.usage.cache_creation_input_tokens,
            cache_read_input_tokens=(u.cache_read_input_tokens or 0)
            or reply.usage.cache_read_input_tokens,
        )
        edits = getattr(event, "context_management", None)
        if edits is not None:
            reply.applied_edits = [e.model_dump(mode="json") for e in edits.applied_edits]
        dropped = getattr(event, "input_transformations", None)
        if dropped:
            reply.dropped_by_api = [d.model_dump(mode="json") for d in dropped]
    elif kind == "message_stop":
        reply.got_message_stop = True


# -- asking the model: retries, the fallback model, usage and the spend limit ---------------------


class Asker:
    """Asks the model for the next assistant message of a conversation, per the resilience
    rules: a failed attempt is retried (a thinking block the API will not take back is left out
    once), a refusal or a persistent overload asks the fallback model, and past the retries, or
    at the spend limit, manual mode goes on (``set_mode``). Counts the usage and warns at 80 %
    of the spend limit. Takes what it needs as callables; knows no agent."""

    def __init__(
        self,
        settings: Settings,
        client: ModelClient,
        conversation: conversation.Conversation,
        *,
        emit: Callable[[Event], None],
        audit: Record,
        notice: Callable[[str, str], None],
        note: Callable[[str], None],
        set_mode: Callable[[bool, str], None],
        manual: Callable[[], bool],
        incident_usage: Callable[[], Usage],
        tool_definitions: Callable[[], list[dict[str, Any]]],
        limits: ContextLimits,
        max_tokens: int,
        turn_retries: int = 1,
        retry_delay_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.client = client
        self.conversation = conversation
        self._emit = emit
        self._audit = audit
        self._notice = notice
        self._note = note
        self._set_mode = set_mode
        self._manual = manual
        self._incident_usage = incident_usage
        self._tool_definitions = tool_definitions
        self.limits = limits
        self.max_tokens = max_tokens
        self.turn_retries = turn_retries
        self.retry_delay_s = retry_delay_s
        # The model asked now: the configured one, or the fallback for the rest of an operator
        # message after a refusal or a persistent overload.
        self.model = settings.model
        self.session_usage = Usage()  # this session's own (the audit log's)
        self.cost_known = True
        self._spend_warned = False
        # What the model saw last (input + cache tokens): the benchmark and the audit read it.
        self.last_seen_tokens = 0

    def at_operator_message(self, limit_bytes: int, keep_recent: int) -> None:
        """An operator message is the one boundary where earlier turns may be edited (nothing
        is in flight): the context is kept within its limit, and the configured model is asked
        first again (a fallback lasts one message)."""
        done = self.conversation.compact(limit_bytes=limit_bytes, keep_recent=keep_recent)
        if done:
            self._audit.write("context_compacted", **done)
        if self.model != self.settings.model:
            self.switch_model(self.settings.model, "a new operator message: the configured model")

    async def ask(
        self, *, use_tools: bool, extra: list[dict[str, Any]] | None = None
    ) -> Reply | None:
        """One assistant message; None when it could not be had (the operator has been told,
        and manual mode entered when the API or the spend limit is the problem). ``use_tools``
        False asks with ``tool_choice: none``; ``extra``: user content for this request only."""
        if self.spend_exhausted():
            return None
        attempts = 1 + max(0, self.turn_retries)
        max_tokens = self.max_tokens
        failure: TurnFailed | None = None
        binding_repaired = False
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                reply = await self._attempt(use_tools, max_tokens, extra)
            except TurnFailed as exc:
                failure = exc
            else:
                failure = check_reply(reply)
                if failure is None:
                    if self._manual():
                        self._set_mode(False, "Claude answered again: back to normal mode.")
                    return reply
                if failure.kind == "max_tokens":
                    max_tokens = min(max_tokens * 2, MAX_TOKENS_CAP)
            will_retry = failure.retryable and attempt < attempts
            if not binding_repaired and thinking_binding_error(failure):
                # The API would not take an earlier thinking block back (bound to another
                # conversation): leave the completed turns' thinking out, and ask once more.
                binding_repaired = will_retry = True
                attempts += 1
                dropped = self.conversation.drop_thinking_before_loop()
                self._audit.write("thinking_dropped", blocks=dropped, reason=failure.message)
            self._emit(ApiError(kind=failure.kind, message=failure.message, will_retry=will_retry))
            self._audit.write(
                "api_error",
                error_kind=failure.kind,
                message=failure.message,
                will_retry=will_retry,
                model=self.model,
            )
            if not will_retry:
                break
            await asyncio.sleep(self.retry_delay_s)
        assert failure is not None
        fallback = self.settings.fallback_model
        if fallback and fallback != self.model and failure.kind in ("refusal", "overloaded"):
            why = (
                f"{self.model} declined (refusal)"
                if failure.kind == "refusal"
                else f"{self.model} stayed overloaded"
            )
            self.switch_model(fallback, f"{why}: asking the fallback model for this message")
            return await self.ask(use_tools=use_tools, extra=extra)
        if failure.kind == "refusal":
            self._notice(
                "error",
                f"Claude declined to continue ({failure.message}). The refused turn was not kept;"
                " rephrase the request, set BREAKGLASS_FALLBACK_MODEL to have another model"
                " asked, or act with the slash commands (/help).",
            )
            return None
        self._set_mode(
            True,
            f"Claude is unavailable ({failure.kind}: {failure.message}). Manual mode: the slash"
            " commands work (/help); your next message tries Claude again.",
        )
        return None

    async def _attempt(
        self, use_tools: bool, max_tokens: int, extra: list[dict[str, Any]] | None
    ) -> Reply:
        params, basis = build_request(
            self.conversation.messages,
            settings=self.settings,
            model=self.model,
            tools=self._tool_definitions(),
            use_tools=use_tools,
            max_tokens=max_tokens,
            limits=self.limits,
            extra=extra,
        )
        return await self.client.stream(
            params,
            basis=basis,
            deadline_s=self.settings.turn_deadline_s(max_tokens),
            emit=self._emit,
            finish=self._finish,
        )

    def switch_model(self, model: str, reason: str) -> None:
        """Ask ``model`` from now on. The earlier turns' thinking it cannot read is left out of
        its requests (conversation.request_messages: a thinking block is bound to its model)."""
        previous, self.model = self.model, model
        self._emit(ModelSwitched(model=model, reason=reason))
        self._audit.write("model_switch", model=model, previous=previous, reason=reason)

    def spend_exhausted(self) -> bool:
        """The incident's spend limit is reached: Claude is not asked, manual mode goes on."""
        limit = self.settings.max_cost_usd
        spent = self._incident_usage()
        if not spent.cost_known or spent.cost_usd < limit:
            return False
        self._audit.write("spend_limit", cost_usd=round(spent.cost_usd, 6), limit_usd=limit)
        self._set_mode(
            True,
            f"The incident's spend limit is reached (${spent.cost_usd:.2f} of ${limit:.2f},"
            " BREAKGLASS_MAX_COST_USD): Claude is not asked any more. Manual mode: the slash"
            " commands work (/help); to go on with Claude, raise BREAKGLASS_MAX_COST_USD and"
            " reopen the console (the incident resumes).",
        )
        return True

    def _finish(self, reply: Reply, outcome: str) -> None:
        """A turn ended (``outcome``: its stop reason, or cancelled/incomplete/error): count its
        usage, say it, record it, and warn at 80 % of the spend limit."""
        if outcome == "cancelled":
            self._audit.write("cancelled", during="stream", turn_id=reply.turn_id)
            self._note("cancelled by the operator while Claude was answering")
        cost = cost_usd(reply.model, reply.usage)
        if cost is None and self.cost_known:
            self.cost_known = False
            self._notice(
                "info",
                f"No price is known for model {reply.model}: usage is shown in tokens only (cost"
                " unknown), and the spend limit (BREAKGLASS_MAX_COST_USD) cannot be enforced.",
            )
        u = reply.usage
        usage = Usage(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_creation_input_tokens=u.cache_creation_input_tokens,
            cache_read_input_tokens=u.cache_read_input_tokens,
            cost_usd=cost or 0.0,
            cost_known=cost is not None,
        )
        self.session_usage = add(self.session_usage, usage)
        if u.input_tokens or u.cache_read_input_tokens:
            self.last_seen_tokens = (
                u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
            )
        stop = reply.stop_reason if outcome == reply.stop_reason else outcome
        total = add(self._incident_usage(), usage)
        self._emit(
            AssistantTurnEnded(
                turn_id=reply.turn_id, stop_reason=stop, usage=usage, total_usage=total
            )
        )
        record: dict[str, Any] = {}
        if reply.streamed_thinking or reply.thinking_s:
            record["thinking"] = reply.thinking
            record["thinking_s"] = round(reply.thinking_s, 3)
        if reply.applied_edits:
            record["context_edits"] = reply.applied_edits
        if reply.dropped_by_api:
            record["thinking_dropped_by_api"] = reply.dropped_by_api
        self._audit.write(
            "model_turn",
            turn_id=reply.turn_id,
            model=reply.model,
            stop_reason=stop,
            text=reply.text,
            tool_calls=[{"id": b["id"], "name": b["name"]} for b in reply.tool_uses],
            usage=usage_dict(usage),
            total_usage=usage_dict(self.session_usage),
            **record,
        )
        limit, spent = self.settings.max_cost_usd, self._incident_usage()
        if self._spend_warned or not spent.cost_known or spent.cost_usd < 0.8 * limit:
            return
        self._spend_warned = True
        self._audit.write("spend_warning", cost_usd=round(spent.cost_usd, 6), limit_usd=limit)
        self._notice(
            "warning",
            f"Claude has used {spent.cost_usd / limit:.0%} of the incident's spend limit"
            f" (${spent.cost_usd:.2f} of ${limit:.2f}, BREAKGLASS_MAX_COST_USD). At the limit"
            " Claude stops and manual mode goes on.",
        )


def usage_dict(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cost_usd": round(u.cost_usd, 6),
        "cost_known": u.cost_known,
    }
