"""The breakglass agent's conversation with Claude, kept the way the current models require.

On Claude Sonnet 5.5 and Opus 5.5 ("Thinking in tool and multi-turn workflows", "Preserved
thinking", "Prefix checks on thinking blocks"):

- an assistant turn goes back **exactly as the API returned it**: every ``thinking`` (with its
  signature) and ``redacted_thinking`` block, in order, with the text and tool calls;
- a thinking block is bound to the model that wrote it and to its **prefix** (``system``,
  ``tools``, every earlier message): sent back after any of those changed, the request is a 400;
  sent to a model that cannot read it, it is dropped.

So each stored assistant message carries two private keys, never sent: ``_model`` (who wrote
it) and ``_basis`` (a digest of the model, system, tools and messages of the request that
produced it, ``cache_control`` markers aside). :func:`request_messages` rebuilds that digest as it
walks the conversation, and keeps a message's thinking blocks only when the digest is the one
they were made under; otherwise (the model changed, the system prompt or the tools changed in an
upgrade, an earlier message was shortened) they are left out, and everything after is judged
against what is really sent. The API is never sent a block it would refuse.

Context stays bounded in two ways that respect this. Inside one tool loop nothing already sent
is edited: the API's own context editing clears old tool results server-side
(:func:`context_management`). At an operator-message boundary, when the tool results pass the
budget, :func:`drop_thinking` removes the completed turns' thinking first, then
:func:`shorten_old_results` cuts the older results in one batch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from breakglass_tui.core import fence

PRIVATE_KEYS = ("_model", "_basis")
THINKING_TYPES = ("thinking", "redacted_thinking")
CONTEXT_MANAGEMENT_BETA = "context-management-2025-06-27"
SHORTENED = "[older result, shortened]"


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _clean(v)
            for k, v in value.items()
            if k != "cache_control" and k not in PRIVATE_KEYS and v is not None
        }
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _canonical(value: Any) -> bytes:
    return json.dumps(
        _clean(value), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    ).encode()


def is_thinking(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") in THINKING_TYPES


def has_thinking(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(is_thinking(b) for b in content)


def request_messages(
    messages: list[dict[str, Any]],
    *,
    model: str,
    system: Any,
    tools: Any,
) -> tuple[list[dict[str, Any]], str]:
    """The conversation as the next request sends it, and the basis of the reply it asks for.

    Copies (the stored conversation is untouched), private keys left out, and each assistant
    message's thinking blocks kept only if made under exactly this model and prefix."""
    running = hashlib.sha256()
    for part in (model, system, tools):
        running.update(_canonical(part))
    sent: list[dict[str, Any]] = []
    for message in messages:
        out = {k: v for k, v in message.items() if k not in PRIVATE_KEYS}
        content = message.get("content")
        if message.get("role") == "assistant" and isinstance(content, list):
            if has_thinking(message) and message.get("_basis") != running.hexdigest():
                content = [b for b in content if not is_thinking(b)]
            out["content"] = [dict(b) for b in content]
        elif isinstance(content, list):
            out["content"] = [dict(b) if isinstance(b, dict) else b for b in content]
        if out.get("content"):
            sent.append(out)
            running.update(_canonical(out))
    return sent, running.hexdigest()


def assistant_message(content: list[dict[str, Any]], *, model: str, basis: str) -> dict[str, Any]:
    """An assistant message to store: the content as returned, who wrote it and its basis."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "_model": model}
    if any(is_thinking(b) for b in content):
        message["_basis"] = basis
    return message


def drop_thinking(messages: list[dict[str, Any]], *, before: int | None = None) -> int:
    """Remove the thinking blocks of the assistant messages before index ``before`` (all when
    None): completed turns, whose thinking is no longer needed. Returns how many went."""
    dropped = 0
    for message in messages[:before]:
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, list):
            continue
        kept = [b for b in content if not is_thinking(b)]
        dropped += len(content) - len(kept)
        if len(kept) != len(content):
            message["content"] = kept
        message.pop("_basis", None)
    # A turn that was only thinking has nothing left: the API refuses empty content.
    messages[:] = [m for m in messages if m.get("content")]
    return dropped


def tool_result_bytes(messages: list[dict[str, Any]]) -> int:
    """The size of the tool results' text in the conversation."""
    return sum(len(_result_text(b)) for b in _results(messages))


def shorten_old_results(
    messages: list[dict[str, Any]], *, budget_bytes: int, keep_recent: int
) -> tuple[int, int]:
    """When the tool results pass ``budget_bytes``, cut the older ones (all but the last
    ``keep_recent``) to their header line and a short tail; the whole stays readable by
    output_id. Returns (results shortened, bytes before). Call it only where nothing after the
    results is bound to them: at an operator-message boundary, after :func:`drop_thinking`."""
    results = _results(messages)
    total = sum(len(_result_text(b)) for b in results)
    if total <= budget_bytes:
        return 0, total
    shortened = 0
    for block in results[: max(0, len(results) - keep_recent)]:
        text = _result_text(block)
        if text.startswith(SHORTENED) or len(text) <= 600:
            continue
        # The host's text stays inside its fence, with the same token (core.fence).
        block["content"] = fence.shorten(
            text,
            keep=400,
            prefix=SHORTENED,
            note="[... shortened to keep the context small; use read_output/grep_output with the"
            " output_id above ...]",
        )
        shortened += 1
    return shortened, total


def _results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        b
        for m in messages
        if m.get("role") == "user" and isinstance(m.get("content"), list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # text and images: the text is what can be shortened
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def context_management(*, trigger_tokens: int, keep: int, clear_at_least: int) -> dict[str, Any]:
    """The API's context editing for a long tool loop (beta ``context-management-2025-06-27``):
    past ``trigger_tokens``, the oldest tool results but the last ``keep`` are cleared
    server-side (the calls themselves stay), and only when at least ``clear_at_least`` tokens go,
    so the prompt cache is not spent for little. The conversation we keep and send is untouched,
    so no thinking block's prefix changes."""
    return {
        "edits": [
            {
                "type": "clear_tool_uses_20250919",
                "trigger": {"type": "input_tokens", "value": trigger_tokens},
                "keep": {"type": "tool_uses", "value": keep},
                "clear_at_least": {"type": "input_tokens", "value": clear_at_least},
            }
        ]
    }
