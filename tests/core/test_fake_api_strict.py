"""The fake Messages API is as strict as the current models are documented to be: through the
real SDK, each request the API refuses gets a 400 in the API's error shape, and a correct
round trip (every block echoed) is accepted. Without these, a green agent test would prove
nothing about the real API."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import pytest

from tests.support import fake_messages_api as fm

TOOLS = [
    {
        "name": "devvm_shell",
        "description": "Run a command.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
    }
]
SYSTEM = [{"type": "text", "text": "You rescue the devvm."}]


@pytest.fixture
async def strict() -> AsyncIterator[fm.FakeMessagesApi]:
    api = await fm.FakeMessagesApi().start()
    try:
        yield api
    finally:
        await api.close()


def client(api: fm.FakeMessagesApi) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="sk-ant-test", base_url=api.base_url, max_retries=0)


async def ask(api: fm.FakeMessagesApi, **params: Any) -> list[dict[str, Any]]:
    """One streamed request; the content blocks as the SDK accumulated them."""
    body = {
        "model": fm.MODEL,
        "max_tokens": 2000,
        "system": SYSTEM,
        "tools": TOOLS,
        "thinking": {"type": "adaptive", "display": "summarized"},
        **params,
    }
    # The SDK no longer has parameters for sampling: an old client sends them in the body.
    extra = {k: body.pop(k) for k in ("temperature", "top_p", "top_k") if k in body}
    if extra:
        body["extra_body"] = extra
    async with client(api).messages.stream(**body) as stream:
        async for _ in stream:
            pass
        message = stream.current_message_snapshot
    return [b.model_dump(mode="json", exclude_none=True) for b in message.content]


async def a_tool_loop(api: fm.FakeMessagesApi) -> list[dict[str, Any]]:
    """The messages of a tool loop as a correct client sends them: the first turn verbatim."""
    api.push(fm.reply("Checking.", [("toolu_1", "devvm_shell", {"command": "df"})], redacted=True))
    first = [{"role": "user", "content": [{"type": "text", "text": "disk?"}]}]
    turn = await ask(api, messages=first)
    return [
        *first,
        {"role": "assistant", "content": turn},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "99%"}],
        },
    ]


async def test_a_correct_round_trip_is_accepted(strict):
    messages = await a_tool_loop(strict)
    strict.push(fm.text("Full."))
    await ask(strict, messages=messages)
    strict.assert_no_rejections()
    assert [b["type"] for b in messages[1]["content"]] == [
        "thinking",
        "redacted_thinking",
        "text",
        "tool_use",
    ]


def _edit(messages: list[dict[str, Any]], change: Callable[[list[dict[str, Any]]], Any]):
    edited = copy.deepcopy(messages)
    change(edited)
    return edited


ALTERED: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "rebuilt without thinking": lambda m: m[1].update(content=m[1]["content"][2:]),
    "redacted_thinking filtered out": lambda m: m[1]["content"].pop(1),
    "thinking text changed": lambda m: m[1]["content"][0].update(thinking="something else"),
    "signature changed": lambda m: m[1]["content"][0].update(signature="fake1.x.y"),
    "text rebuilt": lambda m: m[1]["content"][2].update(text="Checking!"),
    "earlier message edited": lambda m: m[0]["content"][0].update(text="disk? please"),
    "blocks reordered": lambda m: m[1]["content"].insert(0, m[1]["content"].pop(1)),
}


@pytest.mark.parametrize("how", list(ALTERED))
async def test_an_altered_assistant_turn_is_a_400(strict, how):
    messages = _edit(await a_tool_loop(strict), ALTERED[how])
    strict.push(fm.text("never"))
    with pytest.raises(anthropic.BadRequestError) as caught:
        await ask(strict, messages=messages)
    error = caught.value
    assert error.body["type"] == "error" and error.body["error"]["type"] == "invalid_request_error"
    assert error.request_id and error.body["request_id"] == error.request_id
    assert "thinking" in error.message or "assistant message" in error.message


async def test_a_changed_system_prompt_or_tool_list_is_a_400(strict):
    messages = await a_tool_loop(strict)
    for change in ({"system": [{"type": "text", "text": "Other."}]}, {"tools": TOOLS * 1}):
        tools = copy.deepcopy(TOOLS)
        tools[0]["description"] = "Run a command as root."
        params = change if "system" in change else {"tools": tools}
        with pytest.raises(anthropic.BadRequestError, match="bound to a different conversation"):
            await ask(strict, messages=messages, **params)
    # cache_control markers are not part of the prefix.
    marked = copy.deepcopy(messages)
    marked[0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    strict.push(fm.text("Fine."))
    await ask(strict, messages=marked)


async def test_drop_block_with_its_beta_drops_instead_of_refusing(strict):
    messages = _edit(await a_tool_loop(strict), ALTERED["earlier message edited"])
    strict.push(fm.text("Fine."))
    async with client(strict).beta.messages.stream(
        model=fm.MODEL,
        max_tokens=2000,
        system=SYSTEM,
        tools=TOOLS,
        messages=messages,
        thinking={"type": "adaptive", "block_binding": {"prefix_mismatch_behavior": "drop_block"}},
        betas=[fm.BINDING_BETA],
    ) as stream:
        message = await stream.get_final_message()
    dropped = [t.reason for t in message.input_transformations or []]
    assert dropped == ["prefix_binding_mismatch", "prefix_binding_mismatch"]


REFUSED: dict[str, dict[str, Any]] = {
    "thinking disabled": {"thinking": {"type": "disabled"}},
    "thinking with a budget": {"thinking": {"type": "enabled", "budget_tokens": 2000}},
    "between_tools at max effort": {
        "thinking": {"type": "between_tools"},
        "output_config": {"effort": "max"},
    },
    "forced tool choice (any)": {"tool_choice": {"type": "any"}},
    "forced tool choice (tool)": {"tool_choice": {"type": "tool", "name": "devvm_shell"}},
    "temperature": {"temperature": 0.2},
    "top_p": {"top_p": 0.9},
    "top_k": {"top_k": 5},
    "an unknown effort": {"output_config": {"effort": "extreme"}},
    "max_tokens over the model's output": {"max_tokens": 200_000},
}


@pytest.mark.parametrize("what", list(REFUSED))
async def test_request_shapes_the_current_models_refuse(strict, what):
    strict.push(fm.text("never"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(anthropic.BadRequestError):
        await ask(strict, messages=messages, **REFUSED[what])
    assert len(strict.rejections) == 1 and strict.script  # nothing was answered


BAD_MESSAGES: dict[str, list[dict[str, Any]]] = {
    "assistant prefill": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "The devvm"},
    ],
    "a private key on a message": [{"role": "user", "content": "hi", "_basis": "x"}],
    "empty text": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
    "a tool_use without its result": [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "devvm_shell", "input": {}}],
        },
        {"role": "user", "content": "and?"},
    ],
    "text before the tool_result": [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "devvm_shell", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "here:"},
                {"type": "tool_result", "tool_use_id": "t1", "content": "ok"},
            ],
        },
    ],
    "an image that is not its media type": [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "aGVsbG8="},
                }
            ],
        }
    ],
    "unsigned thinking": [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": ""},
                {"type": "text", "text": "x"},
            ],
        },
        {"role": "user", "content": "and?"},
    ],
}


@pytest.mark.parametrize("what", list(BAD_MESSAGES))
async def test_messages_the_api_refuses(strict, what):
    strict.push(fm.text("never"))
    with pytest.raises(anthropic.BadRequestError):
        await ask(strict, messages=BAD_MESSAGES[what])


async def test_a_tool_loop_turn_must_come_back_with_its_thinking_but_a_completed_one_may_not(
    strict,
):
    messages = await a_tool_loop(strict)
    bare = _edit(messages, lambda m: m[1].update(content=m[1]["content"][2:]))
    with pytest.raises(anthropic.BadRequestError, match="Expected `thinking`"):
        await ask(strict, messages=bare)
    # Once the operator has spoken after the loop, the completed turn may lose its thinking.
    bare[2]["content"].append({"type": "text", "text": "now clean it up"})
    strict.push(fm.text("Cleaning."))
    await ask(strict, messages=bare)


async def test_another_models_thinking_is_dropped_without_error(strict):
    messages = await a_tool_loop(strict)
    strict.push(fm.text("Opus here."))
    async with client(strict).beta.messages.stream(
        model="claude-opus-5-5",
        max_tokens=2000,
        system=SYSTEM,
        tools=TOOLS,
        messages=messages,
    ) as stream:
        message = await stream.get_final_message()
    assert [t.reason for t in message.input_transformations or []] == [
        "model_binding_mismatch",
        "model_binding_mismatch",
    ]


async def test_context_editing_needs_its_beta_and_clears_what_the_model_sees(strict):
    big = "x" * 40_000
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for n in range(6):
        messages += [
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"t{n}", "name": "devvm_shell", "input": {}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"t{n}", "content": big}],
            },
        ]
    edits = {
        "edits": [
            {
                "type": "clear_tool_uses_20250919",
                "trigger": {"type": "input_tokens", "value": 30_000},
                "keep": {"type": "tool_uses", "value": 2},
            }
        ]
    }
    with pytest.raises(anthropic.BadRequestError, match="context-management"):
        await client(strict).messages.create(
            model=fm.MODEL,
            max_tokens=100,
            tools=TOOLS,
            messages=messages,
            extra_body={"context_management": edits},
        )
    strict.rejections.clear()
    strict.push(fm.text("Done.", thinking=None))
    async with client(strict).beta.messages.stream(
        model=fm.MODEL,
        max_tokens=100,
        tools=TOOLS,
        messages=messages,
        context_management=edits,
        betas=[fm.CONTEXT_MANAGEMENT_BETA],
    ) as stream:
        message = await stream.get_final_message()
    [edit] = message.context_management.applied_edits
    assert edit.cleared_tool_uses == 4 and edit.cleared_input_tokens > 30_000
    assert strict.seen_tokens[-1] < 25_000 < fm.tokens(messages)
    strict.assert_no_rejections()


async def test_prompt_caching_reads_what_an_earlier_request_wrote(strict):
    long_system = [
        {"type": "text", "text": "rules " * 2000, "cache_control": {"type": "ephemeral"}}
    ]
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        strict.push(fm.text("ok"))
        async with client(strict).messages.stream(
            model=fm.MODEL, max_tokens=100, system=long_system, messages=messages
        ) as stream:
            message = await stream.get_final_message()
    usage = message.usage
    assert usage.cache_read_input_tokens > 2_000 and usage.cache_creation_input_tokens == 0
