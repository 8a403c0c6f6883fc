"""A tool or a slash command is one entry: added to core.tools.REGISTRY or core.slash.COMMANDS,
it is in the API request, runs, is labelled in the audit log and the report's timeline, titled on
the screen and listed by /help — with nothing else edited."""

from __future__ import annotations

from pathlib import Path

import pytest

from breakglass_tui.core import slash, tools
from breakglass_tui.core.events import Notice, ToolCallEnded, ToolCallStarted
from breakglass_tui.ui.widgets.chat import describe_call
from tests.core.conftest import ScriptedHost
from tests.support import fake_messages_api as fm

ran: list[dict[str, object]] = []


async def _uptime(
    ctx: tools.ToolContext, call_id: str, tool_input: tools.ToolInput
) -> tools.ToolRun:
    ran.append(tool_input)
    return tools.ToolRun(f"up 3 days ({tool_input.get('unit', 'days')})", summary="up 3 days")


UPTIME = tools.Tool(
    name="devvm_uptime",
    description="How long the devvm has been up, from /proc/uptime.",
    input_schema={"type": "object", "properties": {"unit": {"type": "string"}}},
    handler=_uptime,
    label=lambda tool_input: f"in {tool_input.get('unit', 'days')}",
    title=lambda tool_input: "uptime of the devvm",
)


@pytest.fixture
def with_uptime_tool(monkeypatch: pytest.MonkeyPatch) -> tools.Tool:
    ran.clear()
    monkeypatch.setitem(tools.REGISTRY, UPTIME.name, UPTIME)
    return UPTIME


async def test_a_new_tool_is_asked_for_run_audited_and_reported(
    make_agent, fake_api, with_uptime_tool
):
    h = make_agent()
    fake_api.push(fm.tool("t1", "devvm_uptime", {"unit": "hours"}), fm.text("Up for days."))
    await h.agent.handle("how long has it been up?")

    offered = {t["name"]: t for t in fake_api.bodies[0]["tools"]}
    assert offered["devvm_uptime"]["description"] == UPTIME.description
    assert offered["devvm_uptime"]["input_schema"] == UPTIME.input_schema
    assert ran == [{"unit": "hours"}]
    # The result went back to Claude.
    results = [
        b
        for m in fake_api.bodies[1]["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]
    assert results and "up 3 days (hours)" in str(results[-1]["content"])
    (started,) = h.of(ToolCallStarted)
    assert started.tool == "devvm_uptime" and not started.mutating
    assert [e.summary for e in h.of(ToolCallEnded)] == ["up 3 days"]

    calls = [r for r in h.audit() if r["kind"] == "tool_call"]
    assert [(r["tool"], r["label"]) for r in calls] == [("devvm_uptime", "in hours")]
    # The screen's title for it, as the chat and the live-output pane show it.
    assert describe_call("devvm_uptime", {"unit": "hours"}) == "uptime of the devvm"

    report = Path(h.agent.write_report()).read_text()
    assert "Claude ran devvm_uptime in hours" in report
    assert "devvm_uptime in hours: up 3 days" in report


async def test_a_new_slash_command_is_listed_run_and_audited(make_agent, monkeypatch):
    entry = slash.SlashCommand(
        "/uptime",
        "how long the devvm has been up",
        palette="Uptime of the devvm",
        tool="devvm_shell",
        tool_input=lambda rest: {"command": "uptime"},
    )
    monkeypatch.setattr(slash, "COMMANDS", (*slash.COMMANDS, entry))
    host = ScriptedHost(outputs={"uptime": " 10:00 up 3 days\n"})
    h = make_agent(host, api_key=None)

    await h.agent.handle("/help")
    (help_notice,) = [n.text for n in h.of(Notice) if "Slash commands" in n.text]
    assert "/uptime" in help_notice and "how long the devvm has been up" in help_notice

    await h.agent.handle("/UPTIME")
    assert host.ran == ["uptime"]
    (started,) = h.of(ToolCallStarted)
    assert (started.tool, started.manual) == ("devvm_shell", True)
    calls = [r for r in h.audit() if r["kind"] == "tool_call"]
    assert [(r["tool"], r["label"], r["manual"]) for r in calls] == [
        ("devvm_shell", "'uptime'", True)
    ]
    assert "/uptime " not in slash.completions() and "/uptime" in slash.completions()


def test_every_slash_command_of_the_table_is_in_the_agents_help() -> None:
    text = slash.help_text()
    for command in slash.COMMANDS:
        assert f"  {command.shown} " in text, command.name
    # The agent's own list once lacked these (three lists that disagreed).
    for name in ("/takeover", "/close", "/drop"):
        assert slash.find(name) is not None


def test_every_tool_of_the_registry_is_offered_with_its_schema() -> None:
    offered = tools.definitions()
    assert [t["name"] for t in offered] == list(tools.REGISTRY)
    assert offered[-1]["cache_control"] == {"type": "ephemeral"}
    assert sum("cache_control" in t for t in offered) == 1
    for tool in offered:
        assert tool["input_schema"]["type"] == "object"
