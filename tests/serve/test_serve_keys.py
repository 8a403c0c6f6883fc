"""What breakglass-serve hands each tab about the keys: the agent socket and, per target, the one
key's fingerprint — from a real OpenBao and a real ssh-agent (and from the lab). A reload of the
keys gives the tabs opened afterwards the new fingerprints, each still on its own target."""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import asyncssh

from breakglass_tui.hosts.ssh import fingerprint
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
