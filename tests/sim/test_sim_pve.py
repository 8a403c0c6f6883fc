"""The simulated Proxmox itself: qm's answers, the kvm process, QMP, faults, the call log,
cleanup. The verb's tests (tests/verb) and the lab trust these behaviours."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import tomllib
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.lab.sim_pve import SimPve


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimPve]:
    pve = SimPve.create(tmp_path / "pve")
    try:
        yield pve
    finally:
        pve.cleanup()


def qm(sim: SimPve, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run the simulated qm as the verb does: an argv, an almost empty environment."""
    return subprocess.run(
        [str(sim.qm_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )


class Qmp:
    """A minimal QMP client for the tests: lines of JSON over the unix socket."""

    def __init__(self, path: Path, timeout: float = 3.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP closed the connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def send(self, execute: str, **arguments: Any) -> None:
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def command(self, execute: str, **arguments: Any) -> dict[str, Any]:
        self.send(execute, **arguments)
        while True:
            reply = self.read()
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.sock.close()


def negotiated(sim: SimPve) -> Qmp:
    client = Qmp(sim.qemu_run_dir / f"{sim.vmid}.qmp")
    assert "QMP" in client.read()
    assert client.command("qmp_capabilities") == {"return": {}}
    return client


# -- layout ----------------------------------------------------------------------------------
def test_create_lays_out_what_the_verb_config_points_at(tmp_path: Path) -> None:
    sim = SimPve.create(
        tmp_path / "pve", 105, deadlines={"forensics_s": 3}, budget={"cooldown_s": 0}
    )
    try:
        config = tomllib.loads(sim.verb_config_path.read_text())
        assert config["vmid"] == 105
        assert config["qm"] == str(sim.qm_path) and os.access(sim.qm_path, os.X_OK)
        assert Path(config["qemu_run_dir"]) == sim.qemu_run_dir and sim.qemu_run_dir.is_dir()
        assert Path(config["state_dir"]) == sim.state_dir
        assert sim.state_dir.stat().st_mode & 0o777 == 0o700
        # An override changes one key of a table and keeps the others.
        assert config["deadlines"]["forensics_s"] == 3 and config["deadlines"]["probe_s"] == 2
        assert config["budget"] == {"max_mutating_per_hour": 4, "cooldown_s": 0}
        assert sim.vm_state()["status"] == "stopped" and sim.vm_state()["boot_id"] == 0
        assert qm(sim, "status", "105").stdout == "status: stopped\n"
    finally:
        sim.cleanup()


def test_a_long_root_still_gives_a_qmp_socket_path_that_fits(tmp_path: Path) -> None:
    sim = SimPve.create(tmp_path / ("x" * 90) / "pve")
    try:
        sim.start_vm()
        qmp_path = sim.qemu_run_dir / "102.qmp"
        assert len(str(qmp_path)) < 108 and qmp_path.exists()
        assert (sim.root / "run").resolve() == sim.qemu_run_dir
        assert qm(sim, "status", "102").stdout == "status: running\n"
    finally:
        sim.cleanup()
    assert not sim.qemu_run_dir.exists()


# -- qm and the kvm process ------------------------------------------------------------------
def test_qm_start_runs_a_real_kvm_process_with_pid_file_and_qmp_socket(sim: SimPve) -> None:
    assert qm(sim, "status", "102").stdout == "status: stopped\n"
    started = qm(sim, "start", "102")
    assert started.returncode == 0, started.stderr
    pid = sim.kvm_pid()
    assert pid is not None
    assert (sim.qemu_run_dir / "102.pid").read_text().strip() == str(pid)
    assert b"breakglass_tui.lab.sim_kvm" in Path(f"/proc/{pid}/cmdline").read_bytes()
    state = sim.vm_state()
    assert state["status"] == "running" and state["qmp_status"] == "running"
    assert state["boot_id"] == 1 and state["booted_at"] > time.time() - 30
    assert qm(sim, "status", "102").stdout == "status: running\n"
    verbose = qm(sim, "status", "102", "--verbose").stdout
    assert f"pid: {pid}\n" in verbose and "qmpstatus: running\n" in verbose


def test_qm_stop_kills_the_process_and_it_does_not_linger_as_a_zombie(sim: SimPve) -> None:
    pid = sim.start_vm()
    stopped = qm(sim, "stop", "102", "--timeout", "5", "--skiplock", "1")
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists(), "the stopped kvm is still in /proc"
    assert not (sim.qemu_run_dir / "102.pid").exists()
    assert sim.vm_state()["status"] == "stopped" and sim.kvm_pid() is None
    assert qm(sim, "stop", "102").returncode == 0  # stopping a stopped VM is fine, as in Proxmox


def test_a_kvm_that_dies_on_its_own_is_reaped_and_the_vm_reads_stopped(sim: SimPve) -> None:
    pid = sim.start_vm()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()
    assert json.loads((sim.root / "vm.json").read_text())["status"] == "stopped"
    assert qm(sim, "status", "102").stdout == "status: stopped\n"


def test_qm_refusals_are_shaped_like_proxmox(sim: SimPve) -> None:
    not_running = qm(sim, "reset", "102")
    assert (not_running.returncode, not_running.stderr) == (255, "VM 102 not running\n")
    assert qm(sim, "resume", "102").returncode == 255
    sim.start_vm()
    again = qm(sim, "start", "102")
    assert (again.returncode, again.stderr) == (255, "VM 102 already running\n")
    other = qm(sim, "status", "103")
    assert other.returncode == 2 and "103.conf' does not exist" in other.stderr
    unknown = qm(sim, "destroy", "102")
    assert unknown.returncode == 255 and "unknown command 'qm destroy'" in unknown.stderr
    bad_option = qm(sim, "stop", "102", "--purge")
    assert bad_option.returncode == 255 and "Unknown option: purge" in bad_option.stderr
    config = qm(sim, "config", "102")
    assert config.returncode == 0 and "name: devvm\n" in config.stdout
    assert "scsi0: local-lvm:vm-102-disk-0" in config.stdout


def test_reset_reboots_in_place_and_a_vm_paused_by_io_error_stays_paused(sim: SimPve) -> None:
    pid = sim.start_vm()
    assert qm(sim, "reset", "102").returncode == 0
    state = sim.vm_state()
    assert state["boot_id"] == 2 and sim.kvm_pid() == pid  # same process: QEMU kept
    sim.set_faults(io_error_pause=True)
    assert sim.vm_state()["qmp_status"] == "io-error"
    assert "qmpstatus: io-error\n" in qm(sim, "status", "102", "--verbose").stdout
    assert qm(sim, "reset", "102").returncode == 0
    state = sim.vm_state()
    assert state["boot_id"] == 3 and state["qmp_status"] == "io-error", "reset must not resume"
    assert qm(sim, "resume", "102").returncode == 0
    assert sim.vm_state()["qmp_status"] == "running"


def test_shutdown_powers_a_running_guest_off(sim: SimPve) -> None:
    pid = sim.start_vm()
    done = qm(sim, "shutdown", "102", "--timeout", "5")
    assert done.returncode == 0, done.stderr
    assert sim.vm_state()["status"] == "stopped" and not Path(f"/proc/{pid}").exists()


# -- QMP -------------------------------------------------------------------------------------
def test_qmp_speaks_the_protocol_like_qemu(sim: SimPve, tmp_path: Path) -> None:
    sim.start_vm()
    client = Qmp(sim.qemu_run_dir / "102.qmp")
    try:
        greeting = client.read()
        assert greeting["QMP"]["version"]["qemu"]["major"] == 8
        refused = client.command("query-status")
        assert refused["error"]["class"] == "CommandNotFound"
        assert client.command("qmp_capabilities") == {"return": {}}
        status = client.command("query-status")
        assert status == {"return": {"status": "running", "singlestep": False, "running": True}}
        client.send("query-name")
        client.sock.sendall(b'{"execute": "query-status", "id": "x-7"}\n')
        assert client.read() == {"return": {"name": "devvm"}}
        assert client.read()["id"] == "x-7"
        block = client.command("query-block")["return"][0]
        assert block["device"] == "drive-scsi0" and block["io-status"] == "ok"
        stats = client.command("query-blockstats")["return"][0]["stats"]
        assert stats["failed_wr_operations"] == 0
        assert client.command("no-such-thing")["error"]["class"] == "CommandNotFound"
        # QEMU sends events between replies: a RESET follows system_reset's return.
        client.send("system_reset")
        assert client.read() == {"return": {}}
        event = client.read()
        assert event["event"] == "RESET" and "timestamp" in event
        assert client.command("stop") == {"return": {}}
        assert client.command("query-status")["return"]["status"] == "paused"
        assert client.command("cont") == {"return": {}}
        assert client.command("query-status")["return"]["running"] is True
    finally:
        client.close()


def test_screendump_writes_a_real_png(sim: SimPve, tmp_path: Path) -> None:
    sim.start_vm()
    client = negotiated(sim)
    target = tmp_path / "screen.png"
    try:
        assert client.command("screendump", filename=str(target), format="png") == {"return": {}}
        missing = client.command(
            "screendump", filename=str(tmp_path / "no" / "dir.png"), format="png"
        )
        assert missing["error"]["class"] == "GenericError"
    finally:
        client.close()
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (320, 200)
    idat_len = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    pixels = zlib.decompress(data[41 : 41 + idat_len])
    assert len(pixels) == height * (1 + width * 3)


def test_qmp_serves_one_client_at_a_time(sim: SimPve) -> None:
    sim.start_vm()
    first = negotiated(sim)
    second = Qmp(sim.qemu_run_dir / "102.qmp", timeout=0.5)
    try:
        with pytest.raises(TimeoutError):
            second.read()  # queued behind the first client: no greeting yet
        first.close()
        second.sock.settimeout(3)
        assert "QMP" in second.read()
    finally:
        second.close()


# -- faults ----------------------------------------------------------------------------------
def test_hang_qm_makes_that_subcommand_never_answer(sim: SimPve) -> None:
    sim.start_vm()
    sim.set_faults(hang_qm=["status"])
    hung = subprocess.Popen([str(sim.qm_path), "status", "102"], stdout=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            hung.wait(1.5)
        # Other subcommands still answer; the hung call was logged before it hung.
        assert qm(sim, "config", "102").returncode == 0
        assert "qm status 102" in sim.call_texts()
    finally:
        sim.cleanup()  # cleanup finds the hung qm by its recorded PID and kills it
    assert hung.wait(5) == -signal.SIGKILL


def test_hang_qmp_on_one_command_holds_only_that_command(sim: SimPve) -> None:
    sim.start_vm()
    sim.set_faults(hang_qmp=["query-block"])
    client = negotiated(sim)
    try:
        assert client.command("query-status")["return"]["running"] is True
        client.send("query-block")
        client.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            client.read()
    finally:
        client.close()
    # Once the caller gives up, the next client is served; clearing the fault heals it.
    sim.set_faults(hang_qmp=[])
    client = negotiated(sim)
    try:
        assert client.command("query-block")["return"][0]["io-status"] == "ok"
    finally:
        client.close()


def test_hang_qmp_all_sends_no_greeting_and_qm_status_falls_back_to_running(sim: SimPve) -> None:
    sim.start_vm()
    sim.set_faults(hang_qmp="all", qmp_timeout_s=0.5)
    client = Qmp(sim.qemu_run_dir / "102.qmp", timeout=0.7)
    try:
        with pytest.raises(TimeoutError):
            client.read()
    finally:
        client.close()
    verbose = qm(sim, "status", "102", "--verbose")
    assert verbose.returncode == 0
    assert "status: running\n" in verbose.stdout and "qmpstatus" not in verbose.stdout
    reset = qm(sim, "reset", "102")
    assert reset.returncode == 255
    assert reset.stderr == "VM 102 qmp command 'system_reset' failed - got timeout\n"


def test_stuck_on_stop_leaves_kvm_alive_while_qm_says_ok(sim: SimPve) -> None:
    pid = sim.start_vm()
    sim.set_faults(stuck_on_stop=True, qmp_timeout_s=0.5)
    stopped = qm(sim, "stop", "102")
    assert stopped.returncode == 0 and stopped.stderr == ""
    time.sleep(0.3)
    assert sim.kvm_pid() == pid, "the D-state kvm must survive qm stop"
    os.kill(pid, signal.SIGTERM)  # ignored now, like a process in D state
    time.sleep(0.3)
    assert sim.kvm_pid() == pid
    assert "qmpstatus" not in qm(sim, "status", "102", "--verbose").stdout  # QMP is dead too
    again = qm(sim, "start", "102")
    assert again.returncode == 255 and "already running" in again.stderr
    sim.cleanup()
    assert not Path(f"/proc/{pid}").exists()


def test_set_faults_rejects_unknown_names(sim: SimPve) -> None:
    with pytest.raises(TypeError, match="unknown sim fault"):
        sim.set_faults(hang_everything=True)
    with pytest.raises(TypeError, match="hang_qmp"):
        sim.set_faults(hang_qmp="query-status")
    sim.set_faults(hang_qm=("reset",))
    assert sim.faults()["hang_qm"] == ["reset"] and sim.faults()["stuck_on_stop"] is False


# -- call log and cleanup --------------------------------------------------------------------
def test_the_call_log_holds_every_qm_call_and_qmp_command_in_order(sim: SimPve) -> None:
    sim.start_vm()
    before = time.time()
    qm(sim, "status", "102", "--verbose")
    qm(sim, "reset", "102")
    calls = sim.calls()
    assert [text for _, text in calls] == [
        "qm status 102 --verbose",
        "qmp qmp_capabilities",
        "qmp query-status",
        "qm reset 102",
        "qmp qmp_capabilities",
        "qmp system_reset",
    ]
    stamps = [stamp for stamp, _ in calls]
    assert stamps == sorted(stamps) and stamps[0] >= before - 1


def test_cleanup_kills_only_the_sim_processes_of_its_root(tmp_path: Path) -> None:
    mine = SimPve.create(tmp_path / "a")
    other = SimPve.create(tmp_path / "b")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        mine_pid, other_pid = mine.start_vm(), other.start_vm()
        # A PID recorded in sim-pids that is not a sim process of this root is left alone.
        with open(mine.root / "sim-pids", "a") as pids:
            pids.write(f"kvm {bystander.pid}\nkvm {other_pid}\n")
        mine.cleanup()
        assert not Path(f"/proc/{mine_pid}").exists()
        assert bystander.poll() is None and other.kvm_pid() == other_pid
    finally:
        other.cleanup()
        bystander.kill()
        bystander.wait()


def test_cleanup_leaves_the_vm_stopped_on_record_and_can_run_twice(tmp_path: Path) -> None:
    sim = SimPve.create(tmp_path / "pve")
    pid = sim.start_vm()
    sim.cleanup()
    # The reaper's write is done by the time cleanup returns: the root can be removed at once.
    assert json.loads((sim.root / "vm.json").read_text())["status"] == "stopped"
    assert not Path(f"/proc/{pid}").exists()
    sim.cleanup()


def test_sim_qm_starts_fast(sim: SimPve) -> None:
    qm(sim, "status", "102")  # warm the page cache
    started = time.monotonic()
    for _ in range(5):
        assert qm(sim, "status", "102").returncode == 0
    per_call = (time.monotonic() - started) / 5
    assert per_call < 0.5, f"sim qm takes {per_call:.2f}s per call: it must stay stdlib-only"
