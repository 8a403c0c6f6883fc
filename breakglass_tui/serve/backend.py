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
from pathlib import Path
from typing import Any

from breakglass_tui import runtime
from breakglass_tui.config import Settings
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

    @property
    def lab(self) -> Any:
        """The lab this server started for its tabs (``--lab``), or None."""
        return self.wiring.lab if self.wiring is not None else None

    async def prepare(self, state: ServeState) -> None:
        """Load the keys and describe the targets for the app processes; fill /readyz's state."""
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
        state.child_env = {"BREAKGLASS_STATE_DIR": str(self.state_dir), **self.wiring.env()}
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
