"""The service PKI: a local certificate authority and one certificate per workload (ADR 14).

Every process proves who it is with a certificate from the Parley CA whose URI SANs name its
workloads (`spiffe://parley.local/<workload>`); a peer's workloads are what the services authorize.
A certificate also carries a DNS SAN per workload (`<workload>.parley.local`), the name gRPC clients
verify the server against. One certificate may name several workloads when one process is all of them
(`parley up`'s services process is auth, chat, billing and analytics; `parley gateway` runs Envoy and
the edge server).

`ensure_pki` keeps a directory of them current: it creates what is missing, reissues what is near
its expiry, signed by another CA, or for other workloads, and keeps the rest. Files are written to a
temporary name and renamed into place, so readers (Envoy's watched directory, the servers'
reloading credentials) never see half a file. The directory is 0700 and every file 0600.

Layout of a directory: `ca.pem`, `ca-key.pem`, and per certificate `<name>.pem` and `<name>-key.pem`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.clock import utc_now

TRUST_DOMAIN: Final = "parley.local"
WORKLOAD_URI_PREFIX: Final = f"spiffe://{TRUST_DOMAIN}/"

# The workloads of a Parley deployment. `operator` is a person with grpcurl, never a process.
GATEWAY: Final = "gateway"
EDGE: Final = "edge"
OPERATOR: Final = "operator"
SERVICE_WORKLOADS: Final = ("auth", "chat", "billing", "analytics")
WORKLOADS: Final = (GATEWAY, EDGE, *SERVICE_WORKLOADS, OPERATOR)

CA_FILE_NAME: Final = "ca.pem"
CA_KEY_FILE_NAME: Final = "ca-key.pem"

_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")


def workload_uri(workload: str) -> str:
    """The URI SAN that names `workload`: `spiffe://parley.local/<workload>`."""
    return f"{WORKLOAD_URI_PREFIX}{workload}"


def server_name(workload: str) -> str:
    """The DNS SAN a client checks the server's certificate against: `<workload>.parley.local`."""
    return f"{workload}.{TRUST_DOMAIN}"


def workloads_of_uris(uris: Iterable[str]) -> frozenset[str]:
    """The workloads that Parley URI SANs name; other URIs are ignored."""
    return frozenset(
        uri.removeprefix(WORKLOAD_URI_PREFIX)
        for uri in uris
        if uri.startswith(WORKLOAD_URI_PREFIX) and _NAME.fullmatch(uri.removeprefix(WORKLOAD_URI_PREFIX))
    )


class PkiError(Exception):
    """A certificate specification or file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class TlsFiles:
    """One workload's PEM files: the CA bundle it trusts, its certificate and its private key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def in_directory(cls, directory: Path, name: str) -> TlsFiles:
        """The files of certificate `name` in a directory laid out by `ensure_pki`."""
        return cls(directory / CA_FILE_NAME, directory / f"{name}.pem", directory / f"{name}-key.pem")

    def missing(self) -> list[Path]:
        return [path for path in (self.ca_file, self.cert_file, self.key_file) if not path.is_file()]


@dataclass(frozen=True)
class CertificateSpec:
    """A certificate to keep in the directory: its file name and the workloads it names."""

    name: str
    workloads: tuple[str, ...]

    def __post_init__(self) -> None:
        for value in (self.name, *self.workloads):
            if not _NAME.fullmatch(value):
                raise PkiError(f"{value!r} is not a workload name (lower case letters, digits and '-')")
        if self.name == "ca":
            raise PkiError("'ca' names the certificate authority's own files")
        if not self.workloads:
            raise PkiError(f"certificate {self.name!r} names no workload")

    @classmethod
    def parse(cls, text: str) -> CertificateSpec:
        """`name` (a certificate for the workload of that name) or `name=w1,w2` (for several)."""
        name, separator, listed = text.partition("=")
        name = name.strip()
        if not separator:
            return cls(name, (name,))
        return cls(name, tuple(part.strip() for part in listed.split(",") if part.strip()))


def _single(workload: str) -> CertificateSpec:
    return CertificateSpec(workload, (workload,))


# `parley up`: one process hosts every service ("services"); Envoy and the edge are separate children.
EMBEDDED_SERVICES: Final = "services"
EMBEDDED_CERTIFICATES: Final = (
    CertificateSpec(EMBEDDED_SERVICES, SERVICE_WORKLOADS),
    _single(EDGE),
    _single(GATEWAY),
    _single(OPERATOR),
)
# `parley pki init` for microservices: one per `parley serve`, `parley gateway` (Envoy and its edge
# server in one process), a standalone `parley edge`, and the operator.
MICROSERVICES_CERTIFICATES: Final = (
    *(_single(workload) for workload in SERVICE_WORKLOADS),
    CertificateSpec(GATEWAY, (GATEWAY, EDGE)),
    _single(EDGE),
    _single(OPERATOR),
)


@dataclass(frozen=True)
class Lifetimes:
    """How long certificates live, and how long before their end they are reissued."""

    ca: dt.timedelta = dt.timedelta(days=3650)
    ca_renew_within: dt.timedelta = dt.timedelta(days=365)
    leaf: dt.timedelta = dt.timedelta(days=90)
    leaf_renew_within: dt.timedelta = dt.timedelta(days=30)


# Clocks of the hosts that check a new certificate may run a little behind the one that made it.
BACKDATE: Final = dt.timedelta(minutes=5)

Action = Literal["issued", "renewed", "kept"]


@dataclass(frozen=True)
class CertificateStatus:
    """What `ensure_pki` did with one certificate, and until when it is valid."""

    name: str
    workloads: tuple[str, ...]
    action: Action
    not_after: dt.datetime


@dataclass(frozen=True)
class PkiReport:
    """The state of a directory after `ensure_pki`: the CA first, then each certificate."""

    directory: Path
    ca: CertificateStatus
    certificates: tuple[CertificateStatus, ...]

    def files(self, name: str) -> TlsFiles:
        return TlsFiles.in_directory(self.directory, name)


def ensure_pki(
    directory: Path,
    specs: Sequence[CertificateSpec],
    *,
    clock: Callable[[], dt.datetime] = utc_now,
    lifetimes: Lifetimes | None = None,
) -> PkiReport:
    """Make `directory` hold a valid CA and a valid certificate for each of `specs`."""
    lifetimes = lifetimes or Lifetimes()
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise PkiError(f"certificate names must be distinct: {', '.join(names)}")
    now = clock()
    _private_directory(directory)
    ca_key, ca_certificate, ca_action = _ensure_ca(directory, now, lifetimes)
    statuses = []
    for spec in specs:
        kept = None if ca_action != "kept" else _usable_leaf(directory, spec, ca_certificate, now, lifetimes)
        if kept is not None:
            statuses.append(CertificateStatus(spec.name, spec.workloads, "kept", kept))
            continue
        existed = (directory / f"{spec.name}.pem").exists()
        not_after = _issue_leaf(
            directory, spec, ca_key=ca_key, ca=ca_certificate, now=now, lifetimes=lifetimes
        )
        statuses.append(
            CertificateStatus(spec.name, spec.workloads, "renewed" if existed else "issued", not_after)
        )
    ca_status = CertificateStatus("ca", (), ca_action, ca_certificate.not_valid_after_utc)
    return PkiReport(directory, ca_status, tuple(statuses))


def _ensure_ca(
    directory: Path, now: dt.datetime, lifetimes: Lifetimes
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Action]:
    cert_path, key_path = directory / CA_FILE_NAME, directory / CA_KEY_FILE_NAME
    existed = cert_path.exists()
    if existed:
        loaded = _load_pair(cert_path, key_path)
        if loaded is not None:
            key, certificate = loaded
            if certificate.not_valid_after_utc - now > lifetimes.ca_renew_within and _is_ca(certificate):
                return key, certificate, "kept"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Parley"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Parley service CA {now:%Y-%m-%d}"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetimes.ca)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certificate_signing=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a certificate whose key is not there yet is never read as a finished pair.
    _write_private(key_path, _key_pem(key))
    _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate, "renewed" if existed else "issued"


def _usable_leaf(
    directory: Path, spec: CertificateSpec, ca: x509.Certificate, now: dt.datetime, lifetimes: Lifetimes
) -> dt.datetime | None:
    """The existing certificate's end of validity, if it can stay as it is."""
    files = TlsFiles.in_directory(directory, spec.name)
    loaded = _load_pair(files.cert_file, files.key_file)
    if loaded is None:
        return None
    _, certificate = loaded
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return None
    if workloads_of_certificate(certificate) != frozenset(spec.workloads):
        return None
    if certificate.not_valid_after_utc - now <= lifetimes.leaf_renew_within:
        return None
    return certificate.not_valid_after_utc


def _issue_leaf(
    directory: Path,
    spec: CertificateSpec,
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    now: dt.datetime,
    lifetimes: Lifetimes,
) -> dt.datetime:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        *(x509.UniformResourceIdentifier(workload_uri(workload)) for workload in spec.workloads),
        *(x509.DNSName(server_name(workload)) for workload in spec.workloads),
    ]
    not_after = min(now + lifetimes.leaf, ca.not_valid_after_utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Parley"),
                    x509.NameAttribute(NameOID.COMMON_NAME, spec.name),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(certificate_signing=False), critical=True)
        # Every workload is a server to some and a client of others.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles.in_directory(directory, spec.name)
    _write_private(files.key_file, _key_pem(key))
    _write_private(files.cert_file, certificate.public_bytes(serialization.Encoding.PEM))
    return not_after


def workloads_of_certificate(certificate: x509.Certificate) -> frozenset[str]:
    """The workloads a certificate's URI SANs name."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return workloads_of_uris(names.get_values_for_type(x509.UniformResourceIdentifier))


def check_key_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise `PkiError` unless the PEM key is the private half of the PEM certificate's key."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise PkiError(f"not a PEM certificate and private key: {error}") from None
    if key.public_key() != certificate.public_key():
        raise PkiError("the private key does not belong to the certificate")


def _load_pair(cert_path: Path, key_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The key and certificate at the paths if both are readable and belong together, else None."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        return None
    return key, certificate


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _key_usage(*, certificate_signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_signing,
        crl_sign=certificate_signing,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _private_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)


def _write_private(path: Path, content: bytes) -> None:
    """Write an owner-only file under a temporary name and rename it into place (atomic for readers)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
