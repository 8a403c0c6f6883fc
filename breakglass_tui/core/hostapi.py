"""What the breakglass agent needs from the hosts layer, as a Protocol.

Core depends on this shape, not on ``breakglass_tui.hosts.session.HostSession`` itself, so the
agent can be exercised with the lab's real HostSession or, where the host is beside the point, with
a small object written in a test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from breakglass_tui.hosts.types import CommandOutcome, OutputChunk, ProbeResult, VerbResult


@runtime_checkable
class HostSessionLike(Protocol):
    """The devvm shell, the reachability probe and the forced-command verbs, in one object.

    ``run`` never raises for remote failures; cancelling the task awaiting it stops the remote
    command and then re-raises ``CancelledError``. ``keep_output`` False: the output streams
    through ``on_output`` and the outcome keeps only a tail (``kept_tail_only``); the agent
    always asks for that, since its output store keeps the whole.
    """

    async def run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        on_output: Callable[[OutputChunk], None] | None = None,
        keep_output: bool = True,
    ) -> CommandOutcome: ...

    async def probe(self) -> ProbeResult: ...

    async def verb(self, name: str) -> VerbResult: ...

    async def bundle(self, bundle_id: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...
