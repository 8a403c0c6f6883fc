"""Certificates for the console port's TLS tests, made with ``cryptography`` in a directory: a CA
for the ingress controller's client certificate, a CA for the console's server certificate, and
the certificates they sign — as an operator makes them (docs/install.md, step 6)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The name the ingress controller checks in the console's certificate (the chart's
# serverTls.serverName default for release "breakglass" in namespace "claude-breakglass").
SERVER_NAME = "breakglass.claude-breakglass.svc"


@dataclass(frozen=True)
class Issued:
    """A certificate and its key as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Everything the console's TLS needs, in one directory."""

    directory: Path
    server_ca: Path  # the CA certificate the ingress verifies the console with
    client_ca: Path  # the CA certificate the console verifies the ingress with
    server: Issued  # the console's own certificate (tls.crt / tls.key)
    ingress: Issued  # the ingress controller's client certificate
    stranger: Issued  # a client certificate from another CA: must be refused
    client_ca_key: Path  # (only to show that a CA file holding a key is refused)

    def client_context(self, client: Issued | None) -> ssl.SSLContext:
        """An ssl context as the ingress controller has it: trusting the server CA, presenting
        ``client`` (or no certificate)."""
        context = ssl.create_default_context(cafile=str(self.server_ca))
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str, days: int = 30) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName] | None = None,
    days: int = 30,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path, *, server_days: int = 30) -> Pki:
    """A server CA and the console's certificate (for SERVER_NAME, localhost and 127.0.0.1), a
    client CA and the ingress's client certificate, and a stranger's client certificate from a
    CA of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    server_ca = _ca("breakglass serving CA")
    client_ca = _ca("breakglass ingress client CA")
    stranger_ca = _ca("some other CA")
    server = _leaf(
        SERVER_NAME,
        server_ca,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        names=[
            x509.DNSName(SERVER_NAME),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
        days=server_days,
    )
    ingress = _leaf("ingress-controller", client_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _leaf("ingress-controller", stranger_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    def issued(name: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Issued:
        return Issued(
            _write_cert(pair[0], directory / f"{name}.crt"),
            _write_key(pair[1], directory / f"{name}.key"),
        )

    return Pki(
        directory=directory,
        server_ca=_write_cert(server_ca[0], directory / "server-ca.crt"),
        client_ca=_write_cert(client_ca[0], directory / "client-ca.crt"),
        server=issued("server", server),
        ingress=issued("ingress", ingress),
        stranger=issued("stranger", stranger),
        client_ca_key=_write_key(client_ca[1], directory / "client-ca.key"),
    )
