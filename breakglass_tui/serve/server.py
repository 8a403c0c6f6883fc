"""breakglass-serve: textual-serve hardened for the cluster's ingress.

textual-serve on its own accepts a websocket from any ``Origin``, hands every app process the
server's whole environment, caps nothing, lists ``/static``, loads Google Fonts and buffers each
child's stderr without bound (docs/architecture.md §6), and trusts whoever reaches its port.
This subclass closes each of those holes:

- only the ingress can talk to the app: outside ``--lab`` the console port speaks TLS and requires
  a client certificate chaining to the ingress client CA (``serve.tls``), so anything else fails
  in the handshake, before a request is read or a process started;
- the proxy's identity header names the operator in the child's environment (for the audit); a
  console request without it is refused with 403 (only ``--lab`` has a fallback operator);
- ``/ws`` refuses any ``Origin`` but the public URL's (403, logged, nothing spawned);
- each app process gets an environment built from an allowlist (never a Vault variable);
- a session cap, and within it a cap per operator: a new tab of an operator at their cap evicts
  their oldest read-only tab (a follower) rather than being refused;
- ``/healthz`` and ``/readyz`` on a separate plain-HTTP port that serves no app and no page (the
  kubelet's and Prometheus's), with the self-check's ``/checks`` (JSON) and ``/metrics``
  (Prometheus) beside them; no directory listing, self-hosted fonts, a CSP and the usual
  security headers on every response of both ports, errors included (a 404 never echoes the
  request);
- a malformed frame from the browser (a resize with ``Infinity`` or a huge number) is dropped;
- a tab whose websocket dropped has its app told to quit and its output drained until it exits
  (the app stops in order, bounded: ``ui.stopping``), then killed if it will not;
- children's stderr goes line by line to the server log, bounded;
- new audit lines (the app writes them to its audit file) are forwarded to stdout as structured
  log lines for the cluster's log pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import ssl
import sys
import time
from asyncio.subprocess import Process
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web, web_server
from aiohttp.web_protocol import RequestHandler
from textual_serve.app_service import AppService
from textual_serve.server import Server

from breakglass_tui.core import selfcheck as sc
from breakglass_tui.core.ids import new_session_id
from breakglass_tui.serve.audit_forward import AuditForwarder
from breakglass_tui.serve.tls import peer_name

log = logging.getLogger("breakglass.serve")

HERE = Path(__file__).parent
UPSTREAM_STATIC = Path(__import__("textual_serve").__file__).parent / "static"

# What an app process may inherit from the server. Everything else — above all VAULT_* and the
# server's own secrets — stays out. BREAKGLASS_VAULT_* is excluded below even though it matches
# the prefix: the children never talk to Vault, the server loaded the keys once.
CHILD_ENV_ALLOW = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")
CHILD_ENV_ALLOW_PREFIXES = ("BREAKGLASS_",)
CHILD_ENV_DENY_PREFIXES = ("BREAKGLASS_VAULT_", "VAULT_")
# A config file could name Vault itself: the children get their settings as variables only. The
# console port's TLS files are the server's alone.
CHILD_ENV_DENY = (
    "BREAKGLASS_CONFIG_FILE",
    "BREAKGLASS_TLS_CERT_FILE",
    "BREAKGLASS_TLS_KEY_FILE",
    "BREAKGLASS_CLIENT_CA_FILE",
)
CHILD_ENV_PASS_SECRETS = ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")  # the app calls Claude itself

MAX_STDERR_LINE = 2000  # bytes of one stderr line kept in the server log
STDERR_CHUNK = 4096
# How long an app gets to quit when its tab closes: it cancels what runs (a devvm command is
# stopped on the devvm; a verb already started on the PVE host finishes there by design).
QUIT_GRACE_S = 8.0
OPERATOR_RE_MAX = 128
# The terminal size the browser may ask for; anything else in a resize frame drops the frame.
MAX_COLUMNS, MAX_ROWS = 1000, 500
# Textual's web driver, with the tab's end (quit, a closed pipe) turned into the app's orderly stop.
WEB_DRIVER = "breakglass_tui.ui.terminal:WebDriver"

ERROR_TEXT = {
    400: "Bad request.\n",
    403: "Forbidden.\n",
    404: "Not found.\n",
    405: "Method not allowed.\n",
    413: "Request too large.\n",
    500: "Internal error: the server log has the details.\n",
}
# The paths of the plain health port; the console port serves neither.
HEALTH_PATHS = ("/healthz", "/readyz", "/checks", "/metrics")

CSP = (
    "default-src 'none'; "
    "script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; "  # xterm.js sets inline styles on its canvas layers
    "img-src 'self' data: blob:; "
    "font-src 'self'; "
    "connect-src 'self' {ws_origin}; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


# What an error response that no route produced (a malformed request line, a header too long)
# carries: nothing may be framed, run or sniffed from it.
ERROR_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _RequestHandler(RequestHandler):  # type: ignore[misc]
    """aiohttp's protocol handler, but a request it cannot even parse gets a fixed sentence and
    the security headers (aiohttp's own answer repeats the offending request line)."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        log.warning(
            "malformed request refused",
            extra={"status": status, "error": type(exc).__name__ if exc else None},
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        response = web.Response(status=status, text=ERROR_TEXT.get(status, "Error.\n"))
        response.headers.update(ERROR_HEADERS)
        response.force_close()
        return response


def origin_of(url: str) -> str:
    """The serialised origin (scheme://host[:port]) of an absolute URL, as browsers send it."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def clean_operator(value: str | None) -> str | None:
    """The identity header's value made safe for an environment variable and a log line."""
    if not value:
        return None
    value = "".join(ch for ch in value if ch.isprintable())[:OPERATOR_RE_MAX].strip()
    return value or None


def child_environment(
    parent: Mapping[str, str], *, operator: str | None, extra: Mapping[str, str]
) -> dict[str, str]:
    """Build an app process's environment from an allowlist of the server's."""
    env: dict[str, str] = {}
    for name, value in parent.items():
        if name.startswith(CHILD_ENV_DENY_PREFIXES) or name in CHILD_ENV_DENY:
            continue
        if (
            name in CHILD_ENV_ALLOW
            or name in CHILD_ENV_PASS_SECRETS
            or name.startswith(CHILD_ENV_ALLOW_PREFIXES)
        ):
            env[name] = value
    env.update(extra)
    if operator:
        env["BREAKGLASS_OPERATOR"] = operator
    return env


@dataclass
class ServeState:
    """What /readyz reports and what every app process is given."""

    keys_loaded: bool = False
    config_ok: bool = False
    problem: str = "starting"
    child_env: dict[str, str] = field(default_factory=dict)


class BreakglassAppService(AppService):
    """One app process per websocket, with an allowlisted environment and bounded stderr."""

    def __init__(
        self,
        *args: Any,
        environment: dict[str, str],
        label: str,
        quit_grace_s: float = QUIT_GRACE_S,
        operator: str = "",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._environment = environment
        self.label = label  # also the app's session id (BREAKGLASS_SESSION_ID)
        self.quit_grace_s = quit_grace_s
        self.operator = operator
        self.started = time.monotonic()
        self.evicted = False
        self.websocket: web.WebSocketResponse | None = None
        self._peer_gone = False

    def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
        env = dict(self._environment)
        env.update(
            TEXTUAL_DRIVER=WEB_DRIVER,
            BREAKGLASS_SESSION_ID=self.label,
            TEXTUAL_FPS="60",
            TEXTUAL_COLOR_SYSTEM="truecolor",
            TERM_PROGRAM="textual",
            COLUMNS=str(width),
            ROWS=str(height),
        )
        return env

    async def _open_app_process(self, width: int = 80, height: int = 24) -> Process:
        # Its own session: when it will not quit, the whole group goes (a shell that forked the
        # app, anything the app started), not just the PID textual-serve holds; otherwise an
        # orphan keeps the pipes open and the wait for the process never ends.
        self._process = process = await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._build_environment(width=width, height=height),
            start_new_session=True,
        )
        assert process.stdin is not None
        self._stdin = process.stdin
        return process

    async def run(self) -> None:
        """Relay the app's packets to the browser; its stderr goes to the log line by line."""
        process = self._process
        assert process is not None and process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout, process.stderr

        async def relay_stderr() -> None:
            # Read in chunks, not readline(): one line over the stream limit would raise, stop
            # the draining, and let the app block on a full stderr pipe.
            pending = b""
            while True:
                chunk = await stderr.read(STDERR_CHUNK)
                if not chunk:
                    lines, pending = [pending], b""
                else:
                    *lines, pending = (pending + chunk).split(b"\n")
                    if len(pending) > MAX_STDERR_LINE:
                        lines.append(pending)
                        pending = b""
                for raw in lines:
                    text = raw[:MAX_STDERR_LINE].decode("utf-8", "replace").rstrip()
                    if text:
                        log.warning("app stderr", extra={"session": self.label, "line": text})
                if not chunk:
                    return

        stderr_task = asyncio.create_task(relay_stderr())
        try:
            for _ in range(10):  # textual's web driver announces itself first
                line = await stdout.readline()
                if not line or line == b"__GANGLION__\n":
                    break
            while True:
                kind = await stdout.readexactly(1)
                size = int.from_bytes(await stdout.readexactly(4), "big")
                payload = await stdout.readexactly(size)
                if self._peer_gone:
                    continue  # the tab is gone: keep the app's pipe drained until it exits
                try:
                    if kind == b"D":
                        await self.on_data(payload)
                    elif kind == b"M":
                        await self.on_meta(payload)
                    elif kind == b"P":
                        await self.on_packed(payload)
                except (ConnectionError, RuntimeError):
                    # The websocket closed under us. The app is told to quit (stop()); until it
                    # exits its output is read and dropped, so a write never blocks its stop.
                    self._peer_gone = True
        except (asyncio.IncompleteReadError, ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stderr_task, 2)
            stderr_task.cancel()

    async def stop(self) -> None:
        """Ask the app to quit, give it QUIT_GRACE_S, then kill it by its own PID; never raises,
        so the caller always frees the session's slot."""
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(Exception):
            await self._download_manager.cancel_app_downloads(app_service_id=self.app_service_id)
        with contextlib.suppress(Exception):
            await self.send_meta({"type": "quit"})
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), self.quit_grace_s)
            except TimeoutError:
                log.warning("app did not quit; killing it", extra={"session": self.label})
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 5)
        try:
            await asyncio.wait_for(task, 5)
        except (Exception, asyncio.CancelledError):
            task.cancel()


class BreakglassServer(Server):
    """textual-serve's Server with the holes closed. See the module docstring."""

    def __init__(
        self,
        command: str,
        *,
        host: str,
        port: int,
        public_url: str,
        identity_header: str,
        max_sessions: int,
        state_dir: Path,
        default_operator: str | None = None,
        max_sessions_per_operator: int | None = None,
        prepare: Callable[[ServeState], Any] | None = None,
        cleanup: Callable[[], Any] | None = None,
        title: str = "breakglass",
        quit_grace_s: float = QUIT_GRACE_S,
        ssl_context: ssl.SSLContext | None = None,
        health_port: int | None = None,
        selfcheck: Callable[[], sc.SelfCheck] | None = None,
        selfcheck_interval_s: float = 300.0,
        selfcheck_jitter: float = 0.1,
    ) -> None:
        """``default_operator`` names the operator of a request without the identity header:
        only ``--lab`` gives one; None (real targets) refuses such a request with 403.
        ``ssl_context`` (from ``serve.tls.server_context``) makes the console port TLS with a
        required client certificate. ``health_port`` serves /healthz and /readyz in plain HTTP
        (None: not at all, for tests that do not need them), and the self-check's /checks and
        /metrics. ``selfcheck`` builds the self-check once the keys are loaded (``prepare``); it
        then runs at once, every ``selfcheck_interval_s`` (jittered) and when a tab asks."""
        super().__init__(command, host=host, port=port, title=title, public_url=public_url)
        self.public_origin = origin_of(public_url)
        self.identity_header = identity_header
        self.ssl_context = ssl_context
        self.health_port = health_port
        self._runners: list[web.AppRunner] = []
        self.max_sessions = max_sessions
        self.max_per_operator = min(max_sessions, max_sessions_per_operator or max_sessions)
        self._background: set[asyncio.Task[None]] = set()
        self.state_dir = state_dir
        self.default_operator = default_operator
        self.state = ServeState()
        self.sessions: dict[str, BreakglassAppService] = {}
        self.templates_path = HERE / "templates"
        self.statics_path = UPSTREAM_STATIC
        self._prepare = prepare
        self._cleanup = cleanup
        self.quit_grace_s = quit_grace_s
        self._make_selfcheck = selfcheck
        self.selfcheck: sc.SelfCheck | None = None
        self.selfcheck_interval_s = selfcheck_interval_s
        self.selfcheck_jitter = selfcheck_jitter
        self.selfcheck_wake = asyncio.Event()
        self._selfcheck_task: asyncio.Task[None] | None = None
        self._selfcheck_audit: Any = None
        from breakglass_tui.serve.metrics import Metrics

        self.metrics = Metrics(lambda: len(self.sessions))
        self.forwarder = AuditForwarder(
            state_dir / "audit.jsonl", sys.stdout, on_record=self.metrics.observe_audit
        )
        ws_origin = "wss://" if public_url.startswith("https") else "ws://"
        self.csp = CSP.format(ws_origin=ws_origin + urlsplit(public_url).netloc)

    # -- logging ------------------------------------------------------------------------------
    def initialize_logging(self) -> None:
        """Structured JSON lines on stdout: the container log is the cluster's log pipeline."""
        from breakglass_tui.serve.jsonlog import JsonFormatter

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.DEBUG if self.debug else logging.INFO)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        # asyncssh logs every channel at INFO (the lab's servers run in this process).
        logging.getLogger("asyncssh").setLevel(logging.WARNING)

    # -- running --------------------------------------------------------------------------------
    def serve(self, debug: bool = False) -> None:
        """Serve until SIGTERM or SIGINT, then stop in order (the tabs' apps quit, the lab and
        the ssh-agent close). Upstream's serve() runs one plain-HTTP site; ours runs two."""
        self.debug = debug
        self.initialize_logging()
        asyncio.run(self._serve_until_stopped())

    async def _serve_until_stopped(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Open the health port first (the kubelet may ask while the keys load), then run the
        console app's startup (the keys, the lab) and open the console port."""
        if self.health_port is not None:
            health = web.AppRunner(self._make_health_app(), handle_signals=False)
            await health.setup()
            self._runners.append(health)
            await web.TCPSite(health, self.host, self.health_port).start()
        console = web.AppRunner(await self._make_app(), handle_signals=False)
        await console.setup()
        self._runners.insert(0, console)  # stopped first: its tabs quit while /healthz answers
        await web.TCPSite(console, self.host, self.port, ssl_context=self.ssl_context).start()
        log.info(
            "listening",
            extra={
                "console": f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}",
                "client_certificate": "required" if self.ssl_context else "none (lab)",
                "health": f"http://{self.host}:{self.health_port}" if self.health_port else None,
            },
        )

    async def stop(self) -> None:
        """Close the console port (its shutdown stops every tab's app), then the health port."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    # -- application --------------------------------------------------------------------------
    async def _make_app(self) -> web.Application:
        # aiohttp builds its protocol handler by this module-level name: ours answers requests
        # it cannot parse without echoing them (this process serves nothing else).
        web_server.RequestHandler = _RequestHandler  # type: ignore[misc]
        app = web.Application(middlewares=[self._errors, self._identity])
        app.on_response_prepare.append(self._security_headers)
        aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(self.templates_path))
        app.add_routes(
            [
                web.get("/", self.handle_index, name="index"),
                web.get("/ws", self.handle_websocket, name="websocket"),
                web.get("/download/{key}", self.handle_download, name="download"),
                # No directory listing: show_index stays off.
                web.static("/static", self.statics_path, show_index=False, name="static"),
                web.static("/assets", HERE / "static", show_index=False, name="assets"),
            ]
        )
        app.on_startup.append(self.on_startup)
        app.on_shutdown.append(self.on_shutdown)
        return app

    def _make_health_app(self) -> web.Application:
        """The plain-HTTP port for the kubelet and Prometheus: /healthz and /readyz, nothing
        else (no page, no websocket, no static files, no app process)."""
        app = web.Application(middlewares=[self._errors])
        app.on_response_prepare.append(self._security_headers)
        app.add_routes(
            [
                web.get("/healthz", self.handle_healthz, name="healthz"),
                web.get("/readyz", self.handle_readyz, name="readyz"),
                web.get("/checks", self.handle_checks, name="checks"),
                web.get("/metrics", self.handle_metrics, name="metrics"),
            ]
        )
        return app

    @web.middleware
    async def _identity(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every console request must name its operator by the identity header that only the
        auth proxy can set (only the ingress holds the client certificate that reaches this
        port). Without it: 403, nothing served, nothing spawned. ``--lab`` has a fallback."""
        if self._operator_of(request) is not None:
            return await handler(request)
        log.warning(
            "request refused: no identity header",
            extra={
                "path": request.path[:200],
                "header": self.identity_header,
                "client_cert": peer_name(request.transport),
            },
        )
        if request.path == "/":
            return aiohttp_jinja2.render_template(
                "no_identity.html", request, {"header": self.identity_header}, status=403
            )
        return web.Response(
            status=403,
            text=f"Forbidden: no {self.identity_header} header. This console opens only through"
            " the cluster's sign-in.\n",
        )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Error responses of our own: a fixed sentence per status, never the request echoed
        back (upstream's download 404 repeats the key it was given), never a traceback."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.Response(status=exc.status, text=ERROR_TEXT.get(exc.status, "Error.\n"))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed", extra={"path": request.path[:200]})
            return web.Response(status=500, text=ERROR_TEXT[500])

    async def _security_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """On every response, whatever produced it (a route, an error, a websocket upgrade):
        called by aiohttp just before the headers are sent."""
        headers = response.headers
        headers.setdefault("Content-Security-Policy", self.csp)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
        if (
            request.path in ("/", *HEALTH_PATHS)
            or request.path.startswith("/download")
            or response.status >= 400
        ):
            headers.setdefault("Cache-Control", "no-store")
        if self.public_url.startswith("https"):
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")

    async def on_startup(self, app: web.Application) -> None:
        log.info("breakglass-serve starting", extra={"public_url": self.public_url})
        if self._prepare is not None:
            try:
                result = self._prepare(self.state)
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:  # keep serving /healthz and say why /readyz fails
                self.state.problem = str(exc)
                log.error("not ready: %s", exc)
        self.forwarder.start()
        if self._make_selfcheck is not None:
            # Also when the keys did not load: the self-check then says which link broke.
            self.selfcheck = self._make_selfcheck()
            self._selfcheck_task = asyncio.create_task(self._run_selfcheck(), name="selfcheck")

    async def on_shutdown(self, app: web.Application) -> None:
        log.info("breakglass-serve shutting down", extra={"sessions": len(self.sessions)})
        task, self._selfcheck_task = self._selfcheck_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        if self._selfcheck_audit is not None:
            self._selfcheck_audit.close()
        await asyncio.gather(
            *(service.stop() for service in list(self.sessions.values())), return_exceptions=True
        )
        await self.forwarder.stop()  # after the apps quit: their last audit lines are forwarded
        if self._cleanup is not None:
            result = self._cleanup()
            if asyncio.iscoroutine(result):
                await result

    # -- the self-check -------------------------------------------------------------------------
    async def _run_selfcheck(self) -> None:
        assert self.selfcheck is not None
        sc.take_request(self.state_dir)  # a request left from an earlier run is stale
        await sc.run_schedule(
            self.selfcheck,
            interval_s=self.selfcheck_interval_s,
            jitter=self.selfcheck_jitter,
            on_run=self._selfcheck_ran,
            wake=self.selfcheck_wake,
            poll_request=lambda: sc.take_request(self.state_dir),
        )

    def _selfcheck_ran(self, changes: list[sc.Change]) -> None:
        """After each run: the tabs' file, the metrics, and an audit record per link whose
        state changed (not every run)."""
        assert self.selfcheck is not None
        snapshot = self.selfcheck.snapshot()
        try:
            sc.write_status(self.state_dir, snapshot)
        except OSError as exc:
            log.error("cannot write the self-check status for the tabs: %s", exc.strerror)
        self.metrics.update_links(snapshot)
        for change in changes:
            fields = sc.changed_links([change])[0]
            self._audit_selfcheck("selfcheck_link", **fields)
            level = logging.WARNING if change.after is sc.LinkStatus.BROKEN else logging.INFO
            log.log(
                level,
                "self-check: %s is %s: %s",
                change.link,
                change.after.value,
                change.message,
                extra={"link": change.link, "link_status": change.after.value},
            )

    def _audit_selfcheck(self, kind: str, **fields: Any) -> None:
        from breakglass_tui.core.audit import audit_log
        from breakglass_tui.core.scrub import Scrubber

        try:
            if self._selfcheck_audit is None:
                self._selfcheck_audit = audit_log(
                    self.state_dir,
                    Scrubber([os.environ.get("ANTHROPIC_API_KEY")]),
                    session_id="selfcheck",
                    operator="breakglass-serve",
                )
            self._selfcheck_audit.write(kind, **fields)
        except OSError as exc:
            log.error("cannot write the self-check's audit record: %s", exc.strerror)

    # -- routes ---------------------------------------------------------------------------------
    async def handle_checks(self, request: web.Request) -> web.Response:
        """Each link's status, latency and last success, as the last self-check found them."""
        if self.selfcheck is None:
            return web.json_response({"ok": None, "checked_at": None, "links": []}, status=503)
        # 200 whatever the links say: the body tells (an HTTP check of /checks reads "ok").
        return web.json_response(self.selfcheck.snapshot())

    async def handle_metrics(self, request: web.Request) -> web.Response:
        from breakglass_tui.serve.metrics import CONTENT_TYPE_LATEST

        self.forwarder.pump()  # count the audit lines written since the last poll
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "sessions": len(self.sessions)})

    async def handle_readyz(self, request: web.Request) -> web.Response:
        ready = self.state.keys_loaded and self.state.config_ok
        body = {"ready": ready, "keys_loaded": self.state.keys_loaded}
        if not ready:
            body["problem"] = self.state.problem
        return web.json_response(body, status=200 if ready else 503)

    # -- admission: the session cap, and a cap per operator within it ------------------------------
    def _operator_of(self, request: web.Request) -> str | None:
        """The operator the identity header names; without it, the lab's fallback operator, or
        None (real targets: the request is refused)."""
        return clean_operator(request.headers.get(self.identity_header)) or self.default_operator

    def _driving_session(self) -> str | None:
        """The session id of the tab that drives the open incident, if any."""
        from breakglass_tui.core.incident import IncidentStore

        try:
            incident = IncidentStore(self.state_dir).current()
            driver = incident.driver() if incident is not None else None
        except (OSError, ValueError):
            return None
        return driver.session_id if driver is not None else None

    def admission(self, operator: str) -> tuple[bool, BreakglassAppService | None, str]:
        """Whether a new tab of ``operator`` may open; the tab to evict for it (that operator's
        oldest follower) when a cap is reached; and, when refused, why (a sentence)."""
        mine = sorted(
            (s for s in self.sessions.values() if s.operator == operator and not s.evicted),
            key=lambda s: s.started,
        )
        live = [s for s in self.sessions.values() if not s.evicted]
        at_own_cap = len(mine) >= self.max_per_operator
        if not at_own_cap and len(live) < self.max_sessions:
            return True, None, ""
        driving = self._driving_session()
        # Only a tab known to follow another may be closed: while no tab has claimed the
        # incident yet (a tab that just opened has not), each may be the one about to drive.
        followers = [s for s in mine if driving is not None and s.label != driving]
        if followers:
            return True, followers[0], ""
        if at_own_cap:
            return (
                False,
                None,
                f"You have {len(mine)} tabs open (the most one operator may have), and one of them"
                " drives the incident: close another breakglass tab, or /takeover from it.",
            )
        return (
            False,
            None,
            f"All {self.max_sessions} sessions are in use: close another tab and retry.",
        )

    async def _evict(self, victim: BreakglassAppService, by: str) -> None:
        """Close an operator's oldest read-only tab for their new one (its app stops in order)."""
        victim.evicted = True
        log.info(
            "session evicted for the operator's newer tab",
            extra={"session": victim.label, "operator": victim.operator, "new_session": by},
        )
        websocket = victim.websocket
        if websocket is not None:  # its session's loop ends, and stop() tells its app to quit
            with contextlib.suppress(Exception):
                await websocket.close(
                    code=4000, message=b"closed: you opened a newer breakglass tab"
                )

    async def handle_index(self, request: web.Request) -> web.Response:
        operator = self._operator_of(request)
        assert operator is not None  # the _identity middleware refused the request otherwise
        allowed, _victim, _why = self.admission(operator)
        if not allowed:
            return aiohttp_jinja2.render_template(
                "full.html",
                request,
                {"max_sessions": self.max_sessions, "sessions": len(self.sessions)},
                status=503,
            )
        font_size = 16
        with contextlib.suppress(ValueError):
            font_size = max(8, min(32, int(request.query.get("fontsize", "16"))))
        ws_scheme = "wss" if self.public_url.startswith("https") else "ws"
        context = {
            "font_size": font_size,
            "app_websocket_url": ws_scheme + self.public_url[self.public_url.index(":") :] + "/ws",
            "static_url": self.public_url + "/static/",
            "assets_url": self.public_url + "/assets/",
            "title": self.title,
        }
        return aiohttp_jinja2.render_template("index.html", request, context)

    def origin_allowed(self, request: web.Request) -> bool:
        return request.headers.get("Origin") == self.public_origin

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if not self.origin_allowed(request):
            # A page on another site, in the operator's browser with the SSO cookie, must not
            # be able to drive the breakglass agent (cross-site WebSocket hijacking).
            log.warning(
                "websocket refused: foreign origin",
                extra={"origin": (origin or "<none>")[:200], "expected": self.public_origin},
            )
            return web.Response(status=403, text="Forbidden: this page's origin may not connect.\n")
        operator = self._operator_of(request)
        assert operator is not None  # the _identity middleware refused the request otherwise
        allowed, victim, why = self.admission(operator)
        if not allowed:
            log.warning("websocket refused: session cap", extra={"operator": operator})
            return web.Response(status=503, text=why + "\n")
        if not self.state.child_env:
            return web.Response(status=503, text=f"Not ready: {self.state.problem}\n")

        width = _clamp(request.query.get("width"), 80, 20, MAX_COLUMNS)
        height = _clamp(request.query.get("height"), 24, 5, MAX_ROWS)
        label = new_session_id()
        websocket = web.WebSocketResponse(heartbeat=15, max_msg_size=1 << 20)
        environment = child_environment(os.environ, operator=operator, extra=self.state.child_env)
        service = BreakglassAppService(
            self.command,
            write_bytes=websocket.send_bytes,
            write_str=websocket.send_str,
            close=websocket.close,
            download_manager=self.download_manager,
            environment=environment,
            label=label,
            quit_grace_s=self.quit_grace_s,
            operator=operator,
        )
        service.websocket = websocket
        # Counted against the cap before the first await: two upgrades arriving together must
        # not both pass the check above.
        self.sessions[label] = service
        if victim is not None:
            # Counted already: the old tab's slot is given up now, its app stops meanwhile.
            task = asyncio.get_running_loop().create_task(self._evict(victim, label))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        started = time.monotonic()
        try:
            await websocket.prepare(request)
            log.info(
                "session opened",
                extra={
                    "session": label,
                    "operator": operator,
                    "client_cert": peer_name(request.transport),
                },
            )
            await service.start(width, height)
            await self._process_messages(websocket, service)
        except asyncio.CancelledError:
            if websocket.prepared:
                await websocket.close()
        except Exception:
            log.exception("session failed", extra={"session": label})
        finally:
            try:
                await service.stop()
            finally:
                self.sessions.pop(label, None)
            log.info(
                "session closed",
                extra={"session": label, "seconds": round(time.monotonic() - started, 1)},
            )
        return websocket

    async def _process_messages(self, websocket: web.WebSocketResponse, app_service: Any) -> None:
        """Like upstream, but a malformed frame is dropped instead of ending the session."""
        from aiohttp import WSMsgType

        async for message in websocket:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                envelope = json.loads(message.data)
                kind, data = envelope[0], envelope[1] if len(envelope) > 1 else None
            except (ValueError, TypeError, IndexError, KeyError):
                continue
            if kind == "stdin" and isinstance(data, str):
                await app_service.send_bytes(data.encode("utf-8"))
            elif kind == "resize":
                size = resize_size(data)
                if size is not None:  # malformed (Infinity, huge, not numbers): dropped
                    await app_service.set_terminal_size(*size)
            elif kind == "ping":
                await websocket.send_json(["pong", data])
            elif kind == "blur":
                await app_service.blur()
            elif kind == "focus":
                await app_service.focus()


def _clamp(value: object, default: int, low: int, high: int) -> int:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return default
    return max(low, min(high, number))


def resize_size(data: object) -> tuple[int, int] | None:
    """The (width, height) of a resize frame, clamped to what a terminal can be; None for a
    malformed one (not a mapping, not whole numbers, not finite, absurdly large)."""
    if not isinstance(data, dict):
        return None
    size = []
    for key, low, high in (("width", 20, MAX_COLUMNS), ("height", 5, MAX_ROWS)):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not (value.is_integer() and abs(value) < 1e6):
            return None  # NaN, Infinity, 1e400, 80.5
        number = int(value)
        if not 0 < number <= 100 * high:
            return None
        size.append(max(low, min(high, number)))
    return size[0], size[1]


def app_command() -> str:
    """The shell command textual-serve runs for each tab: this Python, the breakglass-tui app,
    against the targets and the ssh-agent the server prepared (in the child's environment).

    ``exec``: textual-serve starts the command through ``/bin/sh -c`` and Debian's dash forks
    rather than exec'ing it, so without it the PID the server holds (and kills when the app will
    not quit) is the shell's, and the app itself would be orphaned, still running."""
    return "exec " + shlex.join([sys.executable, "-m", "breakglass_tui.cli"])
