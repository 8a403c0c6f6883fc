"""Reading the breakglass keys from a real OpenBao: Kubernetes auth, one KV v2 secret, and a
clear, secret-free message for every way it can fail."""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest
import requests

from breakglass_tui.hosts.vault import (
    BreakglassKeys,
    KeysError,
    SecretFieldInvalid,
    SecretMissing,
    VaultAccessDenied,
    VaultCredentialsMissing,
    VaultLoginRefused,
    VaultNotConfigured,
    VaultSealed,
    VaultUnreachable,
    read_breakglass_keys,
)
from tests.support.openbao import (  # noqa: F401 - fixtures
    SECRET_PATH,
    BreakglassVault,
    breakglass_vault,
    key_material_needles,
    openbao,
)
from tests.support.realparts import free_port, new_key


def token_accessors(vault: BreakglassVault) -> set[str]:
    listing = vault.bao.client().list("auth/token/accessors")
    return set(listing["data"]["keys"])


def assert_nothing_secret(text: str, vault: BreakglassVault, *extra: str) -> None:
    """No key material, no JWT, no token, not even a piece, in ``text``."""
    data = text.encode()
    for needle in key_material_needles(vault.devvm_key, vault.pve_key):
        assert needle not in data
    assert "PRIVATE KEY" not in text
    assert vault.bao.root_token not in text
    for secret in extra:
        assert secret not in text
        for piece in secret.split("."):  # a JWT's header, claims or signature alone
            if len(piece) >= 16:
                assert piece not in text


def refusal(vault: BreakglassVault, settings, expected: type[KeysError], *secrets: str) -> str:
    with pytest.raises(expected) as info:
        read_breakglass_keys(settings, environ={})
    message = str(info.value)
    assert_nothing_secret(message + repr(info.value), vault, *secrets)
    # `from None`: no chained hvac/requests exception whose text could carry a URL with a token
    assert info.value.__cause__ is None
    return message


# -- the good path ------------------------------------------------------------------------------


def test_kubernetes_login_reads_both_keys_and_pins_and_revokes_its_token(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    before = token_accessors(breakglass_vault)
    keys = read_breakglass_keys(breakglass_vault.settings(tmp_path), environ={})

    assert isinstance(keys, BreakglassKeys)
    assert keys.devvm_key.get_fingerprint() == breakglass_vault.devvm_key.get_fingerprint()
    assert keys.pve_key.get_fingerprint() == breakglass_vault.pve_key.get_fingerprint()
    assert keys.devvm_known_hosts == breakglass_vault.devvm_known_hosts
    assert keys.pve_known_hosts == breakglass_vault.pve_known_hosts
    # The login token was revoked after the read: no new token is left behind in Vault.
    assert token_accessors(breakglass_vault) == before
    # repr/str show fingerprints only.
    for text in (repr(keys), str(keys)):
        assert keys.devvm_key.get_fingerprint() in text
        assert_nothing_secret(text, breakglass_vault)


def test_projected_token_is_reread_at_every_login(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    issue = breakglass_vault.bao.tokenreview.issue
    settings = breakglass_vault.settings(tmp_path)
    read_breakglass_keys(settings, environ={})
    # The kubelet rotates the file; a token for the wrong namespace now sits there.
    settings.vault_sa_token_file.write_text(issue(namespace="claude-agent"))
    refusal(breakglass_vault, settings, VaultLoginRefused)
    settings.vault_sa_token_file.write_text(issue())
    assert read_breakglass_keys(settings, environ={}).pve_key is not None


def test_local_run_with_a_kubectl_create_token_file(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "kubectl-token"
    jwt_file.write_text(breakglass_vault.bao.tokenreview.issue() + "\n")
    settings = breakglass_vault.settings(
        tmp_path,
        vault_sa_token_file=tmp_path / "no-projected-token-here",
        vault_token_file=jwt_file,
    )
    keys = read_breakglass_keys(settings, environ={})
    assert keys.devvm_key.get_fingerprint() == breakglass_vault.devvm_key.get_fingerprint()


def test_local_run_with_vault_token_uses_it_drops_it_from_env_and_leaves_it_valid(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    created = breakglass_vault.bao.client().auth.token.create(
        policies=["breakglass-read"], no_default_policy=True, ttl="5m"
    )
    token = created["auth"]["client_token"]
    environ = {"VAULT_TOKEN": token, "PATH": "/usr/bin"}
    settings = breakglass_vault.settings(tmp_path, vault_sa_token_file=tmp_path / "absent")

    keys = read_breakglass_keys(settings, environ=environ)

    assert keys.pve_key.get_fingerprint() == breakglass_vault.pve_key.get_fingerprint()
    assert "VAULT_TOKEN" not in environ  # no child process can inherit it now
    # The operator's own token is not ours to revoke.
    looked_up = breakglass_vault.bao.client().auth.token.lookup(token)
    assert looked_up["data"]["policies"] == ["breakglass-read"]


def test_credential_precedence_token_file_then_vault_token_then_projected_token(
    breakglass_vault: BreakglassVault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first configured source is the one used; no other token (VAULT_TOKEN, or the
    ~/.vault-token hvac would read by itself) quietly rescues a refused login."""
    issue = breakglass_vault.bao.tokenreview.issue
    root = breakglass_vault.bao.root_token
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".vault-token").write_text(root)
    jwt_file = tmp_path / "kubectl-token"
    jwt_file.write_text(issue(namespace="elsewhere"))
    # 1. The token file wins over VAULT_TOKEN (root!) and the projected token (valid).
    settings = breakglass_vault.settings(tmp_path, vault_token_file=jwt_file)
    with pytest.raises(VaultLoginRefused) as info:
        read_breakglass_keys(settings, environ={"VAULT_TOKEN": root})
    refusal_text = str(info.value)
    assert "BREAKGLASS_VAULT_TOKEN_FILE" in refusal_text
    assert "'elsewhere'" in refusal_text
    assert_nothing_secret(refusal_text, breakglass_vault)
    # 2. VAULT_TOKEN wins over the projected token: a useless one is refused, not bypassed.
    settings = breakglass_vault.settings(tmp_path)
    refusal_env = {"VAULT_TOKEN": "s.UselessTokenUselessToken00"}
    with pytest.raises(VaultAccessDenied):
        read_breakglass_keys(settings, environ=refusal_env)
    # 3. Only the projected token: it is used, and ~/.vault-token (root) is not.
    settings = breakglass_vault.settings(tmp_path, jwt=issue(name="default"))
    with pytest.raises(VaultLoginRefused):
        read_breakglass_keys(settings, environ={})


# -- every failure, its own message ---------------------------------------------------------------


def test_no_vault_configured(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    settings = breakglass_vault.settings(tmp_path, vault_addr=None)
    assert "BREAKGLASS_VAULT_ADDR" in refusal(breakglass_vault, settings, VaultNotConfigured)


def test_vault_unreachable_names_the_address_and_the_next_step(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    addr = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    jwt = breakglass_vault.bao.tokenreview.issue()
    settings = breakglass_vault.settings(tmp_path, jwt=jwt, vault_addr=addr)
    message = refusal(breakglass_vault, settings, VaultUnreachable, jwt)
    assert addr in message
    assert "BREAKGLASS_VAULT_ADDR" in message
    assert "port-forward" in message


def test_vault_sealed(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    jwt = breakglass_vault.bao.tokenreview.issue()
    settings = breakglass_vault.settings(tmp_path, jwt=jwt)
    breakglass_vault.bao.seal()
    try:
        message = refusal(breakglass_vault, settings, VaultSealed, jwt)
    finally:
        breakglass_vault.bao.unseal()
    assert "sealed" in message
    assert "unseal" in message
    settings.vault_sa_token_file.write_text(breakglass_vault.bao.tokenreview.issue())
    assert read_breakglass_keys(settings, environ={}).devvm_key is not None


@pytest.mark.parametrize(
    ("who", "overrides", "expect"),
    [
        ("a service account in another namespace", {"namespace": "claude-agent"}, "claude-agent"),
        ("another service account", {"name": "default"}, "'default'"),
        (
            "the API server's audience, not vault",
            {"audiences": ("https://kubernetes.default.svc.cluster.local",)},
            "audience",
        ),
        ("an expired token", {"ttl_s": -60}, "EXPIRED"),
    ],
)
def test_login_refused_says_what_to_check(
    breakglass_vault: BreakglassVault, tmp_path: Path, who: str, overrides: dict, expect: str
) -> None:
    jwt = breakglass_vault.bao.tokenreview.issue(**overrides)
    message = refusal(
        breakglass_vault, breakglass_vault.settings(tmp_path, jwt=jwt), VaultLoginRefused, jwt
    )
    assert "role 'breakglass'" in message, who
    for word in ("service account", "namespace", "audience", "vault"):
        assert word in message, who
    assert expect in message, who


def test_login_refused_for_a_role_that_does_not_exist(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    jwt = breakglass_vault.bao.tokenreview.issue()
    settings = breakglass_vault.settings(tmp_path, jwt=jwt, vault_role="breakglas")
    message = refusal(breakglass_vault, settings, VaultLoginRefused, jwt)
    assert "'breakglas'" in message
    assert "BREAKGLASS_VAULT_ROLE" in message


def test_login_refused_for_a_token_the_api_server_revoked(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    jwt = breakglass_vault.bao.tokenreview.issue()
    breakglass_vault.bao.tokenreview.revoke(jwt)  # e.g. the pod was deleted
    refusal(breakglass_vault, breakglass_vault.settings(tmp_path, jwt=jwt), VaultLoginRefused, jwt)


def test_no_projected_token_file(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    settings = breakglass_vault.settings(tmp_path, vault_sa_token_file=tmp_path / "missing")
    message = refusal(breakglass_vault, settings, VaultCredentialsMissing)
    assert "BREAKGLASS_VAULT_SA_TOKEN_FILE" in message
    assert "VAULT_TOKEN" in message  # the local-run alternative is named


def test_a_vault_token_in_the_jwt_file_is_refused_with_the_right_advice(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.NotAJwtButAVaultToken1234567890")
    settings = breakglass_vault.settings(tmp_path, vault_token_file=token_file)
    message = refusal(
        breakglass_vault, settings, VaultCredentialsMissing, "s.NotAJwtButAVaultToken1234567890"
    )
    assert "export it as VAULT_TOKEN" in message


def test_a_bad_vault_token_cannot_read(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    settings = breakglass_vault.settings(tmp_path, vault_sa_token_file=tmp_path / "absent")
    bogus = "s.ThisTokenWasNeverIssuedByVault0"
    with pytest.raises(VaultAccessDenied) as info:
        read_breakglass_keys(settings, environ={"VAULT_TOKEN": bogus})
    assert "VAULT_TOKEN" in str(info.value)
    assert_nothing_secret(str(info.value), breakglass_vault, bogus)


def test_secret_missing(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    root = breakglass_vault.bao.client()
    root.secrets.kv.v2.delete_metadata_and_all_versions(SECRET_PATH, mount_point="secret")
    try:
        message = refusal(breakglass_vault, breakglass_vault.settings(tmp_path), SecretMissing)
    finally:
        breakglass_vault.write_secret(breakglass_vault.fields())
    assert "does not exist (404)" in message
    assert "secret/breakglass/ssh" in message
    assert "docs/keys.md" in message


def test_current_version_deleted(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    root = breakglass_vault.bao.client()
    root.secrets.kv.v2.delete_latest_version_of_secret(SECRET_PATH, mount_point="secret")
    try:
        message = refusal(breakglass_vault, breakglass_vault.settings(tmp_path), SecretMissing)
    finally:
        breakglass_vault.write_secret(breakglass_vault.fields())
    assert "is deleted" in message
    assert "undelete" in message


FIELDS = ("devvm_private_key", "devvm_known_hosts", "pve_private_key", "pve_known_hosts")


@pytest.mark.parametrize("field", FIELDS)
def test_a_missing_field_is_named(
    breakglass_vault: BreakglassVault, tmp_path: Path, field: str
) -> None:
    data = breakglass_vault.fields()
    del data[field]
    with breakglass_vault.secret_as(data), pytest.raises(SecretFieldInvalid) as info:
        read_breakglass_keys(breakglass_vault.settings(tmp_path), environ={})
    assert info.value.field == field
    assert repr(field) in str(info.value)
    assert_nothing_secret(str(info.value), breakglass_vault)


def _truncated_key(vault: BreakglassVault) -> str:
    pem = vault.devvm_key.export_private_key("openssh").decode().splitlines()
    return "\n".join(pem[:3] + pem[-1:])


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("devvm_private_key", _truncated_key),
        ("pve_private_key", lambda v: v.pve_key.export_public_key("openssh").decode()),
        (
            "devvm_private_key",
            lambda v: v.devvm_key.export_private_key("pkcs8-pem", passphrase="pw").decode(),
        ),
        ("devvm_known_hosts", lambda v: "this is not known_hosts text"),
        ("pve_known_hosts", lambda v: "198.51.100.7 ssh-ed25519 AAAA!!notbase64\n"),
        ("pve_known_hosts", lambda v: "# only a comment\n"),
        ("devvm_known_hosts", lambda v: 12345),
    ],
    ids=["truncated", "public-not-private", "encrypted", "garbage", "bad-key", "empty", "number"],
)
def test_a_malformed_field_is_named_without_its_value(
    breakglass_vault: BreakglassVault, tmp_path: Path, field: str, bad
) -> None:
    data = breakglass_vault.fields()
    data[field] = bad(breakglass_vault)
    with breakglass_vault.secret_as(data), pytest.raises(SecretFieldInvalid) as info:
        read_breakglass_keys(breakglass_vault.settings(tmp_path), environ={})
    message = str(info.value)
    assert info.value.field == field
    assert repr(field) in message
    assert "docs/keys.md" in message
    assert_nothing_secret(message, breakglass_vault)
    if isinstance(data[field], str) and len(data[field]) > 20:
        assert data[field][:20] not in message


def test_error_messages_never_quote_the_key_even_for_another_key(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    """A damaged copy of a different private key in the field: its pieces stay out too."""
    stray = new_key("stray")
    pem = stray.export_private_key("openssh").decode()
    data = breakglass_vault.fields()
    data["pve_private_key"] = pem.replace("\n", "\n ", 2)  # mangled indentation
    with breakglass_vault.secret_as(data):
        try:
            keys = read_breakglass_keys(breakglass_vault.settings(tmp_path), environ={})
        except SecretFieldInvalid as exc:
            text = str(exc)
        else:  # asyncssh may accept it: then it must be exactly the stray key
            assert keys.pve_key.get_fingerprint() == stray.get_fingerprint()
            text = repr(keys)
    for needle in key_material_needles(stray):
        assert needle not in text.encode()


def test_a_listener_that_is_not_vault_counts_as_unreachable(
    breakglass_vault: BreakglassVault, tmp_path: Path
) -> None:
    """A non-HTTP listener (the TokenReview API speaks TLS) is 'unreachable', not a crash."""
    addr = breakglass_vault.bao.tokenreview.url.replace("https", "http")
    settings = breakglass_vault.settings(tmp_path, vault_addr=addr)
    with pytest.raises(VaultUnreachable) as info:
        read_breakglass_keys(settings, environ={})
    assert not isinstance(info.value, requests.RequestException)
    assert addr in str(info.value)
    assert_nothing_secret(str(info.value), breakglass_vault)


def test_keys_parse_in_memory(breakglass_vault: BreakglassVault, tmp_path: Path) -> None:
    keys = read_breakglass_keys(breakglass_vault.settings(tmp_path), environ={})
    # Usable for signing, i.e. real private keys, not just public halves.
    signature = keys.devvm_key.sign(b"breakglass", b"ssh-ed25519")
    assert breakglass_vault.devvm_key.convert_to_public().verify(b"breakglass", signature)
    assert isinstance(keys.pve_key, asyncssh.SSHKey)
