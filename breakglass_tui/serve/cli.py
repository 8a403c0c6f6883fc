"""``breakglass-serve``: the breakglass console in a browser tab, hardened for the ingress.

At start the server loads the keys once — from Vault into a private ssh-agent (or, with ``--lab``,
the lab's generated keys) — and each tab's app process gets only the agent's socket, the targets
and its operator's name. Settings come from flags or the matching ``BREAKGLASS_*`` variables.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from breakglass_tui.config import ConfigError, Settings, load_settings
from breakglass_tui.lab.catalog import SCENARIOS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="breakglass-serve",
        description="Serve the breakglass console to a browser (behind the cluster's ingress).",
    )
    parser.add_argument("--host", help="listen address (BREAKGLASS_SERVE_HOST, default 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, help="listen port (BREAKGLASS_SERVE_PORT, default 8080)"
    )
    parser.add_argument(
        "--public-url",
        help="the URL the browser uses, e.g. https://breakglass.example.org (BREAKGLASS_PUBLIC_URL;"
        " required). Websockets from any other origin are refused.",
    )
    parser.add_argument(
        "--identity-header",
        help="the auth proxy's header naming the user (BREAKGLASS_IDENTITY_HEADER,"
        " default X-authentik-username)",
    )
    parser.add_argument(
        "--max-sessions", type=int, help="open tabs allowed at once (BREAKGLASS_MAX_SESSIONS)"
    )
    parser.add_argument(
        "--lab",
        action="store_true",
        help="serve the lab instead of real targets: a real Linux devvm under QEMU (restored in"
        " seconds; the first run builds it), or a sandboxed shell on this machine without QEMU",
    )
    parser.add_argument(
        "--scenario", choices=tuple(SCENARIOS), default="healthy", help="lab scenario"
    )
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="with --lab: the sandboxed shell on this machine instead of the real devvm",
    )
    # The real devvm is --lab's default now; the old flag is still accepted.
    parser.add_argument("--real-guest", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag, name in (
        ("host", "serve_host"),
        ("port", "serve_port"),
        ("public_url", "public_url"),
        ("identity_header", "identity_header"),
        ("max_sessions", "max_sessions"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[name] = value
    if args.lab and "serve_host" not in overrides and not os.environ.get("BREAKGLASS_SERVE_HOST"):
        overrides["serve_host"] = "127.0.0.1"  # the lab is for this machine, not the network
    settings = load_settings(**overrides)
    if not settings.public_url:
        if args.lab:
            settings = load_settings(
                **overrides, public_url=f"http://127.0.0.1:{settings.serve_port}"
            )
        else:
            raise ConfigError(
                "BREAKGLASS_PUBLIC_URL (or --public-url) is required: the URL the browser uses,"
                " e.g. https://breakglass.example.org. Websockets from other origins are refused."
            )
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag in ("real_guest", "sandbox"):
        if getattr(args, flag) and not args.lab:
            print(f"breakglass-serve: --{flag.replace('_', '-')} needs --lab", file=sys.stderr)
            return 2
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"breakglass-serve: {exc}", file=sys.stderr)
        return 2

    from breakglass_tui.serve.backend import ServeBackend
    from breakglass_tui.serve.server import BreakglassServer, app_command

    state_dir = Path(settings.state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    backend = ServeBackend(
        settings,
        lab=args.lab,
        scenario=args.scenario,
        state_dir=state_dir,
        devvm="sandbox" if args.sandbox else "auto",
    )
    server = BreakglassServer(
        app_command(),
        host=settings.serve_host,
        port=settings.serve_port,
        public_url=str(settings.public_url),
        identity_header=settings.identity_header,
        max_sessions=settings.max_sessions,
        state_dir=state_dir,
        default_operator=settings.operator,
        prepare=backend.prepare,
        cleanup=backend.close,
        title="breakglass (lab)" if args.lab else "breakglass",
    )
    # A VAULT_TOKEN in the environment is read (and removed) by the key loading in prepare();
    # the children's environment is an allowlist that never includes it either way.
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
