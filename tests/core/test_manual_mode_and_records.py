"""Manual mode (slash commands with or without Claude), what Claude learns of it, the audit log,
the transcript and the incident report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from breakglass_tui.core.events import (
    ModeChanged,
    Notice,
    ProbeUpdated,
    ReportReady,
    SessionStarted,
    ToolCallStarted,
    ToolOutput,
    VerbCompleted,
)
from tests.core.conftest import API_KEY, ScriptedHost
from tests.support import fake_messages_api as fm

PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACDk3mQvVhZJ0z5bq0n0r8mXb6y8Wm6Q0m8yHq3sYq2l9wAAAJgAAAAA\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)


async def test_no_api_key_means_manual_mode_and_slash_commands_work(make_agent, fake_api):
    host = ScriptedHost(outputs={"uptime": " 10:00 up 3 days\n"})
    h = make_agent(host, api_key=None)
    assert h.agent.manual
    assert "ANTHROPIC_API_KEY" in h.of(ModeChanged)[0].reason
    await h.agent.handle("hello?")  # no key: Claude is not asked
    await h.agent.handle("/probe")
    await h.agent.handle("/sh uptime")
    await h.agent.handle("/status")
    await h.agent.handle("/cycle")
    await h.agent.handle("/help")
    await h.agent.handle("/frobnicate")
    assert fake_api.requests == []
    assert host.ran == ["uptime"] and host.verbs == ["status", "cycle"]
    started = h.of(ToolCallStarted)
    assert [(e.tool, e.manual, e.mutating) for e in started] == [
        ("probe_devvm", True, False),
        ("devvm_shell", True, False),
        ("pve_verb", True, False),
        ("pve_verb", True, True),
    ]
    assert len(h.of(ProbeUpdated)) == 1 and len(h.of(VerbCompleted)) == 2
    assert "up 3 days" in "".join(e.chunk.text for e in h.of(ToolOutput))
    notices = [n.text for n in h.of(Notice)]
    assert any("/sh <command>" in t for t in notices)
    assert any("Unknown command /frobnicate" in t for t in notices)


async def test_manual_commands_work_with_the_api_down(make_agent):
    host = ScriptedHost(outputs={"df -h": "/dev/vda1 100% /\n"})
    h = make_agent(host, api=None, sdk_max_retries=0, turn_retries=0)
    await h.agent.handle("what is wrong?")
    assert h.agent.manual and h.of(ModeChanged)[-1].manual
    assert "connection" in h.of(ModeChanged)[-1].reason
    await h.agent.handle("/sh df -h")
    await h.agent.handle("/reset")
    assert host.ran == ["df -h"] and host.verbs == ["reset"]
    await h.agent.handle("/report")
    [ready] = h.of(ReportReady)
    assert "`'df -h'`" in ready.markdown and "| reset |" in ready.markdown


async def test_what_the_operator_did_manually_reaches_claude_next_turn(make_agent, fake_api):
    host = ScriptedHost(outputs={"df -h": "/dev/vda1 100% /\n"})
    h = make_agent(host)
    await h.agent.handle("/sh df -h")
    await h.agent.handle("/status")
    fake_api.push(fm.text("The root filesystem is full."))
    await h.agent.handle("what did I find?")
    content = fake_api.bodies[0]["messages"][0]["content"]
    assert content[0]["type"] == "text" and "ran these commands manually" in content[0]["text"]
    # Metadata only (issue 15): the command, its outcome, sizes, output_id; never the output.
    assert (
        f"/sh df -h: devvm_shell, exit 0, 17 B, 0.0 s, output_id {h.agent.outputs.id_for(1)}"
        in content[0]["text"]
    )
    assert "/status: pve_verb, ok (exit 0)" in content[0]["text"]
    assert "100%" not in content[0]["text"] and "status done" not in content[0]["text"]
    assert content[1]["text"] == "what did I find?"
    # Told once only.
    fake_api.push(fm.text("ok"))
    await h.agent.handle("thanks")
    assert "manually" not in json.dumps(fake_api.bodies[1]["messages"][-1])


async def test_audit_log_holds_every_event_in_order_and_no_key_material(
    make_agent, fake_api, capfd
):
    host = ScriptedHost(outputs={"cat /root/.ssh/id_ed25519": PRIVATE_KEY, "uptime": "up\n"})
    h = make_agent(host, sdk_max_retries=0)
    fake_api.push(
        fm.HttpError(529, "overloaded_error"),
        fm.tool("t1", "devvm_shell", {"command": "cat /root/.ssh/id_ed25519"}),
        fm.tool("t2", "pve_verb", {"verb": "forensics"}),
        fm.text(f"All done, and the key is {API_KEY}."),
    )
    await h.agent.handle("look at the key")
    await h.agent.handle("/sh uptime")
    await h.agent.close()
    # Never to stdout/stderr: in the app they are the screen (and the wire to the browser).
    assert capfd.readouterr() == ("", "")

    records = h.audit()
    kinds = [r["kind"] for r in records]
    assert kinds == [
        "session_start",
        "operator_message",
        "model_turn",  # the failed attempt (529), no text
        "api_error",
        "model_turn",
        "tool_call",
        "tool_result",
        "model_turn",
        "tool_call",
        "verb_result",
        "tool_result",
        "model_turn",
        "operator_message",
        "tool_call",
        "tool_result",
        "session_end",
    ], kinds
    assert {r["session_id"] for r in records} == {h.agent.session_id}
    assert {r["operator"] for r in records} == {"viktor"}
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)
    result = records[6]
    assert result["exit_status"] == 0 and result["output_id"] == h.agent.outputs.id_for(1)
    assert result["bytes"] == len(PRIVATE_KEY) and len(result["sha256"]) == 64
    assert records[9]["verb"] == "forensics" and "bundle_id" in records[9]
    assert records[11]["text"].startswith("All done") and "[secret elided]" in records[11]["text"]

    state = Path(h.agent.settings.state_dir)
    everything = "".join(
        p.read_text(errors="replace") for p in state.rglob("*") if p.is_file()
    ) + json.dumps(fake_api.bodies)
    assert API_KEY not in everything
    assert "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU" not in everything
    assert "BEGIN OPENSSH PRIVATE KEY" not in everything
    assert "[private key elided]" in json.dumps(fake_api.bodies[2])


async def test_transcript_keeps_full_outputs_and_report_is_written(make_agent, fake_api):
    out = "".join(f"{i}\n" for i in range(50_000))
    host = ScriptedHost(outputs={"seq 0 49999": out})
    h = make_agent(host)
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": "seq 0 49999"}),
        fm.text("Counted.", input_tokens=2000, output_tokens=100, cache_read=500),
    )
    await h.agent.handle("count")
    state = Path(h.agent.settings.state_dir)
    lines = [
        json.loads(line)
        for line in (state / "transcripts" / f"{h.agent.session_id}.jsonl").read_text().splitlines()
    ]
    # The output is stored once, in its own file; the transcript says where and what it holds.
    (stored,) = [r for r in lines if r["kind"] == "output"]
    o1 = h.agent.outputs.id_for(1)
    assert stored["file"] == f"transcripts/{h.agent.session_id}/{o1}.out"
    assert stored["bytes"] == stored["stored_bytes"] == len(out) and not stored["truncated"]
    assert stored["sha256"] == hashlib.sha256(out.encode()).hexdigest()
    assert "text" not in stored
    assert (state / stored["file"]).read_text() == out
    path = h.agent.write_report()
    text = path.read_text()
    assert path.parent == state / "reports"
    for heading in (
        "## Outcome",
        "## Commands",
        "## Forced-command verbs",
        "## Cost",
        "## Timeline",
    ):
        assert heading in text
    assert "`'seq 0 49999'`" in text and f"| 0 | {o1} |" in text
    assert "Cost: $" in text and "Counted." in text
    assert h.of(SessionStarted)[0].operator == "viktor"
