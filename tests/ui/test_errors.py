"""An unexpected exception is never the end of the session: it is recorded in the audit, shown as
an error notice, and the console goes on. A traceback never carries local variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from breakglass_tui.core import events as ev
from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.widgets.forensics import ForensicsPane
from tests.support.waiting import until
from tests.ui.conftest import settle
from tests.ui.fakes import T0, ScriptedAgent, fake_backend_factory, probe_ok

pytestmark = pytest.mark.timeout(60)


def console(agents: list[ScriptedAgent], state_dir: Path) -> BreakglassApp:
    return BreakglassApp(
        AppOptions(lab=True),
        backend_factory=fake_backend_factory(agents=agents, state_dir=state_dir),
        initial_check=False,
    )


def audit(state_dir: Path) -> list[dict]:
    path = state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def notices(app: BreakglassApp) -> str:
    return "\n".join(str(n.render()) for n in app.query(".notice"))


async def test_an_error_in_a_handler_is_recorded_shown_and_survived(tmp_path, monkeypatch):
    agents: list[ScriptedAgent] = []
    app = console(agents, tmp_path)

    def broken(self, result, at):
        raise RuntimeError("the forensics pane tripped over a probe")

    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        monkeypatch.setattr(ForensicsPane, "add_probe", broken)
        agents[0].emit(ev.ProbeUpdated(at=T0, result=probe_ok()))
        await settle(app, pilot)
        assert app.is_running
        assert "tripped over a probe" in notices(app) and "recorded in the audit" in notices(app)
        errors = [r for r in audit(tmp_path) if r["kind"] == "ui_error"]
        assert errors and "RuntimeError: the forensics pane tripped" in errors[0]["error"]
        # Still usable: the next command runs and shows.
        await app.submit("/status")
        await settle(app, pilot)
        assert agents[0].handled[-1] == "/status" and app.forensics.results


async def test_an_error_in_a_worker_or_a_timer_is_recorded_and_survived(tmp_path):
    agents: list[ScriptedAgent] = []
    app = console(agents, tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)

        async def failing_bundle(bundle_id: str) -> dict:
            raise ConnectionError("the PVE host went away mid-download")

        app.backend.hosts.bundle = failing_bundle
        # As the forensics pane asks when the operator picks a bundle.
        app.post_message(ForensicsPane.DownloadRequested("20261128T151200Z-forensics-a1b2c3"))

        def tick() -> None:
            raise ValueError("a timer of the console failed")

        app.set_timer(0.05, tick)

        def recorded() -> list[str]:
            return [r.get("error", "") for r in audit(tmp_path) if r["kind"] == "ui_error"]

        # (Not settle: waiting on the workers re-raises the failure.)
        await until(
            lambda: (
                any("went away mid-download" in e for e in recorded())
                and any("a timer of the console failed" in e for e in recorded())
            ),
            what="both failures in the audit",
            pause=pilot.pause,
        )
        assert app.is_running
        await app.submit("/probe")
        await settle(app, pilot)
        assert agents[0].handled[-1] == "/probe"


async def test_a_console_that_keeps_failing_stops_in_order(tmp_path):
    agents: list[ScriptedAgent] = []
    app = console(agents, tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)

        def tick() -> None:
            raise ValueError("failing on every frame")

        app.set_interval(0.01, tick)
        await until(lambda: not app.is_running, what="the console to stop itself", timeout_s=10)
    kinds = [r["kind"] for r in audit(tmp_path)]
    assert "ui_error" in kinds and "stop_requested" in kinds
    stop = next(r for r in audit(tmp_path) if r["kind"] == "stop_requested")
    assert "kept failing" in stop["reason"]
    assert agents[0].closed, "the session was still ended properly"


def test_a_crash_report_never_carries_local_variables(capsys):
    """An exception while the console is stopping is the one Textual ends the app for: its
    crash report (on stderr, the server's log under breakglass-serve) shows no local variable."""
    app = BreakglassApp(
        AppOptions(lab=True), backend_factory=fake_backend_factory(), initial_check=False
    )

    def fails_while_stopping() -> None:
        api_key = "-".join(["sk-ant-api03", "only", "in", "a", "local"])  # noqa: F841 - under test
        raise RuntimeError("boom")

    async def stop_then_fail(pilot) -> None:
        await pilot.pause()
        app.exit()
        app.call_later(fails_while_stopping)

    app.run(headless=True, size=(120, 40), auto_pilot=stop_then_fail)
    assert app.return_code == 1, "the exception did not end the app"
    text = capsys.readouterr().err
    assert "RuntimeError" in text and "boom" in text
    assert "sk-ant-api03-only-in-a-local" not in text
