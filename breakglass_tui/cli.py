"""``breakglass-tui``: the rescue console in a terminal.

Imports stay light until the arguments are parsed (``--help`` must be instant), and the app's own
import chain leaves anthropic, asyncssh and hvac to a worker after the first paint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from breakglass_tui.lab.catalog import SCENARIOS, describe
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
        + describe()
        + ".",
    )
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
        choices=tuple(SCENARIOS),
        default="healthy",
        help="what is wrong with the lab's devvm (with --lab; default: healthy)",
    )
    return parser


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

    choice: LabPlan | None = None
    if args.lab:
        choice = choose_lab(args.scenario, "sandbox" if args.sandbox else "auto", stopper)
        if stopper is not None and stopper.requested.is_set():
            return stopper.exit_code  # hung up while the lab's devvm was being prepared
    prestarted = None
    if choice is not None and choice.devvm == "guest":
        # QEMU starts restoring the devvm now, while the console itself starts.
        from breakglass_tui.lab.guest.drill import prestart

        prestarted = prestart(choice.scenario)
        if prestarted is not None and stopper is not None:
            stopper.add_last_resort(prestarted.kill_now)  # the hard deadline: its QEMU goes
    try:
        try:
            incidents_cm = incident_dir(choice is not None, settings)
            incidents = incidents_cm.__enter__()
        except OSError as exc:
            return _fail(
                f"cannot create the lab's incident directory ({exc.strerror or exc}): check"
                " that TMPDIR is writable and has space, or set BREAKGLASS_STATE_DIR."
            )
        try:
            app = BreakglassApp(
                AppOptions(
                    lab=choice is not None,
                    scenario=choice.scenario if choice else args.scenario,
                    settings=settings,
                    devvm=choice.devvm if choice else "auto",
                    lab_note=choice.note if choice else None,
                    lab_prestart=prestarted,
                    incident_dir=incidents,
                ),
                stopper=stopper,
                driver_class=terminal_driver(),
            )
            app.run()
        finally:
            with contextlib.suppress(OSError):
                incidents_cm.__exit__(None, None, None)
    finally:
        if prestarted is not None:
            # The app has ended: whatever of the drill is still there goes (never adopted, or
            # adopted by a lab whose close did not finish).
            prestarted.close()
    return app.return_code or 0


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
    with contextlib.suppress(OSError, ValueError):  # a terminal that is already gone
        print(f"breakglass-tui: {problem}", file=sys.stderr)
    return 2


def terminal_driver():
    """The driver for a terminal (ui.terminal: never waits on a terminal that is gone), or None
    when TEXTUAL_DRIVER names one (breakglass-serve's web driver)."""
    if os.environ.get("TEXTUAL_DRIVER"):
        return None
    from breakglass_tui.ui.terminal import TerminalDriver

    return TerminalDriver


@contextlib.contextmanager
def incident_dir(lab: bool, settings):
    """Where this run keeps its incident. Real targets (and every tab of breakglass-serve): the
    state dir, so a reopened console offers to resume. ``--lab`` in a terminal owns its lab,
    gone when it exits, so an old lab incident cannot be resumed meaningfully: a fresh
    temporary directory, removed at exit, unless BREAKGLASS_STATE_DIR is set."""
    if not lab:
        yield Path(settings.state_dir)
    elif os.environ.get("BREAKGLASS_STATE_DIR"):
        yield Path(os.environ["BREAKGLASS_STATE_DIR"])
    else:
        with tempfile.TemporaryDirectory(prefix="breakglass-lab-incident-") as tmp:
            yield Path(tmp)


@dataclass(frozen=True)
class LabPlan:
    devvm: str  # "guest", "sandbox" or "none"
    note: str | None
    scenario: str


def choose_lab(scenario: str, devvm: str = "auto", stopper: Stopper | None = None) -> LabPlan:
    """Which devvm --lab rehearses on, decided before the screen opens. The real devvm's first
    run (the image built, a booted state saved: about a minute) happens here, its progress on
    the terminal, so the console then starts in seconds; if it fails, the sandbox stands in and
    the console says why in one sentence. It runs in a child process (lab.guest.plan's
    Preparation), so a hang-up or SIGTERM meanwhile (``stopper``) ends it at once, leaving no
    QEMU and no temporary directory: the plan returned then is "none" and the caller exits."""
    from breakglass_tui.lab.choice import choose_devvm

    choice = choose_devvm(scenario, devvm)
    if choice.devvm == "guest":
        from breakglass_tui.lab.guest import plan

        if not plan.ready(choice.scenario):
            _say("preparing the lab's devvm (first run)…", stopper)
            try:
                preparation = plan.Preparation(choice.scenario)
            except OSError as exc:  # no TMPDIR space, no python: the sandbox may stand in
                return _fallback(scenario, f"The real devvm could not be prepared ({exc})")
            if stopper is not None:
                stopper.add_last_resort(preparation.kill)
            try:
                preparation.run(
                    lambda line: _say(line, stopper),
                    stopped=stopper.requested.is_set if stopper is not None else lambda: False,
                )
            except plan.PreparationStopped:
                return LabPlan("none", None, scenario)
            except plan.PreparationFailed as exc:  # shown in the console
                return _fallback(scenario, f"The real devvm could not be prepared ({exc})")
    return LabPlan(choice.devvm or "none", choice.note, choice.scenario)


def _fallback(scenario: str, reason: str) -> LabPlan:
    """The sandbox in place of the real devvm that could not be prepared (or none)."""
    from breakglass_tui.lab.choice import choose_devvm

    fallback = choose_devvm(scenario, "sandbox")
    if fallback.devvm is None:
        return LabPlan("none", f"{reason}; {fallback.note}", scenario)
    return LabPlan("sandbox", f"{reason}: this drill runs on a sandboxed shell.", fallback.scenario)


def _say(line: str, stopper: Stopper | None = None) -> None:
    """One line of progress on the terminal before the screen opens; nothing once the terminal
    is gone, and never an error (a hung-up terminal fails every write)."""
    if stopper is not None and stopper.terminal_gone.is_set():
        return
    with contextlib.suppress(OSError, ValueError):
        print(f"breakglass-tui: {line}", file=sys.stderr, flush=True)


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
