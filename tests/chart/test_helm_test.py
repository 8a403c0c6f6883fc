"""The chart's `helm test` hook: a pod that meets Pod Security "restricted", runs the release's
own image, is admitted by the NetworkPolicy, and asks /readyz through the Service. No Kubernetes
API server can run here, so the pod is checked as rendered and its script is run for real against
a local stand-in for the Service (the same HTTP answers breakglass-serve gives)."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.chart.conftest import Rendered, render


def the_test_pod(rendered: Rendered) -> dict[str, Any]:
    return rendered.one("Pod")


def assert_restricted(pod_spec: dict[str, Any]) -> None:
    """Pod Security Standards, "restricted" profile (Kubernetes docs), for every container."""
    pod = pod_spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True
    assert pod.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID")
    assert not pod_spec.get("hostIPC")
    for volume in pod_spec.get("volumes", []):
        assert set(volume) - {"name"} <= {
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        }, volume
    for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx.get("privileged") is not True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert not set(ctx["capabilities"].get("add", [])) - {"NET_BIND_SERVICE"}
        assert ctx.get("runAsUser", pod.get("runAsUser", 0)) != 0
        assert not any(p.get("hostPort") for p in container.get("ports", []))


def test_the_hook_is_a_test_and_cleans_up_after_itself(rendered: Rendered) -> None:
    annotations = the_test_pod(rendered)["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    assert the_test_pod(rendered)["spec"]["restartPolicy"] == "Never"


def test_the_pod_and_the_console_meet_pod_security_restricted(rendered: Rendered) -> None:
    assert_restricted(the_test_pod(rendered)["spec"])
    assert_restricted(rendered.one("Deployment")["spec"]["template"]["spec"])


def test_it_holds_no_token_runs_the_releases_image_and_is_not_behind_the_service(
    rendered: Rendered,
) -> None:
    spec = the_test_pod(rendered)["spec"]
    assert spec["automountServiceAccountToken"] is False
    [container] = spec["containers"]
    [app] = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == app["image"], "one image: nothing else to pull on the node"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    selector = rendered.one("Service")["spec"]["selector"]
    labels = the_test_pod(rendered)["metadata"]["labels"]
    assert not selector.items() <= labels.items(), "the Service must not route to the test pod"


def service_variables(rendered: Rendered) -> tuple[str, str]:
    """The variables Kubernetes gives every pod for the Service (enableServiceLinks)."""
    name = rendered.one("Service")["metadata"]["name"].upper().replace("-", "_")
    return f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT"


def test_it_asks_readyz_through_the_service(rendered: Rendered) -> None:
    spec = the_test_pod(rendered)["spec"]
    assert spec["enableServiceLinks"] is True
    script = spec["containers"][0]["command"][-1]
    host, port = service_variables(rendered)
    assert f'os.environ["{host}"]' in script and f'os.environ["{port}"]' in script
    assert "/readyz" in script


class ReadyzStandIn(BaseHTTPRequestHandler):
    """Answers /readyz as breakglass-serve does: 503 with the problem, then 200 when ready."""

    not_ready_answers = 2
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        ready = type(self).calls > type(self).not_ready_answers
        body = {"ready": ready, "keys_loaded": ready}
        if not ready:
            body["problem"] = "Vault refused the login for role breakglass (403)"
        payload = json.dumps(body).encode()
        self.send_response(200 if ready else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[tuple[ThreadingHTTPServer, type[ReadyzStandIn]]]:
    handler = type("Handler", (ReadyzStandIn,), {"calls": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def run_the_test_pod(rendered: Rendered, port: int) -> subprocess.CompletedProcess[str]:
    container = rendered.one("Pod")["spec"]["containers"][0]
    host_var, port_var = service_variables(rendered)
    return subprocess.run(
        container["command"],
        env={"PATH": "/usr/bin:/bin", host_var: "127.0.0.1", port_var: str(port)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_its_script_waits_for_ready_and_passes(
    service: tuple[ThreadingHTTPServer, type[ReadyzStandIn]],
) -> None:
    server, handler = service
    result = run_the_test_pod(render(), server.server_address[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ready:")
    assert handler.calls == 3, "it retried through the two not-ready answers"


@pytest.mark.slow
def test_its_script_fails_with_the_problem_when_never_ready(
    service: tuple[ThreadingHTTPServer, type[ReadyzStandIn]],
) -> None:
    server, handler = service
    handler.not_ready_answers = 10**6
    rendered = render({"helmTest": {"timeoutSeconds": 10}})
    result = run_the_test_pod(rendered, server.server_address[1])
    assert result.returncode == 1
    assert "not ready after 10 s" in result.stderr
    assert "Vault refused the login" in result.stderr
    assert "kubectl -n claude-breakglass logs deploy/breakglass" in result.stderr
