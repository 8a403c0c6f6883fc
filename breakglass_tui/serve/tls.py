"""The console port's TLS: only the ingress controller may talk to the app.

breakglass-serve presents its own server certificate and **requires** a client certificate that
chains to one CA, a CA that signs nothing but the ingress controller's client certificate
(docs/install.md, step 6). A connection without it, or with a certificate from any other CA (a
public one included: the system's CAs are never trusted here), fails in the TLS handshake, before
any HTTP request is read and long before an app process could start. So the identity header can be
trusted: only the auth proxy, holding that client certificate, can set it — whatever else on the
pod's node or in the cluster reaches the pod's address.

The files come from Kubernetes Secrets mounted into the pod (never from values). Each problem is a
:class:`TlsConfigError` naming the variable and the next step; no file's content is ever echoed.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

# A server certificate this close to its end is reported at start (and in the log).
EXPIRY_WARNING = datetime.timedelta(days=14)


class TlsConfigError(Exception):
    """The console's TLS files are missing or wrong. The message names the variable."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the console's TLS material is mounted."""

    cert_file: Path  # BREAKGLASS_TLS_CERT_FILE: the server certificate chain (PEM)
    key_file: Path  # BREAKGLASS_TLS_KEY_FILE: its private key (PEM)
    client_ca_file: Path  # BREAKGLASS_CLIENT_CA_FILE: the ingress client CA's certificate (PEM)


@dataclass(frozen=True)
class TlsSummary:
    """What the server logs at start about its TLS (nothing secret)."""

    server_subject: str
    server_not_after: datetime.datetime
    client_cas: tuple[str, ...]
    warnings: tuple[str, ...]


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(
            f"{variable} names {path}, which does not exist: mount the Secret there (the chart's"
            " serverTls values) or fix the path"
        ) from None
    except OSError as exc:
        raise TlsConfigError(
            f"{variable} names {path}, which cannot be read ({exc.strerror}): check the Secret"
            " volume's mode and the pod's user"
        ) from None


def _certificates(data: bytes, path: Path, variable: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsConfigError(
            f"{variable} ({path}) holds no PEM certificate: it must be {what}"
            " (-----BEGIN CERTIFICATE-----)"
        )
    return certs


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def check_files(files: TlsFiles, *, now: datetime.datetime | None = None) -> TlsSummary:
    """Read and check the three files; raise :class:`TlsConfigError` saying what is wrong."""
    now = now or datetime.datetime.now(datetime.UTC)
    cert_pem = _read(files.cert_file, "BREAKGLASS_TLS_CERT_FILE")
    _read(files.key_file, "BREAKGLASS_TLS_KEY_FILE")
    ca_pem = _read(files.client_ca_file, "BREAKGLASS_CLIENT_CA_FILE")
    server = _certificates(
        cert_pem, files.cert_file, "BREAKGLASS_TLS_CERT_FILE", "the console's server certificate"
    )[0]
    if b"PRIVATE KEY" in ca_pem:
        raise TlsConfigError(
            f"BREAKGLASS_CLIENT_CA_FILE ({files.client_ca_file}) holds a private key: mount only"
            " the CA's certificate (ca.crt). The CA's key must never be in the pod: with it,"
            " anything in the pod could mint the ingress's client certificate"
        )
    cas = _certificates(
        ca_pem,
        files.client_ca_file,
        "BREAKGLASS_CLIENT_CA_FILE",
        "the certificate of the CA that signed the ingress controller's client certificate",
    )
    for ca in cas:
        try:
            is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise TlsConfigError(
                f"BREAKGLASS_CLIENT_CA_FILE ({files.client_ca_file}) holds a certificate that is"
                f" not a CA ({_name(ca)}): it must be the certificate of the CA that signed the"
                " ingress controller's client certificate, not the client certificate itself"
            )
    warnings = []
    not_after = server.not_valid_after_utc
    if not_after <= now:
        warnings.append(
            f"the console's server certificate ({_name(server)}) expired on"
            f" {not_after:%Y-%m-%d}: the ingress will refuse it; renew the Secret and restart"
        )
    elif not_after - now < EXPIRY_WARNING:
        warnings.append(
            f"the console's server certificate ({_name(server)}) expires on"
            f" {not_after:%Y-%m-%d}: renew the Secret and restart the pod before then"
        )
    try:
        usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            warnings.append(
                "the console's server certificate does not allow serverAuth (extended key"
                " usage): the ingress controller will refuse it"
            )
    except x509.ExtensionNotFound:
        pass
    return TlsSummary(_name(server), not_after, tuple(_name(ca) for ca in cas), tuple(warnings))


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The console port's TLS context: our certificate, and a client certificate required that
    chains to the client CA — and to nothing else (no system CAs)."""
    check_files(files)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except ssl.SSLError:
        raise TlsConfigError(
            f"BREAKGLASS_TLS_KEY_FILE ({files.key_file}) is not an unencrypted PEM private key"
            f" for the certificate in BREAKGLASS_TLS_CERT_FILE ({files.cert_file}): mount the"
            " tls.key of the same Secret as its tls.crt"
        ) from None
    try:
        context.load_verify_locations(cafile=files.client_ca_file)
    except ssl.SSLError:
        raise TlsConfigError(
            f"BREAKGLASS_CLIENT_CA_FILE ({files.client_ca_file}) could not be loaded as CA"
            " certificates: mount the ingress client CA's ca.crt"
        ) from None
    # Required, not optional: no client certificate from that CA, no TLS connection at all.
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_name(transport: object) -> str | None:
    """The subject of the client certificate a connection presented (for the log), if any."""
    get = getattr(transport, "get_extra_info", None)
    cert = get("peercert") if get is not None else None
    if not cert:
        return None
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ",".join(parts)[:200] or None
