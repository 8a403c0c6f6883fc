"""The budget ledger under stress: a full disk (a real tmpfs, mounted here), a torn ledger tail,
the stop/start way around the cooldown, and a ledger append that never waits on the storage.

The budget and the cooldown are computed from the ledger, so a ledger that cannot be written
must stop mutating verbs (fail closed), except `start` of a stopped VM, which is never refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.verb import breakglass_verb as bv
from tests.verb.conftest import FAST_DEADLINES, run_verb, sim_with

FAST = {"deadlines": FAST_DEADLINES}
TMPFS_BYTES = 256 * 1024


def _texts(sim: Any) -> list[str]:
    return sim.call_texts()


def _fill(directory: Path) -> Path:
    """Fill the filesystem holding `directory` to the last byte (write until ENOSPC)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        for chunk in (b"\0" * 4096, b"\0"):  # pages, then whatever slack is left
            with contextlib.suppress(OSError):
                while fh.write(chunk):
                    pass
    with pytest.raises(OSError) as exc:
        (directory / "probe-full").write_bytes(b"x" * 4096)
    assert exc.value.errno == errno.ENOSPC
    (directory / "probe-full").unlink(missing_ok=True)
    return filler


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for this test (to be used as state_dir), unmounted after."""
    mnt = tmp_path / "state-tmpfs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(
            "needs a real full filesystem: mounting a tmpfs is not permitted here "
            f"(run as root with CAP_SYS_ADMIN): {proc.stderr.strip() or proc.returncode}"
        )
    try:
        yield mnt
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        if done.returncode != 0:  # something still holds it: detach, never leave it mounted
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _ledger_lines(state_dir: Path) -> list[str]:
    path = state_dir / "ledger.jsonl"
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------ 1. a full disk


def test_a_full_state_dir_refuses_mutating_verbs_instead_of_losing_the_budget(
    tmp_path: Path, tiny_tmpfs: Path
) -> None:
    """The reproduction: budget 1/hour, cooldown 300 s, state_dir on a full tmpfs. Before the fix
    the "begun" entry was silently dropped and three resets in a row all ran (exit 0)."""
    sim = sim_with(
        tmp_path,
        state_dir=str(tiny_tmpfs),
        budget={"max_mutating_per_hour": 1, "cooldown_s": 300},
        **FAST,
    )
    try:
        sim.start_vm()
        boot_id = sim.vm_state()["boot_id"]
        _fill(tiny_tmpfs)
        for verb in ("reset", "reset", "reset", "cycle", "stop"):
            result = run_verb(sim.verb_config_path, verb)
            assert result.exit_code == bv.EXIT_REFUSED, result.doc
            doc = result.doc
            assert doc["refused"] == "ledger" and not doc["ok"]
            assert doc["bundle_id"] is None  # refused before forensics and the action
            msg = doc["message"]
            assert "No space left on device" in msg and "ledger" in msg
            assert str(tiny_tmpfs) in msg and "free space" in msg.lower()  # cause, next step
            assert "refused" in result.stderr
        calls = _texts(sim)
        assert not any(c.startswith(("qm reset", "qm stop", "qm start")) for c in calls), calls
        assert sim.vm_state()["boot_id"] == boot_id and sim.kvm_pid() is not None
        assert _ledger_lines(tiny_tmpfs) == []

        # Space freed: the budget works again, from an honest ledger.
        (tiny_tmpfs / "filler").unlink()
        assert run_verb(sim.verb_config_path, "reset").exit_code == bv.EXIT_OK
        again = run_verb(sim.verb_config_path, "reset")
        assert again.exit_code == bv.EXIT_REFUSED and again.doc["refused"] == "cooldown"
    finally:
        sim.cleanup()


def test_a_full_state_dir_never_stops_start_of_a_stopped_vm(
    tmp_path: Path, tiny_tmpfs: Path
) -> None:
    sim = sim_with(
        tmp_path,
        state_dir=str(tiny_tmpfs),
        budget={"max_mutating_per_hour": 1, "cooldown_s": 300},
        **FAST,
    )
    try:
        assert sim.kvm_pid() is None  # the VM is stopped
        _fill(tiny_tmpfs)
        result = run_verb(sim.verb_config_path, "start")
        assert result.exit_code == bv.EXIT_OK, result.doc
        assert result.doc["state_after"] == "running" and sim.kvm_pid() is not None
        steps = {s["step"]: s for s in result.doc["steps"]}
        assert not steps["forensics"]["ok"]  # no room for a bundle either: reported, no block
        assert not steps["ledger begun"]["ok"]
        assert "No space left on device" in steps["ledger begun"]["detail"]
        assert not steps["ledger done"]["ok"]
        assert "ledger" in result.doc["message"] and str(tiny_tmpfs) in result.doc["message"]
        # Running now, disk still full: no exemption, so the ledger refusal holds.
        refused = run_verb(sim.verb_config_path, "reset")
        assert refused.exit_code == bv.EXIT_REFUSED and refused.doc["refused"] == "ledger"
    finally:
        sim.cleanup()


def test_a_ledger_entry_cut_short_by_a_full_disk_is_refused_and_leaves_no_torn_line(
    tmp_path: Path, tiny_tmpfs: Path
) -> None:
    """The ledger's last page has a few bytes left when the disk fills: the "begun" entry is
    written only in part (a short write). That is a failure too, and the fragment must not
    merge with the next entry (an unparseable line is skipped: it would hide that entry)."""
    sim = sim_with(
        tmp_path,
        state_dir=str(tiny_tmpfs),
        budget={"max_mutating_per_hour": 3, "cooldown_s": 300},
        **FAST,
    )
    try:
        sim.start_vm()
        old = {"ts": time.time() - 7200, "phase": "done", "verb": "reset", "pad": ""}
        base = len(json.dumps(old, sort_keys=True)) + 1
        old["pad"] = "x" * (4096 - 12 - base)  # 12 bytes left in the ledger's only page
        ledger = tiny_tmpfs / "ledger.jsonl"
        ledger.write_text(json.dumps(old, sort_keys=True) + "\n")
        size = ledger.stat().st_size
        assert size == 4096 - 12
        _fill(tiny_tmpfs)

        result = run_verb(sim.verb_config_path, "reset")
        assert result.exit_code == bv.EXIT_REFUSED, result.doc
        assert result.doc["refused"] == "ledger"
        assert not any(c.startswith("qm reset") for c in _texts(sim))
        assert ledger.stat().st_size == size  # the fragment was taken back

        (tiny_tmpfs / "filler").unlink()
        assert run_verb(sim.verb_config_path, "reset").exit_code == bv.EXIT_OK
        again = run_verb(sim.verb_config_path, "reset")
        assert again.exit_code == bv.EXIT_REFUSED and again.doc["refused"] == "cooldown"
        entries = [json.loads(line) for line in _ledger_lines(tiny_tmpfs) if line]
        assert [(e["phase"], e["verb"]) for e in entries[1:]] == [
            ("begun", "reset"),
            ("done", "reset"),
        ]
    finally:
        sim.cleanup()


def test_an_append_after_a_torn_tail_starts_on_its_own_line(tmp_path: Path) -> None:
    cfg = bv.validate_config({"state_dir": str(tmp_path)})
    (tmp_path / "ledger.jsonl").write_text('{"phase": "begun", "ts": 17')  # cut mid-entry
    bv.append_ledger(cfg, {"ts": time.time(), "phase": "begun", "verb": "reset"})
    assert [e["verb"] for e in bv.read_ledger(cfg)] == ["reset"]
    assert bv.budget_state(cfg)["used"] == 1


def test_append_ledger_raises_when_the_entry_cannot_be_written(tmp_path: Path) -> None:
    cfg = bv.validate_config({"state_dir": str(tmp_path / "missing" / "dir")})
    with pytest.raises(OSError):
        bv.append_ledger(cfg, {"ts": time.time(), "phase": "begun", "verb": "reset"})


def test_an_unreadable_ledger_refuses_mutating_verbs_but_not_start_of_a_stopped_vm(
    tmp_path: Path,
) -> None:
    sim = sim_with(tmp_path, **FAST)
    try:
        sim.start_vm()
        ledger = Path(sim.state_dir) / "ledger.jsonl"
        ledger.mkdir()  # reading it fails (EISDIR): the budget cannot be known
        refused = run_verb(sim.verb_config_path, "stop")
        assert refused.exit_code == bv.EXIT_REFUSED and refused.doc["refused"] == "ledger"
        assert sim.kvm_pid() is not None
        sim.stop_vm()
        back = run_verb(sim.verb_config_path, "start")
        assert back.exit_code == bv.EXIT_OK, back.doc
        assert sim.kvm_pid() is not None
    finally:
        sim.cleanup()


# ------------------------------------------------------------------ 2. stop, then start


def test_stop_then_start_does_not_get_around_the_cooldown(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, budget={"max_mutating_per_hour": 20, "cooldown_s": 600}, **FAST)
    try:
        sim.start_vm()
        cfg = sim.verb_config_path
        assert run_verb(cfg, "stop").exit_code == bv.EXIT_OK
        assert run_verb(cfg, "start").exit_code == bv.EXIT_OK  # stopped: exempt, as always
        for verb in ("stop", "reset", "cycle"):
            again = run_verb(cfg, verb)
            assert again.exit_code == bv.EXIT_REFUSED, (verb, again.doc)
            assert again.doc["refused"] == "cooldown"
            assert "stop" in again.doc["message"]
        assert sum(c.startswith("qm stop") for c in _texts(sim)) == 1
        assert sim.kvm_pid() is not None
    finally:
        sim.cleanup()


def test_a_reset_starts_the_cooldown_for_stop(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, budget={"max_mutating_per_hour": 20, "cooldown_s": 600}, **FAST)
    try:
        sim.start_vm()
        assert run_verb(sim.verb_config_path, "reset").exit_code == bv.EXIT_OK
        stop = run_verb(sim.verb_config_path, "stop")
        assert stop.exit_code == bv.EXIT_REFUSED and stop.doc["refused"] == "cooldown"
        assert sim.kvm_pid() is not None
    finally:
        sim.cleanup()


# ------------------------------------------------------------------ 3. no fsync under the lock


def test_a_ledger_append_does_not_wait_on_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync on stalled storage blocks without a deadline, with the lock held. The append is a
    plain O_APPEND write: no fsync, no fdatasync."""
    cfg = bv.validate_config({"state_dir": str(tmp_path)})

    def stalled(fd: int) -> None:
        raise AssertionError("append_ledger waited on the storage (fsync)")

    monkeypatch.setattr(os, "fsync", stalled)
    monkeypatch.setattr(os, "fdatasync", stalled)
    bv.append_ledger(cfg, {"ts": time.time(), "phase": "begun", "verb": "reset"})
    assert bv.budget_state(cfg)["used"] == 1
