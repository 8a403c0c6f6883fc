"""Benchmark: the real devvm (a Debian guest under QEMU; TCG here, KVM where it works).

Measured in one run:

1. Restore vs cold boot: a drill's start from the saved state (QEMU restore, the clock and key
   set over the lab channel, until a command runs over SSH) against a cold boot of the same guest
   (``start`` through the verb after a ``stop``, until SSH), and their ratio.
2. The console: ``breakglass-tui --lab`` in a terminal (tmux) until its header says the devvm is
   reachable (aim: 3 s here).
3. Per scenario, the operator's message to a healthy devvm: the breakglass agent, scripted with
   the fake Messages API to do what a good model would (diagnose, repair, verify), from the
   message until the guest's own check says it is well again.
4. With ``--ci``: the wall time of the lab and guest tests (``pytest tests/lab tests/guest``).

    .venv/bin/python bench/bench_guest.py [--rounds N] [--scenarios a,b] [--ci]

The machine is shared and QEMU runs without KVM here: figures vary with the load; medians are
printed. The first run on a machine builds the image and saves the states (not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breakglass_tui.config import Settings  # noqa: E402
from breakglass_tui.core.agent import BreakglassAgent  # noqa: E402
from breakglass_tui.hosts.session import HostSession  # noqa: E402
from breakglass_tui.lab.catalog import GUEST_SCENARIOS  # noqa: E402
from breakglass_tui.lab.guest import plan  # noqa: E402
from breakglass_tui.lab.guest.lab import RealLab, start_real_lab  # noqa: E402
from tests.support import fake_messages_api as fm  # noqa: E402

# The bench stops and starts the same VM back to back: no cooldown, room in the budget.
OVERRIDES = {"budget": {"cooldown_s": 0, "max_mutating_per_hour": 1000}}
KEY = "sk-ant-bench-000000000000000000"
Script = Callable[[], list[fm.Sse]]


def shell(call_id: str, command: str) -> fm.Sse:
    return fm.tool(call_id, "devvm_shell", {"command": command, "timeout_s": 120})


def verb(call_id: str, name: str) -> fm.Sse:
    return fm.tool(call_id, "pve_verb", {"verb": name})


def wait(call_id: str) -> fm.Sse:
    return fm.tool(call_id, "wait_for_devvm", {"timeout_s": 150})


# Per scenario: the operator's message, what the scripted model does, and the guest's own check
# that it is well again (a command that succeeds then).
DRILLS: dict[str, tuple[str, Script, str]] = {
    "healthy": (
        "is the devvm all right?",
        lambda: [fm.tool("a", "probe_devvm", {}), shell("b", "uptime; df -h"), fm.text("fine")],
        "true",
    ),
    "disk-full": (
        "the app cannot write its logs",
        lambda: [
            shell("a", "df -h /data; du -sh /data/log/app/*"),
            shell("b", "systemctl disable --now log-spammer && : > /data/log/app/runaway.log"),
            fm.text("repaired"),
        ],
        "[ $(df --output=pcent /data | tail -n 1 | tr -dc 0-9) -lt 50 ]",
    ),
    "oom": (
        "the devvm is very slow",
        lambda: [
            shell("a", "dmesg | grep -i 'out of memory' | tail -n 3; systemctl status memhog"),
            shell("b", "systemctl disable --now memhog"),
            fm.text("repaired"),
        ],
        "! pgrep -x tail",
    ),
    "stuck-service": (
        "the web app does not answer",
        lambda: [
            shell("a", "systemctl status webapp"),
            shell("b", "systemctl restart webapp"),
            fm.text("repaired"),
        ],
        "curl -sf -m 3 http://127.0.0.1:8080/",
    ),
    "wedged": (
        "the devvm does not answer",
        lambda: [fm.tool("a", "probe_devvm", {}), verb("b", "reset"), wait("c"), fm.text("back")],
        "true",
    ),
    "io-stall": (
        "the devvm does not answer",
        lambda: [verb("a", "status"), verb("b", "cycle"), wait("c"), fm.text("back")],
        "dd if=/dev/zero of=/data/db/probe bs=4k count=1 conv=fsync",
    ),
    "inode-exhaustion": (
        "no space left on device, but df shows space",
        lambda: [
            shell("a", "df -i /data; du --inodes -s /data/*"),
            shell(
                "b",
                "systemctl disable --now session-cache"
                " && find /data/cache/sessions -type f -delete",
            ),
            fm.text("repaired"),
        ],
        "touch /data/log/app/probe",
    ),
    "read-only-root": (
        "nothing can write files",
        lambda: [
            shell("a", "touch /var/lib/app/x; dmesg | grep -m 1 'Aborting journal'"),
            verb("b", "reset"),
            wait("c"),
            fm.text("back"),
        ],
        "touch /var/lib/app/probe",
    ),
    "pid-exhaustion": (
        "builds fail with fork errors",
        lambda: [
            shell("a", "systemctl status worker-pool | head -n 8"),
            shell("b", "systemctl disable --now worker-pool"),
            fm.text("repaired"),
        ],
        "[ $(cat /sys/fs/cgroup/worker-pool.service/pids.current) -eq 0 ]",
    ),
    "deleted-open": (
        "the data disk is full but I cannot find the files",
        lambda: [
            shell("a", "df -h /data; du -sh /data; lsof -a -nP +L1 /data"),
            shell("b", "systemctl disable --now report-exporter"),
            fm.text("repaired"),
        ],
        "[ $(df --output=pcent /data | tail -n 1 | tr -dc 0-9) -lt 50 ]",
    ),
}


async def restore_and_cold_boot() -> tuple[float, float]:
    """(restore: start_real_lab until SSH runs a command; cold boot: verb start until SSH)."""
    t0 = time.monotonic()
    lab = await start_real_lab("healthy", verb_overrides=OVERRIDES)
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        await lab.wait_for_ssh()
        restore = time.monotonic() - t0
        stopped = await hosts.verb("stop")
        if not stopped.ok:
            raise RuntimeError(f"stop failed: {stopped.message}")
        t1 = time.monotonic()
        started = await hosts.verb("start")
        if not started.ok:
            raise RuntimeError(f"start failed: {started.message}")
        await lab.wait_for_ssh()
        return restore, time.monotonic() - t1
    finally:
        await hosts.close()
        await lab.close()


def console_reachable_s() -> float | None:
    """`breakglass-tui --lab` in tmux until the header says the devvm is reachable."""
    if shutil.which("tmux") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "tmux.sock")
        tui = str(Path(sys.executable).with_name("breakglass-tui"))
        t0 = time.monotonic()
        subprocess.run(
            [*("tmux", "-S", sock, "-f", "/dev/null", "new-session", "-d"), f"{tui} --lab"],
            check=True,
            timeout=10,
        )
        try:
            while time.monotonic() - t0 < 120:
                shown = subprocess.run(
                    ["tmux", "-S", sock, "capture-pane", "-p"], capture_output=True, text=True
                ).stdout
                if "devvm: reachable" in shown:
                    return time.monotonic() - t0
                time.sleep(0.05)
            return None
        finally:
            subprocess.run(["tmux", "-S", sock, "send-keys", "C-q"], capture_output=True)
            time.sleep(3)
            subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


async def drill(scenario: str) -> tuple[float, float]:
    """(lab start, operator message to a healthy devvm) for one scenario."""
    message, script, healthy = DRILLS[scenario]
    api = await fm.FakeMessagesApi().start()
    t0 = time.monotonic()
    lab: RealLab = await start_real_lab(scenario, verb_overrides=OVERRIDES)
    started = time.monotonic() - t0
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            agent = BreakglassAgent(
                Settings(state_dir=Path(tmp), max_steps=50, api_deadline_s=60),
                hosts,
                lambda e: None,
                operator="bench",
                lab=True,
                api_key=KEY,
                base_url=api.base_url,
                wait_probe_interval_s=0.5,
            )
            api.push(*script())
            t1 = time.monotonic()
            await agent.handle(message)
            while True:
                check = await hosts.run(healthy, timeout_s=30)
                if check.ok:
                    break
                if time.monotonic() - t1 > 300:
                    raise RuntimeError(f"{scenario}: never healthy ({check.stderr[-200:]})")
                await asyncio.sleep(0.5)
            repaired = time.monotonic() - t1
            await agent.close()
        if api.script:
            raise RuntimeError(f"{scenario}: the scripted conversation did not run to its end")
        return started, repaired
    finally:
        await hosts.close()
        await lab.close()
        await api.close()


def ci_time() -> float:
    t0 = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/lab",
            "tests/guest",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        check=False,
    )
    return time.monotonic() - t0


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s" if values else "n/a"


async def main(args: argparse.Namespace) -> None:
    scenarios = args.scenarios.split(",") if args.scenarios else list(GUEST_SCENARIOS)
    for scenario in scenarios:  # built and saved once, outside the measurement
        await asyncio.to_thread(plan.prepare, scenario)
    figures: dict[str, Any] = {"restore": [], "cold": [], "console": []}
    for _ in range(args.rounds):
        restore, cold = await restore_and_cold_boot()
        figures["restore"].append(restore)
        figures["cold"].append(cold)
        reachable = await asyncio.to_thread(console_reachable_s)
        if reachable is not None:
            figures["console"].append(reachable)
    restore, cold = statistics.median(figures["restore"]), statistics.median(figures["cold"])
    print(f"real devvm ({plan.choose_accel().upper()}), {args.rounds} round(s)")
    print(f"  restore to SSH     {restore:6.2f} s")
    print(f"  cold boot to SSH   {cold:6.2f} s   (restore/cold = {restore / cold:.2f})")
    print(f"  breakglass-tui --lab to 'devvm: reachable': {median(figures['console'])} (aim 3 s)")
    print("  operator message to a healthy devvm (scripted model), per scenario:")
    for scenario in scenarios:
        starts, repairs = [], []
        for _ in range(args.rounds):
            started, repaired = await drill(scenario)
            starts.append(started)
            repairs.append(repaired)
        print(f"    {scenario:17} {median(repairs):>9}   (drill started in {median(starts)})")
    if args.ci:
        print(f"  tests/lab + tests/guest wall time: {ci_time():.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scenarios", default="", help="comma-separated (default: all)")
    parser.add_argument("--ci", action="store_true", help="also time the lab and guest tests")
    asyncio.run(main(parser.parse_args()))
