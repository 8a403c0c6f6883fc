"""Benchmark of the breakglass agent's own cost.

1. Loop overhead per tool round trip: Claude (the fake Messages API, answering at once) asks for a
   lab command K times; the agent's time per step minus one bare API round trip (the real SDK
   against the same fake, no agent) and one bare lab command (HostSession.run, no agent), as a
   ratio to the bare API round trip, all measured in the same run.
2. Request size (bytes of the JSON body, and estimated tokens) after a 10 MB output, and after a
   50-step incident whose every output is bigger than the output budget.

Run: .venv/bin/python bench/bench_agent.py [--steps 30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from breakglass_tui.config import Settings  # noqa: E402
from breakglass_tui.core.agent import BreakglassAgent  # noqa: E402
from breakglass_tui.core.outputs import estimate_tokens  # noqa: E402
from breakglass_tui.hosts.session import HostSession  # noqa: E402
from breakglass_tui.hosts.types import CommandOutcome, Ending, OutputChunk  # noqa: E402
from breakglass_tui.lab.lab import start_lab  # noqa: E402
from tests.core.conftest import ScriptedHost  # noqa: E402
from tests.support import fake_messages_api as fm  # noqa: E402

KEY = "sk-ant-bench-000000000000000000"
MODEL = "claude-sonnet-4-6"


async def bare_api_round_trips(api: fm.FakeMessagesApi, n: int) -> list[float]:
    """The SDK alone: one streamed tool_use reply per request, consumed whole."""
    import anthropic

    client = anthropic.AsyncAnthropic(api_key=KEY, base_url=api.base_url, max_retries=0)
    times = []
    try:
        for i in range(n):
            api.push(fm.tool(f"b{i}", "devvm_shell", {"command": "echo ok"}))
            t = time.perf_counter()
            async with client.messages.stream(
                model=MODEL,
                max_tokens=1024,
                messages=[{"role": "user", "content": "hi"}],
            ) as stream:
                async for _ in stream:
                    pass
            times.append(time.perf_counter() - t)
    finally:
        await client.close()
    return times


async def bare_commands(hosts: HostSession, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        outcome = await hosts.run("echo ok")
        assert outcome.ok, outcome
        times.append(time.perf_counter() - t)
    return times


def agent(state: Path, hosts: Any, api: fm.FakeMessagesApi, **kw: Any) -> BreakglassAgent:
    settings = Settings(state_dir=state, model=MODEL, max_steps=1000, api_deadline_s=60)
    return BreakglassAgent(
        settings,
        hosts,
        lambda e: None,
        operator="bench",
        lab=True,
        session_id=None,
        api_key=KEY,
        base_url=api.base_url,
        **kw,
    )


async def loop_overhead(steps: int) -> dict[str, float]:
    api = await fm.FakeMessagesApi().start()
    lab = await start_lab("healthy")
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        await hosts.run("true")  # connect once, as the agent's first step would
        await bare_api_round_trips(api, 3)  # warm the SDK import and the connection path
        with tempfile.TemporaryDirectory() as tmp:
            a = agent(Path(tmp), hosts, api)
            api.push(fm.text("warm"))
            await a.handle("warm up")
            api_rt = statistics.median(await bare_api_round_trips(api, steps))
            cmd_rt = statistics.median(await bare_commands(hosts, steps))
            api.push(
                *[fm.tool(f"t{i}", "devvm_shell", {"command": "echo ok"}) for i in range(steps)]
            )
            api.push(fm.text("done"))
            t = time.perf_counter()
            await a.handle("go")
            total = time.perf_counter() - t
            await a.close()
        per_step = (total - api_rt) / steps  # the final text turn is one bare round trip
        overhead = per_step - api_rt - cmd_rt
        return {
            "steps": steps,
            "bare_api_round_trip_ms": api_rt * 1000,
            "bare_lab_command_ms": cmd_rt * 1000,
            "agent_step_ms": per_step * 1000,
            "loop_overhead_ms": overhead * 1000,
            "overhead_ratio_to_api_round_trip": overhead / api_rt,
        }
    finally:
        await hosts.close()
        await lab.close()
        await api.close()


class BigOutputHost(ScriptedHost):
    """Streams a generated output of a given size in 64 KiB chunks without holding it twice."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    async def run(self, command: str, *, timeout_s=None, on_output=None, keep_output=True):
        line = "x" * 99 + "\n"
        block = line * 655  # ~64 KiB
        sent = 0
        while sent < self.size:
            piece = block[: min(len(block), self.size - sent)]
            if on_output is not None:
                on_output(OutputChunk(stream="stdout", text=piece))
            sent += len(piece)
        return CommandOutcome(
            command=command,
            ending=Ending.EXITED,
            exit_status=0,
            stdout_bytes=sent,
            kept_tail_only=True,
        )


async def request_sizes() -> dict[str, int]:
    api = await fm.FakeMessagesApi().start()
    out: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            a = agent(Path(tmp) / "a", BigOutputHost(10 * 1024 * 1024), api)
            api.push(fm.tool("t1", "devvm_shell", {"command": "cat big"}), fm.text("ok"))
            await a.handle("go")
            before, after = (len(json.dumps(b)) for b in api.bodies[-2:])
            out["request_bytes_before_10mb_output"] = before
            out["request_bytes_after_10mb_output"] = after
            out["est_tokens_after_10mb_output"] = estimate_tokens(json.dumps(api.bodies[-1]))
            await a.close()

            api.requests.clear()
            host = ScriptedHost(outputs={f"s{i}": f"{i}:" + "y" * 20_000 + "\n" for i in range(50)})
            a = agent(Path(tmp) / "b", host, api)
            api.push(*[fm.tool(f"t{i}", "devvm_shell", {"command": f"s{i}"}) for i in range(50)])
            api.push(fm.text("ok"))
            await a.handle("go")
            sizes = [len(json.dumps(b)) for b in api.bodies]
            out["request_bytes_after_50_steps"] = sizes[-1]
            out["request_bytes_max_in_50_steps"] = max(sizes)
            out["est_tokens_after_50_steps"] = estimate_tokens(json.dumps(api.bodies[-1]))
            await a.close()
    finally:
        await api.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {**await loop_overhead(args.steps), **await request_sizes()}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name, value in results.items():
        print(f"{name:40s} {value:12.2f}" if isinstance(value, float) else f"{name:40s} {value:9d}")


if __name__ == "__main__":
    asyncio.run(main())
