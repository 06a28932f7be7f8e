"""Certificates for tests: the session's PKI (tests/conftest.py `service_pki`), and a second, foreign
one whose certificates every Parley server must refuse (`foreign_pki`).

Channels and grpcurl flags for a caller come from here, so a test says who it calls as:
`service_pki.channel(target, as_="edge", server="auth")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from services.common.pki import (
    EMBEDDED_SERVICES,
    SERVICE_WORKLOADS,
    WORKLOADS,
    CertificateSpec,
    TlsFiles,
    ensure_pki,
    server_name,
)
from services.common.service_tls import channel_credentials, secure_channel_for, server_name_options

# One certificate per workload, plus the one `parley up`'s services process has (every service).
TEST_CERTIFICATES: Final = (
    *(CertificateSpec(workload, (workload,)) for workload in WORKLOADS),
    CertificateSpec(EMBEDDED_SERVICES, SERVICE_WORKLOADS),
)
# What a test server hosting services presents: the services process's certificate.
SERVICES: Final = EMBEDDED_SERVICES


@dataclass(frozen=True)
class ServicePki:
    """A directory laid out by `ensure_pki` with TEST_CERTIFICATES."""

    directory: Path

    def files(self, name: str) -> TlsFiles:
        return TlsFiles.in_directory(self.directory, name)

    def channel(
        self, target: str, *, as_: str, server: str = "auth", options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """An asyncio channel to `target` presenting certificate `as_`, for workload `server` there."""
        return secure_channel_for(target, self.files(as_), server=server, options=options)

    def sync_channel(
        self, target: str, *, as_: str, server: str = "auth", options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.Channel:
        """The same for blocking clients (the production helper makes asyncio channels only)."""
        return grpc.secure_channel(
            target,
            channel_credentials(self.files(as_)),
            options=[*server_name_options(server), *options],
        )


def make_test_pki(directory: Path) -> ServicePki:
    ensure_pki(directory, TEST_CERTIFICATES)
    return ServicePki(directory)


def embedded_pki(data_dir: Path) -> ServicePki:
    """The PKI `parley up` made in its data dir (it holds the operator's certificate, not every one)."""
    return ServicePki(data_dir / "pki")


def grpcurl_tls(files: TlsFiles, *, server: str) -> list[str]:
    """grpcurl flags presenting `files` to workload `server` (as README and docs tell operators)."""
    return [
        "-cacert",
        str(files.ca_file),
        "-cert",
        str(files.cert_file),
        "-key",
        str(files.key_file),
        "-servername",
        server_name(server),
    ]
