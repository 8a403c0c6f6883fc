"""``breakglass-serve``: the breakglass console in a browser tab, hardened for the ingress.

At start the server loads the keys once — from Vault into a private ssh-agent (or, with ``--lab``,
the lab's generated keys) — and each tab's app process gets only the agent's socket, the targets
and its operator's name. Settings come from flags or the matching ``BREAKGLASS_*`` variables.

Outside ``--lab`` the console port is TLS and only the ingress, holding the client certificate the
client CA signed, can reach the app (``serve.tls``); every console request must carry the identity
header. ``--lab`` serves plain HTTP on 127.0.0.1 with its lab operator, unless TLS files are given.
Health and readiness are on a plain port of their own (``--health-port``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import breakglass_tui
from breakglass_tui.config import ConfigError, Settings, load_settings
from breakglass_tui.runtime import SCENARIOS, lab_run_dir
from breakglass_tui.startup import state_dir_problem

TLS_VARIABLES = ("BREAKGLASS_TLS_CERT_FILE", "BREAKGLASS_TLS_KEY_FILE", "BREAKGLASS_CLIENT_CA_FILE")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="breakglass-serve",
        description="Serve the breakglass console to a browser (behind the cluster's ingress).",
    )
    parser.add_argument(
        "--version", action="version", version=f"breakglass-serve {breakglass_tui.__version__}"
    )
    parser.add_argument("--host", help="listen address (BREAKGLASS_SERVE_HOST, default 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, help="console port (BREAKGLASS_SERVE_PORT, default 8080)"
    )
    parser.add_argument(
        "--health-port",
        type=int,
        help="plain-HTTP port of /healthz and /readyz only (BREAKGLASS_HEALTH_PORT, default 8081;"
        " with --lab, the console port + 1)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        help="the console's server certificate, PEM (BREAKGLASS_TLS_CERT_FILE; required but"
        " with --lab)",
    )
    parser.add_argument(
        "--tls-key", type=Path, help="its private key, PEM (BREAKGLASS_TLS_KEY_FILE)"
    )
    parser.add_argument(
        "--client-ca",
        type=Path,
        help="certificate of the CA that signed the ingress controller's client certificate"
        " (BREAKGLASS_CLIENT_CA_FILE): connections without such a certificate are refused",
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
        "--max-sessions-per-operator",
        type=int,
        help="open tabs one operator may have (BREAKGLASS_MAX_SESSIONS_PER_OPERATOR); their next"
        " tab closes their oldest read-only one",
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
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the self-check of the rescue path once instead of serving: one line per link"
        " (Vault, PVE host, devvm, Messages API, serving path), exit 1 if any is broken; for"
        " right after helm install and for a CronJob",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag, name in (
        ("host", "serve_host"),
        ("port", "serve_port"),
        ("health_port", "health_port"),
        ("tls_cert", "tls_cert_file"),
        ("tls_key", "tls_key_file"),
        ("client_ca", "client_ca_file"),
        ("public_url", "public_url"),
        ("identity_header", "identity_header"),
        ("max_sessions", "max_sessions"),
        ("max_sessions_per_operator", "max_sessions_per_operator"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[name] = value
    if args.lab and "serve_host" not in overrides and not os.environ.get("BREAKGLASS_SERVE_HOST"):
        overrides["serve_host"] = "127.0.0.1"  # the lab is for this machine, not the network
    settings = load_settings(**overrides)
    if args.lab and "health_port" not in overrides and not os.environ.get("BREAKGLASS_HEALTH_PORT"):
        # Beside the console port, so two labs on one machine do not collide on 8081.
        port = settings.serve_port
        overrides["health_port"] = port + 1 if port < 65535 else port - 1
        settings = load_settings(**overrides)
    if not settings.public_url:
        if args.lab:
            scheme = "https" if settings.tls_cert_file else "http"
            settings = load_settings(
                **overrides, public_url=f"{scheme}://127.0.0.1:{settings.serve_port}"
            )
        else:
            raise ConfigError(
                "BREAKGLASS_PUBLIC_URL (or --public-url) is required: the URL the browser uses,"
                " e.g. https://breakglass.example.org. Websockets from other origins are refused."
            )
    if settings.health_port == settings.serve_port:
        raise ConfigError(
            f"BREAKGLASS_HEALTH_PORT and BREAKGLASS_SERVE_PORT are both {settings.serve_port}: the"
            " health port is a plain-HTTP port of its own; give it another number"
        )
    tls = [settings.tls_cert_file, settings.tls_key_file, settings.client_ca_file]
    if any(tls) and not all(tls):
        missing = [name for name, value in zip(TLS_VARIABLES, tls, strict=True) if value is None]
        raise ConfigError(
            f"{', '.join(missing)} not set: the console's TLS needs its certificate, its key and"
            " the ingress client CA together (docs/install.md, step 6)"
        )
    if not args.lab:
        if not all(tls):
            raise ConfigError(
                "BREAKGLASS_TLS_CERT_FILE, BREAKGLASS_TLS_KEY_FILE and BREAKGLASS_CLIENT_CA_FILE"
                " are required outside --lab: only the ingress, holding a client certificate"
                " that CA signed, may reach the console (the chart mounts them from Secrets;"
                " docs/install.md, step 6)"
            )
        if not str(settings.public_url).startswith("https://"):
            raise ConfigError(
                "BREAKGLASS_PUBLIC_URL must be https:// outside --lab: the browser reaches the"
                " console through the ingress, over TLS"
            )
    return settings


def run_check(args: argparse.Namespace) -> int:
    """``--check``: the self-check once (no port opened, no TLS needed), one line per link;
    exit 0 when no link is broken, 1 when one is, 2 on a bad setting."""
    import asyncio

    from breakglass_tui.serve.backend import check_once

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"breakglass-serve: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(settings.state_dir).absolute()
    problem = state_dir_problem(state_dir)
    if problem:
        print(f"breakglass-serve: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(
        check_once(
            settings,
            lab=args.lab,
            scenario=args.scenario,
            state_dir=state_dir,
            devvm="sandbox" if args.sandbox else "auto",
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag in ("real_guest", "sandbox"):
        if getattr(args, flag) and not args.lab:
            print(f"breakglass-serve: --{flag.replace('_', '-')} needs --lab", file=sys.stderr)
            return 2
    if args.check:
        return run_check(args)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"breakglass-serve: {exc}", file=sys.stderr)
        return 2

    from breakglass_tui.serve.backend import ServeBackend
    from breakglass_tui.serve.server import BreakglassServer, app_command
    from breakglass_tui.serve.tls import TlsConfigError, TlsFiles, check_files, server_context

    state_dir = Path(settings.state_dir).absolute()
    problem = state_dir_problem(state_dir)
    if problem:
        print(f"breakglass-serve: {problem}", file=sys.stderr)
        return 2
    if args.lab:
        # The lab's records (audit log, incident) apart from the real incident's and from every
        # earlier lab's: a --lab server never resumes an incident whose lab is gone.
        try:
            state_dir = lab_run_dir(state_dir)
        except OSError as exc:
            print(
                f"breakglass-serve: cannot create the lab's directory in the state directory"
                f" {state_dir} ({exc.strerror or exc}): free space there, or set"
                " BREAKGLASS_STATE_DIR.",
                file=sys.stderr,
            )
            return 2
    ssl_context = None
    if settings.tls_cert_file and settings.tls_key_file and settings.client_ca_file:
        files = TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.client_ca_file)
        try:
            ssl_context = server_context(files)
            for warning in check_files(files).warnings:
                print(f"breakglass-serve: warning: {warning}", file=sys.stderr)
        except TlsConfigError as exc:
            print(f"breakglass-serve: {exc}", file=sys.stderr)
            return 2
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
        max_sessions_per_operator=settings.max_sessions_per_operator,
        state_dir=state_dir,
        # Only the lab has a fallback operator; real targets refuse a request without the header.
        default_operator=settings.operator if args.lab else None,
        prepare=backend.prepare,
        cleanup=backend.close,
        title="breakglass (lab)" if args.lab else "breakglass",
        ssl_context=ssl_context,
        health_port=settings.health_port,
        selfcheck=backend.build_selfcheck,
        selfcheck_interval_s=settings.selfcheck_interval_s,
        selfcheck_jitter=settings.selfcheck_jitter,
    )
    # A VAULT_TOKEN in the environment is read (and removed) by the key loading in prepare();
    # the children's environment is an allowlist that never includes it either way.
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
