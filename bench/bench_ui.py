"""Benchmark of the breakglass UI, each figure a ratio to a bare Textual app with the same widgets
measured in the same run (issue 5).

    .venv/bin/python bench/bench_ui.py [--runs 3] [--lines 200000] [--json]

- first frame of `breakglass-tui --lab` vs the bare app: each a fresh subprocess in a real pty
  (interpreter start, imports, compose, first paint), median of --runs (aim <= 1.25x);
- memory (RSS) at the first frame and of an idle session before the first model call (the lab
  started, the breakglass agent built) vs the bare app idle (aim <= 1.3x);
- a burst of --lines output lines into the live pane: lines/s ingested (aim >= 100,000/s) and
  keypress-to-screen latency p95 while the burst runs (aim <= 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACE = 100_000  # lines/s: the aim for ingestion, the rate keys are typed against


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the bare app: textual only, the same widgets --------------------------------------------------


def bare_app_class():
    from textual.app import App, ComposeResult
    from textual.containers import Horizontal, Vertical, VerticalScroll
    from textual.widgets import DataTable, Footer, Input, Log, Static

    class BareApp(App[None]):
        CSS = """
        #status { height: 2; } #main { height: 1fr; } #chat { width: 1fr; }
        #side { width: 50%; } Log { height: 2fr; } DataTable { height: 1fr; }
        """

        def compose(self) -> ComposeResult:
            yield Static("devvm: not probed yet\nkeys: loading…", id="status")
            with Horizontal(id="main"):
                with Vertical(id="chat"):
                    yield VerticalScroll()
                    yield Input(placeholder="Tell Claude what is wrong")
                with Vertical(id="side"):
                    yield Static("Live output")
                    yield Log(max_lines=20_000)
                    yield Static("Forensics")
                    table: DataTable = DataTable()
                    table.add_columns("time", "verb", "state", "bundle")
                    yield table
                    yield Static("no probes yet")
            yield Footer()

        def on_mount(self) -> None:
            self.query_one(Input).focus()
            self._pending: list[str] = []
            self.set_interval(0.08, self.flush)

        def feed(self, text: str) -> None:
            self._pending.extend(text.splitlines())

        def flush(self) -> None:
            if self._pending:
                pending, self._pending = self._pending, []
                self.query_one(Log).write_lines(pending)

    return BareApp


# -- child: first frame and memory, in a pty ----------------------------------------------------


def child(kind: str, out: Path) -> None:
    t0 = float(os.environ["BENCH_T0"])
    result: dict[str, float] = {}

    if kind == "bare":
        base = bare_app_class()
    else:
        import breakglass_tui.cli  # noqa: F401 - what the console script imports first
        from breakglass_tui.ui.app import BreakglassApp

        base = BreakglassApp

    class Measured(base):  # type: ignore[misc, valid-type]
        def on_mount(self) -> None:  # runs after the base class's on_mount (Textual's MRO walk)
            self.call_after_refresh(self._first_frame)

        def _first_frame(self) -> None:
            result["first_frame_s"] = time.time() - t0
            result["rss_first_frame_mb"] = rss_mb()
            self.run_worker(self._idle(), description="bench idle")

        async def _idle(self) -> None:
            if kind == "app":
                while self.backend is None:  # noqa: ASYNC110 - the lab up, the agent built
                    await asyncio.sleep(0.05)
                result["backend_ready_s"] = time.time() - t0
                await self.workers.wait_for_complete(
                    [w for w in self.workers if w.group == "agent"]
                )
            await asyncio.sleep(1.0)
            result["rss_idle_mb"] = rss_mb()
            out.write_text(json.dumps(result))  # noqa: ASYNC240 - tiny, once
            if kind == "app":
                await self.shutdown()
            else:
                self.exit()

    if kind == "app":
        from breakglass_tui.ui.backend import AppOptions

        Measured(AppOptions(lab=True, scenario="healthy")).run()
    else:
        Measured().run()


def run_child(kind: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        out = Path(tmp) / "result.json"
        master, slave = pty.openpty()
        os.set_blocking(master, True)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": tmp,
            "TERM": "xterm-256color",
            "COLUMNS": "160",
            "LINES": "48",
            "PYTHONPATH": str(ROOT),
            "BREAKGLASS_STATE_DIR": str(Path(tmp) / "state"),
            "BENCH_T0": repr(time.time()),
        }
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, str(out)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=tmp,
        )
        os.close(slave)

        screen = bytearray()

        def drain() -> None:  # a terminal that reads everything the app writes
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                screen.extend(data)
                del screen[:-20000]  # keep the tail, for an error message

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
        if not out.exists():
            tail = screen.decode(errors="replace")[-3000:]
            raise RuntimeError(f"the {kind} child failed; its last output:\n{tail}")
        return json.loads(out.read_text())


# -- the burst, in process ----------------------------------------------------------------------


def burst_text(lines: int) -> list[str]:
    """Chunks of about 16 KiB, like SSH channel reads; one line in ten coloured."""
    chunks, current, size = [], [], 0
    for i in range(lines):
        if i % 10 == 0:
            line = f"\x1b[31mE\x1b[0m {i:07d} kernel: blk_update_request: I/O error, dev vda"
        else:
            line = f"  {i:07d} systemd[1]: Started session-{i}.scope - Session {i} of user."
        current.append(line)
        size += len(line) + 1
        if size >= 16384:
            chunks.append("\n".join(current) + "\n")
            current, size = [], 0
    if current:
        chunks.append("\n".join(current) + "\n")
    return chunks


async def burst(kind: str, lines: int, pace: float | None = None) -> dict[str, float]:
    """Feed ``lines`` into the pane as fast as possible (``pace`` None: the ingestion rate), or
    at ``pace`` lines/s (the key latency while output streams at that rate)."""
    from breakglass_tui.core.events import ToolCallStarted, ToolOutput
    from breakglass_tui.hosts.types import OutputChunk

    chunks = burst_text(lines)
    last_line = chunks[-1].rstrip("\n").rsplit("\n", 1)[-1]
    if kind == "bare":
        app = bare_app_class()()
    else:
        from breakglass_tui.ui.app import BreakglassApp
        from breakglass_tui.ui.backend import AppOptions, Backend

        async def idle_backend(options, emit):  # the UI alone: no lab, no agent
            class Idle:
                manual = True

                async def handle(self, text: str) -> None: ...

                async def close(self) -> None: ...

            return Backend(Idle(), Idle(), "bench", "bench", "bench", "bench")  # type: ignore[arg-type]

        app = BreakglassApp(AppOptions(), backend_factory=idle_backend, initial_check=False)
    latencies: list[float] = []
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.3)
        if kind == "bare":
            from textual.widgets import Log

            log = app.query_one(Log)

            def feed(chunk: str) -> None:
                app.feed(chunk)

            def shown() -> bool:
                return bool(log.lines) and log.lines[-1] == last_line
        else:
            log = app.output_log()
            app._emit(
                ToolCallStarted(
                    call_id="b",
                    tool="devvm_shell",
                    input={"command": "journalctl"},
                    mutating=False,
                    manual=True,
                )
            )

            def feed(chunk: str) -> None:
                app._emit(ToolOutput(call_id="b", chunk=OutputChunk("stdout", chunk)))

            def shown() -> bool:  # the last line, as the screen would show it
                count = log.line_count
                return count > 0 and log._text(count - 1).plain == last_line

        done = asyncio.Event()

        async def producer() -> None:
            begin, sent = time.perf_counter(), 0
            for chunk in chunks:
                feed(chunk)
                sent += chunk.count("\n")
                if pace is None:
                    await asyncio.sleep(0)  # the next SSH read
                else:
                    await asyncio.sleep(max(0.0, begin + sent / pace - time.perf_counter()))
            done.set()

        from textual import events
        from textual.widgets import Input

        field = app.query_one(Input)
        frames: list[float] = []
        display = app._display

        def timed_display(screen, renderable) -> None:  # each update written to the terminal
            display(screen, renderable)
            frames.append(time.perf_counter())

        app._display = timed_display  # type: ignore[method-assign]

        async def typist() -> None:
            """Keys arrive as the driver delivers them; latency = until the input holds the
            character and a frame with it has been written."""
            keys = "abcdefghij"
            i = 0
            while not done.is_set() or i < 5:
                char = keys[i % len(keys)]
                before = len(field.value)
                start = time.perf_counter()
                event = events.Key(char, char)
                event.set_sender(app)
                app._driver.send_message(event)
                while len(field.value) == before:  # noqa: ASYNC110 - polling is the measurement
                    await asyncio.sleep(0.001)
                changed = time.perf_counter()
                while not frames or frames[-1] < changed:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                latencies.append(frames[-1] - start)
                i += 1
                await asyncio.sleep(0.05)

        start = time.perf_counter()
        typing = asyncio.create_task(typist())
        await producer()
        while not shown():  # noqa: ASYNC110 - polling the widget is the measurement
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - start
        await typing
        await pilot.pause(0.1)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
    return {
        "lines": lines,
        "seconds": elapsed,
        "lines_per_s": lines / elapsed,
        "key_p50_ms": statistics.median(latencies) * 1000,
        "key_p95_ms": p95 * 1000,
        "keys": len(latencies),
    }


# -- report ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return

    first: dict[str, list[dict[str, float]]] = {"bare": [], "app": []}
    for run in range(args.runs):
        # Interleaved, the order alternating: both see the same machine load and caches.
        for kind in ("bare", "app") if run % 2 == 0 else ("app", "bare"):
            first[kind].append(run_child(kind))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in first[kind])

    bursts = {kind: asyncio.run(burst(kind, args.lines)) for kind in ("bare", "app")}
    for kind in ("bare", "app"):
        # Key latency while output streams at the aimed rate (the unpaced burst is over in
        # well under a second, too soon to type into).
        paced = asyncio.run(burst(kind, args.lines, pace=PACE))
        bursts[kind].update({f"paced_{k}": v for k, v in paced.items() if k.startswith("key")})
    figures = {
        "first_frame_s": {"bare": med("bare", "first_frame_s"), "app": med("app", "first_frame_s")},
        "rss_first_frame_mb": {
            "bare": med("bare", "rss_first_frame_mb"),
            "app": med("app", "rss_first_frame_mb"),
        },
        "rss_idle_mb": {"bare": med("bare", "rss_idle_mb"), "app": med("app", "rss_idle_mb")},
        "backend_ready_s": med("app", "backend_ready_s"),
        "burst": bursts,
    }
    for key in ("first_frame_s", "rss_first_frame_mb", "rss_idle_mb"):
        figures[key]["ratio"] = figures[key]["app"] / figures[key]["bare"]
    figures["burst"]["ratio_lines_per_s"] = (
        bursts["app"]["lines_per_s"] / bursts["bare"]["lines_per_s"]
    )
    figures["burst"]["ratio_key_p95"] = (
        bursts["app"]["paced_key_p95_ms"] / bursts["bare"]["paced_key_p95_ms"]
    )
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    ff, rf, ri = figures["first_frame_s"], figures["rss_first_frame_mb"], figures["rss_idle_mb"]
    ba, bb = bursts["app"], bursts["bare"]
    print(f"breakglass-tui UI benchmark ({args.runs} runs, medians; bare = Textual, same widgets)")
    print(
        f"first frame         app {ff['app']:.2f} s   bare {ff['bare']:.2f} s   "
        f"ratio {ff['ratio']:.2f}x (aim <= 1.25x)"
    )
    print(
        f"RSS at first frame  app {rf['app']:.0f} MB   bare {rf['bare']:.0f} MB   "
        f"ratio {rf['ratio']:.2f}x"
    )
    print(
        f"RSS idle (lab up,   app {ri['app']:.0f} MB   bare {ri['bare']:.0f} MB   "
        f"ratio {ri['ratio']:.2f}x (aim <= 1.3x)"
    )
    print(f"  agent built)      backend ready {figures['backend_ready_s']:.2f} s after start")
    print(
        f"burst {args.lines:,} lines  app {ba['lines_per_s']:,.0f}/s   "
        f"bare {bb['lines_per_s']:,.0f}/s   ratio {figures['burst']['ratio_lines_per_s']:.2f}x"
        " (aim >= 100,000/s)"
    )
    print(
        f"key latency p95     app {ba['paced_key_p95_ms']:.0f} ms"
        f" (p50 {ba['paced_key_p50_ms']:.0f},"
        f" {ba['paced_keys']} keys)   bare {bb['paced_key_p95_ms']:.0f} ms"
        f" (p50 {bb['paced_key_p50_ms']:.0f})   ratio {figures['burst']['ratio_key_p95']:.2f}x"
        f" (aim <= 100 ms, while {PACE:,} lines/s stream in)"
    )


if __name__ == "__main__":
    main()
