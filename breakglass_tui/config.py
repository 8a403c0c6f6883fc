"""Configuration: environment variables with the prefix ``BREAKGLASS_``, optionally a ``.env``-style
file named by ``BREAKGLASS_CONFIG_FILE``.

Validated once at start. A bad value stops the program with a message that names the variable and
the next step (see :func:`load_settings`). Target hosts are IP literals: a hostname is refused, so a
DNS outage cannot stand between the owner and the rescue.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "BREAKGLASS_"

COLD_PATH_POINTER = (
    "This looks like the cold case (the PVE host or the cluster is down), which this console does"
    " not cover: use the knock-gated PVE SSH path (infra/docs/plans/"
    "2026-05-30-breakglass-ssh-access-design.md) or the server's iDRAC."
)


class ConfigError(Exception):
    """A setting is missing or invalid. The message names the variable and what to do."""


class Settings(BaseSettings):
    """Every setting of breakglass-tui and breakglass-serve."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    # -- targets (IP literals; pinned host keys as known_hosts text) --------------------------
    devvm_host: str | None = None
    devvm_port: int = Field(22, ge=1, le=65535)
    devvm_user: str = "breakglass"
    devvm_host_key: str | None = None  # known_hosts line(s); overridden by the Vault secret
    pve_host: str | None = None
    pve_port: int = Field(22, ge=1, le=65535)
    pve_user: str = "root"  # the forced command needs root for qm; the key can run nothing else
    pve_host_key: str | None = None
    vmid: int = Field(102, ge=100)

    # -- SSH behaviour -------------------------------------------------------------------------
    connect_timeout_s: float = Field(6.0, gt=0)
    keepalive_interval_s: float = Field(5.0, gt=0)
    keepalive_count_max: int = Field(3, ge=1)
    command_timeout_s: float = Field(120.0, gt=0)

    # -- keys: Vault (Kubernetes auth, KV v2) or the operator's own ssh-agent ----------------
    vault_addr: str | None = None
    vault_role: str = "breakglass"
    vault_auth_mount: str = "kubernetes"
    vault_sa_token_file: Path = Path("/var/run/secrets/vault/token")
    # A token file from `kubectl create token` (local run against a port-forwarded Vault).
    vault_token_file: Path | None = None
    vault_kv_mount: str = "secret"
    vault_secret_path: str = "breakglass/ssh"  # noqa: S105 - a path, not a secret
    vault_cacert: Path | None = None
    vault_timeout_s: float = Field(10.0, gt=0)
    agent_socket_dir: Path | None = None  # where a private ssh-agent's socket goes (0700 dir)

    # -- the breakglass agent ------------------------------------------------------------------
    model: str = "claude-sonnet-4-6"  # current Sonnet; 4.5 reaches end of life 2026-11-30
    max_steps: int = Field(40, ge=1)
    api_deadline_s: float = Field(90.0, gt=0)

    # -- breakglass-serve ---------------------------------------------------------------------
    serve_host: str = "0.0.0.0"  # noqa: S104 - the pod listens on its own IP; the Service fronts it
    serve_port: int = Field(8080, ge=1, le=65535)
    public_url: str | None = None  # https://breakglass.example.org — required by breakglass-serve
    identity_header: str = "X-authentik-username"
    max_sessions: int = Field(4, ge=1)
    # Within max_sessions: one operator's tabs at most; their next tab closes their oldest
    # read-only one (never the one that drives).
    max_sessions_per_operator: int = Field(3, ge=1)
    # Set by `breakglass-serve --lab` for its app processes: the targets are the lab's, say so.
    targets_are_lab: bool = False

    # -- records -------------------------------------------------------------------------------
    state_dir: Path = Path("./breakglass-state")  # audit log, transcripts, downloaded bundles
    operator: str = Field(default_factory=lambda: os.environ.get("USER") or "operator")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be an absolute http(s) URL such as https://breakglass.example.org"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must be the site's origin only, without a path, query or fragment")
        return value.rstrip("/")

    @field_validator("devvm_host", "pve_host")
    @classmethod
    def _ip_literal(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP literal; targets are addressed by IP (no DNS dependency)"
            ) from None
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment (and ``BREAKGLASS_CONFIG_FILE``), or raise
    :class:`ConfigError` whose message names the offending variable."""
    env_file = os.environ.get(PREFIX + "CONFIG_FILE")
    if env_file and not Path(env_file).is_file():
        raise ConfigError(
            f"{PREFIX}CONFIG_FILE names {env_file!r}, which is not a readable file:"
            " fix the path or unset the variable"
        )
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            # Never echo the value: it may be a key or a token.
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError(
            "invalid configuration — " + "; ".join(problems) + ". Set the variable(s) and restart."
        ) from None
