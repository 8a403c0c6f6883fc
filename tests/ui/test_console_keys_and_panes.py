"""Pilot tests: keys, slash commands, cancel, quit, output following, OSC 52, downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.command import CommandPalette

from breakglass_tui.core import events as ev
from breakglass_tui.hosts.types import OutputChunk
from breakglass_tui.ui.screens.confirm_quit import ConfirmQuitScreen
from breakglass_tui.ui.screens.help import HelpScreen
from breakglass_tui.ui.widgets.chat import ChatInput, ToolBlock
from breakglass_tui.ui.widgets.status_header import StatusHeader
from tests.support.waiting import until, written_json
from tests.ui.conftest import agent_busy, make_app, palette_highlight, settle, suggested
from tests.ui.fakes import T0, verb

pytestmark = pytest.mark.timeout(30)


def asked(app) -> bool:
    """The quit question is up."""
    return isinstance(app.screen, ConfirmQuitScreen)


async def test_chat_input_has_focus_and_initial_check_fills_the_header(agents):
    app = make_app(agents)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.focused, ChatInput)
        assert agents[0].handled == ["/probe", "/status"]
        assert app.header.devvm == "devvm: reachable"
        assert app.header.vm_state == "VM 102: running"
        assert "manual mode" in app.header.claude and "ANTHROPIC_API_KEY" in app.header.claude


async def test_escape_cancels_the_running_command(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press(*"/sh sleep 600", "enter")
        await until(lambda: app.query(ToolBlock), what="the sleep to start", pause=pilot.pause)
        assert agent_busy(app)
        await pilot.press("escape")
        await settle(app, pilot)
        assert agents[0].cancelled == 1
        assert not agent_busy(app)
        block = app.query_one(ToolBlock)
        assert "cancelled" in block.heading
        # The session stays usable after a cancel.
        await pilot.press(*"/sh uptime", "enter")
        await settle(app, pilot)
        assert agents[0].handled[-1] == "/sh uptime"


async def test_a_second_request_while_busy_is_queued_then_run_in_order(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press(*"/sh sleep 600", "enter")
        await until(lambda: app.query(ToolBlock), what="the sleep to start", pause=pilot.pause)
        await pilot.press(*"/status", "enter")
        await pilot.press(*"/sh uptime", "enter")
        await pilot.pause()  # what the two Enters started, if anything
        assert agents[0].handled == ["/sh sleep 600"], "nothing jumps the running command"
        assert [i.text for i in app.queue.items] == ["/status", "/sh uptime"]
        shown = str(app.query_one("#queued").render())
        assert "Queued" in shown and "/status" in shown and "/sh uptime" in shown
        assert not [n for n in app.query(".notice") if "Esc to cancel" in str(n.render())]
        await pilot.press("escape")  # Esc still cancels the running step; the queue goes next
        await settle(app, pilot)
        assert agents[0].cancelled == 1
        assert agents[0].handled == ["/sh sleep 600", "/status", "/sh uptime"]
        assert not app.queue and not app.query_one("#queued").display


async def test_quit_while_an_action_runs_asks_first(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press(*"/sh sleep 600", "enter")
        await until(lambda: app.query(ToolBlock), what="the sleep to start", pause=pilot.pause)
        await pilot.press("ctrl+q")
        await until(lambda: asked(app), what="the quit question", pause=pilot.pause)
        await pilot.press("escape")  # stays
        await until(lambda: not asked(app), what="the question to go", pause=pilot.pause)
        assert agent_busy(app) and app.is_running
        await pilot.press("ctrl+q")
        await until(lambda: asked(app), what="the quit question", pause=pilot.pause)
        await pilot.press("y", "n")  # letters are not answers: they go to the message box
        await pilot.pause()
        assert isinstance(app.screen, ConfirmQuitScreen) and agent_busy(app)
        assert app.query_one(ChatInput).value == "yn"
        await pilot.press("ctrl+q")  # Ctrl+Q again confirms
        await until(lambda: agents[0].closed, what="the console to close its backend")
    assert agents[0].cancelled == 1
    assert agents[0].closed


async def test_quit_when_idle_does_not_ask_and_closes_the_backend(agents):
    app = make_app(agents)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+q")
        assert not isinstance(app.screen, ConfirmQuitScreen)
        await until(lambda: agents[0].closed, what="the console to close its backend")
    assert agents[0].closed


async def test_slash_completion_and_history(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        chat_input = app.query_one(ChatInput)
        await pilot.press(*"/fo")
        await suggested(app, pilot)
        await pilot.press("right")
        assert chat_input.value == "/forensics"
        await pilot.press("enter")
        await settle(app, pilot)
        await pilot.press(*"/sh df -h", "enter")
        await settle(app, pilot)
        assert agents[0].handled == ["/forensics", "/sh df -h"]
        await pilot.press("up")
        assert chat_input.value == "/sh df -h"
        await pilot.press("up")
        assert chat_input.value == "/forensics"
        await pilot.press("down", "down")
        assert chat_input.value == ""


async def test_help_opens_with_f1_and_with_slash_help(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press(*"/help", "enter")
        assert isinstance(app.screen, HelpScreen)
        assert agents[0].handled == []  # answered by the UI, not sent to the agent


async def test_output_follows_the_tail_but_not_when_scrolled_up(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        pane, log = app.output, app.output_log()
        pane.begin("c1", "$ yes")
        pane.feed("c1", "".join(f"line {i}\n" for i in range(500)))
        await settle(app, pilot)
        assert log.is_vertical_scroll_end and log.scroll_y > 0
        log.scroll_to(y=10, animate=False, immediate=True)
        await pilot.pause()
        pane.feed("c1", "".join(f"more {i}\n" for i in range(500)))
        await settle(app, pilot)
        assert log.scroll_y == 10, "new output must not yank a reader back to the bottom"
        log.scroll_end(animate=False, immediate=True)
        await pilot.pause()
        pane.feed("c1", "last\n")
        await settle(app, pilot)
        assert log.is_vertical_scroll_end
        assert log.lines[-1] == "last"


async def test_output_is_bounded_and_says_what_it_dropped(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        pane, log = app.output, app.output_log()
        pane.feed("c1", "".join(f"{i}\n" for i in range(log.max_lines * 2)))
        await settle(app, pilot)
        assert log.line_count == log.max_lines
        assert log.lines[-1] == str(log.max_lines * 2 - 1)
        assert pane.ingested == log.max_lines * 2


async def test_osc52_in_command_output_never_reaches_the_screen(agents):
    app = make_app(agents, initial_check=False)
    hostile = "ok \x1b]52;c;cm0gLXJmIC8K\x07 \x1b[31mred\x1b[0m \x1b]0;pwned\x1b\\done\n"
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        agents[0].script["/sh cat evil"] = lambda: agents[0].shell("cat evil", hostile)
        await pilot.press(*"/sh cat evil", "enter")
        await settle(app, pilot)
        log = app.output_log()
        assert "ok  red done" in log.lines
        rendered = [log.render_line(y) for y in range(log.size.height)]
        for strip in rendered:
            for segment in strip:
                assert "\x1b" not in segment.text and "\x07" not in segment.text
        screen = app.export_screenshot()
        assert "cm0gLXJmIC8K" not in screen and "pwned" not in screen


async def test_events_render_tool_blocks_turns_and_forensics(agents, tmp_path: Path):
    app = make_app(agents, initial_check=False, download_dir=tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        emit = agents[0].emit
        emit(ev.AssistantTurnStarted(at=T0, turn_id="t1"))
        emit(ev.AssistantTextDelta(at=T0, turn_id="t1", text="Resetting **now**."))
        emit(
            ev.ToolCallStarted(
                at=T0,
                call_id="v1",
                tool="pve_verb",
                input={"verb": "reset"},
                mutating=True,
                manual=False,
            )
        )
        result = verb("reset", "paused (io-error)", "running", bundle_id="B1")
        emit(ev.VerbCompleted(at=T0, result=result))
        emit(
            ev.ToolCallEnded(
                at=T0,
                call_id="v1",
                tool="pve_verb",
                ok=True,
                summary="reset ok",
                duration_s=7.0,
            )
        )
        emit(
            ev.AssistantTurnEnded(
                at=T0,
                turn_id="t1",
                stop_reason="end_turn",
                usage=ev.Usage(),
                total_usage=ev.Usage(input_tokens=1000, output_tokens=234, cost_usd=0.0123),
            )
        )
        await settle(app, pilot)
        block = app.query_one(ToolBlock)
        assert block.has_class("-mutating") and block.has_class("-ok")
        assert "pve reset" in block.heading
        assert "1,234 tokens" in app.header.usage
        assert app.header.vm_state == "VM 102: running"
        # Download the bundle from the forensics pane.
        app.backend.hosts.bundles["B1"] = {"verb": "bundle", "bundle_id": "B1", "files": {}}
        await pilot.press("f4", "d")
        saved = await until(lambda: written_json(tmp_path / "B1.json"), what="the bundle saved")
        assert saved["bundle_id"] == "B1"
        # The incident report arrives as an event and is delivered as a file.
        emit(ev.ReportReady(at=T0, filename="incident.md", markdown="# Incident\n"))
        report = tmp_path / "incident.md"
        await until(lambda: report.exists(), what="the report saved", pause=pilot.pause)
        await until(
            lambda: report.read_text() == "# Incident\n", what="the report whole", timeout_s=5
        )


async def test_live_output_arrives_in_the_pane_with_a_separator(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        emit = agents[0].emit
        emit(
            ev.ToolCallStarted(
                at=T0,
                call_id="c9",
                tool="devvm_shell",
                input={"command": "df -h"},
                mutating=False,
                manual=False,
            )
        )
        emit(ev.ToolOutput(at=T0, call_id="c9", chunk=OutputChunk("stdout", "Filesys")))
        emit(ev.ToolOutput(at=T0, call_id="c9", chunk=OutputChunk("stdout", "tem Size\n/dev")))
        emit(
            ev.ToolCallEnded(
                at=T0,
                call_id="c9",
                tool="devvm_shell",
                ok=True,
                summary="exit 0",
                duration_s=0.1,
                exit_status=0,
            )
        )
        await settle(app, pilot)
        lines = app.output_log().lines
        assert lines[0].startswith("── $ df -h")
        assert lines[1:] == ["Filesystem Size", "/dev", "   ↳ exit 0"]


async def test_command_palette_runs_a_verb(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+p")
        await until(lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press(*"forensics")
        await until(
            lambda: "forensics" in palette_highlight(app).lower(),
            what="the palette to offer the forensics verb",
            pause=pilot.pause,
        )
        await pilot.press("enter")
        await until(lambda: agents[0].handled, what="the verb to run", pause=pilot.pause)
        await settle(app, pilot)
        assert agents[0].handled == ["/forensics"]


async def test_an_agent_failure_is_reported_once_and_the_session_goes_on(agents):
    app = make_app(agents, initial_check=False)

    async def boom() -> None:
        raise RuntimeError("the transcript disk is full")

    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        agents[0].script["break it"] = boom
        await pilot.press(*"break it", "enter")
        await settle(app, pilot)
        notices = [str(n.render()) for n in app.query(".notice.-error")]
        assert len(notices) == 1 and "the transcript disk is full" in notices[0]
        await pilot.press(*"/status", "enter")
        await settle(app, pilot)
        assert agents[0].handled[-1] == "/status"


async def test_a_backend_that_cannot_start_says_why():
    from breakglass_tui.config import ConfigError
    from breakglass_tui.ui.app import BreakglassApp

    async def failing(options, emit):
        raise ConfigError("BREAKGLASS_VAULT_ADDR: Vault refused the login (403)")

    app = BreakglassApp(backend_factory=failing)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        notices = [str(n.render()) for n in app.query(".notice.-error")]
        assert any("BREAKGLASS_VAULT_ADDR" in n for n in notices)
        assert app.header.keys == "not connected"


async def test_any_exit_closes_the_backend(agents):
    app = make_app(agents)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        app.exit()  # as when the browser tab closes: no Ctrl+Q
        await until(lambda: not app.is_running, what="the app to stop")
    # (The test harness unmounts the app as the block ends: that is where it closes.)
    assert agents[0].closed


def test_header_says_cost_unknown_never_zero_and_marks_the_spend_limit():
    header = StatusHeader()
    header.spend_limit = 20.0
    header.show_usage(ev.Usage(input_tokens=10, cost_usd=0.0, cost_known=False))
    assert header.usage == "10 tokens · cost unknown" and header.usage_level == ""
    header.show_usage(ev.Usage(input_tokens=10, cost_usd=3.5))
    assert header.usage == "10 tokens · $3.50 of $20.00" and header.usage_level == ""
    header.show_usage(ev.Usage(input_tokens=10, cost_usd=16.5))
    assert header.usage_level == "warning"  # 80 % of the limit: the header turns yellow
    header.show_usage(ev.Usage(input_tokens=10, cost_usd=20.0))
    assert header.usage_level == "error"
