"""The console port as the chart runs it, in Chromium: TLS, and a client certificate that only the
ingress controller holds. Chromium presenting that certificate (as the ingress would) gets the
console; without it the page never loads and no app process starts. The browser stands in for the
ingress here: Playwright presents the client certificate for the console's origin."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import ServeProcess, open_console, running_serve
from tests.support.certs import Pki, make_pki

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_serve(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ServeProcess]:
    with running_serve(tmp_path_factory.mktemp("serve-tls"), tls=pki) as served:
        yield served


async def test_chromium_with_the_ingress_certificate_gets_the_console(
    browser: Any, tls_serve: ServeProcess, pki: Pki
) -> None:
    context = await browser.new_context(
        viewport={"width": 1280, "height": 800},
        # The console's certificate comes from the private serving CA, which Chromium does not
        # know; the ingress controller verifies it with that CA (tests/serve test it).
        ignore_https_errors=True,
        client_certificates=[
            {
                "origin": tls_serve.base,
                "certPath": str(pki.ingress.cert),
                "keyPath": str(pki.ingress.key),
            }
        ],
    )
    try:
        tab = await open_console(context, tls_serve.base + "/")
        screen = await tab.wait_for_text("Live output")
        assert "devvm:" in screen
        assert tab.websockets and all(
            ws.startswith(f"wss://127.0.0.1:{tls_serve.port}/ws") for ws in tab.websockets
        ), tab.websockets
        opened = [r for r in tls_serve.log_records() if r.get("message") == "session opened"]
        assert opened and opened[-1]["client_cert"] == "commonName=ingress-controller"
    finally:
        await context.close()


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
async def test_chromium_without_it_gets_nothing(
    browser: Any, tls_serve: ServeProcess, pki: Pki, who: str
) -> None:
    certificates = []
    if who != "no certificate":
        certificates = [
            {
                "origin": tls_serve.base,
                "certPath": str(pki.stranger.cert),
                "keyPath": str(pki.stranger.key),
            }
        ]

    def sessions() -> int:
        return sum(r.get("message") == "session opened" for r in tls_serve.log_records())

    before = {p.pid for p in tls_serve.app_processes()}
    opened = sessions()
    context = await browser.new_context(ignore_https_errors=True, client_certificates=certificates)
    try:
        page = await context.new_page()
        with pytest.raises(Exception) as err:
            await page.goto(tls_serve.base + "/", timeout=20_000)
        assert "net::ERR_" in str(err.value), err.value
        await asyncio.sleep(0.5)  # must not happen within it: an app process started anyway
        assert {p.pid for p in tls_serve.app_processes()} <= before, "an app process started"
        assert sessions() == opened
    finally:
        await context.close()


def test_the_lab_serves_tls_only_when_given_certificates(tls_serve: ServeProcess) -> None:
    listening = next(r for r in tls_serve.log_records() if r.get("message") == "listening")
    assert listening["console"].startswith("https://")
    assert listening["client_certificate"] == "required"
    assert Path(tls_serve.state_dir).exists()
