"""End-to-end incidents in the sandbox lab (real commands behind a real sshd on the sandbox devvm,
the simulated PVE host running the real breakglass-verb as forced command), with Claude scripted
through the fake Messages API. The same incidents on the real devvm are in tests/guest."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from breakglass_tui.core.events import (
    BundleSaved,
    ProbeUpdated,
    ToolCallEnded,
    ToolOutput,
    VerbCompleted,
)
from breakglass_tui.core.hostapi import HostSessionLike
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.types import Reachability
from breakglass_tui.lab.lab import Lab, start_sandbox_lab
from tests.core.test_loop import assert_tool_results_first
from tests.support import fake_messages_api as fm


@pytest.fixture
async def lab_session(request) -> AsyncIterator[tuple[Lab, HostSession]]:
    lab = await start_sandbox_lab(request.param, boot_delay_s=0.3)
    hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
    try:
        yield lab, hosts
    finally:
        await hosts.close()
        await lab.close()


# The sandbox devvm has no service manager: its writer is a process, stopped as one. The
# bracket keeps the pattern from matching this command's own line.
STOP_WRITER = "pkill -f 'sh /opt/lab/[l]og-spammer'"


def text_of(content: str | list[dict]) -> str:
    """A tool_result's text (its content is a string, or text and image blocks)."""
    if isinstance(content, str):
        return content
    return "\n".join(b["text"] for b in content if b["type"] == "text")


def results(body: dict) -> list[str]:
    """The tool_result contents (their text) of the last user message of a request."""
    return [
        text_of(b["content"]) for b in body["messages"][-1]["content"] if b["type"] == "tool_result"
    ]


@pytest.mark.parametrize("lab_session", ["disk-full"], indirect=True)
async def test_disk_full_is_repaired_over_several_steps(lab_session, make_agent, fake_api):
    _lab, hosts = lab_session
    assert isinstance(hosts, HostSessionLike)  # core's Protocol matches the real HostSession
    h = make_agent(hosts)
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}),
        fm.tool("t2", "devvm_shell", {"command": "df -h /data"}),
        fm.tool("t3", "devvm_shell", {"command": "du -sh /data/log/app/* | sort -h | tail -n 5"}),
        fm.reply(
            "The runaway log filled the disk; stopping its writer and truncating it.",
            [
                ("t4", "devvm_shell", {"command": STOP_WRITER}),
                ("t5", "devvm_shell", {"command": "truncate -s 0 /data/log/app/runaway.log"}),
            ],
        ),
        fm.tool("t6", "devvm_shell", {"command": "df -h /data"}),
        fm.text("Incident summary: /data was 100% full from runaway.log; writer stopped, emptied."),
    )
    await h.agent.handle("the devvm is acting up")

    bodies = fake_api.bodies
    assert len(bodies) == 6
    assert "healthy" in results(bodies[1])[0]
    assert "100%" in results(bodies[2])[0]
    assert re.search(r"^3\dM\s+/data/log/app/runaway\.log$", results(bodies[3])[0], re.M)
    assert all("exit 0" in r for r in results(bodies[4]))
    after = results(bodies[5])[0]
    assert "exit 0" in after and "100%" not in after
    assert "100%" in "".join(e.chunk.text for e in h.of(ToolOutput))  # shown live
    assert all(e.ok for e in h.of(ToolCallEnded))
    assert_tool_results_first(bodies)
    # The devvm really is repaired: ask it ourselves.
    check = await hosts.run("df -h /data")
    assert check.ok and "100%" not in check.stdout
    records = [json.loads(x) for x in (Path(h.agent.settings.state_dir) / "audit.jsonl").open()]
    commands = [
        r["input"]["command"]
        for r in records
        if r["kind"] == "tool_call" and r["tool"] == "devvm_shell"
    ]
    assert commands[2:4] == [STOP_WRITER, "truncate -s 0 /data/log/app/runaway.log"]


@pytest.mark.parametrize("lab_session", ["disk-full"], indirect=True)
async def test_disk_full_with_two_dozen_large_reads_runs_to_the_repair_on_the_current_model(
    lab_session, make_agent, fake_api
):
    """The issue's scripted incident, on the default model through the strict fake: probe, df,
    24 large reads of the runaway log, stop the writer, truncate, df. One operator message,
    within the step limit; the API's context editing keeps what the model sees bounded; no
    request is refused (the fixture checks)."""
    _lab, hosts = lab_session
    h = make_agent(hosts)
    assert h.agent.settings.model == "claude-sonnet-5-5"
    reads = [f"tail -n {2000 + 10 * i} /data/log/app/runaway.log" for i in range(24)]
    fake_api.push(
        fm.tool("t0", "probe_devvm", {}),
        fm.tool("t1", "devvm_shell", {"command": "df -h /data"}),
        *[fm.tool(f"r{i}", "devvm_shell", {"command": c}) for i, c in enumerate(reads)],
        fm.tool("t2", "devvm_shell", {"command": STOP_WRITER}),
        fm.tool("t3", "devvm_shell", {"command": "truncate -s 0 /data/log/app/runaway.log"}),
        fm.tool("t4", "devvm_shell", {"command": "df -h /data"}),
        fm.text("Repaired: the runaway log filled /data; its writer is stopped, the log emptied."),
    )
    await h.agent.handle("the devvm's disk is full")
    assert len(fake_api.bodies) == 30 and not fake_api.script and not h.agent.manual
    assert "100%" in results(fake_api.bodies[2])[0]
    assert (
        "exit 0" in results(fake_api.bodies[-1])[0]
        and "100%" not in results(fake_api.bodies[-1])[0]
    )
    check = await hosts.run("df -h /data")
    assert check.ok and "100%" not in check.stdout
    # The large reads pushed the context past the trigger: old results were cleared on the
    # API's side, the conversation sent was never edited, and every turn went back verbatim.
    assert any(edits for edits in fake_api.applied_edits)
    assert max(fake_api.seen_tokens) < h.agent.context_trigger_tokens + 3 * 2_500
    last = fake_api.bodies[-1]
    turns = [m for m in last["messages"] if m["role"] == "assistant"]
    assert len(turns) == 29 and all(m["content"][0]["type"] == "thinking" for m in turns)
    assert_tool_results_first(fake_api.bodies)


@pytest.mark.slow
@pytest.mark.parametrize("lab_session", ["wedged"], indirect=True)
async def test_wedged_devvm_is_recovered_with_status_forensics_cycle_probe(
    lab_session, make_agent, fake_api
):
    lab, hosts = lab_session
    h = make_agent(hosts, wait_probe_interval_s=0.2)
    fake_api.push(
        fm.tool("t1", "probe_devvm", {}),
        fm.tool("t2", "pve_verb", {"verb": "status"}),
        fm.tool("t3", "pve_verb", {"verb": "forensics"}),
        fm.tool("t4", "pve_verb", {"verb": "cycle"}),
        fm.tool("t5", "wait_for_devvm", {"timeout_s": 30}),
        fm.tool("t6", "probe_devvm", {}),
        fm.text("Incident summary: the guest was wedged (no SSH banner); cycled; SSH is back."),
    )
    boot_before = lab.sim.vm_state()["boot_id"]
    await h.agent.handle("the devvm does not answer")

    probes = [e.result.reachability for e in h.of(ProbeUpdated)]
    assert probes[0] is Reachability.NO_BANNER
    assert probes[-1] is Reachability.HEALTHY, h.of(ProbeUpdated)[-1].result
    verbs = [e.result for e in h.of(VerbCompleted)]
    assert [v.verb for v in verbs] == ["status", "forensics", "cycle"]
    assert all(v.ok for v in verbs), [v.message for v in verbs]
    assert verbs[1].bundle_id and verbs[2].bundle_id  # forensics first, also inside cycle
    assert lab.sim.vm_state()["boot_id"] > boot_before
    cycle_result = results(fake_api.bodies[4])[0]
    assert "pve_verb cycle: ok" in cycle_result and verbs[2].bundle_id in cycle_result
    # The model sees the forensics it collects: the bundle's files as outputs, and the guest's
    # screen (before the cycle acted) as an image in the tool result.
    assert "qm_status.txt (qm status --verbose): output_id" in cycle_result
    cycle_blocks = fake_api.bodies[4]["messages"][-1]["content"][0]["content"]
    assert [b["type"] for b in cycle_blocks] == ["text", "image"]
    assert "no_banner" in results(fake_api.bodies[1])[0]
    assert "the devvm answers" in results(fake_api.bodies[5])[0]
    assert "healthy" in results(fake_api.bodies[6])[0]
    # The bundles reach the forensics pane: fetched and saved under the state dir.
    for _ in range(100):
        if len(h.of(BundleSaved)) >= 2:
            break
        await asyncio.sleep(0.1)
    saved = {e.bundle_id: e for e in h.of(BundleSaved)}
    assert verbs[1].bundle_id in saved
    bundle = saved[verbs[1].bundle_id]
    assert bundle.files and all((Path(bundle.directory) / f).is_file() for f in bundle.files)
    audit = (Path(h.agent.settings.state_dir) / "audit.jsonl").read_text()
    assert f'"bundle_id": "{verbs[2].bundle_id}"' in audit
    assert_tool_results_first(fake_api.bodies)


@pytest.mark.parametrize("lab_session", ["healthy"], indirect=True)
async def test_cancel_stops_the_running_lab_command_at_once(lab_session, make_agent, fake_api):
    _lab, hosts = lab_session
    h = make_agent(hosts)
    fake_api.push(fm.tool("t1", "devvm_shell", {"command": "echo started; sleep 300"}))
    task = asyncio.create_task(h.agent.handle("run the long thing"))
    for _ in range(250):
        if "started" in "".join(e.chunk.text for e in h.of(ToolOutput)):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the command never started")
    loop = asyncio.get_running_loop()
    started = loop.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.time() - started < 2.0
    ended = h.of(ToolCallEnded)[-1]
    assert ended.cancelled
    assert h.agent.messages[-1]["content"][0]["content"] == "Cancelled by the operator."
    # The devvm is usable at once afterwards (nothing left holding the session).
    again = await hosts.run("echo next")
    assert again.ok and again.stdout.strip() == "next"
