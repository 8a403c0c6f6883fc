"""The incident on disk: the event journal round-trips every event, followers see new events
live, one session drives at a time, and a reopened tab finds the incident and its context."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import (
    EVENT_TYPES,
    MAX_JOURNALED_OUTPUT_PER_CALL,
    IncidentStore,
    event_from_json,
    event_to_json,
    summarize,
    unfinished_calls,
    worth_resuming,
)
from breakglass_tui.hosts.types import (
    OutputChunk,
    ProbeResult,
    Reachability,
    VerbResult,
)


def sample_events() -> list[ev.Event]:
    usage = ev.Usage(input_tokens=10, output_tokens=5, cost_usd=0.01)
    return [
        ev.SessionStarted(session_id="s1", operator="viktor", lab=True, model="m"),
        ev.OperatorMessage(text="the devvm is down"),
        ev.AssistantTurnStarted(turn_id="t1"),
        ev.AssistantTextDelta(turn_id="t1", text="Probing…"),
        ev.ToolCallStarted(
            call_id="c1", tool="pve_verb", input={"verb": "cycle"}, mutating=True, manual=False
        ),
        ev.ToolOutput(call_id="c1", chunk=OutputChunk("stderr", "boom\n")),
        ev.ProbeUpdated(result=ProbeResult(Reachability.NO_BANNER, 2.5, "no banner")),
        ev.VerbCompleted(
            result=VerbResult(
                verb="cycle",
                ok=True,
                exit_code=0,
                message="cycled",
                bundle_id="b1",
                document={"probes": [{"name": "qmp", "status": "timeout"}]},
            )
        ),
        ev.ToolCallEnded(call_id="c1", tool="pve_verb", ok=True, summary="ok", duration_s=30.0),
        ev.AssistantTurnEnded(turn_id="t1", stop_reason="end_turn", usage=usage, total_usage=usage),
        ev.ModeChanged(manual=True, reason="API overloaded"),
        ev.ReportReady(filename="r.md", markdown="# report"),
    ]


def test_every_event_type_round_trips_through_json() -> None:
    samples = sample_events()
    for event in samples:
        back = event_from_json(event_to_json(event))
        assert back == event, type(event).__name__
    # The sample covers the nested types; every type at least has a registered name.
    assert {"ToolOutput", "VerbCompleted", "ProbeUpdated"} <= set(EVENT_TYPES)


def test_unknown_event_types_are_skipped() -> None:
    assert event_from_json({"type": "FromTheFuture", "x": 1}) is None


def test_journal_keeps_order_and_caps_one_calls_output(tmp_path: Path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    samples = sample_events()
    for event in samples:
        incident.append_event(event)
    big = "x" * 65536
    for _ in range(10):  # 640 KiB of output for one call
        incident.append_event(ev.ToolOutput(call_id="flood", chunk=OutputChunk("stdout", big)))
    got = incident.read_events()
    assert got[: len(samples)] == samples
    flood = [e for e in got if isinstance(e, ev.ToolOutput) and e.call_id == "flood"]
    assert 0 < sum(len(e.chunk.text) for e in flood) <= MAX_JOURNALED_OUTPUT_PER_CALL + 65536


async def test_a_follower_sees_events_as_they_are_written(tmp_path: Path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    incident.append_event(ev.OperatorMessage(text="first"))
    seen: list[ev.Event] = []

    async def follow() -> None:
        async for event in incident.follow(poll_s=0.02):
            seen.append(event)
            if len(seen) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    incident.append_event(ev.OperatorMessage(text="second"))
    await asyncio.wait_for(task, 5)
    assert [e.text for e in seen] == ["first", "second"]  # type: ignore[attr-defined]


def test_one_driver_at_a_time_and_explicit_take_over(tmp_path: Path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    first = incident.claim("tab-1", "viktor")
    assert first.session_id == "tab-1"
    # A second tab does not drive: it is told who does, since when.
    second = incident.claim("tab-2", "alice")
    assert second.session_id == "tab-1" and second.operator == "viktor"
    assert incident.is_driver("tab-1") and not incident.is_driver("tab-2")
    # Taking over is explicit; the first tab sees it on its next check.
    taken = incident.claim("tab-2", "alice", take_over=True)
    assert taken.session_id == "tab-2"
    assert not incident.is_driver("tab-1")
    incident.release("tab-1")  # releasing what you no longer hold changes nothing
    assert incident.is_driver("tab-2")


def test_a_dead_drivers_lease_is_free(tmp_path: Path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    # Claim from another process that then exits: its lease dies with it.
    code = (
        "import sys; from pathlib import Path; from breakglass_tui.core.incident import Incident;"
        f"Incident(Path({str(incident.dir)!r})).claim('gone-tab', 'bob')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert incident.driver() is None
    assert incident.claim("tab-3", "viktor").session_id == "tab-3"


def test_reopening_finds_the_open_incident_and_its_context(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path)
    assert store.current() is None
    incident = store.open_new()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "devvm down"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "probing"}]},
    ]
    incident.save_conversation(messages)
    reopened = IncidentStore(tmp_path).current()
    assert reopened is not None and reopened.id == incident.id
    assert reopened.load_conversation() == messages
    store.close(incident)
    assert IncidentStore(tmp_path).current() is None


async def test_a_tab_following_skips_what_it_wrote_itself(tmp_path: Path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    incident.append_event(ev.OperatorMessage(text="mine"), by="tab-1")
    incident.append_event(ev.OperatorMessage(text="theirs"), by="tab-2")
    incident.append_event(ev.OperatorMessage(text="unsigned"))
    seen: list[str] = []

    async def follow() -> None:
        async for event in incident.follow(poll_s=0.02, skip_by="tab-1"):
            seen.append(event.text)  # type: ignore[attr-defined]
            if len(seen) == 2:
                return

    await asyncio.wait_for(follow(), 5)
    assert seen == ["theirs", "unsigned"]
    # The writer's name is journal bookkeeping, not part of the event.
    assert [e.text for e in incident.read_events()] == ["mine", "theirs", "unsigned"]  # type: ignore[attr-defined]


def test_two_tabs_opening_at_once_join_one_incident(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from breakglass_tui.core.incident import"
        f" IncidentStore; print(IncidentStore(Path({str(tmp_path)!r})).current_or_new()[0].id)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert len(ids) == 1 and "" not in ids
    incident, new = IncidentStore(tmp_path).current_or_new()
    assert not new and {incident.id} == ids


def test_the_resume_offer_summarizes_the_incident() -> None:
    events = sample_events()
    summary = summarize(events, "20261128T151200Z-a1b2c3")
    assert summary.operator == "viktor" and summary.events == len(events)
    assert summary.started_at == 1795878720.0  # 2026-11-28 15:12:00 UTC, from the id
    assert summary.last == "report r.md"
    assert summarize(events[:9]).last == "pve_verb: ok"
    assert summarize([]).started_at is None and summarize([]).last is None


def test_only_an_incident_with_real_work_is_worth_resuming() -> None:
    opening = ("/probe", "/status")
    check = [ev.OperatorMessage(text="/probe"), ev.OperatorMessage(text="/status")]
    assert not worth_resuming(check, opening)
    assert not worth_resuming([], opening)
    assert worth_resuming([*check, ev.OperatorMessage(text="/sh df -h")], opening)
    assert worth_resuming([ev.OperatorMessage(text="the devvm is down")], opening)


async def test_replay_then_follow_misses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    incident.append_event(ev.OperatorMessage(text="before"))
    events, offset = incident.replay()
    incident.append_event(ev.OperatorMessage(text="after"))
    follower = incident.follow(poll_s=0.02, offset=offset)
    got = await asyncio.wait_for(anext(follower), 5)
    await follower.aclose()
    assert [e.text for e in events] == ["before"] and got.text == "after"  # type: ignore[attr-defined]


def test_calls_a_closed_tab_left_open_are_found() -> None:
    started = [
        ev.ToolCallStarted(call_id=c, tool="devvm_shell", input={}, mutating=False, manual=True)
        for c in ("c1", "c2")
    ]
    ended = ev.ToolCallEnded(call_id="c1", tool="devvm_shell", ok=True, summary="", duration_s=0)
    assert [c.call_id for c in unfinished_calls([*started, ended])] == ["c2"]
