"""The operator files in docs/vault, applied to a real OpenBao, do what ADR 0001 needs:

- the breakglass role reads the breakglass keys and nothing else;
- terraform-state (a secret/* grant) plus the deny snippet reaches no breakglass path through any
  KV v2 prefix, yet still reads its own secrets;
- only the claude-breakglass service account, in its namespace, with audience vault, logs in.
"""

# The OpenBao fixtures are imported by name below (no shared conftest), so pytest's use of them
# as arguments reads as a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import json
import re

import hvac
import hvac.exceptions
import pytest
import requests

from tests.support.openbao import (  # noqa: F401 - fixtures
    SECRET_PATH,
    VAULT_DOCS,
    BreakglassVault,
    breakglass_vault,
    openbao,
)

# What terraform-state grants the claude-agent namespace today, as broad as it gets: every KV v2
# prefix under secret/, plus secret/* itself.
TERRAFORM_STATE_GRANT = """
path "secret/*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list"]
}
""" + "".join(
    f"""
path "secret/{prefix}/*" {{
  capabilities = ["create", "read", "update", "patch", "delete", "list"]
}}
"""
    for prefix in (
        "data",
        "metadata",
        "delete",
        "undelete",
        "destroy",
        "subkeys",
        "detailed-metadata",
    )
)
KV2_PREFIXES = ("data", "metadata", "delete", "undelete", "destroy", "subkeys", "detailed-metadata")
BREAKGLASS_PATHS = (
    "breakglass",
    "breakglass/",
    "breakglass/ssh",
    "breakglass/ssh/",
    "breakglass/x/y",
)
OTHER_SECRET = "claude-agent/terraform"


def raw(vault: BreakglassVault, token: str, method: str, path: str, body: dict | None = None):
    """One HTTP request to OpenBao as ``token`` (no client-side path tidying)."""
    return requests.request(
        method,
        f"{vault.bao.addr}/v1/{path}",
        headers={"X-Vault-Token": token},
        json=body,
        timeout=5,
    )


def token_for(vault: BreakglassVault, policy_name: str, policy_text: str) -> str:
    root = vault.bao.client()
    root.sys.create_or_update_policy(policy_name, policy_text)
    created = root.auth.token.create(policies=[policy_name], no_default_policy=True, ttl="10m")
    return created["auth"]["client_token"]


def breakglass_login(vault: BreakglassVault, **who) -> str:
    client = hvac.Client(url=vault.bao.addr, token="")
    client.auth.kubernetes.login("breakglass", vault.bao.tokenreview.issue(**who))
    return client.token


@pytest.fixture(scope="module")
def other_secret(breakglass_vault: BreakglassVault) -> str:
    breakglass_vault.bao.client().secrets.kv.v2.create_or_update_secret(
        OTHER_SECRET, secret={"state": "terraform"}, mount_point="secret"
    )
    return OTHER_SECRET


# -- breakglass-read: the keys and nothing else ---------------------------------------------------


def test_breakglass_role_reads_the_keys(breakglass_vault: BreakglassVault) -> None:
    token = breakglass_login(breakglass_vault)
    data = raw(breakglass_vault, token, "GET", f"secret/data/{SECRET_PATH}")
    assert data.status_code == 200
    assert set(data.json()["data"]["data"]) == {
        "devvm_private_key",
        "devvm_known_hosts",
        "pve_private_key",
        "pve_known_hosts",
    }
    assert raw(breakglass_vault, token, "GET", f"secret/metadata/{SECRET_PATH}").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"secret/data/{OTHER_SECRET}", None),
        ("GET", "secret/data/breakglass/other", None),
        ("LIST", "secret/metadata/", None),
        ("LIST", "secret/metadata/breakglass/", None),
        ("POST", f"secret/data/{SECRET_PATH}", {"data": {"devvm_private_key": "x"}}),
        ("PATCH", f"secret/data/{SECRET_PATH}", {"data": {"x": "y"}}),
        ("DELETE", f"secret/data/{SECRET_PATH}", None),
        ("DELETE", f"secret/metadata/{SECRET_PATH}", None),
        ("POST", f"secret/destroy/{SECRET_PATH}", {"versions": [1]}),
        ("POST", f"secret/metadata/{SECRET_PATH}", {"max_versions": 1}),
        ("GET", f"secret/subkeys/{SECRET_PATH}", None),
        ("GET", "cubbyhole/anything", None),
        ("GET", "sys/policies/acl/breakglass-read", None),
        ("GET", "auth/token/lookup-self", None),  # not even the default policy
        ("POST", "auth/token/create", {}),
    ],
)
def test_breakglass_role_can_do_nothing_else(
    breakglass_vault: BreakglassVault, other_secret: str, method: str, path: str, body
) -> None:
    token = breakglass_login(breakglass_vault)
    headers = {"X-Vault-Token": token}
    if method == "PATCH":  # KV v2 wants merge-patch for a real patch attempt
        headers["Content-Type"] = "application/merge-patch+json"
    response = requests.request(
        method, f"{breakglass_vault.bao.addr}/v1/{path}", headers=headers, json=body, timeout=5
    )
    assert response.status_code == 403, (method, path, response.status_code)


def test_breakglass_token_is_short_lived_and_may_revoke_itself(
    breakglass_vault: BreakglassVault,
) -> None:
    client = hvac.Client(url=breakglass_vault.bao.addr, token="")
    auth = client.auth.kubernetes.login("breakglass", breakglass_vault.bao.tokenreview.issue())
    assert auth["auth"]["lease_duration"] <= 300
    assert auth["auth"]["policies"] == ["breakglass-read"]  # no "default"
    token = auth["auth"]["client_token"]
    assert raw(breakglass_vault, token, "GET", f"secret/data/{SECRET_PATH}").status_code == 200
    client.auth.token.revoke_self()
    assert raw(breakglass_vault, token, "GET", f"secret/data/{SECRET_PATH}").status_code == 403


# -- terraform-state + the deny --------------------------------------------------------------------


@pytest.fixture(scope="module")
def terraform_state_token(
    breakglass_vault: BreakglassVault, other_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """terraform-state as it is today, then amended exactly as docs/vault/README.md says."""
    bao = breakglass_vault.bao
    work = tmp_path_factory.mktemp("terraform-state")
    (work / "grant.hcl").write_text(TERRAFORM_STATE_GRANT)
    bao.cli("policy", "write", "terraform-state", str(work / "grant.hcl"))
    # README step 3: read, append the deny, write back.
    current = bao.cli("policy", "read", "terraform-state").stdout
    deny = (VAULT_DOCS / "terraform-state-deny-breakglass.hcl").read_text()
    (work / "terraform-state.hcl").write_text(current + "\n" + deny)
    bao.cli("policy", "write", "terraform-state", str(work / "terraform-state.hcl"))
    created = bao.client().auth.token.create(
        policies=["terraform-state"], no_default_policy=True, ttl="10m"
    )
    return created["auth"]["client_token"]


def test_the_deny_covers_every_kv2_prefix_this_openbao_serves(
    breakglass_vault: BreakglassVault,
) -> None:
    """If a new KV v2 endpoint appears (OpenBao added detailed-metadata/), the deny must grow."""
    help_text = breakglass_vault.bao.cli("path-help", "secret/").stdout
    served = set(re.findall(r"\^([a-z-]+)/\(\?P<path>", help_text))
    assert served == set(KV2_PREFIXES)
    deny = (VAULT_DOCS / "terraform-state-deny-breakglass.hcl").read_text()
    for prefix in served:
        assert f'path "secret/{prefix}/breakglass"' in deny
        assert f'path "secret/{prefix}/breakglass/*"' in deny


@pytest.mark.parametrize("prefix", KV2_PREFIXES)
@pytest.mark.parametrize("path", BREAKGLASS_PATHS)
def test_terraform_state_reaches_no_breakglass_path(
    breakglass_vault: BreakglassVault, terraform_state_token: str, prefix: str, path: str
) -> None:
    full = f"secret/{prefix}/{path}"
    attempts = [
        ("GET", None),
        ("LIST", None),
        ("POST", {"data": {"x": "y"}, "versions": [1]}),
        ("PUT", {"data": {"x": "y"}, "versions": [1]}),
        ("DELETE", None),
    ]
    for method, body in attempts:
        response = raw(breakglass_vault, terraform_state_token, method, full, body)
        if method in ("POST", "PUT") and full.endswith("/"):
            # OpenBao refuses any write to a path ending in "/" before the ACL (root too).
            assert response.status_code == 400, (method, full, response.status_code)
            assert response.json()["errors"] == ["cannot write to a path ending in '/'"]
            continue
        assert response.status_code == 403, (method, full, response.status_code)
    listed = raw(breakglass_vault, terraform_state_token, "GET", full + "?list=true")
    assert listed.status_code == 403, full


def test_terraform_state_still_reads_and_lists_its_own_secrets(
    breakglass_vault: BreakglassVault, terraform_state_token: str, other_secret: str
) -> None:
    got = raw(breakglass_vault, terraform_state_token, "GET", f"secret/data/{other_secret}")
    assert got.status_code == 200
    assert got.json()["data"]["data"] == {"state": "terraform"}
    listed = raw(breakglass_vault, terraform_state_token, "LIST", "secret/metadata/claude-agent")
    assert listed.status_code == 200
    written = raw(
        breakglass_vault,
        terraform_state_token,
        "POST",
        "secret/data/claude-agent/new",
        {"data": {"k": "v"}},
    )
    assert written.status_code == 200


def test_the_breakglass_secret_survived_all_of_that(breakglass_vault: BreakglassVault) -> None:
    current = breakglass_vault.bao.client().secrets.kv.v2.read_secret_version(
        SECRET_PATH, mount_point="secret", raise_on_deleted_version=True
    )
    assert current["data"]["data"] == breakglass_vault.fields()
    assert current["data"]["metadata"]["version"] == breakglass_vault.version


def test_without_the_deny_terraform_state_would_read_the_keys(
    breakglass_vault: BreakglassVault,
) -> None:
    """The control: the grant alone exposes the keys, so the tests above can fail."""
    token = token_for(breakglass_vault, "terraform-state-without-deny", TERRAFORM_STATE_GRANT)
    assert raw(breakglass_vault, token, "GET", f"secret/data/{SECRET_PATH}").status_code == 200


def test_a_single_glob_deny_is_not_enough(breakglass_vault: BreakglassVault) -> None:
    """docs/architecture.md §6: `secret/+/breakglass/*` loses to `secret/data/*` (its wildcard comes
    first), which is why the snippet spells out each prefix."""
    naive = 'path "secret/+/breakglass/*" {\n  capabilities = ["deny"]\n}\n'
    token = token_for(breakglass_vault, "terraform-state-naive", TERRAFORM_STATE_GRANT + naive)
    assert raw(breakglass_vault, token, "GET", f"secret/data/{SECRET_PATH}").status_code == 200


# -- the Kubernetes auth role ----------------------------------------------------------------------


def test_role_file_binds_the_service_account_namespace_and_audience() -> None:
    role = json.loads((VAULT_DOCS / "kubernetes-role.json").read_text())
    assert role["bound_service_account_names"] == ["claude-breakglass"]
    assert role["bound_service_account_namespaces"] == ["claude-breakglass"]
    assert role["audience"] == "vault"
    assert role["token_policies"] == ["breakglass-read"]
    assert role["token_no_default_policy"] is True


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ({"namespace": "claude-agent"}, "namespace not authorized"),
        ({"name": "claude-agent"}, "service account name not authorized"),
        ({"namespace": "claude-agent", "name": "claude-agent"}, "not authorized"),
        ({"audiences": ("https://kubernetes.default.svc.cluster.local",)}, "audience"),
        ({"audiences": ()}, "audience"),
    ],
    ids=["other-namespace", "other-sa", "claude-agent-pod", "api-audience", "no-audience"],
)
def test_only_the_breakglass_service_account_logs_in(
    breakglass_vault: BreakglassVault, who: dict, reason: str
) -> None:
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        breakglass_login(breakglass_vault, **who)
    assert reason in str(info.value)
    # ...while the right one does.
    assert breakglass_login(breakglass_vault)
