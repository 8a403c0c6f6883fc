"""UI test helpers: apps over the scripted agent, with blink off and the clock fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.worker import WorkerState

from breakglass_tui.ui.app import AGENT_GROUP, BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.widgets.chat import ChatInput
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


async def settle(app: BreakglassApp, pilot, *, delay: float = 0.15) -> None:
    """Let workers finish, the output pane flush and the screen repaint."""
    await app.workers.wait_for_complete()
    await pilot.pause(delay)
    app.output.flush()
    await pilot.pause()


def no_blink(app: BreakglassApp) -> None:
    """Freeze the cursor so snapshots do not depend on when they were taken."""
    for widget in app.query(ChatInput):
        widget.cursor_blink = False


@pytest.fixture
def agents() -> list[ScriptedAgent]:
    return []
