"""The incident on disk: the event journal round-trips every event, followers see new events
live, one session drives at a time, and a reopened tab finds the incident and its context."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import (
    EVENT_TYPES,
    MAX_JOURNALED_OUTPUT_PER_CALL,
    Incident,
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
from tests.support.waiting import until


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
        ev.AssistantThinkingStarted(turn_id="t2", redacted=True),
        ev.AssistantThinkingDelta(turn_id="t2", text="the disk next"),
        ev.AssistantThinkingEnded(turn_id="t2", duration_s=2.5),
        ev.ModelSwitched(model="claude-opus-5-5", reason="refusal"),
        ev.AssistantTurnEnded(
            turn_id="t2",
            stop_reason="end_turn",
            usage=ev.Usage(input_tokens=3, cost_known=False),
            total_usage=ev.Usage(input_tokens=3, cost_known=False),
        ),
        ev.SessionStarted(
            session_id="s2", operator="viktor", lab=False, model="m", spend_limit_usd=20.0
        ),
    ]


def test_every_event_type_round_trips_through_json() -> None:
    samples = sample_events()
    for event in samples:
        back = event_from_json(event_to_json(event))
        assert back == event, type(event).__name__
    # The sample covers the nested types; every type at least has a registered name.
    assert {"ToolOutput", "VerbCompleted", "ProbeUpdated"} <= set(EVENT_TYPES)
    assert {
        "AssistantThinkingStarted",
        "AssistantThinkingDelta",
        "AssistantThinkingEnded",
        "ModelSwitched",
    } <= {type(e).__name__ for e in samples}


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
    await until(lambda: seen, what="the follower to read the first event")
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
    assert drives(incident) == "tab-1"
    # Taking over is explicit; the first tab sees it on its next check.
    taken = incident.claim("tab-2", "alice", take_over=True)
    assert taken.session_id == "tab-2"
    assert drives(incident) == "tab-2"
    incident.release("tab-1")  # releasing what you no longer hold changes nothing
    assert drives(incident) == "tab-2"


def drives(incident: Incident) -> str | None:
    driver = incident.driver()
    return driver.session_id if driver is not None else None


def test_the_driver_claiming_again_keeps_its_since_and_records_its_operator(tmp_path) -> None:
    incident = IncidentStore(tmp_path).open_new()
    first = incident.claim("tab-1", "")  # before the tab's backend knows the operator's name
    again = incident.claim("tab-1", "viktor")
    assert again.since == first.since and again.operator == "viktor"
    assert incident.driver() == again
    assert incident.claim("tab-1", "").operator == "viktor"  # no name: the known one stays


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
    incident.claim("tab-1", "viktor")
    nxt, _ = store.replace(incident, "tab-1", "viktor")  # /close
    assert IncidentStore(tmp_path).current().id == nxt.id != incident.id  # type: ignore[union-attr]


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


OPENING = ("/probe", "/status")

# A tab opening, as a process: join the open incident or start one, say what it found, and stay
# alive (holding any lease it took) until its stdin closes.
TAB = """
import json, sys
from pathlib import Path
from breakglass_tui.core.incident import IncidentStore
store = IncidentStore(Path(sys.argv[1]))
name = sys.argv[2]
incident, new = store.current_or_new(name, "op-" + name, opening_check=("/probe", "/status"))
driver = incident.driver()
found = {"id": incident.id, "new": new, "driver": driver and driver.session_id}
print(json.dumps(found), flush=True)
sys.stdin.read()
"""


def open_tabs(state: Path, names: list[str]) -> list[dict]:
    """Several tabs opening at the same moment (processes); what each found."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TAB, str(state), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        return [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
    finally:
        for p in procs:
            p.communicate(timeout=30)


def test_two_tabs_opening_at_once_join_one_incident_which_one_of_them_drives(
    tmp_path: Path,
) -> None:
    found = open_tabs(tmp_path, [f"tab-{i}" for i in range(4)])
    assert len({f["id"] for f in found}) == 1
    opener = [f for f in found if f["new"]]
    assert len(opener) == 1, found
    # A new incident is never seen driverless: its opener holds the lease from the first moment.
    assert {f["driver"] for f in found} == {opener[0]["driver"]} != {None}
    incident = IncidentStore(tmp_path).current()
    assert incident is not None and incident.id == found[0]["id"]


def test_tabs_opening_beside_an_abandoned_empty_incident_do_not_each_replace_it(
    tmp_path: Path,
) -> None:
    store = IncidentStore(tmp_path)
    old = store.open_new()  # a tab that ran only its opening check, then closed: not worth it
    old.append_event(ev.OperatorMessage(text="/probe"), by="gone-tab")
    found = open_tabs(tmp_path, [f"tab-{i}" for i in range(4)])
    assert len({f["id"] for f in found}) == 1 and found[0]["id"] != old.id
    assert sum(f["new"] for f in found) == 1
    assert len({f["driver"] for f in found}) == 1 and found[0]["driver"] is not None
    assert sorted(p.name for p in store.root.iterdir() if p.is_dir()) == sorted(
        [old.id, found[0]["id"]]
    ), "one replacement, not one per tab"


def test_a_driverless_incident_worth_resuming_is_kept_for_the_question(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path)
    old = store.open_new()
    old.append_event(ev.OperatorMessage(text="the devvm is down"), by="gone-tab")
    incident, new = store.current_or_new("tab-1", "viktor", opening_check=OPENING)
    assert not new and incident.id == old.id and incident.driver() is None


def test_replacing_closes_and_opens_the_next_incident_driven_in_one_step(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path)
    first, _ = store.current_or_new("tab-1", "viktor")
    second, driver = store.replace(first, "tab-1", "viktor")
    assert second.id != first.id and store.current().id == second.id  # type: ignore[union-attr]
    assert driver is not None and driver.session_id == "tab-1" == drives(second)
    # A tab replacing what another already replaced joins the next one (driven by that tab).
    third, driver = store.replace(first, "tab-2", "alice")
    assert third.id == second.id and driver is not None and driver.session_id == "tab-1"


def test_starting_afresh_does_not_close_an_incident_another_tab_resumed(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path)
    incident = store.open_new()  # both tabs were asked; tab-1 answered "resume" first
    assert store.claim(incident, "tab-1", "viktor") is not None
    joined, driver = store.replace(incident, "tab-2", "alice")  # tab-2 answers "new"
    assert joined.id == incident.id and store.current().id == incident.id  # type: ignore[union-attr]
    assert driver is not None and driver.session_id == "tab-1"


def test_a_closed_incidents_lease_cannot_be_claimed_or_taken_over(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path)
    old, _ = store.current_or_new("tab-1", "viktor")
    store.replace(old, "tab-1", "viktor")  # /close in tab-1
    old.release("tab-1")
    assert store.claim(old, "tab-2", "alice") is None
    assert store.claim(old, "tab-2", "alice", take_over=True) is None
    assert old.driver() is None


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


def test_replay_leaves_out_a_tabs_own_events_but_follows_on_after_them(tmp_path: Path) -> None:
    """A tab's own events are already on its screen (and a call it is running is not one a
    closed tab left open)."""
    incident = IncidentStore(tmp_path).open_new()
    incident.append_event(ev.OperatorMessage(text="theirs"), by="tab-2")
    incident.append_event(ev.OperatorMessage(text="mine"), by="tab-1")
    events, offset = incident.replay(skip_by="tab-1")
    assert [e.text for e in events] == ["theirs"]  # type: ignore[attr-defined]
    assert offset == incident.events_path.stat().st_size
