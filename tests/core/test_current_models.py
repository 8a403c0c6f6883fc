"""The breakglass agent on the current models' Messages API (Claude Sonnet 5.5, Opus 5.5), against
the strict fake: assistant turns go back verbatim, thinking is never replayed where the API would
refuse it (unsigned, a changed prefix, another model), the between-tools text reaches the
operator, the fallback model, effort, the spend limit, the forensics the model sees, and the
report the model writes. The fixture fails any test whose requests the strict fake refused."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from typing import Any

import pytest

from breakglass_tui.core import prompt
from breakglass_tui.core.events import (
    ApiError,
    AssistantThinkingDelta,
    AssistantThinkingEnded,
    AssistantThinkingStarted,
    AssistantTurnEnded,
    ModeChanged,
    ModelSwitched,
    Notice,
    ReportReady,
)
from tests.core.conftest import ScriptedHost
from tests.core.test_loop import assert_tool_results_first
from tests.support import fake_messages_api as fm


def assistant_turns(body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [m["content"] for m in body["messages"] if m["role"] == "assistant"]


def thinking_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    kinds = ("thinking", "redacted_thinking")
    return [b for turn in assistant_turns(body) for b in turn if b["type"] in kinds]


def png(width: int, height: int) -> bytes:
    """A real PNG (black), built with the standard library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\x00" * width * 3 for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# -- verbatim turns ------------------------------------------------------------------------------


async def test_every_block_goes_back_exactly_as_returned(make_agent, fake_api):
    """thinking with its signature, redacted_thinking, text and tool_use, in order, as received:
    the second request of a tool loop, which a rebuilt turn makes a 400."""
    h = make_agent(ScriptedHost(outputs={"df -h": "/dev/vda1 100%\n"}))
    fake_api.push(
        fm.reply(
            "Checking the disk.",
            [("toolu_1", "devvm_shell", {"command": "df -h"})],
            thinking=("The disk first.", "Then the logs."),
            redacted=True,
        ),
        fm.text("The disk is full."),
    )
    await h.agent.handle("the devvm is slow")
    (turn,) = assistant_turns(fake_api.bodies[1])
    assert [b["type"] for b in turn] == [
        "thinking",
        "thinking",
        "redacted_thinking",
        "text",
        "tool_use",
    ]
    assert [b["thinking"] for b in turn[:2]] == ["The disk first.", "Then the logs."]
    assert all(b["signature"].startswith("fake1.") for b in turn[:2])
    assert turn[2]["data"].startswith("fakeR.")
    # The stored turn is the one sent (private keys aside) and survives a JSON round trip.
    stored = h.agent.messages[1]
    assert stored["_model"] == "claude-sonnet-5-5" and stored["_basis"]
    assert {k: v for k, v in stored.items() if not k.startswith("_")} == {
        "role": "assistant",
        "content": turn,
    }
    assert json.loads(json.dumps(h.agent.messages)) == h.agent.messages
    assert fake_api.transformations == [[], []]  # the API dropped nothing


async def test_the_between_tools_text_is_streamed_with_how_long_claude_thought(
    make_agent, fake_api
):
    h = make_agent()
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}, thinking="SSH first, then the disk."),
        fm.text("Healthy.", thinking="It answers; nothing to do."),
    )
    await h.agent.handle("is it up?")
    # The display that returns the text was asked for, so the text arrived and was shown.
    assert all(b["thinking"]["display"] == "summarized" for b in fake_api.bodies)
    shown = "".join(e.text for e in h.of(AssistantThinkingDelta))
    assert shown == "SSH first, then the disk.It answers; nothing to do."
    started, ended = h.of(AssistantThinkingStarted), h.of(AssistantThinkingEnded)
    assert len(started) == len(ended) == 2 and all(e.duration_s >= 0 for e in ended)
    turn_ids = [e.turn_id for e in h.of(AssistantTurnEnded)]
    assert [e.turn_id for e in ended] == turn_ids
    record = next(r for r in h.audit() if r["kind"] == "model_turn")
    assert record["thinking"] == "SSH first, then the disk." and record["thinking_s"] >= 0


# -- never replay what cannot be replayed ---------------------------------------------------------


async def test_a_stream_dropped_inside_thinking_leaves_no_unsigned_block(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.dropped_in_thinking(), fm.text("Here I am."))
    await h.agent.handle("hello")
    [err] = h.of(ApiError)
    assert err.kind == "dropped" and err.will_retry
    assert fake_api.bodies[0]["messages"] == fake_api.bodies[1]["messages"]
    assert [m["role"] for m in h.agent.messages] == ["user", "assistant"]
    assert all(
        b.get("signature") for b in h.agent.messages[1]["content"] if b["type"] == "thinking"
    )
    fake_api.push(fm.text("Still here."))
    await h.agent.handle("and now?")
    assert len(thinking_blocks(fake_api.bodies[-1])) == 1


async def test_cancel_in_the_middle_of_thinking_keeps_nothing_of_it(make_agent, fake_api):
    h = make_agent()
    slow = fm.text("An answer that never comes.", thinking="Thinking slowly " * 20)
    slow.frame_delay_s = 0.5
    fake_api.push(slow)
    task = asyncio.create_task(h.agent.handle("hello"))
    for _ in range(200):
        if h.of(AssistantThinkingDelta):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [m["role"] for m in h.agent.messages] == ["user"]
    fake_api.push(fm.text("Back."))
    await h.agent.handle("go on")
    assert [m["role"] for m in fake_api.bodies[-1]["messages"]] == ["user"]


async def test_resume_after_an_upgrade_that_changed_the_runbook_leaves_old_thinking_out(
    make_agent, fake_api, monkeypatch
):
    """The conversation was saved under another system prompt and tool list: its thinking
    blocks are bound to them. The resumed session sends the turns without their thinking."""
    saved: list[Any] = []
    a = make_agent(save_conversation=lambda m: saved.append(json.loads(json.dumps(m))))
    fake_api.push(fm.tool("t1", "probe_devvm", {}), fm.text("It answers."))
    await a.agent.handle("is it up?")
    await a.agent.close()
    monkeypatch.setattr(prompt, "RUNBOOK", prompt.RUNBOOK + "\nA line added by an upgrade.\n")
    original = prompt.tool_definitions
    monkeypatch.setattr(
        prompt,
        "tool_definitions",
        lambda: [*original()[:-1], {**original()[-1], "description": "new"}],
    )
    b = make_agent(conversation=saved[-1])
    fake_api.push(fm.tool("t2", "probe_devvm", {}), fm.text("Still fine."))
    await b.agent.handle("and now?")
    first = fake_api.bodies[2]
    assert thinking_blocks(first) == []  # the old turns, without the thinking bound elsewhere
    assert [b["type"] for b in assistant_turns(first)[0]] == ["text", "tool_use"]
    # The new turns' thinking is bound to the new prefix and goes back in the loop.
    assert len(thinking_blocks(fake_api.bodies[3])) == 1
    assert_tool_results_first(fake_api.bodies)


async def test_take_over_mid_cycle_continues_with_the_saved_thinking(make_agent, fake_api):
    """A tab is taken over while its tool runs: the saved conversation ends in Claude's turn
    (thinking, text, tool_use). The new driver answers the interrupted call and goes on; the
    turn goes back verbatim, its thinking accepted (same model, same prefix)."""
    saved: list[Any] = []
    host = ScriptedHost(delay_s=30)
    a = make_agent(host, save_conversation=lambda m: saved.append(json.loads(json.dumps(m))))
    fake_api.push(fm.tool("t1", "devvm_shell", {"command": "sleep 600"}, redacted=True))
    task = asyncio.create_task(a.agent.handle("wait for it"))
    for _ in range(200):
        if host.ran:
            break
        await asyncio.sleep(0.02)
    snapshot = saved[-1]  # what conversation.json held when the other tab took over
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert snapshot[-1]["role"] == "assistant"
    assert [b["type"] for b in snapshot[-1]["content"]][:2] == ["thinking", "redacted_thinking"]
    b = make_agent(conversation=snapshot)
    fake_api.push(fm.text("The command was interrupted; the devvm is fine."))
    await b.agent.handle("I took over: where are we?")
    body = fake_api.bodies[-1]
    (turn,) = assistant_turns(body)
    assert [x["type"] for x in turn] == ["thinking", "redacted_thinking", "text", "tool_use"]
    assert body["messages"][-1]["content"][0]["content"].startswith("Interrupted")
    assert fake_api.transformations[-1] == []


async def test_a_binding_400_is_repaired_by_leaving_the_completed_turns_thinking_out(
    make_agent, fake_api
):
    """Should a stored turn's thinking not be accepted back (here: its text was altered on
    disk), the agent leaves the completed turns' thinking out and asks once more."""
    h = make_agent()
    fake_api.push(fm.text("First answer."))
    await h.agent.handle("one")
    h.agent.messages[1]["content"][0]["thinking"] += " (edited)"
    fake_api.push(fm.text("Second answer."))
    await h.agent.handle("two")
    assert [e.kind for e in h.of(ApiError)] == ["bad_request"]
    assert thinking_blocks(fake_api.bodies[-1]) == []
    assert h.of(AssistantTurnEnded)[-1].stop_reason == "end_turn" and not h.agent.manual
    assert [status for status, _ in fake_api.rejections] == [400]
    assert "bound to a different conversation" in fake_api.rejections[0][1]
    fake_api.rejections.clear()  # the one refusal this test provoked on purpose


# -- the model, its fallback, effort -------------------------------------------------------------


async def test_refusal_falls_back_for_this_message_and_unreadable_thinking_is_left_out(
    make_agent, fake_api, settings
):
    h = make_agent(settings=settings.model_copy(update={"fallback_model": "claude-opus-5-5"}))
    fake_api.push(fm.text("Fine.", thinking="Sonnet's reasoning."))
    await h.agent.handle("hello")
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}),  # Sonnet starts the loop
        fm.text("No.", stop_reason="refusal"),  # and refuses on its result
        fm.text("Opus goes on: the devvm answers.", thinking="Opus's reasoning."),
    )
    await h.agent.handle("check it")
    models = [b["model"] for b in fake_api.bodies]
    assert models == ["claude-sonnet-5-5"] * 3 + ["claude-opus-5-5"]
    [switch] = h.of(ModelSwitched)
    assert switch.model == "claude-opus-5-5" and "refusal" in switch.reason
    # Opus cannot read Sonnet's thinking: it is left out, not left for the API to drop.
    opus = fake_api.bodies[3]
    assert thinking_blocks(opus) == [] and fake_api.transformations[3] == []
    assert [b["type"] for b in assistant_turns(opus)[-1]] == ["text", "tool_use"]
    # The next operator message asks the configured model again, without Opus's thinking.
    fake_api.push(fm.text("Sonnet again."))
    await h.agent.handle("thanks")
    last = fake_api.bodies[-1]
    assert last["model"] == "claude-sonnet-5-5"
    # Sonnet's own turns keep their thinking (the loop it started too); Opus's is left out.
    assert [b["thinking"] for b in thinking_blocks(last)] == [
        "Sonnet's reasoning.",
        fm.DEFAULT_THINKING,
    ]
    assert h.of(ModelSwitched)[-1].model == "claude-sonnet-5-5"
    assert_tool_results_first(fake_api.bodies)


async def test_persistent_overload_falls_back_before_manual_mode(make_agent, fake_api, settings):
    h = make_agent(
        settings=settings.model_copy(update={"fallback_model": "claude-opus-5-5"}),
        sdk_max_retries=0,
        turn_retries=1,
    )
    fake_api.push(
        fm.HttpError(529, "overloaded_error"),
        fm.HttpError(529, "overloaded_error"),
        fm.text("Opus here."),
    )
    await h.agent.handle("hello")
    assert [b["model"] for b in fake_api.bodies] == ["claude-sonnet-5-5"] * 2 + ["claude-opus-5-5"]
    assert not h.agent.manual and h.of(AssistantTurnEnded)[-1].stop_reason == "end_turn"
    assert h.agent.messages[-1]["_model"] == "claude-opus-5-5"


async def test_effort_is_sent_as_output_config(make_agent, fake_api, settings):
    h = make_agent(settings=settings.model_copy(update={"effort": "low"}))
    fake_api.push(fm.text("ok"))
    await h.agent.handle("hi")
    assert fake_api.bodies[0]["output_config"] == {"effort": "low"}


# -- cost --------------------------------------------------------------------------------------


async def test_spend_limit_warns_at_80_percent_and_stops_claude_at_100(
    make_agent, fake_api, settings
):
    # Sonnet 5.5: $2 per MTok of input. 0.42 + 0.42 + 0.42 = $1.26 against a $1.00 limit.
    h = make_agent(settings=settings.model_copy(update={"max_cost_usd": 1.0}))
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}, input_tokens=210_000, output_tokens=0),
        fm.tool("t2", "probe_devvm", {}, input_tokens=210_000, output_tokens=0),
        fm.tool("t3", "probe_devvm", {}, input_tokens=210_000, output_tokens=0),
        fm.text("never asked"),
    )
    await h.agent.handle("go")
    assert len(fake_api.requests) == 3
    warnings = [n.text for n in h.of(Notice) if "spend limit" in n.text]
    assert len(warnings) == 1 and "84%" in warnings[0] and "$0.84 of $1.00" in warnings[0]
    assert h.agent.manual
    mode = h.of(ModeChanged)[-1]
    assert mode.manual and "spend limit is reached" in mode.reason
    assert "BREAKGLASS_MAX_COST_USD" in mode.reason
    # The slash commands still work; Claude is not asked again.
    await h.agent.handle("/probe")
    await h.agent.handle("and now?")
    assert len(fake_api.requests) == 3
    assert [r["kind"] for r in h.audit() if r["kind"].startswith("spend")] == [
        "spend_warning",
        "spend_limit",
        "spend_limit",
    ]
    fake_api.script.clear()


async def test_a_model_without_a_price_is_cost_unknown_not_zero(make_agent, fake_api, settings):
    h = make_agent(settings=settings.model_copy(update={"model": "claude-haiku-5-5"}))
    fake_api.push(fm.text("hi", input_tokens=10, output_tokens=5))
    await h.agent.handle("hi")
    ended = h.of(AssistantTurnEnded)[-1]
    assert ended.usage.cost_known is False and ended.total_usage.cost_known is False
    assert any("cost unknown" in n.text and "cannot be enforced" in n.text for n in h.of(Notice))
    assert "Cost: unknown" in h.agent.write_report().read_text()


# -- forensics the model sees ----------------------------------------------------------------------


class BundleHost(ScriptedHost):
    """A PVE host whose verbs capture a bundle with text files and a screendump."""

    screendump: bytes = png(64, 48)

    async def verb(self, name: str):  # type: ignore[no-untyped-def]
        result = await super().verb(name)
        from dataclasses import replace

        return replace(result, bundle_id=f"20261201T101500Z-{name}-abc123")

    async def bundle(self, bundle_id: str) -> dict[str, Any]:
        files = {
            "qmp_query_status.txt": b'{"status": "io-error", "running": false}\n',
            "dmesg.txt": b"".join(b"[%d] blk_update_request: I/O error\n" % i for i in range(500)),
            "screendump.png": self.screendump,
        }
        return {
            "verb": "bundle",
            "ok": True,
            "bundle_id": bundle_id,
            "manifest": {"probes": []},
            "files": {k: base64.b64encode(v).decode() for k, v in files.items()},
        }


async def test_a_verbs_bundle_is_outputs_and_its_screendump_an_image(make_agent, fake_api):
    host = BundleHost()
    h = make_agent(host)
    fake_api.push(
        fm.tool("t1", "pve_verb", {"verb": "reset"}),
        fm.tool("t2", "grep_output", {"output_id": h.agent.outputs.id_for(1), "pattern": "I/O"}),
        fm.text("The disk behind the VM fails."),
    )
    await h.agent.handle("the devvm is frozen")
    result = fake_api.bodies[1]["messages"][-1]["content"][0]
    text, image = result["content"]
    assert image["type"] == "image" and image["source"]["media_type"] == "image/png"
    assert base64.b64decode(image["source"]["data"]) == host.screendump
    assert "forensics bundle 20261201T101500Z-reset-abc123" in text["text"]
    assert '"status": "io-error"' in text["text"]  # the VM's state, inline
    dmesg = h.agent.outputs.id_for(1)  # the bundle's files are stored first, in name order
    assert (
        f"dmesg.txt (host dmesg (hung tasks, I/O errors, OOM)): output_id {dmesg}" in text["text"]
    )
    grep = fake_api.bodies[2]["messages"][-1]["content"][0]["content"]
    assert "blk_update_request: I/O error" in grep


async def test_a_screendump_over_the_image_limit_is_described_not_sent(make_agent, fake_api):
    host = BundleHost()
    h = make_agent(host, image_limit_bytes=len(host.screendump) - 1)
    fake_api.push(fm.tool("t1", "pve_verb", {"verb": "forensics"}), fm.text("Seen."))
    await h.agent.handle("look")
    content = fake_api.bodies[1]["messages"][-1]["content"][0]["content"]
    assert isinstance(content, str) and "over the image limit" in content


# -- the report Claude writes --------------------------------------------------------------------


async def test_report_is_written_by_claude_with_tool_choice_none_and_the_record_appended(
    make_agent, fake_api
):
    h = make_agent(ScriptedHost(outputs={"df -h": "/dev/vda1 100% /\n"}))
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": "df -h"}),
        fm.text("The disk was full; cleaned."),
    )
    await h.agent.handle("fix it")
    before = json.loads(json.dumps(h.agent.messages))
    fake_api.push(
        fm.text(
            "## Summary\nThe root filesystem was full.\n## Root cause\nA runaway log"
            f" ({h.agent.outputs.id_for(1)}).\n## Actions\n- df\n## Follow-ups\n- rotate logs"
        )
    )
    await h.agent.handle("/report")
    body = fake_api.bodies[-1]
    previous = fake_api.bodies[-2]
    assert body["tool_choice"] == {"type": "none"}
    assert body["system"] == previous["system"] and body["tools"] == previous["tools"]
    assert "incident report" in body["messages"][-1]["content"][-1]["text"]
    assert len(thinking_blocks(body)) == 2  # the prefix is intact: its thinking goes back
    [ready] = h.of(ReportReady)
    assert "## Root cause\nA runaway log" in ready.markdown
    assert "## Appendix: the record" in ready.markdown and "### Commands" in ready.markdown
    assert ready.markdown.index("## Summary") < ready.markdown.index("## Appendix")
    assert h.agent.messages == before  # the report turn is not kept in the conversation


async def test_report_in_manual_mode_is_the_record_alone(make_agent, fake_api):
    h = make_agent(api_key="", api=None)
    await h.agent.handle("/report")
    [ready] = h.of(ReportReady)
    assert "## Outcome" in ready.markdown and "Appendix" not in ready.markdown
    assert fake_api.requests == []
