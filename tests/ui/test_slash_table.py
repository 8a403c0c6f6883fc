"""The screen reads the one table of slash commands (core.slash): a command added there is
completed in the message box, listed on the help screen and offered by the command palette."""

from __future__ import annotations

import pytest
from textual.command import CommandPalette

from breakglass_tui.core import slash
from breakglass_tui.ui.screens.help import HelpScreen, help_markdown
from breakglass_tui.ui.widgets.chat import ChatInput
from tests.support.waiting import until
from tests.ui.conftest import make_app, palette_highlight, settle, suggested

pytestmark = pytest.mark.timeout(60)

UPTIME = slash.SlashCommand(
    "/uptime",
    "how long the devvm has been up",
    palette="Uptime of the devvm",
    palette_help="from /proc/uptime",
    tool="devvm_shell",
    tool_input=lambda rest: {"command": "uptime"},
)


def test_the_help_screen_lists_every_command_of_the_table() -> None:
    text = help_markdown()
    for command in slash.COMMANDS:
        assert f"| `{command.shown}` | {command.help} |" in text


async def test_a_new_command_is_completed_listed_and_in_the_palette(agents, monkeypatch):
    monkeypatch.setattr(slash, "COMMANDS", (*slash.COMMANDS, UPTIME))
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        chat_input = app.query_one(ChatInput)
        await pilot.press(*"/upt")
        await suggested(app, pilot)
        await pilot.press("right")
        assert chat_input.value == "/uptime"
        await pilot.press("enter")
        await settle(app, pilot)
        assert agents[0].handled == ["/uptime"]

        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        assert "how long the devvm has been up" in help_markdown()
        await pilot.press("escape")

        await pilot.press("ctrl+p")
        await until(lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press(*"Uptime of")
        await until(
            lambda: "Uptime of the devvm" in palette_highlight(app),
            what="the palette to offer the new command",
            pause=pilot.pause,
        )
        await pilot.press("enter")
        await until(lambda: len(agents[0].handled) == 2, what="it to run", pause=pilot.pause)
        await settle(app, pilot)
        assert agents[0].handled == ["/uptime", "/uptime"]
