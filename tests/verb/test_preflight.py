"""``breakglass-verb --preflight`` against the simulated host layout: read-only checks, one line
each, exit 1 when one fails — the paths, ``sshd -T``'s key-file order (finding 8: the key must
not depend on pmxcfs), the state directory, HA, quorum, the lock and the VM's scope."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from breakglass_tui.lab.sim_pve import SimPve
from breakglass_tui.lab.verb_config import lab_verb_config
from tests.verb.conftest import PROXMOX_TIMINGS, VERB_PATH

LINE = re.compile(r"(ok  |warn|FAIL) [a-z][a-z0-9 -]*: \S.*")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[SimPve]:
    sim = SimPve.create(tmp_path / "pve", 102)
    sim.set_faults(**PROXMOX_TIMINGS)
    sim.start_vm()
    try:
        yield sim
    finally:
        sim.cleanup()


def write_sshd_config(sim: SimPve, *key_files: Path) -> Path:
    """An sshd_config naming `key_files` in order (sshd -T needs a host key to exist)."""
    work = sim.root / "sshd"
    work.mkdir(exist_ok=True)
    host_key = work / "host_ed25519"
    if not host_key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
        )
    config = work / "sshd_config"
    config.write_text(
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {' '.join(str(f) for f in key_files)}\n"
        "PermitRootLogin prohibit-password\n"
    )
    return config


def key_line(path: Path, command: str = "/usr/local/sbin/breakglass-verb") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'command="{command}",restrict ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 breakglass\n')
    return path


def preflight(sim: SimPve, sshd_config: Path, **verb: Any) -> tuple[int, list[str]]:
    layers = ({"preflight": {"sshd_config": str(sshd_config)}}, verb)
    config = sim.root / "verb-preflight.toml"
    config.write_text(
        lab_verb_config(
            sim.root,
            vmid=102,
            qm=sim.qm_path,
            qemu_run_dir=sim.qemu_run_dir,
            state_dir=sim.state_dir,
            layers=layers,
        )
    )
    done = subprocess.run(
        [sys.executable, str(VERB_PATH), "--preflight"],
        env={"PATH": os.environ["PATH"], "BREAKGLASS_VERB_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    lines = done.stdout.splitlines()
    assert lines and lines[-1].startswith("preflight: "), done.stdout + done.stderr
    for line in lines[:-1]:
        assert LINE.fullmatch(line), f"not one check per line: {line!r}"
    return done.returncode, lines[:-1]


def result(lines: list[str], name: str) -> tuple[str, str]:
    found = [ln for ln in lines if ln[5:].startswith(name + ":")]
    assert len(found) == 1, (name, lines)
    return found[0][:4].strip(), found[0]


def test_a_host_set_up_as_documented_passes(host: SimPve) -> None:
    local = key_line(host.root / "etc-ssh" / "authorized_keys.d" / "root")
    pmxcfs = host.pve_dir / "priv" / "authorized_keys"
    pmxcfs.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 owner@laptop\n")
    before = sorted(p.name for p in host.state_dir.iterdir())
    calls = len(host.calls())
    code, lines = preflight(host, write_sshd_config(host, local, pmxcfs))
    assert code == 0, lines
    assert not any(line.startswith("FAIL") for line in lines)
    for name in ("config", "qm", "qemu run dir", "vm config", "quorum", "vm lock", "ha"):
        assert result(lines, name)[0] == "ok", name
    assert result(lines, "vm scope")[0] == "ok"
    assert f"lists kvm pid {host.kvm_pid()}" in result(lines, "vm scope")[1]
    assert result(lines, "sshd key files")[0] == "ok"
    assert "read first" in result(lines, "sshd key files")[1]
    assert result(lines, "state dir")[0] == "ok"
    # Read-only: nothing written in the state dir, no mutating qm call.
    assert sorted(p.name for p in host.state_dir.iterdir()) == before
    assert [c for c in host.call_texts()[calls:] if c.startswith("qm ")] == ["qm status 102"]


def test_the_key_on_pmxcfs_or_after_it_fails(host: SimPve) -> None:
    """Finding 8: on a standard install /root/.ssh/authorized_keys is a symlink into
    /etc/pve/priv (pmxcfs): unmounted, every key login fails; hung, sshd hangs reading it."""
    pmxcfs = key_line(host.pve_dir / "priv" / "authorized_keys")
    dot_ssh = host.root / "root-home" / ".ssh"
    dot_ssh.mkdir(parents=True)
    (dot_ssh / "authorized_keys").symlink_to(pmxcfs)
    code, lines = preflight(host, write_sshd_config(host, dot_ssh / "authorized_keys"))
    assert code == 1
    verdict, line = result(lines, "sshd key files")
    assert verdict == "FAIL" and "pmxcfs" in line and "authorized_keys.d/root" in line

    # The key moved to a local file, but the pmxcfs file (the cluster's keys) is read first.
    pmxcfs.write_text("ssh-rsa AAAAB3NzaC1yc2E root@pve-node-2\n")
    local = key_line(host.root / "etc-ssh" / "authorized_keys.d" / "root")
    code, lines = preflight(host, write_sshd_config(host, dot_ssh / "authorized_keys", local))
    assert code == 1
    verdict, line = result(lines, "sshd key files")
    assert verdict == "FAIL" and "comes before" in line


def test_a_key_without_restrict_fails(host: SimPve) -> None:
    local = host.root / "keys"
    local.write_text('command="/usr/local/sbin/breakglass-verb" ssh-ed25519 AAAA x\n')
    code, lines = preflight(host, write_sshd_config(host, local))
    assert code == 1 and result(lines, "sshd key options")[0] == "FAIL"


def test_the_vm_s_state_is_reported_lock_ha_and_quorum(host: SimPve) -> None:
    local = key_line(host.root / "keys")
    config = write_sshd_config(host, local)
    host.set_lock("backup")
    host.set_ha("started")
    code, lines = preflight(host, config)
    assert result(lines, "vm lock") == ("warn", result(lines, "vm lock")[1])
    assert "locked (backup)" in result(lines, "vm lock")[1]
    assert result(lines, "ha")[0] == "warn" and "stop and cycle" in result(lines, "ha")[1]
    host.set_quorum(False)
    code, lines = preflight(host, config)
    assert code == 1 and result(lines, "quorum")[0] == "FAIL"


def test_a_state_dir_others_can_read_and_a_kvm_outside_its_scope_fail(host: SimPve) -> None:
    config = write_sshd_config(host, key_line(host.root / "keys"))
    host.state_dir.chmod(0o755)
    (host.root / "cgroup" / "qemu.slice" / "102.scope" / "cgroup.procs").write_text("")
    code, lines = preflight(host, config)
    assert code == 1
    assert result(lines, "state dir")[0] == "FAIL" and "chmod 0700" in result(lines, "state dir")[1]
    assert result(lines, "vm scope")[0] == "FAIL"


def test_an_invalid_config_is_one_failed_line(host: SimPve, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("vmid = 'x'\n")
    done = subprocess.run(
        [sys.executable, str(VERB_PATH), "--preflight"],
        env={"PATH": os.environ["PATH"], "BREAKGLASS_VERB_CONFIG": str(bad)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("FAIL config: config key vmid")


def test_a_state_dir_sharing_the_vm_storage_or_on_the_network_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proxmox's default ZFS and LVM installs put / on the pool or VG that holds the VMs'
    disks: the state dir cannot avoid it there (docs/pve-host.md §3) — a warning, not a failure.
    A network or FUSE filesystem is a failure."""
    from breakglass_tui.verb import breakglass_verb as bv

    pve = tmp_path / "etc-pve"
    pve.mkdir()
    (pve / "storage.cfg").write_text(
        "dir: local\n\tpath /var/lib/vz\n\n"
        "zfspool: local-zfs\n\tpool rpool/data\n\tsparse 1\n\n"
        "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n"
    )
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = bv.validate_config({"state_dir": str(state), "pve_dir": str(pve)})
    for mount, verdict, said in (
        (("/", "zfs", "rpool/ROOT/pve-1"), "warn", "ZFS pool rpool (storage local-zfs)"),
        (("/", "ext4", "/dev/mapper/pve-root"), "warn", "LVM volume group pve (storage local-lvm)"),
        (("/", "ext4", "/dev/sda2"), "ok", "local ext4"),
        (("/var/lib", "nfs4", "nas:/export"), "FAIL", "nfs4"),
        (("/var/lib", "fuse.sshfs", "x:/y"), "FAIL", "fuse.sshfs"),
    ):
        monkeypatch.setattr(bv, "_mount_of", lambda path, m=mount: m)
        disk = [c for c in bv.check_state_dir(cfg) if c.name == "state dir disk"]
        assert len(disk) == 1 and disk[0].result == verdict and said in disk[0].detail, disk
    assert bv._lvm_vg("/dev/mapper/my--vg-root") == "my-vg"
    assert bv._lvm_vg("/dev/pve/root") == "pve"
