"""The breakglass agent after the security review: output stored within a cap, the model's
timeout clamped, the conversation kept valid whatever escapes a tool, audit/transcript write
failures (a full disk) survived, and grep_output's pattern run off the event loop."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.core import outputs
from breakglass_tui.core.events import Notice
from breakglass_tui.core.fence import new_fence, parse
from tests.core.conftest import ScriptedHost
from tests.core.test_loop import assert_tool_results_first
from tests.support import fake_messages_api as fm

MiB = 1024 * 1024


def last_results(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in body["messages"][-1]["content"] if b["type"] == "tool_result"]


async def test_a_huge_output_is_stored_once_within_the_cap_and_the_model_is_told(
    make_agent, fake_api
):
    line = "y" * 1023 + "\n"
    huge = line * (20 * 1024 - 1) + "THE LAST LINE\n"  # ~20 MiB
    h = make_agent(ScriptedHost(outputs={"cat /var/log/huge": huge}))
    fake_api.push(fm.tool("t1", "devvm_shell", {"command": "cat /var/log/huge"}), fm.text("Ok."))
    await h.agent.handle("look at the log")

    state = Path(h.agent.settings.state_dir)
    record = h.agent.outputs.records[h.agent.outputs.id_for(1)]
    assert record.path.stat().st_size == outputs.MAX_STORED_BYTES == 16 * MiB
    assert record.raw_bytes == len(huge) and record.truncated
    # Nothing else holds a second copy: the transcript refers to the file.
    transcript = state / "transcripts" / f"{h.agent.session_id}.jsonl"
    assert transcript.stat().st_size < 64 * 1024
    (stored,) = [
        r for r in map(json.loads, transcript.read_text().splitlines()) if r["kind"] == "output"
    ]
    assert stored["truncated"] and stored["stored_bytes"] == 16 * MiB
    total = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
    assert total < 16 * MiB + 256 * 1024
    (result,) = last_results(fake_api.bodies[1])
    content = result["content"]
    assert "TRUNCATED" in content and f"of {len(huge)} bytes are kept" in content
    assert hashlib.sha256(huge.encode()).hexdigest() in content
    assert "THE LAST LINE" in content  # the tail is the real end
    assert any(r["kind"] == "output_truncated" for r in h.audit())
    # read_output still works on what was kept, and the incident report is written.
    read = h.agent.outputs.read(record.output_id, 0, 10, new_fence())
    assert parse(read).inside == ["y" * 10]
    assert h.agent.write_report().exists()


@pytest.mark.parametrize(
    ("asked", "used", "note"),
    [(10**9, 3600.0, "clamped to 3600 s"), (0, 1.0, "clamped to 1 s"), (90, 90.0, None)],
)
async def test_the_models_timeout_is_clamped_to_the_schema(make_agent, fake_api, asked, used, note):
    host = ScriptedHost()
    h = make_agent(host)
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": "uptime", "timeout_s": asked}), fm.text("Ok.")
    )
    await h.agent.handle("uptime please")
    assert host.timeouts == [used]
    (result,) = last_results(fake_api.bodies[1])
    if note:
        assert note in result["content"] and "outside 1..3600" in result["content"]
    else:
        assert "clamped" not in result["content"]


class Escaped(BaseException):
    """Something that is not an Exception escaping a tool (not a cancel)."""


async def test_anything_escaping_a_tool_still_answers_every_tool_use(make_agent, fake_api):
    host = ScriptedHost(fail_with=Escaped("boom"))  # type: ignore[arg-type]
    h = make_agent(host)
    fake_api.push(
        fm.reply(
            None,
            [("t1", "devvm_shell", {"command": "df -h"}), ("t2", "probe_devvm", {})],
        ),
    )
    with pytest.raises(Escaped):
        await h.agent.handle("check the disk")
    last = h.agent.messages[-1]
    assert last["role"] == "user"
    assert [b["tool_use_id"] for b in last["content"]] == ["t1", "t2"]
    assert all(b.get("is_error") for b in last["content"])
    # The error's class is the agent's word; its text may quote a host: fenced (issue 15).
    failed = parse(last["content"][0]["content"])
    assert "(Escaped)" in failed.outside[0] and failed.inside == ["boom"]
    # The session is not stuck: the next message makes a valid request.
    host.fail_with = None
    fake_api.push(fm.text("Back."))
    await h.agent.handle("again")
    assert_tool_results_first(fake_api.bodies)
    assert any(r["kind"] == "tool_loop_error" for r in h.audit())


@contextlib.contextmanager
def full_tmpfs(tmp_path: Path):
    """A small tmpfs mounted under tmp_path (root only), unmounted afterwards."""
    mount = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> None:
    """Fill the file system holding directory until writes fail with ENOSPC."""
    for name, size in (("filler", 65536), ("filler-small", 1)):
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * size)
        except OSError:
            pass
        finally:
            os.close(fd)


async def test_a_full_state_volume_does_not_stick_the_session(make_agent, fake_api, settings):
    with full_tmpfs(Path(settings.state_dir).parent) as mount:
        (mount / "state").mkdir()
        fill(mount)
        with pytest.raises(OSError), (mount / "probe").open("wb", buffering=0) as probe:
            probe.write(b"x" * 8192)
        host = ScriptedHost(outputs={"du -sh /var": "12G\t/var\n" * 5000})
        h = make_agent(host, settings=settings.model_copy(update={"state_dir": mount / "state"}))
        fake_api.push(
            fm.tool("t1", "devvm_shell", {"command": "du -sh /var"}),
            fm.text("The disk of the state volume is full, but /var is 12G."),
        )
        try:
            await h.agent.handle("why is the disk full?")  # no OSError escapes
            # Every tool_use answered, with the command's real result.
            assert_tool_results_first(fake_api.bodies)
            (result,) = last_results(fake_api.bodies[1])
            assert "12G" in result["content"] and "TRUNCATED" in result["content"]
            assert h.agent.messages[-1]["role"] == "assistant"
            # The operator was told once per record that cannot be written.
            failures = [n.text for n in h.of(Notice) if "Could not write the" in n.text]
            assert len(failures) == 2, failures
            assert {"audit log", "transcript"} == {
                name for name in ("audit log", "transcript") for t in failures if name in t
            }
            # Space freed: records resume, with a count of what was lost.
            (mount / "filler").unlink()
            fake_api.push(fm.text("Still here."))
            await h.agent.handle("and now?")
            kinds = [r["kind"] for r in h.audit()]
            assert "records_lost" in kinds and kinds[-1] == "model_turn"
        finally:
            await h.agent.close()  # before the unmount


async def test_a_catastrophic_grep_pattern_is_a_clear_tool_error(make_agent, fake_api, monkeypatch):
    monkeypatch.setattr(outputs, "GREP_TIMEOUT_S", 0.5)
    h = make_agent(ScriptedHost(outputs={"cat x": "a" * 40 + "!\n"}))
    fake_api.push(
        fm.tool("t1", "devvm_shell", {"command": "cat x"}),
        fm.tool("t2", "grep_output", {"output_id": h.agent.outputs.id_for(1), "pattern": "(a+)+$"}),
        fm.text("Ok."),
    )
    await h.agent.handle("grep it")
    (result,) = last_results(fake_api.bodies[2])
    assert result.get("is_error") is True
    assert "ran longer than 0.5 s" in result["content"] and "simpler pattern" in result["content"]
