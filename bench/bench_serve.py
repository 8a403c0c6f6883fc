"""Benchmark of breakglass-serve in a real browser, each figure a ratio to a bare textual-serve
app measured in the same run (issue 6).

    .venv/bin/python bench/bench_serve.py [--runs 5] [--settle 3] [--json]

Two servers run side by side, each its own process:
- breakglass: ``breakglass-serve --lab`` (the console against the lab, manual mode: no API key;
  the SDK is imported only at the first model request, so an idle session never loads it);
- bare: upstream ``textual_serve.server.Server`` serving a bare Textual app with the console's
  widgets (``bench_ui.bare_app_class``: status, chat input, live-output Log, forensics DataTable,
  footer; no backend, no lab, no agent). Its command is ``exec``'d like breakglass-serve's, so
  each tab is one process on both sides.

Debian's Chromium (Playwright, headless) opens a tab per run, alternating the two servers:
- first frame: ``performance.now()`` in the page (0 = navigation start) when the xterm buffer
  first holds any text, i.e. the app's first frame has been drawn (median of --runs);
- memory per idle session: RSS summed over the tab's new processes, --settle seconds after the
  first frame (for breakglass, after its opening /probe and /status have finished too).
The bare page asks fonts.googleapis.com for its font (upstream's template); the request is
aborted at once (no network here), so it costs the bare side nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser.conftest import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    ServeProcess,
    descendants,
    expose_terminal,
    start_serve,
)
from tests.support.realparts import free_port, wait_for_port  # noqa: E402

FIRST_FRAME_JS = """() => {
    const t = window.__bgterm;
    if (!t) return false;
    const b = t.buffer.active;
    for (let i = 0; i < t.rows; i++) {
        const line = b.getLine(b.viewportY + i);
        if (line && line.translateToString(true).trim()) return performance.now();
    }
    return false;
}"""


# -- the bare side ---------------------------------------------------------------------------


def run_bare_app() -> None:
    """The bare app (this file with --bare-app): Textual and the console's widgets only."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_ui import bare_app_class

    bare_app_class()().run()


def run_bare_server(port: int) -> None:
    """Upstream textual-serve, unmodified, serving the bare app (this file with --bare-server)."""
    from textual_serve.server import Server

    command = "exec " + shlex.join([sys.executable, str(Path(__file__).resolve()), "--bare-app"])
    Server(command, host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}").serve()


class BareServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = (workdir / "bare.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, 20)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- measuring -------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def only_local(route: Any) -> None:
    """Abort anything that would leave 127.0.0.1 (there is no network here anyway)."""
    if route.request.url.startswith("http://127.0.0.1:"):
        await route.continue_()
    else:
        await route.abort()


async def one_session(
    browser: Any, base: str, server_pid: int, *, settle_s: float, breakglass: bool
) -> dict[str, float]:
    """Open one tab; its first-frame time (ms) and its idle processes' RSS (MiB)."""
    before = {p.pid for p in descendants(server_pid)}
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = await ctx.new_page()
        await page.route("**/*", only_local)
        await page.route("**/static/js/textual.js", expose_terminal)
        await page.goto(base + "/")
        handle = await page.wait_for_function(FIRST_FRAME_JS, timeout=60_000, polling="raf")
        first_ms = float(await handle.json_value())
        if breakglass:  # idle = its opening check (/probe, /status) is done
            await page.wait_for_function(
                """() => { const t = window.__bgterm, b = t.buffer.active;
                    for (let i = 0; i < t.rows; i++) {
                        const l = b.getLine(b.viewportY + i);
                        if (l && l.translateToString(true).includes("running → running"))
                            return true;
                    } return false; }""",
                timeout=60_000,
            )
        await asyncio.sleep(settle_s)
        mine = [p for p in descendants(server_pid) if p.pid not in before]
        if not mine:
            raise RuntimeError(f"no app process found for the tab on {base}")
        rss = sum(rss_kib(p.pid) for p in mine) / 1024
        nprocs = len(mine)
    finally:
        await ctx.close()
    # Let the tab's process go before the next run measures anything.
    deadline = time.monotonic() + 15
    while any(p.alive() for p in mine) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    return {"first_frame_ms": first_ms, "idle_rss_mib": rss, "processes": nprocs}


async def bench(runs: int, settle_s: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    served: ServeProcess | None = None
    bare: BareServer | None = None
    results: dict[str, list[dict[str, float]]] = {"bare": [], "breakglass": []}
    try:
        served = await asyncio.to_thread(start_serve, workdir / "breakglass")
        bare = BareServer(workdir)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                # One warm-up each (disk cache, Chromium's first start), not counted.
                await one_session(browser, bare.base, bare.proc.pid, settle_s=0, breakglass=False)
                await one_session(
                    browser, served.base, served.proc.pid, settle_s=0, breakglass=True
                )
                for _ in range(runs):
                    results["bare"].append(
                        await one_session(
                            browser, bare.base, bare.proc.pid, settle_s=settle_s, breakglass=False
                        )
                    )
                    results["breakglass"].append(
                        await one_session(
                            browser,
                            served.base,
                            served.proc.pid,
                            settle_s=settle_s,
                            breakglass=True,
                        )
                    )
            finally:
                await browser.close()
    finally:
        if bare is not None:
            bare.close()
        if served is not None:
            served.terminate()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    summary = {
        kind: {
            "first_frame_ms": round(med(kind, "first_frame_ms")),
            "idle_rss_mib": round(med(kind, "idle_rss_mib"), 1),
            "processes_per_tab": med(kind, "processes"),
        }
        for kind in results
    }
    summary["ratio"] = {
        "first_frame": round(
            med("breakglass", "first_frame_ms") / med("bare", "first_frame_ms"), 2
        ),
        "idle_rss": round(med("breakglass", "idle_rss_mib") / med("bare", "idle_rss_mib"), 2),
    }
    summary["runs"] = runs
    summary["raw"] = results
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before RSS")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--bare-app", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_app:
        run_bare_app()
        return
    if args.bare_server:
        run_bare_server(args.bare_server)
        return
    summary = asyncio.run(bench(args.runs, args.settle))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    b, g, r = summary["bare"], summary["breakglass"], summary["ratio"]
    print(f"breakglass-serve vs bare textual-serve, Chromium, median of {args.runs} tabs each")
    print(
        f"  first frame (navigation start -> app drawn): {g['first_frame_ms']} ms vs"
        f" {b['first_frame_ms']} ms = {r['first_frame']}x"
    )
    print(
        f"  idle session RSS (tab's processes: {g['processes_per_tab']:g} vs"
        f" {b['processes_per_tab']:g}): {g['idle_rss_mib']} MiB vs {b['idle_rss_mib']} MiB"
        f" = {r['idle_rss']}x (aim <= 1.3x)"
    )


if __name__ == "__main__":
    main()
