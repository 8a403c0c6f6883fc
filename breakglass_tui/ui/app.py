"""The breakglass Textual app: status header, chat, live output and forensics panes.

Thin: it renders the breakglass agent's events and sends the operator's intents. Its import chain
stays free of anthropic, asyncssh and hvac so the first frame is not held up by them; a worker
builds the backend (``ui.backend``) after the first paint.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input
from textual.worker import Worker, WorkerState

from breakglass_tui.core import events as ev
from breakglass_tui.core.ids import new_session_id
from breakglass_tui.core.incident import (
    Driver,
    Incident,
    IncidentStore,
    summarize,
    unfinished_calls,
    worth_resuming,
)
from breakglass_tui.ui.backend import AppOptions, Backend, Conversation, Emit, build_backend
from breakglass_tui.ui.messages import AgentEvent, BackendReady
from breakglass_tui.ui.screens.confirm_quit import ConfirmQuitScreen
from breakglass_tui.ui.screens.help import HelpScreen
from breakglass_tui.ui.screens.resume import ResumeScreen
from breakglass_tui.ui.widgets.chat import ChatInput, ChatPane, describe_call
from breakglass_tui.ui.widgets.forensics import ForensicsPane
from breakglass_tui.ui.widgets.output_pane import OutputLog, OutputPane
from breakglass_tui.ui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    from textual.command import Provider

BackendFactory = Callable[[AppOptions, Emit], Awaitable[Backend]]

_HERE = Path(__file__).resolve().parent
AGENT_GROUP = "agent"
FOLLOW_GROUP = "follow"
OPENING_CHECK = ("/probe", "/status")  # what a driving tab runs by itself once the hosts are up
BUSY_TEXT = "Still working on the previous request: wait for it, or press Esc to cancel it."
LEASE_CHECK_S = 1.0  # how often a tab checks who drives (a taken-over driver stops within it)
INTERRUPTED = "interrupted: the tab running it closed"


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def _who(driver: Driver) -> str:
    """The driver's operator, or a stand-in while its tab does not know the name yet."""
    return driver.operator or "another tab"


def _commands() -> type[Provider]:
    """The palette's provider, imported when the palette first opens (first paint is sooner)."""
    from breakglass_tui.ui.commands import BreakglassCommands

    return BreakglassCommands


class BreakglassApp(App[None]):
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
        handle_signals: bool = False,
    ) -> None:
        super().__init__()
        self._handle_signals = handle_signals
        self.options = options or AppOptions()
        self.backend: Backend | None = None
        self._backend_factory = backend_factory
        self._initial_check = initial_check
        self._download_dir = download_dir
        self._queued: list[str] = []
        self._report: ev.ReportReady | None = None
        self._model = ""
        self._shutting_down = False
        self.session_id = new_session_id()
        self.incident: Incident | None = None
        self._store: IncidentStore | None = None
        # None until the tab knows; then True while it drives the incident, False read-only.
        self.driving: bool | None = None if self.options.incident_dir is not None else True
        self._journal_failed = False
        self._quiet_cancel = False  # the turn was cancelled by a take-over, said otherwise

    # -- layout -----------------------------------------------------------------------------

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
        if self._handle_signals:
            # A closed terminal (SIGHUP) or a stopped pod (SIGTERM) must still end the session:
            # the audit's session_end, the private ssh-agent and the lab's processes.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(signum, self.exit)
        self.query_one(ChatInput).focus()
        header = self.header
        header.targets = f"lab · scenario {self.options.scenario}" if self.options.lab else ""
        header.keys = "starting the lab…" if self.options.lab else "loading keys…"
        # After the first paint: the backend's imports and the lab's start take seconds.
        self.call_after_refresh(self._build_backend)

    # -- backend ----------------------------------------------------------------------------

    @work(group="backend", exclusive=True, exit_on_error=False, description="build backend")
    async def _build_backend(self) -> None:
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
            raise
        if self._shutting_down:
            await backend.close()
            return
        self.post_message(BackendReady(backend))

    def _emit(self, event: ev.Event) -> None:
        """The own breakglass agent's emit callback (same loop): journaled for the other tabs
        (also while the tab shuts down: a cancelled call's end belongs in the record), then
        shown."""
        if self.incident is not None:
            self._journal(self.incident, event)
        if not self._shutting_down:
            self._render(event, own=True)

    def _journal(self, incident: Incident, event: ev.Event) -> None:
        """Write one of this tab's events to the incident's journal (for the other tabs and
        any tab that resumes it)."""
        try:
            incident.append_event(event, by=self.session_id)
        except OSError as exc:
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
        backend = self.backend = message.backend
        self._model = self._model or backend.model
        header = self.header
        header.keys = backend.keys
        header.operator = backend.operator
        header.targets = backend.targets
        if self.driving and self.incident is not None:
            # The lease was claimed before the backend knew the operator's name: record it
            # (the other tabs' headers say who drives).
            await asyncio.to_thread(self.incident.claim, self.session_id, backend.operator)
        agent = self._start_agent() if self.driving else None
        manual = getattr(agent, "manual", backend.manual_reason is not None)
        if not (manual and header.claude_ok is False):  # keep a reason the agent already gave
            header.show_claude(manual=manual, model=self._model, reason=backend.manual_reason)
        if not self.driving:
            if self._queued:
                self._queued = []
                await self.chat.add_notice(self._read_only_text(), "warning")
            return
        texts = list(OPENING_CHECK) if self._initial_check else []
        texts += self._queued
        self._queued = []
        if texts:
            self._run_agent(texts)

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
        one, driven by this tab; follow the journal (replay first).

        An incident in which nothing happened beyond the opening check is not worth a question:
        the store closes it and opens a new one, which this tab drives from the same step."""
        store = self._store = await asyncio.to_thread(IncidentStore, incident_dir)
        while True:
            incident, new = await asyncio.to_thread(
                store.current_or_new, self.session_id, self._operator(), opening_check=OPENING_CHECK
            )
            driver = await asyncio.to_thread(incident.driver)
            if new:
                break
            if driver is None:
                events = await asyncio.to_thread(incident.read_events)
                resume = False
                if worth_resuming(events, OPENING_CHECK):
                    resume = await self.push_screen_wait(
                        ResumeScreen(summarize(events, incident.id))
                    )
                if not resume:
                    incident, driver = await asyncio.to_thread(
                        store.replace, incident, self.session_id, self._operator()
                    )
                    break
            driver = await asyncio.to_thread(
                store.claim, incident, self.session_id, self._operator()
            )
            if driver is not None:
                break
            # Closed meanwhile (its driver ran /close): join the next one.
        self._start_following(incident, driver)
        self.set_interval(LEASE_CHECK_S, self._check_lease, name="driver lease")

    def _start_following(self, incident: Incident, driver: Driver | None) -> None:
        """Make ``incident`` this tab's, driving or read-only as ``driver`` says; show its
        journal and follow it."""
        self.incident = incident
        self._set_driving(driver)
        self._follow(incident)

    def _set_driving(self, driver: Driver | None) -> None:
        self.driving = driver is not None and driver.session_id == self.session_id
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
        return f"read-only · {_who(driver)} drives since {_clock(driver.since)} · /takeover"

    def _read_only_text(self) -> str:
        driver = self.incident.driver() if self.incident is not None else None
        who = f"{_who(driver)} drives since {_clock(driver.since)}" if driver else "nobody drives"
        return (
            f"This tab is read-only ({who}): it follows the incident live. Type /takeover to"
            " drive from here; the other tab becomes read-only."
        )

    @work(group=FOLLOW_GROUP, exclusive=True, exit_on_error=False, description="follow incident")
    async def _follow(self, incident: Incident) -> None:
        """Replay the journal, then show what the other tabs' agents do, as it happens (this
        tab's own events are shown directly and skipped here)."""
        events, offset = await asyncio.to_thread(incident.replay, skip_by=self.session_id)
        for event in events:
            self._render(event, own=False)
        if self.driving:
            # Nobody else drives, so a call still open in the journal died with its tab (the
            # agent answers it in Claude's context too). A PVE verb finished on the host anyway.
            # Journaled, so a tab that joins later does not show it running forever.
            for call in unfinished_calls(events):
                ended = ev.ToolCallEnded(
                    call_id=call.call_id,
                    tool=call.tool,
                    ok=False,
                    summary=INTERRUPTED,
                    duration_s=0.0,
                )
                self._journal(incident, ended)
                self._render(ended, own=False)
        async for event in incident.follow(poll_s=0.1, skip_by=self.session_id, offset=offset):
            if self._shutting_down:
                return
            self._render(event, own=False)

    def _save_conversation(self, messages: Conversation) -> None:
        # A tab that lost the lease must not overwrite the new driver's context.
        if self.incident is not None and self.driving:
            self.incident.save_conversation(messages)

    def _start_agent(self):
        """Build this tab's breakglass agent: from the incident's saved conversation when there
        is one (resume, take-over)."""
        assert self.backend is not None
        incident = self.incident
        if incident is None:
            return self.backend.start_agent(self._emit, session_id=self.session_id)
        return self.backend.start_agent(
            self._emit,
            session_id=self.session_id,
            conversation=incident.load_conversation(),
            save_conversation=self._save_conversation,
            history=incident.replay()[0],
            incident_id=incident.id,
        )

    async def _check_lease(self) -> None:
        """Every second: a driver that was taken over stops; a read-only tab shows who drives,
        and goes on with the next incident when the one it follows was closed."""
        incident, store = self.incident, self._store
        if incident is None or store is None or self._shutting_down:
            return
        if not self.driving:
            current = await asyncio.to_thread(store.current)
            if current is not None and current.id != incident.id:
                await self._follow_next(incident, current)
                return
        driver = await asyncio.to_thread(incident.driver)
        if self.driving:
            if driver is None:  # our lease is gone (its file removed): hold it again
                driver = await asyncio.to_thread(
                    store.claim, incident, self.session_id, self._operator()
                )
                if driver is None:  # closed: only this tab's /close does that, which moved on
                    return
            if driver.session_id != self.session_id:
                await self._lost_lease(driver)
        else:
            self.header.show_driver(self._driver_text(driver))

    async def _follow_next(self, closed: Incident, incident: Incident) -> None:
        """The incident this read-only tab followed was closed: follow the next one (its
        closing tab drives it)."""
        driver = await asyncio.to_thread(incident.driver)
        self._start_following(incident, driver)
        await self.chat.add_notice(
            f"Incident {closed.id} was closed; this tab now follows the next one ({incident.id}),"
            " read-only.",
            "info",
        )

    async def _lost_lease(self, driver: Driver) -> None:
        """Another tab took over: stop the running turn (a PVE verb already begun finishes on
        the host), drop the agent, follow."""
        self._set_driving(driver)
        self._quiet_cancel = self._agent_running()
        self.workers.cancel_group(self, AGENT_GROUP)
        await self.chat.add_notice(
            f"{_who(driver)} took over at {_clock(driver.since)}; this tab is read-only now.",
            "warning",
        )
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
        incident, store = self.incident, self._store
        if incident is None or store is None or self.driving:
            await self.chat.add_notice("This tab already drives the incident.")
            return
        if self.backend is None:
            await self.chat.add_notice("Still starting; try /takeover again in a moment.")
            return
        before = incident.driver()
        driver = await asyncio.to_thread(
            store.claim, incident, self.session_id, self._operator(), take_over=True
        )
        if driver is None:
            # Closed meanwhile: its lease is worth nothing, and the closing tab drives the next.
            current = await asyncio.to_thread(store.current)
            if current is None:
                await self.chat.add_notice(
                    "The incident was closed: reopen the tab to start the next one.", "warning"
                )
                return
            await self._follow_next(incident, current)
            await self.chat.add_notice("Nothing was taken over: /takeover again to drive this one.")
            return
        self._set_driving(driver)
        # Others see it in their chat; the former driver also says it itself on its next check.
        self._journal(
            incident,
            ev.Notice(level="warning", text=f"{_who(driver)} took over at {_clock(driver.since)}."),
        )
        agent = self._start_agent()
        self.header.show_claude(
            manual=agent.manual, model=self._model, reason=self.backend.manual_reason
        )
        was = f" from {_who(before)}" if before is not None else ""
        await self.chat.add_notice(f"You drive now (took over{was}).", "info")

    async def _close_incident(self) -> None:
        """/close: the incident is over; this tab drives the next one at once (fresh context),
        and the read-only tabs follow it there."""
        incident, store = self.incident, self._store
        if incident is None or store is None:
            await self.chat.add_notice("No incident is kept in this session.", "warning")
            return
        operator = self._operator()
        self._journal(
            incident,
            ev.Notice(
                level="warning",
                text=f"Incident closed by {operator or 'the driving tab'} at"
                f" {_clock(time.time())}; the tab that closed it drives the next one.",
            ),
        )
        new, driver = await asyncio.to_thread(store.replace, incident, self.session_id, operator)
        await asyncio.to_thread(incident.release, self.session_id)
        self._start_following(new, driver)
        if self.backend is not None:
            await self.backend.drop_agent()
            if self.driving:
                self._start_agent()
        then = (
            "this tab drives it; Claude starts without the old context."
            if self.driving
            else f"{self._driver_text(driver)}."
        )
        await self.chat.add_notice(
            f"Incident {incident.id} closed. Next incident: {new.id}; {then}", "info"
        )

    # -- the operator's intents -------------------------------------------------------------

    async def on_input_submitted(self, message: Input.Submitted) -> None:
        if not isinstance(message.input, ChatInput):
            return
        message.input.value = ""
        await self.submit(message.value)

    async def submit(self, text: str) -> None:
        """Send an operator message or slash command to the breakglass agent."""
        text = text.strip()
        if not text:
            return
        self.query_one(ChatInput).remember(text)
        command = text.split()[0].lower()
        if command == "/help":
            self.action_help()
            return
        if self.driving is False and command != "/takeover":
            text = self._read_only_text()
            if command == "/cancel":
                text = (
                    "Nothing runs in this read-only tab: only the driving tab can cancel."
                    " /takeover stops its running turn (a PVE verb already begun finishes)."
                )
            await self.chat.add_notice(text, "warning")
            return
        if command == "/cancel":
            self.action_cancel()
            return
        if command == "/takeover":
            await self._take_over()
            return
        if self._agent_running():
            await self.chat.add_notice(BUSY_TEXT, "warning")
            return
        if command == "/close":
            await self._close_incident()
            return
        await self.chat.add_operator(text)
        if self.backend is None:
            self._queued.append(text)
            await self.chat.add_notice("Still starting; it runs as soon as the hosts are ready.")
            return
        self._run_agent([text])

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
        remote command)."""
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
        """Ctrl+Q: quit at once when idle; ask first while an action runs."""
        if self._agent_running():
            if not isinstance(self.screen, ConfirmQuitScreen):
                self.push_screen(ConfirmQuitScreen("A turn or command"), self._quit_answer)
            return
        await self.shutdown()

    def _quit_answer(self, quit_: bool | None) -> None:
        if quit_:
            # Not awaited here: the modal's dismissal must complete before the app exits.
            self.run_worker(self.shutdown(), group="shutdown", description="shutdown")

    async def shutdown(self) -> None:
        """Cancel what runs, close the backend (the lab's processes with it), exit."""
        await self._close_backend()
        self.exit()

    async def _close_backend(self) -> None:
        self._shutting_down = True
        incident = self.incident
        if incident is not None and self.driving:
            # First: a tab reopened at once (the browser's reload) may drive straight away. The
            # closing agent's last events are still journaled; its context is no longer saved.
            self.driving = False
            with contextlib.suppress(OSError):
                incident.release(self.session_id)
        self.workers.cancel_group(self, AGENT_GROUP)
        if any(isinstance(screen, ResumeScreen) for screen in self.screen_stack):
            # Nobody will answer the resume question now.
            self.workers.cancel_group(self, "backend")
        for worker in list(self.workers):
            if worker.group == "backend" and worker.state is WorkerState.RUNNING:
                # Let a half-built backend finish: it closes itself on seeing _shutting_down.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.wait(), timeout=20)
        self.workers.cancel_group(self, FOLLOW_GROUP)
        backend, self.backend = self.backend, None
        if backend is not None:
            # Bounded: a hung close must not keep the operator from quitting.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(backend.close(), timeout=15)
        self.incident = None

    async def on_unmount(self) -> None:
        """Any other way out (the browser tab closed, SIGTERM, an error): the session is still
        ended properly, the private ssh-agent and the lab's processes stopped."""
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
            save_filename=f"{bundle_id}.json",
            mime_type="application/json",
        )

    def _deliver_report(self, report: ev.ReportReady) -> None:
        self.deliver_text(
            io.StringIO(report.markdown),
            save_directory=self._download_dir,
            save_filename=report.filename,
            mime_type="text/markdown",
        )

    def on_app_delivery_complete(self, message: App.DeliveryComplete) -> None:
        self.notify(f"Saved {message.path}" if message.path else "Download sent.", timeout=5)

    def on_app_delivery_failed(self, message: App.DeliveryFailed) -> None:
        self.notify(f"Download failed: {message.exception}", severity="error")

    # -- events from the breakglass agent ---------------------------------------------------

    async def on_agent_event(self, message: AgentEvent) -> None:
        event = message.event
        chat = self.chat
        match event:
            case ev.SessionStarted():
                if message.own:  # another tab's session names its own operator
                    self.header.operator = event.operator
                self._model = event.model
                self.header.spend_limit = event.spend_limit_usd
            case ev.OperatorMessage() if not message.own:
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
            case ev.ReportReady():
                self._report = event
                if message.own:
                    self._deliver_report(event)
                else:  # downloaded in the tab that asked for it
                    await chat.add_notice(f"Incident report {event.filename} was written.")
            case _:
                pass  # an own OperatorMessage is echoed at submit; SessionEnded needs nothing

    # -- worker outcomes, in one place ------------------------------------------------------

    async def on_worker_state_changed(self, message: Worker.StateChanged) -> None:
        worker, state = message.worker, message.state
        if self._shutting_down:
            return  # the widgets are going away: nothing to update
        if worker.group == AGENT_GROUP and state in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            await self.chat.end_all_turns()
            if state is WorkerState.CANCELLED and self._quiet_cancel:
                self._quiet_cancel = False
            elif state is WorkerState.CANCELLED and not self._shutting_down:
                await self.chat.add_notice("Cancelled by the operator.", "warning")
        if state is not WorkerState.ERROR:
            return
        error = worker.error
        reason = str(error) or type(error).__name__
        if worker.group == "backend":
            self.header.keys = "not connected"
            self.header.show_claude(manual=True, model="", reason="no backend")
            await self.chat.add_notice(f"Could not start: {reason}", "error")
        elif worker.group == AGENT_GROUP:
            await self.chat.add_notice(
                f"The breakglass agent failed: {reason}. The session is still usable: try"
                " again, or use slash commands.",
                "error",
            )
        else:
            self.notify(f"{worker.description} failed: {reason}", severity="error")

    def output_log(self) -> OutputLog:
        """The live output widget (tests and the benchmark read it)."""
        return self.output.log_widget
