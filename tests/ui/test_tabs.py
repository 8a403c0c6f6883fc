"""One incident, many tabs, as two app instances sharing a state dir: the second comes up
read-only and follows the first live, ``/takeover`` flips both, and a tab opened after the first
exits offers to resume the incident with its chat and the breakglass agent's context."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from breakglass_tui.config import Settings
from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import Incident, IncidentStore, unfinished_calls
from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.screens.resume import ResumeScreen
from breakglass_tui.ui.widgets.chat import ToolBlock
from tests.support import fake_messages_api as api
from tests.support.fake_messages_api import FakeMessagesApi
from tests.support.waiting import until
from tests.ui.conftest import agent_busy, drawn
from tests.ui.fakes import ScriptedAgent, fake_backend_factory


async def ready(app: BreakglassApp, pilot) -> None:
    await until(lambda: app.backend is not None, what="the lab to start", pause=pilot.pause)
    await until(lambda: not agent_busy(app), what="the opening check", pause=pilot.pause)
    await drawn(app, pilot)


def tab(incident_dir: Path, agents: list[ScriptedAgent], operator: str) -> BreakglassApp:
    """A tab over the scripted agent, keeping its incident in ``incident_dir``."""
    return BreakglassApp(
        AppOptions(lab=True, incident_dir=incident_dir),
        backend_factory=fake_backend_factory(agents=agents, lazy=True, operator=operator),
        initial_check=False,
    )


def offered(app: BreakglassApp) -> bool:
    """The resume question is on screen (composed)."""
    return isinstance(app.screen, ResumeScreen) and bool(app.screen.query("#resume-text"))


def notices(app: BreakglassApp) -> str:
    return "\n".join(str(n.render()) for n in app.query(".notice"))


async def test_second_tab_is_read_only_follows_live_and_takes_over(tmp_path, monkeypatch):
    agents_1: list[ScriptedAgent] = []
    agents_2: list[ScriptedAgent] = []
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    first = tab(tmp_path, agents_1, "viktor")
    async with first.run_test(size=(160, 48)) as pilot_1:
        await until(
            lambda: first.backend is not None and agents_1, what="tab 1", pause=pilot_1.pause
        )
        assert first.driving is True and first.header.driver == ""
        monkeypatch.setenv("BREAKGLASS_OPERATOR", "alice")
        second = tab(tmp_path, agents_2, "alice")
        async with second.run_test(size=(160, 48)) as pilot_2:
            await until(lambda: second.backend is not None, what="tab 2", pause=pilot_2.pause)
            assert second.driving is False and agents_2 == [], "a read-only tab runs no agent"
            assert "read-only · viktor drives since" in second.header.driver
            assert second.incident.id == first.incident.id

            # Read-only: only /takeover and /help are accepted; /cancel says why it cannot.
            await second.submit("/sh uptime")
            assert "read-only" in notices(second) and "/takeover" in notices(second)
            await second.submit("/cancel")
            assert "only the driving tab can cancel" in notices(second)

            # What the first tab runs appears in the second, live.
            driver = agents_1[0]
            line = "hello-from-tab-1"
            driver.script["/sh echo " + line] = lambda: driver.shell("echo " + line, line + "\n")
            await pilot_1.press(*("/sh echo " + line), "enter")

            def shown_in_second() -> bool:
                second.output.flush()
                return line in second.output_log().lines

            await until(
                shown_in_second, what="tab 1's output in tab 2", timeout_s=5, pause=pilot_2.pause
            )
            await until(
                lambda: len(second.query(ToolBlock)) == 1,
                what="the tool block",
                timeout_s=5,
                pause=pilot_2.pause,
            )
            block = second.query(ToolBlock).last()
            assert f"$ echo {line}" in block.heading and block.has_class("-ok")
            operator_lines = [str(w.render()) for w in second.query(".operator")]
            assert "/sh echo " + line in operator_lines

            # Taking over: the second drives (its agent built), the first is told, read-only.
            await second.submit("/takeover")
            assert second.driving is True and second.header.driver == ""
            assert len(agents_2) == 1 and agents_2[0].setup["session_id"] == second.session_id
            await until(
                lambda: first.driving is False,
                what="tab 1 to see the take-over",
                timeout_s=4,
                pause=pilot_1.pause,
            )
            await until(
                lambda: "took over at" in notices(first),
                what="tab 1's notice",
                timeout_s=3,
                pause=pilot_1.pause,
            )
            assert "alice took over at" in notices(first)
            assert "this tab is read-only now" in notices(first)
            assert "read-only · alice drives since" in first.header.driver
            await until(
                lambda: driver.closed,
                what="tab 1's agent to be closed",
                timeout_s=5,
                pause=pilot_1.pause,
            )

            await first.submit("/sh uptime")
            assert "read-only (alice drives since" in notices(first)
            assert "/sh uptime" not in driver.handled
            # And the other way round now: the new driver's command shows in the first tab.
            await second.submit("/status")
            await until(
                lambda: first.forensics.results,
                what="the verb row in tab 1",
                timeout_s=5,
                pause=pilot_1.pause,
            )
            await second.shutdown()
        # The second (driving) tab closed: it released the lease.
        assert first.incident.driver() is None
        await until(
            lambda: "nobody drives" in first.header.driver,
            what="no driver",
            timeout_s=3,
            pause=pilot_1.pause,
        )
        await first.shutdown()


async def test_starting_a_new_incident_closes_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    agents: list[ScriptedAgent] = []
    first = tab(tmp_path, agents, "viktor")
    async with first.run_test(size=(160, 48)) as pilot:
        await until(lambda: first.backend is not None and agents, what="tab 1", pause=pilot.pause)
        await first.submit("/status")
        await until(lambda: not agent_busy(first), what="the verb", timeout_s=5, pause=pilot.pause)
        await first.submit("/sh echo hi")
        await until(
            lambda: len(first.query(ToolBlock)) == 2,
            what="the command",
            timeout_s=5,
            pause=pilot.pause,
        )
        old = first.incident.id
        await first.shutdown()
    second = tab(tmp_path, agents, "viktor")
    async with second.run_test(size=(160, 48)) as pilot:
        await until(lambda: offered(second), what="the offer", timeout_s=5, pause=pilot.pause)
        text = str(second.screen.query_one("#resume-text").render())
        assert "Resume the incident started" in text and "by viktor" in text
        assert "last: devvm_shell: exit 0" in text
        await pilot.press("right", "enter")  # ←/→ and Enter answer: letters go to the input
        await until(
            lambda: second.backend is not None and second.driving, what="tab 2", pause=pilot.pause
        )
        assert second.incident.id != old
        assert IncidentStore(tmp_path).current().id == second.incident.id
        assert not second.forensics.results, "a new incident starts with empty panes"
        await second.shutdown()


async def test_close_ends_the_incident_and_the_tab_goes_on_with_a_new_one(tmp_path, monkeypatch):
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    agents: list[ScriptedAgent] = []
    app = tab(tmp_path, agents, "viktor")
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: app.backend is not None and agents, what="the tab", pause=pilot.pause)
        old = app.incident
        await app.submit("/close")
        assert IncidentStore(tmp_path).current().id == app.incident.id != old.id
        assert app.driving and drives(app.incident) == app.session_id
        assert old.driver() is None
        assert len(agents) == 2 and agents[0].closed, "a fresh agent for the new incident"
        assert agents[1].setup["conversation"] == []
        assert "closed" in notices(app)
        await app.shutdown()


def drives(incident: Incident) -> str | None:
    driver = incident.driver()
    return driver.session_id if driver is not None else None


async def test_after_close_a_read_only_tab_follows_the_next_incident(tmp_path, monkeypatch):
    """/close in the driving tab: the read-only tab moves on to the next incident (driven by
    the closing tab) instead of following the closed one, and /takeover there takes over the
    next incident, never the closed one's lease."""
    agents_1: list[ScriptedAgent] = []
    agents_2: list[ScriptedAgent] = []
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    first = tab(tmp_path, agents_1, "viktor")
    async with first.run_test(size=(160, 48)) as pilot_1:
        await until(
            lambda: first.backend is not None and agents_1, what="tab 1", pause=pilot_1.pause
        )
        second = tab(tmp_path, agents_2, "alice")
        async with second.run_test(size=(160, 48)) as pilot_2:
            await until(lambda: second.backend is not None, what="tab 2", pause=pilot_2.pause)
            assert second.driving is False
            old = first.incident
            await first.submit("/close")
            new = first.incident
            assert new.id != old.id and first.driving and drives(new) == first.session_id
            await until(
                lambda: second.incident.id == new.id,
                what="tab 2 to move on",
                timeout_s=4,
                pause=pilot_2.pause,
            )
            assert second.driving is False and agents_2 == []
            await until(
                lambda: "viktor drives since" in second.header.driver,
                what="the header",
                timeout_s=3,
                pause=pilot_2.pause,
            )
            assert f"Incident {old.id} was closed; this tab now follows the next one" in notices(
                second
            )
            # The closing tab's work in the next incident shows in the follower.
            await first.submit("/status")
            await until(
                lambda: second.forensics.results,
                what="the verb row in tab 2",
                timeout_s=5,
                pause=pilot_2.pause,
            )

            await second.submit("/takeover")
            assert second.driving is True and drives(new) == second.session_id
            assert old.driver() is None, "the closed incident's lease stays free"
            await until(
                lambda: first.driving is False,
                what="tab 1 to see the take-over",
                timeout_s=4,
                pause=pilot_1.pause,
            )
            await second.shutdown()
        await first.shutdown()


async def test_takeover_of_an_incident_closed_meanwhile_takes_nothing(tmp_path, monkeypatch):
    """The driving tab closed the incident just before this tab's /takeover (before its lease
    check noticed): the closed incident's lease is not claimed; the tab follows the next one."""
    store = IncidentStore(tmp_path)
    old = store.open_new()
    old.claim("other-tab", "alice")  # another tab drives (alive: this process)
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    app = tab(tmp_path, [], "viktor")
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: app.backend is not None, what="the tab", pause=pilot.pause)
        assert app.driving is False and app.incident.id == old.id
        new, _ = store.replace(old, "other-tab", "alice")  # the other tab's /close
        old.release("other-tab")
        await app.submit("/takeover")
        assert old.driver() is None, "the closed incident was taken over"
        assert app.incident.id == new.id and app.driving is False
        assert drives(new) == "other-tab"
        assert "/takeover again to drive this one" in notices(app)
        await until(
            lambda: "alice drives since" in app.header.driver,
            what="the header",
            timeout_s=3,
            pause=pilot.pause,
        )
        await app.shutdown()


async def test_the_lease_names_the_backends_operator(tmp_path, monkeypatch):
    """The operator is the backend's (Settings.operator, which also reads the config file),
    not a second reading of the environment; the lease learns it once the backend is up."""
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "not-from-the-settings")
    agents: list[ScriptedAgent] = []
    app = tab(tmp_path, agents, "viktor")
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: app.backend is not None and agents, what="the tab", pause=pilot.pause)
        driver = app.incident.driver()
        assert driver is not None and driver.operator == "viktor"
        assert app.header.operator == "viktor"
        await app.shutdown()


def lab_tab(tmp_path: Path) -> BreakglassApp:
    state = tmp_path / "state"
    return BreakglassApp(
        AppOptions(
            lab=True,
            scenario="disk-full",
            settings=Settings(state_dir=state),
            incident_dir=state,
            devvm="sandbox",
        ),
        download_dir=tmp_path,
        initial_check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_reopened_tab_resumes_chat_output_and_claudes_context(tmp_path, monkeypatch):
    fake = await FakeMessagesApi().start()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-secret")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        fake.push(
            api.tool("toolu_1", "devvm_shell", {"command": "df -h"}, text="Checking the disk."),
            api.text("The root filesystem is **100% full**."),
        )
        first = lab_tab(tmp_path)
        async with first.run_test(size=(160, 48)) as pilot:
            await ready(first, pilot)
            await pilot.press(*"ssh is slow, what is wrong?", "enter")
            await until(
                lambda: not agent_busy(first), what="the turn", timeout_s=30, pause=pilot.pause
            )
            await drawn(first, pilot)
            await first.shutdown()
        assert len(fake.requests) == 2

        fake.push(api.text("Still full: clear the journal next."))
        second = lab_tab(tmp_path)
        async with second.run_test(size=(160, 48)) as pilot:
            await until(lambda: offered(second), what="the offer", timeout_s=10, pause=pilot.pause)
            offer = str(second.screen.query_one("#resume-text").render())
            assert "events, last: devvm_shell: exit 0" in offer, offer
            await pilot.press("enter")  # Resume has the focus
            await ready(second, pilot)

            def replayed() -> str:
                return " ".join(m.source for m in second.query("Markdown.assistant"))

            await until(
                lambda: "100% full" in replayed(), what="the replay", timeout_s=5, pause=pilot.pause
            )
            markdown = replayed()
            assert "Checking the disk." in markdown and "100% full" in markdown
            assert "ssh is slow, what is wrong?" in [
                str(w.render()) for w in second.query(".operator")
            ]
            block = second.query(ToolBlock).first()
            assert "$ df -h" in block.heading and block.has_class("-ok")
            second.output.flush()
            assert any("100% /" in line for line in second.output_log().lines)
            assert second.driving is True

            await pilot.press(*"and now?", "enter")
            await until(
                lambda: not agent_busy(second),
                what="the next turn",
                timeout_s=30,
                pause=pilot.pause,
            )
            # Claude's context came back: the resumed agent sent the whole conversation.
            sent = fake.requests[-1].body["messages"]
            assert "ssh is slow, what is wrong?" in str(sent[0])
            assert any(m["role"] == "assistant" and "toolu_1" in str(m) for m in sent)
            assert "and now?" in str(sent[-1])
            # The report is the incident's, not just this tab's: it has the first tab's command.
            path = second.backend.agent.write_report()
            assert path.name == f"incident-{second.incident.id}.md"
            assert "df -h" in path.read_text()
            await second.shutdown()
    finally:
        await fake.close()
    fake.assert_no_rejections()  # the strict fake refused nothing
    assert os.environ.get("ANTHROPIC_API_KEY") == "sk-ant-test-not-a-secret"


async def test_a_call_left_open_by_a_closed_tab_is_shown_interrupted_on_resume(
    tmp_path, monkeypatch
):
    incident = IncidentStore(tmp_path).open_new()  # a tab that died mid-command wrote this
    incident.append_event(ev.OperatorMessage(text="/sh journalctl -f"), by="dead-tab")
    incident.append_event(
        ev.ToolCallStarted(
            call_id="c1",
            tool="devvm_shell",
            input={"command": "journalctl -f"},
            mutating=False,
            manual=True,
        ),
        by="dead-tab",
    )
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    app = tab(tmp_path, [], "viktor")
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: offered(app), what="the offer", timeout_s=5, pause=pilot.pause)
        await pilot.press("enter")  # Resume has the focus
        await until(
            lambda: app.query(ToolBlock) and app.query(ToolBlock).last().has_class("-failed"),
            what="the replayed block, ended",
            timeout_s=5,
            pause=pilot.pause,
        )
        block = app.query(ToolBlock).last()
        assert "interrupted: the tab running it closed" in block.heading and block.has_class(
            "-failed"
        )
        assert app.incident.id == incident.id and app.driving
        # Journaled by the tab that drives, so the record (and any tab) shows the call ended.
        events = incident.read_events()
        assert unfinished_calls(events) == []
        ended = [e for e in events if isinstance(e, ev.ToolCallEnded)]
        assert [(e.call_id, e.ok, e.summary) for e in ended] == [
            ("c1", False, "interrupted: the tab running it closed")
        ]
        later = tab(tmp_path, [], "alice")  # a tab that joins afterwards, read-only
        async with later.run_test(size=(160, 48)) as pilot_2:
            await until(
                lambda: (
                    later.query(ToolBlock) and later.query(ToolBlock).last().has_class("-failed")
                ),
                what="the block in the later tab, ended",
                timeout_s=5,
                pause=pilot_2.pause,
            )
            assert later.driving is False
            block = later.query(ToolBlock).last()
            assert block.has_class("-failed") and "interrupted" in block.heading
            assert len(incident.read_events()) == len(events), "a read-only tab journals nothing"
            await later.shutdown()
        await app.shutdown()


async def test_closing_the_tab_while_it_asks_to_resume_still_closes_everything(
    tmp_path, monkeypatch
):
    incident = IncidentStore(tmp_path).open_new()
    incident.append_event(ev.OperatorMessage(text="the devvm is down"), by="dead-tab")
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    hosts: list = []
    factory = fake_backend_factory(lazy=True)

    async def recording(options, emit):
        backend = await factory(options, emit)
        hosts.append(backend.hosts)
        return backend

    app = BreakglassApp(
        AppOptions(lab=True, incident_dir=tmp_path), backend_factory=recording, initial_check=False
    )
    async with app.run_test(size=(160, 48)) as pilot:
        await until(
            lambda: offered(app) and hosts, what="the offer", timeout_s=5, pause=pilot.pause
        )
        started = time.monotonic()
        await app.shutdown()
        assert time.monotonic() - started < 5
    assert hosts[0].closed, "the backend built meanwhile was closed"
    assert incident.driver() is None, "an unanswered tab never drove"
