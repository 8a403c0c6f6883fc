"""The simulated devvm's shell: a small interpreter for the commands a rescue needs.

It reads and changes a :class:`~breakglass_tui.lab.scenarios.DevvmState` and prints what a Debian 12
guest would print (shapes copied from procps, coreutils, util-linux and systemd 252). Supported:
``;``/``&&``/``||`` lists, ``while``/``if``, functions, simple pipelines into ``head``/``tail``/
``grep``/``sort``/``wc``/``uniq``,
``sudo -n``, ``sh -c``, ``exec``/``setsid``/``nohup``/``env``/``timeout`` prefixes, ``$$``, and the
redirections ``2>&1``, ``2>/dev/null``, ``>/dev/null``, ``</dev/null``. Anything else gets the
honest ``sh: 1: X: not found`` (exit 127).

io-stall: commands that touch the disk wait forever (until the command is killed or the channel
closes); /proc reads and ``uptime`` answer after a delay.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from breakglass_tui.lab.scenarios import (
    GIB,
    HOSTNAME,
    KERNEL,
    KIB,
    MIB,
    DevvmState,
    JournalEntry,
    SimFile,
    SimProcess,
)

# Output is written in pieces of this size, with a yield between them, like a real pipe's writes.
CHUNK = 16 * KIB
# `cat` of a huge synthetic log stops after this much: the lab's CPU is shared, and a real agent
# would never read 38G through a terminal anyway.
CAT_CAP_BYTES = 2 * MIB
SIGNALS = {
    "1": "HUP",
    "2": "INT",
    "3": "QUIT",
    "9": "KILL",
    "15": "TERM",
    "10": "USR1",
    "12": "USR2",
    "18": "CONT",
    "19": "STOP",
    "0": "0",
}
_REDIRECT = re.compile(r"\s(?:2>&1|[12]?>\s*/dev/null|<\s*/dev/null)(?=\s|$|;|&|\|)")


def _redirect_marker(redirect: str) -> str:
    """A redirection as one word the tokenizer leaves alone (`&` would split `2>&1`)."""
    redirect = redirect.strip().replace(" ", "")
    if redirect == "2>&1":
        return "\x00merge"
    if redirect.startswith("<"):
        return "\x00nullin"
    return "\x00null2" if redirect.startswith("2") else "\x00null1"


class Output:
    """Where a command writes. The devvm sim's channel implements it; pipelines buffer it."""

    async def out(self, text: str) -> None:
        raise NotImplementedError

    async def err(self, text: str) -> None:
        raise NotImplementedError


class BufferOutput(Output):
    """Collects stdout (for the next stage of a pipeline); stderr goes straight through."""

    def __init__(self, parent: Output, *, merge_stderr: bool = False) -> None:
        self.parent = parent
        self.merge = merge_stderr
        self.parts: list[str] = []
        self.size = 0

    async def out(self, text: str) -> None:
        if self.size < 64 * MIB:  # a pipeline's input is bounded like a pipe's reader's memory
            self.parts.append(text)
            self.size += len(text)

    async def err(self, text: str) -> None:
        if self.merge:
            await self.out(text)
        else:
            await self.parent.err(text)

    def text(self) -> str:
        return "".join(self.parts)


class _Merged(Output):
    """`2>&1`: stderr joins stdout."""

    def __init__(self, parent: Output) -> None:
        self.parent = parent

    async def out(self, text: str) -> None:
        await self.parent.out(text)

    async def err(self, text: str) -> None:
        await self.parent.out(text)


class _Null(Output):
    def __init__(self, parent: Output, *, stdout: bool, stderr: bool) -> None:
        self.parent, self.drop_out, self.drop_err = parent, stdout, stderr

    async def out(self, text: str) -> None:
        if not self.drop_out:
            await self.parent.out(text)

    async def err(self, text: str) -> None:
        if not self.drop_err:
            await self.parent.err(text)


@dataclass
class Ctx:
    """One simple command's context."""

    out: Output
    root: bool
    stdin: str | None = None

    async def print(self, text: str) -> None:
        """Write `text` in chunks, yielding between them so the output streams."""
        for i in range(0, len(text), CHUNK):
            await self.out.out(text[i : i + CHUNK])
            if len(text) > CHUNK:
                await asyncio.sleep(0.002)

    async def lines(self, lines: Iterable[str]) -> None:
        buf: list[str] = []
        size = 0
        for line in lines:
            buf.append(line + "\n")
            size += len(line) + 1
            if size >= CHUNK:
                await self.out.out("".join(buf))
                buf, size = [], 0
                await asyncio.sleep(0.002)
        if buf:
            await self.out.out("".join(buf))

    async def error(self, text: str, status: int = 1) -> int:
        await self.out.err(text + "\n")
        return status


Handler = Callable[[list[str], Ctx], Awaitable[int]]
# (kind, a, b, c): ("pipe", stages, -, -), ("while", cond, body, -), ("if", cond, then, else)
_Node = tuple[str, list, list, list]
_SEPARATORS = frozenset({";", "&&", "||", "&", ";;"})


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def human(n_bytes: float, *, iec_suffix: bool = False) -> str:
    """coreutils' -h: powers of 1024, one decimal below 10, rounded up (free -h says "Gi")."""
    units = ["", "K", "M", "G", "T", "P"]
    value = float(n_bytes)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{int(value)}{'B' if iec_suffix else ''}"
    suffix = units[i] + ("i" if iec_suffix else "")
    if value < 10:
        value = math.ceil(value * 10) / 10
        if value < 10:
            return f"{value:.1f}{suffix}"
    return f"{math.ceil(value):.0f}{suffix}"


def _clock(ts: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(ts))


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}min {s % 60}s ago" if s < 600 else f"{s // 60}min ago"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60}min ago"
    return f"{s // 86_400} days ago"


def _uptime_text(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86_400)
    hours, minutes = rest // 3600, rest % 3600 // 60
    hm = f"{hours:2d}:{minutes:02d}" if hours else f"{minutes} min"
    if days:
        return f"{days} day{'s' if days > 1 else ''}, {hm}"
    return hm


class Shell:
    """Interprets command lines against `state`. One instance per SSH channel."""

    def __init__(
        self,
        state: DevvmState,
        *,
        user: str,
        pid: int,
        io_delay_s: float = 0.4,
    ) -> None:
        self.state = state
        self.user = user
        self.pid = pid
        self.io_delay_s = io_delay_s
        self.commands: dict[str, Handler] = {
            name.removeprefix("cmd_").replace("_", "-"): getattr(self, name)
            for name in dir(self)
            if name.startswith("cmd_")
        }
        self.vars: dict[str, str] = {
            "HOME": "/root" if user == "root" else f"/home/{user}",
            "USER": user,
            "HOSTNAME": HOSTNAME,
        }
        self.last_status = 0
        self.funcs: dict[str, list[tuple[str, _Node]]] = {}
        self._substitutions: list[str] = []
        self.commands["["] = self.cmd_test
        self.commands[":"] = self.cmd_true

    # -- parsing ---------------------------------------------------------------------------------

    async def run(self, command: str, out: Output, *, root: bool | None = None) -> int:
        """Run a command line (as `sh -c` would); returns its exit status."""
        is_root = self.user == "root" if root is None else root
        try:
            items = self._parse(self._tokens(command))
        except ValueError as exc:
            return await Ctx(out, is_root).error(f"sh: 1: Syntax error: {exc}", 2)
        try:
            return await self._exec_items(items, out, is_root)
        except _Exit as exc:
            return exc.status

    def _tokens(self, command: str) -> list[str]:
        command = " " + self._hide_substitutions(command).replace("\n", " ; ") + " "
        # Redirections become marker words so the tokenizer does not split them.
        command = _REDIRECT.sub(lambda m: f" {_redirect_marker(m.group(0))} ", command)
        lex = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = ""
        try:
            return list(lex)
        except ValueError:
            raise ValueError("Unterminated quoted string") from None

    def _hide_substitutions(self, command: str) -> str:
        """`$(...)` and backquotes become placeholder words, run when the word is expanded."""
        out: list[str] = []
        i = 0
        while i < len(command):
            if command.startswith("$(", i) and not command.startswith("$((", i):
                depth, j = 1, i + 2
                while j < len(command) and depth:
                    depth += {"(": 1, ")": -1}.get(command[j], 0)
                    j += 1
                if depth:
                    raise ValueError('end of file unexpected (expecting ")")')
                inner = command[i + 2 : j - 1]
            elif command[i] == "`":
                j = command.find("`", i + 1) + 1
                if not j:
                    raise ValueError('end of file unexpected (expecting "`")')
                inner = command[i + 1 : j - 1]
            else:
                out.append(command[i])
                i += 1
                continue
            self._substitutions.append(inner)
            out.append(f"\x01{len(self._substitutions) - 1}\x01")
            i = j
        return "".join(out)

    async def _substitute(self, word: str, out: Output, root: bool) -> list[str]:
        """Run a word's command substitutions; a word that was only one is split on blanks."""
        if "\x01" not in word:
            return [word]
        parts = word.split("\x01")
        text = []
        for n, part in enumerate(parts):
            if n % 2 == 0:
                text.append(part)
                continue
            buf = BufferOutput(out)  # stdout captured, stderr passes through
            saved = self.last_status
            await self.run(self._substitutions[int(part)], buf, root=root)
            self.last_status = saved
            text.append(buf.text().rstrip("\n"))
        if len(parts) == 3 and not parts[0] and not parts[2]:
            return text[1].split()
        return ["".join(text)]

    def _parse(self, tokens: list[str]) -> list[tuple[str, _Node]]:
        """Tokens -> a list of (operator, node): pipelines, `while` and `if` compounds."""
        pos = 0

        def items(stops: frozenset[str]) -> list[tuple[str, _Node]]:
            nonlocal pos
            result: list[tuple[str, _Node]] = []
            op = ";"
            while pos < len(tokens):
                tok = tokens[pos]
                if tok in stops:
                    return result
                if tok in _SEPARATORS:
                    op = ";" if tok in (";", "&") else tok
                    pos += 1
                    continue
                if tok.endswith("()") and pos + 1 < len(tokens) and tokens[pos + 1] == "{":
                    pos += 2  # name() { body; }: a shell function
                    body = items(frozenset({"}"}))
                    expect("}")
                    node: _Node = ("func", [tok[:-2]], body, [])
                elif tok == "{":
                    pos += 1
                    body = items(frozenset({"}"}))
                    expect("}")
                    node = ("if", [], body, [])  # a group: an `if` whose condition is empty
                elif tok == "while":
                    pos += 1
                    cond = items(frozenset({"do"}))
                    expect("do")
                    body = items(frozenset({"done"}))
                    expect("done")
                    node = ("while", cond, body, [])
                elif tok == "if":
                    pos += 1
                    cond = items(frozenset({"then"}))
                    expect("then")
                    then = items(frozenset({"else", "fi"}))
                    other: list[tuple[str, _Node]] = []
                    if pos < len(tokens) and tokens[pos] == "else":
                        pos += 1
                        other = items(frozenset({"fi"}))
                    expect("fi")
                    node = ("if", cond, then, other)
                else:
                    stages: list[list[str]] = [[]]
                    while pos < len(tokens) and tokens[pos] not in _SEPARATORS:
                        if tokens[pos] in ("|", "|&"):
                            stages.append([])
                        else:
                            stages[-1].append(tokens[pos])
                        pos += 1
                    if not all(stages):
                        raise ValueError('"|" unexpected')
                    node = ("pipe", stages, [], [])
                result.append((op, node))
                op = ";"
            if stops:
                raise ValueError(f'end of file unexpected (expecting "{sorted(stops)[0]}")')
            return result

        def expect(word: str) -> None:
            nonlocal pos
            if pos >= len(tokens) or tokens[pos] != word:
                raise ValueError(f'end of file unexpected (expecting "{word}")')
            pos += 1

        return items(frozenset())

    async def _exec_items(self, items: list[tuple[str, _Node]], out: Output, root: bool) -> int:
        status = self.last_status
        for op, node in items:
            if (op == "&&" and status != 0) or (op == "||" and status == 0):
                continue
            kind, a, b, c = node
            if kind == "pipe":
                status = await self._pipeline(a, out, root)  # type: ignore[arg-type]
            elif kind == "func":
                self.funcs[a[0]] = b  # type: ignore[index]
                status = 0
            elif kind == "while":
                status = 0
                while await self._exec_items(a, out, root) == 0:  # type: ignore[arg-type]
                    status = await self._exec_items(b, out, root)  # type: ignore[arg-type]
                    await asyncio.sleep(0)  # a busy loop must not starve the server
            else:
                ok = not a or await self._exec_items(a, out, root) == 0  # type: ignore[arg-type]
                branch = b if ok else c
                status = await self._exec_items(branch, out, root) if branch else 0  # type: ignore[arg-type]
            self.last_status = status
        return status

    def _expand(self, word: str) -> str:
        """$$, $?, $name, ${name} and $((arithmetic)) (quoting is not tracked: close enough)."""
        if "$" not in word:
            return word

        def arith(m: re.Match[str]) -> str:
            expr = re.sub(
                r"[A-Za-z_][A-Za-z0-9_]*", lambda v: self.vars.get(v.group(0), "0"), m.group(1)
            )
            if not re.fullmatch(r"[0-9+\-*/%() ]*", expr) or "**" in expr:  # no 9**9**9
                return "0"
            try:
                return str(int(eval(expr.replace("/", "//"), {"__builtins__": {}})))  # noqa: S307 - digits and operators only
            except (SyntaxError, ZeroDivisionError):
                return "0"

        word = re.sub(r"\$\(\((.*?)\)\)", arith, word)
        word = word.replace("$$", str(self.pid)).replace("$?", str(self.last_status))
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.vars.get(m.group(1), ""), word
        )

    async def _pipeline(self, stages: list[list[str]], out: Output, root: bool) -> int:
        stdin: str | None = None
        status = 0
        for i, argv in enumerate(stages):
            last = i == len(stages) - 1
            sink: Output = out if last else BufferOutput(out)
            words: list[str] = []
            for w in argv:
                words += await self._substitute(self._expand(w), sink, root)
            status = await self._simple(words, sink, root, stdin)
            if not last:
                assert isinstance(sink, BufferOutput)
                stdin = sink.text()
        return status

    async def _simple(self, argv: list[str], out: Output, root: bool, stdin: str | None) -> int:
        words = []
        for w in argv:
            if w.startswith("\x00"):
                if w == "\x00merge":
                    out = _Merged(out)
                elif w in ("\x00null1", "\x00null2"):
                    out = _Null(out, stdout=w == "\x00null1", stderr=w == "\x00null2")
                continue
            words.append(w)
        assignments = []
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            assignments.append(words.pop(0))
        if not words:
            for a in assignments:  # `i=0` alone sets a shell variable
                name, value = a.split("=", 1)
                self.vars[name] = value
            return 0
        name, args = words[0], words[1:]
        ctx = Ctx(out, root, stdin)
        if name in ("sudo",):
            return await self._sudo(args, ctx)
        if name in ("exec", "nohup", "builtin", "stdbuf"):
            if name == "stdbuf":
                args = [a for a in args if not a.startswith("-")]
            return await self._simple(args, out, root, stdin)
        if name == "setsid":
            return await self._simple(
                [a for a in args if a not in ("-w", "-f", "--wait", "--fork")], out, root, stdin
            )
        if name in ("env", "nice", "ionice"):
            rest = list(args)
            while rest and (rest[0].startswith("-") or "=" in rest[0] or rest[0].isdigit()):
                rest.pop(0)
            return await self._simple(rest, out, root, stdin)
        if name == "timeout":
            return await self._timeout(args, ctx)
        if name in ("sh", "bash", "dash") and args[:1] == ["-c"] and len(args) >= 2:
            return await self.run(args[1], out, root=root)
        if name in self.funcs:
            return await self._exec_items(self.funcs[name], out, root)
        handler = self.commands.get(name.rsplit("/", 1)[-1] if name.startswith("/") else name)
        if handler is None:
            return await ctx.error(f"sh: 1: {name}: not found", 127)
        return await handler(args, ctx)

    async def _sudo(self, args: list[str], ctx: Ctx) -> int:
        # The lab's user has NOPASSWD sudo, as the breakglass account has on the real devvm.
        rest = list(args)
        while rest and rest[0].startswith("-"):
            flag = rest.pop(0)
            if flag in ("-u", "-g") and rest:
                rest.pop(0)
            if flag == "--":
                break
        if not rest:
            return await ctx.error("usage: sudo -h | -K | -k | -V", 1)
        return await self._simple(rest, ctx.out, True, ctx.stdin)

    async def _timeout(self, args: list[str], ctx: Ctx) -> int:
        rest = list(args)
        while rest and rest[0].startswith("-"):
            flag = rest.pop(0)
            if flag in ("-s", "-k", "--signal", "--kill-after") and rest:
                rest.pop(0)
        if len(rest) < 2:
            return await ctx.error("timeout: missing operand", 125)
        try:
            limit = float(rest[0].rstrip("s"))
        except ValueError:
            return await ctx.error(f"timeout: invalid time interval '{rest[0]}'", 125)
        try:
            return await asyncio.wait_for(
                self._simple(rest[1:], ctx.out, ctx.root, ctx.stdin), limit
            )
        except TimeoutError:
            return 124

    # -- disk access -------------------------------------------------------------------------

    async def _disk(self) -> None:
        """Touch the disk: in io-stall this never returns (the request never completes)."""
        if self.state.io_stall:
            await asyncio.Event().wait()

    async def _proc(self) -> None:
        """Read /proc: in io-stall slow (the box is drowning in blocked tasks)."""
        if self.state.io_stall:
            await asyncio.sleep(self.io_delay_s)

    def _glob(self, args: Iterable[str]) -> list[str]:
        result: list[str] = []
        for arg in args:
            if any(c in arg for c in "*?[") and arg.startswith("/"):
                directory = arg.rsplit("/", 1)[0] or "/"
                base = "/" if directory == "/" else directory + "/"
                hits = sorted(
                    base + n
                    for n in self.state.children(directory)
                    if fnmatch.fnmatch(base + n, arg)
                )
                result.extend(hits or [arg])
            else:
                result.append(arg)
        return result

    def _readable(self, f: SimFile, root: bool) -> bool:
        return root or f.mode[7] == "r"

    # -- information commands ---------------------------------------------------------------

    async def cmd_true(self, args: list[str], ctx: Ctx) -> int:
        return 0

    async def cmd_false(self, args: list[str], ctx: Ctx) -> int:
        return 1

    async def cmd_exit(self, args: list[str], ctx: Ctx) -> int:
        raise _Exit(int(args[0]) if args and args[0].isdigit() else self.last_status)

    async def cmd_command(self, args: list[str], ctx: Ctx) -> int:
        if args[:1] == ["-v"] and len(args) > 1:
            if args[1] in self.commands or args[1] in ("sh", "bash", "sudo", "setsid"):
                await ctx.print(f"/usr/bin/{args[1]}\n")
                return 0
            return 1
        return await self._simple(args, ctx.out, ctx.root, ctx.stdin)

    async def cmd_test(self, args: list[str], ctx: Ctx) -> int:
        args = [a for a in args if a != "]"]
        if len(args) == 3 and args[1] in ("-lt", "-le", "-gt", "-ge", "-eq", "-ne"):
            try:
                x, y = int(args[0]), int(args[2])
            except ValueError:
                return await ctx.error(f"sh: 1: [: Illegal number: {args[0]}", 2)
            ops = {
                "-lt": x < y,
                "-le": x <= y,
                "-gt": x > y,
                "-ge": x >= y,
                "-eq": x == y,
                "-ne": x != y,
            }
            return 0 if ops[args[1]] else 1
        if len(args) == 3 and args[1] in ("=", "!="):
            return 0 if (args[0] == args[2]) == (args[1] == "=") else 1
        if len(args) == 2 and args[0] in ("-n", "-z"):
            return 0 if bool(args[1]) == (args[0] == "-n") else 1
        if len(args) == 1:
            return 0 if args[0] else 1
        if len(args) == 2 and args[0] in ("-e", "-f", "-d"):
            path = args[1]
            if args[0] == "-d":
                return 0 if self.state.is_dir(path) else 1
            return (
                0
                if path in self.state.files or (args[0] == "-e" and self.state.is_dir(path))
                else 1
            )
        return 1

    async def cmd_echo(self, args: list[str], ctx: Ctx) -> int:
        newline = True
        if args[:1] == ["-n"]:
            newline, args = False, args[1:]
        await ctx.print(" ".join(args) + ("\n" if newline else ""))
        return 0

    async def cmd_printf(self, args: list[str], ctx: Ctx) -> int:
        if not args:
            return await ctx.error("printf: usage: printf format [arguments]", 2)
        fmt = args[0].replace("\\n", "\n").replace("\\t", "\t")
        try:
            text = fmt % tuple(args[1:]) if "%" in fmt else fmt
        except (TypeError, ValueError):
            text = fmt
        await ctx.print(text)
        return 0

    async def cmd_hostname(self, args: list[str], ctx: Ctx) -> int:
        await ctx.print(HOSTNAME + "\n")
        return 0

    async def cmd_whoami(self, args: list[str], ctx: Ctx) -> int:
        await ctx.print(("root" if ctx.root else self.user) + "\n")
        return 0

    async def cmd_id(self, args: list[str], ctx: Ctx) -> int:
        if ctx.root:
            await ctx.print("uid=0(root) gid=0(root) groups=0(root)\n")
        else:
            await ctx.print(
                f"uid=1001({self.user}) gid=1001({self.user}) groups=1001({self.user}),27(sudo)\n"
            )
        return 0

    async def cmd_uname(self, args: list[str], ctx: Ctx) -> int:
        if "-a" in args:
            await ctx.print(
                f"Linux {HOSTNAME} {KERNEL} #1 SMP PREEMPT_DYNAMIC Debian 6.1.115-1"
                " (2024-11-01) x86_64 GNU/Linux\n"
            )
        elif "-r" in args:
            await ctx.print(KERNEL + "\n")
        else:
            await ctx.print("Linux\n")
        return 0

    async def cmd_date(self, args: list[str], ctx: Ctx) -> int:
        await ctx.print(_clock(self.state.now(), "%a %b %e %H:%M:%S UTC %Y") + "\n")
        return 0

    async def cmd_sleep(self, args: list[str], ctx: Ctx) -> int:
        try:
            seconds = sum(float(a.rstrip("s")) for a in args)
        except ValueError:
            return await ctx.error(f"sleep: invalid time interval '{args[0]}'", 1)
        if not args:
            return await ctx.error("sleep: missing operand", 1)
        await asyncio.sleep(seconds)
        return 0

    async def cmd_seq(self, args: list[str], ctx: Ctx) -> int:
        try:
            nums = [int(a) for a in args]
        except ValueError:
            return await ctx.error(f"seq: invalid floating point argument: '{args[0]}'", 1)
        first, last = (1, nums[0]) if len(nums) == 1 else (nums[0], nums[-1])
        await ctx.lines(str(i) for i in range(first, last + 1))
        return 0

    async def cmd_uptime(self, args: list[str], ctx: Ctx) -> int:
        await self._proc()
        s = self.state
        load = ", ".join(f"{x:.2f}" for x in s.loadavg())
        await ctx.print(
            f" {_clock(s.now(), '%H:%M:%S')} up {_uptime_text(s.uptime_s())},  1 user,"
            f"  load average: {load}\n"
        )
        return 0

    async def cmd_free(self, args: list[str], ctx: Ctx) -> int:
        await self._proc()
        m = self.state.mem()
        if "-h" in args:

            def fmt(kb: int) -> str:
                return human(kb * KIB, iec_suffix=True)
        elif "-m" in args:

            def fmt(kb: int) -> str:
                return str(kb // 1024)
        elif "-g" in args:

            def fmt(kb: int) -> str:
                return str(kb // (1024 * 1024))
        else:

            def fmt(kb: int) -> str:
                return str(kb)

        cols = ("total", "used", "free", "shared", "buff/cache", "available")
        head = " " * 8 + "".join(f"{c:>12}" for c in cols)
        mem = f"{'Mem:':<8}" + "".join(
            f"{fmt(m[k]):>12}"
            for k in ("total", "used", "free", "shared", "buff_cache", "available")
        )
        swap = f"{'Swap:':<8}" + "".join(
            f"{fmt(m[k]):>12}" for k in ("swap_total", "swap_used", "swap_free")
        )
        await ctx.print(f"{head}\n{mem}\n{swap}\n")
        return 0

    def _filesystems(self) -> list[tuple[str, int, int, int, str]]:
        """(source, size KiB, used KiB, avail KiB, mount point)."""
        s = self.state
        run_used = sum(f.size for p, f in s.files.items() if p.startswith("/run/")) // KIB + 1012
        return [
            ("udev", 8_172_200, 0, 8_172_200, "/dev"),
            ("tmpfs", 1_639_360, run_used, 1_639_360 - run_used, "/run"),
            ("/dev/vda1", 51_343_840, s.disk_used_kb(), s.disk_avail_kb(), "/"),
            ("tmpfs", 8_196_784, 0, 8_196_784, "/dev/shm"),  # noqa: S108 - the guest's
            ("tmpfs", 5_120, 0, 5_120, "/run/lock"),
            ("/dev/vda15", 126_678, 11_840, 114_838, "/boot/efi"),
            ("tmpfs", 1_639_356, 0, 1_639_356, "/run/user/1001"),
        ]

    async def cmd_df(self, args: list[str], ctx: Ctx) -> int:
        await self._disk()
        self.state.tick()
        human_sizes = any(
            a in ("-h", "-H", "--human-readable")
            or (a.startswith("-") and "h" in a and not a.startswith("--"))
            for a in args
        )
        paths = [a for a in args if not a.startswith("-")]
        fss = self._filesystems()
        if paths:
            chosen = []
            for p in paths:
                if not (p in self.state.files or self.state.is_dir(p) or p.startswith("/dev")):
                    await ctx.error(f"df: {p}: No such file or directory")
                    continue
                best = max(
                    (fs for fs in fss if p == fs[4] or p.startswith(fs[4].rstrip("/") + "/")),
                    key=lambda fs: len(fs[4]),
                )
                chosen.append(best)
            fss = chosen
            if not fss:
                return 1
        if human_sizes:
            rows = [("Filesystem", "Size", "Used", "Avail", "Use%", "Mounted on")]
        else:
            rows = [("Filesystem", "1K-blocks", "Used", "Available", "Use%", "Mounted on")]
        for src, size, used, avail, mnt in fss:
            pct = "-" if used + avail == 0 else f"{math.ceil(used * 100 / (used + avail))}%"
            if human_sizes:
                rows.append(
                    (src, human(size * KIB), human(used * KIB), human(avail * KIB), pct, mnt)
                )
            else:
                rows.append((src, str(size), str(used), str(avail), pct, mnt))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        widths[0] = max(widths[0], 14)
        widths[1:4] = [max(w, 5) for w in widths[1:4]]  # GNU df keeps size columns 5 wide
        lines = []
        for r in rows:
            cols = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 5)]
            lines.append(" ".join(cols) + " " + r[5])
        await ctx.lines(lines)
        return 0

    async def cmd_du(self, args: list[str], ctx: Ctx) -> int:
        await self._disk()
        self.state.tick()
        flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
        summarize = "s" in flags or any(a in ("--summarize", "--max-depth=0", "-d0") for a in args)
        h = "h" in flags
        paths = self._glob(a for a in args if not a.startswith("-")) or ["."]
        status = 0
        rows: list[str] = []
        for p in paths:
            p = (
                "/root"
                if p in (".", "~") and ctx.root
                else (f"/home/{self.user}" if p in (".", "~") else p)
            )
            kb = self.state.du_kb(p)
            if kb is None:
                await ctx.error(f"du: cannot access '{p}': No such file or directory")
                status = 1
                continue
            targets = [p]
            if not summarize and self.state.is_dir(p):
                base = p.rstrip("/") or ""
                targets = [f"{base}/{c}" for c in self.state.children(p)] + [p]
            for t in targets:
                size = self.state.du_kb(t) or 0
                rows.append(f"{human(size * KIB) if h else size}\t{t}")
        await ctx.lines(rows)
        return status

    async def cmd_ls(self, args: list[str], ctx: Ctx) -> int:
        await self._disk()
        self.state.tick()
        flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
        paths = self._glob(a for a in args if not a.startswith("-")) or [
            "/root" if ctx.root else f"/home/{self.user}"
        ]
        long = "l" in flags
        h = "h" in flags
        show_all = "a" in flags or "A" in flags
        status = 0
        out: list[str] = []
        for n, p in enumerate(paths):
            if p in self.state.files:
                out.append(self._ls_line(p, self.state.files[p], h) if long else p)
                continue
            if not self.state.is_dir(p):
                await ctx.error(f"ls: cannot access '{p}': No such file or directory", 2)
                status = 2
                continue
            if len(paths) > 1:
                out.append(("\n" if n else "") + f"{p}:")
            base = "" if p.rstrip("/") == "" else p.rstrip("/")
            names = self.state.children(p)
            if long:
                total = sum((self.state.du_kb(f"{base}/{c}") or 0) for c in names)
                out.append(f"total {total}")
                if show_all:
                    out.append(self._ls_dir(".", h))
                    out.append(self._ls_dir("..", h))
                for c in names:
                    full = f"{base}/{c}"
                    f = self.state.files.get(full)
                    out.append(self._ls_line(c, f, h) if f else self._ls_dir(c, h))
            else:
                out.extend(names)
        await ctx.lines(out)
        return status

    def _ls_line(self, name: str, f: SimFile, h: bool) -> str:
        size = human(f.size) if h else str(f.size)
        stamp = _clock(f.mtime, "%b %e %H:%M")
        return (
            f"{f.mode} 1 {f.owner:<8} {'adm' if f.mode == '-rw-r-----' else f.owner:<8}"
            f" {size:>11} {stamp} {name}"
        )

    def _ls_dir(self, name: str, h: bool) -> str:
        stamp = _clock(self.state.boot_time, "%b %e %H:%M")
        return f"drwxr-xr-x 2 root     root     {'4.0K' if h else '4096':>11} {stamp} {name}"

    async def cmd_cat(self, args: list[str], ctx: Ctx) -> int:
        paths = self._glob(a for a in args if not a.startswith("-") or a == "-")
        if not paths:
            await ctx.print(ctx.stdin or "")
            return 0
        status = 0
        for p in paths:
            if p.startswith("/proc/"):
                text = await self._procfile(p)
                if text is None:
                    status = await ctx.error(f"cat: {p}: No such file or directory")
                else:
                    await ctx.print(text)
                continue
            await self._disk()
            status = max(status, await self._cat_file(p, ctx))
        return status

    async def _cat_file(
        self,
        p: str,
        ctx: Ctx,
        *,
        first: int | None = None,
        last: int | None = None,
        name: str = "cat",
    ) -> int:
        self.state.tick()
        f = self.state.files.get(p)
        if f is None:
            if self.state.is_dir(p):
                return await ctx.error(f"{name}: {p}: Is a directory")
            return await ctx.error(f"{name}: {p}: No such file or directory")
        if not self._readable(f, ctx.root):
            return await ctx.error(
                f"{name}: {p}: Permission denied"
                if name == "cat"
                else f"{name}: cannot open '{p}' for reading: Permission denied"
            )
        if f.text is not None:
            lines = f.text.splitlines()
            if first is not None:
                lines = lines[:first]
            if last is not None:
                lines = lines[-last:] if last else []
            await ctx.lines(lines)
            return 0
        if f.line is None:
            return 0
        total = f.lines()
        if last is not None:
            indices: Iterable[int] = range(max(0, total - last), total)
        elif first is not None:
            indices = range(min(first, total))
        else:
            indices = range(min(total, CAT_CAP_BYTES // len(f.line(0))))
        await ctx.lines(f.line(i).rstrip("\n") for i in indices)
        return 0

    async def _procfile(self, path: str) -> str | None:
        await self._proc()
        s = self.state
        if path == "/proc/loadavg":
            a, b, c = s.loadavg()
            return (
                f"{a:.2f} {b:.2f} {c:.2f} {2 if a > 1 else 1}/{len(s.processes) + 170}"
                f" {s.next_pid}\n"
            )
        if path == "/proc/uptime":
            up = s.uptime_s()
            return f"{up:.2f} {up * 1.9:.2f}\n"
        if path == "/proc/meminfo":
            m = s.mem()
            rows = [
                ("MemTotal", m["total"]),
                ("MemFree", m["free"]),
                ("MemAvailable", m["available"]),
                ("Buffers", m["buffers"]),
                ("Cached", m["cached"]),
                ("SwapCached", 0),
                ("Active", m["used"] * 7 // 10),
                ("Inactive", m["used"] * 2 // 10),
                ("SwapTotal", m["swap_total"]),
                ("SwapFree", m["swap_free"]),
                ("Dirty", 9_000_000 // KIB if s.io_stall else 212),
                ("Writeback", 0),
                ("AnonPages", m["used"] - 360_000 if m["used"] > 360_000 else m["used"]),
                ("Mapped", 201_112),
                ("Shmem", m["shared"]),
                ("Slab", 212_440),
                ("SReclaimable", 98_224),
                ("SUnreclaim", 114_216),
                ("KernelStack", 6_912),
                ("PageTables", 41_210),
                ("CommitLimit", m["total"] // 2 + m["swap_total"]),
                ("Committed_AS", m["used"] + 1_402_112),
                ("VmallocTotal", 34_359_738_367),
                ("HugePages_Total", 0),
                ("Hugepagesize", 2048),
            ]
            return "".join(
                f"{k + ':':<16}{v:>8} {'kB' if not k.startswith('HugePages') else ''}".rstrip()
                + "\n"
                for k, v in rows
            )
        match = re.fullmatch(r"/proc/pressure/(cpu|memory|io)", path)
        if match:
            some, full = s.pressure(match.group(1))
            up_us = int(s.uptime_s() * 1e6)

            def line(kind: str, avg: float) -> str:
                total = int(up_us * avg / 100 * 0.05) if avg else 1_204
                return (
                    f"{kind} avg10={avg:.2f} avg60={avg * 0.8:.2f} avg300={avg * 0.5:.2f}"
                    f" total={total}\n"
                )

            return line("some", some) + line("full", full)
        match = re.fullmatch(r"/proc/(\d+)/(cmdline|status|comm)", path)
        if match:
            proc = s.processes.get(int(match.group(1)))
            if proc is None:
                return None
            if match.group(2) == "cmdline":
                return proc.command.replace(" ", "\0") + "\0"
            if match.group(2) == "comm":
                return proc.comm + "\n"
            return (
                f"Name:\t{proc.comm}\nState:\t{proc.stat[0]}\nPid:\t{proc.pid}\n"
                f"PPid:\t{proc.ppid}\nVmRSS:\t{proc.rss_kb:>8} kB\n"
                f"VmSwap:\t{proc.swap_kb:>8} kB\n"
            )
        if path == "/proc/version":
            return f"Linux version {KERNEL} (debian-kernel@lists.debian.org) #1 SMP\n"
        return None

    async def cmd_dmesg(self, args: list[str], ctx: Ctx) -> int:
        if not ctx.root:
            return await ctx.error("dmesg: read kernel buffer failed: Operation not permitted")
        human_ts = any(a in ("-T", "--ctime") for a in args)
        lines = []
        for secs, text in self.state.dmesg:
            if human_ts:
                stamp = _clock(self.state.boot_time + secs, "%a %b %e %H:%M:%S %Y")
                lines.append(f"[{stamp}] {text}")
            else:
                lines.append(f"[{secs:12.6f}] {text}")
        await ctx.lines(lines)
        return 0

    async def cmd_journalctl(self, args: list[str], ctx: Ctx) -> int:
        await self._disk()
        units: list[str] = []
        limit: int | None = None
        max_prio = 7
        grep: str | None = None
        rest = list(args)
        while rest:
            a = rest.pop(0)
            if a in ("-u", "--unit") and rest:
                units.append(rest.pop(0))
            elif a.startswith("--unit="):
                units.append(a.split("=", 1)[1])
            elif a.startswith("-u") and len(a) > 2:
                units.append(a[2:])
            elif a in ("-n", "--lines") and rest:
                limit = int(rest.pop(0)) if rest[0].isdigit() else 10
            elif a.startswith("--lines="):
                limit = int(a.split("=", 1)[1])
            elif re.fullmatch(r"-n\d+", a):
                limit = int(a[2:])
            elif a == "-e":
                limit = limit or 1000
            elif a in ("-p", "--priority") and rest:
                max_prio = _priority(rest.pop(0))
            elif a.startswith("--priority="):
                max_prio = _priority(a.split("=", 1)[1])
            elif a in ("-g", "--grep") and rest:
                grep = rest.pop(0)
            elif a in ("--since", "--until", "-S", "-U", "-o", "--output") and rest:
                rest.pop(0)
        if not ctx.root:
            await ctx.lines(
                [
                    "Hint: You are currently not seeing messages from other users and the system.",
                    "      Users in groups 'adm', 'systemd-journal' can see all messages.",
                    "      Pass -q to turn off this notice.",
                    "-- No entries --",
                ]
            )
            return 0
        wanted = {u if u.endswith(".service") else u + ".service" for u in units}
        entries = [
            e
            for e in self.state.journal
            if (not wanted or e.unit in wanted)
            and e.priority <= max_prio
            and (grep is None or re.search(grep, e.message))
        ]
        if limit is not None:
            entries = entries[-limit:] if limit else []
        if not entries:
            await ctx.print("-- No entries --\n")
            return 0
        await ctx.lines(_journal_line(e) for e in entries)
        return 0

    async def cmd_systemctl(self, args: list[str], ctx: Ctx) -> int:
        words = [a for a in args if not a.startswith("-")]
        flags = [a for a in args if a.startswith("-")]
        if (
            "--failed" in flags
            or words[:1] == ["--failed"]
            or (words[:2] == ["list-units"] and "--failed" in flags)
        ):
            return await self._systemctl_failed(ctx)
        if not words:
            return await ctx.error("Too few arguments.")
        verb, names = words[0], [n if "." in n else n + ".service" for n in words[1:]]
        if verb == "status":
            await self._disk()  # status reads the journal
            if not names:
                return await self._systemctl_overview(ctx)
            return await self._systemctl_status(names, ctx)
        if verb in ("is-active", "is-failed", "is-enabled"):
            status = 0
            for n in names:
                unit = self.state.services.get(n)
                if verb == "is-enabled":
                    state = (
                        "enabled" if unit and unit.enabled else "disabled" if unit else "not-found"
                    )
                    ok = bool(unit and unit.enabled)
                else:
                    state = unit.active if unit else "inactive"
                    ok = state == ("active" if verb == "is-active" else "failed")
                await ctx.print(state + "\n")
                status = status or (0 if ok else (3 if verb == "is-active" else 1))
            return status
        if verb in (
            "restart",
            "start",
            "stop",
            "reload",
            "try-restart",
            "enable",
            "disable",
            "kill",
            "reset-failed",
        ):
            if not names:
                return await ctx.error("Too few arguments.")
            if not ctx.root:
                n = names[0]
                return await ctx.error(
                    f"Failed to {verb} {n}: Interactive authentication required.\n"
                    f"See system logs and 'systemctl status {n}' for details."
                )
            for n in names:
                unit = self.state.services.get(n)
                if unit is None:
                    return await ctx.error(f"Failed to {verb} {n}: Unit {n} not found.", 5)
                if verb in ("restart", "try-restart", "reload"):
                    if verb == "try-restart" and unit.active != "active":
                        continue
                    if self.state.io_stall:
                        await self._disk()
                    if unit.active == "active":
                        self.state.stop_service(n)
                    self.state.start_service(n)
                elif verb == "start":
                    self.state.start_service(n)
                elif verb == "stop":
                    if unit.active == "active":
                        self.state.stop_service(n)
                elif verb == "kill":
                    if unit.main_pid:
                        self.state.signal_process(unit.main_pid, "TERM")
                elif verb == "reset-failed":
                    if unit.active == "failed":
                        unit.active, unit.sub = "inactive", "dead"
                else:
                    unit.enabled = verb == "enable"
                    if verb == "disable":
                        await ctx.err(
                            f'Removed "/etc/systemd/system/multi-user.target.wants/{n}".\n'
                        )
            return 0
        if verb == "list-units":
            rows = [
                f"  {u.name:<30} loaded {u.active:<6} {u.sub:<7} {u.description}"
                for u in self.state.services.values()
            ]
            await ctx.lines(
                [
                    "  UNIT                           LOAD   ACTIVE SUB     DESCRIPTION",
                    *rows,
                    "",
                    f"{len(rows)} loaded units listed.",
                ]
            )
            return 0
        return await ctx.error(f"Unknown command verb {verb}.")

    async def _systemctl_overview(self, ctx: Ctx) -> int:
        failed = sum(1 for u in self.state.services.values() if u.active == "failed")
        since = self.state.boot_time
        await ctx.lines(
            [
                f"● {HOSTNAME}",
                f"    State: {'degraded' if failed else 'running'}",
                "    Units: 243 loaded (incl. loaded aliases)",
                "     Jobs: 0 queued",
                f"   Failed: {failed} units",
                f"    Since: {_clock(since, '%a %Y-%m-%d %H:%M:%S UTC')};"
                f" {_ago(self.state.now() - since)}",
                "  systemd: 252.31-1~deb12u1",
            ]
        )
        return 0

    async def _systemctl_failed(self, ctx: Ctx) -> int:
        failed = [u for u in self.state.services.values() if u.active == "failed"]
        width = max([len(u.name) for u in failed] + [4])
        lines = [f"  {'UNIT':<{width}} LOAD   ACTIVE SUB    DESCRIPTION"]
        lines += [f"● {u.name:<{width}} loaded failed failed {u.description}" for u in failed]
        lines += [
            "",
            "LOAD   = Reflects whether the unit definition was properly loaded.",
            "ACTIVE = The high-level unit activation state, i.e. generalization of SUB.",
            "SUB    = The low-level unit activation state, values depend on unit type.",
            f"{len(failed)} loaded units listed.",
        ]
        await ctx.lines(lines)
        return 0

    async def _systemctl_status(self, names: list[str], ctx: Ctx) -> int:
        status = 0
        now = self.state.now()
        blocks: list[str] = []
        for n in names:
            unit = self.state.services.get(n)
            if unit is None:
                await ctx.error(f"Unit {n} could not be found.")
                status = 4
                continue
            dot = {"active": "●", "failed": "×", "inactive": "○"}.get(unit.active, "●")
            since = (
                f"since {_clock(unit.since, '%a %Y-%m-%d %H:%M:%S UTC')}; {_ago(now - unit.since)}"
            )
            if unit.active == "active":
                active = f"active ({unit.sub}) {since}"
            elif unit.active == "failed":
                active = f"failed (Result: {unit.result or 'exit-code'}) {since}"
            else:
                active = f"inactive (dead) {since}"
            lines = [
                f"{dot} {unit.name} - {unit.description}",
                f"     Loaded: loaded (/etc/systemd/system/{unit.name}; "
                f"{'enabled' if unit.enabled else 'disabled'}; preset: enabled)",
                f"     Active: {active}",
            ]
            proc = self.state.processes.get(unit.main_pid or -1)
            if unit.active == "active" and proc:
                lines += [
                    f"   Main PID: {proc.pid} ({proc.comm})",
                    "      Tasks: 9 (limit: 19072)",
                    f"     Memory: {human(proc.rss_kb * KIB)}",
                    "        CPU: 312ms",
                    f"     CGroup: /system.slice/{unit.name}",
                    f"             └─{proc.pid} {proc.command}",
                ]
            elif unit.active == "failed":
                lines += [
                    f"    Process: 1822 ExecStart={unit.exec_start} (code=killed, signal=TERM)",
                    "   Main PID: 1822 (code=killed, signal=TERM)",
                    "        CPU: 1.203s",
                ]
            journal = [e for e in self.state.journal if e.unit == unit.name][-10:]
            if journal:
                lines.append("")
                lines += [_journal_line(e) for e in journal]
            blocks.append("\n".join(lines))
            if unit.active != "active":
                status = status or 3
        if blocks:
            await ctx.print("\n\n".join(blocks) + "\n")
        return status

    async def cmd_ps(self, args: list[str], ctx: Ctx) -> int:
        await self._proc()
        procs = sorted(self.state.processes.values(), key=lambda p: p.pid)
        joined = " ".join(args)
        fields: list[str] | None = None
        sort_key: str | None = None
        rest = list(args)
        only: set[int] | None = None
        while rest:
            a = rest.pop(0)
            if a in ("-o", "o", "-eo", "axo", "-axo") and rest:
                fields = (fields or []) + rest.pop(0).split(",")
            elif a.startswith("-o") and len(a) > 2:
                fields = (fields or []) + a[2:].split(",")
            elif a.startswith("--sort"):
                sort_key = a.split("=", 1)[1] if "=" in a else (rest.pop(0) if rest else None)
            elif a in ("-p", "--pid") and rest:
                only = {int(x) for x in rest.pop(0).split(",") if x.isdigit()}
        if only is not None:
            procs = [p for p in procs if p.pid in only]
        if sort_key:
            key = sort_key.lstrip("+-")
            reverse = sort_key.startswith("-")
            procs.sort(key=lambda p: _ps_value(self.state, p, key), reverse=reverse)
        if fields is None and ("aux" in joined.split() or "-aux" in joined or "aux" in args):
            fields = [
                "user",
                "pid",
                "%cpu",
                "%mem",
                "vsz",
                "rss",
                "tty",
                "stat",
                "start",
                "time",
                "command",
            ]
        elif fields is None and ("-ef" in args or ("-e" in args and "-f" in args)):
            fields = ["uid", "pid", "ppid", "c", "stime", "tty", "time", "cmd"]
        elif fields is None:
            fields = ["pid", "tty", "time", "cmd"]
            procs = [p for p in procs if p.pid == self.pid] or procs[-1:]
        headless = all(f.endswith("=") for f in fields)  # `-o pid=`: no header line
        fields = [f.split("=", 1)[0] for f in fields]
        if fields == _AUX:
            await ctx.lines([_AUX_HEADER, *(_aux_line(self.state, p) for p in procs)])
            return 0
        headers = {
            "user": "USER",
            "uid": "UID",
            "pid": "PID",
            "ppid": "PPID",
            "pgid": "PGID",
            "%cpu": "%CPU",
            "pcpu": "%CPU",
            "%mem": "%MEM",
            "pmem": "%MEM",
            "vsz": "VSZ",
            "rss": "RSS",
            "tty": "TTY",
            "stat": "STAT",
            "state": "S",
            "start": "START",
            "stime": "STIME",
            "time": "TIME",
            "etime": "ELAPSED",
            "c": "C",
            "comm": "COMMAND",
            "command": "COMMAND",
            "args": "COMMAND",
            "cmd": "CMD",
        }
        rows = [] if headless else [[headers.get(f, f.upper()) for f in fields]]
        for p in procs:
            rows.append([_ps_value(self.state, p, f, text=True) for f in fields])
        widths = [max([len(str(r[i])) for r in rows] + [1]) for i in range(len(fields))]
        lines = []
        for r in rows:
            cells = []
            for i, f in enumerate(fields):
                last = i == len(fields) - 1
                left = f in (
                    "user",
                    "uid",
                    "tty",
                    "stat",
                    "start",
                    "stime",
                    "comm",
                    "command",
                    "args",
                    "cmd",
                )
                cell = str(r[i])
                cells.append(
                    cell if last else (cell.ljust(widths[i]) if left else cell.rjust(widths[i]))
                )
            lines.append(" ".join(cells))
        await ctx.lines(lines)
        return 0

    async def cmd_pgrep(self, args: list[str], ctx: Ctx) -> int:
        await self._proc()
        full = any(a in ("-f", "-af", "-fa") for a in args)
        show = any(a in ("-a", "-l", "-af", "-fa") for a in args)
        pats = [a for a in args if not a.startswith("-")]
        if not pats:
            return await ctx.error(
                "pgrep: no matching criteria specified\nTry `pgrep --help' for more information.", 2
            )
        hits = [
            p
            for p in self.state.processes.values()
            if p.pid != self.pid and re.search(pats[0], p.command if full else p.comm)
        ]
        await ctx.lines(f"{p.pid} {p.command}" if show else str(p.pid) for p in hits)
        return 0 if hits else 1

    async def cmd_pkill(self, args: list[str], ctx: Ctx) -> int:
        sig = "TERM"
        full = "-f" in args
        pats = []
        for a in args:
            if a.startswith("-") and a != "-f":
                sig = SIGNALS.get(a[1:], a[1:].removeprefix("SIG"))
            elif not a.startswith("-"):
                pats.append(a)
        if not pats:
            return await ctx.error("pkill: no matching criteria specified", 2)
        hits = [
            p
            for p in list(self.state.processes.values())
            if p.pid != self.pid and re.search(pats[0], p.command if full else p.comm)
        ]
        if hits and not ctx.root and any(p.user != self.user for p in hits):
            return await ctx.error(
                f"pkill: killing pid {hits[0].pid} failed: Operation not permitted", 1
            )
        for p in hits:
            self.state.signal_process(p.pid, sig)
        return 0 if hits else 1

    async def cmd_top(self, args: list[str], ctx: Ctx) -> int:
        await self._proc()
        s = self.state
        if "-b" not in args and "-bn1" not in args and not any(a.startswith("-b") for a in args):
            return await ctx.error("top: failed tty get", 1)
        m = s.mem()
        procs = sorted(s.processes.values(), key=lambda p: (-p.cpu, -p.rss_kb))
        running = sum(1 for p in procs if p.stat.startswith("R"))
        dstate = sum(1 for p in procs if p.stat.startswith("D"))
        sleeping = len(procs) + 170 - running - dstate
        load = ", ".join(f"{x:.2f}" for x in s.loadavg())
        wa = 96.1 if s.io_stall else 0.2
        us = 48.3 if s.memory_starved() else 1.2
        idle = max(0.0, 100 - wa - us - 0.6)
        lines = [
            f"top - {_clock(s.now(), '%H:%M:%S')} up {_uptime_text(s.uptime_s())},  1 user,  load"
            f" average: {load}",
            f"Tasks: {len(procs) + 170:3d} total, {running:3d} running, {sleeping:3d} sleeping,"
            "   0 stopped,   0 zombie",
            f"%Cpu(s): {us:4.1f} us,  0.6 sy,  0.0 ni, {idle:4.1f} id, {wa:4.1f} wa,  0.0 hi,  0.0"
            " si,  0.0 st",
            f"MiB Mem : {m['total'] / 1024:8.1f} total, {m['free'] / 1024:8.1f} free,"
            f" {m['used'] / 1024:8.1f} used, {m['buff_cache'] / 1024:8.1f} buff/cache",
            f"MiB Swap: {m['swap_total'] / 1024:8.1f} total, {m['swap_free'] / 1024:8.1f} free,"
            f" {m['swap_used'] / 1024:8.1f} used. {m['available'] / 1024:8.1f} avail Mem",
            "",
            "    PID USER      PR  NI    VIRT    RES    SHR S  %CPU  %MEM     TIME+ COMMAND",
        ]
        for p in procs:
            virt = _top_kb(p.vsz_kb)
            res = _top_kb(p.rss_kb)
            lines.append(
                f"{p.pid:7d} {p.user[:8]:<8}  20   0 {virt:>7} {res:>6} {min(p.rss_kb, 9_000):6d}"
                f" {p.stat[0]} {p.cpu:5.1f} {p.rss_kb * 100 / m['total']:5.1f}"
                f" {_cputime(s, p, top=True):>9} {p.comm}"
            )
        await ctx.lines(lines)
        return 0

    async def cmd_vmstat(self, args: list[str], ctx: Ctx) -> int:
        await self._proc()
        m = self.state.mem()
        b = 4 if self.state.io_stall else 0
        wa = 96 if self.state.io_stall else 0
        await ctx.lines(
            [
                "procs -----------memory---------- ---swap-- -----io---- -system-- ------cpu-----",
                " r  b   swpd   free   buff  cache   si   so    bi    bo   in   cs us sy id wa st",
                f" 1 {b:2d} {m['swap_used']:6d} {m['free']:6d} {m['buffers']:6d} {m['cached']:6d}"
                f"    0    0     3    14   52   88  1  1 {98 - wa:2d} {wa:2d}  0",
            ]
        )
        return 0

    # -- repairs -------------------------------------------------------------------------------

    async def cmd_kill(self, args: list[str], ctx: Ctx) -> int:
        sig = "TERM"
        sig_given = False
        targets: list[str] = []
        rest = list(args)
        while rest:
            a = rest.pop(0)
            if a == "--":
                targets.extend(rest)
                break
            if a in ("-s", "-n") and rest:
                sig = rest.pop(0).upper().removeprefix("SIG")
                sig = SIGNALS.get(sig, sig)
                sig_given = True
            elif a == "-l":
                await ctx.print(
                    "HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM TERM\n"
                )
                return 0
            elif re.fullmatch(r"-[A-Za-z]+[0-9]*|-\d+", a) and not targets and not sig_given:
                sig = SIGNALS.get(a[1:], a[1:].upper().removeprefix("SIG"))
                sig_given = True
            else:
                targets.append(a)
        if not targets:
            return await ctx.error(
                "sh: 1: kill: Usage: kill [-s sigspec | -signum | -sigspec]"
                " [pid | job]... or\nkill -l [exitstatus]",
                2,
            )
        status = 0
        for t in targets:
            if not re.fullmatch(r"-?\d+", t):
                status = await ctx.error(f"sh: 1: kill: Illegal number: {t}", 2)
                continue
            n = int(t)
            victims = (
                [p for p in self.state.processes.values() if p.pgid == -n]
                if n < 0
                else [self.state.processes[n]]
                if n in self.state.processes
                else []
            )
            if not victims:
                status = await ctx.error("sh: 1: kill: No such process")
                continue
            if not ctx.root and any(p.user != self.user for p in victims):
                status = await ctx.error("sh: 1: kill: Operation not permitted")
                continue
            if sig == "0":  # kill -0: does it exist (and may we signal it)?
                continue
            # Our own process last: killing it ends this command.
            for p in sorted(victims, key=lambda p: p.pid == self.pid):
                self.state.signal_process(p.pid, sig)
        return status

    async def cmd_rm(self, args: list[str], ctx: Ctx) -> int:
        flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
        force = "f" in flags
        recursive = "r" in flags or "R" in flags
        paths = self._glob(a for a in args if not a.startswith("-"))
        if not paths:
            return 0 if force else await ctx.error("rm: missing operand")
        await self._disk()
        status = 0
        for p in paths:
            self.state.tick()
            if p in self.state.files:
                if not ctx.root:
                    status = await ctx.error(f"rm: cannot remove '{p}': Permission denied")
                    continue
                self.state.remove_file(p)
            elif self.state.is_dir(p):
                if not recursive:
                    status = await ctx.error(f"rm: cannot remove '{p}': Is a directory")
                    continue
                if not ctx.root or p.rstrip("/") in ("", "/usr", "/etc", "/var", "/home"):
                    status = await ctx.error(
                        f"rm: cannot remove '{p}': Permission denied"
                        if not ctx.root
                        else f"rm: it is dangerous to operate recursively on"
                        f" '{p}'\nrm: use --no-preserve-root to override"
                        " this failsafe"
                    )
                    continue
                prefix = p.rstrip("/") + "/"
                for f in [f for f in self.state.files if f.startswith(prefix)]:
                    self.state.remove_file(f)
                for d in [
                    d for d in self.state.dir_extra_kb if d == p.rstrip("/") or d.startswith(prefix)
                ]:
                    del self.state.dir_extra_kb[d]
            elif not force:
                status = await ctx.error(f"rm: cannot remove '{p}': No such file or directory")
        return status

    async def cmd_truncate(self, args: list[str], ctx: Ctx) -> int:
        size: int | None = None
        paths: list[str] = []
        rest = list(args)
        while rest:
            a = rest.pop(0)
            if a in ("-s", "--size") and rest:
                size = _parse_size(rest.pop(0))
            elif a.startswith("--size="):
                size = _parse_size(a.split("=", 1)[1])
            elif a.startswith("-s") and len(a) > 2:
                size = _parse_size(a[2:])
            else:
                paths.append(a)
        if size is None:
            return await ctx.error(
                "truncate: you must specify either '--size' or '--reference'\n"
                "Try 'truncate --help' for more information."
            )
        await self._disk()
        status = 0
        for p in self._glob(paths):
            self.state.tick()
            f = self.state.files.get(p)
            if f is not None and not ctx.root:
                status = await ctx.error(
                    f"truncate: cannot open '{p}' for writing: Permission denied"
                )
            elif f is not None:
                self.state.truncate_file(p, size)
            elif self.state.is_dir(p):
                status = await ctx.error(f"truncate: cannot open '{p}' for writing: Is a directory")
            else:
                self.state.files[p] = SimFile(size, self.state.now(), text="")
        return status

    async def cmd_sync(self, args: list[str], ctx: Ctx) -> int:
        await self._disk()
        return 0

    # -- filters (pipeline stages, or reading a file) ------------------------------------------

    async def _filter_input(
        self,
        files: list[str],
        ctx: Ctx,
        name: str,
        *,
        first: int | None = None,
        last: int | None = None,
    ) -> list[str] | int:
        """The lines a filter works on: stdin, or its files (via the same path as `cat`)."""
        if not files:
            return (ctx.stdin or "").splitlines()
        buf = BufferOutput(ctx.out)
        status = 0
        for p in files:
            if p.startswith("/proc/"):
                text = await self._procfile(p)
                await buf.out(text or "")
                continue
            await self._disk()
            status = max(
                status,
                await self._cat_file(p, Ctx(buf, ctx.root), first=first, last=last, name=name),
            )
        if status:
            return status
        return buf.text().splitlines()

    async def cmd_head(self, args: list[str], ctx: Ctx) -> int:
        n, files = _count_arg(args, 10)
        lines = await self._filter_input(self._glob(files), ctx, "head", first=n)
        if isinstance(lines, int):
            return lines
        await ctx.lines(lines[:n])
        return 0

    async def cmd_tail(self, args: list[str], ctx: Ctx) -> int:
        n, files = _count_arg(args, 10)
        lines = await self._filter_input(self._glob(files), ctx, "tail", last=n)
        if isinstance(lines, int):
            return lines
        await ctx.lines(lines[-n:] if n else [])
        return 0

    async def cmd_grep(self, args: list[str], ctx: Ctx) -> int:
        flags = ""
        rest = list(args)
        pattern: str | None = None
        files: list[str] = []
        while rest:
            a = rest.pop(0)
            if a == "-e" and rest:
                pattern = rest.pop(0)
            elif a.startswith("-") and len(a) > 1 and pattern is None:
                flags += a[1:]
            elif pattern is None:
                pattern = a
            else:
                files.append(a)
        if pattern is None:
            return await ctx.error(
                "Usage: grep [OPTION]... PATTERNS [FILE]...\n"
                "Try 'grep --help' for more information.",
                2,
            )
        lines = await self._filter_input(self._glob(files), ctx, "grep")
        if isinstance(lines, int):
            return 2
        regex = pattern if "E" in flags or "P" in flags else _basic_re(pattern)
        if "F" in flags:
            regex = re.escape(pattern)
        try:
            rx = re.compile(regex, re.IGNORECASE if "i" in flags else 0)
        except re.error:
            return await ctx.error("grep: Unmatched ( or \\(", 2)
        hits = [ln for ln in lines if bool(rx.search(ln)) != ("v" in flags)]
        if "c" in flags:
            await ctx.print(f"{len(hits)}\n")
        elif "q" not in flags:
            await ctx.lines(hits)
        return 0 if hits else 1

    async def cmd_awk(self, args: list[str], ctx: Ctx) -> int:
        fs: str | None = None
        variables: dict[str, str] = {}
        rest = list(args)
        program: str | None = None
        files: list[str] = []
        while rest:
            a = rest.pop(0)
            if program is None and a == "-F" and rest:
                fs = rest.pop(0)
            elif program is None and a.startswith("-F"):
                fs = a[2:]
            elif program is None and a == "-v" and rest:
                name, _, value = rest.pop(0).partition("=")
                variables[name] = value
            elif program is None:
                program = a
            else:
                files.append(a)
        if program is None:
            return await ctx.error(
                "usage: awk [-F value] [-v var=value] [--] 'program text' [file ...]", 2
            )
        fs = {"\\t": "\t", "t": "\t"}.get(fs or "", fs)
        try:
            awk = Awk(program, fs, variables)
        except AwkError as exc:
            return await ctx.error(f"awk: line 1: {exc}", 2)
        lines = await self._filter_input(self._glob(files), ctx, "awk")
        if isinstance(lines, int):
            return 2
        try:
            text, status = awk.run(lines)
        except AwkError as exc:
            return await ctx.error(f"awk: run time error: {exc}", 2)
        await ctx.print(text)
        return status

    async def cmd_sort(self, args: list[str], ctx: Ctx) -> int:
        flags = "".join(a[1:] for a in args if a.startswith("-") and not a[1:].isdigit())
        key_col: int | None = None
        rest = list(args)
        files = []
        while rest:
            a = rest.pop(0)
            if a == "-k" and rest:
                key_col = int(rest.pop(0).split(",")[0].rstrip("nrh")) - 1
            elif a.startswith("-k") and len(a) > 2:
                key_col = int(a[2:].split(",")[0].rstrip("nrh")) - 1
            elif not a.startswith("-"):
                files.append(a)
        lines = await self._filter_input(files, ctx, "sort")
        if isinstance(lines, int):
            return 2

        def field(line: str) -> str:
            parts = line.split()
            return parts[key_col] if key_col is not None and key_col < len(parts) else line

        if "h" in flags:
            lines.sort(
                key=lambda ln: _parse_size(field(ln).split()[0] if field(ln) else "0", lenient=True)
            )
        elif "n" in flags:
            lines.sort(key=lambda ln: _leading_number(field(ln)))
        else:
            lines.sort(key=field)
        if "r" in flags:
            lines.reverse()
        await ctx.lines(lines)
        return 0

    async def cmd_uniq(self, args: list[str], ctx: Ctx) -> int:
        lines = (ctx.stdin or "").splitlines()
        out: list[tuple[int, str]] = []
        for ln in lines:
            if out and out[-1][1] == ln:
                out[-1] = (out[-1][0] + 1, ln)
            else:
                out.append((1, ln))
        await ctx.lines(f"{c:7d} {ln}" if "-c" in args else ln for c, ln in out)
        return 0

    async def cmd_wc(self, args: list[str], ctx: Ctx) -> int:
        files = [a for a in args if not a.startswith("-")]
        text_lines = await self._filter_input(files, ctx, "wc")
        if isinstance(text_lines, int):
            return 1
        text = "\n".join(text_lines) + ("\n" if text_lines else "")
        counts = {"l": len(text_lines), "w": len(text.split()), "c": len(text.encode())}
        chosen = [k for k in "lwc" if any(k in a[1:] for a in args if a.startswith("-"))]
        values = [counts[k] for k in chosen or ["l", "w", "c"]]
        suffix = f" {files[0]}" if files else ""
        if len(values) == 1:
            await ctx.print(f"{values[0]}{suffix}\n")
        else:
            await ctx.print(" ".join(f"{v:7d}" for v in values) + suffix + "\n")
        return 0


def _priority(value: str) -> int:
    names = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]
    value = value.split("..")[-1]
    return names.index(value) if value in names else int(value) if value.isdigit() else 7


def _journal_line(e: JournalEntry) -> str:
    who = e.ident if e.pid is None else f"{e.ident}[{e.pid}]"
    return f"{_clock(e.ts, '%b %d %H:%M:%S')} {HOSTNAME} {who}: {e.message}"


def _count_arg(args: list[str], default: int) -> tuple[int, list[str]]:
    n = default
    files: list[str] = []
    rest = list(args)
    while rest:
        a = rest.pop(0)
        if a in ("-n", "--lines") and rest:
            n = int(rest.pop(0).lstrip("+-") or default)
        elif re.fullmatch(r"-n\d+|-\d+", a):
            n = int(a.lstrip("-n"))
        elif a.startswith("--lines="):
            n = int(a.split("=", 1)[1])
        elif a.startswith("-"):
            continue  # -q, -f (no follow in the lab), -c
        else:
            files.append(a)
    return n, files


def _parse_size(text: str, *, lenient: bool = False) -> int:
    match = re.fullmatch(r"([0-9.]+)([KMGTP]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        if lenient:
            return 0
        raise ValueError(text)
    scale = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": GIB * 1024, "P": GIB * 1024 * 1024}
    return int(float(match.group(1)) * scale[match.group(2).upper()])


def _leading_number(text: str) -> float:
    match = re.match(r"\s*(-?[0-9.]+)", text)
    try:
        return float(match.group(1)) if match else 0.0
    except ValueError:
        return 0.0


def _basic_re(pattern: str) -> str:
    # grep's basic regex: \| \( \) are the operators, bare | ( ) are literals.
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "|()+?{}":
            out.append(pattern[i + 1])
            i += 2
            continue
        out.append("\\" + c if c in "|()+?{}" else c)
        i += 1
    return "".join(out)


def _top_kb(kb: int) -> str:
    if kb >= 10_000_000:
        return f"{kb / 1024 / 1024:.1f}g"
    if kb >= 1_000_000:
        return f"{kb / 1024:.0f}m" if kb / 1024 < 10_000 else f"{kb / 1024 / 1024:.1f}g"
    return str(kb)


def _cputime(state: DevvmState, p: SimProcess, *, top: bool = False) -> str:
    secs = max(0.0, state.now() - (p.start or state.boot_time)) * p.cpu / 100
    if top:
        return f"{int(secs // 60)}:{secs % 60:05.2f}"
    return f"{int(secs // 60)}:{int(secs % 60):02d}"


def _ps_value(state: DevvmState, p: SimProcess, field: str, *, text: bool = False) -> object:
    total = state.mem()["total"]
    start = p.start or state.boot_time
    values: dict[str, object] = {
        "user": p.user,
        "uid": p.user,
        "pid": p.pid,
        "ppid": p.ppid,
        "pgid": p.pgid or p.pid,
        "%cpu": round(p.cpu, 1),
        "pcpu": round(p.cpu, 1),
        "%mem": round(p.rss_kb * 100 / total, 1),
        "pmem": round(p.rss_kb * 100 / total, 1),
        "vsz": p.vsz_kb,
        "rss": p.rss_kb,
        "tty": p.tty,
        "stat": p.stat,
        "state": p.stat[0],
        "start": _clock(start, "%H:%M" if state.now() - start < 86_400 else "%b%d"),
        "stime": _clock(start, "%H:%M" if state.now() - start < 86_400 else "%b%d"),
        "time": _cputime(state, p),
        "etime": _etime(state.now() - start),
        "c": int(p.cpu),
        "comm": p.comm,
        "command": p.command,
        "args": p.command,
        "cmd": p.command,
    }
    value = values.get(field, "-")
    if text and isinstance(value, float):
        return f"{value:.1f}"
    return value


_AUX = ["user", "pid", "%cpu", "%mem", "vsz", "rss", "tty", "stat", "start", "time", "command"]
_AUX_HEADER = "USER         PID %CPU %MEM    VSZ   RSS TTY      STAT START   TIME COMMAND"


def _aux_line(state: DevvmState, p: SimProcess) -> str:
    """One `ps aux` row in procps' fixed widths (a long user name is cut to 7 chars and "+")."""
    user = p.user if len(p.user) <= 8 else p.user[:7] + "+"
    v = {f: _ps_value(state, p, f, text=True) for f in _AUX}
    return (
        f"{user:<8} {p.pid:>7} {v['%cpu']:>4} {v['%mem']:>4} {p.vsz_kb:>6} {p.rss_kb:>5}"
        f" {p.tty:<8} {p.stat:<4} {v['start']:>5} {v['time']:>6} {p.command}"
    )


def _etime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86_400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    core = f"{hours:02d}:{minutes:02d}:{s:02d}" if hours or days else f"{minutes:02d}:{s:02d}"
    return f"{days}-{core}" if days else core


# -- awk: the small subset rescue one-liners use ---------------------------------------------------
# Rules `pattern { action }`, BEGIN/END; print/printf/assignments/++/+=/exit/next; fields, NR, NF;
# comparisons, ~ and !~, && || !, arithmetic, concatenation, length/tolower/toupper/substr/int.

_AWK_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<str>\"(?:[^\"\\]|\\.)*\")|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<op>\+\+|--|\+=|-=|\*=|==|!=|<=|>=|&&|\|\||!~|[-+*%<>!~=(){};,$\n])|(?P<re>/))"
)


class AwkError(Exception):
    pass


def _num(v: object) -> float:
    if isinstance(v, float | int):
        return float(v)
    m = re.match(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", str(v))
    return float(m.group(0)) if m else 0.0


def _looks_numeric(v: object) -> bool:
    return isinstance(v, float | int) or bool(
        re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", str(v))
    )


def _awk_str(v: object) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.6g}"
    return str(v)


class _AwkExit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _AwkNext(Exception):
    pass


class Awk:
    """A compiled awk program. run(lines) -> (output lines, exit status)."""

    def __init__(
        self, program: str, fs: str | None = None, variables: dict[str, str] | None = None
    ):
        self.tokens = self._lex(program)
        self.pos = 0
        self.fs = fs
        self.vars: dict[str, object] = dict(variables or {})
        self.rules: list[tuple[str, object, list[object]]] = []
        self._parse_program()

    # lexer / parser -------------------------------------------------------------------------
    def _lex(self, text: str) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        i = 0
        while i < len(text):
            if text[i] in " \t":
                i += 1
                continue
            m = _AWK_TOKEN.match(text, i)
            if not m or m.end() == i:
                raise AwkError(f"syntax error at source line 1 near {text[i : i + 10]!r}")
            kind = m.lastgroup or "op"
            if kind == "re":
                prev = tokens[-1] if tokens else ("op", "(")
                if prev[0] in ("num", "str", "name", "re") or prev[1] in (")", "$"):
                    tokens.append(("op", "/"))
                    i = m.end()
                    continue
                end = i + 1
                while end < len(text) and text[end] != "/":
                    end += 2 if text[end] == "\\" else 1
                tokens.append(("re", text[m.end() : end]))
                i = end + 1
                continue
            value = m.group(kind)
            if kind == "str":
                value = value[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t")
            tokens.append((kind, value))
            i = m.end()
        return tokens

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("eof", "")

    def _take(self, value: str | None = None) -> tuple[str, str]:
        tok = self._peek()
        if value is not None and tok[1] != value:
            raise AwkError(f"syntax error: expected {value!r}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def _skip_newlines(self) -> None:
        while self._peek()[1] in ("\n", ";"):
            self.pos += 1

    def _parse_program(self) -> None:
        self._skip_newlines()
        while self._peek()[0] != "eof":
            kind = "main"
            pattern: object = None
            if self._peek() == ("name", "BEGIN") or self._peek() == ("name", "END"):
                kind = self._take()[1]
            elif self._peek()[1] != "{":
                pattern = self._expr()
            action: list[object] = [("print", [])]
            if self._peek()[1] == "{":
                action = self._block()
            self.rules.append((kind, pattern, action))
            self._skip_newlines()

    def _block(self) -> list[object]:
        self._take("{")
        stmts: list[object] = []
        self._skip_newlines()
        while self._peek()[1] != "}":
            if self._peek()[0] == "eof":
                raise AwkError("syntax error: missing }")
            stmts.append(self._statement())
            self._skip_newlines()
        self._take("}")
        return stmts

    def _statement(self) -> object:
        kind, value = self._peek()
        if kind == "name" and value in ("print", "printf"):
            self.pos += 1
            args: list[object] = []
            if self._peek()[1] not in (";", "\n", "}"):
                args.append(self._expr(no_gt=True))
                while self._peek()[1] == ",":
                    self.pos += 1
                    args.append(self._expr(no_gt=True))
            return (value, args)
        if kind == "name" and value == "exit":
            self.pos += 1
            code = None if self._peek()[1] in (";", "\n", "}") else self._expr()
            return ("exit", code)
        if kind == "name" and value == "next":
            self.pos += 1
            return ("next",)
        if kind == "name" and value == "if":
            self.pos += 1
            self._take("(")
            cond = self._expr()
            self._take(")")
            self._skip_newlines()
            then = self._block() if self._peek()[1] == "{" else [self._statement()]
            other: list[object] = []
            save = self.pos
            self._skip_newlines()
            if self._peek() == ("name", "else"):
                self.pos += 1
                self._skip_newlines()
                other = self._block() if self._peek()[1] == "{" else [self._statement()]
            else:
                self.pos = save
            return ("if", cond, then, other)
        return ("expr", self._expr())

    def _expr(self, no_gt: bool = False) -> object:
        return self._ternary_assign(no_gt)

    def _ternary_assign(self, no_gt: bool) -> object:
        left = self._or(no_gt)
        op = self._peek()[1]
        if (
            op in ("=", "+=", "-=", "*=", "/=")
            and isinstance(left, tuple)
            and left[0]
            in (
                "var",
                "field",
            )
        ):
            self.pos += 1
            return ("assign", op, left, self._ternary_assign(no_gt))
        return left

    def _or(self, no_gt: bool) -> object:
        left = self._and(no_gt)
        while self._peek()[1] == "||":
            self.pos += 1
            left = ("or", left, self._and(no_gt))
        return left

    def _and(self, no_gt: bool) -> object:
        left = self._not(no_gt)
        while self._peek()[1] == "&&":
            self.pos += 1
            left = ("and", left, self._not(no_gt))
        return left

    def _not(self, no_gt: bool) -> object:
        if self._peek()[1] == "!":
            self.pos += 1
            return ("not", self._not(no_gt))
        return self._compare(no_gt)

    def _compare(self, no_gt: bool) -> object:
        left = self._concat(no_gt)
        op = self._peek()[1]
        if op in ("==", "!=", "<", "<=", ">=", "~", "!~") or (op == ">" and not no_gt):
            self.pos += 1
            return ("cmp", op, left, self._concat(no_gt))
        return left

    def _concat(self, no_gt: bool) -> object:
        left = self._additive()
        while True:
            kind, value = self._peek()
            starts_operand = kind in ("num", "str", "re") or value in ("$", "(")
            if starts_operand or (kind == "name" and value not in ("in", "else", "getline")):
                left = ("concat", left, self._additive())
            else:
                return left

    def _additive(self) -> object:
        left = self._term()
        while self._peek()[1] in ("+", "-"):
            op = self._take()[1]
            left = ("arith", op, left, self._term())
        return left

    def _term(self) -> object:
        left = self._unary()
        while self._peek()[1] in ("*", "/", "%"):
            op = self._take()[1]
            left = ("arith", op, left, self._unary())
        return left

    def _unary(self) -> object:
        if self._peek()[1] == "-":
            self.pos += 1
            return ("arith", "-", ("num", 0.0), self._unary())
        if self._peek()[1] == "!":
            self.pos += 1
            return ("not", self._unary())
        return self._postfix()

    def _postfix(self) -> object:
        node = self._primary()
        if (
            self._peek()[1] in ("++", "--")
            and isinstance(node, tuple)
            and node[0]
            in (
                "var",
                "field",
            )
        ):
            op = self._take()[1]
            return ("assign", "+=" if op == "++" else "-=", node, ("num", 1.0))
        return node

    def _primary(self) -> object:
        kind, value = self._take()
        if kind == "num":
            return ("num", float(value))
        if kind == "str":
            return ("str", value)
        if kind == "re":
            return ("match0", value)
        if value == "$":
            return ("field", self._primary())
        if value == "(":
            node = self._expr()
            self._take(")")
            return node
        if value in ("++", "--"):
            target = self._primary()
            return ("assign", "+=" if value == "++" else "-=", target, ("num", 1.0))
        if kind == "name":
            if self._peek()[1] == "(" and value in (
                "length",
                "tolower",
                "toupper",
                "substr",
                "int",
                "index",
            ):
                self.pos += 1
                args = []
                if self._peek()[1] != ")":
                    args.append(self._expr())
                    while self._peek()[1] == ",":
                        self.pos += 1
                        args.append(self._expr())
                self._take(")")
                return ("call", value, args)
            if value == "length":
                return ("call", "length", [])
            return ("var", value)
        raise AwkError(f"syntax error at source line 1 near {value!r}")

    # evaluation ---------------------------------------------------------------------------------
    def run(self, lines: list[str]) -> tuple[str, int]:
        """Run over `lines`: the output text and the exit status."""
        self.out: list[str] = []
        self.nr = 0
        self.fields: list[str] = [""]
        status = 0
        try:
            for kind, _, action in self.rules:
                if kind == "BEGIN":
                    self._exec(action)
            for line in lines:
                self.nr += 1
                self._set_record(line)
                try:
                    for kind, pattern, action in self.rules:
                        if kind == "main" and (pattern is None or self._truth(self._eval(pattern))):
                            self._exec(action)
                except _AwkNext:
                    continue
        except _AwkExit as exc:
            status = exc.status
        try:
            for kind, _, action in self.rules:
                if kind == "END":
                    self._exec(action)
        except _AwkExit as exc:
            status = exc.status
        return "".join(self.out), status

    def _set_record(self, line: str) -> None:
        parts = line.split() if self.fs in (None, " ") else line.split(self.fs)
        self.fields = [line, *parts]

    def _exec(self, stmts: list[object]) -> None:
        for stmt in stmts:
            assert isinstance(stmt, tuple)
            op = stmt[0]
            if op == "print":
                args = stmt[1]
                text = " ".join(_awk_str(self._eval(a)) for a in args) if args else self.fields[0]
                self.out.append(text + "\n")
            elif op == "printf":
                values = [self._eval(a) for a in stmt[1]]
                if values:
                    fmt = str(values[0])
                    specs = re.findall(r"%-?\d*\.?\d*([a-zA-Z%])", fmt)
                    conv: list[object] = []
                    for v, c in zip(values[1:], [c for c in specs if c != "%"], strict=False):
                        if c in "dixXoc":
                            conv.append(int(_num(v)))
                        elif c in "eEfgG":
                            conv.append(_num(v))
                        else:
                            conv.append(_awk_str(v))
                    try:
                        self.out.append(fmt % tuple(conv))
                    except (TypeError, ValueError):
                        self.out.append(fmt)
            elif op == "exit":
                raise _AwkExit(int(_num(self._eval(stmt[1]))) if stmt[1] is not None else 0)
            elif op == "next":
                raise _AwkNext
            elif op == "if":
                self._exec(stmt[2] if self._truth(self._eval(stmt[1])) else stmt[3])
            else:
                self._eval(stmt[1])

    def _truth(self, v: object) -> bool:
        if isinstance(v, float | int):
            return v != 0
        return v != ""

    def _get(self, node: object) -> object:
        assert isinstance(node, tuple)
        if node[0] == "field":
            i = int(_num(self._eval(node[1])))
            return self.fields[i] if 0 <= i < len(self.fields) else ""
        name = node[1]
        if name == "NR":
            return float(self.nr)
        if name == "NF":
            return float(len(self.fields) - 1)
        return self.vars.get(name, "")

    def _eval(self, node: object) -> object:
        assert isinstance(node, tuple)
        kind = node[0]
        if kind in ("num", "str"):
            return node[1]
        if kind in ("var", "field"):
            return self._get(node)
        if kind == "match0":
            return 1.0 if re.search(node[1], self.fields[0]) else 0.0
        if kind == "not":
            return 0.0 if self._truth(self._eval(node[1])) else 1.0
        if kind == "and":
            return (
                1.0
                if self._truth(self._eval(node[1])) and self._truth(self._eval(node[2]))
                else 0.0
            )
        if kind == "or":
            return (
                1.0 if self._truth(self._eval(node[1])) or self._truth(self._eval(node[2])) else 0.0
            )
        if kind == "concat":
            return _awk_str(self._eval(node[1])) + _awk_str(self._eval(node[2]))
        if kind == "arith":
            a, b = _num(self._eval(node[2])), _num(self._eval(node[3]))
            op = node[1]
            if op in ("/", "%") and b == 0:
                raise AwkError("division by zero")
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / (b or 1), "%": a % (b or 1)}[op]
        if kind == "cmp":
            op, left = node[1], self._eval(node[2])
            if op in ("~", "!~"):
                right_node = node[3]
                pattern = (
                    right_node[1] if right_node[0] == "match0" else _awk_str(self._eval(right_node))
                )
                hit = bool(re.search(pattern, _awk_str(left)))
                return 1.0 if hit == (op == "~") else 0.0
            right = self._eval(node[3])
            if _looks_numeric(left) and _looks_numeric(right):
                a: object = _num(left)
                b: object = _num(right)
            else:
                a, b = _awk_str(left), _awk_str(right)
            result = {
                "==": a == b,
                "!=": a != b,
                "<": a < b,
                "<=": a <= b,
                ">": a > b,  # type: ignore[operator]
                ">=": a >= b,
            }[op]  # type: ignore[operator]
            return 1.0 if result else 0.0
        if kind == "assign":
            op, target, value = node[1], node[2], self._eval(node[3])
            if op != "=":
                value = {
                    "+=": _num(self._get(target)) + _num(value),
                    "-=": _num(self._get(target)) - _num(value),
                    "*=": _num(self._get(target)) * _num(value),
                    "/=": _num(self._get(target)) / (_num(value) or 1),
                }[op]
            if target[0] == "field":
                i = int(_num(self._eval(target[1])))
                while len(self.fields) <= i:
                    self.fields.append("")
                self.fields[i] = _awk_str(value)
                if i:
                    self.fields[0] = " ".join(self.fields[1:])
            else:
                self.vars[target[1]] = value
            return value
        if kind == "call":
            name, args = node[1], [self._eval(a) for a in node[2]]
            s = _awk_str(args[0]) if args else self.fields[0]
            if name == "length":
                return float(len(s))
            if name == "tolower":
                return s.lower()
            if name == "toupper":
                return s.upper()
            if name == "int":
                return float(int(_num(args[0]) if args else 0))
            if name == "index":
                return float(s.find(_awk_str(args[1])) + 1) if len(args) > 1 else 0.0
            start = max(1, int(_num(args[1]))) if len(args) > 1 else 1
            length = int(_num(args[2])) if len(args) > 2 else len(s)
            return s[start - 1 : start - 1 + length]
        raise AwkError(f"cannot evaluate {kind}")
