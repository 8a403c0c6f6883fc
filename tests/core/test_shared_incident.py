"""One incident, many sessions: each driving tab builds a new breakglass agent (a new session id)
from the saved conversation and the journal. Output ids, manual call ids and the report must be
the incident's, not one session's, and every emitted event (the journal) is scrubbed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from breakglass_tui.core import outputs
from breakglass_tui.core.events import (
    Event,
    OperatorMessage,
    ReportReady,
    ToolCallEnded,
    ToolCallStarted,
)
from breakglass_tui.core.fence import new_fence, parse
from breakglass_tui.core.incident import event_from_json, event_to_json
from breakglass_tui.core.outputs import OutputStore
from breakglass_tui.core.scrub import Scrubber
from tests.core.conftest import ScriptedHost
from tests.support import fake_messages_api as fm

SESSION_A = "20261128T160000Z-aaaa0001"
SESSION_B = "20261128T161000Z-bbbb0002"
INCIDENT = "20261128T160000Z-c0ffee"


def journal(events: list[Event]) -> list[Event]:
    """The events as the incident journal keeps them and a resumed tab replays them."""
    out = []
    for e in events:
        back = event_from_json(json.loads(json.dumps(event_to_json(e))))
        assert back is not None
        out.append(back)
    return out


def tool_results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        b
        for m in body["messages"]
        if m["role"] == "user"
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]


# -- 1. output ids are the incident's, and an earlier session's output stays readable ----------


async def test_a_restored_conversations_output_id_reads_the_earlier_output_not_a_new_one(
    make_agent, fake_api
):
    host_a = ScriptedHost(outputs={"journalctl -b": "EARLIER SESSION OUTPUT\n"})
    a = make_agent(host_a, session_id=SESSION_A)
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": "journalctl -b"}), fm.text("The log is read.")
    )
    await a.agent.handle("read the boot log")
    earlier_id = a.agent.outputs.id_for(1)
    assert f"output_id {earlier_id} " in tool_results(fake_api.bodies[1])[0]["content"]
    await a.agent.close()

    # Take-over: a new session from the saved conversation; it runs its own commands at once.
    host_b = ScriptedHost(outputs={"uptime": "NEW SESSION OUTPUT\n"})
    b = make_agent(host_b, session_id=SESSION_B, conversation=a.agent.messages)
    await b.agent.handle("/sh uptime")
    await b.agent.handle("/probe")
    new_id = b.agent.outputs.id_for(1)
    assert new_id != earlier_id and new_id in b.agent.outputs.records
    fake_api.push(
        fm.tool("t2", "read_output", {"output_id": earlier_id, "offset": 0, "length": 100}),
        fm.tool("t3", "grep_output", {"output_id": earlier_id, "pattern": "EARLIER"}),
        fm.text("Same as before."),
    )
    await b.agent.handle("look at the boot log again")
    read, grep = tool_results(fake_api.bodies[-1])[-2:]
    assert "EARLIER SESSION OUTPUT" in read["content"] and not read.get("is_error")
    assert "NEW SESSION OUTPUT" not in read["content"]
    assert "earlier session" in read["content"]
    assert "1 matching line" in grep["content"] and not grep.get("is_error")


async def test_a_bare_id_of_a_restored_conversation_is_refused_never_aliased(make_agent, fake_api):
    """A conversation saved before ids named their session says 'output_id o1': the new
    session's first output must not be returned for it."""
    restored = [
        {"role": "user", "content": [{"type": "text", "text": "check the disk"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "t0", "name": "devvm_shell", "input": {"command": "df"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t0",
                    "content": "devvm_shell: exit 0 in 0.1 s | output_id o1 | 20 bytes | sha256 x",
                }
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The disk is full."}]},
    ]
    host = ScriptedHost(outputs={"uptime": "NEW SESSION OUTPUT\n"})
    b = make_agent(host, session_id=SESSION_B, conversation=restored)
    await b.agent.handle("/sh uptime")
    fake_api.push(
        fm.tool("t1", "read_output", {"output_id": "o1", "offset": 0, "length": 100}),
        fm.text("It is gone."),
    )
    await b.agent.handle("show the df output again")
    (result,) = tool_results(fake_api.bodies[-1])[-1:]
    assert result.get("is_error") is True
    assert "belongs to an earlier tab's session and is not readable here" in result["content"]
    assert "NEW SESSION OUTPUT" not in result["content"]
    # The restored conversation told Claude so up front (_repair_conversation).
    (note,) = [
        b
        for m in fake_api.bodies[-1]["messages"]
        for b in m["content"]
        if b["type"] == "text" and "restored in a new session" in b["text"]
    ]
    assert "o1" in note["text"] and "not readable here" in note["text"]
    # A third tab restoring this conversation does not say it again.
    await b.agent.close()
    c = make_agent(session_id=SESSION_A, conversation=b.agent.messages)
    assert c.agent.messages == b.agent.messages


async def test_a_session_id_used_again_never_appends_to_its_earlier_outputs(make_agent, settings):
    """A tab that drives again after a take-over builds a new agent with its own session id."""
    first = make_agent(ScriptedHost(outputs={"echo one": "ONE\n"}), session_id=SESSION_A)
    await first.agent.handle("/sh echo one")
    one = first.agent.outputs.id_for(1)
    await first.agent.close()
    again = make_agent(ScriptedHost(outputs={"echo two": "TWO\n"}), session_id=SESSION_A)
    await again.agent.handle("/sh echo two")
    (two,) = again.agent.outputs.records
    assert two != one
    state = Path(settings.state_dir) / "transcripts" / SESSION_A
    assert (state / f"{one}.out").read_text() == "ONE\n"
    assert (state / f"{two}.out").read_text() == "TWO\n"
    assert "ONE" in again.agent.outputs.read(one, 0, 100, new_fence())


def test_the_store_reads_an_earlier_sessions_output_with_its_facts(tmp_path):
    root = tmp_path / "transcripts"
    earlier = OutputStore(root / SESSION_A, Scrubber(), max_stored_bytes=10, shared_root=root)
    rec = earlier.recorder()
    rec.feed_text("0123456789abcdefghij\n")
    record, _ = earlier.finish(rec)
    assert record.output_id == "o1-aaaa0001" and record.truncated

    now = OutputStore(root / SESSION_B, Scrubber(), max_stored_bytes=10, shared_root=root)
    assert now.id_for(1) == "o1-bbbb0002"
    text = now.read(record.output_id, 0, 100, new_fence())
    assert parse(text).inside == ["0123456789"] and "only these were kept, of 21" in text
    # An id of a session whose files are not here: a clear refusal.
    missing = "o4-cccc0003"
    try:
        now.read(missing, 0, 10, new_fence())
    except ValueError as exc:
        assert "earlier tab's session and is not readable here" in str(exc)
    else:
        raise AssertionError("read an output that does not exist")
    # Ids are still validated strictly (no paths, no glob characters).
    for bad in ("o1-*", "../o1", "o1-aaaa0001/../x", "o1-AAAA0001"):
        try:
            now.read(bad, 0, 10, new_fence())
        except ValueError as exc:
            assert "not an output id" in str(exc)
        else:
            raise AssertionError(bad)
    assert outputs.session_tag("some-session") == outputs.session_tag("some-session")
    assert len(outputs.session_tag("some-session")) == 8


# -- 2. /report covers the incident, not the session ------------------------------------------


async def test_the_report_after_a_take_over_covers_the_whole_incident(make_agent, settings):
    a = make_agent(ScriptedHost(outputs={"df -h": "/dev/vda1 100% /\n"}), session_id=SESSION_A)
    await a.agent.handle("/sh df -h")
    await a.agent.handle("/reset")
    await a.agent.close()
    history = journal(a.events)

    host_b = ScriptedHost(outputs={"uptime": "up 1 min\n"})
    b = make_agent(host_b, session_id=SESSION_B, history=history, incident_id=INCIDENT)
    await b.agent.handle("/sh uptime")
    path = b.agent.write_report()
    assert path.name == f"incident-{INCIDENT}.md"
    (ready,) = [e for e in b.events if isinstance(e, ReportReady)]
    assert ready.filename == path.name
    text = path.read_text()
    assert f"Incident: `{INCIDENT}`" in text and SESSION_A in text and SESSION_B in text
    assert "`'df -h'`" in text and "`'uptime'`" in text  # both sessions' commands
    assert "| reset |" in text  # the earlier session's verb
    timeline = text.split("## Timeline", 1)[1]
    assert timeline.index("operator: /sh df -h") < timeline.index("operator: /sh uptime")


async def test_the_report_after_a_resume_has_the_earlier_sessions_words_and_cost(
    make_agent, fake_api
):
    a = make_agent(session_id=SESSION_A)
    fake_api.push(fm.text("The root filesystem is full.", input_tokens=1000, output_tokens=50))
    await a.agent.handle("what is wrong?")
    await a.agent.close()
    b = make_agent(session_id=SESSION_B, history=journal(a.events), incident_id=INCIDENT)
    assert b.agent.total_usage.input_tokens == 1000 and b.agent.total_usage.output_tokens == 50
    await b.agent.handle("/report")
    (ready,) = [e for e in b.events if isinstance(e, ReportReady)]
    assert "> The root filesystem is full." in ready.markdown
    assert "- Input tokens: 1000" in ready.markdown
    assert "operator: what is wrong?" in ready.markdown
    await b.agent.close()
    # The audit log counts each session's own usage once.
    (end_b,) = [r for r in b.audit() if r["kind"] == "session_end" and r["session_id"] == SESSION_B]
    assert end_b["total_usage"]["input_tokens"] == 0
    assert end_b["incident_usage"]["input_tokens"] == 1000


async def test_without_an_incident_the_report_is_named_by_session(make_agent):
    h = make_agent(session_id=SESSION_A)
    assert h.agent.write_report().name == f"incident-{SESSION_A}.md"


# -- 3. manual call ids do not repeat across sessions -------------------------------------------


async def test_manual_call_ids_are_unique_across_the_sessions_of_an_incident(make_agent):
    a = make_agent(session_id=SESSION_A)
    await a.agent.handle("/probe")
    await a.agent.handle("/status")
    b = make_agent(session_id=SESSION_B)
    await b.agent.handle("/probe")
    await b.agent.handle("/status")
    ids = [e.call_id for h in (a, b) for e in h.events if isinstance(e, ToolCallStarted)]
    assert len(ids) == len(set(ids)) == 4, ids
    assert all(i.startswith("manual-") for i in ids)


async def test_a_session_id_driving_again_goes_on_after_its_journaled_manual_ids(make_agent):
    first = make_agent(session_id=SESSION_B)
    await first.agent.handle("/probe")
    await first.agent.close()
    # The same tab drives again after a take-over: a new agent, the same session id.
    again = make_agent(session_id=SESSION_B, history=journal(first.events))
    await again.agent.handle("/probe")
    ids = [e.call_id for h in (first, again) for e in h.events if isinstance(e, ToolCallStarted)]
    assert len(ids) == len(set(ids)) == 2, ids
    ended = [e.call_id for h in (first, again) for e in h.events if isinstance(e, ToolCallEnded)]
    assert ended == ids


# -- 4. every emitted event is scrubbed, so the journal agrees with the audit log ---------------

CONFIGURED_KEY = "breakglass-test-key-7f3a9c2e5b1d"  # not sk-ant shaped: scrubbed as the value
KEY_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
ONE_LINE_KEY = f"-----BEGIN OPENSSH PRIVATE KEY-----{KEY_BODY}-----END OPENSSH PRIVATE KEY-----"
MULTI_LINE_KEY = (
    f"-----BEGIN OPENSSH PRIVATE KEY-----\n{KEY_BODY}\n-----END OPENSSH PRIVATE KEY-----"
)


async def test_no_emitted_event_carries_a_private_key_or_the_api_key(make_agent, fake_api):
    host = ScriptedHost()
    h = make_agent(host, api_key=CONFIGURED_KEY)
    await h.agent.handle(f"/sh echo '{ONE_LINE_KEY}' > /root/.ssh/id_ed25519")
    await h.agent.handle(f"/sh echo '{MULTI_LINE_KEY}'")
    await h.agent.handle(f"/sh echo {CONFIGURED_KEY}")
    await h.agent.handle(f"/nonsense {CONFIGURED_KEY}")
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": f"echo {CONFIGURED_KEY}"}),
        fm.text("Done."),
    )
    await h.agent.handle(f"here is the key {MULTI_LINE_KEY} and the api key {CONFIGURED_KEY}")
    await h.agent.handle("/report")
    # The commands ran as typed: only the records are scrubbed.
    assert KEY_BODY in host.ran[0] and CONFIGURED_KEY in host.ran[2]

    assert any(isinstance(e, OperatorMessage) for e in h.events)
    assert any(isinstance(e, ToolCallStarted) and not e.manual for e in h.events)
    for event in h.events:
        doc = json.dumps(event_to_json(event))
        assert KEY_BODY not in doc, doc
        assert CONFIGURED_KEY not in doc, doc
    started = [e for e in h.events if isinstance(e, ToolCallStarted)]
    assert "[private key elided]" in started[0].input["command"]
    assert "[secret elided]" in started[2].input["command"]
    # What Claude is shown, and the conversation a resumed tab restores, agree.
    # (Claude's own tool_use input is what it wrote; the operator's words and outputs are checked.)
    sent = [m for body in fake_api.bodies for m in body["messages"] if m["role"] == "user"]
    kept = [m for m in h.agent.messages if m["role"] == "user"]
    for messages in (sent, kept):
        assert KEY_BODY not in json.dumps(messages) and CONFIGURED_KEY not in json.dumps(messages)
    audit = Path(h.agent.settings.state_dir, "audit.jsonl").read_text()
    assert KEY_BODY not in audit and CONFIGURED_KEY not in audit
