"""The eight ways a real Proxmox VE host contradicted the verb (issue 11), each proven against
the simulated Proxmox — which now behaves as qemu-server, pve-guest-common, pve-cluster,
pve-ha-manager and QEMU's socket chardev say — with the real breakglass-verb behind a real
OpenSSH sshd (``command="…",restrict``).

Run with ``BREAKGLASS_VERB_UNDER_TEST=<an older breakglass_verb.py>`` to see the older verb fail
them (the verb from before these findings fails each of the eight).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from breakglass_tui.lab.sim_pve import SimPve
from tests.sshd_verb.hung_fuse import hung_fuse_mount
from tests.support.realparts import (
    SSHD,
    Sshd,
    free_port,
    new_key,
    public_line,
    start_sshd,
    wait_for_port,
)
from tests.support.waiting import until
from tests.verb.conftest import FAST_DEADLINES, PROXMOX_TIMINGS, VERB_PATH

pytestmark = pytest.mark.slow

KEY = new_key("breakglass-pve")

# Runs an older verb (argv[1]) on the test's config, keeping only the keys it knows.
COMPAT_SHIM = """
import importlib.util, json, os, sys, tomllib
spec = importlib.util.spec_from_file_location("old_verb", sys.argv[1])
verb = sys.modules["old_verb"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(verb)
config = tomllib.load(open(os.environ["BREAKGLASS_VERB_CONFIG"], "rb"))
known = verb.DEFAULT_CONFIG
kept = {}
for key, value in config.items():
    if key in known and isinstance(value, dict):
        kept[key] = {k: v for k, v in value.items() if k in known[key]}
    elif key in known:
        kept[key] = value
path = os.environ["BREAKGLASS_VERB_CONFIG"] + ".compat.toml"
lines = [f"{k} = {json.dumps(v)}" for k, v in kept.items() if not isinstance(v, dict)]
for table, items in kept.items():
    if isinstance(items, dict):
        lines += [f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in items.items()]
open(path, "w").write("\\n".join(lines) + "\\n")
os.environ["BREAKGLASS_VERB_CONFIG"] = path
sys.exit(verb.main())
"""


@dataclass
class Host:
    """One simulated PVE host, reached through the module's real sshd."""

    sim: SimPve
    sshd: Sshd

    async def verb(self, command: str, timeout: float = 90) -> tuple[int, dict[str, Any]]:
        async with asyncssh.connect(
            "127.0.0.1",
            self.sshd.port,
            username="root",
            client_keys=[KEY],
            known_hosts=asyncssh.import_known_hosts(self.sshd.known_hosts),
            config=None,
            agent_path=None,
            connect_timeout=15,
        ) as conn:
            done = await asyncio.wait_for(conn.run(command, check=False), timeout)
        assert done.exit_status is not None, done
        return done.exit_status, json.loads(done.stdout)

    def calls(self, since: int = 0) -> list[str]:
        return self.sim.call_texts()[since:]

    def mutating_qm_calls(self, since: int = 0) -> list[str]:
        return [c for c in self.calls(since) if c.split()[:2][-1] in ("reset", "stop", "start")]


@pytest.fixture(scope="module")
def sshd_and_pointer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, Path]]:
    """One real sshd for the module; its forced command runs the verb with the config that
    ``pointer`` names (each test points it at its own simulated host)."""
    work = tmp_path_factory.mktemp("findings")
    pointer = work / "current-config"
    pointer.write_text("/nonexistent\n")
    forced = work / "breakglass-verb"
    run = f"exec {sys.executable} {VERB_PATH}\n"
    if os.environ.get("BREAKGLASS_VERB_UNDER_TEST"):
        # An older verb refuses config keys it does not know: give it the ones it knows.
        shim = work / "compat.py"
        shim.write_text(COMPAT_SHIM)
        run = f"exec {sys.executable} {shim} {VERB_PATH}\n"
    forced.write_text(
        "#!/bin/sh\n"
        f'BREAKGLASS_VERB_CONFIG="$(cat {pointer})"\n'
        "export BREAKGLASS_VERB_CONFIG\n" + run
    )
    forced.chmod(0o755)
    sshd = start_sshd(f'command="{forced}",restrict {public_line(KEY)}\n')
    try:
        yield sshd, pointer
    finally:
        sshd.close()


@pytest.fixture
async def make_host(tmp_path: Path, sshd_and_pointer: tuple[Sshd, Path]) -> AsyncIterator[Any]:
    """A factory: a simulated PVE host (VM running, Proxmox's timings shrunk) with verb config
    overrides, reached through the module's sshd. Cleaned up after the test."""
    sshd, pointer = sshd_and_pointer
    made: list[SimPve] = []

    async def make(**config: dict[str, Any]) -> Host:
        overrides: dict[str, Any] = {
            "budget": {"max_mutating_per_hour": 100, "cooldown_s": 0},
            "deadlines": dict(FAST_DEADLINES),
        }
        for key, value in config.items():
            overrides[key] = {**overrides.get(key, {}), **value}
        sim = await asyncio.to_thread(SimPve.create, tmp_path / "pve", 102, **overrides)
        made.append(sim)
        sim.set_faults(**PROXMOX_TIMINGS)
        sim.start_vm()
        pointer.write_text(f"{sim.verb_config_path}\n")
        return Host(sim, sshd)

    try:
        yield make
    finally:
        for sim in made:
            await asyncio.to_thread(wait_lock_free, sim, 60)
            await asyncio.to_thread(sim.cleanup)


@pytest.fixture
async def host(make_host: Any) -> Host:
    return await make_host()


def lock_is_free(sim: SimPve) -> bool:
    with open(sim.state_dir / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True


def wait_lock_free(sim: SimPve, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (sim.state_dir / "lock").exists() or lock_is_free(sim):
            return True
        time.sleep(0.1)
    return False


# -- 1. A wedged QEMU reads as "running" ------------------------------------------------------


async def test_1_a_wedged_qemu_is_not_reported_as_running(host: Host) -> None:
    """qm status says "qmpstatus: running" when QMP does not answer (vmstatus); only the verb's
    own QMP check, and running-qemu, tell the truth."""
    host.sim.set_faults(hang_qmp="all")
    host.sim.pvestatd_polls(2)  # pvestatd's polls fill QEMU's listen queue
    code, doc = await host.verb("status")
    assert code == 0, doc
    assert "running" not in doc["state_before"]
    assert doc["state_after"] == "monitor unresponsive (queue full)"
    assert doc["qm_status"]["qmpstatus"] == "running"  # what qm printed…
    assert doc["qm_status"]["qmpstatus_trusted"] is False  # …without running-qemu
    assert doc["monitor"]["ok"] is False and doc["monitor"]["unresponsive"] == "queue full"
    code, doc = await host.verb("forensics")
    assert code == 0 and doc["state_before"] == "monitor unresponsive (queue full)", doc


# -- 2. QMP refuses a second client at once -----------------------------------------------------


async def test_2_a_full_monitor_queue_is_named_and_qmp_is_used_briefly(host: Host) -> None:
    """QEMU serves one QMP client with a listen backlog of one: behind a client that holds it,
    two more wait and the next connect fails at once with EAGAIN. The verb says so, quickly."""
    qmp = host.sim.qemu_run_dir / "102.qmp"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(str(qmp))  # the GUI's console, say: served, holding the one slot
    holder.settimeout(5)
    assert b"QMP" in holder.recv(4096)
    assert host.sim.pvestatd_polls(3) == 2  # the queue is full
    try:
        t0 = time.monotonic()
        code, doc = await host.verb("status")
        elapsed = time.monotonic() - t0
    finally:
        holder.close()
    assert code == 0, doc
    assert doc["state_after"] == "monitor unresponsive (queue full)"
    assert doc["monitor"]["unresponsive"] == "queue full"
    assert "EAGAIN" in doc["monitor"]["detail"]
    assert elapsed < 15, elapsed  # EAGAIN is retried briefly, not waited out
    # Healthy again: forensics talks QMP once, on one connection, after qm status and qm config.
    await until(
        lambda: asyncio.to_thread(lambda: _qmp_answers(qmp)),
        what="QMP answering again",
        timeout_s=30.0,
        interval_s=0.1,
    )
    before = len(host.calls())
    code, doc = await host.verb("forensics")
    assert code == 0, doc
    calls = host.calls(before)
    # qm status opens one QMP connection of its own; the verb opens exactly one more.
    assert calls.count("qmp qmp_capabilities") == 2, calls
    verb_qmp = calls.index("qmp query-block")  # only the verb asks for query-block
    assert verb_qmp > calls.index("qm status 102 --verbose")
    assert verb_qmp > calls.index("qm config 102")
    assert calls[verb_qmp - 2 : verb_qmp] == ["qmp qmp_capabilities", "qmp query-status"]
    probes = {p["name"]: p["status"] for p in doc["probes"]}
    assert probes["pve_tasks_active"] == "ok" and "journal_qmeventd" in probes


def _qmp_answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
            return b"QMP" in s.recv(4096)
    except OSError:
        return False


# -- 3. Killing qm at the deadline leaves the action half done --------------------------------


async def test_3_a_stop_past_the_ceiling_is_left_running_and_start_completes_the_cycle(
    make_host: Any,
) -> None:
    """qm's worker dies at its next write when qm is killed; so the verb never kills a mutating
    qm call. Past the ceiling, a cycle reports the stop still in progress (with its UPID), keeps
    its lock until the stop task has ended, and the next start completes the cycle."""
    host = await make_host(deadlines={"qm_action_s": 3})
    pid = host.sim.kvm_pid()
    # QEMU wedged: quit gets no answer for quit_timeout_s (Proxmox: 60 s), then SIGTERM.
    host.sim.set_faults(hang_qmp="all", quit_timeout_s=6.0, sigterm_wait_s=1.0)
    t0 = time.monotonic()
    code, doc = await host.verb("cycle")
    assert code == 8, doc
    assert time.monotonic() - t0 < 30
    assert doc["message"].startswith("stop still in progress, start not attempted")
    upid = doc["upid"]
    assert upid and ":qmstop:102:" in upid and upid in doc["message"]
    assert doc["ok"] is False and doc["cold_case"] is False
    assert not any(c.startswith("qm start") for c in host.calls())
    # The stop task was not killed: it goes on and stops the VM.
    busy_code, busy = await host.verb("reset")
    assert busy_code == 3 and busy["refused"] == "busy", busy  # the task holds the verb's lock
    await until(
        lambda: asyncio.to_thread(
            lambda: host.sim.live_kvm_pid() is None and not Path(f"/proc/{pid}").exists()
        ),
        what="the stop task stopping the VM",
        timeout_s=30.0,
        interval_s=0.1,
    )
    await until(
        lambda: asyncio.to_thread(lambda: lock_is_free(host.sim)),
        what="the lock freed once the task ended",
        timeout_s=30.0,
        interval_s=0.1,
    )
    host.sim.set_faults(hang_qmp=[])
    code, doc = await host.verb("status")
    assert doc["state_after"] == "stopped" and doc["pending_start"]["upid"] == upid
    code, doc = await host.verb("start")
    assert code == 0, doc
    assert "interrupted cycle is complete" in doc["message"] and host.sim.kvm_pid() is not None
    code, doc = await host.verb("status")
    assert doc["pending_start"] is None


# -- 4. Locks are not a cold case ---------------------------------------------------------------


async def test_4_a_locked_vm_is_refused_at_once_and_not_as_a_cold_case(host: Host) -> None:
    host.sim.set_lock("backup")  # vzdump at work
    before = len(host.calls())
    for verb in ("reset", "stop", "cycle"):
        t0 = time.monotonic()
        code, doc = await host.verb(verb)
        assert code == 7 and doc["refused"] == "locked", doc
        assert "locked (backup)" in doc["message"] and doc["lock"] == "backup"
        assert doc["cold_case"] is False and doc["bundle_id"] is None
        assert time.monotonic() - t0 < 10
    assert host.mutating_qm_calls(before) == []
    assert host.sim.kvm_pid() is not None
    code, doc = await host.verb("status")
    assert doc["lock"] == "backup" and "locked (backup)" in doc["message"]


async def test_4_the_owner_may_let_stop_skip_a_backup_lock_only(make_host: Any) -> None:
    host = await make_host(policy={"stop_skips_backup_lock": True})
    host.sim.set_lock("backup")
    code, doc = await host.verb("cycle")
    assert code == 7 and doc["refused"] == "locked", doc  # start could not follow
    code, doc = await host.verb("stop")
    assert code == 0, doc
    assert any(c.startswith("qm stop 102 ") and "--skiplock 1" in c for c in host.calls())
    host.sim.set_lock("migrate")
    host.sim.start_vm()
    code, doc = await host.verb("stop")
    assert code == 7 and "locked (migrate)" in doc["message"], doc


async def test_4_a_config_lock_held_by_another_task_is_waited_for_and_named(host: Host) -> None:
    with host.sim.config_lock_held():
        code, doc = await host.verb("reset")
    assert code == 5 and doc["cold_case"] is False, doc
    assert "config lock" in doc["message"] and "lock-102.conf" in doc["message"]


# -- 5. HA-managed VMs ----------------------------------------------------------------------------


async def test_5_stop_and_cycle_of_an_ha_vm_are_refused_naming_ha_manager(host: Host) -> None:
    host.sim.set_ha("started")
    before = len(host.calls())
    for verb in ("stop", "cycle"):
        code, doc = await host.verb(verb)
        assert code == 7 and doc["refused"] == "ha_managed", doc
        assert "ha-manager" in doc["message"] and doc["ha"]["managed"] is True
    assert host.mutating_qm_calls(before) == []
    assert host.sim.ha_state() == "started" and host.sim.kvm_pid() is not None
    boot = host.sim.vm_state()["boot_id"]
    code, doc = await host.verb("reset")  # qm reset is not redirected to HA
    assert code == 0, doc
    assert host.sim.vm_state()["boot_id"] == boot + 1


async def test_5_start_of_an_ha_vm_is_an_ha_request_verified_over_a_longer_window(
    host: Host,
) -> None:
    host.sim.set_faults(ha_delay_s=3.0)  # the CRM/LRM act on a loop of their own
    host.sim.set_ha("stopped")
    await until(
        lambda: asyncio.to_thread(lambda: host.sim.kvm_pid() is None),
        what="the HA stack stopping the VM",
        timeout_s=30.0,
        interval_s=0.1,
    )
    code, doc = await host.verb("start")
    assert code == 0, doc
    assert "HA stack" in doc["message"] and host.sim.ha_state() == "started"
    assert host.sim.kvm_pid() is not None


# -- 6. No quorum, no start -----------------------------------------------------------------------


async def test_6_without_quorum_a_cycle_is_refused_and_reset_still_works(host: Host) -> None:
    host.sim.set_quorum(False)
    before = len(host.calls())
    code, doc = await host.verb("cycle")
    assert code == 7 and doc["refused"] == "no_quorum", doc
    assert "quorum" in doc["message"] and doc["quorum"] is False
    assert host.mutating_qm_calls(before) == [] and host.sim.kvm_pid() is not None
    code, doc = await host.verb("reset")
    assert code == 0, doc
    code, doc = await host.verb("status")
    assert doc["quorum"] is False and "no quorum" in doc["message"]


# -- 7. The pid file is not liveness ------------------------------------------------------------


async def test_7_a_d_state_kvm_whose_pid_file_was_deleted_stays_alive(host: Host) -> None:
    """Proxmox's stop clean-up deletes the pid file while a D-state kvm survives SIGKILL; the
    VM's scope still lists it. status must not say stopped, start must not block on it."""
    pid = host.sim.kvm_pid()
    host.sim.set_faults(stuck_on_stop=True)
    code, doc = await host.verb("stop")
    assert code == 5 and doc["cold_case"] is True, doc
    assert doc["state_after"].startswith("kvm alive")
    assert not (host.sim.qemu_run_dir / "102.pid").exists()  # Proxmox deleted it
    assert host.sim.scope_pids() == [pid]
    code, doc = await host.verb("status")
    assert code == 0 and doc["state_after"] != "stopped", doc
    assert doc["state_after"] == "kvm alive (D state)"
    assert doc["kvm"] == {"pid": pid, "state": "D", "pid_file": False}
    before = len(host.calls())
    t0 = time.monotonic()
    code, doc = await host.verb("start")
    assert code == 7 and doc["refused"] == "kvm_alive" and doc["cold_case"] is True, doc
    assert time.monotonic() - t0 < 10
    assert host.mutating_qm_calls(before) == []


# -- 8. The key lives on pmxcfs (and see tests/verb/test_preflight.py) -------------------------


async def test_8_a_hung_pmxcfs_does_not_hang_the_verb_and_mutating_verbs_are_refused(
    host: Host,
) -> None:
    """A real hung FUSE mount over the host's /etc/pve: the verb reads it in a child it can
    abandon, answers in bounded time, and refuses to act (every qm call would hang on it)."""
    with hung_fuse_mount(host.sim.pve_dir):
        t0 = time.monotonic()
        code, doc = await host.verb("status")
        assert time.monotonic() - t0 < 20
        assert code == 0, doc
        assert doc["pve"] != "ok" and "did not answer" in doc["message"]
        code, doc = await host.verb("reset")
        assert code == 7 and doc["refused"] == "pmxcfs" and doc["cold_case"] is True, doc
        assert "pmxcfs" in doc["message"]


async def test_8_a_hung_pmxcfs_listed_first_blocks_the_login_a_local_key_file_first_does_not(
    host: Host, tmp_path: Path
) -> None:
    """sshd reads AuthorizedKeysFile's files in order and stops at the first that holds the
    key: a hung /etc/pve listed first blocks every login; the documented drop-in lists the
    root-owned local file first, and the login never touches pmxcfs."""
    forced = host.sim.root / "verb-forced.sh"
    forced.write_text(
        f"#!/bin/sh\nBREAKGLASS_VERB_CONFIG={host.sim.verb_config_path} "
        f"exec {sys.executable} {VERB_PATH}\n"
    )
    forced.chmod(0o755)
    local = tmp_path / "authorized_keys.d" / "root"
    local.parent.mkdir()
    local.write_text(f'command="{forced}",restrict {public_line(KEY)}\n')
    hung = tmp_path / "etc-pve"
    servers: list[Sshd] = []
    try:
        with hung_fuse_mount(hung):  # left first: its waiting sshd child then fails and exits
            pmxcfs = hung / "priv" / "authorized_keys"
            servers.append(start_sshd_with_key_files(tmp_path / "a", pmxcfs, local))
            servers.append(start_sshd_with_key_files(tmp_path / "b", local, pmxcfs))
            with pytest.raises(TimeoutError):
                await login(servers[0], timeout=5)
            async with await login(servers[1], timeout=20) as conn:
                done = await conn.run("status", check=False)
            assert done.exit_status == 0, done.stderr
            assert json.loads(done.stdout)["state_after"] == "running"
    finally:
        for server in servers:
            server.close()


async def login(server: Sshd, timeout: float) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        server.port,
        username="root",
        client_keys=[KEY],
        known_hosts=asyncssh.import_known_hosts(server.known_hosts),
        config=None,
        agent_path=None,
        connect_timeout=timeout,
    )


def start_sshd_with_key_files(work: Path, *key_files: Path) -> Sshd:
    """An OpenSSH sshd on loopback whose AuthorizedKeysFile lists `key_files` in order."""
    work.mkdir(parents=True)
    host_key = new_key("sshd-host")
    host_key_path = work / "host_ed25519"
    host_key.write_private_key(str(host_key_path))
    host_key_path.chmod(0o600)
    port = free_port()
    config = work / "sshd_config"
    log = work / "sshd.log"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key_path}\n"
        f"PidFile {work}/sshd.pid\n"
        f"AuthorizedKeysFile {' '.join(str(f) for f in key_files)}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n"
        "AllowUsers root\nLogLevel VERBOSE\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config), "-E", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return Sshd(port, proc.pid, work, host_key, log, proc)


async def test_a_dropped_client_still_never_leaves_a_cycle_half_done(host: Host) -> None:
    """The old rule holds with the new stop path: a client gone between stop and start."""
    conn = await asyncssh.connect(
        "127.0.0.1",
        host.sshd.port,
        username="root",
        client_keys=[KEY],
        known_hosts=asyncssh.import_known_hosts(host.sshd.known_hosts),
        config=None,
        agent_path=None,
    )
    boot = host.sim.vm_state()["boot_id"]
    before = len(host.calls())
    await conn.create_process("cycle")
    await until(
        lambda: asyncio.to_thread(
            lambda: any(c.startswith("qm stop 102") for c in host.calls(before))
        ),
        what="qm stop",
        timeout_s=30.0,
        interval_s=0.1,
    )
    conn.abort()
    await until(  # the verb holds its lock from before the stop until the cycle is done
        lambda: asyncio.to_thread(lambda: lock_is_free(host.sim)),
        what="the verb finishing",
        timeout_s=60,
        interval_s=0.1,
    )
    assert host.sim.kvm_pid() is not None and host.sim.vm_state()["boot_id"] > boot
