"""``breakglass-tui``: the rescue console in a terminal.

Imports stay light until the arguments are parsed (``--help`` must be instant), and the app's own
import chain leaves anthropic, asyncssh and hvac to a worker after the first paint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from breakglass_tui import runtime
from breakglass_tui.startup import state_dir_problem, terminal_problem

if TYPE_CHECKING:
    from breakglass_tui.ui.stopping import Stopper


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breakglass-tui",
        description=(
            "Claude-driven rescue console for a wedged devvm (the warm case: the devvm is down"
            " while the cluster is healthy). Without --lab it uses the real targets from the"
            " BREAKGLASS_* settings; set ANTHROPIC_API_KEY to let Claude drive, else it runs in"
            " manual mode (slash commands only)."
        ),
        epilog="Try it first on the lab: breakglass-tui --lab --scenario disk-full. Scenarios: "
        + runtime.describe()
        + ".",
    )
    parser.add_argument("--version", action="version", version=_version("breakglass-tui"))
    parser.add_argument(
        "--lab",
        action="store_true",
        help="rehearse on loopback: a real Linux devvm under QEMU (restored from a saved state in"
        " seconds; the first run builds it, about a minute) and a PVE host running the real"
        " breakglass-verb; without QEMU, a sandboxed shell on this machine",
    )
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="with --lab: the sandboxed shell on this machine instead of the real devvm (starts"
        " at once, stages fewer scenarios; needs bubblewrap and root)",
    )
    # The real devvm is --lab's default now; the old flag is still accepted.
    parser.add_argument("--real-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the self-check of the rescue path once (Vault, PVE host, devvm, Messages API),"
        " print one line per link and exit: 0 when no link is broken, 1 otherwise; no screen",
    )
    parser.add_argument(
        "--scenario",
        choices=tuple(runtime.SCENARIOS),
        default="healthy",
        help="what is wrong with the lab's devvm (with --lab; default: healthy)",
    )
    return parser


def _version(prog: str) -> str:
    import breakglass_tui

    return f"{prog} {breakglass_tui.__version__}"


def main(argv: list[str] | None = None, *, stopper: Stopper | None = None) -> int:
    """Parse the arguments, check what the console needs (settings, state dir, terminal), run
    the app; returns the exit code. ``stopper`` (from :func:`run`) has SIGHUP and SIGTERM."""
    args = build_parser().parse_args(argv)
    if args.scenario != "healthy" and not args.lab:
        return _fail("--scenario needs --lab")
    for flag in ("real_guest", "sandbox"):
        if getattr(args, flag) and not args.lab:
            return _fail(f"--{flag.replace('_', '-')} needs --lab")
    # Settings are validated here for the lab too: a bad value stops us before the screen opens.
    from breakglass_tui.config import ConfigError, load_settings

    try:
        settings = load_settings()
        if not args.lab:
            check_real_settings(settings)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.check:
        return run_check(settings, args)
    if stopper is not None and stopper.requested.is_set():
        return stopper.exit_code  # hung up before the screen opened: nothing to undo
    problem = terminal_problem() or state_dir_problem(Path(settings.state_dir))
    # A terminal found unusable because it was just hung up is the hang-up, not a problem to
    # report (its SIGHUP may land a moment after the check saw the terminal gone).
    if problem and stopper is not None and stopper.requested.wait(0.3):
        return stopper.exit_code
    if problem:
        return _fail(problem)
    from breakglass_tui.ui.app import BreakglassApp
    from breakglass_tui.ui.backend import AppOptions

    choice: runtime.LabPlan | None = None
    if args.lab:
        choice = runtime.choose_lab(
            args.scenario,
            "sandbox" if args.sandbox else "auto",
            progress=lambda line: _say(line, stopper),
            stopper=stopper,
        )
        if stopper is not None and stopper.requested.is_set():
            return stopper.exit_code  # hung up while the lab's devvm was being prepared
        try:
            # The lab's records apart from the real incident's, and from every earlier lab's.
            settings = settings.model_copy(
                update={"state_dir": runtime.lab_run_dir(Path(settings.state_dir))}
            )
        except OSError as exc:
            return _fail(
                f"cannot create the lab's directory in the state directory {settings.state_dir}"
                f" ({exc.strerror or exc}): free space there, or set BREAKGLASS_STATE_DIR."
            )
    prestarted = None
    if choice is not None and choice.devvm == "guest":
        # QEMU starts restoring the devvm now, while the console itself starts.
        prestarted = runtime.prestart_devvm(choice.scenario)
        if prestarted is not None and stopper is not None:
            stopper.add_last_resort(prestarted.kill_now)  # the hard deadline: its QEMU goes
    try:
        app = BreakglassApp(
            AppOptions(
                lab=choice is not None,
                scenario=choice.scenario if choice else args.scenario,
                settings=settings,
                devvm=choice.devvm if choice else "auto",
                lab_note=choice.note if choice else None,
                lab_prestart=prestarted,
                incident_dir=Path(settings.state_dir),
            ),
            stopper=stopper,
            driver_class=terminal_driver(),
        )
        app.run()
    finally:
        if prestarted is not None:
            # The app has ended: whatever of the drill is still there goes (never adopted, or
            # adopted by a lab whose close did not finish).
            prestarted.close()
    return app.return_code or 0


def _say(line: str, stopper: Stopper | None = None) -> None:
    """One line of progress on the terminal before the screen opens; nothing once the terminal
    is gone, and never an error (a hung-up terminal fails every write)."""
    if stopper is not None and stopper.terminal_gone.is_set():
        return
    with contextlib.suppress(OSError, ValueError):
        print(f"breakglass-tui: {line}", file=sys.stderr, flush=True)


def run_check(settings, args: argparse.Namespace) -> int:
    """``--check``: the self-check once, one line per link (exit 1 if any link is broken)."""
    import asyncio

    from breakglass_tui.serve.backend import check_once

    state_dir = Path(settings.state_dir).absolute()
    problem = state_dir_problem(state_dir)
    if problem:
        return _fail(problem)
    return asyncio.run(
        check_once(
            settings,
            lab=args.lab,
            scenario=args.scenario,
            state_dir=state_dir,
            devvm="sandbox" if args.sandbox else "auto",
        )
    )


def _fail(problem: str) -> int:
    with contextlib.suppress(OSError):  # a terminal that is already gone
        print(f"breakglass-tui: {problem}", file=sys.stderr)
    return 2


def terminal_driver():
    """The driver for a terminal (ui.terminal: never waits on a terminal that is gone), or None
    when TEXTUAL_DRIVER names one (breakglass-serve's web driver)."""
    if os.environ.get("TEXTUAL_DRIVER"):
        return None
    from breakglass_tui.ui.terminal import TerminalDriver

    return TerminalDriver


def check_real_settings(settings) -> None:
    """Raise ``ConfigError`` naming the first setting real targets cannot do without."""
    from breakglass_tui.config import ConfigError

    for name in ("devvm", "pve"):
        if not getattr(settings, f"{name}_host"):
            raise ConfigError(
                f"BREAKGLASS_{name.upper()}_HOST is not set: give the {name}'s IP address"
                " (or run with --lab to try the simulated hosts)"
            )
        if not settings.vault_addr and not getattr(settings, f"{name}_host_key"):
            raise ConfigError(
                f"BREAKGLASS_{name.upper()}_HOST_KEY is not set and no Vault is configured"
                " (BREAKGLASS_VAULT_ADDR): the host key must be pinned; give its known_hosts line"
            )


def run() -> None:
    """The console script: main(), then leave at once. Everything the console owns (the lab, the
    agent, the ssh connections, the temporary incident dir) is closed before main() returns; a
    helper thread still blocked at interpreter shutdown must not keep a dead console alive (one
    was seen spinning after its terminal closed).

    SIGHUP and SIGTERM are handled from the first moment (ui.stopping): a hang-up during start-up
    is not lost, and a stop that cannot finish ends at the hard deadline anyway."""
    from breakglass_tui.ui.stopping import Stopper

    stopper = Stopper()
    stopper.install()
    try:
        code = main(stopper=stopper)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug: one line, no traceback with locals, and out
        code = 70
        with contextlib.suppress(Exception):
            print(
                f"breakglass-tui: unexpected error ({type(exc).__name__}: {exc}); the audit log"
                " has what was done. Please report it.",
                file=sys.stderr,
            )
    stopper.done()
    if not stopper.terminal_gone.is_set():  # flushing to a dead or stalled terminal could block
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
