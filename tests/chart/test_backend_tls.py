"""Only the ingress can talk to the app, as the chart renders it: the pod mounts its certificate
and the ingress client CA from Secrets (never values) and serves the console port over TLS; the
controller side is rendered for Traefik (a ServersTransport with the client certificate, named by
the Service's annotations) and for ingress-nginx (its proxy-ssl annotations), on both routes (SSO
and the basic-auth fallback); probes and `helm test` use the plain health port; the render refuses
to drop the NetworkPolicy unless told what that gives up."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.chart.conftest import (
    CHART_DIR,
    NAMESPACE,
    PRODUCTION_VALUES,
    Rendered,
    helm,
    production_values,
    render,
)
from tests.chart.test_validation import KUBERNETES_VERSIONS, VENV_BIN

NGINX = "nginx.ingress.kubernetes.io/"
TRAEFIK_SERVICE = "traefik.ingress.kubernetes.io/service."

# The structure of Traefik's ServersTransport (traefik.io/v1alpha1), from Traefik's reference for
# the CRD (routing-configuration/kubernetes/crd/http/serverstransport): the fields it defines
# and their types. An unknown or misspelt field (rootCAsSecret, certificateSecrets) fails here,
# as the API server would refuse it; kubernetes-validate has no schema for custom resources.
SERVERS_TRANSPORT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "traefik.io/v1alpha1"},
        "kind": {"const": "ServersTransport"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "serverName": {"type": "string"},
                "insecureSkipVerify": {"type": "boolean"},
                "rootCAs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "secret": {"type": "string"},
                            "configMap": {"type": "string"},
                        },
                        "minProperties": 1,
                        "maxProperties": 1,
                    },
                },
                "rootCAsSecrets": {"type": "array", "items": {"type": "string"}},
                "certificatesSecrets": {"type": "array", "items": {"type": "string"}},
                "maxIdleConnsPerHost": {"type": "integer", "minimum": -1},
                "forwardingTimeouts": {"type": "object"},
                "disableHTTP2": {"type": "boolean"},
                "peerCertURI": {"type": "string"},
                "spiffe": {"type": "object"},
                "cipherSuites": {"type": "array", "items": {"type": "string"}},
                "minVersion": {"type": "string"},
                "maxVersion": {"type": "string"},
            },
        },
    },
}


def container(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(rendered: Rendered) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(rendered)["env"]}


def server_name(rendered: Rendered) -> str:
    return rendered.values["backendTls"]["serverName"] or (
        f"{rendered.one('Service')['metadata']['name']}.{NAMESPACE}.svc"
    )


# -- the pod ---------------------------------------------------------------------------------------


def test_the_pod_mounts_its_certificate_and_the_client_ca_from_secrets(rendered: Rendered) -> None:
    tls = rendered.values["backendTls"]
    spec = rendered.one("Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "backend-tls"]
    sources = volume["projected"]["sources"]
    files = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in sources
        for item in source["secret"]["items"]
    }
    assert files == {
        "tls.crt": (tls["secretName"], "tls.crt"),
        "tls.key": (tls["secretName"], "tls.key"),
        # The CA's certificate only: the CA's key is never asked for.
        "client-ca.crt": (tls["clientCaSecretName"], "ca.crt"),
    }
    assert volume["projected"]["defaultMode"] == 0o440
    [mount] = [m for m in container(rendered)["volumeMounts"] if m["name"] == "backend-tls"]
    assert mount["readOnly"] is True and mount["mountPath"] == tls["mountPath"]
    variables = env(rendered)
    assert variables["BREAKGLASS_TLS_CERT_FILE"] == f"{tls['mountPath']}/tls.crt"
    assert variables["BREAKGLASS_TLS_KEY_FILE"] == f"{tls['mountPath']}/tls.key"
    assert variables["BREAKGLASS_CLIENT_CA_FILE"] == f"{tls['mountPath']}/client-ca.crt"
    assert variables["BREAKGLASS_PUBLIC_URL"].startswith("https://")


def test_the_ingress_client_key_never_enters_the_pod(rendered: Rendered) -> None:
    client = rendered.values["backendTls"]["ingressClientSecretName"]
    spec = rendered.one("Deployment")["spec"]["template"]["spec"]
    used = set()
    for volume in spec["volumes"]:
        if "secret" in volume:
            used.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                used.add(source["secret"]["name"])
    for item in container(rendered)["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            used.add(ref["name"])
    assert used and client not in used, used


def test_no_secret_is_rendered_and_no_key_or_certificate_is_in_values(rendered: Rendered) -> None:
    assert rendered.all("Secret") == []
    assert "-----BEGIN" not in rendered.manifests_text()
    for path in (CHART_DIR / "values.yaml", PRODUCTION_VALUES):
        assert "-----BEGIN" not in path.read_text(), path


@pytest.mark.parametrize("field", ["secretName", "clientCaSecretName", "ingressClientSecretName"])
def test_the_values_take_secret_names_never_pem(field: str) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    with pytest.raises(helm.HelmValuesError):
        render({"backendTls": {field: pem}})


# -- Traefik ---------------------------------------------------------------------------------------


def test_traefik_presents_the_client_certificate_through_a_servers_transport(
    rendered: Rendered,
) -> None:
    tls = rendered.values["backendTls"]
    transport = rendered.one("ServersTransport")
    jsonschema.validate(transport, SERVERS_TRANSPORT)
    spec = transport["spec"]
    assert spec["certificatesSecrets"] == [tls["ingressClientSecretName"]]
    assert spec["rootCAs"] == [{"secret": tls["ingressClientSecretName"]}]
    assert spec["serverName"] == server_name(rendered)
    assert spec["insecureSkipVerify"] is False
    # The Service tells Traefik's Ingress provider to use it, over HTTPS.
    service = rendered.one("Service")
    annotations = service["metadata"]["annotations"]
    assert annotations[TRAEFIK_SERVICE + "serversscheme"] == "https"
    ref = f"{transport['metadata']['namespace']}-{transport['metadata']['name']}@kubernetescrd"
    assert annotations[TRAEFIK_SERVICE + "serverstransport"] == ref
    assert transport["metadata"]["namespace"] == service["metadata"]["namespace"]


def test_both_traefik_routes_reach_the_pod_through_that_transport() -> None:
    for fallback in (False, True):
        rendered = render({"ingress": {"fallback": {"enabled": fallback}}})
        [ingress] = rendered.all("Ingress")
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        service = rendered.one("Service")
        assert backend == {"name": service["metadata"]["name"], "port": {"name": "https"}}
        https = next(p for p in service["spec"]["ports"] if p["name"] == "https")
        assert https["targetPort"] == "https"
        assert TRAEFIK_SERVICE + "serverstransport" in service["metadata"]["annotations"]
        rendered.one("ServersTransport")


def test_the_server_name_can_be_set() -> None:
    rendered = render({"backendTls": {"serverName": "console.breakglass.internal"}})
    assert rendered.one("ServersTransport")["spec"]["serverName"] == "console.breakglass.internal"


# -- ingress-nginx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True], ids=["sso", "basic-auth-fallback"])
def test_nginx_speaks_https_to_the_pod_with_the_client_certificate(fallback: bool) -> None:
    rendered = render({"ingress": {"className": "nginx", "fallback": {"enabled": fallback}}})
    [ingress] = rendered.all("Ingress")
    annotations = ingress["metadata"]["annotations"]
    client = rendered.values["backendTls"]["ingressClientSecretName"]
    assert annotations[NGINX + "backend-protocol"] == "HTTPS"
    assert annotations[NGINX + "proxy-ssl-secret"] == f"{NAMESPACE}/{client}"
    assert annotations[NGINX + "proxy-ssl-verify"] == "on"
    assert annotations[NGINX + "proxy-ssl-name"] == server_name(rendered)
    assert annotations[NGINX + "proxy-ssl-server-name"] == "on"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"] == {"name": "https"}
    # No Traefik object or annotation on this controller.
    assert rendered.all("ServersTransport") == []
    assert "annotations" not in rendered.one("Service")["metadata"]
    assert not [a for a in annotations if "snippet" in a]


def test_nginx_renders_pass_kubernetes_validate(tmp_path: Path) -> None:
    paths = []
    for name, values in (
        ("nginx", {"ingress": {"className": "nginx"}}),
        ("nginx-fallback", {"ingress": {"className": "nginx", "fallback": {"enabled": True}}}),
        ("production-nginx", {**production_values(), "ingress": {"className": "nginx"}}),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(render(values).manifests_text())
        paths.append(str(path))
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run(
            [str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", version, "--no-warn", *paths],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(re.findall(r"passed for resource ingress/", result.stdout)) == 3


# -- the health port and the NetworkPolicy ---------------------------------------------------------


def test_the_health_port_is_never_the_console_port() -> None:
    with pytest.raises(helm.HelmRenderError, match="healthPort"):
        render({"server": {"port": 8443, "healthPort": 8443}})


def test_prometheus_may_be_admitted_to_the_health_port_only() -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    rendered = render({"networkPolicy": {"healthFrom": [monitoring]}})
    policy = next(
        p for p in rendered.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test")
    )
    rules = [r for r in policy["spec"]["ingress"] if monitoring in r["from"]]
    assert [r["ports"] for r in rules] == [
        [{"protocol": "TCP", "port": rendered.values["server"]["healthPort"]}]
    ]


def test_dropping_the_network_policy_is_refused_saying_what_it_gives_up() -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        render({"networkPolicy": {"enabled": False}})
    text = str(err.value)
    assert "networkPolicy.acceptUnprotectedIngress=true" in text
    assert "every pod in the cluster" in text
    assert "client certificate becomes the only wall" in text
    assert "nothing limits where the pod itself connects" in text


def test_dropping_it_renders_when_the_loss_is_accepted() -> None:
    rendered = render({"networkPolicy": {"enabled": False, "acceptUnprotectedIngress": True}})
    assert rendered.all("NetworkPolicy") == []
    rendered.one("Deployment")  # the rest renders as before


def test_production_example_keeps_the_network_policy_and_tls() -> None:
    values = production_values()
    assert values["networkPolicy"]["enabled"] is True
    assert not values["networkPolicy"].get("acceptUnprotectedIngress", False)
    rendered = render(values)
    assert rendered.one("ServersTransport")
    assert env(rendered)["BREAKGLASS_CLIENT_CA_FILE"].endswith("/client-ca.crt")
