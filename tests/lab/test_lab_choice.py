"""Which devvm `--lab` rehearses on, in `breakglass-serve` too: the real one where QEMU runs, the
sandbox without it, none (one sentence, every tab still opens) where neither can run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from breakglass_tui.config import Settings
from breakglass_tui.hosts.session import HostSession
from breakglass_tui.hosts.types import Reachability
from breakglass_tui.lab.choice import choose_devvm
from breakglass_tui.serve.backend import ServeBackend
from breakglass_tui.serve.server import ServeState


def only(tmp_path: Path, *programs: str) -> str:
    """A PATH holding only the named programs of this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for program in programs:
        (bin_dir / program).symlink_to(shutil.which(program))
    return str(bin_dir)


def test_the_real_devvm_is_chosen_where_qemu_runs():
    choice = choose_devvm("read-only-root")
    assert (choice.devvm, choice.note, choice.scenario) == ("guest", None, "read-only-root")


def test_asking_for_the_sandbox_gets_it_and_says_what_it_cannot_stage():
    assert choose_devvm("deleted-open", "sandbox").devvm == "sandbox"
    choice = choose_devvm("pid-exhaustion", "sandbox")
    assert (choice.devvm, choice.scenario) == ("sandbox", "healthy")
    assert "cannot stage pid-exhaustion" in (choice.note or "")


async def test_serve_without_qemu_or_a_sandbox_still_opens_every_tab(tmp_path, monkeypatch):
    """A read-only container without capabilities: /readyz is ready with the lab's PVE host and
    a devvm address where nothing listens, and each tab's console is told, in one sentence,
    why the lab has no devvm."""
    monkeypatch.setenv("PATH", only(tmp_path, "ssh-agent", "ssh-add"))
    backend = ServeBackend(Settings(), lab=True, scenario="oom", state_dir=tmp_path)
    state = ServeState()
    try:
        await backend.prepare(state)
        assert state.keys_loaded and state.config_ok and state.problem == ""
        note = state.child_env["BREAKGLASS_LAB_NOTE"]
        assert note.startswith("The lab has no devvm here: QEMU is not installed")
        assert note.endswith(".") and ". " not in note
        lab = backend.lab
        assert lab.sandbox is None and lab.sim.kvm_pid() is not None  # the PVE side runs
        hosts = HostSession(lab.devvm, lab.pve, client_keys=lab.client_keys)
        try:
            assert (await hosts.probe()).reachability is Reachability.REFUSED
            assert (await hosts.verb("status")).ok
        finally:
            await hosts.close()
    finally:
        await backend.close()


async def test_serve_without_qemu_serves_the_sandbox_and_tells_the_tabs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", only(tmp_path, "bwrap", "ssh-agent", "ssh-add"))
    backend = ServeBackend(Settings(), lab=True, scenario="disk-full", state_dir=tmp_path)
    state = ServeState()
    try:
        await backend.prepare(state)
        env = state.child_env
        assert (
            env["BREAKGLASS_DEVVM_USER"] == "root" and env["BREAKGLASS_DEVVM_HOST"] == "127.0.0.1"
        )
        assert env["BREAKGLASS_LAB_NOTE"].startswith("QEMU is not installed")
        assert backend.lab.scenario == "disk-full"
    finally:
        await backend.close()


@pytest.mark.parametrize("devvm", ["nonsense"])
def test_an_unknown_devvm_is_refused(devvm):
    with pytest.raises(ValueError, match="choose auto, guest or sandbox"):
        choose_devvm("healthy", devvm)
