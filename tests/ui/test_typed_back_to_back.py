"""Lines typed back to back, as a terminal delivers them, each run or wait in the queue.

Issue 12 ("the operator's words are never refused or lost"): in a real terminal, `/probe⏎`
then at once `/sh df -h⏎` arrive as one burst of keys. Textual's Enter is a binding of the
input, found only once the key has bubbled back up to the app; by then the keys typed after it
were already in the message box, so both Enters sent "/probe/sh df -h" ("Unknown command") and
`/sh df -h` never ran. These tests post every key of a burst into the app's queue at once (what
the terminal driver does with one read), never one key at a time as ``pilot.press`` does.
"""

from __future__ import annotations

import pytest
from textual import events
from textual.keys import _character_to_key

from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.widgets.chat import ChatInput
from tests.support.waiting import until
from tests.ui.conftest import agent_busy, make_app, settle
from tests.ui.fakes import ScriptedAgent
from tests.ui.test_queue import notices, queued_shown, slow_console

pytestmark = pytest.mark.timeout(60)


def type_burst(app: BreakglassApp, text: str) -> None:
    """Every key of ``text`` (``\\r`` is Enter) into the app's queue at once, as one read from
    a terminal brings them."""
    for char in text:
        if char == "\r":
            key = "enter"
        elif char.isalnum():
            key = char
        else:
            key = _character_to_key(char)
        event = events.Key(key, char)
        event.set_sender(app)
        app.post_message(event)


def echoed(app: BreakglassApp) -> list[str]:
    """The operator's lines as the chat shows them."""
    return [str(w.render()) for w in app.query(".operator")]


async def idle_console(app: BreakglassApp, pilot, agents: list[ScriptedAgent]) -> None:
    """The opening check has run and nothing runs or waits."""
    await until(
        lambda: agents and agents[0].handled and not app.queue and not agent_busy(app),
        what="the opening check to end",
        pause=pilot.pause,
        timeout_s=30,
    )


@pytest.mark.parametrize("focus", ["chat-input", "output-log"])
async def test_two_commands_typed_back_to_back_both_run(agents, focus):
    app = make_app(agents)
    async with app.run_test(size=(160, 48)) as pilot:
        await idle_console(app, pilot, agents)
        opening = list(agents[0].handled)
        app.query_one(f"#{focus}").focus()  # the keys reach the box from any pane
        await pilot.pause()
        type_burst(app, "/probe\r/sh df -h\r")
        await until(
            lambda: (
                agents[0].handled[len(opening) :] == ["/probe", "/sh df -h"]
                and not app.queue
                and not agent_busy(app)
            ),
            what="/probe then /sh df -h to run",
            pause=pilot.pause,
            diagnostics=lambda: f"ran: {agents[0].handled}; echoed: {echoed(app)}",
        )
        await settle(app, pilot)
        assert agents[0].handled[len(opening) :] == ["/probe", "/sh df -h"]
        assert echoed(app)[-2:] == ["/probe", "/sh df -h"]
        assert "Unknown command" not in notices(app)
        assert app.query_one(ChatInput).value == ""


async def test_a_message_right_after_a_slash_command_is_queued_then_run(agents):
    app = slow_console(agents, start_s=0.2, probe_s=3)
    async with app.run_test(size=(160, 48)) as pilot:
        await idle_console(app, pilot, agents)
        opening = list(agents[0].handled)
        type_burst(app, "/probe\rthe disk is full, fix it\r")
        # /probe runs (slowly); the message waits, shown as queued.
        await until(
            lambda: [i.text for i in app.queue.items] == ["the disk is full, fix it"],
            what="the message to be queued behind /probe",
            pause=pilot.pause,
            diagnostics=lambda: f"ran: {agents[0].handled}; echoed: {echoed(app)}",
        )
        assert agents[0].handled[len(opening) :] == ["/probe"]
        assert "the disk is full, fix it" in queued_shown(app)
        await until(
            lambda: not app.queue and not agent_busy(app),
            what="the queue to drain",
            pause=pilot.pause,
            timeout_s=30,
        )
        await settle(app, pilot)
        assert agents[0].handled[len(opening) :] == ["/probe", "the disk is full, fix it"]
        assert "/probe" in echoed(app) and "the disk is full, fix it" in echoed(app)
        assert "Unknown command" not in notices(app)


async def test_lines_typed_back_to_back_during_the_opening_probe_are_queued_then_run(agents):
    app = slow_console(agents, start_s=0.2, probe_s=3)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(
            lambda: agents and agents[0].handled == ["/probe"],
            what="the opening probe",
            pause=pilot.pause,
        )
        type_burst(app, "/status\rthe devvm is down, fix it\r")
        await until(
            lambda: [i.text for i in app.queue.items] == ["/status", "the devvm is down, fix it"],
            what="both lines queued behind the probe",
            pause=pilot.pause,
        )
        assert agents[0].handled == ["/probe"], "typing outlasted the probe: make it slower"
        shown = queued_shown(app)
        assert "/status" in shown and "the devvm is down, fix it" in shown
        await until(
            lambda: not app.queue and not agent_busy(app),
            what="the queue to drain",
            pause=pilot.pause,
            timeout_s=30,
        )
        await settle(app, pilot)
        # the opening check (/probe, /status), then what was typed, in order
        assert agents[0].handled == ["/probe", "/status", "/status", "the devvm is down, fix it"]
        assert "Still working" not in notices(app)


async def test_keys_typed_before_the_box_exists_are_kept_line_by_line(agents):
    """A burst typed while the console is still coming up: each line is its own message."""
    app = slow_console(agents, start_s=1.0, probe_s=0.5)
    async with app.run_test(size=(160, 48)) as pilot:
        type_burst(app, "/status\rthe devvm is down\rhalf-typ")
        await until(
            lambda: (
                agents and len(agents[0].handled) >= 4 and not app.queue and not agent_busy(app)
            ),
            what="what was typed to run",
            pause=pilot.pause,
            timeout_s=30,
        )
        await settle(app, pilot)
        assert agents[0].handled == ["/probe", "/status", "/status", "the devvm is down"]
        assert app.query_one(ChatInput).value == "half-typ"  # not sent: no Enter yet
