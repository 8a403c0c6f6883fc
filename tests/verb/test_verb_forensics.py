"""Forensics on its own terms: a budget and a lock of its own, bundles of mutating verbs kept apart
from count-based retention, QMP used once and briefly, the screendump's PPM fallback, and the
bundle's record of which Proxmox task holds the VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from breakglass_tui.verb import breakglass_verb as bv
from tests.verb.conftest import FAST_DEADLINES, VERB_PATH, run_verb, sim_with, verb_env

FAST = {"deadlines": FAST_DEADLINES}


def ledger(sim: Any) -> list[dict[str, Any]]:
    path = Path(sim.state_dir) / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_forensics_has_a_budget_of_its_own(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, budget={"max_forensics_per_hour": 2, "cooldown_s": 0}, **FAST)
    try:
        sim.start_vm()
        for _ in range(2):
            assert run_verb(sim.verb_config_path, "forensics").exit_code == 0
        refused = run_verb(sim.verb_config_path, "forensics")
        assert refused.exit_code == 4 and refused.doc["refused"] == "forensics_budget"
        assert refused.doc["bundle_id"] is None
        assert refused.doc["budget"]["forensics_used"] == 2
        # It is not the mutating verbs' budget: a reset still runs, with its own bundle first.
        reset = run_verb(sim.verb_config_path, "reset")
        assert reset.exit_code == 0 and reset.doc["bundle_id"], reset.doc
        assert reset.doc["budget"]["used"] == 1
        assert [e["phase"] for e in ledger(sim)] == ["forensics", "forensics", "begun", "done"]
    finally:
        sim.cleanup()


def test_one_capture_at_a_time_and_a_second_waits_its_turn(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, **FAST)
    try:
        sim.start_vm()
        sim.set_faults(hang_qm=["config"])  # each capture now takes probe_s
        env = verb_env(sim.verb_config_path, "forensics")
        procs = [
            subprocess.Popen(
                [sys.executable, str(VERB_PATH)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        docs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        sim.cleanup()
    assert all(d["exit_code"] == 0 for d in docs), docs
    manifests = [
        json.loads((Path(sim.state_dir) / "bundles" / d["bundle_id"] / "manifest.json").read_text())
        for d in docs
    ]
    # Serialised: the two captures did not overlap (each took about probe_s).
    spans = sorted(
        (os.path.getmtime(Path(sim.state_dir) / "bundles" / d["bundle_id"] / "manifest.json"), m)
        for d, m in zip(docs, manifests, strict=True)
    )
    (first_end, _), (second_end, second) = spans
    assert second_end - first_end >= second["elapsed_s"] - 0.2


def test_a_capture_holding_the_lock_past_forensics_s_makes_the_next_busy(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, deadlines={**FAST_DEADLINES, "forensics_s": 1.0})
    try:
        sim.start_vm()
        cfg = bv.load_config({"BREAKGLASS_VERB_CONFIG": str(sim.verb_config_path)})
        held = bv.take_forensics_lock(cfg, 0)
        assert held is not None
        try:
            t0 = time.monotonic()
            busy = run_verb(sim.verb_config_path, "forensics")
            waited = time.monotonic() - t0
        finally:
            os.close(held)
        assert busy.exit_code == 3 and busy.doc["refused"] == "busy", busy.doc
        assert 1.0 <= waited < 10
        # A mutating verb never waits on it for long, and captures anyway: forensics first.
        held = bv.take_forensics_lock(cfg, 0)
        try:
            reset = run_verb(sim.verb_config_path, "reset")
        finally:
            assert held is not None
            os.close(held)
        assert reset.exit_code == 0 and reset.doc["bundle_id"], reset.doc
        manifest = json.loads(
            (Path(sim.state_dir) / "bundles" / reset.doc["bundle_id"] / "manifest.json").read_text()
        )
        assert "another capture holding its lock" in manifest["note"]
    finally:
        sim.cleanup()


def test_repeated_forensics_cannot_push_a_reset_s_evidence_out(tmp_path: Path) -> None:
    sim = sim_with(
        tmp_path,
        retention={"keep_bundles": 2, "keep_action_bundles": 5},
        budget={"cooldown_s": 0},
        **FAST,
    )
    try:
        sim.start_vm()
        reset = run_verb(sim.verb_config_path, "reset").doc["bundle_id"]
        ids = [run_verb(sim.verb_config_path, "forensics").doc["bundle_id"] for _ in range(4)]
        kept = sorted(os.listdir(Path(sim.state_dir) / "bundles"))
        assert kept == sorted([reset, *ids[-2:]])
    finally:
        sim.cleanup()


def test_byte_cap_drops_forensics_bundles_before_action_bundles(tmp_path: Path) -> None:
    cfg = bv.validate_config({"state_dir": str(tmp_path), "retention": {"max_total_bytes": 3100}})
    bundles = cfg.bundles_dir
    names = [
        "20260101T000000Z-reset-000001",
        "20260101T000001Z-forensics-000002",
        "20260101T000002Z-forensics-000003",
        "20260101T000003Z-cycle-000004",
    ]
    for i, name in enumerate(names):
        (bundles / name).mkdir(parents=True)
        (bundles / name / "data.txt").write_bytes(b"x" * 1000)
        (bundles / name / "manifest.json").write_text("{}")
        os.utime(bundles / name / "manifest.json", (1000 + i, 1000 + i))
    bv.enforce_retention(cfg, keep=names[-1])  # 4 x ~1 KB > 3.1 KB: one must go
    assert sorted(os.listdir(bundles)) == [names[0], names[2], names[3]]  # the oldest forensics


def test_screendump_falls_back_to_ppm_on_a_qemu_without_format(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, **FAST)
    try:
        sim.start_vm()
        sim.set_faults(screendump_no_format=True)
        doc = run_verb(sim.verb_config_path, "forensics").doc
        bundle = Path(sim.state_dir) / "bundles" / doc["bundle_id"]
    finally:
        sim.cleanup()
    probes = {p["name"]: p for p in doc["probes"]}
    assert probes["qmp_screendump"]["status"] == "ok"
    assert (bundle / "screendump.ppm").read_bytes().startswith(b"P6")
    assert not (bundle / "screendump.png").exists()


def test_the_bundle_says_which_proxmox_task_holds_the_vm(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, **FAST)
    try:
        sim.start_vm()
        active = sim.root / "pve-log" / "tasks" / "active"
        active.write_text("UPID:pve:0000A1B2:0001C3D4:6B000000:vzdump:102:root@pam: 0\n")
        doc = run_verb(sim.verb_config_path, "forensics").doc
        bundle = Path(sim.state_dir) / "bundles" / doc["bundle_id"]
    finally:
        sim.cleanup()
    assert ":vzdump:102:" in (bundle / "pve_tasks_active.txt").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [p["name"] for p in manifest["probes"]]
    assert {"pve_tasks_active", "journal_qmeventd", "vm_scope_procs", "host_facts"} <= set(names)
    facts = json.loads((bundle / "host_facts.txt").read_text())
    assert facts["vm_processes"]["kvm"]["pid_file"] is True
    assert facts["pve"]["quorum"] is True
