"""What breakglass-serve prepares once at start: the keys in an ssh-agent and the targets.

Real targets: the keys come from Vault (or the operator's ssh-agent) through the hosts layer.
Lab: the lab is started here, once, and its generated keys go into a private ssh-agent, so every
tab drives the same lab exactly as it would drive real targets.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from breakglass_tui.config import Settings
from breakglass_tui.core.selfcheck import Outcome, SelfCheck, not_used
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
        self._targets: Any = None  # (devvm, pve) SshTargets, once prepared
        self._state: ServeState | None = None

    async def prepare(self, state: ServeState) -> None:
        """Load the keys and describe the targets for the app processes; fill /readyz's state."""
        from breakglass_tui.hosts.keyagent import KeyAgent, load_keys

        self._state = state
        # The tabs read the server's self-check results from the state dir (core.selfcheck).
        env = {"BREAKGLASS_STATE_DIR": str(self.state_dir), "BREAKGLASS_SELFCHECK": "serve"}
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
            self._targets = (lab.devvm, lab.pve)
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
            self._targets = self._real_targets()
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

    def _real_targets(self) -> tuple[Any, Any]:
        """The devvm and the PVE host as SshTargets, each bound to its own key."""
        from breakglass_tui.hosts.types import SshTarget

        s, loaded = self.settings, self._loaded
        return tuple(
            SshTarget(
                host=host,
                port=port,
                user=user,
                known_hosts=known,
                name=name,
                key_fingerprint=fingerprint,
            )
            for name, host, port, user, known, fingerprint in (
                (
                    "devvm",
                    s.devvm_host,
                    s.devvm_port,
                    s.devvm_user,
                    loaded.devvm_known_hosts or s.devvm_host_key,
                    loaded.devvm_fingerprint,
                ),
                (
                    "pve",
                    s.pve_host,
                    s.pve_port,
                    s.pve_user,
                    loaded.pve_known_hosts or s.pve_host_key,
                    loaded.pve_fingerprint,
                ),
            )
        )

    # -- the self-check (core.selfcheck): each link of the rescue path, nothing changed ----------
    def build_selfcheck(self) -> SelfCheck:
        """The self-check of this server's links. Built once; each check reads the current
        targets and keys, so a reload (a key rotated in Vault) is checked from the next run."""
        s = self.settings
        timeout = s.selfcheck_timeout_s
        checks = {
            "vault": self._check_vault,
            "pve": self._check_pve,
            "devvm": self._check_devvm,
            "api": self._check_api,
            "serving": self._check_serving,
        }
        if self.lab_mode:
            checks["vault"] = not_used("the lab has no Vault: its keys are made in memory")
        elif not s.vault_addr:
            checks["vault"] = not_used(
                "no BREAKGLASS_VAULT_ADDR: the keys come from the operator's ssh-agent"
            )
        if not os.environ.get("ANTHROPIC_API_KEY") and self.lab_mode:
            checks["api"] = not_used("no ANTHROPIC_API_KEY: the lab runs in manual mode")
        if not s.selfcheck_serving_path:
            checks["serving"] = not_used(
                "off (BREAKGLASS_SELFCHECK_SERVING_PATH): the public URL is not fetched"
            )
        return SelfCheck(checks, timeout_s=timeout)

    def _not_ready(self) -> Outcome | None:
        if self._targets is None or self._agent is None:
            problem = self._state.problem if self._state is not None else "not prepared"
            return Outcome.of(False, f"the keys are not loaded, so nothing can log in: {problem}")
        return None

    def _options(self) -> Any:
        from breakglass_tui.hosts.ssh import ConnectOptions

        return ConnectOptions(
            agent_path=self._agent.socket_path,
            connect_timeout_s=min(
                self.settings.connect_timeout_s, self.settings.selfcheck_timeout_s
            ),
        )

    async def _check_vault(self) -> Outcome:
        from breakglass_tui.hosts.vault import KeysError, read_breakglass_keys

        try:
            if self._loaded is None or self._loaded.source != "vault":
                # Not loaded at start (the problem /readyz names): is Vault answering now?
                await asyncio.to_thread(read_breakglass_keys, self.settings)
                return Outcome.of(
                    True,
                    "logged in and read the secret; the keys were not loaded at start:"
                    " restart the pod to load them",
                )
            changed = await self._loaded.check_vault(self.settings)
        except KeysError as exc:
            return Outcome.of(False, str(exc))
        if changed:
            # New tabs get the new fingerprints, each key still bound to its own target.
            if self._state is not None:
                self._state.child_env = {**self._state.child_env, **self._real_targets_env()}
            self._targets = self._real_targets()
            log.warning("the keys in Vault changed: reloaded into the ssh-agent")
            return Outcome.of(
                True,
                "logged in and read the secret: the keys CHANGED in Vault and were reloaded"
                f" (devvm {self._loaded.devvm_fingerprint}, PVE {self._loaded.pve_fingerprint});"
                " new tabs use them (a tab open before: reopen it)",
                event="keys_reloaded",
            )
        return Outcome.of(True, "logged in and read the secret; the keys match those loaded")

    async def _check_pve(self) -> Outcome:
        from breakglass_tui.hosts.linkcheck import check_pve

        problem = self._not_ready()
        if problem:
            return problem
        ok, message = await check_pve(
            self._targets[1], self._options(), timeout_s=self.settings.selfcheck_timeout_s
        )
        return Outcome.of(ok, message)

    async def _check_devvm(self) -> Outcome:
        from breakglass_tui.hosts.linkcheck import check_devvm

        problem = self._not_ready()
        if problem:
            return problem
        ok, message = await check_devvm(
            self._targets[0],
            agent_path=self._agent.socket_path,
            timeout_s=min(5.0, self.settings.selfcheck_timeout_s / 2),
        )
        return Outcome.of(ok, message)

    async def _check_api(self) -> Outcome:
        from breakglass_tui.core.apicheck import check_messages_api

        key = os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            return Outcome.of(
                False,
                "no ANTHROPIC_API_KEY: the console would open in manual mode; put the key in"
                " the Secret the chart mounts (docs/install.md)",
            )
        ok, message = await check_messages_api(
            key,
            self.settings.model,
            base_url=os.environ.get("ANTHROPIC_BASE_URL"),
            timeout_s=self.settings.selfcheck_timeout_s,
        )
        return Outcome.of(ok, message)

    async def _check_serving(self) -> Outcome:
        from breakglass_tui.core.servingcheck import check_serving_path

        ok, message = await check_serving_path(
            str(self.settings.public_url or ""), timeout_s=self.settings.selfcheck_timeout_s
        )
        return Outcome.of(ok, message)

    async def reload_keys(self, state: ServeState) -> bool:
        """Load the keys again (real targets only) and give the tabs opened from now on each
        key's new fingerprint: each key stays bound to its own target. True when a key changed;
        on an error nothing changes and the error is raised."""
        if self._loaded is None:
            return False
        changed = await self._loaded.reload(self.settings)
        state.child_env = {**state.child_env, **self._real_targets_env()}
        self._targets = self._real_targets()
        return changed

    async def close(self) -> None:
        if self._agent is not None:
            await self._agent.close()
        if self._lab is not None:
            await self._lab.close()


async def check_once(
    settings: Settings,
    *,
    lab: bool,
    scenario: str = "healthy",
    state_dir: Path,
    devvm: str = "auto",
    out: Any = None,
) -> int:
    """``--check``: load the keys (or start the lab) as the server would, run the self-check
    once, print one line per link; 0 when no link is broken, 1 otherwise."""
    import sys
    import warnings

    from breakglass_tui.core.selfcheck import report_lines

    # asyncssh still names DSA at import; a CronJob's log should hold the check's lines only.
    warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")
    out = out or sys.stdout
    backend = ServeBackend(settings, lab=lab, scenario=scenario, state_dir=state_dir, devvm=devvm)
    state = ServeState()
    try:
        try:
            await backend.prepare(state)
        except Exception as exc:  # the links then say what is broken
            state.problem = str(exc)
        selfcheck = backend.build_selfcheck()
        await selfcheck.run()
        for line in report_lines(selfcheck.snapshot()):
            print(line, file=out)
        broken = [s.link for s in selfcheck.links.values() if s.status == "broken"]
        print(
            "rescue path: all links OK"
            if not broken
            else f"rescue path BROKEN: {', '.join(broken)}",
            file=out,
        )
        return 1 if broken else 0
    finally:
        await backend.close()
