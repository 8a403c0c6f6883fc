"""One incident, many tabs, without a screen: core.tab.TabSession objects on one state dir, as
tabs in separate processes share it. Who drives, take-over, close and the next incident, resume,
and the calls a closed tab left open — each intent answered with what changed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import IncidentStore, IncidentSummary
from breakglass_tui.core.tab import (
    INTERRUPTED,
    Closed,
    DriverSeen,
    Following,
    LostLease,
    Refused,
    TabSession,
    TookOver,
)

OPENING = ("/probe", "/status")


def tab(state: Path, session_id: str, operator: str, *, resume: bool | None = None) -> TabSession:
    asked: list[IncidentSummary] = []

    async def ask(summary: IncidentSummary) -> bool:
        asked.append(summary)
        assert resume is not None, "this tab was not expected to be asked"
        return resume

    session = TabSession(
        IncidentStore(state),
        session_id,
        operator=lambda: operator,
        opening_check=OPENING,
        ask_resume=ask,
    )
    session.asked = asked  # type: ignore[attr-defined]
    return session


async def test_the_first_tab_drives_and_the_second_follows_read_only(tmp_path: Path) -> None:
    a, b = tab(tmp_path, "tab-a", "viktor"), tab(tmp_path, "tab-b", "olga")
    opened_a = await a.open()
    assert opened_a.driving and a.driving is True
    opened_b = await b.open()
    assert opened_b.incident.id == opened_a.incident.id
    assert not opened_b.driving and b.driving is False
    assert opened_b.driver is not None and opened_b.driver.operator == "viktor"
    assert await a.check() is None  # still the driver
    seen = await b.check()
    assert isinstance(seen, DriverSeen) and seen.driver is not None
    assert seen.driver.session_id == "tab-a"


async def test_two_tabs_opening_at_once_join_one_incident_with_one_driver(tmp_path: Path) -> None:
    tabs = [tab(tmp_path, f"tab-{i}", f"op{i}") for i in range(4)]
    opened = await asyncio.gather(*(t.open() for t in tabs))
    assert len({o.incident.id for o in opened}) == 1
    assert sum(o.driving for o in opened) == 1


async def test_take_over_flips_both_tabs_at_the_next_check(tmp_path: Path) -> None:
    a, b = tab(tmp_path, "tab-a", "viktor"), tab(tmp_path, "tab-b", "olga")
    await a.open()
    await b.open()
    refused = await a.take_over()
    assert isinstance(refused, Refused) and "already drives" in refused.reason

    took = await b.take_over()
    assert isinstance(took, TookOver)
    assert took.before is not None and took.before.session_id == "tab-a"
    assert took.driver.session_id == "tab-b" and b.driving is True

    lost = await a.check()
    assert isinstance(lost, LostLease) and lost.driver.operator == "olga"
    assert a.driving is False
    assert await b.check() is None
    # The others read it in the journal.
    assert b.incident is not None
    notices = [e.text for e in b.incident.read_events() if isinstance(e, ev.Notice)]
    assert any("olga took over" in text for text in notices)


async def test_a_tab_that_lost_the_lease_no_longer_saves_the_context(tmp_path: Path) -> None:
    a, b = tab(tmp_path, "tab-a", "viktor"), tab(tmp_path, "tab-b", "olga")
    await a.open()
    await b.open()
    a.save_conversation([{"role": "user", "content": "from a"}])
    await b.take_over()
    await a.check()
    a.save_conversation([{"role": "user", "content": "a again, too late"}])
    b.save_conversation([{"role": "user", "content": "from b"}])
    assert b.incident is not None
    assert b.incident.load_conversation() == [{"role": "user", "content": "from b"}]
    b.save_conversation([{"role": "user", "content": "b goes on"}])
    a.save_conversation([{"role": "user", "content": "a, read-only"}])
    assert b.incident.load_conversation()[0]["content"] == "b goes on"


async def test_close_moves_the_driver_and_its_followers_to_the_next_incident(
    tmp_path: Path,
) -> None:
    a, b = tab(tmp_path, "tab-a", "viktor"), tab(tmp_path, "tab-b", "olga")
    first = (await a.open()).incident
    await b.open()
    closed = await a.close()
    assert isinstance(closed, Closed) and closed.closed.id == first.id
    nxt = closed.following
    assert nxt.incident.id != first.id and nxt.driving and a.driving is True

    followed = await b.check()
    assert isinstance(followed, Following)
    assert followed.closed is not None and followed.closed.id == first.id
    assert followed.incident.id == nxt.incident.id and not followed.driving
    # The closing notice is in the old journal for anyone who reads it.
    assert any(
        isinstance(e, ev.Notice) and "Incident closed by viktor" in e.text
        for e in first.read_events()
    )


async def test_take_over_of_an_incident_closed_meanwhile_follows_the_next(tmp_path: Path) -> None:
    a, b = tab(tmp_path, "tab-a", "viktor"), tab(tmp_path, "tab-b", "olga")
    await a.open()
    await b.open()
    await a.close()
    change = await b.take_over()  # b has not checked yet: it still shows the closed one
    assert isinstance(change, Following) and change.closed is not None
    assert not change.driving and b.driving is False


async def test_a_reopened_tab_is_asked_to_resume_only_when_something_happened(
    tmp_path: Path,
) -> None:
    a = tab(tmp_path, "tab-a", "viktor")
    first = (await a.open()).incident
    first.append_event(ev.OperatorMessage(text="/probe"), by="tab-a")
    await asyncio.to_thread(a.release)

    quiet = tab(tmp_path, "tab-b", "viktor")  # only the opening check: not worth a question
    opened = await quiet.open()
    assert opened.driving and opened.incident.id != first.id and quiet.asked == []  # type: ignore[attr-defined]

    opened.incident.append_event(ev.OperatorMessage(text="the disk is full"), by="tab-b")
    await asyncio.to_thread(quiet.release)
    resumer = tab(tmp_path, "tab-c", "viktor", resume=True)
    resumed = await resumer.open()
    assert resumed.incident.id == opened.incident.id and resumed.driving
    (summary,) = resumer.asked  # type: ignore[attr-defined]
    assert summary.last is not None and "the disk is full" in summary.last

    await asyncio.to_thread(resumer.release)
    fresh = tab(tmp_path, "tab-d", "viktor", resume=False)
    started = await fresh.open()
    assert started.incident.id != opened.incident.id and started.driving


async def test_calls_a_closed_tab_left_running_are_ended_by_the_next_driver(
    tmp_path: Path,
) -> None:
    a = tab(tmp_path, "tab-a", "viktor")
    incident = (await a.open()).incident
    incident.append_event(ev.OperatorMessage(text="clean the disk"), by="tab-a")
    started = ev.ToolCallStarted(
        call_id="c1",
        tool="devvm_shell",
        input={"command": "sleep 600"},
        mutating=False,
        manual=False,
    )
    incident.append_event(started, by="tab-a")
    await asyncio.to_thread(a.release)  # the tab closed mid-call

    follower = tab(tmp_path, "tab-f", "olga", resume=True)
    driver = tab(tmp_path, "tab-c", "viktor", resume=True)
    await driver.open()
    await follower.open()
    events = incident.read_events()
    assert follower.interrupted(events) == []  # only the driver ends them
    (ended,) = driver.interrupted(events)
    assert (ended.call_id, ended.tool, ended.ok, ended.summary) == (
        "c1",
        "devvm_shell",
        False,
        INTERRUPTED,
    )


async def test_a_driver_whose_lease_file_vanished_holds_it_again(tmp_path: Path) -> None:
    a = tab(tmp_path, "tab-a", "viktor")
    incident = (await a.open()).incident
    (incident.dir / "driver.json").unlink()
    assert await a.check() is None
    driver = incident.driver()
    assert driver is not None and driver.session_id == "tab-a"


async def test_a_closing_tab_gives_its_lease_back(tmp_path: Path) -> None:
    a, b = tab(tmp_path, "tab-a", "viktor"), tab(tmp_path, "tab-b", "olga")
    incident = (await a.open()).incident
    await b.open()
    a.end()
    await asyncio.to_thread(a.release)
    assert incident.driver() is None
    took = await b.take_over()
    assert isinstance(took, TookOver) and took.before is None
