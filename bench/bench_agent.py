"""Benchmark of the breakglass agent's own cost.

1. Loop overhead per tool round trip: Claude (the fake Messages API, answering at once) asks for a
   lab command K times; the agent's time per step minus one bare API round trip (the real SDK
   against the same fake, no agent) and one bare lab command (HostSession.run, no agent), as a
   ratio to the bare API round trip, all measured in the same run.
2. Request size (bytes of the JSON body, and estimated tokens) after a 10 MB output.
3. A 50-step incident over five operator messages, 25 of its outputs 200 KB (each past the output
   budget), run twice in the same run against the strict fake (which refuses nothing, or the run
   fails): with the product's context management (the API's context editing inside a tool loop,
   thinking dropped and old results shortened at operator messages) and without it (a baseline:
   triggers and budgets out of reach). Reported: the bytes sent per request and the input tokens
   the model sees per request (the fake counts what is left after context editing), with the
   managed/baseline ratios.

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
from breakglass_tui.lab.lab import start_sandbox_lab  # noqa: E402
from tests.core.conftest import ScriptedHost  # noqa: E402
from tests.support import fake_messages_api as fm  # noqa: E402

KEY = "sk-ant-bench-000000000000000000"
MODEL = "claude-sonnet-5-5"


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
                thinking={"type": "adaptive", "display": "summarized"},
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
    lab = await start_sandbox_lab("healthy")
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
            api.assert_no_rejections()
    finally:
        await api.close()
    return out


async def long_incident(tmp: Path, *, managed: bool) -> dict[str, float]:
    """50 steps over five operator messages, every other output 200 KB: bytes sent and tokens
    the model sees, per request."""
    api = await fm.FakeMessagesApi().start()
    big = {f"big {i}": f"{i}:" + ("y" * 99 + "\n") * 2048 for i in range(25)}
    knobs: dict[str, Any] = {}
    if not managed:  # the baseline: no context editing, no shortening
        knobs = {"context_trigger_tokens": 10**9, "context_limit_bytes": 10**12}
    try:
        a = agent(tmp, ScriptedHost(outputs=big), api, **knobs)
        step = 0
        for message in range(5):
            for _ in range(10):
                command = f"big {step // 2}" if step % 2 == 0 else f"uptime {step}"
                api.push(fm.tool(f"t{step}", "devvm_shell", {"command": command}))
                step += 1
            api.push(fm.text(f"checkpoint {message}"))
            await a.handle(f"go on ({message})")
        await a.close()
        api.assert_no_rejections()  # no 400, ever
        sizes = [len(json.dumps(b)) for b in api.bodies]
        seen = api.seen_tokens
        return {
            "requests": len(sizes),
            "bytes_sent_max": max(sizes),
            "bytes_sent_last": sizes[-1],
            "bytes_sent_total": sum(sizes),
            "tokens_seen_max": max(seen),
            "tokens_seen_last": seen[-1],
            "tokens_seen_total": sum(seen),
        }
    finally:
        await api.close()


async def long_incidents() -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        managed = await long_incident(Path(tmp) / "managed", managed=True)
        baseline = await long_incident(Path(tmp) / "baseline", managed=False)
    for name, value in managed.items():
        out[f"50_steps_{name}"] = value
        out[f"50_steps_{name}_baseline"] = baseline[name]
        if name != "requests":
            out[f"50_steps_{name}_ratio"] = value / baseline[name]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {
        **await loop_overhead(args.steps),
        **await request_sizes(),
        **await long_incidents(),
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for name, value in results.items():
        print(f"{name:48s} {value:12.2f}" if isinstance(value, float) else f"{name:48s} {value:9d}")


if __name__ == "__main__":
    asyncio.run(main())
