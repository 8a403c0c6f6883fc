"""Real parts for the browser tests: ``breakglass-serve --lab`` as its own process, and Debian's
Chromium driven by Playwright (never ``playwright install``).

textual.js draws the terminal on a canvas, so the tests read the screen from xterm.js itself: the
served ``textual.js`` is route-patched to keep a handle on its ``Terminal`` object
(``window.__bgterm``), whose ``buffer.active`` holds the rows as text.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.realparts import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# The minified text in textual-serve 1.1.3's textual.js where the xterm Terminal is created.
TERMINAL_NEEDLE = "this.terminal=new v.Terminal("
TERMINAL_EXPOSED = "this.terminal=window.__bgterm=new v.Terminal("
APP_MODULE = "breakglass_tui.cli"  # what every tab's app process runs (serve.server.app_command)


# -- the server process ----------------------------------------------------------------------


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/<pid>/stat): with the PID it
    names one process even if the PID is reused later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.extend(int(p) for p in (task / "children").read_text().split())
    return out


@dataclass(frozen=True)
class Proc:
    """One process, named by PID and start time (a reused PID is another process)."""

    pid: int
    started: int | None
    cmdline: str

    def alive(self) -> bool:
        """Still running (a zombie waiting to be reaped counts as gone)."""
        return proc_start_time(self.pid) == self.started and _proc_state(self.pid) not in (
            None,
            "Z",
            "X",
        )


def descendants(pid: int) -> list[Proc]:
    """Every live process below ``pid``, found by walking /proc/<pid>/task/*/children."""
    found: list[Proc] = []
    todo = _children(pid)
    while todo:
        child = todo.pop()
        proc = Proc(child, proc_start_time(child), _cmdline(child))
        if proc.started is not None:
            found.append(proc)
            todo.extend(_children(child))
    return [p for p in found if p.alive()]


@dataclass
class ServeProcess:
    """A running ``breakglass-serve --lab`` and what it wrote to stdout (JSON log lines)."""

    proc: subprocess.Popen[bytes]
    port: int
    health_port: int  # /healthz and /readyz, plain HTTP, on a port of their own
    state_root: Path  # BREAKGLASS_STATE_DIR: each --lab server keeps its records in lab/<run>/
    stdout_path: Path
    stderr_path: Path
    _closed: bool = field(default=False)
    tls: bool = False  # the console port speaks TLS and wants the ingress's client certificate

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        """Where this server's records (audit log, incident) go, as its "ready" line says."""
        [ready] = [r for r in self.log_records() if r.get("message") == "ready"]
        return Path(ready["state_dir"])

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON line the server wrote to stdout so far (log lines and forwarded audit)."""
        records = []
        for line in self.stdout_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def app_processes(self) -> list[Proc]:
        """The live app processes (one per open tab): the server's own children. Not deeper: an
        app that forks a helper shows the app's command line in the child until it execs."""
        found = []
        for child in _children(self.proc.pid):
            proc = Proc(child, proc_start_time(child), _cmdline(child))
            if proc.started is not None and f"-m {APP_MODULE}" in proc.cmdline and proc.alive():
                found.append(proc)
        return found

    def get_json(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET a JSON route of the health port (/healthz, /readyz)."""
        try:
            url = f"http://127.0.0.1:{self.health_port}{path}"
            with urllib.request.urlopen(url, timeout=3) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; SIGKILL (by this PID) only if it would not stop. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._closed = True
        return self.proc.returncode

    def diagnostics(self) -> str:
        tail = self.stdout_path.read_text(errors="replace")[-3000:]
        err = self.stderr_path.read_text(errors="replace")[-3000:]
        return f"server stdout (tail):\n{tail}\nserver stderr (tail):\n{err}"


def serve_command(port: int, health_port: int, tls: Any = None) -> list[str]:
    """``breakglass-serve --lab`` for this venv: the console script if installed, else -m. With
    ``tls`` (a ``tests.support.certs.Pki``), the console port as the chart runs it: TLS with the
    ingress's client certificate required."""
    script = Path(sys.executable).with_name("breakglass-serve")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "breakglass_tui.serve.cli"]
    scheme = "https" if tls is not None else "http"
    command = [
        *head,
        "--lab",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--health-port",
        str(health_port),
        "--public-url",
        f"{scheme}://127.0.0.1:{port}",
    ]
    if tls is not None:
        command += ["--tls-cert", str(tls.server.cert), "--tls-key", str(tls.server.key)]
        command += ["--client-ca", str(tls.client_ca)]
    return command


def start_serve(
    workdir: Path, *, env: dict[str, str] | None = None, tls: Any = None
) -> ServeProcess:
    """Start ``breakglass-serve --lab`` on a free port and wait until /readyz says ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, health_port = free_port(), free_port()
    # The developer's own settings and secrets stay out: no API key means manual mode.
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BREAKGLASS_", "VAULT_", "ANTHROPIC_")) and k != "SSH_AUTH_SOCK"
    }
    child_env["BREAKGLASS_STATE_DIR"] = str(workdir / "state")
    child_env.update(env or {})
    stdout_path, stderr_path = workdir / "serve.stdout", workdir / "serve.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            serve_command(port, health_port, tls),
            stdout=out,
            stderr=err,
            env=child_env,
            cwd=workdir,
        )
    served = ServeProcess(
        proc, port, health_port, workdir / "state", stdout_path, stderr_path, tls=tls is not None
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"breakglass-serve exited ({proc.returncode})\n{served.diagnostics()}"
            )
        with contextlib.suppress(OSError, ValueError):
            if served.get_json("/readyz")[0] == 200:
                return served
        if time.monotonic() > deadline:
            served.terminate()
            raise RuntimeError(f"breakglass-serve not ready in 30 s\n{served.diagnostics()}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_serve(workdir: Path, **kwargs: Any) -> Iterator[ServeProcess]:
    served = start_serve(workdir, **kwargs)
    try:
        yield served
    finally:
        served.terminate()


@pytest.fixture(scope="module")
def lab_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One ``breakglass-serve --lab`` shared by the tests of a module."""
    with running_serve(tmp_path_factory.mktemp("serve")) as served:
        yield served


# -- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, headless; each test opens its own context (a fresh profile)."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup.sh test does)")
    async with async_playwright() as pw:
        # Playwright gives a launched browser a fresh temporary user-data dir and removes it.
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Console:
    """A browser tab showing the breakglass console, with everything it asked the network for."""

    page: Any
    requests: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)

    async def rows(self) -> list[str]:
        """The terminal's rows as text, top to bottom."""
        return await self.page.evaluate(
            """() => {
                const t = window.__bgterm, b = t.buffer.active, out = [];
                for (let i = 0; i < t.rows; i++) {
                    const line = b.getLine(b.viewportY + i);
                    out.push(line ? line.translateToString(true) : "");
                }
                return out;
            }"""
        )

    async def text(self) -> str:
        return "\n".join(await self.rows())

    async def wait_for_text(self, needle: str, timeout_s: float = 15.0) -> str:
        """Wait until ``needle`` is on screen; return the screen. Fails with the screen shown."""
        try:
            await self.page.wait_for_function(
                """(needle) => {
                    const t = window.__bgterm;
                    if (!t) return false;
                    const b = t.buffer.active;
                    for (let i = 0; i < t.rows; i++) {
                        const line = b.getLine(b.viewportY + i);
                        if (line && line.translateToString(true).includes(needle)) return true;
                    }
                    return false;
                }""",
                arg=needle,
                timeout=timeout_s * 1000,
                polling=100,
            )
        except Exception as exc:
            screen = await self.text() if await self._has_terminal() else "<no terminal>"
            raise AssertionError(f"{needle!r} not on screen in {timeout_s} s:\n{screen}") from exc
        return await self.text()

    async def _has_terminal(self) -> bool:
        return bool(await self.page.evaluate("() => !!window.__bgterm"))

    async def wait_until_idle(self) -> str:
        """Wait for the app's opening check (/probe then /status) to finish: until then the
        console answers a new command with "Still working on the previous request"."""
        await self.wait_for_text("running → running", timeout_s=20)  # the /status verb's row
        await self.page.wait_for_timeout(300)  # the turn's worker ends just after its last event
        return await self.text()

    async def wait_for_text_gone(self, needle: str, timeout_s: float = 10.0) -> str:
        """Wait until ``needle`` is no longer on screen; return the screen."""
        deadline = time.monotonic() + timeout_s
        while needle in (screen := await self.text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} still on screen after {timeout_s} s:\n{screen}")
            await self.page.wait_for_timeout(100)
        return screen

    async def type_line(self, text: str) -> None:
        """Type into the console's input as a person would, then Enter."""
        await self.page.focus(".xterm-helper-textarea")
        await self.page.keyboard.type(text, delay=10)
        await self.page.keyboard.press("Enter")


async def expose_terminal(route: Any) -> None:
    """Serve textual.js with its xterm Terminal kept as ``window.__bgterm``."""
    response = await route.fetch()
    body = await response.text()
    if TERMINAL_NEEDLE not in body:
        raise AssertionError(
            f"textual.js no longer contains {TERMINAL_NEEDLE!r}: textual-serve changed its bundle;"
            " update TERMINAL_NEEDLE in tests/browser/conftest.py"
        )
    await route.fulfill(response=response, body=body.replace(TERMINAL_NEEDLE, TERMINAL_EXPOSED))


async def open_console(context: Any, url: str, *, wait_first_frame: bool = True) -> Console:
    """Open ``url`` in a new tab of ``context``, recording every request, websocket and console
    message; wait for the app's first frame (the status header) unless told not to."""
    page = await context.new_page()
    tab = Console(page)
    page.on("request", lambda request: tab.requests.append(request.url))
    page.on("websocket", lambda ws: tab.websockets.append(ws.url))
    page.on("console", lambda message: tab.console.append((message.type, message.text)))
    page.on("pageerror", lambda error: tab.console.append(("pageerror", str(error))))
    await page.route("**/static/js/textual.js", expose_terminal)
    await page.goto(url)
    if wait_first_frame:
        await tab.wait_for_text("devvm:", timeout_s=25)
    return tab


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    """A fresh browser context (its own cookies and storage) for one test."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield ctx
    finally:
        await ctx.close()
