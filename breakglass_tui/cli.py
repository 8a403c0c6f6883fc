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
from pathlib import Path

SCENARIOS = ("healthy", "disk-full", "oom", "stuck-service", "wedged", "io-stall")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breakglass-tui",
        description=(
            "Claude-driven rescue console for a wedged devvm (the warm case: the devvm is down"
            " while the cluster is healthy). Without --lab it uses the real targets from the"
            " BREAKGLASS_* settings; set ANTHROPIC_API_KEY to let Claude drive, else it runs in"
            " manual mode (slash commands only)."
        ),
        epilog="Try it first on the lab: breakglass-tui --lab --scenario disk-full",
    )
    parser.add_argument(
        "--lab",
        action="store_true",
        help="start a simulated devvm and PVE host on loopback and point the console at them",
    )
    parser.add_argument(
        "--real-guest",
        action="store_true",
        help="with --lab: a real Linux devvm under QEMU instead of the simulated one (slower to"
        " start; needs qemu-system-x86 and the guest image)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="healthy",
        help="what is wrong with the lab's devvm (with --lab; default: healthy)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, validate real-target settings, run the app; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.scenario != "healthy" and not args.lab:
        print("breakglass-tui: --scenario needs --lab", file=sys.stderr)
        return 2
    if args.real_guest and not args.lab:
        print("breakglass-tui: --real-guest needs --lab", file=sys.stderr)
        return 2
    if args.real_guest:
        problem = real_guest_problem()
        if problem:
            print(f"breakglass-tui: {problem}", file=sys.stderr)
            return 2
    settings = None
    if not args.lab:
        # Real targets: a missing or invalid setting stops us here, before the screen opens.
        from breakglass_tui.config import ConfigError, load_settings

        try:
            settings = load_settings()
            check_real_settings(settings)
        except ConfigError as exc:
            print(f"breakglass-tui: {exc}", file=sys.stderr)
            return 2
    from breakglass_tui.ui.app import BreakglassApp
    from breakglass_tui.ui.backend import AppOptions

    with incident_dir(args.lab, settings) as incidents:
        app = BreakglassApp(
            AppOptions(
                lab=args.lab,
                scenario=args.scenario,
                settings=settings,
                real_guest=args.real_guest,
                incident_dir=incidents,
            ),
            handle_signals=True,
        )
        app.run()
    return app.return_code or 0


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


def real_guest_problem() -> str | None:
    """Why the real-guest lab cannot run here (QEMU or the guest image missing), else None.
    Checked before the screen opens, so the message stays readable in the terminal."""
    print("breakglass-tui: checking QEMU and the real-guest image…", file=sys.stderr)
    try:
        from breakglass_tui.lab.guest.lab import GuestUnavailable, check_available
    except ImportError as exc:  # a broken install, not a missing QEMU: say so plainly
        return f"the real-guest lab could not be loaded ({exc}): reinstall with scripts/setup.sh"
    try:
        check_available()
    except GuestUnavailable as exc:
        return str(exc)
    return None


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
    was seen spinning after its terminal closed)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
