"""Fixtures for the breakglass agent's tests: the fake Messages API over real HTTP, settings in a
temp state dir, and a small scripted host for tests where the host is beside the point."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.config import Settings
from breakglass_tui.core.agent import BreakglassAgent
from breakglass_tui.core.events import Event
from breakglass_tui.hosts.types import (
    CommandOutcome,
    Ending,
    OutputChunk,
    ProbeResult,
    Reachability,
    VerbResult,
)
from tests.support.fake_messages_api import FakeMessagesApi

API_KEY = "sk-ant-test-0123456789abcdefSECRET"


@dataclass
class ScriptedHost:
    """Satisfies core.hostapi.HostSessionLike; answers from a table. Outputs are streamed through
    on_output in chunks, like the real DevvmShell with keep_output=False."""

    outputs: dict[str, str] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    fail_with: Exception | None = None
    ran: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)

    async def run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        on_output: Callable[[OutputChunk], None] | None = None,
        keep_output: bool = True,
    ) -> CommandOutcome:
        self.ran.append(command)
        self.timeouts.append(timeout_s)
        if self.fail_with is not None:
            raise self.fail_with
        text = self.outputs.get(command, f"ran {command}\n")
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(command)
            raise
        step = 64 * 1024
        for i in range(0, len(text), step):
            if on_output is not None:
                on_output(OutputChunk(stream="stdout", text=text[i : i + step]))
        code = self.exit_codes.get(command, 0)
        return CommandOutcome(
            command=command,
            ending=Ending.EXITED,
            exit_status=code,
            stdout="" if not keep_output else text,
            duration_s=0.01,
            stdout_bytes=len(text.encode()),
            kept_tail_only=not keep_output,
        )

    async def probe(self) -> ProbeResult:
        return ProbeResult(Reachability.HEALTHY, 0.01, "SSH works and a trivial command ran")

    async def verb(self, name: str) -> VerbResult:
        self.verbs.append(name)
        return VerbResult(
            verb=name,
            ok=True,
            exit_code=0,
            message=f"{name} done",
            vmid=102,
            state_before="running",
            state_after="running",
        )

    async def bundle(self, bundle_id: str) -> dict[str, Any]:
        return {"verb": "bundle", "ok": True, "bundle_id": bundle_id, "manifest": {}, "files": {}}

    async def close(self) -> None:
        return None


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeMessagesApi]:
    api = await FakeMessagesApi().start()
    try:
        yield api
    finally:
        await api.close()
    # The strict fake answered 400 to a request the real API would refuse: a defect, even when
    # the agent recovered from it.
    api.assert_no_rejections()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", max_steps=40, api_deadline_s=20)


@dataclass
class Harness:
    agent: BreakglassAgent
    events: list[Event]
    api: FakeMessagesApi | None

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def audit(self) -> list[dict[str, Any]]:
        path = Path(self.agent.settings.state_dir) / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
async def make_agent(
    settings: Settings, fake_api: FakeMessagesApi
) -> AsyncIterator[Callable[..., Harness]]:
    made: list[BreakglassAgent] = []

    def make(hosts: Any = None, *, api: FakeMessagesApi | None = fake_api, **kw: Any) -> Harness:
        events: list[Event] = []
        kw.setdefault("api_key", API_KEY)
        kw.setdefault("retry_delay_s", 0.05)
        kw.setdefault("stream_read_timeout_s", 1.0)
        kw.setdefault("base_url", api.base_url if api is not None else "http://127.0.0.1:9")
        agent = BreakglassAgent(
            kw.pop("settings", settings),
            hosts if hosts is not None else ScriptedHost(),
            events.append,
            operator="viktor",
            lab=True,
            **kw,
        )
        made.append(agent)
        return Harness(agent, events, api)

    yield make
    for agent in made:
        await agent.close()
