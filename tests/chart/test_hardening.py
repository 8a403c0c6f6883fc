"""The pod is hardened against the very pressure event it exists to fix (ADR 0001): each property
checked on the rendered objects, for the default values and for the production example."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from tests.chart.conftest import NAMESPACE, REPO, Rendered, helm, production_values, render


def pod_spec(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Deployment")["spec"]["template"]["spec"]


def container(rendered: Rendered) -> dict[str, Any]:
    containers = pod_spec(rendered)["containers"]
    assert len(containers) == 1, "one container: the server (no sidecar holding keys)"
    return containers[0]


def env(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(rendered)["env"]}


def test_every_namespaced_object_lives_in_claude_breakglass(rendered: Rendered) -> None:
    for obj in rendered.objects:
        if obj["kind"] in ("Namespace", "PriorityClass"):
            continue
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_rendering_into_another_namespace_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="installs only into namespace"):
        render(namespace="claude-agent")


def test_the_release_never_owns_the_namespace(rendered: Rendered) -> None:
    """The operator creates and labels it once (docs/install.md): Helm stores the release in it
    before creating anything, the API-key Secret must be in it before the pod starts, and
    `helm uninstall` must not delete it with that Secret."""
    assert rendered.all("Namespace") == []


@pytest.mark.parametrize("attempt", [{"create": True}, {"create": False}, {"podSecurity": "x"}])
def test_no_value_can_make_the_release_own_the_namespace(attempt: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render({"namespace": attempt})


def test_the_production_example_as_shipped_refuses_to_render() -> None:
    """Its digest is a placeholder: the render fails and says what to fill in."""
    with pytest.raises(helm.HelmRenderError, match=r"image\.digest is still the placeholder"):
        render(production_values(digest=None))


def test_priority_class_is_only_created_when_asked(default_render: Rendered) -> None:
    assert default_render.all("PriorityClass") == []


def test_own_service_account_without_api_token(rendered: Rendered) -> None:
    account = rendered.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    spec = pod_spec(rendered)
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False


def test_projected_vault_token_short_lived_with_audience_vault_where_the_app_reads_it(
    rendered: Rendered,
) -> None:
    volumes = {v["name"]: v for v in pod_spec(rendered)["volumes"]}
    sources = volumes["vault-token"]["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["audience"] == "vault"
    assert 600 <= token["expirationSeconds"] <= 3600
    mount = next(m for m in container(rendered)["volumeMounts"] if m["name"] == "vault-token")
    assert mount["readOnly"] is True
    expected = f"{mount['mountPath']}/{token['path']}"
    assert env(rendered)["BREAKGLASS_VAULT_SA_TOKEN_FILE"]["value"] == expected


def test_one_replica_recreated_never_two_at_once(rendered: Rendered) -> None:
    spec = rendered.one("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_high_priority_class_and_optional_creation(production_render: Rendered) -> None:
    name = pod_spec(production_render)["priorityClassName"]
    created = production_render.one("PriorityClass")
    assert created["metadata"]["name"] == name
    assert created["value"] >= 1_000_000
    assert "namespace" not in created["metadata"], "PriorityClass is cluster-scoped"


def test_tolerations_explicit_with_finite_seconds_for_not_ready_and_unreachable(
    rendered: Rendered,
) -> None:
    tolerations = pod_spec(rendered)["tolerations"]
    assert all(t.get("key") for t in tolerations), "an empty-key toleration pins to dead nodes"
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        matching = [t for t in tolerations if t["key"] == key]
        assert matching, key
        assert all(0 < t["tolerationSeconds"] <= 300 for t in matching), key


def test_required_node_anti_affinity_to_the_gpu_node(rendered: Rendered) -> None:
    required = pod_spec(rendered)["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    [term] = required["nodeSelectorTerms"]
    [expression] = term["matchExpressions"]
    avoid = rendered.values["avoidNodes"]
    assert expression == {"key": avoid["key"], "operator": "NotIn", "values": avoid["values"]}


def test_image_pulled_only_if_not_present(rendered: Rendered) -> None:
    assert container(rendered)["imagePullPolicy"] == "IfNotPresent"


def test_production_image_pinned_by_digest(production_render: Rendered) -> None:
    assert "@sha256:" in container(production_render)["image"]


def test_volumes_are_empty_dirs_with_size_limits_besides_the_token(rendered: Rendered) -> None:
    volumes = pod_spec(rendered)["volumes"]
    for volume in volumes:
        if volume["name"] == "vault-token":
            assert set(volume) == {"name", "projected"}
            continue
        assert set(volume) == {"name", "emptyDir"}, f"{volume['name']}: no PVC, no NFS"
        assert volume["emptyDir"]["sizeLimit"], volume["name"]
    mounts = {m["mountPath"] for m in container(rendered)["volumeMounts"]}
    values = env(rendered)
    for variable in ("BREAKGLASS_AGENT_SOCKET_DIR", "BREAKGLASS_STATE_DIR", "HOME", "TMPDIR"):
        assert values[variable]["value"] in mounts, variable


def test_requests_equal_limits(rendered: Rendered) -> None:
    resources = container(rendered)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert resources["requests"] == resources["limits"]


def test_non_root_read_only_no_capabilities_no_escalation_runtime_default_seccomp(
    rendered: Rendered,
) -> None:
    pod = pod_spec(rendered)["securityContext"]
    assert pod["runAsNonRoot"] is True
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert isinstance(pod[key], int) and pod[key] > 0, key
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(rendered)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert isinstance(ctx["runAsUser"], int) and ctx["runAsUser"] > 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}


def test_probes_on_the_server_port(rendered: Rendered) -> None:
    c = container(rendered)
    [port] = c["ports"]
    assert port["containerPort"] == int(env(rendered)["BREAKGLASS_SERVE_PORT"]["value"])
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}


def test_targets_are_ip_literals_and_the_api_key_comes_from_a_secret(rendered: Rendered) -> None:
    values = env(rendered)
    for name in ("BREAKGLASS_DEVVM_HOST", "BREAKGLASS_PVE_HOST"):
        ipaddress.ip_address(values[name]["value"])
    secret = rendered.values["anthropic"]["apiKeySecret"]
    assert values["ANTHROPIC_API_KEY"] == {
        "name": "ANTHROPIC_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}},
    }
    # No other secret reaches the environment, and no Vault token at all.
    assert [n for n, item in values.items() if "valueFrom" in item] == ["ANTHROPIC_API_KEY"]
    assert not [n for n in values if n.startswith("VAULT_")]


def test_server_contract_variables_are_set(rendered: Rendered) -> None:
    values = env(rendered)
    for name in (
        "BREAKGLASS_SERVE_HOST",
        "BREAKGLASS_SERVE_PORT",
        "BREAKGLASS_PUBLIC_URL",
        "BREAKGLASS_IDENTITY_HEADER",
        "BREAKGLASS_MAX_SESSIONS",
        "BREAKGLASS_STATE_DIR",
        "BREAKGLASS_AGENT_SOCKET_DIR",
        "BREAKGLASS_VAULT_ADDR",
        "BREAKGLASS_VAULT_ROLE",
        "BREAKGLASS_VAULT_SA_TOKEN_FILE",
        "BREAKGLASS_VAULT_KV_MOUNT",
        "BREAKGLASS_VAULT_SECRET_PATH",
        "BREAKGLASS_DEVVM_HOST",
        "BREAKGLASS_DEVVM_PORT",
        "BREAKGLASS_DEVVM_USER",
        "BREAKGLASS_PVE_HOST",
        "BREAKGLASS_PVE_PORT",
        "BREAKGLASS_PVE_USER",
    ):
        assert values[name]["value"], name
    assert values["BREAKGLASS_PUBLIC_URL"]["value"].startswith("https://")
    assert values["PYTHONDONTWRITEBYTECODE"]["value"] == "1"


def test_pinned_host_keys_pass_through_when_given() -> None:
    line = "192.0.2.10 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0stkey"
    values = env(render({"targets": {"devvm": {"hostKey": line}}}))
    assert values["BREAKGLASS_DEVVM_HOST_KEY"]["value"] == line
    assert "BREAKGLASS_PVE_HOST_KEY" not in values


def test_dns_on_means_cluster_resolver_only(rendered: Rendered) -> None:
    assert pod_spec(rendered)["dnsPolicy"] == "ClusterFirst"
    egress = app_policy(rendered)["spec"]["egress"]
    dns_rules = [r for r in egress if any(p["port"] == 53 for p in r["ports"])]
    [rule] = dns_rules
    [peer] = rule["to"]
    assert set(peer) == {"namespaceSelector", "podSelector"}, "DNS only to the cluster resolver"


def test_dns_off_means_no_resolver_and_no_dns_egress() -> None:
    aliases = [{"ip": "160.79.104.10", "hostnames": ["api.anthropic.com"]}]
    rendered = render({"dns": {"enabled": False}, "hostAliases": aliases})
    spec = pod_spec(rendered)
    assert spec["dnsPolicy"] == "None"
    assert spec["dnsConfig"]["nameservers"] == ["127.0.0.1"]
    assert spec["hostAliases"] == aliases
    egress = app_policy(rendered)["spec"]["egress"]
    assert not [r for r in egress if any(p["port"] == 53 for p in r["ports"])]


def app_policy(rendered: Rendered) -> dict[str, Any]:
    """The console's NetworkPolicy (the other one fences the `helm test` pod)."""
    [policy] = [
        p for p in rendered.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test")
    ]
    return policy


def test_network_policy_ingress_only_from_the_ingress_controller_and_helm_test(
    rendered: Rendered,
) -> None:
    policy = app_policy(rendered)
    spec = policy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    deployment = rendered.one("Deployment")
    assert spec["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    controller, helm_test = spec["ingress"]
    [peer] = controller["from"]
    assert peer["namespaceSelector"] == rendered.values["networkPolicy"]["ingressNamespaceSelector"]
    port = [{"protocol": "TCP", "port": rendered.values["server"]["port"]}]
    assert controller["ports"] == port
    # The second rule admits the `helm test` pod only: this namespace, its exact labels.
    [test_peer] = helm_test["from"]
    assert set(test_peer) == {"podSelector"}
    test_pod = rendered.one("Pod")
    assert test_peer["podSelector"]["matchLabels"].items() <= test_pod["metadata"]["labels"].items()
    assert helm_test["ports"] == port


def test_the_helm_test_pod_may_reach_the_console_and_nothing_else(rendered: Rendered) -> None:
    [policy] = [p for p in rendered.all("NetworkPolicy") if p["metadata"]["name"].endswith("-test")]
    spec = policy["spec"]
    test_pod = rendered.one("Pod")
    assert spec["podSelector"]["matchLabels"].items() <= test_pod["metadata"]["labels"].items()
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec["ingress"] == []
    [rule] = spec["egress"]
    selector = rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert rule["to"] == [{"podSelector": {"matchLabels": selector}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": rendered.values["server"]["port"]}]


def test_without_helm_test_only_the_ingress_controller_gets_in() -> None:
    rendered = render({"helmTest": {"enabled": False}})
    assert rendered.all("Pod") == []
    [rule] = rendered.one("NetworkPolicy")["spec"]["ingress"]  # and no policy for a test pod
    assert "namespaceSelector" in rule["from"][0]


def test_network_policy_egress_only_to_vault_the_api_and_the_two_targets(
    rendered: Rendered,
) -> None:
    v = rendered.values
    allowed: set[tuple[str, int]] = set()
    for rule in app_policy(rendered)["spec"]["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports == {53}:
            continue
        for peer in rule["to"]:
            assert set(peer) == {"ipBlock"}, "egress by address only"
            assert "except" not in peer["ipBlock"]
            allowed |= {(peer["ipBlock"]["cidr"], port) for port in ports}
    expected = {
        (v["vault"]["cidr"], v["vault"]["port"]),
        (f"{v['targets']['devvm']['host']}/32", v["targets"]["devvm"]["port"]),
        (f"{v['targets']['pve']['host']}/32", v["targets"]["pve"]["port"]),
    } | {(cidr, 443) for cidr in v["anthropic"]["cidrs"]}
    assert allowed == expected


def test_ipv6_target_gets_a_host_route() -> None:
    rendered = render({"targets": {"pve": {"host": "fd00::2"}}})
    cidrs = [
        peer["ipBlock"]["cidr"]
        for rule in app_policy(rendered)["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
    ]
    assert "fd00::2/128" in cidrs


def test_service_targets_the_server_port(rendered: Rendered) -> None:
    service = rendered.one("Service")
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert service["spec"]["type"] == "ClusterIP"
    selector = rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector


def test_vault_role_binds_this_service_account_namespace_and_audience(
    rendered: Rendered,
) -> None:
    """The chart and the Vault role (docs/vault/kubernetes-role.json) must name the same service
    account, namespace and audience, or the login fails on the worst day."""
    role_file = REPO / "docs" / "vault" / "kubernetes-role.json"
    role = json.loads(role_file.read_text())
    account = rendered.one("ServiceAccount")["metadata"]
    assert account["name"] in role["bound_service_account_names"]
    assert account["namespace"] in role["bound_service_account_namespaces"]
    assert role["audience"] == rendered.values["serviceAccount"]["vaultTokenAudience"]
