"""The TLS plumbing between processes (services/common/service_tls.py) that needs no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.pki import CertificateSpec, PkiError, TlsFiles, ensure_pki
from services.common.service_tls import ReloadingServerCredentials, TlsMaterial, workloads_in_auth_context

SPECS = [CertificateSpec("auth", ("auth",)), CertificateSpec("chat", ("chat",))]


def test_server_credentials_reread_their_files_only_when_a_consistent_pair_is_in_place(
    tmp_path: Path,
) -> None:
    ensure_pki(tmp_path, SPECS)
    files = TlsFiles.in_directory(tmp_path, "auth")
    credentials = ReloadingServerCredentials(files)
    assert credentials.fetch() is None  # nothing changed

    # A new key is in place, its certificate not yet: the old pair is kept.
    files.key_file.write_bytes((tmp_path / "chat-key.pem").read_bytes())
    assert credentials.fetch() is None
    # The matching certificate follows: the new pair serves the next connection, once.
    files.cert_file.write_bytes((tmp_path / "chat.pem").read_bytes())
    assert credentials.fetch() is not None
    assert credentials.fetch() is None


def test_missing_or_mismatched_files_are_refused_with_their_names(tmp_path: Path) -> None:
    ensure_pki(tmp_path, SPECS)
    with pytest.raises(PkiError, match=r"missing certificate files: .*/nobody\.pem"):
        TlsMaterial.read(TlsFiles.in_directory(tmp_path, "nobody"))
    mismatched = TlsFiles(tmp_path / "ca.pem", tmp_path / "auth.pem", tmp_path / "chat-key.pem")
    with pytest.raises(PkiError, match="does not belong"):
        TlsMaterial.read(mismatched)
    assert "BEGIN" not in repr(TlsMaterial.read(TlsFiles.in_directory(tmp_path, "auth")))


def test_the_peer_is_the_workloads_its_uri_sans_name() -> None:
    auth_context = {
        "transport_security_type": [b"ssl"],
        "peer_uri": [b"spiffe://parley.local/gateway", b"spiffe://parley.local/edge", b"spiffe://else/x"],
        "peer_dns": [b"auth.parley.local"],
    }
    assert workloads_in_auth_context(auth_context) == {"gateway", "edge"}
    assert workloads_in_auth_context({"peer_dns": [b"gateway.parley.local"]}) == frozenset()
