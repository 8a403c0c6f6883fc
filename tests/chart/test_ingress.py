"""The Ingress: host and TLS, the auth proxy's annotations for Traefik or ingress-nginx, long
websocket timeouts, CrowdSec and rate limit, and the basic-auth fallback on its own Ingress."""

from __future__ import annotations

from tests.chart.conftest import Rendered, render


def the_ingress(rendered: Rendered) -> dict:
    return rendered.one("Ingress")


def test_ingress_has_host_and_tls_and_routes_to_the_service(rendered: Rendered) -> None:
    ingress = the_ingress(rendered)
    host = rendered.values["ingress"]["host"]
    [tls] = ingress["spec"]["tls"]
    assert tls["hosts"] == [host]
    assert tls["secretName"] == rendered.values["ingress"]["tlsSecretName"]
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == host
    [path] = rule["http"]["paths"]
    service = rendered.one("Service")["metadata"]["name"]
    assert path["backend"]["service"] == {"name": service, "port": {"name": "https"}}


def test_public_url_defaults_to_the_ingress_host(default_render: Rendered) -> None:
    env = {
        e["name"]: e.get("value")
        for e in default_render.one("Deployment")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert env["BREAKGLASS_PUBLIC_URL"] == f"https://{default_render.values['ingress']['host']}"


def test_traefik_chains_forward_auth_then_crowdsec_then_rate_limit(rendered: Rendered) -> None:
    annotations = the_ingress(rendered)["metadata"]["annotations"]
    chain = annotations["traefik.ingress.kubernetes.io/router.middlewares"].split(",")
    assert "forward-auth" in chain[0]
    assert any("crowdsec" in m for m in chain)
    assert any("rate-limit" in m for m in chain)
    assert annotations["traefik.ingress.kubernetes.io/router.tls"] == "true"
    entrypoints = rendered.values["ingress"]["traefik"]["entrypoints"]
    assert annotations["traefik.ingress.kubernetes.io/router.entrypoints"] == entrypoints


def test_nginx_auth_url_signin_identity_header_and_long_websocket_timeouts() -> None:
    rendered = render({"ingress": {"className": "nginx"}})
    annotations = the_ingress(rendered)["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "auth-url"].startswith("http")
    assert annotations[prefix + "auth-signin"].startswith("https://")
    headers = annotations[prefix + "auth-response-headers"].split(",")
    assert rendered.values["server"]["identityHeader"] in headers
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert int(annotations[prefix + "limit-rps"]) > 0
    assert not [a for a in annotations if a.startswith("traefik.")]
    # Snippets are how annotations turn into arbitrary nginx config: none here.
    assert not [a for a in annotations if "snippet" in a]


def test_basic_auth_fallback_is_its_own_ingress_and_replaces_the_sso_route() -> None:
    rendered = render({"ingress": {"fallback": {"enabled": True}}})
    [ingress] = rendered.all("Ingress")
    assert ingress["metadata"]["name"].endswith("-fallback")
    assert ingress["metadata"]["labels"]["breakglass/route"] == "basic-auth-fallback"
    chain = ingress["metadata"]["annotations"]["traefik.ingress.kubernetes.io/router.middlewares"]
    assert "basic-auth" in chain.split(",")[0]
    assert "forward-auth" not in chain
    assert "BASIC-AUTH FALLBACK" in rendered.notes


def test_basic_auth_fallback_on_nginx_uses_an_htpasswd_secret() -> None:
    rendered = render({"ingress": {"className": "nginx", "fallback": {"enabled": True}}})
    annotations = rendered.one("Ingress")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "auth-type"] == "basic"
    assert annotations[prefix + "auth-secret"] == "breakglass-basic-auth"
    assert prefix + "auth-url" not in annotations


def test_notes_name_the_page_and_the_cold_path(rendered: Rendered) -> None:
    assert rendered.values["ingress"]["host"] in rendered.notes
    assert "cold path" in rendered.notes
    assert "docs/runbook.md" in rendered.notes
