"""Benchmark: the time breakglass-verb adds over the simulated qm/QMP calls it makes.

For `status`, `forensics` and `cycle` on a healthy simulated devvm, run the verb as the real
subprocess sshd would run, and in the same run the bare calls it makes (the same `qm` commands and
QMP queries, back to back, no verb); print medians and ratios. Then `status` with QEMU's monitor
wedged and its listen queue full (EAGAIN), and `forensics` with every probe that can hang hung
(qm status, qm config, all of QMP), which must stay within forensics_s.

    .venv/bin/python bench/bench_verb.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breakglass_tui.lab.sim_pve import SimPve  # noqa: E402
from breakglass_tui.verb import breakglass_verb as bv  # noqa: E402

VERB = ROOT / "breakglass_tui" / "verb" / "breakglass_verb.py"


def run_verb(sim: SimPve, command: str) -> tuple[float, dict]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BREAKGLASS_VERB_CONFIG": str(sim.verb_config_path),
        "SSH_ORIGINAL_COMMAND": command,
    }
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(VERB)], env=env, capture_output=True, check=False, timeout=120
    )
    elapsed = time.perf_counter() - t0
    doc = json.loads(out.stdout)
    if doc["exit_code"] != 0:
        raise SystemExit(f"{command} failed: {doc['message']}")
    return elapsed, doc


def qm(sim: SimPve, *args: str) -> None:
    subprocess.run(
        [str(sim.qm_path), *args],
        capture_output=True,
        check=False,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def qmp(sim: SimPve, command: str, arguments: dict | None = None) -> None:
    deadline = time.monotonic() + 5
    client = bv.Qmp(str(Path(sim.qemu_run_dir) / f"{sim.vmid}.qmp"), deadline)
    try:
        client.execute(command, arguments, deadline=deadline)
    finally:
        client.close()


def bare_forensics(sim: SimPve, shot: Path) -> None:
    """The forensics probes' qm and QMP calls, one after the other."""
    vmid = str(sim.vmid)
    qm(sim, "status", vmid, "--verbose")
    qm(sim, "config", vmid)
    for command in ("query-status", "query-block", "query-blockstats"):
        qmp(sim, command)
    qmp(sim, "screendump", {"filename": str(shot), "format": "png"})


def wait_running(sim: SimPve) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            deadline_q = time.monotonic() + 2
            client = bv.Qmp(str(Path(sim.qemu_run_dir) / f"{sim.vmid}.qmp"), deadline_q)
            try:
                if client.execute("query-status", deadline=deadline_q).get("running"):
                    return
            finally:
                client.close()
        except (OSError, bv.QmpError):
            time.sleep(0.02)
    raise SystemExit("the VM did not come back")


def median(fn: Callable[[], float], rounds: int) -> float:
    return statistics.median(fn() for _ in range(rounds))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = args.rounds
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-verb-") as tmp:
        sim = SimPve.create(
            Path(tmp) / "pve",
            102,
            budget={"max_mutating_per_hour": 10_000, "cooldown_s": 0},
        )
        try:
            sim.start_vm()
            vmid = str(sim.vmid)
            shot = Path(tmp) / "shot.png"

            def bare_status_calls() -> None:
                qm(sim, "status", vmid, "--verbose")
                qmp(sim, "query-status")  # the verb's own QMP check

            verb_status = median(lambda: run_verb(sim, "status")[0], rounds)
            bare_status = median(lambda: timed(bare_status_calls), rounds)
            rows.append(("status", bare_status, verb_status))

            verb_forensics = median(lambda: run_verb(sim, "forensics")[0], rounds)
            bare_f = median(lambda: timed(lambda: bare_forensics(sim, shot)), rounds)
            rows.append(("forensics", bare_f, verb_forensics))

            def bare_cycle() -> None:
                bare_forensics(sim, shot)
                qm(sim, "stop", vmid, "--timeout", "10")
                qm(sim, "start", vmid)
                wait_running(sim)

            verb_cycle = median(lambda: run_verb(sim, "cycle")[0], rounds)
            bare_c = median(lambda: timed(bare_cycle), rounds)
            rows.append(("cycle", bare_c, verb_cycle))

            startup = median(
                lambda: timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)),
                rounds,
            )
            print(f"breakglass-verb on the simulated devvm, median of {rounds} runs")
            print(f"{'verb':<12}{'bare calls':>12}{'verb':>10}{'added':>10}{'ratio':>8}")
            for name, bare, verb in rows:
                print(
                    f"{name:<12}{bare * 1000:>10.0f}ms{verb * 1000:>8.0f}ms"
                    f"{(verb - bare) * 1000:>8.0f}ms{verb / bare:>7.2f}x"
                )

            print(
                f"(a bare Python interpreter start here: {startup * 1000:.0f}ms, part of 'added';"
                " the verb also reads /etc/pve in a child it can abandon, and runs its child"
                " probes concurrently — QMP only after qm status and qm config — the bare calls"
                " one by one)"
            )
            print("\nstatus with QEMU's main loop wedged and its monitor queue full (EAGAIN):")
            # qm status waits 3 s for QMP on Proxmox: 1 s here, within the sim's probe_s of 2 s
            sim.set_faults(hang_qmp="all", status_qmp_timeout_s=1.0)
            sim.pvestatd_polls(2)
            elapsed, doc = run_verb(sim, "status")
            said = (doc["qm_status"] or {}).get("qmpstatus")
            print(
                f"  took {elapsed:.2f} s; state {doc['state_after']!r}"
                f" (qm status said qmpstatus {said!r})"
            )
            print("\nforensics with qm status, qm config and all of QMP hung:")
            sim.set_faults(hang_qm=["status", "config"], hang_qmp="all")
            for forensics_s, probe_s in ((6, 2), (20, 5)):
                text = sim.verb_config_path.read_text()
                text = _set(text, "forensics_s", forensics_s)
                text = _set(text, "probe_s", probe_s)
                sim.verb_config_path.write_text(text)
                elapsed, doc = run_verb(sim, "forensics")
                timeouts = sum(p["status"] == "timeout" for p in doc["probes"])
                verdict = "within" if elapsed <= forensics_s else "OVER"
                print(
                    f"  forensics_s={forensics_s:<3} probe_s={probe_s:<3} took {elapsed:.2f} s "
                    f"({elapsed / forensics_s:.0%} of the deadline, {verdict}); "
                    f"{timeouts} probes recorded as timeout"
                )
        finally:
            sim.cleanup()


def _set(text: str, key: str, value: float) -> str:
    import re

    return re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)


if __name__ == "__main__":
    main()
