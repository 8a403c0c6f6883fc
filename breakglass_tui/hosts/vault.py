"""The breakglass keys from Vault: Kubernetes auth, one KV v2 secret, in memory only.

Flow (docs/keys.md): log in -> read the one secret -> parse the keys in memory -> revoke the
token -> forget it. The caller (:func:`breakglass_tui.hosts.keyagent.load_keys`) puts the keys
into a private ssh-agent; nothing here writes a file.

Where the login credential comes from, first match wins:

1. ``BREAKGLASS_VAULT_TOKEN_FILE`` — a Kubernetes service-account JWT in a file, e.g. from
   ``kubectl create token claude-breakglass -n claude-breakglass --audience vault`` for a local
   run against a port-forwarded Vault. It is used for the Kubernetes login exactly like the
   projected token. (A *Vault* token in that file is refused with a message: use VAULT_TOKEN.)
2. ``VAULT_TOKEN`` in the environment — an existing Vault token, used as is, never revoked (it is
   the operator's), and removed from this process's environment once read so no child inherits it.
3. ``BREAKGLASS_VAULT_SA_TOKEN_FILE`` — the pod's projected service-account token (audience
   ``vault``), re-read at every login because the kubelet rotates it.

Every failure is a :class:`KeysError` subclass whose message names the cause and the next step,
and never contains a token, a JWT or any part of a key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import hvac
import hvac.exceptions
import requests

from breakglass_tui.config import Settings

KEY_FIELDS = ("devvm_private_key", "pve_private_key")
KNOWN_HOSTS_FIELDS = ("devvm_known_hosts", "pve_known_hosts")
SECRET_FIELDS = ("devvm_private_key", "devvm_known_hosts", "pve_private_key", "pve_known_hosts")


# -- errors -------------------------------------------------------------------------------------


class KeysError(Exception):
    """The breakglass keys could not be loaded. The message says why and what to do next, and
    holds nothing secret."""


class VaultNotConfigured(KeysError):
    """No Vault address is configured (BREAKGLASS_VAULT_ADDR)."""


class VaultUnreachable(KeysError):
    """Vault did not answer (connection refused, timeout, TLS failure)."""


class VaultSealed(KeysError):
    """Vault answered that it is sealed (or otherwise unavailable, 503)."""


class VaultCredentialsMissing(KeysError):
    """No credential to log in with: no token file, no VAULT_TOKEN, no projected token."""


class VaultLoginRefused(KeysError):
    """Vault refused the Kubernetes login (role, service account, namespace, audience)."""


class VaultAccessDenied(KeysError):
    """Logged in, but the token may not read the breakglass secret."""


class SecretMissing(KeysError):
    """The breakglass secret does not exist, or its current version is deleted."""


class SecretFieldInvalid(KeysError):
    """A field of the breakglass secret is missing or malformed. ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class VaultError(KeysError):
    """Vault answered with an error this module has no better name for."""


class AgentStartError(KeysError):
    """The private ssh-agent could not be started or would not take the keys."""


class NoKeySource(KeysError):
    """Neither Vault nor an operator ssh-agent is configured."""


# -- the keys -----------------------------------------------------------------------------------


@dataclass
class BreakglassKeys:
    """The two private keys (in memory) and the pinned host keys, as read from Vault."""

    devvm_key: asyncssh.SSHKey = field(repr=False)
    pve_key: asyncssh.SSHKey = field(repr=False)
    devvm_known_hosts: str
    pve_known_hosts: str

    def __repr__(self) -> str:
        # Public fingerprints only: enough to tell which keys were loaded, nothing to steal.
        return (
            f"BreakglassKeys(devvm_key={_describe(self.devvm_key)},"
            f" pve_key={_describe(self.pve_key)},"
            f" devvm_known_hosts=<{_count_lines(self.devvm_known_hosts)} line(s)>,"
            f" pve_known_hosts=<{_count_lines(self.pve_known_hosts)} line(s)>)"
        )

    __str__ = __repr__


def _describe(key: asyncssh.SSHKey) -> str:
    return f"<{key.get_algorithm()} {key.get_fingerprint()}>"


def _count_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip() and not line.startswith("#"))


# -- reading --------------------------------------------------------------------------------------


def read_breakglass_keys(
    settings: Settings, *, environ: MutableMapping[str, str] | None = None
) -> BreakglassKeys:
    """Log in to Vault, read the breakglass secret, parse it in memory and drop the token.

    Synchronous (hvac): call it with ``asyncio.to_thread``. ``environ`` defaults to
    ``os.environ`` and is where ``VAULT_TOKEN`` is looked up (and removed from once used).
    Raises a :class:`KeysError` subclass for every failure.
    """
    if not settings.vault_addr:
        raise VaultNotConfigured(
            "no Vault is configured: set BREAKGLASS_VAULT_ADDR (e.g. http://127.0.0.1:8200 for a"
            " port-forwarded Vault), or leave it unset and use an ssh-agent holding the keys"
        )
    env = os.environ if environ is None else environ
    addr = settings.vault_addr
    # token="" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token by itself.
    client = hvac.Client(
        url=addr,
        token="",
        timeout=settings.vault_timeout_s,
        verify=str(settings.vault_cacert) if settings.vault_cacert else True,
    )
    secrets_seen: list[str] = []  # what to scrub from any text we pass on
    owned_token = False
    try:
        credential = _credential(settings, env)
        secrets_seen.append(credential.value)
        if credential.kind == "vault_token":
            client.token = credential.value
            # The operator's token: dropped from our environment so no child process inherits it.
            env.pop("VAULT_TOKEN", None)
        else:
            _login(client, settings, credential, secrets_seen)
            owned_token = True
        data = _read_secret(client, settings, credential, secrets_seen)
    finally:
        if owned_token:
            _revoke(client)
        client.token = ""
        client.adapter.close()
        del client
    return _parse(data, settings)


@dataclass(frozen=True)
class _Credential:
    kind: str  # "jwt" (Kubernetes login) or "vault_token"
    value: str = field(repr=False)
    source: str  # a human description: which file or variable


def _credential(settings: Settings, env: MutableMapping[str, str]) -> _Credential:
    if settings.vault_token_file is not None:
        path = settings.vault_token_file
        text = _read_token_file(
            path,
            "BREAKGLASS_VAULT_TOKEN_FILE",
            "write `kubectl create token claude-breakglass -n claude-breakglass --audience vault`"
            " to it, or unset the variable",
        )
        if not _looks_like_jwt(text):
            raise VaultCredentialsMissing(
                f"BREAKGLASS_VAULT_TOKEN_FILE ({path}) does not hold a Kubernetes service-account"
                " JWT: it is for the output of `kubectl create token claude-breakglass -n"
                " claude-breakglass --audience vault`; to use a Vault token instead, export it"
                " as VAULT_TOKEN and unset BREAKGLASS_VAULT_TOKEN_FILE"
            )
        return _Credential("jwt", text, f"the token file {path} (BREAKGLASS_VAULT_TOKEN_FILE)")
    if env.get("VAULT_TOKEN", "").strip():
        return _Credential("vault_token", env["VAULT_TOKEN"].strip(), "VAULT_TOKEN")
    path = settings.vault_sa_token_file
    text = _read_token_file(
        path,
        "BREAKGLASS_VAULT_SA_TOKEN_FILE",
        "in the cluster, check the projected service-account token volume (audience vault);"
        " for a local run set BREAKGLASS_VAULT_TOKEN_FILE to a `kubectl create token` file or"
        " export VAULT_TOKEN",
    )
    if not _looks_like_jwt(text):
        raise VaultCredentialsMissing(
            f"the service-account token file {path} (BREAKGLASS_VAULT_SA_TOKEN_FILE) does not hold"
            " a JWT: check the projected token volume in the pod spec"
        )
    return _Credential("jwt", text, f"the projected token {path}")


def _read_token_file(path: Path, variable: str, next_step: str) -> str:
    # Re-read at every login: the kubelet rotates projected tokens.
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise VaultCredentialsMissing(
            f"no token file at {path} ({variable}): {next_step}"
        ) from None
    except OSError as exc:
        raise VaultCredentialsMissing(
            f"cannot read the token file {path} ({variable}: {exc.strerror}): {next_step}"
        ) from None
    if not text:
        raise VaultCredentialsMissing(f"the token file {path} ({variable}) is empty: {next_step}")
    return text


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """The JWT's claims, unverified (only to explain a refusal; Vault does the checking)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(header, dict) or "alg" not in header or not isinstance(claims, dict):
        return None
    return claims


def _looks_like_jwt(token: str) -> bool:
    return _jwt_claims(token) is not None


def _who(token: str) -> str:
    """Which service account a JWT names, its audience and expiry (none of it secret)."""
    claims = _jwt_claims(token) or {}
    k8s = claims.get("kubernetes.io")
    k8s = k8s if isinstance(k8s, dict) else {}
    account = k8s.get("serviceaccount")
    account = account if isinstance(account, dict) else {}
    # Projected tokens nest the names under "kubernetes.io"; legacy secret tokens flatten them.
    namespace = k8s.get("namespace") or claims.get("kubernetes.io/serviceaccount/namespace")
    sa = account.get("name") or claims.get("kubernetes.io/serviceaccount/service-account.name")
    audience = claims.get("aud")
    parts = [f"service account {sa!r} in namespace {namespace!r}"]
    parts.append(f"audience {audience!r}" if audience else "no audience")
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp < time.time():
        parts.append("EXPIRED")
    return ", ".join(parts)


def _scrub(text: str, secrets_seen: list[str]) -> str:
    for secret in secrets_seen:
        if secret:
            text = text.replace(secret, "<redacted>")
    text = " ".join(text.split())
    return text[:200]


def _reason(exc: hvac.exceptions.VaultError, secrets_seen: list[str]) -> str:
    errors = exc.errors if isinstance(exc.errors, list) else []
    return _scrub("; ".join(str(e) for e in errors), secrets_seen) or "no reason given"


def _unreachable(settings: Settings, exc: requests.RequestException) -> VaultUnreachable:
    if isinstance(exc, requests.exceptions.SSLError):
        why = "TLS verification failed"
        step = "check BREAKGLASS_VAULT_CACERT names the CA that signed Vault's certificate"
    elif isinstance(exc, requests.Timeout):
        why = f"no answer within {settings.vault_timeout_s:g}s"
        step = "check Vault is up and the NetworkPolicy lets this pod reach it"
    else:
        why = "connection failed"
        step = (
            "check BREAKGLASS_VAULT_ADDR, that Vault is running (or the `kubectl port-forward` is"
            " up for a local run) and that the NetworkPolicy allows egress to it"
        )
    return VaultUnreachable(
        f"Vault at {settings.vault_addr} is unreachable ({why}): {step}, then retry"
    )


def _sealed(settings: Settings) -> VaultSealed:
    return VaultSealed(
        f"Vault at {settings.vault_addr} is sealed (503): ask a Vault operator to unseal it"
        " (`bao operator unseal` / `vault operator unseal`), then retry"
    )


def _login(
    client: hvac.Client, settings: Settings, credential: _Credential, secrets_seen: list[str]
) -> None:
    role, mount = settings.vault_role, settings.vault_auth_mount
    try:
        client.auth.kubernetes.login(role, credential.value, mount_point=mount)
    except requests.RequestException as exc:
        raise _unreachable(settings, exc) from None
    except hvac.exceptions.VaultDown:
        raise _sealed(settings) from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
        status = 403 if isinstance(exc, hvac.exceptions.Forbidden) else 400
        raise VaultLoginRefused(
            f"Vault refused the Kubernetes login for role {role!r} at auth/{mount}"
            f" ({status}: {_reason(exc, secrets_seen)}). The JWT from {credential.source} names"
            f" {_who(credential.value)}. Check that the role exists (BREAKGLASS_VAULT_ROLE), that"
            " its bound service account and namespace are this pod's (claude-breakglass /"
            " claude-breakglass), that the token's audience is the role's (vault), and that the"
            " token is fresh (docs/vault/README.md)"
        ) from None
    except hvac.exceptions.InvalidPath:
        raise VaultLoginRefused(
            f"Vault has no Kubernetes auth method at auth/{mount} (404): check"
            " BREAKGLASS_VAULT_AUTH_MOUNT, or enable and configure it (docs/vault/README.md)"
        ) from None
    except hvac.exceptions.VaultError as exc:
        raise VaultError(
            f"Vault failed the Kubernetes login for role {role!r}"
            f" ({type(exc).__name__}: {_reason(exc, secrets_seen)}): check Vault's own logs,"
            " then retry"
        ) from None
    token = client.token
    if token:
        secrets_seen.append(token)


def _read_secret(
    client: hvac.Client, settings: Settings, credential: _Credential, secrets_seen: list[str]
) -> dict[str, Any]:
    mount, path = settings.vault_kv_mount, settings.vault_secret_path
    where = f"{mount}/{path} (KV v2: {mount}/data/{path})"
    try:
        # raise_on_deleted_version=False: a deleted current version comes back as data None with
        # its metadata, so it can be told apart from a secret that does not exist.
        response = client.secrets.kv.v2.read_secret_version(
            path, mount_point=mount, raise_on_deleted_version=False
        )
    except requests.RequestException as exc:
        raise _unreachable(settings, exc) from None
    except hvac.exceptions.VaultDown:
        raise _sealed(settings) from None
    except hvac.exceptions.Forbidden:
        who = (
            "the VAULT_TOKEN (expired, revoked, or without the breakglass-read policy)"
            if credential.kind == "vault_token"
            else f"the token of role {settings.vault_role!r}"
        )
        raise VaultAccessDenied(
            f"Vault refused to read {where} with {who} (403): check that the role's policy is"
            " breakglass-read and that it names this mount and path (docs/vault/"
            "breakglass-read.hcl, BREAKGLASS_VAULT_KV_MOUNT, BREAKGLASS_VAULT_SECRET_PATH)"
        ) from None
    except hvac.exceptions.InvalidPath:
        raise SecretMissing(
            f"the breakglass secret {where} does not exist (404): write it as docs/keys.md"
            " describes, or fix BREAKGLASS_VAULT_KV_MOUNT / BREAKGLASS_VAULT_SECRET_PATH"
        ) from None
    except hvac.exceptions.VaultError as exc:
        raise VaultError(
            f"Vault failed to read {where} ({type(exc).__name__}: {_reason(exc, secrets_seen)}):"
            " check that the mount is a KV version 2 engine, then Vault's logs"
        ) from None
    body = response.get("data") if isinstance(response, dict) else None
    data = body.get("data") if isinstance(body, dict) else None
    if data is None:
        metadata = (body or {}).get("metadata") or {}
        state = "destroyed" if metadata.get("destroyed") else "deleted"
        raise SecretMissing(
            f"the current version ({metadata.get('version', '?')}) of the breakglass secret"
            f" {where} is {state}: undelete it (`bao kv undelete -mount={mount}"
            f" -versions=<n> {path}`) or write a new version (docs/keys.md)"
        )
    if not isinstance(data, dict):
        raise SecretFieldInvalid(
            f"the breakglass secret {where} is not a map of fields: rewrite it as docs/keys.md"
            " describes",
            field="",
        )
    return data


def _revoke(client: hvac.Client) -> None:
    """Revoke our own login token, best effort: it expires soon anyway (short role TTL)."""
    with contextlib.suppress(requests.RequestException, hvac.exceptions.VaultError):
        client.auth.token.revoke_self()


def _parse(data: dict[str, Any], settings: Settings) -> BreakglassKeys:
    where = f"{settings.vault_kv_mount}/{settings.vault_secret_path}"
    for name in SECRET_FIELDS:
        value = data.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise SecretFieldInvalid(
                f"the breakglass secret {where} has no field {name!r} (or it is empty): add it as"
                " docs/keys.md describes",
                field=name,
            )
        if not isinstance(value, str):
            raise SecretFieldInvalid(
                f"field {name!r} of the breakglass secret {where} is not a string: store it as"
                " text (docs/keys.md)",
                field=name,
            )
    keys = {name: _import_key(data[name], name, where) for name in KEY_FIELDS}
    if keys["devvm_private_key"].get_fingerprint() == keys["pve_private_key"].get_fingerprint():
        # Each key is offered only to its own target (by fingerprint): one key for both would
        # make the devvm's root key and the forced-command key the same thing.
        raise SecretFieldInvalid(
            f"the breakglass secret {where} holds the same key in devvm_private_key and"
            " pve_private_key: the PVE host's key must be a separate key that can only run the"
            " forced command; make a second key pair and rewrite pve_private_key (docs/keys.md)",
            field="pve_private_key",
        )
    known = {name: _check_known_hosts(data[name], name, where) for name in KNOWN_HOSTS_FIELDS}
    return BreakglassKeys(
        devvm_key=keys["devvm_private_key"],
        pve_key=keys["pve_private_key"],
        devvm_known_hosts=known["devvm_known_hosts"],
        pve_known_hosts=known["pve_known_hosts"],
    )


def _import_key(text: str, name: str, where: str) -> asyncssh.SSHKey:
    try:
        # In memory: bytes are key data; a str would be taken as a file name by some asyncssh
        # calls, so be explicit.
        return asyncssh.import_private_key(text.strip().encode() + b"\n")
    except (asyncssh.KeyImportError, ValueError, TypeError):
        # The library's message is not passed on: keep any part of the value out of the text.
        raise SecretFieldInvalid(
            f"field {name!r} of the breakglass secret {where} is not a usable private key (it"
            " must be an unencrypted OpenSSH or PEM private key): rewrite the field (docs/keys.md)",
            field=name,
        ) from None


def _check_known_hosts(text: str, name: str, where: str) -> str:
    bad = SecretFieldInvalid(
        f"field {name!r} of the breakglass secret {where} is not valid known_hosts text:"
        " write lines like `192.0.2.10 ssh-ed25519 AAAA…` (ssh-keyscan output; docs/keys.md)",
        field=name,
    )
    try:
        asyncssh.import_known_hosts(text)
    except (asyncssh.KeyImportError, ValueError, TypeError, IndexError):
        raise bad from None
    # import_known_hosts skips host keys it cannot parse; a pin that silently pins nothing would
    # only fail later, at connect time, as a confusing host-key error. Check each key here.
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if fields[0].startswith("@"):
            fields = fields[1:]
        if len(fields) < 3:
            raise bad
        try:
            asyncssh.import_public_key(f"{fields[1]} {fields[2]}")
        except (asyncssh.KeyImportError, ValueError, TypeError):
            raise bad from None
    if _count_lines(text) == 0:
        raise SecretFieldInvalid(
            f"field {name!r} of the breakglass secret {where} pins no host key: add the host's"
            " known_hosts line (docs/keys.md)",
            field=name,
        )
    return text if text.endswith("\n") else text + "\n"
