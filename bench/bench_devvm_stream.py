"""Benchmark: streaming a large command output through the devvm shell.

Against a real OpenSSH sshd on loopback, in one run:
- a bare asyncssh read of the output (a minimal session that only counts bytes) — the baseline;
- DevvmShell.run(keep_output=False) with an on_output consumer that counts characters.
Throughput is reported as MB/s and as the shell's ratio to the baseline (aim >= 0.8). Peak memory
of DevvmShell while streaming is measured with tracemalloc in a separate pass (tracemalloc slows
the code it watches), with keep_output=False (bounded: the outcome keeps a 64 KiB tail) and, for
comparison, keep_output=True (the whole output kept: proportional to its size).

    .venv/bin/python bench/bench_devvm_stream.py [--mb 50] [--rounds 3] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncssh

from breakglass_tui.hosts.devvm import DevvmShell
from breakglass_tui.hosts.ssh import ConnectOptions
from breakglass_tui.hosts.types import OutputChunk, SshTarget
from tests.support.realparts import new_key, public_line, start_sshd


def command_for(mb: int) -> str:
    return f"head -c {mb}M /dev/zero | tr '\\0' 'x' | fold -w 100"


class _Counter(asyncssh.SSHClientSession[bytes]):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.nbytes = 0
        self._done = done

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.nbytes += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def bare_read(conn: asyncssh.SSHClientConnection, command: str) -> tuple[float, int]:
    """Seconds and bytes for a bare asyncssh read of command's output."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = time.perf_counter()
    chan, session = await conn.create_session(lambda: _Counter(done), command, encoding=None)
    chan.write_eof()
    await done
    return time.perf_counter() - started, session.nbytes


async def shell_read(shell: DevvmShell, command: str, keep_output: bool) -> tuple[float, int]:
    """Seconds and bytes for the same output through DevvmShell.run."""
    chars = 0

    def count(chunk: OutputChunk) -> None:
        nonlocal chars
        chars += len(chunk.text)

    started = time.perf_counter()
    outcome = await shell.run(command, on_output=count, keep_output=keep_output, timeout_s=600)
    elapsed = time.perf_counter() - started
    if not outcome.ok or chars != outcome.stdout_bytes:
        raise SystemExit(f"the shell run failed: {outcome.ending} {outcome.message}")
    return elapsed, outcome.stdout_bytes


async def peak_memory(shell: DevvmShell, command: str, keep_output: bool) -> int:
    """Peak bytes allocated by Python while DevvmShell streams command (tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    await shell_read(shell, command, keep_output)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="output size in MiB (before newlines)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 below ratio 0.8")
    args = parser.parse_args()

    key = new_key("bench")
    sshd = start_sshd(public_line(key) + "\n")
    try:
        target = SshTarget("127.0.0.1", sshd.port, "root", sshd.known_hosts)
        command = command_for(args.mb)
        shell = DevvmShell(target, ConnectOptions(client_keys=[key]))
        conn = await asyncssh.connect(
            "127.0.0.1",
            sshd.port,
            username="root",
            known_hosts=asyncssh.import_known_hosts(sshd.known_hosts),
            config=None,
            client_keys=[key],
            agent_path=None,
        )
        await shell.run("true")  # connect outside the timings
        bare_s: list[float] = []
        shell_s: list[float] = []
        nbytes = 0
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            seconds, nbytes = await bare_read(conn, command)
            bare_s.append(seconds)
            seconds, shell_bytes = await shell_read(shell, command, keep_output=False)
            shell_s.append(seconds)
            if shell_bytes != nbytes:
                raise SystemExit(f"byte counts differ: bare {nbytes}, shell {shell_bytes}")
        bare_med, shell_med = statistics.median(bare_s), statistics.median(shell_s)
        ratio = bare_med / shell_med
        bounded = await peak_memory(shell, command, keep_output=False)
        whole = await peak_memory(shell, command, keep_output=True)
        conn.close()
        await shell.close()
    finally:
        sshd.close()

    mb = nbytes / 1e6
    print(
        f"output: {nbytes} bytes ({args.mb} MiB of 'x' in 100-column lines), {args.rounds} rounds"
    )
    print(f"bare asyncssh read : median {bare_med:.2f} s  {mb / bare_med:7.1f} MB/s")
    print(f"DevvmShell.run     : median {shell_med:.2f} s  {mb / shell_med:7.1f} MB/s")
    print(f"ratio (shell/bare) : {ratio:.2f}  (aim >= 0.8)")
    print(f"peak Python memory, keep_output=False: {bounded / 1e6:.1f} MB (bounded)")
    print(f"peak Python memory, keep_output=True : {whole / 1e6:.1f} MB (whole output kept)")
    return 1 if args.check and ratio < 0.8 else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
