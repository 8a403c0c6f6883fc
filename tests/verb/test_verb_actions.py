"""Each forced-command verb against the simulated Proxmox (real processes: the sim qm, a sim kvm
with a pid file and a QMP socket), run as the real breakglass-verb subprocess; then each fault."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.verb import breakglass_verb as bv
from tests.support.waiting import until_sync
from tests.verb.conftest import FAST_DEADLINES, VERB_PATH, run_verb, sim_with, verb_env

FAST = {"deadlines": FAST_DEADLINES}
FORENSIC_QM = ("qm status 102 --verbose", "qm config 102")
FORENSIC_QMP = ("qmp query-status", "qmp query-block", "qmp query-blockstats", "qmp screendump")


def texts(sim: Any) -> list[str]:
    return [text for _, text in sim.calls()]


def first(calls: list[str], prefix: str) -> int:
    return next(i for i, c in enumerate(calls) if c.startswith(prefix))


def assert_forensics_before(calls: list[str], action: str) -> None:
    """Every forensics probe was issued before the first `action` call."""
    act = first(calls, action)
    for probe in FORENSIC_QM + FORENSIC_QMP:
        assert first(calls, probe) < act, f"{probe} came after {action}: {calls}"


def ledger(sim: Any) -> list[dict[str, Any]]:
    path = Path(sim.state_dir) / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def pve(tmp_path: Path):
    """A running simulated devvm with short deadlines."""
    sim = sim_with(tmp_path, **FAST)
    try:
        sim.start_vm()
        yield sim
    finally:
        sim.cleanup()


# ------------------------------------------------------------------ success paths


def test_status_reads_state_without_lock_or_budget(pve: Any) -> None:
    before = len(pve.calls())
    result = run_verb(pve.verb_config_path, "status")
    assert result.exit_code == 0 and result.doc["ok"]
    doc = result.doc
    assert doc["verb"] == "status" and doc["vmid"] == 102
    assert doc["state_before"] == doc["state_after"] == "running"
    assert doc["kvm"]["pid"] == pve.kvm_pid()
    calls = texts(pve)[before:]
    assert [c for c in calls if c.startswith("qm ")] == ["qm status 102 --verbose"]
    # qm status first (it asks QMP itself), then the verb's own QMP check: one short
    # connection, query-status only.
    assert calls[0] == "qm status 102 --verbose"
    assert calls[-2:] == ["qmp qmp_capabilities", "qmp query-status"]
    assert doc["monitor"] == {
        "ok": True,
        "status": "running",
        "unresponsive": None,
        "detail": "QMP query-status",
    }
    assert doc["protocol"] == bv.PROTOCOL_VERSION
    assert (doc["lock"], doc["ha"], doc["quorum"]) == (None, None, True)
    assert not (Path(pve.state_dir) / "lock").exists()
    assert ledger(pve) == []
    assert doc["budget"]["used"] == 0


def test_status_is_time_boxed_when_qm_hangs(pve: Any) -> None:
    pve.set_faults(hang_qm=["status"])
    result = run_verb(pve.verb_config_path, "status")
    doc = result.doc
    assert result.exit_code == 0 and result.elapsed_s < FAST["deadlines"]["probe_s"] + 2.5
    # qm hangs, QEMU does not: the verb's own QMP check says what the VM is.
    assert doc["state_after"] == "running" and doc["monitor"]["ok"] is True
    assert f"kvm pid {pve.kvm_pid()}" in doc["message"]
    assert "qm status did not answer within 1.5 s" in doc["message"]
    qm_step = next(s for s in doc["steps"] if s["step"] == "qm status")
    assert qm_step == {
        "step": "qm status",
        "ok": False,
        "elapsed_s": qm_step["elapsed_s"],
        "detail": "no answer within 1.5 s",
    }


def test_status_of_a_stopped_vm(pve: Any) -> None:
    assert run_verb(pve.verb_config_path, "stop").exit_code == 0
    doc = run_verb(pve.verb_config_path, "status").doc
    assert doc["state_after"] == "stopped" and doc["kvm"] is None


def test_forensics_captures_a_bundle_that_can_be_fetched(pve: Any) -> None:
    result = run_verb(pve.verb_config_path, "forensics")
    doc = result.doc
    assert result.exit_code == 0, doc
    assert doc["state_before"] == "running" and doc["refused"] is None
    assert bv.BUNDLE_ID_RE.fullmatch(doc["bundle_id"])
    status = {p["name"]: p["status"] for p in doc["probes"]}
    for name in (
        "proc_stat",
        "proc_status",
        "proc_threads",
        "meminfo",
        "loadavg",
        "qm_status",
        "qm_config",
        "qmp_query_status",
        "qmp_query_block",
        "qmp_query_blockstats",
        "qmp_screendump",
    ):
        assert status[name] == "ok", (name, doc["probes"])
    # forensics takes none of the mutating verbs' budget: it has one of its own
    assert [e["phase"] for e in ledger(pve)] == ["forensics"]
    assert doc["budget"]["used"] == 0 and doc["budget"]["forensics_used"] == 1

    fetched = run_verb(pve.verb_config_path, f"bundle {doc['bundle_id']}").doc
    assert fetched["ok"] and fetched["verb"] == "bundle"
    manifest = fetched["manifest"]
    assert manifest["bundle_id"] == doc["bundle_id"]
    names = [p["name"] for p in manifest["probes"]]
    # Safe reads first, then the time-boxed probes.
    assert names.index("loadavg") < names.index("qm_status") < names.index("qmp_query_status")
    files = {k: base64.b64decode(v) for k, v in fetched["files"].items()}
    assert files["screendump.png"].startswith(b"\x89PNG\r\n\x1a\n")
    assert b"qmpstatus: running" in files["qm_status.txt"]
    assert json.loads(files["qmp_query_status.txt"])["status"] == "running"
    for probe in manifest["probes"]:
        if probe["file"]:
            assert len(files[probe["file"]]) == probe["bytes"]


def test_fetching_a_missing_bundle_fails_cleanly(pve: Any) -> None:
    result = run_verb(pve.verb_config_path, "bundle 20260101T000000Z-reset-abcdef")
    assert result.exit_code == 5 and "no forensics bundle" in result.doc["message"]


def test_reset_captures_forensics_first_and_the_vm_reboots(pve: Any) -> None:
    boot_id = pve.vm_state()["boot_id"]
    result = run_verb(pve.verb_config_path, "reset")
    assert result.exit_code == 0, result.doc
    assert_forensics_before(texts(pve), "qm reset")
    assert pve.vm_state()["boot_id"] == boot_id + 1
    doc = result.doc
    assert doc["state_before"] == doc["state_after"] == "running"
    assert [s["step"] for s in doc["steps"]][-3:] == ["forensics", "qm reset", "verify running"]
    assert (Path(pve.state_dir) / "bundles" / doc["bundle_id"] / "manifest.json").exists()
    entries = ledger(pve)
    assert [e["phase"] for e in entries] == ["begun", "done"]
    assert entries[1]["bundle_id"] == doc["bundle_id"] and entries[1]["exit_code"] == 0
    assert doc["budget"]["used"] == 1


def test_stop_verifies_the_kvm_process_is_gone(pve: Any) -> None:
    pid = pve.kvm_pid()
    result = run_verb(pve.verb_config_path, "stop")
    assert result.exit_code == 0, result.doc
    assert_forensics_before(texts(pve), "qm stop")
    assert pve.kvm_pid() is None
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert result.doc["state_after"] == "stopped"
    assert pve.vm_state()["status"] == "stopped"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_start_brings_a_stopped_vm_back(pve: Any) -> None:
    assert run_verb(pve.verb_config_path, "stop").exit_code == 0
    mark = len(pve.calls())
    result = run_verb(pve.verb_config_path, "start")
    assert result.exit_code == 0, result.doc
    calls = texts(pve)[mark:]
    assert first(calls, "qm status 102 --verbose") < first(calls, "qm start")
    assert result.doc["state_before"] == "stopped" and result.doc["state_after"] == "running"
    assert pve.kvm_pid() is not None


def test_cycle_stops_then_starts_a_new_kvm(pve: Any) -> None:
    old_pid, boot_id = pve.kvm_pid(), pve.vm_state()["boot_id"]
    result = run_verb(pve.verb_config_path, "cycle")
    assert result.exit_code == 0, result.doc
    calls = texts(pve)
    assert_forensics_before(calls, "qm stop")
    assert first(calls, "qm stop") < first(calls, "qm start")
    steps = [s["step"] for s in result.doc["steps"]]
    assert steps[-5:] == ["forensics", "qm stop", "verify kvm gone", "qm start", "verify running"]
    assert pve.kvm_pid() not in (None, old_pid)
    assert pve.vm_state()["boot_id"] > boot_id
    assert result.doc["state_after"] == "running" and not result.doc["cold_case"]


# ------------------------------------------------------------------ faults


def test_hung_probes_time_out_within_the_deadline_and_the_action_proceeds(pve: Any) -> None:
    # QEMU wedged (quit gets no answer: Proxmox then sends SIGTERM, which this kvm obeys)
    pve.set_faults(hang_qm=["status", "config"], hang_qmp="all")
    result = run_verb(pve.verb_config_path, "stop")
    doc = result.doc
    assert result.exit_code == 0, doc
    probes = {p["name"]: p for p in doc["probes"]}
    for name in ("qm_status", "qm_config", "qmp_query_status", "qmp_query_block", "qmp_screendump"):
        assert probes[name]["status"] == "timeout", probes[name]
    assert probes["meminfo"]["status"] == "ok"  # the safe reads still ran
    forensics = next(s for s in doc["steps"] if s["step"] == "forensics")
    assert forensics["elapsed_s"] <= FAST["deadlines"]["forensics_s"] + 1.0
    # nothing answered: the state says so, no guess (the verb's QMP got no greeting)
    assert doc["state_before"] == "monitor unresponsive (no answer)"
    assert pve.kvm_pid() is None and doc["state_after"] == "stopped"
    manifest = json.loads(
        (Path(pve.state_dir) / "bundles" / doc["bundle_id"] / "manifest.json").read_text()
    )
    assert {p["name"]: p["status"] for p in manifest["probes"]}["qm_config"] == "timeout"


def test_reset_resumes_a_vm_paused_by_an_io_error(pve: Any) -> None:
    pve.set_faults(io_error_pause=True)
    pve.set_faults(io_error_pause=False)  # the error happened; reset and resume can now clear it
    assert pve.vm_state()["qmp_status"] == "io-error"
    result = run_verb(pve.verb_config_path, "reset")
    assert result.exit_code == 0, result.doc
    calls = texts(pve)
    assert_forensics_before(calls, "qm reset")
    assert first(calls, "qm reset") < first(calls, "qm resume")
    assert result.doc["state_before"] == "paused (io-error)"
    assert result.doc["state_after"] == "running"
    assert pve.vm_state()["qmp_status"] == "running"


def test_kvm_that_will_not_die_fails_honestly_and_is_not_started(tmp_path: Path) -> None:
    pve = sim_with(tmp_path, deadlines={**FAST["deadlines"], "verify_s": 1.5})
    try:
        pve.start_vm()
        pve.set_faults(stuck_on_stop=True)
        _assert_d_state_cycle_fails(pve)
    finally:
        pve.cleanup()


def _assert_d_state_cycle_fails(pve: Any) -> None:
    pid = pve.kvm_pid()
    result = run_verb(pve.verb_config_path, "cycle")
    doc = result.doc
    assert result.exit_code == 5 and doc["ok"] is False
    assert doc["cold_case"] is True
    assert "cold path" in doc["message"] and str(pid) in doc["message"]
    assert "not started" in doc["message"]
    assert not any(c.startswith("qm start") for c in texts(pve))
    assert doc["state_after"].startswith("kvm alive")
    assert "breakglass-verb:" in result.stderr
    assert ledger(pve)[-1]["cold_case"] is True


@pytest.mark.slow
def test_cycle_completes_when_the_client_disconnects_between_stop_and_start(pve: Any) -> None:
    """As sshd would leave it: the client gone, the pipes closed, a SIGHUP on top."""
    env = verb_env(pve.verb_config_path, "cycle")
    proc = subprocess.Popen(
        [sys.executable, str(VERB_PATH)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        until_sync(
            lambda: any(c.startswith("qm stop") for c in texts(pve)),
            what="the cycle to reach qm stop",
            timeout_s=30,
            interval_s=0.01,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            os.kill(proc.pid, sig)
        disconnected_at = time.time()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert pve.kvm_pid() is not None
    assert pve.vm_state()["status"] == "running"
    started_at = next(t for t, c in pve.calls() if c.startswith("qm start"))
    assert disconnected_at < started_at  # the client was gone before the VM was started again
    assert ledger(pve)[-1]["exit_code"] == 0


def test_two_mutating_verbs_at_once_one_is_busy(pve: Any) -> None:
    pve.set_faults(hang_qm=["config"])  # keeps the first verb in its forensics for probe_s
    env = verb_env(pve.verb_config_path, "cycle")
    first_proc = subprocess.Popen(
        [sys.executable, str(VERB_PATH)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        until_sync(
            lambda: any(c.startswith("qm config") for c in texts(pve)),
            what="the first verb to reach qm config",
            interval_s=0.01,
        )
        second = run_verb(pve.verb_config_path, "reset")
        assert second.exit_code == 3 and second.doc["refused"] == "busy"
        assert first_proc.poll() is None  # refused at once, not queued behind the first
        assert second.elapsed_s < 3.0
        assert "another mutating verb" in second.stderr
        out, _ = first_proc.communicate(timeout=60)
    finally:
        if first_proc.poll() is None:
            first_proc.kill()
            first_proc.wait()
    assert first_proc.returncode == 0, out
    assert not any(c.startswith("qm reset") for c in texts(pve))
    assert [e["verb"] for e in ledger(pve)] == ["cycle", "cycle"]  # begun + done, no reset


def test_a_reset_loop_is_refused_but_start_of_a_stopped_vm_is_not(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, budget={"max_mutating_per_hour": 2, "cooldown_s": 600}, **FAST)
    try:
        sim.start_vm()
        cfg = sim.verb_config_path
        assert run_verb(cfg, "reset").exit_code == 0
        again = run_verb(cfg, "reset")
        assert again.exit_code == 4 and again.doc["refused"] == "cooldown"
        assert again.doc["bundle_id"] is None  # a refusal captures nothing, does nothing
        assert run_verb(cfg, "cycle").doc["refused"] == "cooldown"
        assert run_verb(cfg, "stop").doc["refused"] == "cooldown"  # stop then start = a cycle
        assert run_verb(cfg, "start").exit_code == 0  # running: the budget's second and last
        refused = run_verb(cfg, "start")
        assert refused.exit_code == 4 and refused.doc["refused"] == "budget"
        assert refused.doc["budget"] == {
            "used": 2,
            "limit": 2,
            "window_s": 3600,
            "cooldown_remaining_s": refused.doc["budget"]["cooldown_remaining_s"],
            "forensics_used": 0,
            "forensics_limit": 12,
        }
        sim.stop_vm()  # the VM dies on its own
        back = run_verb(cfg, "start")  # budget spent, VM stopped: never refused
        assert back.exit_code == 0, back.doc
        assert sim.kvm_pid() is not None
        assert run_verb(cfg, "start").doc["refused"] == "budget"  # running now: no exemption
        assert sum(c.startswith("qm reset") for c in texts(sim)) == 1
    finally:
        sim.cleanup()


def test_concurrent_forensics_get_their_own_bundles(pve: Any) -> None:
    env = verb_env(pve.verb_config_path, "forensics")
    procs = [
        subprocess.Popen(
            [sys.executable, str(VERB_PATH)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    docs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    ids = {d["bundle_id"] for d in docs}
    assert len(ids) == 3 and all(d["exit_code"] == 0 for d in docs)
    for bundle_id in ids:
        manifest = Path(pve.state_dir) / "bundles" / bundle_id / "manifest.json"
        assert json.loads(manifest.read_text())["bundle_id"] == bundle_id


def test_retention_keeps_the_newest_bundles(tmp_path: Path) -> None:
    sim = sim_with(tmp_path, retention={"keep_bundles": 2}, **FAST)
    try:
        sim.start_vm()
        ids = [run_verb(sim.verb_config_path, "forensics").doc["bundle_id"] for _ in range(3)]
        kept = sorted(os.listdir(Path(sim.state_dir) / "bundles"))
        assert kept == sorted(ids[1:])
    finally:
        sim.cleanup()


# ------------------------------------------------------------------ behind a real OpenSSH sshd


@pytest.mark.slow
async def test_behind_real_sshd_verbs_work_and_injections_arrive_verbatim_and_are_refused(
    tmp_path: Path,
) -> None:
    """The authorized_keys line the host uses: command="…",restrict. The verb sees exactly what
    the client sent; a shell or subsystem request reaches it with nothing it accepts."""
    import asyncssh

    from tests.support.realparts import new_key, public_line, start_sshd

    sim = sim_with(tmp_path, **FAST)
    forced = tmp_path / "breakglass-verb"
    forced.write_text(
        "#!/bin/sh\n"
        f"BREAKGLASS_VERB_CONFIG={sim.verb_config_path} exec {sys.executable} {VERB_PATH}\n"
    )
    forced.chmod(0o755)
    key = new_key("pve")
    # A subsystem configured as on Debian: sshd routes the request to the forced command.
    server = start_sshd(
        f'command="{forced}",restrict {public_line(key)}\n',
        "Subsystem sftp /usr/lib/openssh/sftp-server",
    )
    try:
        sim.start_vm()
        async with asyncssh.connect(
            "127.0.0.1",
            server.port,
            username="root",
            client_keys=[key],
            known_hosts=asyncssh.import_known_hosts(server.known_hosts),
            config=None,
        ) as conn:
            ok = await conn.run("status", check=False, timeout=30)
            assert ok.exit_status == 0 and json.loads(ok.stdout)["state_after"] == "running"

            hostile = "status; touch /tmp/pwned\n$(reboot) `id` | cycle"
            bad = await conn.run(hostile, check=False, timeout=30)
            assert bad.exit_status == 2 and json.loads(bad.stdout)["refused"] == "bad_input"

            shell = await conn.create_process(term_type=None)  # a shell request
            shell.stdin.write_eof()
            await asyncio.wait_for(shell.wait_closed(), 30)
            assert shell.exit_status == 2
            assert "no command given" in json.loads(await shell.stdout.read())["message"]

            sub = await conn.create_process(subsystem="sftp")
            sub.stdin.write_eof()
            await asyncio.wait_for(sub.wait_closed(), 30)
            assert sub.exit_status == 2
            assert json.loads(await sub.stdout.read())["refused"] == "bad_input"
        log = (Path(sim.state_dir) / "verb.log").read_text().splitlines()
        commands = [
            json.loads(json.loads(line.split(": ", 1)[1])["command"])
            for line in log
            if '"command": "<unset>"' not in line
        ]
        assert hostile in commands  # verbatim, newline and all: nothing was split or stripped
        assert "/usr/lib/openssh/sftp-server" in commands  # the subsystem, routed to the verb
        assert any('"command": "<unset>"' in line for line in log)  # the shell request
        assert not Path("/tmp/pwned").exists()
        assert all(c.startswith(("qm status", "qmp")) for c in texts(sim))  # no action taken
    finally:
        server.close()
        sim.cleanup()


# ------------------------------------------------------------------ the parts, directly


def test_a_hung_child_is_abandoned_at_its_deadline() -> None:
    t0 = time.monotonic()
    res = bv.run_bounded(["sleep", "30"], 0.3)
    assert res.status == "timeout" and time.monotonic() - t0 < 1.5
    assert "0.3 s" in res.detail


def test_a_daemon_holding_the_pipe_does_not_hold_the_verb() -> None:
    """qm start leaves a kvm behind; reading to EOF would wait for it."""
    t0 = time.monotonic()
    res = bv.run_bounded(["sh", "-c", "sleep 30 & echo $!"], 10)
    elapsed = time.monotonic() - t0
    os.kill(int(res.output.split()[0]), signal.SIGKILL)  # the sleep we started, by PID
    assert res.status == "ok" and elapsed < 2.0


def test_child_output_is_capped_and_exit_codes_kept() -> None:
    res = bv.run_bounded(["sh", "-c", "head -c 100000 /dev/zero; exit 3"], 10, max_bytes=1000)
    assert res.status == "error" and res.returncode == 3
    assert len(res.output) == 1000 and res.truncated


def test_budget_fails_closed_when_the_clock_goes_back(tmp_path: Path) -> None:
    cfg = bv.validate_config({"state_dir": str(tmp_path), "budget": {"cooldown_s": 300}})
    future = time.time() + 7200
    for _ in range(2):
        bv.append_ledger(cfg, {"ts": future, "phase": "begun", "verb": "reset"})
    bv.append_ledger(cfg, {"ts": time.time() - 4000, "phase": "begun", "verb": "stop"})
    (tmp_path / "ledger.jsonl").open("a").write("not json\n")
    state = bv.budget_state(cfg)
    assert state["used"] == 2  # the future entries count, the old one has left the window
    assert state["cooldown_remaining_s"] == 300  # capped at the cooldown, not two hours


def test_qm_status_without_qmp_is_not_taken_for_running() -> None:
    # vmstatus sets qmpstatus to the plain status when QMP did not answer: only running-qemu,
    # learnt over the same QMP connection, makes it QEMU's word.
    down = "qmpstatus: running\nstatus: running\n"
    assert bv.parse_qm_status(down) == "running (QMP not answering)"
    assert bv.parse_qm_status(down + "running-qemu: 8.2.2\n") == "running"
    io_error = "qmpstatus: io-error\nrunning-qemu: 8.2.2\nstatus: running\n"
    assert bv.parse_qm_status(io_error) == "paused (io-error)"
    assert bv.parse_qm_status("status: running\npid: 4\n") == "running (QMP not answering)"
    assert bv.parse_qm_status("qmpstatus: stopped\nstatus: stopped\n") == "stopped"
    # nested lines (blockstat) are not top-level fields
    assert bv.parse_qm_status_fields("blockstat:\n\tscsi0:\n\t\tstatus: x\nstatus: stopped\n") == {
        "status": "stopped"
    }


def test_bundles_respect_the_byte_caps(tmp_path: Path) -> None:
    sim = sim_with(
        tmp_path,
        retention={"keep_bundles": 20, "max_bundle_bytes": 30_000, "max_total_bytes": 70_000},
        **FAST,
    )
    try:
        sim.start_vm()
        ids = [run_verb(sim.verb_config_path, "forensics").doc["bundle_id"] for _ in range(4)]
        bundles = Path(sim.state_dir) / "bundles"
        sizes = {
            n: sum(f.stat().st_size for f in (bundles / n).iterdir()) for n in os.listdir(bundles)
        }
        assert all(size <= 30_000 for size in sizes.values()), sizes
        assert sum(sizes.values()) <= 70_000 and ids[-1] in sizes
        assert ids[0] not in sizes  # the oldest went first
        manifest = json.loads((bundles / ids[-1] / "manifest.json").read_text())
        assert any(p["truncated"] for p in manifest["probes"])
    finally:
        sim.cleanup()


# ------------------------------------------------------------------ against a real QEMU


@pytest.fixture
def real_qemu(recording_host: Any):
    """A real qemu-system-x86_64 (paused, no guest) as VM 102's kvm: pid file and QMP socket
    where Proxmox keeps them. The qm beside it only records its calls."""
    run_dir = recording_host.root / "run"
    subprocess.run(
        [
            "qemu-system-x86_64",
            "-S",
            "-display",
            "none",
            "-vga",
            "std",
            "-machine",
            "pc",
            "-m",
            "64",
            "-name",
            "devvm",
            "-pidfile",
            str(run_dir / "102.pid"),
            "-qmp",
            f"unix:{run_dir / '102.qmp'},server=on,wait=off",
            "-daemonize",
        ],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    pid = int((run_dir / "102.pid").read_text())
    try:
        yield recording_host
    finally:
        os.kill(pid, signal.SIGKILL)


def test_forensics_against_a_real_qemu(real_qemu: Any) -> None:
    result = run_verb(real_qemu.config, "forensics")
    doc = result.doc
    assert result.exit_code == 0, doc
    status = {p["name"]: p["status"] for p in doc["probes"]}
    for name in (
        "proc_stat",
        "proc_threads",
        "qmp_query_status",
        "qmp_query_block",
        "qmp_query_blockstats",
        "qmp_screendump",
        "qm_status",
        "qm_config",
    ):
        assert status[name] == "ok", (name, doc["probes"])
    assert doc["state_before"] == "paused (prelaunch)"  # QEMU -S: what QMP says, not qm
    bundle = real_qemu.state_dir / "bundles" / doc["bundle_id"]
    assert (bundle / "screendump.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads((bundle / "qmp_query_status.txt").read_text())["status"] == "prelaunch"
    assert sorted(real_qemu.calls()) == ["config 102", "status 102 --verbose"]


def test_a_helper_left_in_the_vm_scope_is_not_taken_for_a_kvm(pve: Any) -> None:
    """The scope tells whether a kvm outlived its pid file; a helper it may also hold (swtpm,
    say) is not the VM: the VM is stopped, and start is not refused."""
    pve.stop_vm()
    # a process of this simulated host (qm start's "systemctl stop <vmid>.scope" may end it)
    helper = subprocess.Popen(["sleep", "60"], env={"BREAKGLASS_SIM_PVE_DIR": str(pve.root)})
    try:
        procs = Path(pve.root) / "cgroup" / "qemu.slice" / "102.scope" / "cgroup.procs"
        procs.write_text(f"{helper.pid}\n")
        doc = run_verb(pve.verb_config_path, "status").doc
        assert doc["state_after"] == "stopped" and doc["kvm"] is None, doc
        started = run_verb(pve.verb_config_path, "start")
        assert started.exit_code == 0, started.doc
    finally:
        helper.kill()
        helper.wait()
