"""Text is data everywhere: what comes from a host, the model, the operator, the PVE host or an
exception is shown literally and never ends the console.

First the reproductions of issue 12 (each ended the console with MarkupError before the fix):
`/sh grep -c '[/]' /etc/fstab` in the driving tab, in a follower, and on resume; output that
imitates markup; `[@click=app.quit]` in a heading; the forensics table and error notices. Then
hypothesis pushes hostile strings (markup, `[/]`, Textual actions, Rich tags, nested and
unterminated escape sequences, OSC 8 and 52, BiDi overrides, NUL, lone surrogates, undecodable
bytes, very long lines) through every entry point with the Pilot, including following and resuming
an incident whose journal holds them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textual.widgets import DataTable

from breakglass_tui.core import events as ev
from breakglass_tui.core.incident import IncidentStore
from breakglass_tui.hosts.types import OutputChunk, ProbeResult, Reachability
from breakglass_tui.ui.app import BreakglassApp
from breakglass_tui.ui.backend import AppOptions
from breakglass_tui.ui.sanitize import clean, one_line
from breakglass_tui.ui.screens.link import LinkScreen
from breakglass_tui.ui.screens.resume import ResumeScreen
from breakglass_tui.ui.widgets.chat import ChatInput, ToolBlock
from tests.support.waiting import until
from tests.ui.conftest import make_app, settle
from tests.ui.fakes import T0, ScriptedAgent, fake_backend_factory, verb
from tests.ui.hostile import has_control, hostile_text, rendered, squeeze

pytestmark = pytest.mark.timeout(240)

GREP = "grep -c '[/]' /etc/fstab"
EXAMPLES = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def tab(incident_dir: Path, agents: list[ScriptedAgent], operator: str = "viktor") -> BreakglassApp:
    return BreakglassApp(
        AppOptions(lab=True, incident_dir=incident_dir),
        backend_factory=fake_backend_factory(
            agents=agents, lazy=True, operator=operator, state_dir=incident_dir
        ),
        initial_check=False,
    )


def heading_shows(block: ToolBlock, command: str) -> None:
    """The block's heading holds the command literally, on screen too."""
    expected = one_line(command, limit=500)
    assert expected in block.heading
    assert str(block.title).startswith(("⚠ " + expected, "$ ", expected)), block.title
    shown = rendered(block.query_one("CollapsibleTitle"))
    assert not has_control(shown)
    assert squeeze(expected)[:40] in squeeze(shown), (expected, shown)


# -- the reproductions ---------------------------------------------------------------------------


async def test_a_command_with_markup_brackets_runs_in_the_driving_tab(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        agents[0].script["/sh " + GREP] = lambda: agents[0].shell(GREP, "3\n")
        await pilot.press(*("/sh " + GREP), "enter")
        await settle(app, pilot)
        assert app.is_running and not app.unexpected_errors
        heading_shows(app.query_one(ToolBlock), "$ " + GREP)
        assert app.output_log().lines[0].startswith("── $ " + GREP)


async def test_markup_in_output_summary_and_claudes_heading_is_shown_not_obeyed(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        emit = agents[0].emit
        command = "echo '[@click=app.quit]click me[/]' && awk -F'[/]' '{print $2}' /etc/fstab"
        emit(
            ev.ToolCallStarted(
                at=T0,
                call_id="c1",
                tool="devvm_shell",
                input={"command": command},
                mutating=False,
                manual=False,
            )
        )
        emit(ev.ToolOutput(at=T0, call_id="c1", chunk=OutputChunk("stdout", "[b]x[/b] [/]\n")))
        emit(
            ev.ToolCallEnded(
                at=T0,
                call_id="c1",
                tool="devvm_shell",
                ok=False,
                summary="exit 1 [red]boom[/red] [/]",
                duration_s=0.1,
                exit_status=1,
            )
        )
        await settle(app, pilot)
        block = app.query_one(ToolBlock)
        heading_shows(block, "$ " + command)
        assert "[red]boom[/red] [/]" in block.heading
        assert "[b]x[/b] [/]" in app.output_log().lines
        # The heading's fake action is text: clicking it toggles the block, nothing else.
        await pilot.click(ToolBlock, offset=(8, 0))
        await settle(app, pilot)
        assert app.is_running and not app.unexpected_errors


async def test_a_follower_and_a_resumed_tab_show_the_command_literally(tmp_path, monkeypatch):
    agents_1: list[ScriptedAgent] = []
    monkeypatch.setenv("BREAKGLASS_OPERATOR", "viktor")
    first = tab(tmp_path, agents_1)
    async with first.run_test(size=(160, 48)) as pilot_1:
        await until(
            lambda: first.backend is not None and agents_1, what="tab 1", pause=pilot_1.pause
        )
        follower = tab(tmp_path, [], "alice")
        async with follower.run_test(size=(160, 48)) as pilot_2:
            await until(
                lambda: follower.backend is not None, what="the follower", pause=pilot_2.pause
            )
            assert follower.driving is False
            driver = agents_1[0]
            driver.script["/sh " + GREP] = lambda: driver.shell(GREP, "[b]3[/b]\n")
            await pilot_1.press(*("/sh " + GREP), "enter")
            await until(
                lambda: (
                    follower.query(ToolBlock) and follower.query(ToolBlock).last().has_class("-ok")
                ),
                what="the whole call in tab 2",
                timeout_s=10,
                pause=pilot_2.pause,
            )
            await pilot_2.pause()  # drawn: a markup error would surface here
            assert follower.is_running and not follower.unexpected_errors
            heading_shows(follower.query(ToolBlock).last(), "$ " + GREP)
            await follower.shutdown()
        await first.shutdown()
    # All tabs closed: a reopened one offers to resume, and replays the block.
    resumed = tab(tmp_path, [])
    async with resumed.run_test(size=(160, 48)) as pilot:
        await until(
            lambda: (
                isinstance(resumed.screen, ResumeScreen) and resumed.screen.query("#resume-text")
            ),
            what="the offer",
            timeout_s=10,
            pause=pilot.pause,
        )
        await pilot.pause()  # drawn
        offer = rendered(resumed.screen.query_one("#resume-text"))
        assert "Resume the incident" in offer and not has_control(offer)
        await pilot.press("enter")
        await until(
            lambda: resumed.query(ToolBlock),
            what="the replayed block",
            timeout_s=10,
            pause=pilot.pause,
        )
        await pilot.pause()  # drawn: a markup error would surface here
        assert resumed.is_running and not resumed.unexpected_errors
        heading_shows(resumed.query(ToolBlock).last(), "$ " + GREP)
        resumed.output.flush()
        assert "[b]3[/b]" in resumed.output_log().lines
        await resumed.shutdown()


async def test_forensics_rows_and_error_notices_take_markup_literally(agents):
    app = make_app(agents, initial_check=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        emit = agents[0].emit
        result = verb(
            "reset",
            "paused [/]",
            "[@click=app.quit]running",
            bundle_id="20261128T151300Z-reset-[/]",
            message="qm said [b]no[/b] [/]",
            document={"probes": [{"name": "[/]qmp", "status": "[red]"}, "not a dict"]},
        )
        emit(ev.VerbCompleted(at=T0, result=result))
        emit(ev.ApiError(at=T0, kind="overloaded", message="[/] overloaded [b]", will_retry=False))
        emit(ev.Notice(at=T0, level="error", text="[@click=app.quit]boom[/]"))
        await settle(app, pilot)
        assert app.is_running and not app.unexpected_errors
        table = app.forensics.query_one(DataTable)
        cells = [str(c) for c in table.get_row_at(0)]
        assert cells[2] == "paused [/] → [@click=app.quit]running"
        assert cells[3] == "20261128T151300Z-reset-[/]"
        details = rendered(app.forensics.query_one("#probes"))
        assert "qm said [b]no[/b] [/]" in details and "[/]qmp" in details
        notices = [str(n.render()) for n in app.query(".notice")]
        assert "Claude API: [/] overloaded [b]" in notices
        assert "[@click=app.quit]boom[/]" in notices
        app.notify("toast [/] [@click=app.quit]x[/]", title="[b]t[/b]")
        await settle(app, pilot)
        assert app.is_running and not app.unexpected_errors


def shows_link(app, url: str) -> bool:
    """The link question is up and shows ``url`` (its widgets are mounted a moment after it)."""
    if not isinstance(app.screen, LinkScreen):
        return False
    shown = app.screen.query("#link-url")
    return bool(shown) and url in rendered(shown.first())


async def test_claudes_markdown_renders_but_its_links_ask_first(agents, monkeypatch):
    app = make_app(agents, initial_check=False)
    opened: list[str] = []
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(app, pilot)
        monkeypatch.setattr(app, "open_url", lambda url, new_tab=True: opened.append(url))
        emit = agents[0].emit
        emit(ev.AssistantTurnStarted(at=T0, turn_id="t1"))
        text = (
            "Run `awk -F'[/]'` then **[b]x[/b]** and [@click=app.quit]quit[/] — see "
            "[the docs](https://example.org/docs) or [this](javascript:alert(1))."
        )
        emit(ev.AssistantTextDelta(at=T0, turn_id="t1", text=text))
        emit(
            ev.AssistantTurnEnded(
                at=T0,
                turn_id="t1",
                stop_reason="end_turn",
                usage=ev.Usage(),
                total_usage=ev.Usage(),
            )
        )
        await settle(app, pilot)
        markdown = app.query_one("Markdown.assistant")
        shown = "\n".join(rendered(w) for w in markdown.query("*"))
        assert "[@click=app.quit]quit[/]" in shown and "[b]x[/b]" in shown
        block = markdown.query("MarkdownParagraph").first()
        await block.action_link("javascript:alert(1)")
        await until(
            lambda: shows_link(app, "javascript:alert(1)"),
            what="the question, showing the address",
            timeout_s=5,
            pause=pilot.pause,
        )
        assert not app.screen.query("#open"), "a javascript: link cannot be opened"
        await pilot.press("enter")  # Cancel
        await block.action_link("https://example.org/docs")
        await until(
            lambda: shows_link(app, "https://example.org/docs"),
            what="the question, showing the address",
            timeout_s=5,
            pause=pilot.pause,
        )
        assert opened == []
        await pilot.press("left", "enter")  # Open, after reading the address
        await settle(app, pilot)
        assert opened == ["https://example.org/docs"]


def test_the_escape_sanitiser_runs_to_a_fixpoint():
    # Removing the inner OSC joins "\x1b" and "]8;;..." into a new OSC 8 hyperlink.
    nested = "a\x1b\x1b]0;x\x07]8;;https://evil.example\x07link\x1b]8;;\x07b"
    assert clean(nested) == "alinkb"
    from breakglass_tui.ui.sanitize import sanitize_line

    line = sanitize_line(nested + "\x1b[31mred")
    assert line.plain == "alinkbred"
    assert not any(getattr(s.style, "link", None) for s in line.spans)


# -- the properties ------------------------------------------------------------------------------


async def _every_entry_point(texts: list[str], tmp_path: Path) -> None:
    """One app; each text through every way outside text reaches the screen."""
    agents: list[ScriptedAgent] = []
    app = BreakglassApp(
        AppOptions(lab=True),
        backend_factory=fake_backend_factory(agents=agents, state_dir=tmp_path),
        initial_check=False,
        download_dir=tmp_path,
    )
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        emit = agents[0].emit
        for n, text in enumerate(texts):
            call = f"c{n}"
            emit(ev.SessionStarted(at=T0, session_id="s", operator=text, lab=True, model="m"))
            emit(ev.OperatorMessage(at=T0, text=text))
            emit(
                ev.ToolCallStarted(
                    at=T0,
                    call_id=call,
                    tool="devvm_shell",
                    input={"command": text},
                    mutating=False,
                    manual=False,
                )
            )
            emit(ev.ToolOutput(at=T0, call_id=call, chunk=OutputChunk("stdout", text + "\n")))
            emit(
                ev.ToolCallEnded(
                    at=T0,
                    call_id=call,
                    tool="devvm_shell",
                    ok=False,
                    summary=text,
                    duration_s=0.1,
                    exit_status=1,
                )
            )
            emit(ev.ProbeUpdated(at=T0, result=ProbeResult(Reachability.REFUSED, 0.1, text)))
            result = verb("status", text, text, message=text, bundle_id=text, refused=text[:20])
            emit(ev.VerbCompleted(at=T0, result=result))
            emit(ev.ApiError(at=T0, kind="stream_error", message=text, will_retry=True))
            emit(ev.ModeChanged(at=T0, manual=True, reason=text))
            emit(ev.Notice(at=T0, level="error", text=text))
            emit(ev.AssistantTurnStarted(at=T0, turn_id=call))
            emit(ev.AssistantTextDelta(at=T0, turn_id=call, text=text))
            emit(
                ev.AssistantTurnEnded(
                    at=T0,
                    turn_id=call,
                    stop_reason="end_turn",
                    usage=ev.Usage(),
                    total_usage=ev.Usage(),
                )
            )
            app.notify(text, title=text)
            app.header.targets = text
            await app.submit(text if not text.startswith("/") else "x" + text)
            await settle(app, pilot)
        await settle(app, pilot)
        assert app.is_running, "the console ended"
        assert not app.unexpected_errors, app.unexpected_errors
        blocks = [b for b in app.query(ToolBlock) if b.call.call_id.startswith("c")]
        for text, block in zip(texts, blocks, strict=False):
            heading_shows(block, "$ " + text)
        operators = [str(w.render()) for w in app.query(".operator")]
        shown_notices = [str(w.render()) for w in app.query(".notice")]
        table = app.forensics.query_one(DataTable)
        for n, text in enumerate(texts):
            assert clean(text) in operators
            assert clean(text) in shown_notices  # the Notice
            assert clean("Claude API: " + text) in shown_notices  # the ApiError
            cells = [str(c) for c in table.get_row_at(table.row_count - len(texts) + n)]
            state = text or "?"  # an empty state is shown as unknown
            assert cells[2] == clean(f"{state} → {state}", newlines=False)
        for widget in (app.header, app.forensics.query_one("#probes"), table):
            assert not has_control(rendered(widget))
        for line in app.output_log().lines:
            assert not has_control(line)
        screen = app.export_screenshot()
        for marker in ("\x1b]", "cm0gLXJmIC8K", "\ud800"):
            assert marker not in screen


@EXAMPLES
@given(texts=st.lists(hostile_text(), min_size=3, max_size=3))
def test_hostile_text_through_every_entry_point_is_shown_literally(texts, tmp_path):
    asyncio.run(_every_entry_point(texts, tmp_path))


def journaled(text: str) -> str:
    """What the journal gives back: its JSON codec joins a high and a low surrogate that meet
    into one character, and a lone surrogate is never valid UTF-8 (written as ?)."""
    return json.loads(json.dumps(text)).encode("utf-8", "replace").decode("utf-8")


async def _follow_and_resume(texts: list[str], incident_dir: Path) -> None:
    store = IncidentStore(incident_dir)
    incident = store.open_new()
    for n, text in enumerate(texts):
        for event in (
            ev.SessionStarted(session_id="old", operator=text, lab=True, model="m"),
            ev.OperatorMessage(text=text),
            ev.ToolCallStarted(
                call_id=f"j{n}",
                tool="devvm_shell",
                input={"command": text},
                mutating=False,
                manual=True,
            ),
            ev.ToolOutput(call_id=f"j{n}", chunk=OutputChunk("stdout", text)),
            ev.ToolCallEnded(
                call_id=f"j{n}", tool="devvm_shell", ok=True, summary=text, duration_s=0.1
            ),
            ev.VerbCompleted(result=verb("forensics", text, text, message=text)),
            ev.Notice(level="warning", text=text),
            ev.ReportReady(filename=text, markdown=text),
        ):
            incident.append_event(event, by="old-tab")
    # Someone drives (this process, another session): a new tab follows, read-only.
    incident.claim("driver-elsewhere", texts[0])
    follower = tab(incident_dir, [])
    async with follower.run_test(size=(120, 40)) as pilot:
        await until(
            lambda: len(follower.query(ToolBlock)) == len(texts),
            what="replay",
            timeout_s=15,
            pause=pilot.pause,
        )
        await pilot.pause()  # drawn: a markup error would surface here
        assert follower.driving is False
        assert follower.is_running and not follower.unexpected_errors
        for text, block in zip(texts, follower.query(ToolBlock), strict=True):
            heading_shows(block, "$ " + journaled(text))
        assert not has_control(rendered(follower.header))
        await follower.shutdown()
    incident.release("driver-elsewhere")
    # Nobody drives: a new tab offers to resume it (the summary holds hostile text) and does.
    resumed = tab(incident_dir, [])
    async with resumed.run_test(size=(120, 40)) as pilot:
        await until(
            lambda: (
                isinstance(resumed.screen, ResumeScreen) and resumed.screen.query("#resume-text")
            ),
            what="the offer",
            timeout_s=15,
            pause=pilot.pause,
        )
        await pilot.pause()  # drawn
        assert not has_control(rendered(resumed.screen.query_one("#resume-text")))
        await pilot.press("enter")
        await until(
            lambda: len(resumed.query(ToolBlock)) == len(texts),
            what="replay",
            timeout_s=15,
            pause=pilot.pause,
        )
        await pilot.pause()  # drawn: a markup error would surface here
        assert resumed.is_running and not resumed.unexpected_errors
        for text, block in zip(texts, resumed.query(ToolBlock), strict=True):
            heading_shows(block, "$ " + journaled(text))
        await resumed.shutdown()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(texts=st.lists(hostile_text(max_long=5000), min_size=2, max_size=2))
def test_following_and_resuming_a_hostile_journal(texts, tmp_path_factory):
    asyncio.run(_follow_and_resume(texts, tmp_path_factory.mktemp("incident")))


@EXAMPLES
@given(text=hostile_text(max_long=2000))
def test_typed_and_pasted_hostile_text_reaches_the_agent_verbatim(text, tmp_path):
    async def scenario() -> None:
        agents: list[ScriptedAgent] = []
        app = make_app(agents, initial_check=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(app, pilot)
            chat_input = app.query_one(ChatInput)
            chat_input.focus()
            word = text.replace("\n", " ").strip() or "x"
            word = "x" + word if word.startswith("/") else word
            chat_input.insert_text_at_cursor(word)
            await pilot.press("enter")
            await settle(app, pilot)
            assert app.is_running and not app.unexpected_errors
            assert agents[0].handled[-1] == word.strip()
            assert clean(word.strip()) in [str(w.render()) for w in app.query(".operator")]

    asyncio.run(scenario())
