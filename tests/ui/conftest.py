"""UI test helpers: apps over the scripted agent, with blink off and the clock fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.command import CommandList, CommandPalette
from textual.worker import WorkerState

from breakglass_tui.ui.app import AGENT_GROUP, BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.widgets.chat import ChatInput
from tests.support.waiting import until
from tests.ui.fakes import ScriptedAgent, fake_backend_factory


def make_app(
    agents: list[ScriptedAgent],
    *,
    manual: bool = True,
    download_dir: Path | None = None,
    initial_check: bool = True,
    scenario: str = "healthy",
) -> BreakglassApp:
    """The real app over a scripted agent; ``agents`` receives the agent once it is built."""
    return BreakglassApp(
        AppOptions(lab=True, scenario=scenario),
        backend_factory=fake_backend_factory(manual=manual, agents=agents),
        initial_check=initial_check,
        download_dir=download_dir,
    )


def agent_busy(app: BreakglassApp) -> bool:
    """Whether a turn or a command of the agent is under way, as Textual's worker list shows it
    (what the console's queue and its quit question go by)."""
    return any(
        w.group == AGENT_GROUP and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
        for w in app.workers
    )


def working(app: BreakglassApp) -> bool:
    """Whether any worker of the app is pending or running."""
    return any(w.state in (WorkerState.PENDING, WorkerState.RUNNING) for w in app.workers)


async def settle(app: BreakglassApp, pilot) -> None:
    """Let the console come to rest: every worker ended and what it emitted taken and drawn
    (an ended worker can start the next one, e.g. the next queued message, so this looks again
    after each), then the output pane flushed and the screen repainted. Waiting on the workers
    re-raises a worker's failure."""

    async def at_rest() -> bool:
        await app.workers.wait_for_complete()
        await pilot.pause()  # the ended workers' messages: one may start another worker
        return not working(app)

    await until(at_rest, what="the console to come to rest", timeout_s=30, pause=pilot.pause)
    app.output.flush()
    await pilot.pause()


async def drawn(app: BreakglassApp, pilot) -> None:
    """What the app's workers emitted so far is on screen: the app has taken the messages
    queued for it, the output pane is flushed, the screen repainted."""
    await pilot.pause()
    app.output.flush()
    await pilot.pause()


def no_blink(app: BreakglassApp) -> None:
    """Freeze the cursor so snapshots do not depend on when they were taken."""
    for widget in app.query(ChatInput):
        widget.cursor_blink = False


@pytest.fixture
def agents() -> list[ScriptedAgent]:
    return []


async def suggested(app: BreakglassApp, pilot) -> None:
    """The message box's completion of what was typed is worked out and shown: the suggester
    runs in a worker of the box, whose answer is a message to it."""
    await app.workers.wait_for_complete()
    await pilot.pause()


def palette_highlight(app: BreakglassApp) -> str:
    """The command palette's highlighted command, "" while the palette is not up or has none
    (its search runs in a worker and fills the list in batches)."""
    if not isinstance(app.screen, CommandPalette):
        return ""
    commands = app.screen.query_one(CommandList)
    if commands.highlighted is None:
        return ""
    return str(commands.get_option_at_index(commands.highlighted).prompt)
