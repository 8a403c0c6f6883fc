"""breakglass-serve's self-check as the owner and Prometheus see it: the real server over the
sandbox lab (real sshd, the real verb), its health port's ``/checks`` and ``/metrics``, the
status the tabs read for their header, ``/selfcheck`` from a tab, and the audit — all agreeing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from breakglass_tui.config import Settings
from breakglass_tui.core import selfcheck as sc
from breakglass_tui.core.audit import audit_log
from breakglass_tui.core.scrub import Scrubber
from breakglass_tui.serve.backend import ServeBackend
from breakglass_tui.serve.server import BreakglassServer
from tests.support.realparts import free_port
from tests.support.waiting import until
from tests.ui.conftest import make_app

pytestmark = pytest.mark.timeout(180)


class Served:
    def __init__(self, server: BreakglassServer, backend: ServeBackend, health_port: int):
        self.server, self.backend = server, backend
        self.health = f"http://127.0.0.1:{health_port}"
        self.state_dir = server.state_dir

    async def get(self, path: str) -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as http, http.get(self.health + path) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.text()

    def audit(self) -> list[dict]:
        path = self.state_dir / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]


@pytest_asyncio.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """breakglass-serve as the CLI builds it, over the sandbox lab, checking every hour (so the
    runs here are the one at start and the ones asked for)."""
    state_dir = tmp_path_factory.mktemp("served") / "state"
    state_dir.mkdir()
    settings = Settings(state_dir=state_dir)
    backend = ServeBackend(
        settings, lab=True, scenario="healthy", state_dir=state_dir, devvm="sandbox"
    )
    port, health_port = free_port(), free_port()
    server = BreakglassServer(
        "true",
        host="127.0.0.1",
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        identity_header="X-authentik-username",
        max_sessions=2,
        state_dir=state_dir,
        default_operator="lab",
        prepare=backend.prepare,
        cleanup=backend.close,
        health_port=health_port,
        selfcheck=backend.build_selfcheck,
        selfcheck_interval_s=3600,
        selfcheck_jitter=0,
    )
    await server.start()
    try:
        yield Served(server, backend, health_port)
    finally:
        await server.stop()


def links(checks: dict) -> dict[str, str]:
    return {link["link"]: link["status"] for link in checks["links"]}


def sample(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


async def run_now(served: Served) -> dict:
    """Ask for a run as a tab's /selfcheck does, and wait for its result."""
    asked = sc.request_run(served.state_dir)
    await until(
        lambda: (sc.read_status(served.state_dir) or {}).get("checked_at", 0) >= asked,
        timeout_s=60.0,
    )
    status = sc.read_status(served.state_dir)
    assert status is not None
    return status


async def test_checks_metrics_and_the_tabs_file_agree_at_start(served: Served) -> None:
    await until(lambda: sc.read_status(served.state_dir) is not None, timeout_s=60.0)
    code, kind, body = await served.get("/checks")
    assert code == 200 and kind.startswith("application/json")
    checks = json.loads(body)
    assert links(checks) == {
        "vault": "not_used",
        "pve": "ok",
        "devvm": "ok",
        "api": "not_used",
        "serving": "not_used",
    }
    assert checks["ok"] is True
    assert checks == sc.read_status(served.state_dir)  # what the tabs' header reads
    for link in checks["links"]:
        if link["status"] == "ok":
            assert link["latency_s"] > 0 and link["last_success"] > 0
    code, kind, metrics = await served.get("/metrics")
    assert code == 200 and kind.startswith("text/plain")
    assert sample(metrics, 'breakglass_link_up{link="pve"}') == 1.0
    assert sample(metrics, 'breakglass_link_up{link="devvm"}') == 1.0
    assert sample(metrics, 'breakglass_link_up{link="vault"}') is None  # not used: no sample
    pve = next(link for link in checks["links"] if link["link"] == "pve")
    assert sample(
        metrics, 'breakglass_link_last_success_timestamp_seconds{link="pve"}'
    ) == pytest.approx(pve["last_success"])
    assert sample(metrics, 'breakglass_link_latency_seconds{link="pve"}') == pytest.approx(
        pve["latency_s"]
    )
    assert sample(metrics, "breakglass_sessions") == 0.0
    # The console port serves neither.
    port = served.server.port
    async with aiohttp.ClientSession() as http:
        for path in ("/checks", "/metrics"):
            async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status in (403, 404), path


async def test_verbs_and_tokens_are_counted_from_the_audit(served: Served) -> None:
    # What a tab's breakglass agent writes (core.audit), as it would.
    audit = audit_log(served.state_dir, Scrubber(), session_id="tab-1", operator="viktor")
    audit.write("verb_result", verb="status", ok=True, exit_code=0)
    audit.write("verb_result", verb="reset", ok=False, exit_code=4)
    audit.write(
        "model_turn",
        model="claude-sonnet-5-5",
        usage={"input_tokens": 1200, "output_tokens": 300, "cache_read_input_tokens": 800},
    )
    audit.close()
    _, _, metrics = await served.get("/metrics")
    assert sample(metrics, 'breakglass_verbs_total{ok="true",verb="status"}') == 1.0
    assert sample(metrics, 'breakglass_verbs_total{ok="false",verb="reset"}') == 1.0
    assert sample(metrics, 'breakglass_model_tokens_total{kind="input"}') == 1200.0
    assert sample(metrics, 'breakglass_model_tokens_total{kind="output"}') == 300.0
    assert sample(metrics, 'breakglass_model_tokens_total{kind="cache_read_input"}') == 800.0


async def test_a_broken_link_shows_alike_everywhere_and_is_audited_once(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    await until(lambda: sc.read_status(served.state_dir) is not None, timeout_s=60.0)
    before = [r for r in served.audit() if r["kind"] == "selfcheck_link"]
    await run_now(served)  # nothing changed: nothing audited
    assert [r for r in served.audit() if r["kind"] == "selfcheck_link"] == before

    lab = served.backend.lab
    lab.sim.stop_vm()  # the devvm goes down (the VM stopped under us)
    try:
        status = await run_now(served)
        assert links(status)["devvm"] == "broken" and links(status)["pve"] == "ok"
        _, _, body = await served.get("/checks")
        assert json.loads(body) == status
        _, _, metrics = await served.get("/metrics")
        assert sample(metrics, 'breakglass_link_up{link="devvm"}') == 0.0
        assert sample(metrics, 'breakglass_link_up{link="pve"}') == 1.0
        records = [r for r in served.audit() if r["kind"] == "selfcheck_link"][len(before) :]
        assert [(r["link"], r["before"], r["after"]) for r in records] == [
            ("devvm", "ok", "broken")
        ]
        assert records[0]["session_id"] == "selfcheck"

        # A served tab's header says the same: the broken link in red, with when it broke.
        monkeypatch.setenv("BREAKGLASS_SELFCHECK", "serve")
        monkeypatch.setenv("BREAKGLASS_STATE_DIR", str(served.state_dir))
        app = make_app([])
        async with app.run_test(size=(160, 30)) as pilot:
            await pilot.pause()
            header = app.header
            assert header.rescue == sc.summary(status)[0]
            assert header.rescue.startswith("rescue path: devvm BROKEN since ")
            assert header.rescue_ok is False
            line = header.render().plain.splitlines()[1]
            assert line.startswith("rescue path: devvm BROKEN since")
            # /selfcheck from the tab: the server runs, the chat gets a line per link.
            await app.submit("/selfcheck")
            await until(lambda: "BROKEN   devvm" in chat_text(app), timeout_s=60)
    finally:
        lab.sim.start_vm()
    await wait_for_devvm_ok(served)
    records = [r for r in served.audit() if r["kind"] == "selfcheck_link"][len(before) :]
    assert [(r["link"], r["after"]) for r in records][-1] == ("devvm", "ok")


def chat_text(app) -> str:
    from textual.widgets import Static

    return "\n".join(str(w.render()) for w in app.chat.query(Static))


async def wait_for_devvm_ok(served: Served) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if links(await run_now(served))["devvm"] == "ok":
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the devvm did not come back")


async def test_selfcheck_in_a_terminal_says_where_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BREAKGLASS_SELFCHECK", raising=False)
    app = make_app([])
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.pause()
        assert app.header.rescue == ""  # no self-check runs here: nothing claimed
        await app.submit("/selfcheck")
        await until(lambda: "breakglass-tui --check" in chat_text(app), timeout_s=30)


def test_the_schedule_is_jittered_within_bounds() -> None:
    import random

    rng = random.Random(7)
    delays = [sc.next_delay(300, 0.1, rng) for _ in range(200)]
    assert min(delays) >= 270 and max(delays) <= 330
    assert len({round(d) for d in delays}) > 20  # spread, not one value
    assert sc.next_delay(300, 0.0) == 300


def test_a_state_dir_path_is_not_needed_for_the_tabs_without_a_server(tmp_path: Path) -> None:
    assert sc.read_status(tmp_path) is None
    assert sc.take_request(tmp_path) is False
    sc.request_run(tmp_path)
    assert sc.take_request(tmp_path) is True and sc.take_request(tmp_path) is False
