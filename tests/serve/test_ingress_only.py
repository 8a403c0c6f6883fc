"""Only the ingress can talk to the app: outside ``--lab`` the console port is TLS and requires a
client certificate from the ingress client CA; a connection without one (or with one from any
other CA, or in plain HTTP) is refused in the handshake, before a request is read or an app
process started. A console request without the identity header is refused with 403. Health and
readiness stay on their own plain port.

Certificates are made for each test module with ``cryptography`` (tests/support/certs.py), as an
operator makes them (docs/install.md, step 6); clients are aiohttp and raw ``ssl`` sockets, as the
ingress controller connects."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from breakglass_tui.serve.server import BreakglassServer, ServeState
from breakglass_tui.serve.tls import TlsConfigError, TlsFiles, check_files, server_context
from tests.support.certs import SERVER_NAME, Pki, make_pki
from tests.support.realparts import free_port
from tests.support.waiting import until, written_json

ENVAPP = Path(__file__).with_name("envapp.py")
HEADER = "X-authentik-username"
# What a refused TLS connection may raise in a client (the handshake alert arrives at connect
# with TLS 1.2, or at the first read with TLS 1.3).
REFUSED = (aiohttp.ClientConnectionError, ssl.SSLError, ConnectionError)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Console:
    """breakglass-serve as outside --lab: TLS with a required client certificate, no fallback
    operator, health on its own plain port. The app is envapp (it records its environment)."""

    def __init__(self, server: BreakglassServer, port: int, health_port: int, out: Path) -> None:
        self.server, self.port, self.health_port, self.out = server, port, health_port, out
        self.url = f"https://127.0.0.1:{port}"

    @property
    def started_apps(self) -> bool:
        return self.out.exists()


@pytest.fixture
async def console(pki: Pki, tmp_path: Path) -> AsyncIterator[Console]:
    port, health_port = free_port(), free_port()
    out = tmp_path / "env.json"

    async def prepare(state: ServeState) -> None:
        state.child_env = {"BREAKGLASS_TEST_ENVAPP_OUT": str(out)}
        state.keys_loaded = state.config_ok = True

    server = BreakglassServer(
        shlex.join([sys.executable, str(ENVAPP)]),
        host="127.0.0.1",
        port=port,
        public_url=f"https://127.0.0.1:{port}",
        identity_header=HEADER,
        max_sessions=2,
        state_dir=tmp_path,
        default_operator=None,  # real targets: no fallback operator
        prepare=prepare,
        ssl_context=server_context(TlsFiles(pki.server.cert, pki.server.key, pki.client_ca)),
        health_port=health_port,
    )
    await server.start()
    try:
        yield Console(server, port, health_port, out)
    finally:
        await server.stop()


async def handshake(console: Console, context: ssl.SSLContext) -> bytes | BaseException:
    """Connect with ``context`` as the ingress would, send a request with the identity header;
    return the server's answer, or the error the refusal raised. (With TLS 1.2 the refusal comes
    in the handshake itself; with TLS 1.3 the client learns of it at its first read, as an alert
    or the connection closed with nothing sent.)"""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", console.port, ssl=context, server_hostname=SERVER_NAME
            ),
            10,
        )
    except REFUSED as exc:
        return exc
    try:
        request = f"GET / HTTP/1.1\r\nHost: x\r\n{HEADER}: viktor\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    except REFUSED as exc:
        return exc
    finally:
        writer.close()


def refused(answer: bytes | BaseException) -> bool:
    """The connection ended without one byte of HTTP from the server."""
    return isinstance(answer, BaseException) or answer == b""


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
async def test_a_connection_without_the_ingress_certificate_is_refused_in_the_handshake(
    console: Console, pki: Pki, tls: str
) -> None:
    context = pki.client_context(None)
    context.maximum_version = ssl.TLSVersion.TLSv1_3 if tls == "1.3" else ssl.TLSVersion.TLSv1_2
    answer = await handshake(console, context)
    assert refused(answer), answer
    assert console.server.sessions == {} and not console.started_apps


async def test_a_certificate_from_another_ca_is_refused_in_the_handshake(
    console: Console, pki: Pki
) -> None:
    answer = await handshake(console, pki.client_context(pki.stranger))
    assert refused(answer), answer
    async with aiohttp.ClientSession() as http:
        with pytest.raises(REFUSED):
            await http.ws_connect(
                console.url + "/ws",
                ssl=pki.client_context(pki.stranger),
                server_hostname=SERVER_NAME,
                headers={"Origin": console.url, HEADER: "viktor"},
            )
    await asyncio.sleep(0.3)  # must not happen within it: a session or an app started anyway
    assert console.server.sessions == {} and not console.started_apps


async def test_plain_http_to_the_console_port_gets_no_http_answer(console: Console) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{HEADER}: viktor\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
    assert not answer.startswith(b"HTTP/"), answer[:200]
    assert not console.started_apps


async def test_the_ingress_certificate_is_served_and_names_the_operator(
    console: Console, pki: Pki
) -> None:
    answer = await handshake(console, pki.client_context(pki.ingress))
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200"), answer
    assert f"wss://127.0.0.1:{console.port}/ws".encode() in answer
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            console.url + "/ws?width=80&height=24",
            ssl=pki.client_context(pki.ingress),
            server_hostname=SERVER_NAME,
            headers={"Origin": console.url, HEADER: "viktor"},
        )
        try:
            doc = await until(
                lambda: console.started_apps and written_json(console.out),
                what="the app's report",
                timeout_s=15.0,
            )
        finally:
            await ws.close()
    assert doc["values"]["BREAKGLASS_OPERATOR"] == "viktor"
    # The console port's TLS files are the server's alone.
    assert not [n for n in doc["names"] if n.startswith(("BREAKGLASS_TLS_", "BREAKGLASS_CLIENT"))]
    await until(lambda: console.server.sessions == {}, timeout_s=15.0)


async def test_without_the_identity_header_every_console_request_is_refused_with_403(
    console: Console, pki: Pki
) -> None:
    """Even through the ingress: no header, no console, no fallback operator, nothing started."""
    context = pki.client_context(pki.ingress)
    async with aiohttp.ClientSession() as http:
        async with http.get(console.url + "/", ssl=context, server_hostname=SERVER_NAME) as page:
            text = await page.text()
            assert page.status == 403
            assert "Not signed in" in text and HEADER in text
            assert page.headers["Cache-Control"] == "no-store"
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        for path in ("/static/js/textual.js", "/assets/breakglass.css", "/download/x"):
            async with http.get(console.url + path, ssl=context, server_hostname=SERVER_NAME) as r:
                assert r.status == 403, path
        # An empty header is no identity either.
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(
                console.url + "/ws",
                ssl=context,
                server_hostname=SERVER_NAME,
                headers={"Origin": console.url, HEADER: " "},
            )
        assert err.value.status == 403
    await asyncio.sleep(0.3)  # must not happen within it: a session or an app started anyway
    assert console.server.sessions == {} and not console.started_apps


async def test_health_and_readiness_answer_in_plain_http_without_a_certificate(
    console: Console,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{console.health_port}/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(f"http://127.0.0.1:{console.health_port}/") as r:
            assert r.status == 404


# -- the files ------------------------------------------------------------------------------------


def test_a_client_ca_file_holding_a_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "ca-with-key.pem"
    bundle.write_bytes(pki.client_ca.read_bytes() + pki.client_ca_key.read_bytes())
    with pytest.raises(TlsConfigError) as err:
        server_context(TlsFiles(pki.server.cert, pki.server.key, bundle))
    text = str(err.value)
    assert "BREAKGLASS_CLIENT_CA_FILE" in text and "holds a private key" in text
    assert "PRIVATE" not in text.replace("private key", "")  # nothing of the file echoed


def test_a_client_certificate_given_as_the_ca_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="not a CA"):
        server_context(TlsFiles(pki.server.cert, pki.server.key, pki.ingress.cert))


def test_a_key_that_does_not_match_the_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="BREAKGLASS_TLS_KEY_FILE"):
        server_context(TlsFiles(pki.server.cert, pki.ingress.key, pki.client_ca))


def test_a_missing_file_is_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"BREAKGLASS_TLS_CERT_FILE names .* does not exist"):
        server_context(TlsFiles(tmp_path / "nope.crt", pki.server.key, pki.client_ca))


def test_a_server_certificate_about_to_expire_is_reported(tmp_path: Path) -> None:
    soon = make_pki(tmp_path / "soon", server_days=3)
    summary = check_files(TlsFiles(soon.server.cert, soon.server.key, soon.client_ca))
    assert len(summary.warnings) == 1 and "expires on" in summary.warnings[0]


# -- the real command ----------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BREAKGLASS_", "VAULT_", "ANTHROPIC_")) and k != "SSH_AUTH_SOCK"
    }
    env.update(extra)
    return env


def serve_cli() -> list[str]:
    return [sys.executable, "-m", "breakglass_tui.serve.cli"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "BREAKGLASS_TLS_CERT_FILE, BREAKGLASS_TLS_KEY_FILE and BREAKGLASS_CLIENT_CA_FILE"),
        (["--tls-cert", "/x.crt"], "BREAKGLASS_TLS_KEY_FILE, BREAKGLASS_CLIENT_CA_FILE not set"),
        (["--health-port", "8443"], "BREAKGLASS_HEALTH_PORT and BREAKGLASS_SERVE_PORT"),
    ],
)
def test_outside_the_lab_the_command_refuses_to_serve_without_tls(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [*serve_cli(), "--public-url", "https://breakglass.example.org", "--port", "8443", *args],
        env=clean_env(BREAKGLASS_STATE_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr


def test_outside_the_lab_the_public_url_must_be_https(pki: Pki, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *serve_cli(),
            *("--public-url", "http://breakglass.example.org"),
            *("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)),
            *("--client-ca", str(pki.client_ca)),
        ],
        env=clean_env(BREAKGLASS_STATE_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "must be https://" in result.stderr


@pytest.fixture
def real_serve(pki: Pki, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """``breakglass-serve`` outside --lab, as the chart runs it (TLS files, no Vault reachable:
    it serves, and /readyz says why it is not ready)."""
    port, health_port = free_port(), free_port()
    env = clean_env(
        BREAKGLASS_STATE_DIR=str(tmp_path / "state"),
        BREAKGLASS_SERVE_HOST="127.0.0.1",
        BREAKGLASS_SERVE_PORT=str(port),
        BREAKGLASS_HEALTH_PORT=str(health_port),
        BREAKGLASS_PUBLIC_URL=f"https://127.0.0.1:{port}",
        BREAKGLASS_TLS_CERT_FILE=str(pki.server.cert),
        BREAKGLASS_TLS_KEY_FILE=str(pki.server.key),
        BREAKGLASS_CLIENT_CA_FILE=str(pki.client_ca),
        BREAKGLASS_DEVVM_HOST="192.0.2.10",
        BREAKGLASS_PVE_HOST="192.0.2.2",
    )
    proc = subprocess.Popen(
        serve_cli(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            import urllib.request

            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    _out, err = proc.communicate(timeout=10)
                    raise AssertionError(
                        f"breakglass-serve did not start:\n{err.decode()}"
                    ) from None
                time.sleep(0.1)
        # The console port opens after the (failing) key load: wait for it too.
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("the console port never opened") from None
                time.sleep(0.1)
        yield proc, port, health_port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_the_real_command_outside_the_lab_admits_only_the_ingress(
    real_serve: tuple[subprocess.Popen[bytes], int, int], pki: Pki
) -> None:
    proc, port, health_port = real_serve
    url = f"https://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        # Without the ingress's certificate: no TLS connection at all.
        for client in (None, pki.stranger):
            with pytest.raises(REFUSED):
                async with http.get(
                    url + "/",
                    ssl=pki.client_context(client),
                    server_hostname=SERVER_NAME,
                    headers={HEADER: "viktor"},
                ):
                    pass
        ingress = pki.client_context(pki.ingress)
        # Through the ingress without the identity header: 403, no fallback operator.
        async with http.get(url + "/", ssl=ingress, server_hostname=SERVER_NAME) as page:
            assert page.status == 403 and "Not signed in" in await page.text()
        # Through the ingress with it: the page.
        async with http.get(
            url + "/", ssl=ingress, server_hostname=SERVER_NAME, headers={HEADER: "viktor"}
        ) as page:
            assert page.status == 200 and f"wss://127.0.0.1:{port}/ws" in await page.text()
        # Readiness, in plain HTTP on its own port, says why it is not ready (no keys here).
        async with http.get(f"http://127.0.0.1:{health_port}/readyz") as r:
            body = await r.json()
            assert r.status == 503 and "no breakglass keys" in body["problem"]
    proc.terminate()
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    # The server's own log lines (audit records forwarded from tabs and the self-check are
    # the other kind of line on stdout).
    logged = [r for r in lines if "message" in r]
    listening = next(r for r in logged if r["message"] == "listening")
    assert listening["client_certificate"] == "required"
    refused = [r for r in logged if r["message"] == "request refused: no identity header"]
    assert refused and refused[0]["client_cert"] == "commonName=ingress-controller"
