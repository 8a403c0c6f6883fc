"""The real devvm's image and how a drill starts from it: reproducible byte for byte, a Debian
userland a model recognises behind OpenSSH and sudo, front ends that say what they cannot do, and
each drill restored from the saved state onto overlays of its own."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from breakglass_tui.hosts.session import HostSession
from breakglass_tui.lab.guest.build import GuestImage, assemble, default_cache
from breakglass_tui.lab.guest.lab import RealLab, start_real_lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OUTPUTS = ("vmlinuz", "initrd.gz", "root.qcow2", "data.qcow2", "host_key.pub", "manifest.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_image_is_reproducible_byte_for_byte(guest_image: GuestImage, tmp_path: Path):
    """The same .deb files and the same files of this repository make the same bytes: the
    kernel, the initramfs, both disks (ext4 in qcow2), the host key, the manifest."""
    debs_dir = default_cache() / "debs"
    debs = [debs_dir / name for name in guest_image.manifest["debs"]]
    again = GuestImage(tmp_path / "images" / guest_image.image_id, guest_image.image_id)
    assemble(again, debs)
    for name in OUTPUTS:
        assert sha256(again.directory / name) == sha256(guest_image.directory / name), name
    # What it is made of: OpenSSH, sudo and the tools the runbook names, from Debian.
    packages = {name.split("_")[0] for name in guest_image.manifest["debs"]}
    assert {"openssh-server", "sudo", "procps", "psmisc", "lsof", "util-linux"} <= packages
    assert {"findutils", "coreutils", "sysstat", "e2fsprogs", "curl"} <= packages


@pytest.mark.parametrize("real_lab", ["healthy"], indirect=True)
async def test_a_debian_userland_behind_openssh_and_sudo(
    real_lab: tuple[RealLab, HostSession],
) -> None:
    lab, hosts = real_lab
    # The console logs in as breakglass and runs every command with sudo -n (as root).
    who = await hosts.run("id -un; echo $SUDO_USER; sudo -n -u breakglass id -un")
    assert who.ok and who.stdout.split() == ["root", "breakglass", "breakglass"], who
    assert lab.devvm.user == "breakglass"
    tools = (
        "ps pgrep pkill free top uptime fuser lsof dmesg findmnt lsblk find du df iostat"
        " mpstat ss curl journalctl systemctl sudo dpkg"
    )
    found = await hosts.run(
        f"for t in {tools}; do command -v $t >/dev/null || echo missing $t; done"
    )
    assert found.ok and found.stdout == "", found.stdout
    facts = await hosts.run(
        ". /etc/os-release; echo $PRETTY_NAME; findmnt -no FSTYPE,SOURCE /;"
        " dpkg-query -W -f '${db:Status-Abbrev}${Package}\\n' openssh-server sudo procps;"
        " head -n 1 /proc/pressure/io; iostat -d vda | grep '^vda'; top -bn1 | head -n 1"
    )
    lines = facts.stdout.splitlines()
    assert lines[0] == "Debian GNU/Linux 12 (bookworm)", facts.stdout
    assert lines[1].split() == ["ext4", "/dev/vda"]
    assert sorted(lines[2:5]) == ["ii openssh-server", "ii procps", "ii sudo"]
    assert lines[5].startswith("some avg10=") and lines[6].startswith("vda ")
    assert lines[-1].startswith("top - ")
    # Restored, not booted: this QEMU never booted the guest, and its clock is set to now.
    assert lab.sim.boots() == 0
    cmdline = Path(f"/proc/{lab.sim.kvm_pid()}/cmdline").read_bytes().split(b"\0")
    assert b"-incoming" in cmdline
    clock = await hosts.run("date +%s")
    assert abs(int(clock.stdout) - time.time()) < 30


@pytest.mark.parametrize("real_lab", ["healthy"], indirect=True)
async def test_the_front_ends_say_what_they_cannot_do(
    real_lab: tuple[RealLab, HostSession],
) -> None:
    """systemctl and journalctl front the lab's small service manager and plain-text logs: what
    they support works; anything else is refused plainly, never answered wrongly."""
    _lab, hosts = real_lab
    refused = await hosts.run("systemctl mask webapp")
    assert refused.exit_status == 1 and "not supported here" in refused.stderr
    assert "Supported:" in refused.stderr
    option = await hosts.run("journalctl --since today")
    assert option.exit_status == 1 and "not supported here" in option.stderr
    assert (await hosts.run("journalctl -p err")).exit_status == 1
    works = await hosts.run(
        "systemctl is-active webapp; systemctl is-enabled cron;"
        " journalctl -u webapp -n 1 --no-pager; journalctl --list-boots | wc -l"
    )
    lines = works.stdout.splitlines()
    assert works.ok and lines[:2] == ["active", "enabled"], works.stdout
    assert "webapp" in lines[2] and lines[3] == "1"
    unit = await hosts.run("systemctl status nosuch")
    assert unit.exit_status == 4 and "could not be found" in unit.stderr


async def test_each_drill_starts_clean_on_overlays_of_its_own(guest_image: GuestImage) -> None:
    """Two drills from the same saved state: what one writes, the other never sees, and the
    saved state itself is left as it was."""
    first = await start_real_lab("healthy")
    saved = first.saved
    assert saved is not None
    before = {p.name: sha256(p) for p in (saved.root_disk, saved.data_disk, saved.vmstate)}
    hosts = HostSession(first.devvm, first.pve, client_keys=first.client_keys)
    try:
        assert (await hosts.run("echo first > /data/db/mark; sync")).ok
    finally:
        await hosts.close()
        await first.close()
    second = await start_real_lab("healthy")
    hosts = HostSession(second.devvm, second.pve, client_keys=second.client_keys)
    try:
        assert second.saved == saved
        gone = await hosts.run("cat /data/db/mark")
        assert not gone.ok and "No such file" in gone.stderr
    finally:
        await hosts.close()
        await second.close()
    after = {p.name: sha256(p) for p in (saved.root_disk, saved.data_disk, saved.vmstate)}
    assert after == before
    await asyncio.sleep(0)
