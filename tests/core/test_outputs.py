"""Output budgets and secret scrubbing, on their own."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakglass_tui.core import fence
from breakglass_tui.core.outputs import OutputStore
from breakglass_tui.core.scrub import (
    KEY_MAX_LINES,
    PARTIAL_MAX_CHARS,
    PRIVATE_KEY_MARKER,
    UNENDED_KEY_MARKER,
    Scrubber,
)
from breakglass_tui.hosts.types import OutputChunk

F = fence.Fence("0123456789abcdef")  # a fixed token: the views are compared as text

KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234567890abcdef\nqwertyuiop\n"
    "-----END RSA PRIVATE KEY-----\n"
)


def record(store: OutputStore, chunks: list[str]):
    rec = store.recorder()
    for c in chunks:
        rec.feed(OutputChunk(stream="stdout", text=c))
    return store.finish(rec)[0]


def test_small_output_is_shown_whole(tmp_path):
    store = OutputStore(tmp_path, Scrubber())
    rec = record(store, ["hello\n", "world\n"])
    view = store.view(rec, "devvm_shell: exit 0", F)
    assert fence.parse(view).inside == ["hello\nworld\n"] and "elided" not in view
    assert view.startswith("devvm_shell: exit 0 | output_id ")
    assert rec.sha256 == hashlib.sha256(b"hello\nworld\n").hexdigest()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=3000), max_size=12))
def test_head_and_tail_never_exceed_the_view_and_match_the_whole(tmp_path_factory, chunks):
    store = OutputStore(tmp_path_factory.mktemp("o"), Scrubber(), view_bytes=1000)
    rec = record(store, chunks)
    whole = "".join(chunks).encode()
    assert len(rec.head) + len(rec.tail) <= store.view_bytes
    assert whole.startswith(rec.head) and whole.endswith(rec.tail)
    assert rec.elided_bytes == len(whole) - len(rec.head) - len(rec.tail)
    assert rec.path.read_bytes() == whole


def test_token_limit_tightens_the_byte_limit(tmp_path):
    store = OutputStore(tmp_path, Scrubber(), view_bytes=100_000, view_tokens=1000)
    assert store.view_bytes == 3000


def test_private_key_split_across_chunks_is_scrubbed_everywhere(tmp_path):
    store = OutputStore(tmp_path, Scrubber())
    rec = store.recorder()
    shown = []
    for i in range(0, len(KEY), 7):  # worst case: the block arrives in tiny pieces
        out = rec.feed(OutputChunk(stream="stdout", text=KEY[i : i + 7]))
        if out:
            shown.append(out.text)
    final, rest = store.finish(rec)
    shown += [c.text for c in rest]
    assert "MIIEow" not in "".join(shown) and PRIVATE_KEY_MARKER in "".join(shown)
    assert "MIIEow" not in final.path.read_text()
    assert final.sha256 == hashlib.sha256(KEY.encode()).hexdigest()  # digest of what was printed


def test_scrubber_removes_the_configured_secret_and_anthropic_keys():
    s = Scrubber(["hunter2-is-long-enough"])
    assert s.text("x hunter2-is-long-enough y sk-ant-api03-abcdefghijkl") == (
        "x [secret elided] y [secret elided]"
    )
    assert s.value({"a": [KEY]}) == {"a": [PRIVATE_KEY_MARKER + "\n"]}


async def test_read_and_grep_validate_ids_and_patterns(tmp_path):
    store = OutputStore(tmp_path, Scrubber())
    record(store, ["alpha\nbeta\ngamma\n"])
    assert fence.parse(store.read(store.id_for(1), 6, 4, F)).inside == ["beta"]
    assert "2 @6: beta" in await store.grep(store.id_for(1), "^b", fence=F)
    with pytest.raises(ValueError, match="not an output id"):
        store.read("../../etc/passwd", 0, 10, F)
    with pytest.raises(ValueError, match=f"no output '{store.id_for(9)}'"):
        await store.grep(store.id_for(9), "x", fence=F)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        await store.grep(store.id_for(1), "(", fence=F)


# -- the per-output storage cap (security review: a huge output filled the state volume) --------


def test_an_output_past_the_cap_is_counted_and_hashed_but_not_written(tmp_path):
    store = OutputStore(tmp_path, Scrubber(), view_bytes=1000, max_stored_bytes=10_000)
    lines = [f"line {i:06d}\n" for i in range(5000)]  # 60 000 bytes
    whole = "".join(lines).encode()
    rec = record(store, ["".join(lines[i : i + 97]) for i in range(0, len(lines), 97)])
    assert rec.path.stat().st_size == rec.stored_bytes == 10_000
    assert rec.raw_bytes == rec.scrubbed_bytes == len(whole) and rec.truncated
    assert rec.sha256 == hashlib.sha256(whole).hexdigest()  # of the whole, not of the kept part
    assert rec.path.read_bytes() == whole[:10_000]
    assert rec.tail.endswith(b"line 004999\n")  # the real end of the output
    view = store.view(rec, "devvm_shell: exit 0", F)
    assert "TRUNCATED: only the first 10000 of 60000 bytes are kept" in view
    assert "line 004999" in view and rec.sha256 in view
    assert "only these were kept, of 60000" in store.read(store.id_for(1), 9990, 100, F)
    assert len(view.encode()) < 1000 + 1000


def test_the_default_cap_is_16_mib(tmp_path):
    store = OutputStore(tmp_path, Scrubber())
    chunk = ("x" * 1023 + "\n") * 1024  # 1 MiB
    rec = record(store, [chunk] * 17)
    assert rec.stored_bytes == rec.path.stat().st_size == 16 * 1024 * 1024
    assert rec.raw_bytes == 17 * 1024 * 1024 and rec.truncated


def test_a_full_disk_ends_the_file_not_the_output(tmp_path, monkeypatch):
    store = OutputStore(tmp_path, Scrubber())
    rec = store.recorder()
    rec.feed(OutputChunk(stream="stdout", text="kept\n"))
    real_write = os.write

    stored = os.path.realpath(rec.path)

    def opened_file(fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def full(fd, data):
        if opened_file(fd) == stored:  # the output's file, only
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    rec.feed(OutputChunk(stream="stdout", text="lost\n"))
    final, _ = store.finish(rec)
    assert final.truncated and final.stored_bytes == 5 and "No space left" in final.store_error
    assert (final.head + final.tail).endswith(b"lost\n")  # shown, though not stored
    assert "writing it failed" in store.view(final, "x", F)


# -- private key mode is bounded (security review) ----------------------------------------------


def test_a_begin_line_without_end_does_not_hide_the_rest_of_the_output():
    stream = Scrubber().stream()
    begin = "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    body = "".join(f"b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAA{i:04d}\n" for i in range(300))
    after = "".join(f"disk line {i}\n" for i in range(100))
    out = stream.feed(begin) + stream.feed(body) + stream.feed(after) + stream.flush()
    assert UNENDED_KEY_MARKER in out
    assert "disk line 99\n" in out and "disk line 0\n" in out
    assert "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAA0000" not in out  # the start is still dropped
    assert out.count("b3BlbnNzaC1rZXktdjE") <= 300 - KEY_MAX_LINES


def test_a_real_key_block_is_still_dropped_whole():
    stream = Scrubber().stream()
    # A 16384-bit RSA key is ~200 lines of 64 characters: longer than "about 100 lines".
    body = "".join("A" * 64 + "\n" for _ in range(200))
    text = "before\n-----BEGIN RSA PRIVATE KEY-----\n" + body + "-----END RSA PRIVATE KEY-----\n"
    out = stream.feed(text + "after\n") + stream.flush()
    assert out == "before\n" + PRIVATE_KEY_MARKER + "\nafter\n"


def test_binary_junk_after_a_begin_line_keeps_memory_bounded():
    stream = Scrubber().stream()
    out = stream.feed("-----BEGIN RSA PRIVATE KEY-----\n")
    longest = 0
    for _ in range(200):  # 12.8 MB with no newline
        out += stream.feed("\x01\x02" * 32768)
        longest = max(longest, stream.held_chars)
    out += stream.feed("\nvisible again\n") + stream.flush()
    assert longest <= PARTIAL_MAX_CHARS
    assert UNENDED_KEY_MARKER in out and "visible again\n" in out


def test_whole_text_scrubbing_bounds_an_unended_key_too():
    text = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI\n" + "".join(
        f"later {i}\n" for i in range(400)
    )
    out = Scrubber().text(text)
    assert "MHcCAQEEI" not in out and UNENDED_KEY_MARKER in out and "later 399\n" in out
    assert Scrubber().text(KEY) == PRIVATE_KEY_MARKER + "\n"


# -- grep_output runs the model's pattern off the event loop, with a deadline --------------------


async def test_a_catastrophic_pattern_times_out_without_freezing_the_loop(tmp_path):
    store = OutputStore(tmp_path, Scrubber())
    record(store, ["a" * 40 + "!\n", "fine\n"])
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        with pytest.raises(ValueError, match=r"ran longer than 0\.5 s"):
            await store.grep(store.id_for(1), r"(a+)+$", fence=F, timeout_s=0.5)
    finally:
        task.cancel()
    assert time.monotonic() - started < 3.0
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert gaps and max(gaps) < 0.3, max(gaps)
    # An ordinary pattern still works, and the pattern sees a bounded part of a long line.
    record(store, ["x" * 10_000 + "NEEDLE\n", "NEEDLE here\n"])
    found = await store.grep(store.id_for(2), "NEEDLE", fence=F)
    assert "1 matching line(s)" in found and "2 @10007: NEEDLE here" in found
    assert "longer than 4096 characters" in found
