"""Benchmark: the real-guest lab (a real devvm under QEMU, TCG here) through breakglass-verb.

Measures, over SSH to the lab PVE host running the real verb (the hosts layer's HostSession):

- boot-to-SSH: QEMU start to the first command that runs over SSH;
- reset to SSH: the `reset` verb on a wedged (vCPUs paused over QMP) guest, and then until SSH
  runs a command again;
- cycle to SSH: the `cycle` verb (stop the QEMU process, start a new one), then until SSH;
- forensics on a paused guest and on an I/O-stalled one (paused by QEMU on an I/O error), which
  must stay within the verb's forensics deadline (20 s); then `reset` (with the verb's resume) of
  the I/O-stalled guest, to SSH.

    .venv/bin/python bench/bench_guest.py [--rounds N]

The machine is shared and QEMU runs without KVM: figures vary with the load; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from breakglass_tui.hosts.session import HostSession  # noqa: E402
from breakglass_tui.lab.guest.lab import RealLab, start_real_lab  # noqa: E402

# The bench resets and cycles the same VM back to back: no cooldown, room in the budget.
OVERRIDES = {"budget": {"cooldown_s": 0, "max_mutating_per_hour": 1000}}


async def verb_then_ssh(lab: RealLab, hosts: HostSession, verb: str) -> tuple[float, float]:
    """(verb's own elapsed_s, verb start to SSH running a command)."""
    t0 = time.monotonic()
    result = await hosts.verb(verb)
    if not result.ok:
        raise RuntimeError(f"{verb} failed: {result.message}")
    await lab.wait_for_ssh()
    return float(result.document["elapsed_s"]), time.monotonic() - t0


async def forensics_s(hosts: HostSession, want_state: str) -> float:
    result = await hosts.verb("forensics")
    if not result.ok or result.state_before != want_state:
        raise RuntimeError(f"forensics: {result.message} (state {result.state_before})")
    timed_out = [p["name"] for p in result.document["probes"] if p["status"] == "timeout"]
    if timed_out:
        raise RuntimeError(f"forensics probes timed out: {timed_out}")
    return float(result.document["elapsed_s"])


async def bench(rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {
        k: []
        for k in (
            "boot_to_ssh",
            "reset_verb",
            "reset_to_ssh",
            "cycle_verb",
            "cycle_to_ssh",
            "forensics_paused",
            "forensics_io_error",
            "reset_io_error_to_ssh",
        )
    }
    lab = await start_real_lab("healthy", verb_overrides=OVERRIDES)
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        figures["boot_to_ssh"].append(lab.boot_s)
        for _ in range(rounds):
            await asyncio.to_thread(lab.sim.qmp, "stop")  # wedged: vCPUs paused
            figures["forensics_paused"].append(await forensics_s(hosts, "paused"))
            verb_s, to_ssh = await verb_then_ssh(lab, hosts, "reset")
            figures["reset_verb"].append(verb_s)
            figures["reset_to_ssh"].append(to_ssh)
            verb_s, to_ssh = await verb_then_ssh(lab, hosts, "cycle")
            figures["cycle_verb"].append(verb_s)
            figures["cycle_to_ssh"].append(to_ssh)
    finally:
        await hosts.close()
        await lab.close()
    for _ in range(rounds):
        lab = await start_real_lab("io-stall", verb_overrides=OVERRIDES)
        hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
        try:
            figures["forensics_io_error"].append(await forensics_s(hosts, "paused (io-error)"))
            figures["reset_io_error_to_ssh"].append((await verb_then_ssh(lab, hosts, "reset"))[1])
        finally:
            await hosts.close()
            await lab.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    t0 = time.monotonic()
    figures = asyncio.run(bench(args.rounds))
    print(f"real-guest lab, {args.rounds} round(s), TCG, {time.monotonic() - t0:.0f} s in all")
    for name, values in figures.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name:<22} median {statistics.median(values):6.2f} s   ({shown})")
    deadline = 20.0
    worst = max(figures["forensics_paused"] + figures["forensics_io_error"])
    print(f"  forensics worst case {worst:.2f} s (deadline {deadline:g} s)")


if __name__ == "__main__":
    main()
