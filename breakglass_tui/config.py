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
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "BREAKGLASS_"

# What the console tells the operator in the cold case. The real path is the site's own (the
# chart's server.coldPathPointer sets BREAKGLASS_COLD_PATH_POINTER); this default names none.
DEFAULT_COLD_PATH_POINTER = (
    "This looks like the cold case (the PVE host or the cluster is down), which this console does"
    " not cover: recover the PVE host by its out-of-band path (its own console or the server's"
    " management controller), as your site's cold-case runbook says."
)


def default_state_dir() -> Path:
    """Where the records go unless BREAKGLASS_STATE_DIR says: the platform's place for an
    application's state (platformdirs), never the directory the console was started in."""
    from platformdirs import user_state_dir

    return Path(user_state_dir("breakglass-tui", appauthor=False))


class ConfigError(Exception):
    """A setting is missing or invalid. The message names the variable and what to do."""


class Settings(BaseSettings):
    """Every setting of breakglass-tui and breakglass-serve."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    # -- targets (IP literals; pinned host keys as known_hosts text) --------------------------
    # The devvm's address: an IP literal (a host name is refused: no DNS between the owner and
    # the rescue). Required unless in the lab.
    devvm_host: str | None = None
    # The devvm's SSH port.
    devvm_port: int = Field(22, ge=1, le=65535)
    # The user the console logs in as on the devvm (full sudo without a password).
    devvm_user: str = "breakglass"
    devvm_host_key: str | None = None  # known_hosts line(s); overridden by the Vault secret
    # The Proxmox VE host's address: an IP literal. Required unless in the lab.
    pve_host: str | None = None
    # The PVE host's SSH port.
    pve_port: int = Field(22, ge=1, le=65535)
    pve_user: str = "root"  # the forced command needs root for qm; the key can run nothing else
    # known_hosts line(s) pinning the PVE host's key; the Vault secret's pve_known_hosts wins.
    pve_host_key: str | None = None
    # The devvm's VM id on the PVE host, as shown to the operator and to Claude (the verb takes
    # its VM id from its own config on the host, never from here).
    vmid: int = Field(102, ge=100)

    # -- SSH behaviour -------------------------------------------------------------------------
    # Seconds to connect and finish the SSH handshake before a host counts as unreachable.
    connect_timeout_s: float = Field(6.0, gt=0)
    # Seconds between SSH keepalives on an open connection.
    keepalive_interval_s: float = Field(5.0, gt=0)
    # Keepalives left unanswered before the connection is declared dead.
    keepalive_count_max: int = Field(3, ge=1)
    # Default time limit in seconds of one devvm command (a tool call may ask for its own).
    command_timeout_s: float = Field(120.0, gt=0)

    # -- keys: Vault (Kubernetes auth, KV v2) or the operator's own ssh-agent ----------------
    # Vault's address (e.g. https://10.20.0.5:8200). Set: the keys are loaded from Vault into a
    # private ssh-agent. Unset: the operator's own ssh-agent (SSH_AUTH_SOCK) is used.
    vault_addr: str | None = None
    # The Kubernetes-auth role the console logs in to Vault as (docs/vault/).
    vault_role: str = "breakglass"
    # Mount path of Vault's Kubernetes auth method.
    vault_auth_mount: str = "kubernetes"
    # The projected service-account token presented at the Vault login (re-read at every login).
    vault_sa_token_file: Path = Path("/var/run/secrets/vault/token")
    # A token file from `kubectl create token` (local run against a port-forwarded Vault).
    vault_token_file: Path | None = None
    # The KV v2 mount holding the breakglass keys.
    vault_kv_mount: str = "secret"
    # Path of the keys' secret within that mount (its fields: docs/keys.md).
    vault_secret_path: str = "breakglass/ssh"  # noqa: S105 - a path, not a secret
    # CA certificate (PEM file) that signed Vault's certificate; unset: the system's CAs.
    vault_cacert: Path | None = None
    # Seconds each Vault request may take.
    vault_timeout_s: float = Field(10.0, gt=0)
    agent_socket_dir: Path | None = None  # where a private ssh-agent's socket goes (0700 dir)
    # SHA256 fingerprint (as `ssh-add -l` prints it) of the devvm key in the operator's own
    # ssh-agent: required without Vault, since that agent may hold other keys. It is the only key
    # ever offered to the devvm. breakglass-serve sets it for its app processes.
    devvm_key_fingerprint: str | None = Field(None, pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")
    # SHA256 fingerprint of the PVE key in the operator's own ssh-agent (required without
    # Vault): the only key ever offered to the PVE host, so no other key the host might accept as
    # root can skip the forced command. breakglass-serve sets it for its app processes.
    pve_key_fingerprint: str | None = Field(None, pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")

    # -- the breakglass agent ------------------------------------------------------------------
    # The Claude model (README: "Choosing the model"); the default is the current Sonnet. Its
    # thinking is adaptive and always asked for with the between-tools text shown (core.turn).
    model: str = "claude-sonnet-5-5"
    # How hard the model thinks (the API's effort); unset means the API's default for the model
    # (high on Sonnet 5.5, medium on Opus 5.5).
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    # Asked when the model refuses (stop_reason refusal) or stays overloaded past the retries,
    # before manual mode; for the rest of that operator message.
    fallback_model: str | None = None
    # The incident's spend limit: a warning at 80 %, and at 100 % Claude is no longer asked
    # (manual mode). The cost of the whole incident counts, across tabs and sessions.
    max_cost_usd: float = Field(20.0, gt=0)
    # Tool calls Claude may make for one operator message before it must stop and sum up.
    max_steps: int = Field(40, ge=1)
    # Mutating verbs (reset, stop, start, cycle) Claude may run for one operator message; a
    # further one waits for the driving operator's approval (one key) and is not run without
    # it. 0: every mutating verb of Claude's asks. The PVE host's budget stays the hard limit.
    max_mutating_verbs_per_message: int = Field(2, ge=0, le=100)
    # Seconds the console waits for that approval before telling Claude the verb was not run.
    verb_approval_timeout_s: float = Field(120.0, gt=0, le=3600)
    # Thinking counts against max_tokens; a reply cut at it is asked again with twice as much.
    max_tokens: int = Field(16_000, ge=1024, le=128_000)
    # Seconds to wait for a complete answer from the Claude API (its retries included) before
    # falling back to manual mode, plus max_tokens at a slow 80 tokens/s (turn_deadline_s).
    api_deadline_s: float = Field(90.0, gt=0)

    # -- breakglass-serve ---------------------------------------------------------------------
    serve_host: str = "0.0.0.0"  # noqa: S104 - the pod listens on its own IP; the Service fronts it
    # Port breakglass-serve serves the console on: TLS with a required client certificate
    # (below); plain HTTP only in the lab without certificates.
    serve_port: int = Field(8080, ge=1, le=65535)
    public_url: str | None = None  # https://breakglass.example.org — required by breakglass-serve
    # Request header in which the auth proxy names the signed-in user (for the audit). A console
    # request without it is refused with 403 (only the lab has a fallback operator).
    identity_header: str = "X-authentik-username"
    # The console's server certificate chain (PEM file, mounted from a Secret). Required by
    # breakglass-serve outside --lab.
    tls_cert_file: Path | None = None
    # Its private key (PEM file, unencrypted, from the same Secret). Required outside --lab.
    tls_key_file: Path | None = None
    # The certificate (PEM file) of the CA that signed the ingress controller's client
    # certificate, and nothing else: a connection without a client certificate chaining to it
    # fails in the TLS handshake. Only the CA's certificate, never its key. Required outside --lab.
    client_ca_file: Path | None = None
    # Plain-HTTP port for the kubelet and Prometheus: /healthz and /readyz only, no app, no page.
    health_port: int = Field(8081, ge=1, le=65535)
    # Browser tabs served at once (each is one app process).
    max_sessions: int = Field(4, ge=1)
    # Within max_sessions: one operator's tabs at most; their next tab closes their oldest
    # read-only one (never the one that drives).
    max_sessions_per_operator: int = Field(3, ge=1)
    # The self-check of the rescue path (docs/runbook.md): every link tried, nothing changed.
    # Seconds between two runs in breakglass-serve (it also runs at start and on /selfcheck).
    selfcheck_interval_s: float = Field(300.0, ge=10)
    # Share of the interval each wait is moved by at random (0.1: 5 min ± 30 s), so the checks
    # of several servers, or of a server and its CronJob, do not fall on the same second.
    selfcheck_jitter: float = Field(0.1, ge=0, le=0.5)
    # Seconds one link's check may take before it counts as broken.
    selfcheck_timeout_s: float = Field(20.0, gt=0, le=300)
    # Also fetch BREAKGLASS_PUBLIC_URL through the ingress (the serving path); only where the
    # pod can reach its own public URL. Off by default.
    selfcheck_serving_path: bool = False
    # Set by `breakglass-serve --lab` for its app processes: the targets are the lab's, say so.
    targets_are_lab: bool = False

    # -- records -------------------------------------------------------------------------------
    # The audit log, the incident, transcripts and downloaded bundles. Default: the platform's
    # place for application state ($XDG_STATE_HOME/breakglass-tui, else
    # ~/.local/state/breakglass-tui), whatever the current directory. Each --lab run keeps its
    # records apart, in lab/<run>/ under it.
    state_dir: Path = Field(default_factory=lambda: default_state_dir())
    # Who is at the console, for the audit: breakglass-serve sets it per tab from the identity
    # header; otherwise $USER.
    operator: str = Field(default_factory=lambda: os.environ.get("USER") or "operator")

    # -- the cold case (out of scope here) -------------------------------------------------------
    # Told to the operator and to Claude when the PVE host cannot be reached: where to go
    # instead (the site's out-of-band path and its runbook). The default names no site.
    cold_path_pointer: str = Field(DEFAULT_COLD_PATH_POINTER, min_length=1, max_length=1000)

    def turn_deadline_s(self, max_tokens: int | None = None) -> float:
        """How long one model turn may take: a thinking model writing ``max_tokens`` (default:
        the setting) at a slow 80 tokens/s, plus ``api_deadline_s`` for the rest."""
        return self.api_deadline_s + (max_tokens or self.max_tokens) / 80.0

    @field_validator("effort", "fallback_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

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
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg,arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            # Never echo the value: it may be a key or a token.
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError(
            "invalid configuration — " + "; ".join(problems) + ". Set the variable(s) and restart."
        ) from None
