"""The breakglass Textual app: status header, chat, live output and forensics panes.

Thin: it renders the breakglass agent's events and sends the operator's intents. Its import chain
stays free of anthropic, asyncssh and hvac so the first frame is not held up by them; a worker
builds the backend (``ui.backend``) after the first paint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import events, work
from textual._dispatch_key import dispatch_key
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input
from textual.worker import Worker, WorkerState

from breakglass_tui.core import events as ev
from breakglass_tui.core.ids import new_session_id
from breakglass_tui.core.incident import Driver, Incident, IncidentStore
from breakglass_tui.core.steering import OperatorQueue
from breakglass_tui.core.tab import (
    Closed,
    DriverSeen,
    Following,
    LostLease,
    Refused,
    TabChange,
    TabSession,
    TookOver,
    clock,
    who,
)
from breakglass_tui.ui.backend import AppOptions, Backend, Conversation, Emit, build_backend
from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.messages import AgentEvent, BackendReady
from breakglass_tui.ui.records import UiRecord
from breakglass_tui.ui.sanitize import clean, one_line
from breakglass_tui.ui.screens import approve_verb
from breakglass_tui.ui.screens.confirm_quit import ConfirmQuitScreen
from breakglass_tui.ui.screens.help import HelpScreen
from breakglass_tui.ui.screens.link import LinkScreen
from breakglass_tui.ui.screens.resume import ResumeScreen
from breakglass_tui.ui.stopping import CLOSE_TIME_S, Stopper
from breakglass_tui.ui.widgets.chat import ChatInput, ChatPane, describe_call
from breakglass_tui.ui.widgets.forensics import ForensicsPane
from breakglass_tui.ui.widgets.output_pane import OutputLog, OutputPane
from breakglass_tui.ui.widgets.queued import QueuedView
from breakglass_tui.ui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    from textual.command import Provider
    from textual.widgets import Markdown  # imported lazily: markdown-it costs first-frame time

BackendFactory = Callable[[AppOptions, Emit], Awaitable[Backend]]

_HERE = Path(__file__).resolve().parent
AGENT_GROUP = "agent"
FOLLOW_GROUP = "follow"
OPENING_CHECK = ("/probe", "/status")  # what a driving tab runs by itself once the hosts are up
LEASE_CHECK_S = 1.0  # how often a tab checks who drives (a taken-over driver stops within it)
SELFCHECK_READ_S = 5.0  # how often a served tab reads the server's self-check results
SELFCHECK_WAIT_S = 90.0  # how long /selfcheck waits for the server's run
# More unexpected errors than this within ERROR_STORM_S: the console is broken, so it stops in
# order (recorded) rather than spin.
ERROR_STORM = 30
ERROR_STORM_S = 10.0


def _file_name(name: str) -> str:
    """A download's file name that stays one name in the download directory: outside text (a
    bundle id from the PVE host) must not climb out of it or hide in it."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "_").replace("\\", "_"))
    name = name.lstrip(".") or "download"
    return name[:120]


def _given_session_id() -> str | None:
    """The session id breakglass-serve gave this tab (it tells a tab that drives from one that
    follows by it), if well-formed."""
    given = os.environ.get("BREAKGLASS_SESSION_ID", "")
    return given if re.fullmatch(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}", given) else None


def _commands() -> type[Provider]:
    """The palette's provider, imported when the palette first opens (first paint is sooner)."""
    from breakglass_tui.ui.commands import BreakglassCommands

    return BreakglassCommands


class ConsoleScreen(Guarded, Screen[None]):
    """The default screen, guarded: an error in one of its handlers is reported, not fatal."""


class BreakglassApp(Guarded, App[None]):
    """The rescue console for a wedged devvm (warm case)."""

    TITLE = "breakglass"
    # Absolute, so a subclass defined elsewhere (the server, the benchmark) finds them too.
    CSS_PATH = [  # noqa: RUF012 - Textual's convention
        _HERE / "app.tcss",
        _HERE / "widgets" / "status_header.tcss",
        _HERE / "widgets" / "chat.tcss",
        _HERE / "widgets" / "output_pane.tcss",
        _HERE / "widgets" / "forensics.tcss",
        _HERE / "screens" / "screens.tcss",
    ]
    COMMANDS = App.COMMANDS | {_commands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]  # noqa: RUF012
    # No Ctrl+W/T/N or Tab: browsers keep them.
    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit"),
        Binding("escape", "cancel", "Cancel", id="app.cancel"),
        Binding("f1", "help", "Help", id="app.help"),
        Binding("question_mark", "help", "Help", show=False, id="app.help_question"),
        Binding("f2", "focus_pane('chat-input')", "Chat", id="app.focus_chat"),
        Binding("f3", "focus_pane('output-log')", "Output", id="app.focus_output"),
        Binding("f4", "focus_pane('verbs')", "Forensics", id="app.focus_forensics"),
    ]

    def __init__(
        self,
        options: AppOptions | None = None,
        *,
        backend_factory: BackendFactory = build_backend,
        initial_check: bool = True,
        download_dir: Path | None = None,
        stopper: Stopper | None = None,
        driver_class: Any = None,
    ) -> None:
        super().__init__(driver_class=driver_class)
        # The CLI's stopper has the signals and ends the process at the hard deadline; an app
        # run inside another program (the tests) gets one that never exits the process.
        self.stopper = stopper or Stopper(hard_exit=False)
        self.options = options or AppOptions()
        self.backend: Backend | None = None
        self._backend_factory = backend_factory
        self._initial_check = initial_check
        self._download_dir = download_dir
        # What the operator typed while the console was busy (core.steering).
        self.queue = OperatorQueue()
        self.queue.subscribe(self._show_queue)
        self._report: ev.ReportReady | None = None
        self._model = ""
        self._shutting_down = False
        self.session_id = _given_session_id() or new_session_id()
        # This tab's incident and lease (core.tab): None without an incident dir, and until
        # the store is open.
        self.tab: TabSession | None = None
        self._journal_failed = False
        self._quiet_cancel = False  # the turn was cancelled by a take-over, said otherwise
        self.record = UiRecord(self.session_id, self.options)
        self._open_calls: dict[str, ev.ToolCallStarted] = {}  # this tab's calls still running
        self._errors: deque[float] = deque(maxlen=ERROR_STORM)
        self.unexpected_errors: list[str] = []  # survived, recorded (the tests look here)
        self._unechoed: list[str] = []  # own commands the console ran by itself
        self._early_keys: list[str] = []  # typed before the message box existed
        self._stop_task: asyncio.Task[None] | None = None
        self._app_context: contextvars.Context | None = None  # set on mount (see on_mount)
        self._starting = False  # the hosts are up, the opening check not started yet
        self._closed_in_time = False
        self._unconfirmed_written = False
        self.stopper.add_last_resort(self._last_resort)

    @property
    def driving(self) -> bool | None:
        """True while this tab drives, False read-only, None until it knows."""
        if self.options.incident_dir is None:
            return not self._shutting_down
        return self.tab.driving if self.tab is not None else None

    @property
    def incident(self) -> Incident | None:
        return self.tab.incident if self.tab is not None else None

    # -- layout -----------------------------------------------------------------------------

    def get_default_screen(self) -> Screen[None]:
        return ConsoleScreen(id="_default")

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="status")
        with Horizontal(id="main"):
            yield ChatPane(id="chat")
            with Vertical(id="side"):
                yield OutputPane(id="output")
                yield ForensicsPane(id="forensics")
        yield Footer()

    @property
    def header(self) -> StatusHeader:
        return self.query_one(StatusHeader)

    @property
    def chat(self) -> ChatPane:
        return self.query_one(ChatPane)

    @property
    def output(self) -> OutputPane:
        return self.query_one(OutputPane)

    @property
    def forensics(self) -> ForensicsPane:
        return self.query_one(ForensicsPane)

    def on_mount(self) -> None:
        # A closed terminal (SIGHUP), a stopped pod (SIGTERM) or a closed tab must still end
        # the session in order, whatever runs (ui.stopping): from now on a request reaches us.
        loop = asyncio.get_running_loop()
        # The app's own context (no worker in it). A signal handler runs between any two
        # bytecodes of the main thread, also inside the agent worker's step: a stop scheduled
        # from there would inherit that worker as Textual's active worker, and could then not
        # wait for it (Textual refuses a wait from inside a worker), closing the agent before
        # the running command's cancel was recorded.
        self._app_context = contextvars.copy_context()

        def on_request() -> None:  # any thread, or a signal handler
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self.begin_stop, context=self._app_context.copy())

        self.stopper.attach(on_request)
        chat_input = self.query_one(ChatInput)
        chat_input.focus()
        if self._early_keys:  # typed before the screen was up: the operator's words, kept
            typed, self._early_keys = "".join(self._early_keys), []
            *sent, rest = typed.split("\r")
            chat_input.value = rest
            chat_input.cursor_position = len(rest)
            for text in sent:
                self.call_later(self.submit, text)
        header = self.header
        header.targets = f"lab · scenario {self.options.scenario}" if self.options.lab else ""
        header.keys = "starting the lab…" if self.options.lab else "loading keys…"
        if self._selfcheck_dir() is not None:
            # A tab of breakglass-serve: its self-check's last word, in the header.
            self._read_selfcheck()
            self.set_interval(SELFCHECK_READ_S, self._read_selfcheck, name="selfcheck")
        # After the first paint: the backend's imports and the lab's start take seconds.
        self.call_after_refresh(self._build_backend)

    # -- backend ----------------------------------------------------------------------------

    @work(group="backend", exclusive=True, exit_on_error=False, description="build backend")
    async def _build_backend(self) -> None:
        if self._shutting_down:  # stopped before the first paint: nothing to start
            return
        # The lab's start (seconds) runs while the operator answers the resume question.
        building = asyncio.ensure_future(self._backend_factory(self.options, self._emit))
        try:
            if self.options.incident_dir is not None:
                await self._open_incident(self.options.incident_dir)
            backend = await building
        except BaseException:
            building.cancel()
            with contextlib.suppress(BaseException):
                await (await building).close()
            if self._shutting_down:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._release_lease)
            raise
        if self._shutting_down:
            # The stop came while this tab was opening its incident: give back what it took.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._release_lease)
            await backend.close()
            return
        self.post_message(BackendReady(backend))

    def _emit(self, event: ev.Event) -> None:
        """The own breakglass agent's emit callback (same loop): journaled for the other tabs
        (also while the tab shuts down: a cancelled call's end belongs in the record), then
        shown."""
        if isinstance(event, ev.ToolCallStarted):
            self._open_calls[event.call_id] = event
        elif isinstance(event, ev.ToolCallEnded):
            self._open_calls.pop(event.call_id, None)
        if self.incident is not None:
            self._journal(self.incident, event)
        if not self._shutting_down:
            self._render(event, own=True)

    def _journal(self, incident: Incident, event: ev.Event) -> None:
        """Write one of this tab's events to the incident's journal (for the other tabs and
        any tab that resumes it)."""
        try:
            incident.append_event(event, by=self.session_id)
        except (OSError, ValueError) as exc:
            if not self._journal_failed:  # said once; the session goes on
                self._journal_failed = True
                self.notify(
                    f"Could not write the incident journal ({exc}): other tabs will not see"
                    " this session's events; check the state dir's space and permissions.",
                    severity="error",
                )

    def _render(self, event: ev.Event, *, own: bool) -> None:
        """Show one event. Live output goes straight into the output pane's buffer, which
        flushes on its timer; everything else is posted as a message."""
        try:
            output = self.output
        except Exception:  # not mounted (any more): nothing to show it in
            return
        if isinstance(event, ev.ToolOutput):
            output.feed(event.call_id, event.chunk.text)
            return
        if isinstance(event, ev.ToolCallStarted):
            output.begin(event.call_id, describe_call(event.tool, event.input))
        elif isinstance(event, ev.ToolCallEnded):
            output.end(event.call_id, event.summary)
        self.post_message(AgentEvent(event, own=own))

    async def on_backend_ready(self, message: BackendReady) -> None:
        # Until the opening check is started below, what the operator types queues behind it
        # (_busy): run at once, it would be cancelled by the opening check's exclusive worker,
        # or find no agent yet.
        self._starting = True
        backend = self.backend = message.backend
        if backend.state_dir is not None:
            self.record.open(backend.state_dir, backend.operator)
        self.stopper.add_last_resort(backend.kill_now)
        self._model = self._model or backend.model
        header = self.header
        header.keys = backend.keys
        header.operator = backend.operator
        header.targets = backend.targets
        try:
            if self.tab is not None:
                await self.tab.confirm_operator()
        finally:
            self._starting = False  # nothing below awaits before the opening check starts
        agent = self._start_agent() if self.driving else None
        manual = getattr(agent, "manual", backend.manual_reason is not None)
        if not (manual and header.claude_ok is False):  # keep a reason the agent already gave
            header.show_claude(manual=manual, model=self._model, reason=backend.manual_reason)
        self._show_queue()
        if not self.driving:
            await self._return_queued("This tab is read-only")
            return
        if self._initial_check:
            self._unechoed.extend(OPENING_CHECK)  # the console's own: not shown as typed
            self._run_agent(list(OPENING_CHECK))  # what was typed meanwhile runs after it
        else:
            await self._run_next_queued()

    # -- one incident, many tabs --------------------------------------------------------------

    def _operator(self) -> str:
        """This tab's operator: the backend's (``Settings.operator``) once it is up; before
        that, the settings the CLI validated, if any, else "" (the lease is renamed when the
        backend is ready)."""
        if self.backend is not None:
            return self.backend.operator
        if self.options.settings is not None:
            return self.options.settings.operator
        return ""

    async def _open_incident(self, incident_dir: Path) -> None:
        """Join the open incident (offering to resume it when nobody drives it) or open a new
        one, driven by this tab (core.tab); follow the journal (replay first)."""
        store = await asyncio.to_thread(IncidentStore, incident_dir)
        self.tab = TabSession(
            store,
            self.session_id,
            operator=self._operator,
            opening_check=OPENING_CHECK,
            ask_resume=lambda summary: self.push_screen_wait(ResumeScreen(summary)),
            journal=self._journal,
        )
        self._show_following(await self.tab.open())
        self.set_interval(LEASE_CHECK_S, self._check_lease, name="driver lease")

    def _show_following(self, following: Following) -> None:
        """Show the incident the tab follows now, driving or read-only, and follow its journal."""
        self._set_driving(following.driver)
        self._follow(following.incident)

    def _set_driving(self, driver: Driver | None) -> None:
        self.header.show_driver("" if self.driving else self._driver_text(driver))
        placeholder = (
            "Tell Claude what is wrong, or /help · → completes · ↑ history"
            if self.driving
            else "Read-only: another tab drives. /takeover to drive from here · /help"
        )
        self.query_one(ChatInput).placeholder = placeholder

    def _driver_text(self, driver: Driver | None) -> str:
        if driver is None:
            return "read-only · nobody drives now: /takeover"
        return f"read-only · {who(driver)} drives since {clock(driver.since)} · /takeover"

    def _read_only_text(self) -> str:
        driver = self.incident.driver() if self.incident is not None else None
        drives = f"{who(driver)} drives since {clock(driver.since)}" if driver else "nobody drives"
        return (
            f"This tab is read-only ({drives}): it follows the incident live. Type /takeover to"
            " drive from here; the other tab becomes read-only."
        )

    @work(group=FOLLOW_GROUP, exclusive=True, exit_on_error=False, description="follow incident")
    async def _follow(self, incident: Incident) -> None:
        """Replay the journal, then show what the other tabs' agents do, as it happens (this
        tab's own events are shown directly and skipped here)."""
        events, offset = await asyncio.to_thread(incident.replay, skip_by=self.session_id)
        for event in events:
            self._render(event, own=False)
        # A call still open in the journal died with its tab, when this tab drives (the agent
        # answers it in Claude's context too); journaled, so a later tab does not show it running.
        for ended in self.tab.interrupted(events) if self.tab is not None else []:
            self._journal(incident, ended)
            self._render(ended, own=False)
        async for event in incident.follow(poll_s=0.1, skip_by=self.session_id, offset=offset):
            if self._shutting_down:
                return
            self._render(event, own=False)

    def _save_conversation(self, messages: Conversation) -> None:
        if self.tab is not None:  # only while it drives (a taken-over tab's is not saved)
            self.tab.save_conversation(messages)

    def _start_agent(self):
        """Build this tab's breakglass agent: from the incident's saved conversation when there
        is one (resume, take-over)."""
        assert self.backend is not None
        incident = self.incident
        if incident is None:
            agent = self.backend.start_agent(self._emit, session_id=self.session_id)
        else:
            agent = self.backend.start_agent(
                self._emit,
                session_id=self.session_id,
                conversation=incident.load_conversation(),
                save_conversation=self._save_conversation,
                history=incident.replay()[0],
                incident_id=incident.id,
            )
        # Claude reads what the operator queues at its next step boundary (core.steering).
        agent.operator_queue = self.queue
        return agent

    async def _check_lease(self) -> None:
        """Every second: a driver that was taken over stops; a read-only tab shows who drives,
        and goes on with the next incident when the one it follows was closed."""
        if self.tab is None or self._shutting_down:
            return
        change = await self.tab.check()
        if change is not None:
            await self._show_change(change)

    async def _show_change(self, change: TabChange) -> None:
        """Render what changed in this tab's incident or lease (core.tab)."""
        match change:
            case Following(closed=Incident() as closed):
                self._show_following(change)
                await self.chat.add_notice(
                    f"Incident {closed.id} was closed; this tab now follows the next one"
                    f" ({change.incident.id}), read-only.",
                    "info",
                )
            case Following():
                self._show_following(change)
            case DriverSeen():
                self.header.show_driver(self._driver_text(change.driver))
            case LostLease():
                await self._lost_lease(change.driver)
            case Refused():
                await self.chat.add_notice(change.reason, change.level)
            case TookOver() | Closed():
                pass  # said by the intent that asked for it

    async def _lost_lease(self, driver: Driver) -> None:
        """Another tab took over: stop the running turn (a PVE verb already begun finishes on
        the host), drop the agent, follow."""
        self._set_driving(driver)
        self._quiet_cancel = self._agent_running()
        self.workers.cancel_group(self, AGENT_GROUP)
        await self.chat.add_notice(
            f"{who(driver)} took over at {clock(driver.since)}; this tab is read-only now.",
            "warning",
        )
        await self._return_queued("This tab is read-only now")
        if self.backend is not None:
            self.run_worker(
                self.backend.drop_agent(),
                group="drop-agent",
                exit_on_error=False,
                description="close the agent after a take-over",
            )

    async def action_takeover(self) -> None:
        """Drive the incident from this tab; the driving tab becomes read-only."""
        await self.submit("/takeover")

    async def _take_over(self) -> None:
        if self.tab is None or self.driving:
            await self.chat.add_notice("This tab already drives the incident.")
            return
        if self.backend is None:
            await self.chat.add_notice("Still starting; try /takeover again in a moment.")
            return
        change = await self.tab.take_over()
        if not isinstance(change, TookOver):
            await self._show_change(change)
            if isinstance(change, Following):
                await self.chat.add_notice(
                    "Nothing was taken over: /takeover again to drive this one."
                )
            return
        self._set_driving(change.driver)
        agent = self._start_agent()
        self.header.show_claude(
            manual=agent.manual, model=self._model, reason=self.backend.manual_reason
        )
        was = f" from {who(change.before)}" if change.before is not None else ""
        await self.chat.add_notice(f"You drive now (took over{was}).", "info")

    async def _close_incident(self) -> None:
        """/close: the incident is over; this tab drives the next one at once (fresh context),
        and the read-only tabs follow it there."""
        if self.tab is None:
            await self.chat.add_notice("No incident is kept in this session.", "warning")
            return
        change = await self.tab.close()
        if not isinstance(change, Closed):
            await self._show_change(change)
            return
        following = change.following
        self._show_following(following)
        if self.backend is not None:
            await self.backend.drop_agent()
            if self.driving:
                self._start_agent()
        then = (
            "this tab drives it; Claude starts without the old context."
            if self.driving
            else f"{self._driver_text(following.driver)}."
        )
        await self.chat.add_notice(
            f"Incident {change.closed.id} closed. Next incident: {following.incident.id}; {then}",
            "info",
        )

    # -- the operator's intents -------------------------------------------------------------

    async def _on_key(self, event: events.Key) -> None:
        # Instead of Textual's own (prevent_default: it would run the bindings again): a
        # binding, else the operator's words, else a key_* method.
        event.prevent_default()
        if await self._check_bindings(event.key):
            return
        if await self._keep_typed(event):
            return
        await dispatch_key(self, event)

    async def _keep_typed(self, event: events.Key) -> bool:
        """A key no widget took (typed while the console was coming up, or with the focus on
        a pane that does not take text) is the operator's: it goes to the message box, and
        Enter sends what is there. True when kept."""
        if isinstance(self.screen, ModalScreen):
            return False
        enter = event.key in ("enter", "ctrl+j")
        printable = bool(event.is_printable and event.character)
        if not (printable or enter):
            return False
        try:
            chat_input = self.query_one(ChatInput)
        except Exception:  # not composed yet: kept until it is
            self._early_keys.append("\r" if enter else str(event.character))
            return True
        if printable:
            chat_input.value += str(event.character)
            chat_input.cursor_position = len(chat_input.value)
            chat_input.focus()
            return True
        if chat_input.value.strip():
            text, chat_input.value = chat_input.value, ""
            chat_input.focus()
            await self.submit(text)
            return True
        return False

    async def on_input_submitted(self, message: Input.Submitted) -> None:
        if not isinstance(message.input, ChatInput):
            return
        await self.submit(message.value)  # the box emptied itself: what follows is kept

    async def submit(self, text: str) -> None:
        """Send an operator message or slash command to the breakglass agent: at once when the
        console is idle, else queued (core.steering) and delivered at the next turn boundary."""
        text = text.strip()
        if not text:
            return
        self.query_one(ChatInput).remember(text)
        command = text.split()[0].lower()
        if command == "/help":
            self.action_help()
            return
        if command == "/drop":
            await self._drop_command(text)
            return
        if command == "/selfcheck":  # read-only everywhere: any tab may ask, at any time
            self._selfcheck()
            return
        if self.driving is False and command != "/takeover":
            await self._refuse_read_only(text, command)
            return
        if command == "/cancel":
            self.action_cancel()
            return
        if command == "/takeover":
            await self._take_over()
            return
        if self._busy():
            self.queue.add(text)
            self.record.write("operator_message_queued", text=text)
            return
        await self._dispatch(text)

    # -- the self-check (breakglass-serve runs it; core.selfcheck) ------------------------------

    @staticmethod
    def _selfcheck_dir() -> Path | None:
        """The state dir breakglass-serve writes its self-check results to, in a served tab."""
        if os.environ.get("BREAKGLASS_SELFCHECK") != "serve":
            return None
        state_dir = os.environ.get("BREAKGLASS_STATE_DIR")
        return Path(state_dir) if state_dir else None

    def _read_selfcheck(self) -> dict | None:
        from breakglass_tui.core.selfcheck import read_status

        state_dir = self._selfcheck_dir()
        if state_dir is None:
            return None
        snapshot = read_status(state_dir)
        with contextlib.suppress(Exception):  # not mounted (yet, or any more)
            self.header.show_rescue_path(snapshot)
        return snapshot

    @work(group="selfcheck", exclusive=True, exit_on_error=False, description="self-check")
    async def _selfcheck(self) -> None:
        """/selfcheck: ask breakglass-serve for a run now, then show each link's line. Changes
        nothing anywhere (no verb but status, nothing written on a host)."""
        from breakglass_tui.core.selfcheck import report_lines, request_run

        state_dir = self._selfcheck_dir()
        if state_dir is None:
            await self.chat.add_notice(
                "The self-check runs in breakglass-serve. In a terminal, run"
                " `breakglass-tui --check` (or `breakglass-serve --check`): one line per link.",
                "warning",
            )
            return
        try:
            asked = request_run(state_dir)
        except OSError as exc:
            await self.chat.add_notice(
                f"Cannot ask for a self-check ({exc.strerror}): the state directory is not"
                " writable; see breakglass-serve's log.",
                "error",
            )
            return
        await self.chat.add_notice("Self-check asked: every link of the rescue path, now…")
        deadline = time.monotonic() + SELFCHECK_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            snapshot = self._read_selfcheck()
            if snapshot and (snapshot.get("checked_at") or 0) >= asked:
                text, ok = self.header.rescue, self.header.rescue_ok
                lines = "\n".join(report_lines(snapshot))
                await self.chat.add_notice(f"{text}\n{lines}", "info" if ok else "error")
                return
        await self.chat.add_notice(
            f"No self-check result within {SELFCHECK_WAIT_S:g}s: breakglass-serve's log says"
            " why; /selfcheck to ask again.",
            "warning",
        )

    async def _refuse_read_only(self, text: str, command: str) -> None:
        """A read-only tab does not queue: it says how to drive, and keeps the words."""
        notice = self._read_only_text()
        if command == "/cancel":
            notice = (
                "Nothing runs in this read-only tab: only the driving tab can cancel."
                " /takeover stops its running turn (a PVE verb already begun finishes)."
            )
        else:
            chat_input = self.query_one(ChatInput)
            if not chat_input.value:
                chat_input.value = text
                chat_input.cursor_position = len(text)
                notice += " Your message was not sent: it is back in the message box."
        await self.chat.add_notice(notice, "warning")

    def _busy(self) -> bool:
        """Something runs, or waits to: a new message queues behind it."""
        return (
            self.backend is None
            or self._starting
            or self.driving is None
            or self._agent_running()
            or bool(self.queue)
            or any(isinstance(s, ResumeScreen) for s in self.screen_stack)
        )

    async def _dispatch(self, text: str) -> None:
        """Run one message or slash command now (the console is idle)."""
        if text.split()[0].lower() == "/close":
            await self._close_incident()
            await self._run_next_queued()
            return
        self._run_agent([text])

    async def _run_next_queued(self) -> None:
        """The running turn or command ended: run what the operator queued next, if anything."""
        if self._shutting_down or not self.driving or self.backend is None or self._agent_running():
            return
        item = self.queue.next()
        if item is not None:
            await self._dispatch(item.text)

    async def _return_queued(self, why: str) -> None:
        """This tab cannot run what was queued (it is read-only): the words go back to the
        message box, never lost."""
        items = self.queue.take_all()
        if not items:
            return
        chat_input = self.query_one(ChatInput)
        texts = [item.text for item in items]
        if not chat_input.value:
            chat_input.value = " ".join(texts)
            chat_input.cursor_position = len(chat_input.value)
        for text in texts:
            chat_input.remember(text)
        await self.chat.add_notice(
            f"{why}: {len(texts)} queued message(s) were not sent and are back in the message"
            " box (↑ recalls each). /takeover to drive from here, then Enter.",
            "warning",
        )

    def _show_queue(self) -> None:
        with contextlib.suppress(Exception):  # not mounted (yet, or any more)
            self.query_one(QueuedView).show(
                self.queue.items, starting=self.backend is None or self.driving is None
            )

    def edit_last_queued(self) -> bool:
        """↑ on an empty input: the newest queued message comes back into the input."""
        item = self.queue.take_last()
        if item is None:
            return False
        self._into_input(item.text)
        return True

    def action_edit_queued(self, item_id: int) -> None:
        """✎ on a queued message: take it back into the input (Enter queues it again)."""
        chat_input = self.query_one(ChatInput)
        if chat_input.value.strip():
            self.notify("Send or clear the message box first, then edit the queued message.")
            return
        item = self.queue.take(item_id)
        if item is not None:
            self._into_input(item.text)

    def _into_input(self, text: str) -> None:
        chat_input = self.query_one(ChatInput)
        chat_input.value = text
        chat_input.cursor_position = len(text)
        chat_input.focus()

    async def action_drop_queued(self, item_id: int) -> None:
        item = self.queue.get(item_id)
        if item is not None and self.queue.drop(item_id):
            await self._dropped([item.text])

    async def _drop_command(self, text: str) -> None:
        """/drop: the newest queued message; /drop all: every one."""
        if text.split()[1:2] == ["all"]:
            items = self.queue.take_all()
        else:
            last = self.queue.items[-1:] if self.queue else ()
            items = [item for item in last if self.queue.drop(item.id)]
        if not items:
            await self.chat.add_notice("Nothing is queued.")
            return
        await self._dropped([item.text for item in items])

    async def _dropped(self, texts: list[str]) -> None:
        self.record.write("operator_message_dropped", texts=texts)
        shown = "; ".join(one_line(t, limit=80) for t in texts)
        await self.chat.add_notice(f"Dropped from the queue (↑ history still has it): {shown}")

    @work(group=AGENT_GROUP, exclusive=True, exit_on_error=False, description="agent turn")
    async def _run_agent(self, texts: list[str]) -> None:
        assert self.backend is not None
        agent = self.backend.agent
        if agent is None:  # this tab stopped driving meanwhile
            return
        for text in texts:
            await agent.handle(text)

    def _agent_running(self) -> bool:
        return any(
            w.group == AGENT_GROUP and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
            for w in self.workers
        )

    def action_cancel(self) -> None:
        """Esc: cancel the running turn or command (the agent stops the stream and the
        remote command). Queued messages stay queued and go next."""
        if self._agent_running():
            self.workers.cancel_group(self, AGENT_GROUP)
            self.notify("Cancelled.", timeout=3)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_focus_pane(self, widget_id: str) -> None:
        self.screen.set_class(widget_id == "verbs", "-show-forensics")
        self.query_one(f"#{widget_id}").focus()

    async def action_quit(self) -> None:
        """Ctrl+Q: quit at once when idle; ask first while an action runs (Ctrl+Q again, or
        the Quit button, confirms)."""
        if isinstance(self.screen, ConfirmQuitScreen):
            self.screen.dismiss(True)
            return
        if self._agent_running():
            self.push_screen(ConfirmQuitScreen("A turn or command"), self._quit_answer)
            return
        await self.shutdown()

    def _quit_answer(self, quit_: bool | None) -> None:
        if quit_:
            # Not awaited here: the modal's dismissal must complete before the app exits.
            self.run_worker(self.shutdown(), group="shutdown", description="shutdown")

    def on_markdown_link_clicked(self, message: Markdown.LinkClicked) -> None:
        """A link in Claude's answer: show the whole URL and ask before opening it."""
        message.stop()
        href = message.href

        def answered(open_: bool | None) -> None:
            if open_:
                self.record.write("link_opened", url=href)
                self.open_url(href, new_tab=True)

        self.push_screen(LinkScreen(href), answered)

    # -- stopping -----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Quit (Ctrl+Q, and the tests): the same orderly, bounded stop as a signal."""
        self.stopper.request("the operator quit")
        self.begin_stop()
        task = self._stop_task
        if task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)

    def begin_stop(self) -> None:
        """Start the orderly stop once (called on the loop by the stopper)."""
        if self._stop_task is None:
            # In the app's context, whoever asks (see on_mount).
            context = self._app_context.copy() if self._app_context is not None else None
            self._stop_task = asyncio.get_running_loop().create_task(self._stop(), context=context)

    async def _stop(self) -> None:
        stopper = self.stopper
        self.record.write(
            "stop_requested", reason=stopper.reason, signal=stopper.signal_name, phase=self._phase()
        )
        self._closed_in_time = await self._close_backend(stopper.remaining(CLOSE_TIME_S))
        if not self._closed_in_time:
            self._record_unconfirmed("the orderly stop ran out of time")
        self.exit(return_code=stopper.exit_code)
        if not stopper.hard_exit:
            stopper.done()  # inside another program: nothing more to watch (the CLI does it)

    def _phase(self) -> str:
        if self.backend is None:
            return "starting"
        if self._open_calls:
            return "running a command"
        if self._agent_running():
            return "running a turn"
        return "idle"

    def _record_unconfirmed(self, why: str) -> None:
        """The audit's last word when the stop could not finish: what may still run."""
        if self._unconfirmed_written:
            return
        self._unconfirmed_written = True
        calls = [
            {"call_id": c.call_id, "tool": c.tool, "input": c.input}
            for c in list(self._open_calls.values())
        ]
        self.record.write(
            "session_end",
            forced=True,
            reason=why,
            kill_confirmed=not calls,
            unconfirmed_calls=calls,
        )

    def _last_resort(self) -> None:
        """The watchdog's steps at the hard deadline (another thread; the loop may be stuck):
        say so in the audit, give up the lease. The backend adds its own (the lab's processes
        killed by PID)."""
        if self._closed_in_time:
            self.record.write(
                "exit_forced", reason="the console did not exit in time after closing everything"
            )
        else:
            self._record_unconfirmed("the hard deadline passed before the stop finished")
        with contextlib.suppress(Exception):
            self._release_lease()

    def _release_lease(self) -> None:
        """Give up this tab's driver lease (core.tab). Blocking: a thread."""
        if self.tab is not None:
            self.tab.release()

    async def _close_backend(self, time_s: float = CLOSE_TIME_S) -> bool:
        """Cancel what runs, release the lease, close the agent (its audit's session_end), the
        hosts and the lab, within ``time_s``; True when all of it finished in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_s

        def left() -> float:
            return max(0.05, deadline - loop.time())

        self._shutting_down = True
        # First: a tab reopened at once (the browser's reload) may drive straight away. The
        # closing agent's last events are still journaled; its context is no longer saved.
        if self.tab is not None:
            self.tab.end()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(self._release_lease), left())
        running = [w for w in self.workers if w.group == AGENT_GROUP and not w.is_finished]
        self.workers.cancel_group(self, AGENT_GROUP)
        if any(isinstance(screen, ResumeScreen) for screen in self.screen_stack):
            # Nobody will answer the resume question now.
            self.workers.cancel_group(self, "backend")
        in_time = True
        for worker in list(self.workers):
            if worker.group == "backend" and worker.state is WorkerState.RUNNING:
                # Let a half-built backend finish: it closes itself on seeing _shutting_down.
                try:
                    await asyncio.wait_for(worker.wait(), left())
                except TimeoutError:
                    in_time = False
                    worker.cancel()
                except Exception:  # noqa: S110 - its failure is reported where it happened
                    pass
        for worker in running:
            # The cancelled step ends: the remote command is stopped, its end recorded.
            try:
                await asyncio.wait_for(worker.wait(), left())
            except TimeoutError:
                in_time = False
            except Exception:  # noqa: S110 - cancelled or failed: either way it ended
                pass
        self.workers.cancel_group(self, FOLLOW_GROUP)
        # Again: a tab stopped while it was opening its incident may have claimed it meanwhile.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(self._release_lease), left())
        backend, self.backend = self.backend, None
        if backend is not None:
            # Bounded: a hung close (a wedged devvm) must not keep the console from ending.
            try:
                await asyncio.wait_for(backend.close(), left())
            except TimeoutError:
                in_time = False
        if self.tab is not None:
            self.tab.forget()
        return in_time

    async def on_unmount(self) -> None:
        """Any other way out (an error, the app told to exit): the session is still ended
        properly, the private ssh-agent and the lab's processes stopped."""
        if self._stop_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._stop_task)
            return
        await self._close_backend()

    # -- downloads --------------------------------------------------------------------------

    def action_download_bundle(self) -> None:
        bundle_id = self.forensics.latest_bundle()
        if bundle_id is None:
            self.notify("No forensics bundle in this incident yet.", severity="warning")
            return
        self._download_bundle(bundle_id)

    def on_forensics_pane_download_requested(self, message: ForensicsPane.DownloadRequested):
        self._download_bundle(message.bundle_id)

    @work(group="download", exit_on_error=False, description="download forensics bundle")
    async def _download_bundle(self, bundle_id: str) -> None:
        if self.backend is None:
            self.notify("The hosts are not connected yet.", severity="warning")
            return
        self.notify(f"Fetching bundle {bundle_id}…", timeout=3)
        bundle = await self.backend.hosts.bundle(bundle_id)
        self.deliver_text(
            io.StringIO(json.dumps(bundle, indent=2, sort_keys=True)),
            save_directory=self._download_dir,
            save_filename=_file_name(f"{bundle_id}.json"),
            mime_type="application/json",
        )

    def _deliver_report(self, report: ev.ReportReady) -> None:
        self.deliver_text(
            io.StringIO(report.markdown),
            save_directory=self._download_dir,
            save_filename=_file_name(report.filename),
            mime_type="text/markdown",
        )

    def on_app_delivery_complete(self, message: App.DeliveryComplete) -> None:
        self.notify(f"Saved {message.path}" if message.path else "Download sent.", timeout=5)

    def on_app_delivery_failed(self, message: App.DeliveryFailed) -> None:
        self.notify(f"Download failed: {message.exception}", severity="error")

    # -- events from the breakglass agent ---------------------------------------------------

    async def on_agent_event(self, message: AgentEvent) -> None:
        event = message.event
        try:
            chat = self.chat
        except Exception:  # the screen is gone (an agent's last events while the app ends)
            return
        match event:
            case ev.SessionStarted():
                if message.own:  # another tab's session names its own operator
                    self.header.operator = event.operator
                self._model = event.model
                self.header.spend_limit = event.spend_limit_usd
            case ev.OperatorMessage():
                # Own ones too: a queued message shows here when it is delivered. The opening
                # check was not typed by the operator: not shown as if it were.
                if message.own and self._unechoed and self._unechoed[0] == event.text:
                    self._unechoed.pop(0)
                else:
                    await chat.add_operator(event.text)
            case ev.AssistantTurnStarted():
                await chat.start_turn(event.turn_id)
            case ev.AssistantTextDelta():
                await chat.turn_delta(event.turn_id, event.text)
            case ev.AssistantThinkingStarted():
                await chat.thinking_start(
                    event.turn_id, started_at=event.at, redacted=event.redacted
                )
            case ev.AssistantThinkingDelta():
                chat.thinking_delta(event.turn_id, event.text)
            case ev.AssistantThinkingEnded():
                chat.thinking_end(event.turn_id, event.duration_s)
            case ev.AssistantTurnEnded():
                await chat.end_turn(event.turn_id)
                self.header.show_usage(event.total_usage)
            case ev.ModelSwitched():
                self._model = event.model
                self.header.show_claude(manual=False, model=event.model)
                await chat.add_notice(f"Now asking {event.model}: {event.reason}.", "warning")
            case ev.ToolCallStarted():
                await chat.start_tool(event)
            case ev.ToolCallEnded():
                chat.end_tool(event)
            case ev.ProbeUpdated():
                self.header.show_probe(event.result)
                self.forensics.add_probe(event.result, event.at)
            case ev.VerbCompleted():
                self.header.show_verb(event.result)
                self.forensics.add_verb(event.result, event.at)
            case ev.ModeChanged():
                self.header.show_claude(manual=event.manual, model=self._model, reason=event.reason)
                await chat.add_notice(event.reason, "warning" if event.manual else "info")
            case ev.ApiError():
                level = "warning" if event.will_retry else "error"
                await chat.add_notice(f"Claude API: {event.message}", level)
            case ev.Notice():
                await chat.add_notice(event.text, event.level)
            case ev.VerbApprovalAsked() | ev.VerbApprovalEnded() | ev.InjectionReported():
                await approve_verb.show(self, event, own=message.own)  # [issue 15]
            case ev.ReportReady():
                self._report = event
                if message.own:
                    self._deliver_report(event)
                else:  # downloaded in the tab that asked for it
                    await chat.add_notice(f"Incident report {event.filename} was written.")
            case _:
                pass  # SessionEnded needs nothing

    # -- worker outcomes, in one place ------------------------------------------------------

    async def on_worker_state_changed(self, message: Worker.StateChanged) -> None:
        worker, state = message.worker, message.state
        if self._shutting_down:
            return  # the widgets are going away: nothing to update
        ended = state in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED)
        if state is WorkerState.ERROR:
            await self._worker_failed(worker)
        if worker.group == AGENT_GROUP and ended:
            await self.chat.end_all_turns()
            if state is WorkerState.CANCELLED and self._quiet_cancel:
                self._quiet_cancel = False
            elif state is WorkerState.CANCELLED and not self._shutting_down:
                await self.chat.add_notice("Cancelled by the operator.", "warning")
            await self._run_next_queued()  # a turn boundary: what was queued goes next

    async def _worker_failed(self, worker: Worker[Any]) -> None:
        """One place for worker errors: recorded in the audit, said on screen; the session
        goes on."""
        error = worker.error
        reason = clean(str(error) or type(error).__name__, newlines=False, limit=500)
        self.record.write(
            "ui_error",
            where=f"worker {worker.description}",
            error=f"{type(error).__name__}: {error}"[:2000],
        )
        if worker.group == "backend":
            self.header.keys = "not connected"
            self.header.show_claude(manual=True, model="", reason="no backend")
            await self.chat.add_notice(f"Could not start: {reason}", "error")
            await self._return_queued("The console could not start")
        elif worker.group == AGENT_GROUP:
            await self.chat.add_notice(
                f"The breakglass agent failed: {reason}. The session is still usable: try"
                " again, or use slash commands.",
                "error",
            )
        else:
            self.notify(f"{worker.description} failed: {reason}", severity="error")

    # -- unexpected errors: recorded, shown, survived -------------------------------------------

    def report_error(self, error: BaseException, where: str) -> bool:
        """An unexpected exception in a handler (ui.guard) or anywhere Textual would end the app
        for it: record it in the audit, show it, go on. False when the app is not running (then
        Textual's own handling applies)."""
        if not self.is_running or self._exit:
            return False
        now = time.monotonic()
        self._errors.append(now)
        summary = f"{type(error).__name__}: {error}"
        self.unexpected_errors.append(f"{where}: {summary}")
        self.record.write("ui_error", where=where, error=summary[:2000])
        if len(self._errors) == self._errors.maxlen and now - self._errors[0] < ERROR_STORM_S:
            self.stopper.request("the console kept failing (see ui_error in the audit)")
            return True
        text = (
            f"Something went wrong in the console ({where}: {summary}). It was recorded in the"
            " audit log; the session goes on. If a pane stopped updating, reopen the console:"
            " the incident resumes."
        )
        with contextlib.suppress(Exception):
            self.call_later(self._error_notice, text)
        return True

    async def _error_notice(self, text: str) -> None:
        with contextlib.suppress(Exception):
            await self.chat.add_notice(text, "error")

    def _handle_exception(self, error: Exception) -> None:
        # Textual's last stop for an exception (a stock widget's handler, a timer): survived
        # like ours while the console runs; otherwise Textual ends the app (without locals).
        if not self.report_error(error, "the console"):
            super()._handle_exception(error)

    def _fatal_error(self) -> None:
        """Textual's crash report, without local variables (they could hold a secret, and
        under breakglass-serve stderr goes to the server's log)."""
        import rich
        from rich.segment import Segments
        from rich.traceback import Traceback

        self.bell()
        traceback = Traceback(show_locals=False, width=None, suppress=[rich])
        self._exit_renderables.append(
            Segments(self.console.render(traceback, self.console.options))
        )
        self._close_messages_no_wait()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: Any = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every toast is literal text: its message may hold outside text (an error, a path)."""
        super().notify(
            clean(str(message), limit=2000),
            title=clean(str(title), newlines=False, limit=200),
            severity=severity,
            timeout=timeout,
            markup=False,
        )

    def output_log(self) -> OutputLog:
        """The live output widget (tests and the benchmark read it)."""
        return self.output.log_widget
