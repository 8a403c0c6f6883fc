"""breakglass-serve's hardening, against the real textual-serve machinery and a real Textual app
process per websocket (a tiny one that records the environment it was given)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from breakglass_tui.serve.audit_forward import AuditForwarder
from breakglass_tui.serve.server import BreakglassServer, ServeState, child_environment, origin_of
from tests.support.realparts import free_port
from tests.support.waiting import until, written_json

ENVAPP = Path(__file__).with_name("envapp.py")


class Served:
    def __init__(self, server: BreakglassServer, port: int, health_port: int, out: Path):
        self.server, self.port, self.out = server, port, out
        self.base = f"http://127.0.0.1:{port}"
        self.health = f"http://127.0.0.1:{health_port}"

    async def close(self) -> None:
        await self.server.stop()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?width=80&height=24"


async def serve(
    tmp_path: Path,
    *,
    max_sessions: int = 2,
    ready: bool = True,
    command: str | None = None,
    quit_grace_s: float = 8.0,
    max_per_operator: int | None = None,
) -> Served:
    port, health_port = free_port(), free_port()
    out = tmp_path / "env.json"

    async def prepare(state: ServeState) -> None:
        if not ready:
            raise RuntimeError("Vault refused the login for role breakglass (403)")
        state.child_env = {
            "BREAKGLASS_DEVVM_HOST": "192.0.2.10",
            "BREAKGLASS_TEST_ENVAPP_OUT": str(out),
        }
        state.keys_loaded = state.config_ok = True

    server = BreakglassServer(
        command or shlex.join([sys.executable, str(ENVAPP)]),
        host="127.0.0.1",
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        identity_header="X-authentik-username",
        max_sessions=max_sessions,
        max_sessions_per_operator=max_per_operator,
        state_dir=tmp_path,
        default_operator="local-operator",
        prepare=prepare,
        quit_grace_s=quit_grace_s,
        health_port=health_port,
    )
    await server.start()
    return Served(server, port, health_port, out)


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    # Secrets the server process holds must never reach an app process.
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-for-children")
    monkeypatch.setenv("BREAKGLASS_VAULT_ADDR", "http://127.0.0.1:8200")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unrelated-server-secret")
    s = await serve(tmp_path)
    try:
        yield s
    finally:
        await s.close()


def test_origin_of_matches_what_browsers_send() -> None:
    assert origin_of("https://breakglass.example.org") == "https://breakglass.example.org"
    assert origin_of("https://breakglass.example.org:443/") == "https://breakglass.example.org"
    assert origin_of("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert origin_of("http://[::1]:8080") == "http://[::1]:8080"


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://127.0.0.1:1", "null", None, "http://127.0.0.1.evil.example"],
)
async def test_foreign_origin_is_refused_and_spawns_nothing(served: Served, origin) -> None:
    headers = {"Origin": origin} if origin else {}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(served.ws_url, headers=headers)
    assert err.value.status == 403
    await asyncio.sleep(0.3)  # must not happen within it: a session or an app started anyway
    assert served.server.sessions == {}
    assert not served.out.exists(), "an app process was started for a foreign origin"


async def test_right_origin_spawns_app_with_allowlisted_environment(served: Served) -> None:
    headers = {"Origin": served.base, "X-authentik-username": "viktor"}
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(served.ws_url, headers=headers)
        try:
            doc = await until(
                lambda: written_json(served.out), what="the app's report", timeout_s=15.0
            )
        finally:
            await ws.close()
    names = doc["names"]
    assert not [n for n in names if n.startswith(("VAULT_", "BREAKGLASS_VAULT_"))]
    assert "AWS_SECRET_ACCESS_KEY" not in names
    assert doc["values"]["BREAKGLASS_OPERATOR"] == "viktor"
    assert doc["values"]["BREAKGLASS_DEVVM_HOST"] == "192.0.2.10"
    await until(lambda: served.server.sessions == {}, timeout_s=15.0)


async def test_the_lab_operator_is_used_without_identity_header(served: Served) -> None:
    """The lab (``default_operator`` given) has a fallback operator; real targets refuse such a
    request (tests/serve/test_ingress_only.py)."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(served.ws_url, headers={"Origin": served.base})
        try:
            doc = await until(
                lambda: written_json(served.out), what="the app's report", timeout_s=15.0
            )
        finally:
            await ws.close()
    assert doc["values"]["BREAKGLASS_OPERATOR"] == "local-operator"


async def test_closing_the_tab_ends_the_app_process(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(served.ws_url, headers={"Origin": served.base})
        pid = (
            await until(lambda: written_json(served.out), what="the app's report", timeout_s=15.0)
        )["pid"]
        await ws.close()
    await until(lambda: served.server.sessions == {}, timeout_s=15.0)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie awaiting its reap counts as gone.
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

    await until(gone, timeout_s=10)


async def test_session_cap_holds_for_other_operators(tmp_path: Path) -> None:
    s = await serve(tmp_path, max_sessions=1)
    try:
        async with aiohttp.ClientSession() as http:
            viktor = {"Origin": s.base, "X-authentik-username": "viktor"}
            alice = {"Origin": s.base, "X-authentik-username": "alice"}
            first = await http.ws_connect(s.ws_url, headers=viktor)
            await until(lambda: len(s.server.sessions) == 1, timeout_s=15.0)
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(s.ws_url, headers=alice)
            assert err.value.status == 503
            async with http.get(s.base + "/", headers=alice) as page:
                assert page.status == 503
                assert "All 1 sessions are in use" in await page.text()
            await first.close()
            await until(lambda: s.server.sessions == {}, timeout_s=15.0)
            async with http.get(s.base + "/", headers=alice) as page:
                assert page.status == 200
    finally:
        await s.close()


def drive(state_dir: Path, session_id: str) -> None:
    """Make ``session_id`` the driver of a new open incident (as its tab would)."""
    from breakglass_tui.core.incident import IncidentStore

    store = IncidentStore(state_dir)
    store.current_or_new(session_id, "viktor")


async def test_a_new_tab_of_an_operator_at_their_cap_evicts_their_oldest_follower(
    tmp_path: Path,
) -> None:
    s = await serve(tmp_path, max_sessions=3, max_per_operator=2)
    try:
        async with aiohttp.ClientSession() as http:
            viktor = {"Origin": s.base, "X-authentik-username": "viktor"}
            alice = {"Origin": s.base, "X-authentik-username": "alice"}
            first = await http.ws_connect(s.ws_url, headers=viktor)
            await until(lambda: len(s.server.sessions) == 1, timeout_s=15.0)
            first_id = next(iter(s.server.sessions))
            drive(tmp_path, first_id)  # the first tab drives the incident
            second = await http.ws_connect(s.ws_url, headers=viktor)
            await until(lambda: len(s.server.sessions) == 2, timeout_s=15.0)
            second_id = next(k for k in s.server.sessions if k != first_id)
            # At viktor's cap: his third tab evicts his oldest *follower* (the second), never
            # the tab that drives; alice is not affected.
            third = await http.ws_connect(s.ws_url, headers=viktor)
            await until(lambda: second_id not in s.server.sessions, timeout_s=15)
            assert first_id in s.server.sessions
            msg = await second.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert second.closed or second.close_code is not None
            other = await http.ws_connect(s.ws_url, headers=alice)
            await until(lambda: len([v for v in s.server.sessions.values()]) == 3, timeout_s=15.0)
            # Only the driving tab left besides the newest: with no follower to close, the
            # operator is told why instead (and the driving tab is never closed).
            s.server.max_per_operator = 1
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(s.ws_url, headers={"Origin": s.base})
            assert err.value.status == 503
            for ws in (first, third, other):
                await ws.close()
            await until(lambda: s.server.sessions == {}, timeout_s=15)
    finally:
        await s.close()


async def test_no_tab_is_evicted_while_none_drives_yet(tmp_path: Path) -> None:
    """A tab that has opened but not yet claimed the incident (its app still starting) may be
    about to drive it: an operator's new tab at their cap is refused, never closing it."""
    s = await serve(tmp_path, max_sessions=1)
    try:
        async with aiohttp.ClientSession() as http:
            viktor = {"Origin": s.base, "X-authentik-username": "viktor"}
            first = await http.ws_connect(s.ws_url, headers=viktor)
            await until(lambda: len(s.server.sessions) == 1, timeout_s=15.0)
            first_id = next(iter(s.server.sessions))
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(s.ws_url, headers=viktor)
            assert err.value.status == 503
            async with http.get(s.base + "/", headers=viktor) as page:
                assert page.status == 503
            assert list(s.server.sessions) == [first_id]
            assert not first.closed
            await first.close()
            await until(lambda: s.server.sessions == {}, timeout_s=15)
    finally:
        await s.close()


async def test_a_malformed_resize_frame_is_dropped_and_the_session_goes_on(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(served.ws_url, headers={"Origin": served.base})
        try:
            await until(served.out.exists, timeout_s=15.0)
            for frame in (
                '["resize", {"width": Infinity, "height": 24}]',
                '["resize", {"width": 1e400, "height": -Infinity}]',
                '["resize", {"width": NaN, "height": 40}]',
                '["resize", {"width": 99999999999999999999999, "height": 40}]',
                '["resize", {"width": "80", "height": true}]',
                '["resize", [80, 24]]',
                '["resize"]',
                "[]",
                "not json",
            ):
                await ws.send_str(frame)
            await ws.send_str('["ping", "still-alive"]')
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type == aiohttp.WSMsgType.TEXT and "still-alive" in msg.data:
                    break
                assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
            assert len(served.server.sessions) == 1
        finally:
            await ws.close()


def test_resize_frames_are_checked() -> None:
    from breakglass_tui.serve.server import resize_size

    assert resize_size({"width": 120, "height": 40}) == (120, 40)
    assert resize_size({"width": 120.0, "height": 4}) == (120, 5)
    assert resize_size({"width": 5000, "height": 40}) == (1000, 40)
    for bad in (
        {"width": float("inf"), "height": 40},
        {"width": float("nan"), "height": 40},
        {"width": 10**30, "height": 40},
        {"width": 80.5, "height": 40},
        {"width": True, "height": 40},
        {"width": 0, "height": 40},
        {"width": "80", "height": 40},
        [80, 24],
        None,
    ):
        assert resize_size(bad) is None, bad


async def test_health_and_readiness_are_on_their_own_port(tmp_path: Path) -> None:
    ready = await serve(tmp_path / "a")
    not_ready = await serve(tmp_path / "b", ready=False)
    try:
        async with aiohttp.ClientSession() as http:
            for s in (ready, not_ready):
                async with http.get(s.health + "/healthz") as r:
                    assert r.status == 200
                    assert (await r.json())["status"] == "alive"
                # The console port does not answer them, and the health port serves no app,
                # no page, no static file and no websocket.
                for path in ("/healthz", "/readyz"):
                    async with http.get(s.base + path) as r:
                        assert r.status == 404, path
                for path in ("/", "/ws", "/static/js/textual.js", "/assets/breakglass.css"):
                    async with http.get(s.health + path, headers={"Origin": s.base}) as r:
                        assert r.status == 404, path
                        assert len(await r.text()) < 50
            async with http.get(ready.health + "/readyz") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            async with http.get(not_ready.health + "/readyz") as r:
                body = await r.json()
                assert r.status == 503
                assert "Vault refused the login" in body["problem"]
            # Not ready: a websocket spawns nothing and says why.
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(not_ready.ws_url, headers={"Origin": not_ready.base})
            assert err.value.status == 503
    finally:
        await ready.close()
        await not_ready.close()


async def test_page_is_self_contained_and_headers_are_hardened(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(served.base + "/") as page:
            html = await page.text()
            headers = page.headers
        assert page.status == 200
        assert "googleapis" not in html and "gstatic" not in html
        assert "<script>" not in html, "inline script would need 'unsafe-inline'"
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert f"ws://127.0.0.1:{served.port}" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        async with http.get(served.base + "/static/") as listing:
            assert listing.status in (403, 404)
        async with http.get(served.base + "/static/fonts/") as listing:
            assert listing.status in (403, 404)
        async with http.get(served.base + "/static/js/textual.js") as js:
            assert js.status == 200
        async with http.get(served.base + "/assets/breakglass.css") as css:
            assert "RobotoMono" in await css.text()


async def test_every_response_has_the_headers_and_no_error_echoes_the_request(
    served: Served,
) -> None:
    probe = "<script>alert(1)</script>"
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("GET", "/no-such-page-" + probe),
            ("GET", "/download/" + probe),  # upstream's 404 repeats the key it was given
            ("GET", "/static/../../etc/passwd"),
            ("GET", "/static/"),
            ("POST", "/"),
            ("GET", "/ws"),  # no Origin: 403
        ):
            async with http.request(method, served.base + path) as r:
                body = await r.text()
                assert r.status >= 400, (method, path, r.status)
                assert "script" not in body and "passwd" not in body and "no-such" not in body
                assert len(body) < 200, body
                headers = r.headers
                assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
                assert headers["X-Content-Type-Options"] == "nosniff", path
                assert headers["X-Frame-Options"] == "DENY", path
                assert headers["Cache-Control"] == "no-store", path
        async with http.get(served.health + "/healthz") as r:
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Cache-Control"] == "no-store"
        async with http.get(served.health + "/no-such-" + probe) as r:
            assert r.status == 404 and "script" not in await r.text()
            assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_request_that_cannot_be_parsed_is_refused_without_echo(served: Served) -> None:
    for raw in (
        b"GET /\x00<script>alert(1)</script> HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: <script>" + b"a" * 20000 + b"\r\n\r\n",
        b"<script> / HTTP/1.1\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        try:
            writer.write(raw)
            await writer.drain()
            answer = (await asyncio.wait_for(reader.read(65536), 10)).decode("latin-1")
        finally:
            writer.close()
        head, _, body = answer.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.") and " 400 " in head.splitlines()[0], head
        assert "script" not in body and "aaaa" not in body, body
        assert "X-Frame-Options: DENY" in head and "nosniff" in head
        assert "frame-ancestors 'none'" in head


def test_child_environment_is_an_allowlist() -> None:
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/app",
        "VAULT_TOKEN": "s.x",
        "VAULT_ADDR": "http://v",
        "BREAKGLASS_VAULT_ROLE": "breakglass",
        "BREAKGLASS_MODEL": "m",
        "ANTHROPIC_API_KEY": "k",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "SSH_AUTH_SOCK": "/tmp/other-agent",
        "BREAKGLASS_CONFIG_FILE": "/etc/breakglass/with-vault.env",
    }
    parent["BREAKGLASS_TLS_KEY_FILE"] = "/run/breakglass-tls/tls.key"
    parent["BREAKGLASS_CLIENT_CA_FILE"] = "/run/breakglass-client-ca/ca.crt"
    env = child_environment(parent, operator="viktor", extra={"SSH_AUTH_SOCK": "/run/agent.sock"})
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/app",
        "BREAKGLASS_MODEL": "m",
        "ANTHROPIC_API_KEY": "k",
        "SSH_AUTH_SOCK": "/run/agent.sock",
        "BREAKGLASS_OPERATOR": "viktor",
    }


async def test_audit_forwarder_forwards_only_new_complete_lines(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"event": "old"}\n')
    out = io.StringIO()
    fwd = AuditForwarder(audit, out, poll_s=3600)  # its own polls stay out of the way
    fwd.start()  # from the end of the file as it is now
    with audit.open("a") as f:
        f.write('{"event": "tool_call", "session": "s1"}\n{"event": "par')
    assert fwd.pump() == 1
    with audit.open("a") as f:
        f.write('tial"}\n')
    assert fwd.pump() == 1
    await fwd.stop()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["record"]["event"] for line in lines] == ["tool_call", "partial"]
    assert all(line["log"] == "audit" for line in lines)


async def test_an_app_that_ignores_quit_is_killed_and_its_slot_freed(tmp_path: Path) -> None:
    # Blocked event loop, or an app that never speaks the protocol: the slot must come back.
    pidfile = tmp_path / "stuck.pid"
    s = await serve(
        tmp_path,
        max_sessions=1,
        command=f"echo $$ > {pidfile}; exec sleep 60",
        quit_grace_s=0.5,
    )
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(s.ws_url, headers={"Origin": s.base})
            pid = int(
                await until(
                    lambda: (
                        pidfile.exists()
                        and pidfile.read_text().strip().isdigit()
                        and pidfile.read_text()
                    ),
                    what="the app's pid file",
                    timeout_s=15.0,
                )
            )
            await ws.close()
            await until(lambda: s.server.sessions == {}, timeout_s=10)
            assert not Path(f"/proc/{pid}").exists() or (
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
            )
            second = await http.ws_connect(s.ws_url, headers={"Origin": s.base})
            await second.close()
    finally:
        await s.close()


async def test_a_huge_stderr_line_neither_blocks_the_app_nor_leaks_the_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "noisy.py"
    script.write_text(
        "import sys, time\n"
        "sys.stderr.write('x' * 200000 + '\\n'); sys.stderr.flush()\n"
        "for i in range(200): sys.stderr.write('line %d\\n' % i)\n"
        "sys.stderr.flush(); open(sys.argv[1], 'w').write('done'); time.sleep(60)\n"
    )
    done = tmp_path / "done"
    s = await serve(
        tmp_path,
        max_sessions=1,
        command=shlex.join([sys.executable, str(script), str(done)]),
        quit_grace_s=0.5,
    )
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(s.ws_url, headers={"Origin": s.base})
            await until(
                done.exists, timeout_s=15.0
            )  # it got past 200 kB of stderr: the pipe was drained
            await until(
                lambda: any(
                    getattr(r, "line", "") == "line 199"
                    for r in caplog.records
                    if r.getMessage() == "app stderr"
                ),
                what="the app's last stderr line relayed to the log",
            )
            await ws.close()
            await until(lambda: s.server.sessions == {}, timeout_s=10)
    finally:
        await s.close()
    relayed = [r for r in caplog.records if r.getMessage() == "app stderr"]
    assert any(getattr(r, "line", "") == "line 199" for r in relayed)
    assert all(len(getattr(r, "line", "")) <= 2000 for r in relayed)
