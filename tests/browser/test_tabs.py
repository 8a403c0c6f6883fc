"""One incident, many tabs, in a real browser against ``breakglass-serve --lab``: the second tab
is read-only, says who drives and shows the first tab's output live; it takes over and the first
is told; after every tab is closed, a reopened tab offers to resume and gets the chat and output
back."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import Console, open_console, running_serve
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

MARK = "hello-from-tab-1"


async def wait_for_output_line(tab: Console, text: str, timeout_s: float = 15.0) -> str:
    """Wait for a row showing ``text`` as command output (not only in the command's own line,
    "$ echo …"); return the screen."""
    rows: list[str] = []

    async def shown() -> str | None:
        rows[:] = await tab.rows()
        if any(text in row and "echo" not in row for row in rows):
            return "\n".join(rows)
        return None

    return await until(
        shown,
        what=f"an output row with {text!r}",
        timeout_s=timeout_s,
        interval_s=0.1,
        diagnostics=lambda: "\n".join(rows),
    )


async def test_second_tab_follows_takes_over_and_a_reopened_tab_resumes(
    browser: Any, tmp_path
) -> None:
    with running_serve(tmp_path) as served:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            first = await open_console(context, served.base + "/")
            await first.wait_until_idle()
            second = await open_console(context, served.base + "/")
            screen = await second.wait_for_text("drives since")
            assert "read-only ·" in screen and "/takeover" in screen, screen

            await first.type_line(f"/sh echo {MARK}")
            await wait_for_output_line(first, MARK)
            await wait_for_output_line(second, MARK)  # live, in the read-only tab

            # Taking over needs the tab's hosts up (before that it says "Still starting"): on a
            # loaded machine the follower shows the journal well before its backend is ready.
            await second.wait_for_text("keys loaded", timeout_s=20)
            await second.type_line("/takeover")
            await second.wait_for_text("You drive now")
            await first.wait_for_text("this tab is read-only now")
            screen = await first.wait_for_text("drives since")
            assert "took over at" in screen, screen

            await first.page.close()
            await second.page.close()
            await until(
                lambda: not served.app_processes(),
                what="the tabs' app processes",
                timeout_s=15,
                interval_s=0.1,
            )

            third = await open_console(context, served.base + "/", wait_first_frame=False)
            screen = await third.wait_for_text("Resume the incident", timeout_s=25)
            assert "events, last:" in screen, screen
            await third.page.focus(".xterm-helper-textarea")
            await third.page.keyboard.press("Enter")  # Resume has the focus
            await third.wait_for_text_gone("Resume the incident")
            screen = await wait_for_output_line(third, MARK)  # the output came back
            assert f"$ echo {MARK}" in screen, screen  # and the chat's tool block
            await third.wait_for_text("took over at")  # the chat's notices too
            screen = await third.wait_for_text("devvm: reachable", timeout_s=20)
            assert "read-only" not in screen.splitlines()[1], screen  # it drives
        finally:
            await context.close()
