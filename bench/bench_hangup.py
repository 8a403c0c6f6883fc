"""Benchmark: how long `breakglass-tui` takes to end after its terminal hangs up or it gets
SIGTERM, in each phase (issue 12; aim: 2 s), against a bare Textual app measured in the same run.

    .venv/bin/python bench/bench_hangup.py [--runs 5] [--lab guest|sandbox] [--json]

Every figure is from a real pseudo-terminal (tests.ui.console_pty): the console is brought to a
phase — starting, idle, streaming Claude's answer (the fake Messages API), running a command — and
the terminal is closed (the kernel's SIGHUP; reads and writes on it then fail) or SIGTERM is sent
with the terminal still there; "stalled" runs first stop reading the terminal while the console
keeps drawing (a stalled SSH link). The time is from the signal to the process gone, with the
lab's processes killed, the lease released and the audit's session_end written (the tests check
those; this measures the time).

The baseline is a bare Textual app with the stock way of handling a hang-up (a loop signal
handler that calls ``App.exit()``), in the same terminal set-up: its time to exit when the
terminal simply closes, and how often it never exits when the terminal had stalled first (the
deadlock of issue 12).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breakglass_tui.lab.guest.build import default_cache  # noqa: E402
from tests.support import fake_messages_api as fm  # noqa: E402
from tests.ui.console_pty import PHASES, PtyConsole, run_trial, stall  # noqa: E402

AIM_S = 2.0
STUCK_S = 10.0  # a baseline app still running this long after the hang-up never exits

BARE_APP = """
import asyncio, signal
from textual.app import App
from textual.widgets import Input, Log, Static

class Bare(App):
    def compose(self):
        yield Static("bare")
        yield Log()
        yield Input(placeholder="type")

    def on_mount(self):
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGHUP, signal.SIGTERM):
            loop.add_signal_handler(signum, self.exit)

Bare().run()
"""


def baseline(runs: int, stalled: bool) -> tuple[list[float], int]:
    """Exit times of the bare app after a hang-up, and how many never exited."""
    times, stuck = [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="bg-bare-") as tmp:
            script = Path(tmp) / "bare.py"
            script.write_text(BARE_APP)
            console = PtyConsole(Path(tmp), argv=[sys.executable, str(script)])
            try:
                deadline = time.monotonic() + 20
                while b"type" not in console.output and time.monotonic() < deadline:
                    time.sleep(0.05)
                if stalled:
                    stall(console)
                at = console.hang_up()
                if console.wait_exit(STUCK_S):
                    times.append(time.monotonic() - at)
                else:
                    stuck += 1
            finally:
                console.close()
    return times, stuck


def ours(runs: int, api: fm.FakeMessagesApi, lab: str) -> dict[str, list[float]]:
    env = {
        "ANTHROPIC_API_KEY": "sk-ant-bench-0123456789abcdef",
        "ANTHROPIC_BASE_URL": api.base_url,
        # The real devvm's image and saved states (each trial's HOME is its own directory).
        "BREAKGLASS_GUEST_CACHE": str(default_cache()),
    }
    figures: dict[str, list[float]] = {}
    for phase in PHASES:
        for how in ("hangup", "sigterm"):
            for stalled in (False, True):
                key = f"{phase:9} {how:7} {'stalled' if stalled else 'reading'}"
                for n in range(runs):
                    api.script.append(fm.stalled(after=4))
                    with tempfile.TemporaryDirectory(prefix="bg-bench-") as tmp:
                        trial = run_trial(
                            Path(tmp), phase, how, stalled=stalled, seed=n, env=env, lab=lab
                        )
                    figures.setdefault(key, []).append(
                        trial.exit_s if trial.exited else float("inf")
                    )
    return figures


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="trials per phase and signal")
    parser.add_argument(
        "--lab",
        choices=("guest", "sandbox"),
        default="guest",
        help="the devvm: the real one under QEMU (--lab's default) or the sandbox",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    api = fm.FakeMessagesApi()
    asyncio.run_coroutine_threadsafe(api.start(), loop).result(10)

    base_times, _ = baseline(args.runs, stalled=False)
    _, base_stuck = baseline(args.runs, stalled=True)
    base = statistics.median(base_times) if base_times else float("nan")
    figures = ours(args.runs, api, args.lab)
    if args.json:
        print(
            json.dumps(
                {
                    "baseline_s": base,
                    "baseline_stalled_never_exited": base_stuck,
                    "runs": args.runs,
                    "lab": args.lab,
                    "figures": figures,
                },
                indent=2,
            )
        )
        return 0
    print(f"baseline: bare Textual app, hang-up → exit median {base * 1000:.0f} ms")
    print(
        f"baseline, terminal stalled first: {base_stuck} of {args.runs} never exited"
        f" (still running {STUCK_S:.0f} s after the hang-up)"
    )
    lab = "--lab" if args.lab == "guest" else "--lab --sandbox"
    print(f"breakglass-tui {lab}, {args.runs} trials each (aim: ≤ {AIM_S:.0f} s):")
    print(f"  {'phase':9} {'signal':7} {'terminal':8}   median      p95   max    ×baseline")
    worst = 0.0
    for key, values in figures.items():
        med, high = statistics.median(values), p95(values)
        worst = max(worst, max(values))
        print(
            f"  {key}  {med * 1000:6.0f} ms {high * 1000:6.0f} ms {max(values):5.2f} s"
            f"   {med / base:6.1f}×"
        )
    verdict = "met" if worst <= AIM_S else "MISSED"
    print(f"slowest of all: {worst:.2f} s — aim {AIM_S:.0f} s {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
