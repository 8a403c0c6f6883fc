"""The screen reads the one table of slash commands (core.slash): a command added there is
completed in the message box, listed on the help screen and offered by the command palette."""

from __future__ import annotations

import pytest

from breakglass_tui.core import slash
from breakglass_tui.ui.screens.help import HelpScreen, help_markdown
from breakglass_tui.ui.widgets.chat import ChatInput
from tests.ui.conftest import make_app, settle

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
        await pilot.pause(0.1)
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
        await pilot.pause(0.2)
        await pilot.press(*"Uptime of")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(app, pilot, delay=0.3)
        assert agents[0].handled == ["/uptime", "/uptime"]
