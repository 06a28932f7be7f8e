"""The service PKI: what `ensure_pki` issues, keeps, renews, and refuses (services/common/pki.py)."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.common.pki import (
    EMBEDDED_CERTIFICATES,
    MICROSERVICES_CERTIFICATES,
    CertificateSpec,
    Lifetimes,
    PkiError,
    TlsFiles,
    check_key_pair,
    ensure_pki,
    workloads_of_certificate,
    workloads_of_uris,
)

START = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SPECS = (CertificateSpec("auth", ("auth",)), CertificateSpec("gateway", ("gateway", "edge")))


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_new_directory_gets_a_ca_and_one_certificate_per_spec(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    report = ensure_pki(directory, SPECS, clock=lambda: START)

    assert report.ca.action == "issued"
    assert [(status.name, status.action) for status in report.certificates] == [
        ("auth", "issued"),
        ("gateway", "issued"),
    ]
    ca = certificate(directory / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    gateway = certificate(report.files("gateway").cert_file)
    gateway.verify_directly_issued_by(ca)
    sans = gateway.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://parley.local/gateway",
        "spiffe://parley.local/edge",
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["gateway.parley.local", "edge.parley.local"]
    assert workloads_of_certificate(gateway) == {"gateway", "edge"}
    usages = gateway.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not gateway.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert gateway.not_valid_after_utc == START + Lifetimes().leaf
    key = serialization.load_pem_private_key(report.files("gateway").key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == gateway.public_key()


def test_the_directory_and_every_file_are_owner_only(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o755)
    ensure_pki(directory, SPECS, clock=lambda: START)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(path.name for path in directory.iterdir())
    assert files == ["auth-key.pem", "auth.pem", "ca-key.pem", "ca.pem", "gateway-key.pem", "gateway.pem"]
    assert {stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()} == {0o600}


def test_valid_certificates_are_kept_byte_for_byte(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ensure_pki(directory, SPECS, clock=lambda: START)
    before = {path.name: path.read_bytes() for path in directory.iterdir()}

    report = ensure_pki(directory, SPECS, clock=lambda: START + dt.timedelta(days=59))

    assert report.ca.action == "kept"
    assert {status.action for status in report.certificates} == {"kept"}
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before


def test_a_certificate_near_its_end_is_renewed_and_the_ca_kept(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ensure_pki(directory, SPECS, clock=lambda: START)
    ca_before = (directory / "ca.pem").read_bytes()
    later = START + Lifetimes().leaf - Lifetimes().leaf_renew_within

    report = ensure_pki(directory, SPECS, clock=lambda: later)

    assert report.ca.action == "kept"
    assert (directory / "ca.pem").read_bytes() == ca_before
    assert {status.action for status in report.certificates} == {"renewed"}
    assert certificate(directory / "auth.pem").not_valid_after_utc == later + Lifetimes().leaf


def test_a_ca_near_its_end_is_renewed_with_every_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ensure_pki(directory, SPECS, clock=lambda: START)
    later = START + Lifetimes().ca - Lifetimes().ca_renew_within

    report = ensure_pki(directory, SPECS, clock=lambda: later)

    assert report.ca.action == "renewed"
    assert {status.action for status in report.certificates} == {"renewed"}
    new_ca = certificate(directory / "ca.pem")
    for name in ("auth", "gateway"):
        certificate(directory / f"{name}.pem").verify_directly_issued_by(new_ca)


def test_a_certificate_is_reissued_when_it_names_other_workloads(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ensure_pki(directory, SPECS, clock=lambda: START)

    changed = (CertificateSpec("auth", ("auth",)), CertificateSpec("gateway", ("gateway",)))
    report = ensure_pki(directory, changed, clock=lambda: START)

    assert [(status.name, status.action) for status in report.certificates] == [
        ("auth", "kept"),
        ("gateway", "renewed"),
    ]
    assert workloads_of_certificate(certificate(directory / "gateway.pem")) == {"gateway"}


def test_a_certificate_of_another_ca_or_with_a_foreign_key_is_reissued(tmp_path: Path) -> None:
    directory, elsewhere = tmp_path / "pki", tmp_path / "other"
    ensure_pki(directory, SPECS, clock=lambda: START)
    ensure_pki(elsewhere, SPECS, clock=lambda: START)
    (directory / "auth.pem").write_bytes((elsewhere / "auth.pem").read_bytes())
    (directory / "gateway-key.pem").write_bytes((elsewhere / "gateway-key.pem").read_bytes())

    report = ensure_pki(directory, SPECS, clock=lambda: START)

    assert {status.action for status in report.certificates} == {"renewed"}
    ca = certificate(directory / "ca.pem")
    for name in ("auth", "gateway"):
        files = TlsFiles.in_directory(directory, name)
        certificate(files.cert_file).verify_directly_issued_by(ca)
        check_key_pair(files.cert_file.read_bytes(), files.key_file.read_bytes())


def test_an_unreadable_ca_is_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ensure_pki(directory, SPECS, clock=lambda: START)
    (directory / "ca-key.pem").write_text("not a key")

    report = ensure_pki(directory, SPECS, clock=lambda: START)

    assert report.ca.action == "renewed"
    assert {status.action for status in report.certificates} == {"renewed"}


def test_check_key_pair_refuses_a_key_of_another_certificate(tmp_path: Path) -> None:
    ensure_pki(tmp_path, SPECS, clock=lambda: START)
    with pytest.raises(PkiError, match="does not belong"):
        check_key_pair((tmp_path / "auth.pem").read_bytes(), (tmp_path / "gateway-key.pem").read_bytes())
    with pytest.raises(PkiError, match="not a PEM"):
        check_key_pair(b"garbage", (tmp_path / "gateway-key.pem").read_bytes())


@pytest.mark.parametrize(
    ("text", "name", "workloads"),
    [
        ("operator", "operator", ("operator",)),
        ("gateway=gateway,edge", "gateway", ("gateway", "edge")),
        ("services=auth, chat", "services", ("auth", "chat")),
    ],
)
def test_specs_parse_from_the_command_line(text: str, name: str, workloads: tuple[str, ...]) -> None:
    assert CertificateSpec.parse(text) == CertificateSpec(name, workloads)


@pytest.mark.parametrize("text", ["", "Auth", "auth/../x", "ca", "gateway=", "x=a b", "a" * 64])
def test_bad_specs_are_refused(text: str) -> None:
    with pytest.raises(PkiError):
        CertificateSpec.parse(text)


def test_two_certificates_of_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="distinct"):
        ensure_pki(tmp_path, (SPECS[0], SPECS[0]))
    assert not (tmp_path / "ca.pem").exists()


def test_the_standard_sets_cover_every_workload() -> None:
    workloads = {"gateway", "edge", "auth", "chat", "billing", "analytics", "operator"}
    for specs in (EMBEDDED_CERTIFICATES, MICROSERVICES_CERTIFICATES):
        assert {workload for spec in specs for workload in spec.workloads} == workloads


def test_foreign_and_malformed_uris_name_no_workload() -> None:
    uris = [
        "spiffe://parley.local/chat",
        "spiffe://example.org/auth",
        "spiffe://parley.local/Auth",
        "spiffe://parley.local/a/b",
        "https://parley.local/gateway",
    ]
    assert workloads_of_uris(uris) == {"chat"}


def test_missing_files_are_listed(tmp_path: Path) -> None:
    ensure_pki(tmp_path, SPECS[:1], clock=lambda: START)
    assert TlsFiles.in_directory(tmp_path, "auth").missing() == []
    assert TlsFiles.in_directory(tmp_path, "chat").missing() == [
        tmp_path / "chat.pem",
        tmp_path / "chat-key.pem",
    ]
