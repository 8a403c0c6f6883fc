"""`breakglass-tui` from the outside: arguments, early config errors, import cost, and the lab
started in tmux as a newcomer would."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from breakglass_tui.cli import main
from breakglass_tui.lab.guest.build import default_cache
from tests.support.waiting import until, until_sync

ROOT = Path(__file__).resolve().parents[2]


def test_help_names_the_lab_and_the_scenarios(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--lab" in out and "disk-full" in out and "io-stall" in out


def test_real_targets_without_a_host_stop_before_the_app_naming_the_setting(capsys):
    assert main([]) == 2
    assert "BREAKGLASS_DEVVM_HOST" in capsys.readouterr().err


def test_a_hostname_is_refused_naming_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("BREAKGLASS_DEVVM_HOST", "devvm.lan")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "BREAKGLASS_DEVVM_HOST" in err and "IP literal" in err


def test_an_unpinned_host_key_is_refused(capsys, monkeypatch):
    monkeypatch.setenv("BREAKGLASS_DEVVM_HOST", "10.0.0.5")
    monkeypatch.setenv("BREAKGLASS_PVE_HOST", "10.0.0.2")
    assert main([]) == 2
    assert "BREAKGLASS_DEVVM_HOST_KEY" in capsys.readouterr().err


def test_scenario_needs_lab(capsys):
    assert main(["--scenario", "oom"]) == 2
    assert "--lab" in capsys.readouterr().err


def test_real_guest_needs_lab(capsys):
    assert main(["--real-guest"]) == 2
    assert "--real-guest needs --lab" in capsys.readouterr().err


def test_sandbox_needs_lab(capsys):
    assert main(["--sandbox"]) == 2
    assert "--sandbox needs --lab" in capsys.readouterr().err


def _path_with(tmp_path: Path, *programs: str) -> str:
    """A PATH holding only the named programs of this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for program in programs:
        (bin_dir / program).symlink_to(shutil.which(program))
    return str(bin_dir)


def test_the_lab_is_the_real_devvm_where_qemu_runs():
    from breakglass_tui.runtime import choose_lab

    plan = choose_lab("oom")
    assert (plan.devvm, plan.note, plan.scenario) == ("guest", None, "oom")


def test_without_qemu_the_lab_says_in_one_sentence_how_to_get_it(monkeypatch, tmp_path):
    from breakglass_tui.runtime import choose_lab

    monkeypatch.setenv("PATH", _path_with(tmp_path, "bwrap", "sh", "true"))  # no QEMU
    plan = choose_lab("disk-full")
    assert (plan.devvm, plan.scenario) == ("sandbox", "disk-full")
    assert plan.note and plan.note.startswith("QEMU is not installed")
    assert "scripts/lab.sh" in plan.note
    assert plan.note.endswith(".") and ". " not in plan.note  # one sentence
    oom = choose_lab("oom")  # beyond what the sandbox can stage: it says so, and runs healthy
    assert (oom.devvm, oom.scenario) == ("sandbox", "healthy")
    assert "cannot stage oom" in oom.note and "scripts/lab.sh" in oom.note


def test_without_qemu_or_a_sandbox_the_lab_says_why_and_the_console_opens(monkeypatch, tmp_path):
    from breakglass_tui.runtime import choose_lab

    monkeypatch.setenv("PATH", str(tmp_path))  # neither QEMU nor bubblewrap
    plan = choose_lab("wedged")
    assert plan.devvm == "none" and plan.note
    assert "QEMU is not installed" in plan.note and "bubblewrap" in plan.note
    assert "scripts/lab.sh" in plan.note


async def test_a_lab_without_a_devvm_still_opens_the_console_saying_why():
    """Where neither QEMU nor the sandbox can run (a read-only container without capabilities):
    the console opens, says why in one sentence, and takes slash commands."""
    from breakglass_tui.ui.app import BreakglassApp
    from breakglass_tui.ui.backend import AppOptions

    sentence = "The lab has no devvm here: QEMU is not installed and bubblewrap is missing."
    app = BreakglassApp(AppOptions(lab=True, devvm="none", lab_note=sentence))
    async with app.run_test(size=(160, 48)) as pilot:
        await until(
            lambda: sentence in " ".join(str(n.render()) for n in app.query(".notice")),
            what="the sentence saying why",
            timeout_s=10,
            pause=pilot.pause,
        )
        assert app.is_running
        await app.shutdown()


def test_each_lab_run_keeps_its_records_apart_from_the_real_incident_and_earlier_labs(tmp_path):
    from breakglass_tui.core.incident import IncidentStore
    from breakglass_tui.runtime import LAB_RUNS_KEPT, lab_run_dir

    real = IncidentStore(tmp_path).current_or_new("real-tab", "viktor")[0]
    first, second = lab_run_dir(tmp_path), lab_run_dir(tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "lab"
    lab_incident = IncidentStore(first).current_or_new("lab-tab", "viktor")[0]
    # The next lab starts afresh; the real console still finds its own incident, not the lab's.
    assert IncidentStore(second).current() is None
    assert IncidentStore(tmp_path).current().id == real.id != lab_incident.id
    runs = [lab_run_dir(tmp_path) for _ in range(LAB_RUNS_KEPT + 3)]
    kept = sorted(p for p in (tmp_path / "lab").iterdir())
    assert len(kept) == LAB_RUNS_KEPT and runs[-1] in kept and first not in kept


def test_the_app_import_chain_leaves_the_heavy_sdks_for_later():
    code = (
        "import sys, breakglass_tui.cli, breakglass_tui.ui.app;"
        "print(','.join(m for m in ('anthropic', 'asyncssh', 'hvac', 'httpx2', 'markdown_it')"
        " if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == ""


def _tmux(sock: Path, *args: str) -> str:
    return subprocess.run(
        ["tmux", "-S", str(sock), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class TmuxSession:
    """`breakglass-tui --lab` in a real terminal (tmux, private socket), its lab under a private
    TMPDIR so the processes it leaves, if any, can be found."""

    def __init__(self, tmp_path: Path, scenario: str = "disk-full") -> None:
        self.sock = tmp_path / "tmux.sock"
        self.private_tmp = tmp_path / "tmp"
        self.private_tmp.mkdir()
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "TERM": "xterm-256color",
            "TMPDIR": str(self.private_tmp),
            "BREAKGLASS_STATE_DIR": str(tmp_path / "state"),
            "PYTHONPATH": str(ROOT),
            # A newcomer who ran scripts/lab.sh once: the devvm's image and saved states.
            "BREAKGLASS_GUEST_CACHE": str(default_cache()),
        }
        command = f"{sys.executable} -m breakglass_tui.cli --lab --scenario {scenario}"
        subprocess.run(
            [
                "tmux",
                "-S",
                str(self.sock),
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "160",
                "-y",
                "48",
                command,
            ],
            env=env,
            check=True,
            timeout=10,
        )

    def screen(self) -> str:
        return _tmux(self.sock, "capture-pane", "-p")

    def type(self, text: str) -> None:
        _tmux(self.sock, "send-keys", "-l", text)
        _tmux(self.sock, "send-keys", "Enter")

    def wait_for(self, text: str, timeout_s: float = 30) -> str:
        """The screen once ``text`` is on it."""

        def shown() -> str | None:
            screen = self.screen()
            return screen if text in screen else None

        return until_sync(
            shown,
            what=f"{text!r} on the screen",
            timeout_s=timeout_s,
            interval_s=0.2,
            diagnostics=lambda: f"the screen was:\n{self.screen()}",
        )

    def lab_processes(self) -> list[int]:
        return _pids_mentioning(str(self.private_tmp))

    def wait_no_lab_processes(self, timeout_s: float = 20) -> list[int]:
        """The lab's processes left once they are gone or ``timeout_s`` passed."""
        with contextlib.suppress(AssertionError):
            until_sync(
                lambda: not self.lab_processes(),
                what="the lab's processes to end",
                timeout_s=timeout_s,
                interval_s=0.2,
            )
        return self.lab_processes()

    def kill_server(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.sock), "kill-server"], capture_output=True, timeout=10
        )

    def app_pids(self) -> list[int]:
        """The console processes this session started (their TMPDIR is ours)."""
        mark = f"TMPDIR={self.private_tmp}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def wait_app_gone(self, timeout_s: float = 15) -> list[int]:
        """Wait for the console to exit; kill (by PID) whatever of ours is left, and return it."""
        with contextlib.suppress(AssertionError):
            until_sync(
                lambda: not self.app_pids(),
                what="the console to exit",
                timeout_s=timeout_s,
                interval_s=0.2,
            )
        left = self.app_pids()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


TMUX_HINT = "tmux is missing: apt-get install tmux (scripts/setup.sh test does)"


def require_tmux() -> None:
    """CI installs tmux: a missing one fails with the install hint rather than skipping."""
    if shutil.which("tmux") is None:
        pytest.fail(TMUX_HINT)


def test_a_missing_tmux_fails_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install tmux"):
        require_tmux()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_newcomer_runs_the_lab_in_tmux_probe_df_and_quit(tmp_path):
    """The lab shows, /probe and /sh df -h work, and Ctrl+Q leaves no process behind."""
    require_tmux()
    tmux = TmuxSession(tmp_path)
    try:
        tmux.wait_for("devvm: reachable")
        first = tmux.wait_for("VM 102: running")
        assert "manual mode" in first and "scenario disk-full" in first
        assert tmux.lab_processes(), "the lab should run under our TMPDIR"
        # Back to back, as a newcomer types: the second line is neither lost behind the first
        # nor glued to it (issue 12: both Enters once sent "/probe/sh df -h").
        tmux.type("/probe")
        tmux.type("/sh df -h")
        shown = tmux.wait_for("100% /data")
        assert "Filesystem" in shown
        assert "█ /probe " in shown and "█ /sh df -h " in shown, "each line is its own message"
        assert "/probe/sh" not in shown and "Unknown command" not in shown
        _tmux(tmux.sock, "send-keys", "C-q")
        assert tmux.wait_no_lab_processes() == []
        assert tmux.wait_app_gone() == [], "the console did not exit after Ctrl+Q"
    finally:
        tmux.kill_server()
        tmux.wait_app_gone(5)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_closing_the_terminal_still_stops_the_lab(tmp_path):
    """SIGHUP (the terminal closed) ends the session properly too."""
    require_tmux()
    tmux = TmuxSession(tmp_path, "healthy")
    try:
        tmux.wait_for("VM 102: running")
        assert tmux.lab_processes()
    finally:
        tmux.kill_server()
    assert tmux.wait_no_lab_processes() == []
    assert tmux.wait_app_gone() == [], "the console did not exit when its terminal closed"


# -- bad start-up conditions: one clear sentence before the screen opens ----------------------


def _run_in_pty(tmp_path: Path, env: dict[str, str], wrap: list[str] | None = None) -> tuple:
    """`breakglass-tui --lab` in a real terminal (optionally inside a bwrap sandbox); its exit
    code and what it printed."""
    from tests.ui.console_pty import PtyConsole

    argv = [*(wrap or []), sys.executable, "-m", "breakglass_tui.cli", "--lab"]
    console = PtyConsole(tmp_path, env=env, argv=argv)
    try:
        assert console.wait_exit(30), "the console started instead of refusing"
        assert console.wait_output_end(10), "its terminal stayed open after it exited"
        return console.proc.returncode, console.output.decode(errors="replace")
    finally:
        console.close()


def _one_sentence(output: str, *needles: str) -> None:
    assert "\x1b[?1049h" not in output, "the screen opened"
    assert "Traceback" not in output
    lines = [line for line in output.replace("\r", "").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("breakglass-tui: "), output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_state_dir_that_is_a_file_is_named_with_the_fix(tmp_path):
    blocker = tmp_path / "state-is-a-file"
    blocker.write_text("not a directory")
    code, out = _run_in_pty(tmp_path, {"BREAKGLASS_STATE_DIR": str(blocker)})
    assert code == 2
    _one_sentence(out, str(blocker), "not a directory", "BREAKGLASS_STATE_DIR")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (scripts/setup.sh)")
def test_a_full_state_disk_is_named_with_the_fix(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    fill = f'dd if=/dev/zero of={state}/fill bs=4k >/dev/null 2>&1; exec "$@"'
    wrap = ["bwrap", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    wrap += ["--size", "262144", "--tmpfs", str(state), "sh", "-c", fill, "sh"]
    code, out = _run_in_pty(tmp_path, {"BREAKGLASS_STATE_DIR": str(state)}, wrap)
    assert code == 2
    _one_sentence(out, str(state), "is full", "Free space", "BREAKGLASS_STATE_DIR")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (scripts/setup.sh)")
def test_a_read_only_state_dir_is_named_with_the_fix(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    wrap = ["bwrap", "--bind", "/", "/", "--ro-bind", str(state), str(state)]
    wrap += ["--dev", "/dev", "--proc", "/proc"]
    code, out = _run_in_pty(tmp_path, {"BREAKGLASS_STATE_DIR": str(state)}, wrap)
    assert code == 2
    _one_sentence(out, str(state), "read-only", "BREAKGLASS_STATE_DIR")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"TERM": "dumb"}, ("TERM=dumb", "TERM=xterm-256color")),
        ({"PYTHONIOENCODING": "latin-1"}, ("not UTF-8", "LANG=C.UTF-8")),
    ],
)
def test_a_terminal_that_cannot_draw_the_console_is_named_with_the_fix(tmp_path, env, needles):
    env = {"BREAKGLASS_STATE_DIR": str(tmp_path / "state"), **env}
    code, out = _run_in_pty(tmp_path, env)
    assert code == 2
    _one_sentence(out, *needles)


def test_no_terminal_at_all_is_said_before_anything_starts(tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "TERM": "xterm-256color",
        "PYTHONPATH": str(ROOT),
        "BREAKGLASS_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "breakglass_tui.cli", "--lab"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("breakglass-tui: this is not a terminal"), result.stderr
    assert "breakglass-serve" in result.stderr and "Traceback" not in result.stderr
