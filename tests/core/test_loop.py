"""The tool loop against the real SDK and the fake Messages API: text, tools, parallel tools, and
what the requests carry (tool results first, cache breakpoints, budgets)."""

from __future__ import annotations

import json
from typing import Any

from breakglass_tui.core.events import (
    AssistantTextDelta,
    AssistantTurnEnded,
    ToolCallEnded,
    ToolCallStarted,
    ToolOutput,
)
from tests.core.conftest import ScriptedHost
from tests.support import fake_messages_api as fm


def assert_tool_results_first(bodies: list[dict[str, Any]]) -> None:
    """Every assistant tool_use is answered in the next user message, results before anything."""
    for body in bodies:
        messages = body["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            ids = [b["id"] for b in message["content"] if b["type"] == "tool_use"]
            if not ids:
                continue
            nxt = messages[i + 1]
            assert nxt["role"] == "user"
            head = nxt["content"][: len(ids)]
            assert [b["type"] for b in head] == ["tool_result"] * len(ids), nxt["content"]
            assert sorted(b["tool_use_id"] for b in head) == sorted(ids)


async def test_text_only_answer_streams_deltas_and_reports_usage(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.text("The devvm looks fine.", input_tokens=1000, output_tokens=200))
    await h.agent.handle("how is the devvm?")

    assert "".join(e.text for e in h.of(AssistantTextDelta)) == "The devvm looks fine."
    ended = h.of(AssistantTurnEnded)[-1]
    assert ended.stop_reason == "end_turn"
    assert (ended.usage.input_tokens, ended.usage.output_tokens) == (1000, 200)
    # claude-sonnet-5-5, the default: $2 / $10 per MTok
    assert abs(ended.usage.cost_usd - (1000 * 2 + 200 * 10) / 1e6) < 1e-9
    body = fake_api.bodies[0]
    assert body["model"] == "claude-sonnet-5-5"
    assert body["stream"] is True
    # Adaptive thinking, with the between-tools text returned; no effort unless configured.
    assert body["thinking"] == {"type": "adaptive", "display": "summarized"}
    assert "output_config" not in body and "temperature" not in body
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "how is the devvm?",
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        }
    ]
    headers = fake_api.requests[0].headers
    sent_key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    assert sent_key.startswith("sk-ant-test")


async def test_one_tool_call_runs_on_the_host_and_is_answered(make_agent, fake_api):
    host = ScriptedHost(outputs={"df -h": "Filesystem Size Used Avail Use% Mounted on\n"})
    h = make_agent(host)
    fake_api.push(
        fm.tool("toolu_1", "devvm_shell", {"command": "df -h"}),
        fm.text("Disk is fine."),
    )
    await h.agent.handle("check the disk")

    assert host.ran == ["df -h"]
    started = h.of(ToolCallStarted)
    assert [(e.call_id, e.tool, e.manual) for e in started] == [("toolu_1", "devvm_shell", False)]
    assert "Filesystem" in "".join(e.chunk.text for e in h.of(ToolOutput))
    ended = h.of(ToolCallEnded)[0]
    assert ended.ok and ended.exit_status == 0
    second = fake_api.bodies[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    result = second[2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
    assert "exit 0" in result["content"] and "Filesystem" in result["content"]
    assert "sha256" in result["content"]
    assert f"output_id {h.agent.outputs.id_for(1)} " in result["content"]
    assert_tool_results_first(fake_api.bodies)


async def test_parallel_tool_uses_all_answered_in_one_user_message(make_agent, fake_api):
    host = ScriptedHost()
    h = make_agent(host)
    fake_api.push(
        fm.reply(
            "Three things at once.",
            [
                ("toolu_a", "probe_devvm", {}),
                ("toolu_b", "devvm_shell", {"command": "uptime"}),
                ("toolu_c", "pve_verb", {"verb": "status"}),
            ],
        ),
        fm.text("All good."),
    )
    await h.agent.handle("look around")

    assert host.ran == ["uptime"] and host.verbs == ["status"]
    user = fake_api.bodies[1]["messages"][2]
    assert [b["tool_use_id"] for b in user["content"]] == ["toolu_a", "toolu_b", "toolu_c"]
    assert all(b["type"] == "tool_result" for b in user["content"])
    assert "healthy" in user["content"][0]["content"]
    assert "pve_verb status: ok" in user["content"][2]["content"]
    assert_tool_results_first(fake_api.bodies)


async def test_cache_control_on_last_tool_last_system_block_and_tools_exact(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.text("ok"))
    await h.agent.handle("hi")
    body = fake_api.bodies[0]
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert all("cache_control" not in t for t in body["tools"][:-1])
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "warm-case runbook" in body["system"][-1]["text"].lower()
    assert "cold case" in body["system"][-1]["text"].lower()
    tools = {t["name"]: t["input_schema"] for t in body["tools"]}
    assert tools["devvm_shell"]["properties"]["command"]["type"] == "string"
    assert tools["devvm_shell"]["properties"]["timeout_s"]["type"] == "integer"
    assert tools["devvm_shell"]["required"] == ["command"]
    assert tools["pve_verb"]["properties"]["verb"]["enum"] == [
        "status",
        "forensics",
        "reset",
        "stop",
        "start",
        "cycle",
    ]
    assert tools["probe_devvm"]["properties"] == {}
    assert {"read_output", "grep_output"} <= set(tools)
    # The stored conversation stays clean: the breakpoint is only in the request.
    assert "cache_control" not in json.dumps(h.agent.messages)


async def test_ten_megabyte_output_stays_within_its_view_and_is_readable(make_agent, fake_api):
    big = "".join(f"line {i:07d} {'x' * 80}\n" for i in range(110_000))  # ~10 MB
    big = big.replace("line 0054321", "line 0054321 NEEDLE", 1)
    host = ScriptedHost(outputs={"cat /var/log/huge": big})
    h = make_agent(host, output_view_bytes=8192, output_view_tokens=2048)
    o1 = h.agent.outputs.id_for(1)
    fake_api.push(
        fm.tool("toolu_1", "devvm_shell", {"command": "cat /var/log/huge"}),
        fm.tool("toolu_2", "grep_output", {"output_id": o1, "pattern": "NEEDLE"}),
        fm.tool("toolu_3", "read_output", {"output_id": o1, "offset": 5_000_000, "length": 10**9}),
        fm.text("Found it."),
    )
    await h.agent.handle("read the huge log")

    assert len(big.encode()) > 10_000_000
    sizes = [len(json.dumps(b)) for b in fake_api.bodies]
    # The requests grow by a budget per output, never by the output.
    assert max(sizes) < sizes[0] + 4 * 8192 + 6000, sizes
    result = fake_api.bodies[1]["messages"][2]["content"][0]["content"]
    assert "line 0000000" in result and "line 0109999" in result  # head and tail
    assert "bytes elided" in result
    import hashlib

    assert hashlib.sha256(big.encode()).hexdigest() in result
    grep = fake_api.bodies[2]["messages"][4]["content"][0]["content"]
    assert "1 matching line" in grep and "NEEDLE" in grep
    read = fake_api.bodies[3]["messages"][6]["content"][0]["content"]
    assert "bytes 5000000.." in read and "capped" in read
    # The transcript keeps the whole output.
    record = h.agent.outputs.records[o1]
    assert record.path.stat().st_size == len(big.encode())


async def test_unknown_tool_and_bad_input_are_answered_as_errors(make_agent, fake_api):
    h = make_agent()
    fake_api.push(
        fm.reply(None, [("t1", "rm_everything", {}), ("t2", "pve_verb", {"verb": "destroy"})]),
        fm.text("Sorry."),
    )
    await h.agent.handle("go")
    content = fake_api.bodies[1]["messages"][2]["content"]
    assert content[0]["is_error"] is True and "Unknown tool" in content[0]["content"]
    assert content[1]["is_error"] is True and "Unknown verb" in content[1]["content"]


async def test_a_fifty_step_incident_stays_bounded_and_never_gets_a_400(
    make_agent, fake_api, settings
):
    """50 steps over five operator messages, 25 of them 40 KB outputs. Inside each tool loop
    nothing sent is edited (the thinking blocks are bound to it): the API's context editing
    clears the oldest results on its side, so what the model sees stays bounded. At each
    operator message the completed turns' thinking goes and the older results are shortened, so
    what is sent stays bounded too. The strict fake refuses nothing (the fixture checks)."""
    big = {f"big {i}": f"{i}:" + ("y" * 99 + "\n") * 400 for i in range(25)}
    host = ScriptedHost(outputs=big)
    h = make_agent(
        host,
        settings=settings.model_copy(update={"max_steps": 12}),
        context_limit_bytes=60_000,
        keep_recent_results=4,
        context_trigger_tokens=12_000,
        context_clear_at_least_tokens=2_000,
    )
    step = 0
    for message in range(5):
        script = []
        for _ in range(10):
            command = f"big {step // 2}" if step % 2 == 0 else f"uptime {step}"
            script.append(fm.tool(f"t{step}", "devvm_shell", {"command": command}))
            step += 1
        script.append(fm.text(f"Checkpoint {message}."))
        fake_api.push(*script)
        await h.agent.handle(f"go on ({message})")
    assert len(host.ran) == 50 and not h.agent.manual
    assert len(fake_api.bodies) == 55
    sizes = [len(json.dumps(b)) for b in fake_api.bodies]
    naive = sum(len(v) for v in big.values())  # 1 MB: what the outputs hold
    assert max(sizes) < 150_000 < naive, max(sizes)
    # What the model sees stays under the trigger plus the results of a few steps.
    assert max(fake_api.seen_tokens) < 12_000 + 2 * 2_500, max(fake_api.seen_tokens)
    assert any(edits for edits in fake_api.applied_edits)
    body = fake_api.bodies[-2]  # the last tool loop: its turns go back with their thinking
    sent = [b for m in body["messages"] if m["role"] == "assistant" for b in m["content"]]
    assert sum(b["type"] == "thinking" for b in sent) >= 9
    # The earlier operator messages' turns lost their thinking at a boundary, and the results
    # before the last few were shortened there (their output_id still readable).
    results = [
        b
        for m in body["messages"]
        if m["role"] == "user"
        for b in m["content"]
        if b["type"] == "tool_result"
    ]
    assert results[0]["content"].startswith("[older result, shortened]")
    assert f"output_id {h.agent.outputs.id_for(1)} " in results[0]["content"]
    assert_tool_results_first(fake_api.bodies)


async def test_sdk_environment_variables_are_honoured(make_agent, fake_api, monkeypatch):
    from tests.core.conftest import API_KEY

    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_api.base_url)
    h = make_agent(api=None, api_key=None, base_url=None)
    fake_api.push(fm.text("via the environment"))
    await h.agent.handle("hi")
    assert len(fake_api.requests) == 1 and not h.agent.manual


async def test_unknown_model_reports_tokens_only(make_agent, fake_api, settings):
    from breakglass_tui.core.events import Notice

    h = make_agent(settings=settings.model_copy(update={"model": "claude-fable-5-2"}))
    fake_api.push(fm.text("hi", input_tokens=10, output_tokens=5))
    await h.agent.handle("hi")
    ended = h.of(AssistantTurnEnded)[-1]
    assert ended.usage.input_tokens == 10 and ended.usage.cost_usd == 0.0
    assert any("tokens only" in n.text for n in h.of(Notice))
    assert "Cost: unknown" in h.agent.write_report().read_text()


def test_importing_the_agent_does_not_import_the_sdk():
    import subprocess
    import sys

    code = (
        "import sys, breakglass_tui.core.agent as a;"
        "print(sorted(m for m in ('anthropic', 'httpx2', 'textual') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_pve_host_unreachable_is_named_the_cold_case(make_agent, fake_api):
    from breakglass_tui.config import DEFAULT_COLD_PATH_POINTER
    from breakglass_tui.hosts.types import VerbResult

    class ColdHost(ScriptedHost):
        async def verb(self, name: str) -> VerbResult:
            return VerbResult(
                verb=name,
                ok=False,
                exit_code=255,
                cold_case=True,
                message="the PVE host did not answer on 127.0.0.1:22",
            )

    h = make_agent(ColdHost())
    fake_api.push(fm.tool("t1", "pve_verb", {"verb": "status"}), fm.text("Cold case."))
    await h.agent.handle("the devvm is down")
    result = fake_api.bodies[1]["messages"][2]["content"][0]
    assert result["is_error"] is True
    assert "COLD CASE" in result["content"] and DEFAULT_COLD_PATH_POINTER in result["content"]
    assert "Cold case" in h.agent.write_report().read_text()


async def test_an_empty_answer_is_not_kept_in_the_conversation(make_agent, fake_api):
    h = make_agent()
    fake_api.push(fm.reply(None), fm.text("Now with words."))
    await h.agent.handle("first")
    await h.agent.handle("second")
    # The API refuses an assistant message with empty content: it must never be sent.
    for body in fake_api.bodies:
        assert all(m["content"] for m in body["messages"])
    assert [b["text"] for b in fake_api.bodies[1]["messages"][0]["content"]] == ["first", "second"]


async def test_a_saved_conversation_is_restored_and_repaired(make_agent, fake_api):
    saved: list[list[dict[str, Any]]] = []
    h = make_agent(save_conversation=lambda m: saved.append(json.loads(json.dumps(m))))
    fake_api.push(fm.tool("t1", "devvm_shell", {"command": "uptime"}), fm.text("Fine."))
    await h.agent.handle("check")
    assert saved[-1] == h.agent.messages and len(saved[-1]) == 4
    # A tab closed while a tool ran: the conversation ends in a tool_use without its result.
    interrupted = saved[-1][:2]
    h2 = make_agent(conversation=interrupted)
    fake_api.push(fm.text("Picking up."))
    await h2.agent.handle("where were we?")
    body = fake_api.bodies[-1]
    assert_tool_results_first([body])
    assert body["messages"][2]["content"][0]["content"].startswith("Interrupted")
    assert body["messages"][2]["content"][1]["text"] == "where were we?"
