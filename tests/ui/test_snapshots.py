"""Snapshot tests: what the owner sees, pinned. Events come from the scripted agent with a fixed
clock (the real agent over the lab and the fake Messages API is exercised, unpinned because its
durations and ports vary, in test_e2e_lab.py). Review with `--snapshot-update` and LOOK at the SVG.
"""

from __future__ import annotations

import pytest

from breakglass_tui.core import events as ev
from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.screens.confirm_quit import ConfirmQuitScreen
from breakglass_tui.ui.screens.help import HelpScreen
from breakglass_tui.ui.widgets.chat import ToolBlock
from tests.support.waiting import until
from tests.ui.conftest import make_app, no_blink, settle
from tests.ui.fakes import api_fails_midturn, streamed_answer

WIDE = (160, 48)
NARROW = (80, 24)


async def _ready(pilot) -> None:
    """The screen is final: the backend up, the console at rest, its output drawn."""
    app: BreakglassApp = pilot.app
    no_blink(app)
    await until(lambda: app.backend is not None, what="the backend", pause=pilot.pause)
    await settle(app, pilot)


def _script(name: str, coroutine_factory):
    """run_before: send ``name`` and let the scripted agent play ``coroutine_factory``."""

    async def run_before(pilot) -> None:
        await _ready(pilot)
        agent = pilot.app.backend.agent
        agent.script[name] = lambda: coroutine_factory(agent)
        await pilot.press(*name, "enter")
        await _ready(pilot)

    return run_before


class TestFirstScreen:
    def test_lab_first_screen_manual_mode(self, snap_compare):
        assert snap_compare(make_app([]), terminal_size=WIDE, run_before=_ready)

    def test_narrow_terminal(self, snap_compare):
        assert snap_compare(make_app([]), terminal_size=NARROW, run_before=_ready)

    def test_help_screen(self, snap_compare):
        async def run_before(pilot) -> None:
            await _ready(pilot)
            await pilot.press("f1")
            await until(
                lambda: isinstance(pilot.app.screen, HelpScreen) and pilot.app.screen.query("*"),
                what="help, composed",
                pause=pilot.pause,
            )
            await pilot.pause()  # drawn

        assert snap_compare(make_app([]), terminal_size=(120, 40), run_before=run_before)


class TestConversation:
    def test_streamed_answer_with_tool_blocks(self, snap_compare):
        run = _script("the devvm hangs on ssh", streamed_answer)

        async def run_before(pilot) -> None:
            await run(pilot)
            # Expand the mutating reset: it stands out, and its details show.
            pilot.app.query(ToolBlock).last().collapsed = False
            await _ready(pilot)

        app = make_app([], manual=False)
        assert snap_compare(app, terminal_size=WIDE, run_before=run_before)

    def test_api_failing_mid_turn(self, snap_compare):
        app = make_app([], manual=False, initial_check=False)
        run = _script("what is wrong?", api_fails_midturn)
        assert snap_compare(app, terminal_size=WIDE, run_before=run)

    def test_streamed_answer_narrow(self, snap_compare):
        app = make_app([], manual=False, initial_check=False)
        run = _script("the devvm hangs on ssh", streamed_answer)
        assert snap_compare(app, terminal_size=NARROW, run_before=run)


class TestPanes:
    def test_output_pane_after_a_flood(self, snap_compare):
        async def run_before(pilot) -> None:
            await _ready(pilot)
            pane = pilot.app.output
            pane.begin("c1", "$ journalctl -b --no-pager")
            lines = []
            for i in range(100_000):
                if i % 7 == 0:
                    lines.append(f"\x1b[31mERR\x1b[0m line {i}: I/O error on vda\x1b]52;c;eHg=\x07")
                else:
                    lines.append(f"line {i}: kernel: ok")
            pane.feed("c1", "\n".join(lines) + "\n")
            pane.end("c1", "exit 0, 3.1 MiB, 2.0 s")
            await _ready(pilot)

        app = make_app([], initial_check=False)
        assert snap_compare(app, terminal_size=WIDE, run_before=run_before)

    def test_forensics_bundle_selected(self, snap_compare):
        run = _script("the devvm hangs on ssh", streamed_answer)

        async def run_before(pilot) -> None:
            await run(pilot)
            await pilot.press("f4", "up")  # from the reset up to the forensics bundle
            await _ready(pilot)

        app = make_app([], manual=False, initial_check=False)
        assert snap_compare(app, terminal_size=WIDE, run_before=run_before)

    def test_quit_confirmation(self, snap_compare):
        async def run_before(pilot) -> None:
            await _ready(pilot)
            app = pilot.app
            await pilot.press(*"/sh sleep 600", "enter")
            await until(lambda: app.query(ToolBlock), what="the sleep to start", pause=pilot.pause)
            await pilot.press("ctrl+q")
            await until(
                lambda: isinstance(app.screen, ConfirmQuitScreen) and app.screen.query("*"),
                what="the quit question, composed",
                pause=pilot.pause,
            )
            await pilot.pause()  # drawn

        app = make_app([], initial_check=False)
        assert snap_compare(app, terminal_size=NARROW, run_before=run_before)


@pytest.mark.parametrize("reason", ["no ANTHROPIC_API_KEY is set: manual mode. More text."])
def test_header_shortens_the_mode_reason(reason):
    from breakglass_tui.ui.widgets.status_header import short_reason

    assert short_reason(reason) == "no ANTHROPIC_API_KEY is set"
    assert isinstance(ev.ModeChanged(manual=True, reason=reason), ev.Event)
