"""Resilience: each failure of the API gets a retry of the turn, then a clear message and manual
mode; truncated tool calls are never executed; the step limit ends with a summary; cancel keeps
the conversation valid."""

from __future__ import annotations

import asyncio
import time

import pytest

from breakglass_tui.core.events import (
    ApiError,
    AssistantTextDelta,
    AssistantTurnEnded,
    ModeChanged,
    Notice,
    ToolCallEnded,
)
from breakglass_tui.core.fence import parse
from tests.core.conftest import ScriptedHost
from tests.core.test_loop import assert_tool_results_first
from tests.support import fake_messages_api as fm


async def test_529_then_success_is_retried_by_the_sdk(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.HttpError(529, "overloaded_error", retry_after_ms=50), fm.text("Back."))
    await h.agent.handle("hello")
    assert len(fake_api.requests) == 2
    assert fake_api.requests[1].headers["x-stainless-retry-count"] == "1"
    assert h.of(ApiError) == [] and not h.agent.manual
    assert "".join(e.text for e in h.of(AssistantTextDelta)) == "Back."


async def test_overloaded_beyond_sdk_retries_gets_a_turn_retry(make_agent, fake_api):
    h = make_agent(sdk_max_retries=0)
    fake_api.push(fm.HttpError(529, "overloaded_error"), fm.text("Back."))
    await h.agent.handle("hello")
    [err] = h.of(ApiError)
    assert (err.kind, err.will_retry) == ("overloaded", True)
    assert h.of(AssistantTurnEnded)[-1].stop_reason == "end_turn"


async def test_rate_limited_every_time_degrades_to_manual_then_recovers(make_agent, fake_api):
    h = make_agent(sdk_max_retries=0, turn_retries=1)
    fake_api.push(fm.HttpError(429, "rate_limit_error"), fm.HttpError(429, "rate_limit_error"))
    await h.agent.handle("hello")
    assert [(e.kind, e.will_retry) for e in h.of(ApiError)] == [
        ("rate_limited", True),
        ("rate_limited", False),
    ]
    assert h.agent.manual
    mode = h.of(ModeChanged)[-1]
    assert mode.manual and "rate limited" in mode.reason and "/help" in mode.reason
    # The next operator message tries the API again.
    fake_api.push(fm.text("I am here."))
    await h.agent.handle("are you back?")
    assert not h.agent.manual and h.of(ModeChanged)[-1].manual is False
    # The conversation stayed valid: one user message holding both operator messages.
    messages = fake_api.bodies[-1]["messages"]
    assert [m["role"] for m in messages] == ["user"]
    assert [b["text"] for b in messages[0]["content"]] == ["hello", "are you back?"]


async def test_error_event_mid_stream_is_retried_and_partial_text_discarded(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.error_midstream("overloaded_error"), fm.text("Done."))
    await h.agent.handle("hello")
    [err] = h.of(ApiError)
    assert err.kind == "overloaded" and err.will_retry and "mid-stream" in err.message
    assert fake_api.bodies[0]["messages"] == fake_api.bodies[1]["messages"]
    # Only the complete answer is kept: its signed thinking block, then its text.
    kept = h.agent.messages[-1]
    assert kept["role"] == "assistant"
    assert [b["type"] for b in kept["content"]] == ["thinking", "text"]
    assert kept["content"][0]["signature"] and kept["content"][1]["text"] == "Done."


async def test_stalled_stream_hits_the_read_timeout_and_is_retried(make_agent, fake_api):
    h = make_agent(stream_read_timeout_s=0.5)
    fake_api.push(fm.stalled(after=3), fm.text("Done."))
    started = time.monotonic()
    await h.agent.handle("hello")
    assert time.monotonic() - started < 5
    [err] = h.of(ApiError)
    assert err.kind == "stalled" and err.will_retry
    assert h.of(AssistantTurnEnded)[-1].stop_reason == "end_turn"


async def test_stream_dropped_before_message_stop_is_retried(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.dropped(after=4), fm.text("Done."))
    await h.agent.handle("hello")
    [err] = h.of(ApiError)
    assert err.kind == "dropped" and "message_stop" in err.message
    assert len(h.agent.messages) == 2  # the partial message was not kept


async def test_max_tokens_in_the_middle_of_a_tool_input_is_not_executed(make_agent, fake_api):
    host = ScriptedHost()
    h = make_agent(host)
    fake_api.push(
        fm.reply(
            "Cleaning up.",
            [("toolu_1", "devvm_shell", {"command": "rm -rf /var/cache/apt/archives/*.deb"})],
            stop_reason="max_tokens",
            truncate_last_tool_at=20,
        ),
        fm.tool("toolu_2", "devvm_shell", {"command": "du -sh /var/cache"}),
        fm.text("Done."),
    )
    await h.agent.handle("free some space")
    assert host.ran == ["du -sh /var/cache"]
    [err] = h.of(ApiError)
    assert err.kind == "max_tokens" and "not executed" in err.message
    assert fake_api.bodies[1]["max_tokens"] == 2 * fake_api.bodies[0]["max_tokens"]
    assert_tool_results_first(fake_api.bodies)
    assert "toolu_1" not in str(fake_api.bodies[-1]["messages"])


async def test_refusal_without_a_fallback_is_reported_without_manual_mode(make_agent, fake_api):
    """The same request would be refused again ("reset context after refusal"): no retry on the
    same model; the refused turn is not kept; without a fallback model the operator is told."""
    host = ScriptedHost()
    h = make_agent(host)
    fake_api.push(fm.text("I can't", stop_reason="refusal"))
    await h.agent.handle("do something odd")
    assert len(fake_api.requests) == 1
    [err] = h.of(ApiError)
    assert err.kind == "refusal" and "category cyber" in err.message and not err.will_retry
    assert any("declined" in n.text and "BREAKGLASS_FALLBACK_MODEL" in n.text for n in h.of(Notice))
    assert not h.agent.manual and host.ran == []
    assert h.agent.messages[-1]["role"] == "user"


async def test_a_tool_that_fails_is_answered_as_an_error_and_the_loop_goes_on(make_agent, fake_api):
    host = ScriptedHost(fail_with=ConnectionResetError("connection reset by the devvm"))
    h = make_agent(host)
    fake_api.push(fm.tool("toolu_1", "devvm_shell", {"command": "uptime"}), fm.text("SSH died."))
    await h.agent.handle("check")
    result = fake_api.bodies[1]["messages"][2]["content"][0]
    assert result["is_error"] is True
    # The exception's text may be the host's: inside the fence; its class outside (issue 15).
    parsed = parse(result["content"])
    assert "ConnectionResetError" in parsed.outside[0]
    assert parsed.inside == ["connection reset by the devvm"]
    [ended] = h.of(ToolCallEnded)
    assert not ended.ok and "failed" in ended.summary
    assert h.of(AssistantTurnEnded)[-1].stop_reason == "end_turn"


async def test_step_limit_ends_with_a_summary_without_tools(make_agent, fake_api, settings):
    host = ScriptedHost()
    h = make_agent(host, settings=settings.model_copy(update={"max_steps": 3}))
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": "a"}),
        fm.reply(
            None,
            [
                ("t2", "devvm_shell", {"command": "b"}),
                ("t3", "probe_devvm", {}),
                ("t4", "devvm_shell", {"command": "c"}),
            ],
        ),
        fm.text("Summary: disk was full, cleaned; devvm healthy."),
    )
    await h.agent.handle("fix it")
    assert host.ran == ["a", "b"]  # t3 ran (probe), t4 was over the limit
    answered = fake_api.bodies[2]["messages"][4]["content"]
    assert answered[2]["tool_use_id"] == "t4" and "step limit" in answered[2]["content"]
    last = fake_api.bodies[-1]
    assert last["tool_choice"] == {"type": "none"}
    assert "step limit" in last["messages"][-1]["content"][-1]["text"]
    assert any("Step limit reached" in n.text for n in h.of(Notice))
    assert h.agent.messages[-1]["content"][-1]["text"].startswith("Summary:")
    assert_tool_results_first(fake_api.bodies)


async def test_step_limit_with_the_api_failing_gives_a_local_summary(
    make_agent, fake_api, settings
):
    h = make_agent(settings=settings.model_copy(update={"max_steps": 1}), turn_retries=0)
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}),
        fm.HttpError(400, "invalid_request_error", "nope"),
    )
    await h.agent.handle("fix it")
    assert any(
        n.text.startswith("Where things stand") and "healthy" in n.text for n in h.of(Notice)
    )


async def test_cancel_during_a_tool_stops_it_at_once_and_keeps_the_conversation_valid(
    make_agent, fake_api
):
    host = ScriptedHost(delay_s=30)
    h = make_agent(host)
    fake_api.push(fm.tool("toolu_1", "devvm_shell", {"command": "sleep 600"}))
    task = asyncio.create_task(h.agent.handle("wait a bit"))
    for _ in range(200):
        if host.ran:
            break
        await asyncio.sleep(0.02)
    assert host.ran == ["sleep 600"]
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    assert host.cancelled == ["sleep 600"]
    ended = h.of(ToolCallEnded)[-1]
    assert ended.cancelled and not ended.ok
    last = h.agent.messages[-1]
    assert last["role"] == "user" and last["content"][0]["tool_use_id"] == "toolu_1"
    assert "Cancelled" in last["content"][0]["content"]
    # The next message continues the same conversation, valid for the API.
    fake_api.push(fm.text("Stopped it."))
    await h.agent.handle("never mind")
    assert_tool_results_first(fake_api.bodies)
    assert fake_api.bodies[-1]["messages"][-1]["content"][-1]["text"] == "never mind"


async def test_cancel_during_the_stream_stops_it_at_once(make_agent, fake_api):
    h = make_agent()
    slow = fm.text("This answer arrives very slowly indeed")
    slow.frame_delay_s = 0.5
    fake_api.push(slow)
    task = asyncio.create_task(h.agent.handle("hello"))
    for _ in range(200):
        if h.of(AssistantTextDelta):
            break
        await asyncio.sleep(0.02)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert h.of(AssistantTurnEnded)[-1].stop_reason == "cancelled"
    assert [m["role"] for m in h.agent.messages] == ["user"]
