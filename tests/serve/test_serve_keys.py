"""What breakglass-serve hands each tab about the keys: the agent socket and, per target, the one
key's fingerprint — from a real OpenBao and a real ssh-agent (and from the lab). A reload of the
keys gives the tabs opened afterwards the new fingerprints, each still on its own target."""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import asyncssh

from breakglass_tui.hosts.ssh import fingerprint
from breakglass_tui.hosts.types import Reachability
from breakglass_tui.serve.backend import ServeBackend
from breakglass_tui.serve.server import ServeState
from tests.support.openbao import (  # noqa: F401 - fixtures
    BreakglassVault,
    breakglass_vault,
    openbao,
)
from tests.support.realparts import new_key


def fp(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


async def agent_fingerprints(socket_path: str) -> set[str]:
    """What the server's ssh-agent holds, by fingerprint."""
    async with asyncssh.connect_agent(socket_path) as agent:
        return {fingerprint(key) for key in await agent.get_keys()}


async def test_each_tab_is_told_which_key_is_whose_and_a_reload_keeps_it(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    settings = breakglass_vault.settings(tmp_path, devvm_host="192.0.2.10", pve_host="192.0.2.2")
    backend = ServeBackend(settings, lab=False, scenario="healthy", state_dir=tmp_path / "state")
    state = ServeState()
    await backend.prepare(state)
    try:
        env = state.child_env
        assert env["BREAKGLASS_DEVVM_KEY_FINGERPRINT"] == fp(breakglass_vault.devvm_key)
        assert env["BREAKGLASS_PVE_KEY_FINGERPRINT"] == fp(breakglass_vault.pve_key)
        assert await agent_fingerprints(env["SSH_AUTH_SOCK"]) == {
            fp(breakglass_vault.devvm_key),
            fp(breakglass_vault.pve_key),
        }
        # The keys are rotated in Vault; the server reloads them.
        new_devvm, new_pve = new_key("devvm-rotated"), new_key("pve-rotated")
        data = breakglass_vault.fields()
        data["devvm_private_key"] = new_devvm.export_private_key("openssh").decode()
        data["pve_private_key"] = new_pve.export_private_key("openssh").decode()
        settings.vault_sa_token_file.write_text(breakglass_vault.bao.tokenreview.issue())
        with breakglass_vault.secret_as(data):
            assert await backend.reload_keys(state) is True
        env = state.child_env
        assert env["BREAKGLASS_DEVVM_KEY_FINGERPRINT"] == fp(new_devvm)
        assert env["BREAKGLASS_PVE_KEY_FINGERPRINT"] == fp(new_pve)
        assert await agent_fingerprints(env["SSH_AUTH_SOCK"]) == {fp(new_devvm), fp(new_pve)}
    finally:
        await backend.close()


async def test_the_lab_tabs_get_the_lab_keys_fingerprints(tmp_path: Path) -> None:
    from breakglass_tui.config import Settings

    backend = ServeBackend(
        Settings(state_dir=tmp_path), lab=True, scenario="healthy", state_dir=tmp_path
    )
    state = ServeState()
    await backend.prepare(state)
    try:
        lab = backend.lab  # the lab the server started for its tabs
        env = state.child_env
        assert env["BREAKGLASS_DEVVM_KEY_FINGERPRINT"] == fp(lab.devvm_key)
        assert env["BREAKGLASS_PVE_KEY_FINGERPRINT"] == fp(lab.pve_key)
        assert env["BREAKGLASS_DEVVM_KEY_FINGERPRINT"] == lab.devvm.key_fingerprint
        assert await agent_fingerprints(env["SSH_AUTH_SOCK"]) == {
            fp(lab.devvm_key),
            fp(lab.pve_key),
        }
    finally:
        await backend.close()


async def test_a_lab_servers_tab_drives_the_lab_and_its_audit_says_lab(tmp_path, monkeypatch):
    """A tab of `breakglass-serve --lab` is wired from what the server hands it, like a real
    target's tab: the lab's targets, each with its own key from the server's agent — and its
    audit's session_start says lab=true."""
    from breakglass_tui.config import Settings, load_settings
    from breakglass_tui.ui.backend import AppOptions, build_backend

    server = ServeBackend(
        Settings(state_dir=tmp_path),
        lab=True,
        scenario="healthy",
        state_dir=tmp_path,
        devvm="sandbox",
    )
    state = ServeState()
    await server.prepare(state)
    try:
        for name, value in state.child_env.items():  # the tab's environment
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        settings = load_settings()
        events = []
        tab = await build_backend(AppOptions(lab=False, settings=settings), events.append)
        try:
            assert tab.targets.startswith("devvm 127.0.0.1")
            assert (await tab.hosts.probe()).reachability == Reachability.HEALTHY
            tab.start_agent(events.append, session_id="tab-1")
        finally:
            await tab.close()
        audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        [start] = [r for r in audit if r["kind"] == "session_start"]
        assert start["lab"] is True
    finally:
        await server.close()
