"""A dropped terminal or a stop signal ends `breakglass-tui` promptly and cleanly in every phase.

Each trial starts `breakglass-tui --lab` in a real pseudo-terminal (tests.ui.console_pty), brings it
to a phase — starting, idle, streaming Claude's answer (the fake Messages API), running a command —
and then either closes the terminal (the kernel's hang-up: SIGHUP, and reads and writes on the
terminal fail) or sends SIGTERM with the terminal still there. Half the trials first stall the
terminal (it stops reading while the console keeps drawing), which is what made Textual's writer
deadlock the console: without the fix about one such trial in six never exited.

Every trial must end with: the process gone within a generous bound (the stop's own hard
deadline is 6 s; the aim, measured by bench/bench_hangup.py, is 2 s), the lab's processes gone,
the incident's driver lease released, the audit's session_end written when a session started,
the running command or stream cancelled and recorded, and no forced exit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import fake_messages_api as fm
from tests.ui.console_pty import TYPED_FIRST, Trial, run_trial

HANGUPS_PER_PHASE = 20  # the race hit about one trial in six
SIGTERMS_PER_PHASE = 4
PARALLEL = 4  # consoles at once (each is mostly waiting on its own start-up)
EXIT_BOUND_S = 12.0  # generous: a loaded CI machine; the figure itself is the bench's

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def claude() -> Iterator[fm.FakeMessagesApi]:
    """The fake Messages API on a loop of its own (the trials are synchronous)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-api", daemon=True)
    thread.start()
    api = fm.FakeMessagesApi()
    asyncio.run_coroutine_threadsafe(api.start(), loop).result(10)
    try:
        yield api
    finally:
        asyncio.run_coroutine_threadsafe(api.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def trials(phase: str, api: fm.FakeMessagesApi) -> list[Trial]:
    env = {
        "ANTHROPIC_API_KEY": "sk-ant-test-0123456789abcdefNOTREAL",
        "ANTHROPIC_BASE_URL": api.base_url,
    }
    plan = [("hangup", i % 2 == 0) for i in range(HANGUPS_PER_PHASE)]
    plan += [("sigterm", i % 2 == 0) for i in range(SIGTERMS_PER_PHASE)]
    # A stream that starts and then goes quiet (Claude thinking): the console waits mid-stream.
    api.script.extend(fm.stalled(after=4) for _ in plan)

    def one(n: int) -> Trial:
        how, stalled = plan[n]
        # A short path: the lab's unix sockets live under the console's TMPDIR (108 bytes).
        workdir = Path(tempfile.mkdtemp(prefix=f"bg-{phase[:3]}{n}-"))
        try:
            return run_trial(workdir, phase, how, stalled=stalled, seed=n, env=env)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(one, range(len(plan))))


def check(trial: Trial) -> list[str]:
    """What is wrong with how this trial ended (empty: nothing)."""
    name = f"{trial.phase}/{trial.how}{'/stalled' if trial.stalled else ''}"
    problems = []
    if not trial.exited:
        return [f"{name}: still running {EXIT_BOUND_S} s after the signal"]
    if trial.exit_s > EXIT_BOUND_S:
        problems.append(f"{name}: took {trial.exit_s:.1f} s to exit")
    signum = signal.SIGHUP if trial.how == "hangup" else signal.SIGTERM
    expected = {128 + signum}
    if trial.phase == "starting":
        expected.add(-signum)  # the signal came before Python had its handler: nothing to undo
    if trial.returncode not in expected:
        problems.append(f"{name}: exit code {trial.returncode}, expected {sorted(expected)}")
    if trial.left:
        problems.append(f"{name}: processes left behind: {trial.left}")
    if trial.leases:
        problems.append(f"{name}: driver lease not released: {trial.leases}")
    kinds = trial.kinds()
    if "session_start" in kinds and "session_end" not in kinds[kinds.index("session_start") :]:
        problems.append(f"{name}: no session_end in the audit ({kinds[-6:]})")
    forced = [r for r in trial.audit if r.get("forced") or r.get("kind") == "exit_forced"]
    if forced:
        problems.append(f"{name}: the stop was forced: {forced}")
    if trial.phase == "command":
        results = [r for r in trial.audit if r.get("kind") == "tool_result"]
        if not (results and results[-1].get("cancelled")):
            problems.append(f"{name}: the running command's cancel is not in the audit")
        ended = [r for r in trial.journal if r.get("type") == "ToolCallEnded"]
        if not (ended and ended[-1].get("cancelled")):
            problems.append(f"{name}: the running command's end is not in the journal")
    if trial.phase == "streaming":
        if "cancelled" not in kinds:
            problems.append(f"{name}: the stream's cancel is not in the audit")
        typed = [r.get("text") for r in trial.audit if r.get("kind") == "operator_message"]
        if TYPED_FIRST not in typed:
            problems.append(f"{name}: the message typed during the opening probe was lost")
    return problems


@pytest.mark.parametrize("phase", ["starting", "idle", "streaming", "command"])
def test_hangup_and_sigterm_end_the_console_in_every_phase(phase, claude):
    if not os.path.exists("/dev/ptmx"):
        pytest.fail("no pseudo-terminals here (/dev/ptmx): the hang-up trials need one")
    done = trials(phase, claude)
    assert len(done) == HANGUPS_PER_PHASE + SIGTERMS_PER_PHASE
    problems = [p for trial in done for p in check(trial)]
    assert not problems, "\n".join(problems)
