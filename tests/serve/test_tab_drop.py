"""A browser tab that goes away ends its app process promptly and cleanly, in every phase.

breakglass-serve (in this process, over the lab it starts) spawns the real `breakglass-tui` app
for each websocket. Each trial brings a tab to a phase — starting, idle, streaming Claude's answer
(the fake Messages API), running a command — and then drops its websocket: half the trials close
it as a closing tab does, half cut the TCP connection as a network drop does. The app must be gone
within a generous bound, with its audit's session_end written, its driver lease released, the
running command's cancel recorded, no forced stop, and the server's slot free again.

Each trial's tab gets a state directory of its own (one incident each), so trials run side by
side against the one lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from breakglass_tui.config import Settings
from breakglass_tui.serve.backend import ServeBackend
from breakglass_tui.serve.server import BreakglassServer, app_command
from tests.support import fake_messages_api as fm
from tests.support.realparts import free_port
from tests.support.waiting import until

TRIALS_PER_PHASE = 20
PARALLEL = 4
EXIT_BOUND_S = 15.0  # the server gives an app 8 s before it kills it; the app's own deadline is 6
PHASE_TIMEOUT_S = 90.0
TYPED = "the devvm is down, fix it"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Served:
    server: BreakglassServer
    port: int
    api: fm.FakeMessagesApi

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    api = await fm.FakeMessagesApi().start()
    state = tmp_path_factory.mktemp("serve-state")
    port = free_port()
    settings = Settings(state_dir=state, public_url=f"http://127.0.0.1:{port}")
    backend = ServeBackend(settings, lab=True, scenario="healthy", state_dir=state)
    server = BreakglassServer(
        app_command(),
        host="127.0.0.1",
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        identity_header="X-authentik-username",
        max_sessions=PARALLEL * 2,
        max_sessions_per_operator=PARALLEL * 2,
        state_dir=state,
        default_operator="viktor",
        prepare=backend.prepare,
        cleanup=backend.close,
    )
    await server.start()
    try:
        yield Served(server, port, api)
    finally:
        await server.stop()
        await api.close()


@dataclass
class Drop:
    phase: str
    how: str  # "close" (the tab closed) or "abort" (the connection cut)
    exited: bool = False
    exit_s: float = 0.0
    audit: list[dict[str, Any]] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    slot_freed: bool = False


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _journal(state: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((state / "incidents").glob("*/events.jsonl")) for r in _lines(p)]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _app_pid(label: str) -> int | None:
    """The PID of the process the server started for the session ``label``: its child (this
    test runs the server in-process) whose environment carries that session id."""
    mine, wanted = str(os.getpid()), f"BREAKGLASS_SESSION_ID={label}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid == mine and wanted in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    return None


def _records(state: Path) -> str:
    """What the incident's journal and the audit log hold so far (for a failure's message)."""
    return (
        f"journal {[r.get('type') for r in _journal(state)]},"
        f" audit {[r.get('kind') for r in _lines(state / 'audit.jsonl')]}"
    )


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass


_SPAWNING = asyncio.Lock()  # one tab at a time gets its state dir and its process


async def one_drop(served: Served, phase: str, how: str, seed: int) -> Drop:
    rng = random.Random(seed)
    drop = Drop(phase, how)
    state = Path(tempfile.mkdtemp(prefix=f"bg-tab{seed}-"))
    async with aiohttp.ClientSession() as http:
        async with _SPAWNING:
            served.server.state.child_env["BREAKGLASS_STATE_DIR"] = str(state)
            before = set(served.server.sessions)
            ws = await http.ws_connect(
                f"ws://127.0.0.1:{served.port}/ws?width=160&height=48",
                headers={"Origin": served.base},
            )
            await until(
                lambda: set(served.server.sessions) - before,
                what="the session",
                timeout_s=10,
                diagnostics=lambda: _records(state),
            )
        reader = asyncio.create_task(_drain(ws))
        try:
            label = next(iter(set(served.server.sessions) - before))

            def journal_has(kind: str, needle: str = "") -> bool:
                return any(
                    r.get("type") == kind and needle in json.dumps(r) for r in _journal(state)
                )

            pid = await until(
                lambda: _app_pid(label),
                what="the app process",
                timeout_s=10,
                diagnostics=lambda: _records(state),
            )
            if phase == "starting":
                # A random moment in the start-up, not a wait for anything: the trial's point.
                await asyncio.sleep(rng.uniform(0.0, 1.5))
            else:
                if phase == "streaming":  # typed during the opening probe: queued
                    await ws.send_json(["stdin", TYPED + "\r"])
                await until(
                    lambda: journal_has("ToolCallEnded", "pve_verb"),
                    what="the opening check",
                    timeout_s=PHASE_TIMEOUT_S,
                    diagnostics=lambda: _records(state),
                )
                if phase == "streaming":
                    await until(
                        lambda: journal_has("AssistantTextDelta"),
                        what="the stream",
                        timeout_s=PHASE_TIMEOUT_S,
                        diagnostics=lambda: _records(state),
                    )
                elif phase == "command":
                    await ws.send_json(["stdin", "/sh sleep 600\r"])
                    await until(
                        lambda: journal_has("ToolCallStarted", "sleep 600"),
                        what="the command",
                        timeout_s=PHASE_TIMEOUT_S,
                        diagnostics=lambda: _records(state),
                    )
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random moment in the phase
            at = time.monotonic()
            if how == "close":
                await ws.close()
            else:
                transport = ws._response.connection.transport  # type: ignore[union-attr]
                transport.abort()
            while _alive(pid) and time.monotonic() - at < EXIT_BOUND_S:
                await asyncio.sleep(0.05)
            drop.exited = not _alive(pid)
            drop.exit_s = time.monotonic() - at
            await until(
                lambda: label not in served.server.sessions,
                what="the slot",
                timeout_s=20,
                diagnostics=lambda: _records(state),
            )
            drop.slot_freed = True
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await ws.close()
    drop.audit = _lines(state / "audit.jsonl")
    drop.journal = _journal(state)
    drop.leases = [str(p) for p in (state / "incidents").glob("*/driver.json")]
    shutil.rmtree(state, ignore_errors=True)
    return drop


def check(drop: Drop) -> list[str]:
    name = f"{drop.phase}/{drop.how}"
    if not drop.exited:
        return [f"{name}: the app process still ran {EXIT_BOUND_S} s after the tab went"]
    problems = []
    if drop.leases:
        problems.append(f"{name}: driver lease not released: {drop.leases}")
    kinds = [str(r.get("kind")) for r in drop.audit]
    if "session_start" in kinds and "session_end" not in kinds[kinds.index("session_start") :]:
        problems.append(f"{name}: no session_end in the audit ({kinds[-6:]})")
    if any(r.get("forced") or r.get("kind") == "exit_forced" for r in drop.audit):
        problems.append(f"{name}: the stop was forced")
    if drop.phase == "command":
        results = [r for r in drop.audit if r.get("kind") == "tool_result"]
        if not (results and results[-1].get("cancelled")):
            problems.append(f"{name}: the command's cancel is not in the audit")
    if drop.phase == "streaming":
        if "cancelled" not in kinds:
            problems.append(f"{name}: the stream's cancel is not in the audit")
        if TYPED not in [r.get("text") for r in drop.audit]:
            problems.append(f"{name}: the message typed during the opening probe was lost")
    return problems


@pytest.mark.parametrize("phase", ["starting", "idle", "streaming", "command"])
async def test_a_dropped_tab_ends_its_app_in_every_phase(
    served: Served, phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server hands these to every app process (its environment allowlist).
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789abcdefNOTREAL")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", served.api.base_url)
    served.api.script.extend(fm.stalled(after=4) for _ in range(TRIALS_PER_PHASE))
    gate = asyncio.Semaphore(PARALLEL)

    async def trial(n: int) -> Drop:
        async with gate:
            return await one_drop(served, phase, "close" if n % 2 else "abort", n)

    drops = await asyncio.gather(*(trial(n) for n in range(TRIALS_PER_PHASE)))
    problems = [p for drop in drops for p in check(drop)]
    assert not problems, "\n".join(problems)
    slowest = max(d.exit_s for d in drops)
    assert slowest < EXIT_BOUND_S, slowest
