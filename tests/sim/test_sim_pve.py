"""The simulated Proxmox itself: qm's answers, the kvm process, QMP, faults, the call log,
cleanup. The verb's tests (tests/verb) and the lab trust these behaviours."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
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
from tests.support.waiting import until_sync


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


def top_level(verbose: str) -> dict[str, str]:
    """The top-level keys of `qm status --verbose` (nested values are indented with tabs)."""
    return {
        k: v.strip()
        for k, _, v in (ln.partition(":") for ln in verbose.splitlines() if ln[:1].isalpha())
    }


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
        assert config["budget"]["cooldown_s"] == 0
        assert config["budget"]["max_mutating_per_hour"] == 4
        assert sim.vm_state()["status"] == "stopped" and sim.vm_state()["boot_id"] == 0
        assert qm(sim, "status", "105").stdout == "status: stopped\n"
        # The rest of the host the verb reads, where its config says: /etc/pve (quorate, the
        # VM's config), the VM's cgroup scope, Proxmox's task list.
        pve = Path(config["pve_dir"])
        assert (pve / "qemu-server" / "105.conf").read_text().startswith("boot:")
        assert os.lstat(pve / "local").st_mode & 0o200  # quorate
        assert (Path(config["cgroup_dir"]) / "qemu.slice").is_dir()
        assert (Path(config["pve_log_dir"]) / "tasks").is_dir()
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
    # Proxmox believes the pid file only for a kvm started with -pidfile <that file>.
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0].endswith(b"/kvm") and b"breakglass_tui.lab.sim_kvm" in argv
    assert argv[argv.index(b"-pidfile") + 1] == str(sim.qemu_run_dir / "102.pid").encode()
    assert sim.scope_pids() == [pid]  # the VM's cgroup scope
    state = sim.vm_state()
    assert state["status"] == "running" and state["qmp_status"] == "running"
    assert state["boot_id"] == 1 and state["booted_at"] > time.time() - 30
    assert qm(sim, "status", "102").stdout == "status: running\n"
    fields = top_level(qm(sim, "status", "102", "--verbose").stdout)
    assert fields["pid"] == str(pid) and fields["qmpstatus"] == "running"
    # What only a QMP that answered adds (PVE/QemuServer.pm vmstatus):
    assert fields["running-qemu"] == "8.2.2" and fields["running-machine"] == "pc-i440fx-8.1"
    assert "blockstat" in fields


def test_qm_stop_kills_the_process_and_it_does_not_linger_as_a_zombie(sim: SimPve) -> None:
    pid = sim.start_vm()
    stopped = qm(sim, "stop", "102", "--timeout", "5", "--skiplock", "1")
    assert stopped.returncode == 0, stopped.stderr
    until_sync(lambda: not Path(f"/proc/{pid}").exists(), what="the stopped kvm gone from /proc")
    assert not (sim.qemu_run_dir / "102.pid").exists()
    assert sim.vm_state()["status"] == "stopped" and sim.kvm_pid() is None
    assert sim.scope_pids() == []
    # qm stop ran as a task worker: its UPID is in Proxmox's task list, ended OK.
    active = (sim.root / "pve-log" / "tasks" / "active").read_text().splitlines()
    assert any(":qmstop:102:root@pam: 1 " in line and line.endswith(" OK") for line in active)
    assert qm(sim, "stop", "102").returncode == 0  # stopping a stopped VM is fine, as in Proxmox


def test_a_kvm_that_dies_on_its_own_is_reaped_and_the_vm_reads_stopped(sim: SimPve) -> None:
    pid = sim.start_vm()
    os.kill(pid, signal.SIGKILL)
    until_sync(lambda: not Path(f"/proc/{pid}").exists(), what="the killed kvm gone from /proc")
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
    # Without --verbose qm prints the QMP status too (PVE/CLI/qm.pm status).
    assert qm(sim, "status", "102").stdout == "status: io-error\n"
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


def test_qmp_serves_one_client_and_refuses_more_than_its_backlog_like_qemu(sim: SimPve) -> None:
    """QEMU's chardev/char-socket.c: listen() with a backlog of one, one client served. Two
    more connects wait in the kernel's queue; the next fails at once with EAGAIN (what
    PVE/QMPClient.pm retries on), also once the waiting clients have given up and closed."""
    sim.start_vm()
    first = negotiated(sim)
    queued = [Qmp(sim.qemu_run_dir / "102.qmp", timeout=0.5) for _ in range(2)]
    try:
        with pytest.raises(TimeoutError):
            queued[0].read()  # queued behind the first client: no greeting yet
        third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        third.setblocking(False)
        with pytest.raises(BlockingIOError) as refused:
            third.connect(str(sim.qemu_run_dir / "102.qmp"))
        assert refused.value.errno == errno.EAGAIN
        third.close()
        first.close()
        queued[0].sock.settimeout(5)
        assert "QMP" in queued[0].read()  # served in turn once the first has left
    finally:
        for client in queued:
            client.close()


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


def test_a_wedged_main_loop_reads_as_running_to_qm_and_fills_the_queue(sim: SimPve) -> None:
    """hang_qmp="all": QEMU's main loop is wedged. pvestatd's polls fill the listen queue, every
    later connect fails with EAGAIN, and qm status says "qmpstatus: running" with only
    running-qemu, running-machine and blockstat missing (PVE/QemuServer.pm vmstatus)."""
    sim.start_vm()
    healthy = top_level(qm(sim, "status", "102", "--verbose").stdout)
    sim.set_faults(hang_qmp="all", status_qmp_timeout_s=0.5, qmp_timeout_s=0.5)
    assert sim.pvestatd_polls(3) == 2  # two fit in the queue, the third gets EAGAIN
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    late.setblocking(False)
    with pytest.raises(BlockingIOError):
        late.connect(str(sim.qemu_run_dir / "102.qmp"))
    late.close()
    verbose = qm(sim, "status", "102", "--verbose")
    assert verbose.returncode == 0
    wedged = top_level(verbose.stdout)
    assert wedged["status"] == "running" and wedged["qmpstatus"] == "running"
    assert set(healthy) - set(wedged) == {
        "running-qemu",
        "running-machine",
        "blockstat",
        "diskread",
        "diskwrite",
        "proxmox-support",
    }
    assert qm(sim, "status", "102").stdout == "status: running\n"
    reset = qm(sim, "reset", "102")
    assert reset.returncode == 255
    assert re.fullmatch(
        r"VM 102 qmp command 'system_reset' failed - unable to connect to VM 102 qmp socket"
        r" - timeout after \d+ retries\n",
        reset.stderr,
    )


def test_a_stop_deletes_the_pid_file_while_a_d_state_kvm_lives_on(sim: SimPve) -> None:
    """_do_vm_stop: quit, wait --timeout, SIGTERM, 10 s, SIGKILL, 1 s, then vm_stop_cleanup
    unlinks the pid file whatever happened, and the task says OK. Afterwards qm status says
    stopped, and qm start waits on the VM's scope (wait_for_unit_removed, 20 s) and fails."""
    pid = sim.start_vm()
    sim.set_faults(stuck_on_stop=True, sigterm_wait_s=0.5, scope_wait_s=0.5)
    stopped = qm(sim, "stop", "102", "--timeout", "1")
    assert stopped.returncode == 0 and stopped.stderr == ""
    assert stopped.stdout == (
        "VM still running - terminating now with SIGTERM\n"
        "VM still running - terminating now with SIGKILL\n"
    )
    assert not (sim.qemu_run_dir / "102.pid").exists()
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "D"
    assert sim.scope_pids() == [pid] and sim.vm_state()["kvm_alive"]
    assert qm(sim, "status", "102").stdout == "status: stopped\n"
    again = qm(sim, "start", "102")
    assert (again.returncode, again.stderr) == (255, "timeout waiting on systemd\n")
    assert sim.live_kvm_pid() == pid
    sim.cleanup()
    assert not Path(f"/proc/{pid}").exists()


def test_kvm_d_state_wedges_qmp_and_ignores_sigterm(sim: SimPve) -> None:
    pid = sim.start_vm()
    sim.set_faults(kvm_d_state=True, status_qmp_timeout_s=0.5)
    assert sim.vm_state()["kvm_state"] == "D"
    os.kill(pid, signal.SIGTERM)  # stays pending, like for a process stuck in the kernel
    time.sleep(0.3)  # must not happen within it: the kvm ending
    assert sim.kvm_pid() == pid
    assert "running-qemu" not in qm(sim, "status", "102", "--verbose").stdout


def test_a_config_lock_fails_qm_tasks_like_proxmox(sim: SimPve) -> None:
    """PVE/AbstractConfig.pm check_lock: "VM is locked (backup)" unless --skiplock; and the
    lock-<vmid>.conf flock another task holds is waited for, then given up."""
    sim.start_vm()
    sim.set_lock("backup")
    for sub in ("reset", "stop"):
        locked = qm(sim, sub, "102")
        assert (locked.returncode, locked.stderr) == (255, "VM is locked (backup)\n"), sub
    assert "lock: backup\n" in qm(sim, "status", "102", "--verbose").stdout
    assert sim.kvm_pid() is not None
    assert qm(sim, "stop", "102", "--skiplock", "1", "--timeout", "2").returncode == 0
    assert sim.kvm_pid() is None
    sim.set_lock(None)
    sim.start_vm()
    sim.set_faults(config_lock_wait_s=0.5)
    with sim.config_lock_held():
        t0 = time.monotonic()
        busy = qm(sim, "reset", "102")
        waited = time.monotonic() - t0
    assert busy.returncode == 255 and busy.stdout == "trying to acquire lock...\n"
    lock_file = sim.root / "lock" / "lock-102.conf"
    assert busy.stderr == f"can't lock file '{lock_file}' - got timeout\n"
    assert waited >= 0.5


def test_an_ha_managed_vm_start_and_stop_only_request_it(sim: SimPve) -> None:
    """PVE/API2/Qemu.pm: start and stop of an HA resource become HA requests and return at
    once; the HA stack acts later. reset is not redirected."""
    pid = sim.start_vm()
    sim.set_faults(ha_delay_s=1.0)
    sim.set_ha("started")
    stop = qm(sim, "stop", "102")
    assert (stop.returncode, stop.stdout) == (0, "Requesting HA stop for VM 102\n")
    assert sim.kvm_pid() == pid and sim.ha_state() == "stopped"  # not yet: requested only
    until_sync(lambda: sim.kvm_pid() is None, what="the HA stack never stopped the VM")
    start = qm(sim, "start", "102")
    assert (start.returncode, start.stdout) == (0, "Requesting HA start for VM 102\n")
    assert sim.kvm_pid() is None and sim.ha_state() == "started"
    until_sync(lambda: sim.kvm_pid() is not None, what="the HA stack never started the VM")
    boot = sim.vm_state()["boot_id"]
    assert qm(sim, "reset", "102").returncode == 0  # not redirected
    assert sim.vm_state()["boot_id"] == boot + 1


def test_without_quorum_start_fails_and_stop_works(sim: SimPve) -> None:
    """pve-cluster PVE/Cluster.pm check_cfs_quorum, called by vm_start only."""
    sim.start_vm()
    sim.set_quorum(False)
    assert qm(sim, "stop", "102", "--timeout", "2").returncode == 0
    start = qm(sim, "start", "102")
    assert (start.returncode, start.stderr) == (255, "cluster not ready - no quorum?\n")
    sim.set_quorum(True)
    assert qm(sim, "start", "102").returncode == 0


def test_qm_tasks_run_in_a_worker_that_dies_half_done_when_qm_is_killed(sim: SimPve) -> None:
    """pve-common PVE/RESTEnvironment.pm fork_worker: the worker calls setsid(), names itself
    "task UPID:…" and writes through qm; kill qm's process group and the worker dies at its next
    write — here before it sends the SIGTERM of _do_vm_stop: the stop is left half done."""
    pid = sim.start_vm()
    sim.set_faults(hang_qmp="all", quit_timeout_s=1.0, sigterm_wait_s=1.0)
    proc = subprocess.Popen(
        [str(sim.qm_path), "stop", "102"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    try:
        worker = until_sync(lambda: _task_child(proc.pid), what="no task worker")
        upid = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert re.fullmatch(
            r"task UPID:pve:[0-9A-F]{8}:[0-9A-F]{8}:[0-9A-F]{8}:qmstop:102:root@pam:", upid
        )
        assert upid[5:] in (sim.root / "pve-log" / "tasks" / "active").read_text()
        assert os.getsid(worker) == worker != os.getsid(proc.pid)  # setsid(): its own session
        os.killpg(proc.pid, signal.SIGKILL)  # what the old verb did at its deadline
        proc.wait(5)
        until_sync(lambda: not Path(f"/proc/{worker}").exists() or _zombie(worker), what="worker")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    time.sleep(1.5)  # past the SIGTERM the worker would have sent
    assert sim.kvm_pid() == pid, "the kvm was stopped after all"
    assert (sim.qemu_run_dir / "102.pid").exists()


def _task_child(pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and cmdline.startswith(b"task "):
                    return int(entry)
    return None


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


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
        "qmp query-proxmox-support",
        "qmp query-blockstats",
        "qmp query-machines",
        "qmp query-version",
        "qmp query-balloon",
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
