"""What the operator types while the console works is queued, never refused, never lost.

Issue 12: "the devvm is down, fix it" typed during the opening probe was answered with "Still
working on the previous request" and thrown away. Now it is shown as queued and runs when the
probe ends; queued messages can be edited (↑) and dropped (/drop, ✗); Claude reads them at its
next step; a read-only tab says to take over and keeps the words; and a question on screen
(resume? quit?) does not swallow what is typed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import IncidentStore
from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.screens.resume import ResumeScreen
from breakglass_tui.ui.widgets.chat import ChatInput, ToolBlock
from tests.support.waiting import until
from tests.ui.conftest import agent_busy, settle
from tests.ui.fakes import T0, ScriptedAgent, fake_backend_factory

pytestmark = pytest.mark.timeout(60)
FIRST = "the devvm is down, fix it"


def slow_console(agents: list[ScriptedAgent], *, start_s: float, probe_s: float) -> BreakglassApp:
    """The app over a scripted agent whose start and opening probe take a while (a wedged
    devvm answers slowly)."""
    factory = fake_backend_factory(agents=agents)

    async def slow_factory(options, emit):
        await asyncio.sleep(start_s)
        backend = await factory(options, emit)
        agent = backend.agent

        async def probe() -> None:
            await asyncio.sleep(probe_s)
            agent.tool("probe_devvm", {}, "no banner: timed out")

        agent.script["/probe"] = probe
        return backend

    return BreakglassApp(AppOptions(lab=True), backend_factory=slow_factory)


def queued_shown(app: BreakglassApp) -> str:
    view = app.query_one("#queued")
    return str(view.render()) if view.display else ""


def notices(app: BreakglassApp) -> str:
    return "\n".join(str(n.render()) for n in app.query(".notice"))


async def test_the_first_message_typed_during_the_opening_probe_is_queued_then_run(agents):
    app = slow_console(agents, start_s=0.5, probe_s=4)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(
            lambda: isinstance(app.focused, ChatInput), what="the message box", pause=pilot.pause
        )
        await pilot.press(*"/status", "enter")  # before the hosts are even up
        await until(
            lambda: agents and agents[0].handled == ["/probe"], what="the probe", pause=pilot.pause
        )
        await pilot.press(*FIRST, "enter")  # while the probe runs
        assert agents[0].handled == ["/probe"], "typing outlasted the probe: make it slower"
        assert [i.text for i in app.queue.items] == ["/status", FIRST]
        shown = queued_shown(app)
        assert "Queued" in shown and FIRST in shown and "/status" in shown
        assert "Still working" not in notices(app)
        await until(
            lambda: not app.queue and not agent_busy(app), what="the queue", pause=pilot.pause
        )
        await settle(app, pilot)
        assert agents[0].handled == ["/probe", "/status", "/status", FIRST]
        assert FIRST in [str(w.render()) for w in app.query(".operator")]
        assert not app.query_one("#queued").display


async def test_queued_messages_can_be_edited_and_dropped(agents):
    app = slow_console(agents, start_s=0.0, probe_s=30)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: agent_busy(app), what="the probe", pause=pilot.pause)
        for text in ("first", "second", "third"):
            await app.submit(text)
        assert [i.text for i in app.queue.items] == ["first", "second", "third"]
        chat_input = app.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("up")  # the newest queued message comes back to be edited
        assert chat_input.value == "third" and [i.text for i in app.queue.items] == [
            "first",
            "second",
        ]
        await pilot.press(*" and the disk", "enter")
        assert [i.text for i in app.queue.items] == ["first", "second", "third and the disk"]
        await app.submit("/drop")  # the newest
        assert [i.text for i in app.queue.items] == ["first", "second"]
        assert "Dropped from the queue" in notices(app)
        await app.action_drop_queued(app.queue.items[0].id)  # ✗ on the first
        assert [i.text for i in app.queue.items] == ["second"]
        app.action_edit_queued(app.queue.items[0].id)  # ✎
        assert chat_input.value == "second" and not app.queue
        chat_input.value = ""
        await app.submit("x")
        await app.submit("/drop all")
        assert not app.queue
        await pilot.press("escape")  # Esc still cancels the running step (the probe)
        await until(lambda: not agent_busy(app), what="the cancel", pause=pilot.pause)
        assert agents[0].handled == ["/probe"] and agents[0].cancelled == 0
        assert "Cancelled by the operator." in notices(app)


async def test_claude_reads_a_queued_message_at_its_next_step(agents):
    app = BreakglassApp(
        AppOptions(lab=True),
        backend_factory=fake_backend_factory(manual=False, agents=agents),
        initial_check=False,
    )
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        agent = agents[0]
        running = asyncio.Event()

        async def claude_turn() -> None:
            running.set()
            await asyncio.sleep(0.5)  # a command of Claude's runs
            agent.tool("devvm_shell", {"command": "df -h"}, "exit 0", manual=False)
            await asyncio.sleep(0.3)  # Claude's next step
            agent.tool("devvm_shell", {"command": "du -sh /var"}, "exit 0", manual=False)

        agent.script["why is it slow?"] = claude_turn
        await app.submit("why is it slow?")
        await until(running.is_set, what="Claude's turn", pause=pilot.pause)
        await app.submit("it runs a migration: do not reboot")
        assert [i.text for i in app.queue.items] == ["it runs a migration: do not reboot"]
        await settle(app, pilot)
        assert agent.steered == ["it runs a migration: do not reboot"], "taken at the step"
        assert agent.handled == ["why is it slow?"], "not run as a turn of its own"
        conversation = list(app.query_one("#conversation").children)
        blocks = [w for w in conversation if isinstance(w, ToolBlock)]
        said = [w for w in conversation if w.has_class("operator")][-1]
        assert "do not reboot" in str(said.render())
        assert conversation.index(blocks[0]) < conversation.index(said)
        assert conversation.index(said) < conversation.index(blocks[1])


async def test_a_read_only_tab_does_not_queue_and_keeps_the_words(tmp_path: Path, monkeypatch):
    IncidentStore(tmp_path).current_or_new("elsewhere", "alice")  # alice's tab drives
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    app = BreakglassApp(
        AppOptions(lab=True, incident_dir=tmp_path),
        backend_factory=fake_backend_factory(agents=[], lazy=True),
        initial_check=False,
    )
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: app.backend is not None, what="the tab", pause=pilot.pause)
        assert app.driving is False
        await pilot.press(*FIRST, "enter")
        await until(lambda: "/takeover" in notices(app), what="the refusal", pause=pilot.pause)
        assert not app.queue
        assert "/takeover" in notices(app) and "back in the message box" in notices(app)
        assert app.query_one(ChatInput).value == FIRST
        await app.shutdown()


async def test_typing_while_asked_to_resume_goes_to_the_message_box(tmp_path: Path, monkeypatch):
    incident = IncidentStore(tmp_path).open_new()
    incident.append_event(ev.OperatorMessage(at=T0, text="the disk is full"), by="old-tab")
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    agents: list[ScriptedAgent] = []
    app = BreakglassApp(
        AppOptions(lab=True, incident_dir=tmp_path),
        backend_factory=fake_backend_factory(agents=agents, lazy=True),
        initial_check=False,
    )
    async with app.run_test(size=(160, 48)) as pilot:
        await until(
            lambda: isinstance(app.screen, ResumeScreen) and app.screen.query("#question-typed"),
            what="the question, drawn",
            pause=pilot.pause,
        )
        # "n" and "r" were once answers: typed in a message, they must stay text.
        await pilot.press(*"now run df")
        assert isinstance(app.screen, ResumeScreen), "typing did not answer the question"
        assert app.query_one(ChatInput).value == "now run df"
        typed = str(app.screen.query_one("#question-typed").render())
        assert "now run df" in typed
        await pilot.press("enter")  # sends what was typed (queued), the question stays
        assert isinstance(app.screen, ResumeScreen)
        assert [i.text for i in app.queue.items] == ["now run df"]
        await pilot.press("enter")  # now Enter answers: Resume
        await until(
            lambda: agents and agents[0].handled == ["now run df"],
            what="the queued message to run",
            pause=pilot.pause,
        )
        await app.shutdown()


async def test_typing_while_help_is_open_goes_to_the_message_box(agents):
    from breakglass_tui.ui.screens.help import HelpScreen
    from tests.ui.conftest import make_app

    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press("f1")
        await until(lambda: isinstance(app.screen, HelpScreen), what="help", pause=pilot.pause)
        await pilot.press(*"quota")  # "q" once closed the help, and was lost
        assert isinstance(app.screen, HelpScreen)
        assert app.query_one(ChatInput).value == "quota"
        await pilot.press("escape")
        await until(
            lambda: not isinstance(app.screen, HelpScreen), what="help to close", pause=pilot.pause
        )
        await pilot.press("enter")
        await settle(app, pilot)
        assert agents[0].handled == ["quota"]


async def test_a_message_sent_as_the_hosts_come_up_runs_after_the_opening_check(
    tmp_path: Path, monkeypatch
):
    """The hosts are up (the backend is there) but the tab is still recording its lease when
    the operator sends a command from the palette: it queues behind the opening check. It once
    ran at once and was then cancelled by the opening check's worker (or found no agent yet and
    was dropped)."""
    from breakglass_tui.core.tab import TabSession

    lease_written = asyncio.Event()
    confirm = TabSession.confirm_operator

    async def slow_confirm(self: TabSession) -> None:  # a slow state disk, widened on purpose
        await lease_written.wait()
        await confirm(self)

    monkeypatch.setattr(TabSession, "confirm_operator", slow_confirm)
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    agents: list[ScriptedAgent] = []
    app = BreakglassApp(
        AppOptions(lab=True, incident_dir=tmp_path),
        backend_factory=fake_backend_factory(agents=agents, lazy=True),
    )
    async with app.run_test(size=(160, 48)) as pilot:
        await until(lambda: app.backend is not None, what="the hosts")
        # Sent from outside the app's own message loop (which waits on the lease), as the
        # command palette and the question screens do.
        try:
            await app.submit("/sh df -h")
            queued = [i.text for i in app.queue.items]
        finally:
            lease_written.set()  # (else a failure here would leave the app waiting forever)
        assert queued == ["/sh df -h"], "it ran before the opening check"
        await until(
            lambda: agents and agents[0].handled == ["/probe", "/status", "/sh df -h"],
            what="the opening check, then the message",
            pause=pilot.pause,
        )
        await until(lambda: not agent_busy(app), what="the message to end", pause=pilot.pause)
        assert agents[0].cancelled == 0
        assert not app.queue
        await app.shutdown()
