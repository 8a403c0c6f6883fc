"""The container image, built here from the Containerfile and run as the Helm chart runs it.

The base is made locally from Debian's packages (no registry is reachable: tests/image/images.py).
The container then runs with exactly what the chart's rendered Deployment says: its user and
group, a read-only root, every capability dropped, no privilege escalation, writable mounts only
where the chart mounts emptyDirs, at their size limits, the console port's TLS files where the
chart mounts its Secrets (a CA, the console's certificate and the ingress's client certificate
made here with ``cryptography``, as docs/install.md step 6 makes them) — plus the chart's
environment. So the console port speaks TLS and wants the ingress's client certificate, and the
probes' plain health port answers /healthz and /readyz. The departures, each because of this
machine, not the chart: podman's ``--network host`` with the server on loopback (its two ports
picked free), rlimits this host allows, and ``breakglass-serve --lab`` instead of Vault and real
targets (the lab also keeps a fallback operator). No Kubernetes API server can run here (Debian has
no kubelet; no registry for kind/k3s images), so the chart's own objects are checked by rendering
them (tests/chart/).

Figures (build time, image size, first frame, stop on SIGTERM) are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import ssl
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
from tests.support.certs import SERVER_NAME, Pki, make_pki
from tests.support.realparts import free_port
from tests.support.waiting import until_sync

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
    tls_mount: str  # where the console's certificate, key and the client CA are mounted
    tls_files: dict[str, str]  # file name in that directory -> the Secret key it holds


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
    [tls_volume] = [v for v in pod["volumes"] if v["name"] == "backend-tls"]
    [tls_mount] = [m for m in container["volumeMounts"] if m["name"] == "backend-tls"]
    tls_files = {
        item["path"]: item["key"]
        for source in tls_volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    return PodSpec(
        user=context["runAsUser"],
        group=context["runAsGroup"],
        read_only_root=context["readOnlyRootFilesystem"],
        capabilities_dropped=context["capabilities"]["drop"],
        no_privilege_escalation=context["allowPrivilegeEscalation"] is False,
        scratch=scratch,
        env=env,
        public_url=env["BREAKGLASS_PUBLIC_URL"],
        tls_mount=tls_mount["mountPath"],
        tls_files=tls_files,
    )


def tmpfs_size(limit: str) -> str:
    """A Kubernetes quantity (64Mi, 1Gi) as a tmpfs size (64m, 1g)."""
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi)?", limit)
    assert match, f"unexpected sizeLimit {limit!r}"
    return match.group(1) + {"Ki": "k", "Mi": "m", "Gi": "g", None: ""}[match.group(2)]


@dataclass
class Running:
    name: str
    port: int  # the console: TLS, the ingress's client certificate required
    health_port: int  # /healthz and /readyz in plain HTTP
    spec: PodSpec
    started: float
    pki: Pki
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ingress_context(self, client: Any = "ingress") -> ssl.SSLContext:
        """TLS as the ingress controller connects: verifying the console's certificate against
        the serving CA, presenting the ingress's client certificate (``None``: none)."""
        if client == "ingress":
            client = self.pki.ingress
        return self.pki.client_context(client)

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
        """GET on the console port as the ingress would: TLS with its client certificate."""
        return self._get(self.base + path, headers, self.ingress_context())

    def health(self, path: str) -> tuple[int, dict, bytes]:
        """GET on the plain health port, as the kubelet's probes do."""
        return self._get(f"http://127.0.0.1:{self.health_port}{path}", None, None)

    def _get(
        self, url: str, headers: dict[str, str] | None, context: ssl.SSLContext | None
    ) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        if context is not None:
            # The console's certificate names the Service, not 127.0.0.1: check that name.
            context.check_hostname = False
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def diagnostics(self) -> str:
        return f"stdout:\n{self.stdout()[-3000:]}\nstderr:\n{self.stderr()[-3000:]}"


def tls_secrets(spec: PodSpec, pki: Pki, directory: Path) -> Path:
    """The directory the chart's backend-tls volume makes: the console's certificate and key and
    the client CA's certificate, under the names the chart gives them."""
    source = {"tls.crt": pki.server.cert, "tls.key": pki.server.key, "ca.crt": pki.client_ca}
    directory.mkdir()
    for name, key in spec.tls_files.items():
        target = directory / name
        shutil.copyfile(source[key], target)
        target.chmod(0o444)  # the chart's 0440 with fsGroup: readable by the pod's user
    return directory


@pytest.fixture(scope="module")
def container(image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    spec = chart_pod_spec()
    port, health_port = free_port(), free_port()
    name = f"breakglass-image-test-{port}"
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    secrets = tls_secrets(spec, pki, tmp_path_factory.mktemp("secrets") / "backend-tls")
    env = dict(spec.env)
    # --network host shares this machine's network: the server listens on loopback only.
    env.update(
        BREAKGLASS_SERVE_HOST="127.0.0.1",
        BREAKGLASS_SERVE_PORT=str(port),
        BREAKGLASS_HEALTH_PORT=str(health_port),
    )
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
    # The chart's Secret volume: read-only, at its mount path.
    argv += ["--volume", f"{secrets}:{spec.tls_mount}:ro"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    # By id, not by tag: another checkout's build may retag the image meanwhile.
    argv += [image.image_id, "--lab"]
    subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60, check=False)
    started = time.monotonic()
    subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    running = Running(name, port, health_port, spec, started, pki)
    try:

        def ready() -> bool:
            with contextlib.suppress(OSError):
                return running.health("/readyz")[0] == 200
            return False

        started = time.monotonic()
        until_sync(
            ready,
            what="the container to answer /readyz with 200",
            timeout_s=90,
            interval_s=0.1,
            diagnostics=running.diagnostics,
        )
        seconds = time.monotonic() - started
        FIGURES["start to ready"] = f"{seconds:.1f} s"
        yield running
    finally:
        subprocess.run(
            ["podman", "rm", "-f", "-t", "5", name], capture_output=True, timeout=120, check=False
        )


# -- the image -----------------------------------------------------------------------------------


def test_the_image_carries_its_oci_labels(image: BuiltImage) -> None:
    found = labels(image.image_id)
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
    for path, content in exported_files(image.image_id):
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


def test_readyz_answers_on_the_plain_health_port(container: Running) -> None:
    status, _, body = container.health("/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "keys_loaded": True}
    status, _, body = container.health("/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    # The health port serves no page; the console port no health route.
    assert container.health("/")[0] == 404
    assert container.get("/readyz")[0] == 404


def test_the_console_port_wants_the_ingress_certificate(container: Running) -> None:
    """As the chart runs it, the console port refuses a connection without the ingress's
    client certificate, or with another CA's, in the TLS handshake: no HTTP at all."""
    for client in (None, container.pki.stranger):
        context = container.ingress_context(client)
        context.check_hostname = False
        refused = (ssl.SSLError, urllib.error.URLError, ConnectionError)
        with (
            pytest.raises(refused),
            urllib.request.urlopen(container.base + "/", timeout=10, context=context) as answer,  # noqa: S310
        ):
            answer.read()
    listening = next(r for r in container.records() if r.get("message") == "listening")
    assert listening["client_certificate"] == "required"


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
            f"wss://127.0.0.1:{container.port}/ws?width=120&height=36",
            headers=headers,
            ssl=container.ingress_context(),
            server_hostname=SERVER_NAME,
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
    until_sync(
        lambda: any(
            r.get("message") == "websocket refused: foreign origin" for r in container.records()
        ),
        what="the refusal in the log",
        timeout_s=30,
        interval_s=0.1,
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
