"""What breakglass-serve prepares once at start: the keys in an ssh-agent and the targets.

Real targets: the keys come from Vault (or the operator's ssh-agent) through the hosts layer.
Lab: the lab is started here, once, and its generated keys go into a private ssh-agent, so every
tab drives the same lab exactly as it would drive real targets.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from breakglass_tui.config import Settings
from breakglass_tui.serve.server import ServeState

log = logging.getLogger("breakglass.serve")


def target_env(
    prefix: str,
    host: str,
    port: int,
    user: str,
    known_hosts: str | None,
    key_fingerprint: str | None = None,
) -> dict:
    """A target for the app processes' environment. ``key_fingerprint`` names the one key in the
    server's ssh-agent the app may offer that target (keys per target, docs/keys.md)."""
    env = {
        f"BREAKGLASS_{prefix}_HOST": host,
        f"BREAKGLASS_{prefix}_PORT": str(port),
        f"BREAKGLASS_{prefix}_USER": user,
    }
    if known_hosts:
        env[f"BREAKGLASS_{prefix}_HOST_KEY"] = known_hosts
    if key_fingerprint:
        env[f"BREAKGLASS_{prefix}_KEY_FINGERPRINT"] = key_fingerprint
    return env


class ServeBackend:
    def __init__(
        self,
        settings: Settings,
        *,
        lab: bool,
        scenario: str,
        state_dir: Path,
        devvm: str = "auto",
    ) -> None:
        self.settings = settings
        self.lab_mode = lab
        self.devvm = devvm  # with --lab: "auto" (the real devvm where QEMU runs) or "sandbox"
        self.scenario = scenario
        self.state_dir = state_dir
        self._lab: Any = None
        self._agent: Any = None
        self._loaded: Any = None  # hosts.keyagent.LoadedKeys, for real targets

    async def prepare(self, state: ServeState) -> None:
        """Load the keys and describe the targets for the app processes; fill /readyz's state."""
        from breakglass_tui.hosts.keyagent import KeyAgent, load_keys

        env = {"BREAKGLASS_STATE_DIR": str(self.state_dir)}
        if self.lab_mode:
            from breakglass_tui.lab.choice import choose_devvm

            choice = await asyncio.to_thread(choose_devvm, self.scenario, self.devvm)
            from breakglass_tui.lab.lab import start_lab

            # No devvm can run here (a read-only container without capabilities): the lab
            # without one, and every tab's console says why in one sentence.
            self._lab = lab = await start_lab(
                choice.scenario,
                devvm=choice.devvm or "none",
                progress=lambda line: log.info("lab: %s", line),
            )
            if choice.note:
                env["BREAKGLASS_LAB_NOTE"] = choice.note
                log.warning("lab: %s", choice.note)
            self._agent = await KeyAgent.start_private()
            await self._agent.add_keys(lab.client_keys)
            for prefix, target, key in (
                ("DEVVM", lab.devvm, lab.devvm_key),
                ("PVE", lab.pve, lab.pve_key),
            ):
                env.update(
                    target_env(
                        prefix,
                        target.host,
                        target.port,
                        target.user,
                        target.known_hosts,
                        key.get_fingerprint("sha256"),
                    )
                )
            env["BREAKGLASS_TARGETS_ARE_LAB"] = "1"
        else:
            s = self.settings
            if not s.devvm_host or not s.pve_host:
                raise RuntimeError(
                    "BREAKGLASS_DEVVM_HOST and BREAKGLASS_PVE_HOST must both be set (IP literals)"
                )
            self._loaded = loaded = await load_keys(s)
            self._agent = loaded.agent
            env.update(self._real_targets_env())
            if not env.get("BREAKGLASS_DEVVM_HOST_KEY") or not env.get("BREAKGLASS_PVE_HOST_KEY"):
                raise RuntimeError(
                    "no pinned host key for the devvm or the PVE host: put devvm_known_hosts and"
                    " pve_known_hosts in the Vault secret, or set BREAKGLASS_DEVVM_HOST_KEY and"
                    " BREAKGLASS_PVE_HOST_KEY"
                )
        env["SSH_AUTH_SOCK"] = self._agent.socket_path
        state.child_env = env
        state.keys_loaded = True
        state.config_ok = True
        state.problem = ""
        log.info("ready", extra={"lab": self.lab_mode, "scenario": self.scenario})

    def _real_targets_env(self) -> dict[str, str]:
        s, loaded = self.settings, self._loaded
        env = target_env(
            "DEVVM",
            s.devvm_host,
            s.devvm_port,
            s.devvm_user,
            loaded.devvm_known_hosts or s.devvm_host_key,
            loaded.devvm_fingerprint,
        )
        env.update(
            target_env(
                "PVE",
                s.pve_host,
                s.pve_port,
                s.pve_user,
                loaded.pve_known_hosts or s.pve_host_key,
                loaded.pve_fingerprint,
            )
        )
        return env

    async def reload_keys(self, state: ServeState) -> bool:
        """Load the keys again (real targets only) and give the tabs opened from now on each
        key's new fingerprint: each key stays bound to its own target. True when a key changed;
        on an error nothing changes and the error is raised."""
        if self._loaded is None:
            return False
        changed = await self._loaded.reload(self.settings)
        state.child_env = {**state.child_env, **self._real_targets_env()}
        return changed

    async def close(self) -> None:
        if self._agent is not None:
            await self._agent.close()
        if self._lab is not None:
            await self._lab.close()
