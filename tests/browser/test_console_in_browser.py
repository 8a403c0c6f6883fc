"""The breakglass console in a real browser: ``breakglass-serve --lab`` as its own process, Debian's
Chromium driven by Playwright, the lab's devvm and PVE host behind it (manual mode: no API key)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.browser.conftest import (
    Proc,
    ServeProcess,
    descendants,
    open_console,
    proc_start_time,
    running_serve,
)
from tests.support.realparts import free_port
from tests.support.waiting import until

pytestmark = pytest.mark.slow


async def test_page_loads_and_nothing_leaves_the_server(lab_serve: ServeProcess, context) -> None:
    tab = await open_console(context, lab_serve.base + "/")
    await tab.wait_for_text("Live output")  # the first frame: header and panes
    # The footer's keys are drawn a frame later (Textual fills it once the bindings are known).
    screen = await tab.wait_for_text("Quit")
    assert "devvm:" in screen and "Live output" in screen, screen
    # No ANTHROPIC_API_KEY reached the server, so the console says it runs in manual mode.
    await tab.wait_for_text("Claude: manual mode")
    await tab.wait_for_text("VM 102: running")

    own = lab_serve.base + "/"
    assert tab.requests, "the page made no request at all?"
    foreign = [url for url in tab.requests if not url.startswith(own)]
    assert not foreign, f"requests left the server: {foreign}"
    assert any("/static/fonts/" in url for url in tab.requests), "the font is self-hosted"
    assert tab.websockets == [f"ws://127.0.0.1:{lab_serve.port}/ws"] or all(
        ws.startswith(f"ws://127.0.0.1:{lab_serve.port}/ws") for ws in tab.websockets
    ), tab.websockets
    assert tab.websockets, "the terminal never opened its websocket"
    problems = [
        text
        for kind, text in tab.console
        if kind in ("error", "pageerror")
        or "Content Security Policy" in text
        or "Refused to" in text
    ]
    assert not problems, f"console errors (CSP?): {problems}"


async def test_a_page_from_another_origin_cannot_open_the_socket(
    lab_serve: ServeProcess, context
) -> None:
    """Cross-site WebSocket hijacking: the browser sends the foreign page's Origin; 403."""
    ws_url = f"ws://127.0.0.1:{lab_serve.port}/ws?width=80&height=24"
    html = f"""<!DOCTYPE html><html><body><script>
        window.__result = null;
        const ws = new WebSocket({json.dumps(ws_url)});
        ws.onopen = () => {{ window.__result = "open"; }};
        ws.onerror = () => {{ window.__result = window.__result || "error"; }};
        ws.onclose = (e) => {{ window.__result = (window.__result || "") + ":closed:" + e.code; }};
    </script></body></html>"""

    async def evil_page(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    evil = web.Application()
    evil.router.add_get("/", evil_page)
    runner = web.AppRunner(evil)
    await runner.setup()
    evil_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", evil_port).start()
    apps_before = {p.pid for p in lab_serve.app_processes()}
    try:
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{evil_port}/")
        await page.wait_for_function(
            "() => window.__result !== null && window.__result.includes('closed')"
        )
        result = await page.evaluate("() => window.__result")
    finally:
        await runner.cleanup()
    assert not result.startswith("open"), f"the foreign page's socket opened: {result}"
    assert result.startswith("error"), result

    refused = [
        r
        for r in lab_serve.log_records()
        if r.get("message") == "websocket refused: foreign origin"
        and r.get("origin") == f"http://127.0.0.1:{evil_port}"
    ]
    assert refused, "the server did not log the refusal"
    await asyncio.sleep(0.5)  # must not happen within it: an app process started anyway
    spawned = {p.pid for p in lab_serve.app_processes()} - apps_before
    assert not spawned, f"an app process was started for a foreign origin: {spawned}"


async def test_operator_runs_a_command_and_probes_the_devvm(
    lab_serve: ServeProcess, context
) -> None:
    tab = await open_console(context, lab_serve.base + "/")
    await tab.wait_for_text("devvm: reachable")
    await tab.wait_until_idle()

    await tab.type_line("/help")
    screen = await tab.wait_for_text("breakglass — help")
    assert "Warm case only" in screen, screen
    await tab.page.keyboard.press("Escape")
    await tab.wait_for_text_gone("breakglass — help")

    await tab.type_line("/sh df -h")
    screen = await tab.wait_for_text("Mounted on")
    assert "Filesystem" in screen and "Avail" in screen, screen
    # The real devvm's root filesystem row, human-sized: "/dev/vda   974M   99M  808M  11% /".
    assert re.search(
        r"/dev/vda\s+[\d.]+[KMGT]\s+[\d.]+[KMGT]?\s+[\d.]+[KMGT]\s+\d+%\s+/", screen
    ), screen

    before = (await tab.text()).count("probe devvm")
    await tab.type_line("/probe")

    async def probed_again() -> bool:
        return (await tab.text()).count("probe devvm") > before

    await until(
        probed_again, what="a new probe on screen after /probe", timeout_s=10, interval_s=0.1
    )
    screen = await tab.text()
    assert "healthy: the devvm" in screen and "devvm: reachable" in screen, screen


async def test_closing_the_tab_ends_its_app_process(lab_serve: ServeProcess, context) -> None:
    before = {p.pid for p in lab_serve.app_processes()}
    tab = await open_console(context, lab_serve.base + "/")
    mine = [p for p in lab_serve.app_processes() if p.pid not in before]
    # One process per tab (the server execs the app: no shell left between them).
    assert len(mine) == 1, f"expected one new app process for the tab, found {mine}"
    await tab.page.close()
    await until(
        lambda: not mine[0].alive(),
        what=f"app process {mine[0].pid} still running",
        timeout_s=15,
        interval_s=0.1,
    )
    await until(
        lambda: any(r.get("message") == "session closed" for r in lab_serve.log_records()),
        what="the server logged no 'session closed'",
        timeout_s=5,
        interval_s=0.1,
    )


async def test_session_cap_shows_a_clear_page(browser: Any, tmp_path: Path) -> None:
    with running_serve(tmp_path, env={"BREAKGLASS_MAX_SESSIONS": "1"}) as served:
        first_ctx = await browser.new_context()
        second_ctx = await browser.new_context()
        try:
            await open_console(first_ctx, served.base + "/")
            page = await second_ctx.new_page()
            response = await page.goto(served.base + "/")
            assert response is not None and response.status == 503
            heading = await page.inner_text("h1")
            assert heading == "All 1 sessions are in use"
            body = await page.inner_text("body")
            assert "Close a breakglass tab" in body and "reload" in body
            assert len(served.app_processes()) == 1
        finally:
            await first_ctx.close()
            await second_ctx.close()


async def test_sigterm_stops_cleanly_and_forwards_every_audit_line(
    browser: Any, tmp_path: Path
) -> None:
    """SIGTERM (Kubernetes stopping the pod) with a command in flight: the tab's app cancels it
    and quits, the lab goes, every audit line the app wrote (its session end included) reaches
    the server's stdout, and the server exits 0 — a requested, clean shutdown is no failure."""
    with running_serve(tmp_path) as served:
        ctx = await browser.new_context(extra_http_headers={"X-authentik-username": "viktor"})
        try:
            tab = await open_console(ctx, served.base + "/")
            await tab.wait_for_text("operator viktor")
            screen = await tab.wait_until_idle()
            # The lab's simulated kvm (daemonised like QEMU's, so not below the server).
            kvm = re.search(r"kvm pid (\d+)", screen)
            assert kvm, screen
            kvm_proc = Proc(int(kvm.group(1)), proc_start_time(int(kvm.group(1))), "kvm")
            assert kvm_proc.alive()
            await tab.type_line("/sh sleep 60")
            await tab.wait_for_text("$ sleep 60")
            children = descendants(served.proc.pid)
            assert any("breakglass_tui.cli" in p.cmdline for p in children), children

            loop = asyncio.get_running_loop()
            started = loop.time()
            served.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(served.proc.wait, 30)
            took = loop.time() - started
        finally:
            await ctx.close()
        assert code == 0, f"exit code {code}\n{served.diagnostics()}"
        assert took < 15, f"shutdown took {took:.1f} s: Kubernetes' grace period is 30 s"
        left = [p for p in [*children, kvm_proc] if p.alive()]
        assert not left, f"processes outlived the server: {left}"

        # A lab server's records are its own: apart from the real incident's, and from an
        # earlier lab's, whose devvm is gone.
        assert served.state_dir.parent == served.state_root / "lab"
        audit_file = served.state_dir / "audit.jsonl"
        written = [json.loads(line) for line in audit_file.read_text().splitlines() if line]
        forwarded = [r["record"] for r in served.log_records() if r.get("log") == "audit"]
        assert written, "the app wrote no audit line"
        assert forwarded == written, "not every audit line reached the server's stdout"
        # The tab's lines name its operator; the server's own self-check lines name the server.
        tab_lines = [r for r in forwarded if r.get("session_id") != "selfcheck"]
        assert tab_lines and {r.get("operator") for r in tab_lines} == {"viktor"}
        assert {r.get("operator") for r in forwarded} <= {"viktor", "breakglass-serve"}
        # Written while the app quit, after the SIGTERM: the in-flight command's result and
        # the session's end.
        call = next(
            r
            for r in forwarded
            if r.get("kind") == "tool_call" and r.get("input") == {"command": "sleep 60"}
        )
        result = [
            r
            for r in forwarded
            if r.get("kind") == "tool_result" and r.get("call_id") == call["call_id"]
        ]
        assert result and not result[0]["ok"], result
        assert forwarded[-1].get("kind") == "session_end", forwarded[-3:]
