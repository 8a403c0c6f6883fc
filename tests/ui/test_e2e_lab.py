"""End to end: the real app, the real breakglass agent, the lab's hosts over SSH, and the real
anthropic SDK against the local fake Messages API. Not pinned as snapshots: ports, durations and
the lab's clock vary; these assert on what is on screen instead. The first test runs on what
``--lab`` gives (the real devvm, restored under QEMU); the others on the sandbox devvm, which
starts at once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from breakglass_tui.config import Settings
from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.widgets.chat import ThinkingBlock, ToolBlock
from tests.support import fake_messages_api as api
from tests.support.fake_messages_api import FakeMessagesApi
from tests.support.waiting import until, until_sync
from tests.ui.conftest import agent_busy, drawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def lab_app(tmp_path: Path, scenario: str = "healthy", devvm: str = "sandbox") -> BreakglassApp:
    settings = Settings(state_dir=tmp_path / "state")
    return BreakglassApp(
        AppOptions(lab=True, scenario=scenario, settings=settings, devvm=devvm),
        download_dir=tmp_path,
    )


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (the lab's private workdir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


async def ready(app: BreakglassApp, pilot) -> None:
    """The lab is up and the console's opening check (/probe, /status) has ended."""
    await until(lambda: app.backend is not None, what="the lab to start", pause=pilot.pause)
    # The opening check's two calls ended (the hosts can be up a moment before it starts).
    await until(
        lambda: len(app.query(ToolBlock)) >= 2 and not agent_busy(app),
        what="the opening check",
        pause=pilot.pause,
    )
    await app.workers.wait_for_complete()
    await drawn(app, pilot)


async def sleep_running(app: BreakglassApp, pilot) -> None:
    """The console ready, then `/sh sleep 60` sent: its call on screen, the sleep running on
    the devvm."""
    await ready(app, pilot)
    await pilot.press(*"/sh sleep 60", "enter")
    await until(
        lambda: len(app.query(ToolBlock)) == 3, what="the sleep to start", pause=pilot.pause
    )
    await until(
        lambda: processes_mentioning("sleep 60"),
        what="the sleep running on the devvm",
        pause=pilot.pause,
    )


async def test_lab_manual_mode_sh_df_and_quit_leaves_no_process(tmp_path, monkeypatch):
    """README's first command: --lab on the real devvm (QEMU, restored from its saved state)."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    app = lab_app(tmp_path, "disk-full", devvm="auto")
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(app, pilot)
        header = app.header
        assert header.devvm == "devvm: reachable"
        assert header.vm_state == "VM 102: running"
        assert "manual mode" in header.claude and "ANTHROPIC_API_KEY" in header.claude
        assert "real devvm" in header.targets and "disk-full" in header.targets
        lab_root = str(app.backend.lab.sim.root)
        assert processes_mentioning(lab_root), "the lab's QEMU should be running"
        await pilot.press(*"/sh df -h", "enter")
        await until(lambda: not agent_busy(app), what="df to finish", pause=pilot.pause)
        await drawn(app, pilot)
        lines = app.output_log().lines
        assert any(line.startswith("Filesystem") for line in lines)
        assert any("100% /data" in line for line in lines), "disk-full shows a full /data"
        block = app.query(ToolBlock).last()
        assert "$ df -h" in block.heading and block.has_class("-ok")
        await pilot.press("ctrl+q")
    until_sync(
        lambda: processes_mentioning(lab_root) == [],
        what="every process of the lab to end",
        timeout_s=10,
        interval_s=0.1,
    )
    assert (tmp_path / "state" / "audit.jsonl").exists()


async def test_escape_cancels_a_running_lab_command_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    app = lab_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await sleep_running(app, pilot)
        started = time.monotonic()
        await pilot.press("escape")
        await until(lambda: not agent_busy(app), what="the cancel", timeout_s=10, pause=pilot.pause)
        await drawn(app, pilot)
        assert time.monotonic() - started < 5
        assert "cancelled" in app.query(ToolBlock).last().heading
        await pilot.press(*"/sh uptime", "enter")
        await until(lambda: not agent_busy(app), what="uptime after a cancel", pause=pilot.pause)
        assert "-ok" in app.query(ToolBlock).last().classes
        await app.shutdown()


async def test_osc52_from_the_devvm_never_reaches_the_screen(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    app = lab_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await ready(app, pilot)
        # The lab's printf does not decode \033, so the command carries the raw bytes, as a
        # hostile file's content would.
        await app.submit("/sh printf 'a\x1b]52;c;SGVsbG8=\x07b\\n'")
        await until(lambda: not agent_busy(app), what="printf", pause=pilot.pause)
        await drawn(app, pilot)
        lines = app.output_log().lines
        assert "ab" in lines, lines
        assert "SGVsbG8=" not in app.export_screenshot()
        await app.shutdown()


async def test_claude_streams_an_answer_with_tool_blocks_over_the_lab(tmp_path, monkeypatch):
    fake = await FakeMessagesApi().start()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-secret")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        fake.push(
            api.tool("toolu_1", "devvm_shell", {"command": "df -h"}, text="Checking the disk."),
            api.text("The root filesystem is **100% full**; clear the journal."),
        )
        app = lab_app(tmp_path, "disk-full")
        async with app.run_test(size=(160, 48)) as pilot:
            await ready(app, pilot)
            assert app.header.claude.startswith("Claude: ready")
            await pilot.press(*"ssh is slow, what is wrong?", "enter")
            await until(
                lambda: not agent_busy(app), what="the turn", timeout_s=30, pause=pilot.pause
            )
            await drawn(app, pilot)
            markdown = " ".join(m.source for m in app.query("Markdown.assistant"))
            assert "Checking the disk." in markdown and "100% full" in markdown
            block = app.query(ToolBlock).last()
            assert "$ df -h" in block.heading and "Claude" in block.heading
            assert block.has_class("-ok")
            assert "tokens" in app.header.usage
            assert len(fake.requests) == 2
            await app.shutdown()
    finally:
        await fake.close()
    fake.assert_no_rejections()  # the strict fake refused nothing
    assert os.environ.get("ANTHROPIC_API_KEY") == "sk-ant-test-not-a-secret"  # only monkeypatched


async def test_the_between_tools_text_reaches_the_chat_as_a_dimmed_timed_thinking_block(
    tmp_path, monkeypatch
):
    """On the current models the text between tool calls comes in thinking blocks: the chat
    shows it live, dimmed, under its turn, with how long Claude has been thinking; folded once
    the turn answered in words. Model text is shown as text, never as markup."""
    fake = await FakeMessagesApi().start()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-secret")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        slow = api.tool(
            "toolu_1",
            "devvm_shell",
            {"command": "df -h"},
            text=None,
            thinking="SSH answers; the disk [bold]next[/] — df first.",
        )
        slow.frame_delay_s = 0.4
        fake.push(slow, api.text("The disk is full.", thinking="df says 100%: the disk."))
        app = lab_app(tmp_path, "disk-full")
        async with app.run_test(size=(160, 48)) as pilot:
            await ready(app, pilot)
            assert "of $20.00" in app.header.usage or app.header.usage == ""
            await pilot.press(*"what is wrong?", "enter")
            await until(
                lambda: app.query(ThinkingBlock),
                what="a thinking block",
                timeout_s=20,
                pause=pilot.pause,
            )
            live = app.query(ThinkingBlock).first()
            await until(
                lambda: "thinking…" in str(live.title),
                what="the live clock",
                timeout_s=10,
                pause=pilot.pause,
            )
            await until(
                lambda: not agent_busy(app), what="the turn", timeout_s=30, pause=pilot.pause
            )
            await drawn(app, pilot)
            first, second = app.query(ThinkingBlock)
            assert "thought for" in str(first.title) and "thought for" in str(second.title)
            shown = str(first.query_one(".thinking-text").render())
            assert "the disk [bold]next[/] — df first." in shown  # as written, not as markup
            assert not first.collapsed  # a turn of only tool calls: its thinking stays open
            assert second.collapsed  # the turn answered in words: its thinking folds
            children = list(app.chat.conversation.children)
            answer = app.query("Markdown.assistant").last()
            assert children.index(second) < children.index(answer)  # above the turn's words
            assert "tokens · $" in app.header.usage and "of $20.00" in app.header.usage
            await app.shutdown()
    finally:
        await fake.close()
    fake.assert_no_rejections()


async def test_the_api_failing_mid_turn_is_said_and_the_session_goes_on(tmp_path, monkeypatch):
    fake = await FakeMessagesApi().start()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-secret")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        fake.push(*[api.error_midstream() for _ in range(4)])
        app = lab_app(tmp_path)
        async with app.run_test(size=(160, 48)) as pilot:
            await ready(app, pilot)
            await pilot.press(*"why is the devvm slow?", "enter")
            await until(
                lambda: not agent_busy(app),
                what="the failed turn",
                timeout_s=30,
                pause=pilot.pause,
            )
            await drawn(app, pilot)
            notices = " ".join(str(n.render()) for n in app.query(".notice"))
            assert "Claude API" in notices
            await pilot.press(*"/sh uptime", "enter")
            await until(
                lambda: not agent_busy(app),
                what="a manual command",
                timeout_s=20,
                pause=pilot.pause,
            )
            assert app.query(ToolBlock).last().has_class("-ok")
            await app.shutdown()
    finally:
        await fake.close()
    fake.assert_no_rejections()  # the strict fake refused nothing


async def test_claudes_bracket_commands_run_and_a_queued_message_steers_the_next_step(
    tmp_path, monkeypatch
):
    """Issue 12: a model's `awk -F'[/]'` ended the console (MarkupError in the tool heading);
    and what the operator types while Claude works reaches Claude before its next step."""
    fake = await FakeMessagesApi().start()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-secret")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        awk = "sleep 3; awk -F'[/]' '{print $2}' /etc/fstab"
        grep = "grep -v '[/]usr' /etc/fstab"
        fake.push(
            api.tool("toolu_1", "devvm_shell", {"command": awk}, text="Reading fstab."),
            api.tool("toolu_2", "devvm_shell", {"command": grep}, text="Noted."),
            api.text("Done; I will not reboot it."),
        )
        app = lab_app(tmp_path)
        async with app.run_test(size=(160, 48)) as pilot:
            await ready(app, pilot)
            await pilot.press(*"check the mounts", "enter")
            await until(
                lambda: any("awk" in b.heading for b in app.query(ToolBlock)),
                what="Claude's first command",
                timeout_s=30,
                pause=pilot.pause,
            )
            await app.submit("do not reboot it, it runs a migration")  # as Enter does
            assert [i.text for i in app.queue.items] == ["do not reboot it, it runs a migration"]
            assert "Queued" in str(app.query_one("#queued").render())
            await until(
                lambda: not agent_busy(app), what="the turn", timeout_s=60, pause=pilot.pause
            )
            await drawn(app, pilot)
            assert app.is_running and not app.unexpected_errors
            first, second = list(app.query(ToolBlock))[-2:]
            assert f"$ {awk}" in first.heading and f"$ {grep}" in second.heading
            # Claude read the queued message after the first command's result, before its
            # next step; the chat shows it there, as a message of the operator's.
            body = fake.requests[1].body["messages"][-1]["content"]
            assert [b["type"] for b in body] == ["tool_result", "text"]
            assert "runs a migration" in body[1]["text"]
            conversation = list(app.query_one("#conversation").children)
            operator = [w for w in conversation if w.has_class("operator")]
            delivered = operator[-1]
            assert "runs a migration" in str(delivered.render())
            assert conversation.index(first) < conversation.index(delivered)
            assert conversation.index(delivered) < conversation.index(second)
            assert not app.queue
            await app.shutdown()
    finally:
        await fake.close()
    fake.assert_no_rejections()  # the strict fake refused nothing


async def test_a_stop_requested_inside_a_worker_still_waits_for_the_running_command(
    tmp_path, monkeypatch
):
    """A signal handler runs between any two bytecodes of the main thread, also in the middle of
    the agent worker's step; the stop it schedules must not inherit that worker's context (it
    did: the stop then could not wait for the worker — Textual refuses a wait from inside it —
    and closed the agent first, so the running command's cancel never reached the audit)."""
    from textual.worker import active_worker

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    app = lab_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await sleep_running(app, pilot)
        worker = next(w for w in app.workers if w.group == "agent" and not w.is_finished)
        token = active_worker.set(worker)  # as inside the worker's step, when the signal lands
        try:
            app.stopper.request("SIGTERM received", signum=15)
        finally:
            active_worker.reset(token)
        await until(app.stopper.finished.is_set, what="the orderly stop", pause=pilot.pause)
    audit = [
        json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    ]
    kinds = " ".join(f"{r['kind']}:{r.get('tool') or r.get('reason') or ''}" for r in audit)
    results = [r for r in audit if r["kind"] == "tool_result"]
    assert not any(r.get("forced") for r in audit), kinds
    assert results[-1]["tool"] == "devvm_shell" and results[-1]["cancelled"], kinds
    ended = [n for n, r in enumerate(audit) if r["kind"] == "session_end"]
    assert ended and ended[-1] > audit.index(results[-1]), kinds
