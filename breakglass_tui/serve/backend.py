"""What breakglass-serve prepares once at start: the keys in an ssh-agent and the targets.

The wiring is ``runtime``'s, the same as ``breakglass-tui``'s: real targets get their keys from
Vault (or the operator's ssh-agent) with each target pinned and bound to its own key; ``--lab``
starts the lab here, once, and puts its generated keys in a private ssh-agent, so every tab drives
the same lab exactly as it would drive real targets. Each tab's app process gets the targets,
the fingerprints and the agent's socket in its environment (``runtime.Wiring.env``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from breakglass_tui import runtime
from breakglass_tui.config import Settings
from breakglass_tui.core.selfcheck import Outcome, SelfCheck, not_used
from breakglass_tui.serve.server import ServeState

log = logging.getLogger("breakglass.serve")


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
        self.wiring: runtime.Wiring | None = None
        self._state: ServeState | None = None

    @property
    def lab(self) -> Any:
        """The lab this server started for its tabs (``--lab``), or None."""
        return self.wiring.lab if self.wiring is not None else None

    async def prepare(self, state: ServeState) -> None:
        """Load the keys and describe the targets for the app processes; fill /readyz's state."""
        self._state = state
        if self.lab_mode:
            plan = await asyncio.to_thread(
                lambda: runtime.choose_lab(self.scenario, self.devvm, prepare=False)
            )
            # No devvm can run here (a read-only container without capabilities): the lab
            # without one, and every tab's console says why in one sentence.
            self.wiring = wiring = await runtime.wire_lab(
                plan.scenario,
                plan.devvm,
                progress=lambda line: log.info("lab: %s", line),
                note=plan.note,
                into_agent=True,
            )
            if wiring.note:
                log.warning("lab: %s", wiring.note)
        else:
            self.wiring = await runtime.wire_real(self.settings)
        # The tabs read the server's self-check results from the state dir (core.selfcheck).
        state.child_env = {
            "BREAKGLASS_STATE_DIR": str(self.state_dir),
            "BREAKGLASS_SELFCHECK": "serve",
            **self.wiring.env(),
        }
        state.keys_loaded = True
        state.config_ok = True
        state.problem = ""
        log.info(
            "ready",
            extra={
                "lab": self.lab_mode,
                "scenario": self.scenario,
                "state_dir": str(self.state_dir),  # where this server's records go
            },
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
        if self.wiring is None or self.wiring.agent is None:
            problem = self._state.problem if self._state is not None else "not prepared"
            return Outcome.of(False, f"the keys are not loaded, so nothing can log in: {problem}")
        return None

    def _options(self) -> Any:
        from breakglass_tui.hosts.ssh import ConnectOptions

        return ConnectOptions(
            agent_path=self.wiring.agent.socket_path,
            connect_timeout_s=min(
                self.settings.connect_timeout_s, self.settings.selfcheck_timeout_s
            ),
        )

    async def _check_vault(self) -> Outcome:
        from breakglass_tui.hosts.vault import KeysError, read_breakglass_keys

        try:
            loaded = self.wiring.loaded if self.wiring is not None else None
            if loaded is None or loaded.source != "vault":
                # Not loaded at start (the problem /readyz names): is Vault answering now?
                await asyncio.to_thread(read_breakglass_keys, self.settings)
                return Outcome.of(
                    True,
                    "logged in and read the secret; the keys were not loaded at start:"
                    " restart the pod to load them",
                )
            changed = await loaded.check_vault(self.settings)
        except KeysError as exc:
            return Outcome.of(False, str(exc))
        if changed:
            # New tabs get the new fingerprints, each key still bound to its own target.
            wiring = self.wiring
            wiring.devvm, wiring.pve = runtime.pinned_targets(self.settings, loaded)
            if self._state is not None:
                self._state.child_env = {**self._state.child_env, **wiring.env()}
            log.warning("the keys in Vault changed: reloaded into the ssh-agent")
            return Outcome.of(
                True,
                "logged in and read the secret: the keys CHANGED in Vault and were reloaded"
                f" (devvm {loaded.devvm_fingerprint}, PVE {loaded.pve_fingerprint});"
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
            self.wiring.pve, self._options(), timeout_s=self.settings.selfcheck_timeout_s
        )
        return Outcome.of(ok, message)

    async def _check_devvm(self) -> Outcome:
        from breakglass_tui.hosts.linkcheck import check_devvm

        problem = self._not_ready()
        if problem:
            return problem
        ok, message = await check_devvm(
            self.wiring.devvm,
            agent_path=self.wiring.agent.socket_path,
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
        if self.wiring is None or self.wiring.loaded is None:
            return False
        changed = await self.wiring.reload(self.settings)
        state.child_env = {**state.child_env, **self.wiring.env()}
        return changed

    async def close(self) -> None:
        if self.wiring is not None:
            await self.wiring.close()


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
