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
limit, :func:`drop_thinking` removes the completed turns' thinking first, then
:func:`shorten_old_results` cuts the older results in one batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from breakglass_tui.core import fence, manual_note
from breakglass_tui.core.records import Record

if TYPE_CHECKING:
    from anthropic.types.beta import (
        BetaContentBlockParam,
        BetaImageBlockParam,
        BetaMessageParam,
        BetaTextBlockParam,
        BetaToolResultBlockParam,
    )

# A message as the conversation keeps it: a BetaMessageParam, plus on an assistant turn the
# private keys ``_model`` and ``_basis`` (never sent). request_messages gives the params sent.
StoredMessage = dict[str, Any]

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
    messages: Sequence[StoredMessage],
    *,
    model: str,
    system: Any,
    tools: Any,
) -> tuple[list[BetaMessageParam], str]:
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
    return cast("list[BetaMessageParam]", sent), running.hexdigest()


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
    messages: list[dict[str, Any]], *, limit_bytes: int, keep_recent: int
) -> tuple[int, int]:
    """When the tool results pass ``limit_bytes``, cut the older ones (all but the last
    ``keep_recent``) to their header line and a short tail; the whole stays readable by
    output_id. Returns (results shortened, bytes before). Call it only where nothing after the
    results is bound to them: at an operator-message boundary, after :func:`drop_thinking`."""
    results = _results(messages)
    total = sum(len(_result_text(b)) for b in results)
    if total <= limit_bytes:
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


# -- the conversation as the agent keeps it ------------------------------------------------------

RESTORED_NOTE = "This conversation was restored in a new session of the breakglass agent"
_MENTIONED_ID = re.compile(r"\bo[0-9]{1,9}(?:-[0-9a-f]{8})?\b")
_ID_CONTEXT = re.compile(r"output_id[ =:'\"]*(o[0-9]{1,9}(?:-[0-9a-f]{8})?)\b")


def tool_result(
    tool_use_id: str,
    content: str | list[BetaTextBlockParam | BetaImageBlockParam],
    *,
    is_error: bool = False,
) -> BetaToolResultBlockParam:
    result: BetaToolResultBlockParam = {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": content,
    }
    if is_error:
        result["is_error"] = True
    return result


class Conversation:
    """The messages of the incident's conversation with Claude, saved after every change
    (``save``), with the operator's manual commands waiting to be told (``pending_manual``).
    Failures to save are recorded (``record``), never raised: saving is a convenience."""

    def __init__(
        self,
        messages: Sequence[StoredMessage] | None = None,
        *,
        save: Callable[[list[StoredMessage]], None] | None = None,
        record: Record | None = None,
    ) -> None:
        self.messages: list[StoredMessage] = [dict(m) for m in messages or []]
        self._save = save
        self._record = record
        self.pending_manual: list[str] = []

    def saved(self) -> None:
        if self._save is not None:
            try:
                self._save(self.messages)
            except Exception as exc:  # saving is a convenience; the rescue goes on
                if self._record is not None:
                    self._record.write("save_error", error=f"{exc.__class__.__name__}: {exc}")

    def append_user(self, blocks: Sequence[BetaContentBlockParam]) -> None:
        """Add user content; merges into a trailing user message (tool results stay first)."""
        if not blocks:
            return
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages[-1]["content"].extend(blocks)
        else:
            self.messages.append({"role": "user", "content": list(blocks)})
        self.saved()

    def answer_all(
        self,
        tool_uses: list[dict[str, Any]],
        results: list[BetaToolResultBlockParam],
        reason: str,
    ) -> None:
        """The tool loop was interrupted: every tool_use still gets its tool_result (``reason``
        for those not run), so the conversation stays valid and the next request does not 400."""
        answered = {r["tool_use_id"] for r in results}
        for block in tool_uses:
            if block["id"] not in answered:
                results.append(tool_result(block["id"], reason, is_error=True))
        self.append_user(results)

    def append_assistant(self, content: list[dict[str, Any]], *, model: str, basis: str) -> None:
        """Keep Claude's message as the API returned it (thinking and all), with the model and
        the basis its thinking is bound to."""
        self.messages.append(assistant_message(content, model=model, basis=basis))
        self.saved()

    def loop_start(self) -> int:
        """The index of the current tool loop's first assistant message: after the last user
        message that holds more than tool results."""
        start = 0
        for i, message in enumerate(self.messages):
            content = message.get("content")
            if (
                message.get("role") == "user"
                and isinstance(content, list)
                and any(b.get("type") != "tool_result" for b in content)
            ):
                start = i + 1
        return start

    def drop_thinking_before_loop(self) -> int:
        dropped = drop_thinking(self.messages, before=self.loop_start())
        self.saved()
        return dropped

    def compact(self, *, limit_bytes: int, keep_recent: int) -> dict[str, int] | None:
        """Keep a long incident's context bounded, at an operator-message boundary: when the
        tool results pass the limit, the completed turns' thinking goes first (it is bound to
        what precedes it), then the older results are cut to their header and a short tail, in
        one batch (the cached prefix is invalidated rarely); the whole outputs stay readable by
        output_id. Returns what was done, or None."""
        total = tool_result_bytes(self.messages)
        if total <= limit_bytes:
            return None
        dropped = drop_thinking(self.messages)
        shortened, _ = shorten_old_results(
            self.messages, limit_bytes=limit_bytes, keep_recent=keep_recent
        )
        if not (shortened or dropped):
            return None
        self.saved()
        return {"results": shortened, "thinking_blocks_dropped": dropped, "bytes_before": total}

    def manual_context(self) -> list[BetaTextBlockParam]:
        """The operator's manual commands since Claude was last asked, as one text block of
        metadata only: no host text in a user-role block (issue 15, core.manual_note)."""
        block = manual_note.context_block(self.pending_manual)
        self.pending_manual.clear()
        return [block] if block is not None else []

    def repair(self, *, is_legacy_id: Callable[[str], bool], example_id: str) -> list[str]:
        """A restored conversation (resume, take-over) was another session's: answer the tool
        calls whose process died mid-run, so the next request is valid; and when it names
        outputs by ids from before ids named their session (``o3``), tell Claude they are not
        readable here. Returns those legacy ids."""
        if not self.messages:
            return []
        last = self.messages[-1]
        blocks: list[BetaContentBlockParam] = []
        if last.get("role") == "assistant":
            calls = [b for b in last.get("content", []) if b.get("type") == "tool_use"]
            blocks += [
                tool_result(
                    b["id"], "Interrupted: the session ended while this ran.", is_error=True
                )
                for b in calls
            ]
        told = " ".join(  # an earlier restore's note: not told twice
            b.get("text", "")
            for m in self.messages
            if m.get("role") == "user" and isinstance(m.get("content"), list)
            for b in m["content"]
            if isinstance(b, dict) and str(b.get("text", "")).startswith(RESTORED_NOTE)
        )
        legacy = sorted(
            {
                i
                for i in mentioned_output_ids(self.messages)
                if is_legacy_id(i) and not re.search(rf"\b{i}\b", told)
            },
            key=lambda i: int(i[1:]),
        )
        if legacy:
            shown = ", ".join(legacy)
            blocks.append(
                {
                    "type": "text",
                    "text": (
                        f"{RESTORED_NOTE}. The outputs named by the earlier ids {shown}"
                        " belong to an earlier tab's session and are not readable here; run the"
                        " command again if you need them. Output ids of this session look like"
                        f" {example_id!r}."
                    ),
                }
            )
        self.append_user(blocks)
        return legacy


def mentioned_output_ids(messages: list[dict[str, Any]]) -> set[str]:
    """The output ids a conversation names ("output_id o3", read_output inputs)."""
    found: set[str] = set()
    for message in messages:
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                value = (block.get("input") or {}).get("output_id")
                if isinstance(value, str) and _MENTIONED_ID.fullmatch(value):
                    found.add(value)
                continue
            text = block.get("content") if block.get("type") == "tool_result" else block.get("text")
            if isinstance(text, list):
                text = " ".join(str(b.get("text", "")) for b in text if isinstance(b, dict))
            if isinstance(text, str) and "output_id" in text:
                found.update(_ID_CONTEXT.findall(text))
    return found
