"""Output budgets and secret scrubbing, on their own."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakglass_tui.core.outputs import OutputStore
from breakglass_tui.core.scrub import PRIVATE_KEY_MARKER, Scrubber
from breakglass_tui.hosts.types import OutputChunk

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
    view = store.view(rec, "devvm_shell: exit 0")
    assert view.endswith("hello\nworld\n") and "elided" not in view
    assert rec.sha256 == hashlib.sha256(b"hello\nworld\n").hexdigest()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=3000), max_size=12))
def test_head_and_tail_never_exceed_the_budget_and_match_the_whole(tmp_path_factory, chunks):
    store = OutputStore(tmp_path_factory.mktemp("o"), Scrubber(), budget_bytes=1000)
    rec = record(store, chunks)
    whole = "".join(chunks).encode()
    assert len(rec.head) + len(rec.tail) <= store.budget_bytes
    assert whole.startswith(rec.head) and whole.endswith(rec.tail)
    assert rec.elided_bytes == len(whole) - len(rec.head) - len(rec.tail)
    assert rec.path.read_bytes() == whole


def test_token_budget_tightens_the_byte_budget(tmp_path):
    store = OutputStore(tmp_path, Scrubber(), budget_bytes=100_000, budget_tokens=1000)
    assert store.budget_bytes == 3000


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


def test_read_and_grep_validate_ids_and_patterns(tmp_path):
    store = OutputStore(tmp_path, Scrubber())
    record(store, ["alpha\nbeta\ngamma\n"])
    assert store.read("o1", 6, 4).endswith("beta")
    assert "2 @6: beta" in store.grep("o1", "^b")
    with pytest.raises(ValueError, match="not an output id"):
        store.read("../../etc/passwd", 0, 10)
    with pytest.raises(ValueError, match="no output 'o9'"):
        store.grep("o9", "x")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        store.grep("o1", "(")
