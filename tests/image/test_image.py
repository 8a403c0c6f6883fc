"""The container image, built here from the Containerfile and run as the Helm chart runs it.

The base is made locally from Debian's packages (no registry is reachable: tests/image/images.py).
The container then runs with exactly what the chart's rendered Deployment says: its user and
group, a read-only root, every capability dropped, no privilege escalation, and writable mounts
only where the chart mounts emptyDirs, at their size limits — plus the chart's environment. The
departures, each because of this machine, not the chart: podman's ``--network host`` with the
server on loopback, rlimits this host allows, and ``breakglass-serve --lab`` instead of Vault and
real targets. No Kubernetes API server can run here (Debian has no kubelet; no registry for
kind/k3s images), so the chart's own objects are checked by rendering them (tests/chart/).

Figures (build time, image size, first frame, stop on SIGTERM) are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.image.images import (
    CA_BUNDLE,
    FIGURES,
    REPO,
    BuiltImage,
    build_image,
    exported_files,
    labels,
)
from tests.support.realparts import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# The public URL the chart's values give (https://<ingress.host>): the browser's Origin.
RLIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
# CSI, OSC and charset sequences: what is left is the text the terminal would show.
ESCAPES = re.compile(
    rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]"  # CSI
    rb"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC
    rb"|\x1b[()][0-9A-Za-z]|\x1b[=>78]"
)


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    built = build_image(project_version())
    FIGURES["base image"] = (
        f"made in {built.base_seconds:.0f} s" if built.base_seconds else "from the cache"
    )
    FIGURES["image build"] = f"{built.build_seconds:.1f} s"
    FIGURES["image size"] = f"{built.size_bytes / 1e6:.0f} MB"
    return built


# -- how the chart runs it ------------------------------------------------------------------------


@dataclass(frozen=True)
class PodSpec:
    """What the rendered Deployment says about running the one container."""

    user: int
    group: int
    read_only_root: bool
    capabilities_dropped: list[str]
    no_privilege_escalation: bool
    scratch: dict[str, str]  # emptyDir mount path -> size limit
    env: dict[str, str]  # plain values only (the API key comes from a Secret)
    public_url: str


def chart_pod_spec() -> PodSpec:
    from tests.chart.conftest import render

    deployment = render().one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    context = container["securityContext"]
    empty_dirs = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
    scratch = {
        m["mountPath"]: empty_dirs[m["name"]].get("sizeLimit", "64Mi")
        for m in container["volumeMounts"]
        if m["name"] in empty_dirs
    }
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return PodSpec(
        user=context["runAsUser"],
        group=context["runAsGroup"],
        read_only_root=context["readOnlyRootFilesystem"],
        capabilities_dropped=context["capabilities"]["drop"],
        no_privilege_escalation=context["allowPrivilegeEscalation"] is False,
        scratch=scratch,
        env=env,
        public_url=env["BREAKGLASS_PUBLIC_URL"],
    )


def tmpfs_size(limit: str) -> str:
    """A Kubernetes quantity (64Mi, 1Gi) as a tmpfs size (64m, 1g)."""
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi)?", limit)
    assert match, f"unexpected sizeLimit {limit!r}"
    return match.group(1) + {"Ki": "k", "Mi": "m", "Gi": "g", None: ""}[match.group(2)]


@dataclass
class Running:
    name: str
    port: int
    spec: PodSpec
    started: float
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        result = subprocess.run(
            ["podman", "logs", self.name], capture_output=True, text=True, timeout=60, check=False
        )
        return result.stdout

    def stderr(self) -> str:
        result = subprocess.run(
            ["podman", "logs", self.name], capture_output=True, text=True, timeout=60, check=False
        )
        return result.stderr

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.base + path, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def diagnostics(self) -> str:
        return f"stdout:\n{self.stdout()[-3000:]}\nstderr:\n{self.stderr()[-3000:]}"


def wait_until(predicate: Any, timeout: float, what: str, diagnostics: Any = None) -> float:
    """Poll until predicate() is true; return the seconds it took. Fails naming ``what``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise AssertionError(f"{what}: not within {timeout:.0f} s{extra}")
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def container(image: BuiltImage) -> Iterator[Running]:
    spec = chart_pod_spec()
    port = free_port()
    name = f"breakglass-image-test-{port}"
    env = dict(spec.env)
    # --network host shares this machine's network: the server listens on loopback only.
    env.update(BREAKGLASS_SERVE_HOST="127.0.0.1", BREAKGLASS_SERVE_PORT=str(port))
    argv = [
        *("podman", "--runtime", "runc", "run", "--detach", "--name", name),
        *("--user", f"{spec.user}:{spec.group}"),
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--read-only-tmpfs=false",  # podman's own /tmp, /run and /var/tmp: the chart has none
        *RLIMITS,
        "--network=host",
    ]
    assert spec.read_only_root and spec.capabilities_dropped == ["ALL"]
    assert spec.no_privilege_escalation
    for path, limit in spec.scratch.items():
        # U: owned by the pod's user, as fsGroup makes an emptyDir writable for it.
        argv += ["--tmpfs", f"{path}:rw,nosuid,nodev,size={tmpfs_size(limit)},mode=0777,U"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    argv += [image.reference, "--lab"]
    subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60, check=False)
    started = time.monotonic()
    subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    running = Running(name, port, spec, started)
    try:

        def ready() -> bool:
            with contextlib.suppress(OSError):
                return running.get("/readyz")[0] == 200
            return False

        seconds = wait_until(
            ready, 90, "the container never answered /readyz with 200", running.diagnostics
        )
        FIGURES["start to ready"] = f"{seconds:.1f} s"
        yield running
    finally:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "5", name], capture_output=True, timeout=120, check=False
        )


# -- the image -----------------------------------------------------------------------------------


def test_the_image_carries_its_oci_labels(image: BuiltImage) -> None:
    found = labels(image.reference)
    assert found["org.opencontainers.image.version"] == project_version()
    assert found["org.opencontainers.image.revision"] == image.revision
    assert found["org.opencontainers.image.source"].startswith("https://")
    # Built on the base named by digest, as the Containerfile's BASE_IMAGE pins it.
    assert re.search(r"@sha256:[0-9a-f]{64}$", found["org.opencontainers.image.base.name"])


def pem_bodies(bundle: str) -> set[str]:
    """Each certificate of a PEM bundle as its base64 body on one line."""
    return {
        "".join(block.split("-----")[2].split())
        for block in re.findall(
            r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", bundle, flags=re.S
        )
    }


def test_the_build_secret_ca_is_nowhere_in_the_image(image: BuiltImage) -> None:
    """The build used this machine's CA bundle (a TLS-inspecting proxy's CA among them) as a
    secret; no certificate of it that Debian does not ship, nor the bundle itself, is in the
    image."""
    if not CA_BUNDLE.is_file():
        pytest.skip("this machine has no CA bundle: the build had no secret to leak")
    bundle = CA_BUNDLE.read_bytes()
    debian_ship = set()
    for path in Path("/usr/share/ca-certificates/mozilla").glob("*.crt"):
        debian_ship |= pem_bodies(path.read_text())
    local = pem_bodies(bundle.decode()) - debian_ship
    # A line of each local certificate's base64, as it would appear in a PEM file.
    needles = [body[64:128].encode() for body in local if len(body) > 128]
    leaks = []
    scanned = 0
    for path, content in exported_files(image.reference):
        scanned += 1
        if content == bundle or any(needle in content for needle in needles):
            leaks.append(path)
    assert scanned > 1000, "the export did not list the image's files"
    assert leaks == [], f"the build's CA bundle leaked into {leaks}"


# -- running as the chart runs it ----------------------------------------------------------------


def test_it_runs_as_the_chart_says_non_root_read_only_no_capabilities(
    container: Running,
) -> None:
    spec = container.spec
    ids = container.exec("sh", "-c", "id -u; id -g").stdout.split()
    assert ids == [str(spec.user), str(spec.group)]
    status = container.exec("cat", "/proc/1/status").stdout
    for line in ("CapEff:\t0000000000000000", "CapPrm:\t0000000000000000", "NoNewPrivs:\t1"):
        assert line in status, line
    # The root is read-only; each of the chart's emptyDirs is writable.
    for path in ("/opt/breakglass", "/etc", "/"):
        result = container.exec("sh", "-c", f"touch {path}/probe-write")
        assert result.returncode != 0 and "Read-only file system" in result.stderr, path
    for path in spec.scratch:
        result = container.exec("sh", "-c", f"touch {path}/probe-write && rm {path}/probe-write")
        assert result.returncode == 0, f"{path}: {result.stderr}"


def test_readyz_answers(container: Running) -> None:
    status, _, body = container.get("/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "keys_loaded": True}
    status, _, body = container.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"


def test_the_page_and_its_content_security_policy(container: Running) -> None:
    status, headers, body = container.get("/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    host = container.spec.public_url.split("://", 1)[1]
    assert "default-src 'none'" in csp
    assert f"connect-src 'self' wss://{host}" in csp
    assert "frame-ancestors 'none'" in csp
    page = body.decode()
    assert f"wss://{host}/ws" in page
    assert "fonts.googleapis.com" not in page


OPERATOR = "image-test-operator"


async def open_socket(container: Running, origin: str) -> Any:
    """A websocket to /ws as the ingress would pass it: the browser's Origin, and the identity
    header the auth proxy sets."""
    import aiohttp

    headers = {"Origin": origin, container.spec.env["BREAKGLASS_IDENTITY_HEADER"]: OPERATOR}
    session = aiohttp.ClientSession()
    try:
        socket = await session.ws_connect(
            f"ws://127.0.0.1:{container.port}/ws?width=120&height=36", headers=headers
        )
    except BaseException:
        await session.close()
        raise
    return session, socket


def test_a_foreign_origin_websocket_is_refused(container: Running) -> None:
    import aiohttp

    async def attempt() -> int:
        try:
            session, socket = await open_socket(container, "https://evil.example")
        except aiohttp.WSServerHandshakeError as err:
            return err.status
        await socket.close()
        await session.close()
        return 101

    assert asyncio.run(attempt()) == 403
    wait_until(
        lambda: any(
            r.get("message") == "websocket refused: foreign origin" for r in container.records()
        ),
        30,
        "the refusal was not logged",
    )


def screen_text(raw: bytes) -> str:
    return ESCAPES.sub(b"", raw).decode("utf-8", "replace")


def test_a_same_origin_websocket_gets_the_first_frame_and_audit_lines_reach_stdout(
    container: Running,
) -> None:
    """The browser's Origin is the public URL (the ingress passes it through). The app's first
    frame comes (whatever the lab can run in the image, the console draws itself), and the app's
    audit records reach the server's stdout for the cluster's log pipeline."""
    import aiohttp

    async def first_frame() -> tuple[str, float]:
        started = time.monotonic()
        session, socket = await open_socket(container, container.spec.public_url)
        try:
            raw = b""
            while "Live output" not in screen_text(raw):
                message = await asyncio.wait_for(socket.receive(), 60)
                if message.type == aiohttp.WSMsgType.BINARY:
                    raw += message.data
                elif message.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"socket ended before a frame: {message.type}")
            seconds = time.monotonic() - started

            def audited() -> bool:
                return any(
                    r.get("log") == "audit" and r["record"].get("kind") == "session_start"
                    for r in container.records()
                )

            # Keep the tab open until the app has written its first audit record.
            deadline = time.monotonic() + 60
            while not audited() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(socket.receive(), 0.5)
            return screen_text(raw), seconds
        finally:
            await socket.close()
            await session.close()

    text, seconds = asyncio.run(first_frame())
    FIGURES["websocket to first frame"] = f"{seconds:.2f} s"
    assert "Live output" in text and "devvm" in text
    audit = [r["record"] for r in container.records() if r.get("log") == "audit"]
    assert audit, f"no audit line reached stdout\n{container.diagnostics()}"
    [start] = [record for record in audit if record["kind"] == "session_start"]
    assert start["operator"] == OPERATOR, "the identity header did not reach the audit record"
    assert start["session_id"]
    # Every other stdout line is a structured log line as well (the log pipeline parses them).
    not_json = []
    for line in container.stdout().splitlines():
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], "stdout has lines that are not JSON"


def test_sigterm_stops_it_promptly(container: Running) -> None:
    """Last: it stops the container. tini passes SIGTERM on; the server closes the tabs, the lab
    and the ssh-agent, and exits 0."""
    started = time.monotonic()
    subprocess.run(
        ["podman", "kill", "--signal", "TERM", container.name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    result = subprocess.run(
        ["podman", "wait", container.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    seconds = time.monotonic() - started
    FIGURES["SIGTERM to exit"] = f"{seconds:.2f} s (podman's own overhead included)"
    assert result.stdout.strip() == "0", container.diagnostics()
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    messages = [r.get("message") for r in container.records()]
    assert "breakglass-serve shutting down" in messages
