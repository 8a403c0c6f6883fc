"""The lab shell on its own (no SSH): Debian-shaped output, the shell grammar the hosts layer
uses, and the repairs' effect on the state."""

from __future__ import annotations

import re

import pytest

from breakglass_tui.hosts.devvm import stop_command
from breakglass_tui.lab.scenarios import RUNAWAY_LOG, SCENARIOS, build_state
from breakglass_tui.lab.shell import Output, Shell, human


class Capture(Output):
    def __init__(self) -> None:
        self.stdout = ""
        self.stderr = ""

    async def out(self, text: str) -> None:
        self.stdout += text

    async def err(self, text: str) -> None:
        self.stderr += text


async def sh(shell: Shell, command: str, *, root: bool | None = None) -> tuple[int, str, str]:
    cap = Capture()
    status = await shell.run(command, cap, root=root)
    return status, cap.stdout, cap.stderr


def test_lab_scenarios_are_the_contract_list():
    from breakglass_tui.lab.lab import SCENARIOS as lab_scenarios

    assert (
        lab_scenarios
        == SCENARIOS
        == ("healthy", "disk-full", "oom", "stuck-service", "wedged", "io-stall")
    )
    with pytest.raises(ValueError, match="unknown lab scenario 'nope'"):
        build_state("nope")


def test_human_sizes_round_up_like_coreutils():
    assert human(38 * 1024**3) == "38G"
    assert human(int(8.55 * 1024**3)) == "8.6G"
    assert human(1012 * 1024) == "1012K"
    assert human(15 * 1024**3, iec_suffix=True) == "15Gi"


async def test_free_df_and_uptime_have_debian_shapes():
    shell = Shell(build_state("healthy"), user="root", pid=4100)
    status, out, _ = await sh(shell, "free -m")
    assert status == 0
    lines = out.splitlines()
    assert (
        lines[0] == " " * 15 + "total        used        free      shared  buff/cache   available"
    )
    assert re.fullmatch(r"Mem: +16009( +\d+){5}", lines[1])
    assert re.fullmatch(r"Swap: +2047 +0 +2047", lines[2])
    status, out, _ = await sh(shell, "df -h /")
    assert out.splitlines()[0].split() == [
        "Filesystem",
        "Size",
        "Used",
        "Avail",
        "Use%",
        "Mounted",
        "on",
    ]
    assert re.fullmatch(r"/dev/vda1 +49G +8\.\dG +3\dG +1\d% /", out.splitlines()[1])
    status, out, _ = await sh(shell, "uptime")
    assert re.fullmatch(
        r" \d\d:\d\d:\d\d up 3 days,  4:1\d,  1 user,  load average: 0\.08,"
        r" 0\.12, 0\.10\n",
        out,
    )


async def test_unknown_commands_are_honestly_not_found():
    shell = Shell(build_state("healthy"), user="root", pid=4100)
    assert await sh(shell, "lsof -nP") == (127, "", "sh: 1: lsof: not found\n")
    status, out, err = await sh(shell, "echo before; nosuch && echo never || echo fallback")
    assert (status, out, err) == (0, "before\nfallback\n", "sh: 1: nosuch: not found\n")


async def test_pipelines_filter_like_coreutils():
    shell = Shell(build_state("oom"), user="root", pid=4100)
    status, out, _ = await sh(shell, "ps aux --sort=-%mem | head -n 2")
    assert status == 0
    header, top = out.splitlines()
    assert header.startswith("USER         PID %CPU %MEM    VSZ   RSS TTY      STAT START")
    assert top.split()[1] == "3187" and top.endswith("/home/viktor/bin/memhog --size 20G")
    assert (await sh(shell, "seq 1 100 | grep -c 7"))[1] == "19\n"
    assert (await sh(shell, "seq 1 5 | sort -rn | tail -n 2 | wc -l"))[1] == "2\n"
    assert (await sh(shell, "dmesg | grep -i 'out of memory' | wc -l"))[1] == "2\n"
    status, out, _ = await sh(shell, "seq 3 | grep -v 2 2>&1")
    assert out == "1\n3\n"


async def test_sudo_is_needed_for_repairs_when_not_root():
    state = build_state("disk-full")
    shell = Shell(state, user="breakglass", pid=4100)
    status, _, err = await sh(shell, f"rm {RUNAWAY_LOG}")
    assert status == 1 and err == f"rm: cannot remove '{RUNAWAY_LOG}': Permission denied\n"
    assert RUNAWAY_LOG in state.files
    assert (await sh(shell, "dmesg"))[2] == (
        "dmesg: read kernel buffer failed: Operation not permitted\n"
    )
    assert (await sh(shell, "whoami; sudo -n whoami"))[1] == "breakglass\nroot\n"
    assert (await sh(shell, f"sudo -n -- rm -f {RUNAWAY_LOG}"))[0] == 0
    assert RUNAWAY_LOG not in state.files


async def test_the_hosts_layer_stop_script_kills_a_process_group():
    """hosts/devvm.py stops a command with a while loop of `kill -0` after `kill -TERM -pgid`."""
    state = build_state("healthy")
    shell = Shell(state, user="breakglass", pid=4100)
    delivered: list[str] = []
    from breakglass_tui.lab.scenarios import SimProcess

    def on_signal(sig: str) -> None:
        delivered.append(sig)
        state.processes.pop(4242, None)

    state.processes[4242] = SimProcess(
        4242, "root", "bash -c sleep 60", pgid=4242, on_signal=on_signal
    )
    status, out, err = await sh(shell, stop_command(4242, as_root=False))
    assert (status, out, err) == (0, "", "")
    assert delivered == ["TERM"]
    # Already gone: the script's first kill fails quietly and it exits 0.
    assert await sh(shell, stop_command(4242, as_root=False)) == (0, "", "")


async def test_loops_conditionals_variables_and_exit():
    shell = Shell(build_state("healthy"), user="root", pid=4100)
    status, out, _ = await sh(shell, "i=0; while [ $i -lt 3 ]; do echo $i; i=$((i+1)); done")
    assert (status, out) == (0, "0\n1\n2\n")
    assert (await sh(shell, "if [ -d /var/log ]; then echo dir; else echo no; fi"))[1] == "dir\n"
    assert (await sh(shell, "echo a; exit 3; echo b")) == (3, "a\n", "")
    assert (await sh(shell, "echo $$ $HOSTNAME"))[1] == "4100 devvm\n"
    assert (await sh(shell, "echo 'unterminated"))[0] == 2


async def test_disk_full_repair_frees_the_disk_and_the_writer_refills_it():
    state = build_state("disk-full")
    shell = Shell(state, user="root", pid=4100)
    _, out, _ = await sh(shell, "df /")
    avail = int(out.splitlines()[1].split()[3])
    assert avail == 0 and out.splitlines()[1].split()[4] == "100%"
    _, out, _ = await sh(shell, "du -sh /var/log/app")
    assert out == "38G\t/var/log/app\n"
    _, out, _ = await sh(shell, "journalctl -p err -n 3 --no-pager")
    assert "No space left on device" in out or "no space left on device" in out
    assert (await sh(shell, f"truncate -s 0 {RUNAWAY_LOG}"))[0] == 0
    _, out, _ = await sh(shell, "df /")
    assert int(out.splitlines()[1].split()[3]) > 37 * 1024 * 1024  # KiB available again
    # log-spammer still runs: the log grows back, slowly.
    state._spam_checked -= 2.0
    _, out, _ = await sh(shell, f"ls -l {RUNAWAY_LOG}")
    assert int(out.split()[4]) >= 8 * 1024 * 1024
    assert (await sh(shell, "systemctl stop log-spammer; systemctl is-active log-spammer"))[1] == (
        "inactive\n"
    )


async def test_stuck_service_status_and_restart():
    state = build_state("stuck-service")
    shell = Shell(state, user="root", pid=4100)
    status, out, _ = await sh(shell, "systemctl --failed")
    assert status == 0
    assert re.search(
        r"^● webapp\.service +loaded failed failed Example web application$", out, re.M
    )
    assert out.rstrip().endswith("1 loaded units listed.")
    status, out, _ = await sh(shell, "systemctl status webapp")
    assert status == 3
    assert out.startswith("× webapp.service - Example web application\n")
    assert "Active: failed (Result: timeout) since" in out
    assert "waiting for lock /run/webapp/webapp.lock held by pid 1411" in out
    assert (await sh(shell, "systemctl restart webapp"))[0] == 0
    status, out, _ = await sh(shell, "systemctl status webapp.service")
    assert status == 0 and "Active: active (running) since" in out
    assert "/run/webapp/webapp.lock" not in state.files
    assert (await sh(shell, "systemctl --failed"))[1].rstrip().endswith("0 loaded units listed.")


async def test_reboot_semantics():
    """A reboot clears wedged, io-stall, a memhog and the stale lock; a full disk stays full."""
    for scenario in ("oom", "stuck-service", "wedged", "io-stall"):
        state = build_state(scenario)
        state.reboot(state.now())
        assert not state.wedged and not state.io_stall
        assert 3187 not in state.processes
        assert state.services["webapp.service"].active == "active"
        assert state.uptime_s() < 5
    state = build_state("disk-full")
    state.reboot(state.now())
    assert state.disk_avail_kb() == 0 and RUNAWAY_LOG in state.files
    assert state.services["log-spammer.service"].active == "active"


async def test_awk_one_liners_a_rescue_uses():
    shell = Shell(build_state("disk-full"), user="root", pid=4100)
    assert (await sh(shell, "df -h / | awk 'NR==2 {print $5}'"))[1] == "100%\n"
    assert (await sh(shell, "seq 1 10 | awk '{s+=$1} END {print s}'"))[1] == "55\n"
    out = (await sh(shell, "free -m | awk '/Mem:/ {printf \"%d%%\\n\", $3*100/$2}'"))[1]
    assert re.fullmatch(r"\d%\n", out)
    assert (await sh(shell, "awk -F: '{print $1}' /etc/hostname"))[1] == "devvm\n"
    alive = "ps -e -o pgid= -o stat= | awk '$1 == {} && $2 !~ /^Z/ {{ f = 1 }} END {{ exit !f }}'"
    assert (await sh(shell, alive.format(289)))[0] == 0
    assert (await sh(shell, alive.format(9999)))[0] == 1
    assert (await sh(shell, "awk '{'"))[0] == 2
