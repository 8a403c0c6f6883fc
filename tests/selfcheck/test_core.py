"""The self-check's bookkeeping (core.selfcheck) with checks given as plain coroutines, and the
serving-path check against a real HTTP server on loopback (standing in for the ingress)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from breakglass_tui.core.selfcheck import (
    LinkStatus,
    Outcome,
    SelfCheck,
    not_used,
    report_lines,
    summary,
)
from breakglass_tui.core.servingcheck import check_serving_path
from tests.support.realparts import free_port


class Clock:
    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scripted(*outcomes: Outcome | BaseException | None):
    """A check answering each run with the next outcome (None: hang until cancelled)."""
    queue = list(outcomes)

    async def check() -> Outcome:
        item = queue.pop(0)
        if item is None:
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Outcome)
        return item

    return check


OK = Outcome.of(True, "fine")
BROKEN = Outcome.of(False, "gone")


async def test_state_changes_broken_since_and_last_success() -> None:
    clock = Clock()
    check = SelfCheck(
        {"pve": scripted(OK, BROKEN, BROKEN, OK), "vault": not_used("no Vault here")},
        clock=clock,
    )
    changes = await check.run()
    assert [(c.link, c.before, c.after) for c in changes] == [
        ("vault", None, LinkStatus.NOT_USED),
        ("pve", None, LinkStatus.OK),
    ]
    first_ok = clock.now
    clock.now += 300
    changes = await check.run()
    assert [(c.link, c.after) for c in changes] == [("pve", LinkStatus.BROKEN)]
    broke = clock.now
    clock.now += 300
    assert await check.run() == []  # still broken: no change, nothing to audit
    pve = check.links["pve"]
    assert pve.broken_since == broke and pve.last_success == first_ok and not check.ok
    text, ok = summary(check.snapshot())
    assert ok is False and text.startswith("rescue path: PVE host BROKEN since ")
    clock.now += 300
    await check.run()
    assert pve.broken_since is None and pve.last_success == clock.now and check.ok
    assert summary(check.snapshot())[0].startswith("rescue path: all links OK, checked ")


async def test_a_hung_check_is_broken_at_its_deadline_and_the_others_still_answer() -> None:
    check = SelfCheck({"pve": scripted(None), "devvm": scripted(OK)}, timeout_s=0.3)
    await asyncio.wait_for(check.run(), 10)
    assert check.links["pve"].status is LinkStatus.BROKEN
    assert "no answer within 0.3s" in check.links["pve"].message
    assert check.links["devvm"].status is LinkStatus.OK


async def test_a_check_that_raises_is_that_link_broken_without_its_text() -> None:
    check = SelfCheck({"api": scripted(RuntimeError("token=sk-secret-value"))})
    await check.run()
    api = check.links["api"]
    assert api.status is LinkStatus.BROKEN and "RuntimeError" in api.message
    assert "sk-secret" not in api.message


async def test_a_hosts_words_reach_no_screen_as_escape_sequences() -> None:
    hostile = "status: \x1b]52;c;ZXZpbA==\x07\x1b[2J\u202eok\nforged line\x9b"
    check = SelfCheck({"pve": scripted(Outcome.of(False, hostile))})
    await check.run()
    for text in [*report_lines(check.snapshot()), summary(check.snapshot())[0]]:
        assert not any(ch in text for ch in "\x1b\x07\n\u202e\x9b"), repr(text)
    assert "forged line" in check.links["pve"].message  # kept, on the same line


def test_unknown_links_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown self-check links"):
        SelfCheck({"kubernetes": not_used("?")})


@pytest.fixture
async def ingress() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A real HTTP server answering / with the status the test sets."""
    answer = {"status": 302}

    async def page(request: web.Request) -> web.Response:
        headers = {"Location": "https://sso.example.org/"} if answer["status"] == 302 else {}
        return web.Response(status=answer["status"], headers=headers, text="x")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/", answer
    finally:
        await runner.cleanup()


async def test_the_serving_path(ingress: tuple[str, dict[str, int]]) -> None:
    url, answer = ingress
    for status, ok in ((302, True), (401, True), (200, True), (404, False), (502, False)):
        answer["status"] = status
        result, message = await check_serving_path(url, timeout_s=5)
        assert result is ok and str(status) in message, (status, message)
    closed = f"http://127.0.0.1:{free_port()}/"
    result, message = await check_serving_path(closed, timeout_s=5)
    assert result is False and "did not answer" in message
