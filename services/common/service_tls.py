"""mTLS between Parley processes: the credentials a server listens with, the one way a process opens a
channel to another, and the workloads the peer of a call proved to be (ADR 14).

Servers require a client certificate from the Parley CA, so no byte from an unauthenticated peer
reaches a servicer. They reread their files when these change (checked at each new connection), so
a certificate is rotated by replacing its files. Clients check that the server is the workload they
meant to reach (its `<workload>.parley.local` DNS SAN), not just any holder of a Parley certificate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from services.common.pki import PkiError, TlsFiles, check_key_pair, server_name, workloads_of_uris

logger = logging.getLogger(__name__)

# The peer's URI SANs, as gRPC's TLS handshaker reports them in the call's auth context.
_PEER_URI_PROPERTY: Final = "peer_uri"

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one `TlsFiles`, read at once."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # the key must never reach a log line
        return "TlsMaterial(<pem>)"

    @classmethod
    def read(cls, files: TlsFiles) -> TlsMaterial:
        missing = files.missing()
        if missing:
            raise PkiError(f"missing certificate files: {', '.join(str(path) for path in missing)}")
        material = cls(files.ca_file.read_bytes(), files.cert_file.read_bytes(), files.key_file.read_bytes())
        check_key_pair(material.cert_pem, material.key_pem)
        return material


def peer_workloads(context: grpc.aio.ServicerContext) -> frozenset[str]:
    """The workloads the caller's client certificate names (empty for a peer without one)."""
    return workloads_in_auth_context(context.auth_context())


def workloads_in_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> frozenset[str]:
    """The workloads named in a call's auth context (`ServicerContext.auth_context()`)."""
    uris = auth_context.get(_PEER_URI_PROPERTY, ())
    return workloads_of_uris(uri.decode("ascii", "replace") for uri in uris)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """This workload's certificate, presented to servers it trusts through the Parley CA."""
    material = TlsMaterial.read(files)
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_pem,
    )


def server_name_options(server: str) -> tuple[tuple[str, str], ...]:
    """Channel options that make the TLS check demand the certificate of workload `server`."""
    return (("grpc.ssl_target_name_override", server_name(server)),)


def secure_channel_for(
    target: str, identity: TlsFiles, *, server: str, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """A channel to `target` that presents `identity` and accepts only workload `server` there.

    Every channel one Parley process opens to another comes from here. Keep it open for the life of
    the process: its HTTP/2 connection is reused, so the TLS handshake happens once, not per call.
    """
    return grpc.aio.secure_channel(
        target, channel_credentials(identity), options=[*server_name_options(server), *options]
    )


class ReloadingServerCredentials:
    """Server credentials that require a client certificate from the CA and follow file changes.

    gRPC asks `fetch` before each new connection's handshake (on one of its own threads). It looks at
    the files' modification times and rereads them only when these changed; a half-replaced pair (a
    key that does not match its certificate) is ignored until the other file follows.
    """

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        self._initial = self._configuration(TlsMaterial.read(files))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=True
        )

    def fetch(self) -> Any:
        with self._lock:
            stamp = self._stamp_now()
            if stamp == self._stamp:
                return None
            try:
                material = TlsMaterial.read(self._files)
            except (OSError, PkiError) as error:
                logger.warning("keeping the current certificate; the new files are not usable: %s", error)
                return None
            self._stamp = stamp
            logger.info("serving with a new certificate", extra={"cert_file": str(self._files.cert_file)})
            return self._configuration(material)

    def _stamp_now(self) -> tuple[int, ...]:
        stamp: list[int] = []
        for path in (self._files.ca_file, self._files.cert_file, self._files.key_file):
            try:
                status = path.stat()
            except OSError:
                stamp.extend((-1, -1))
            else:
                stamp.extend((status.st_mtime_ns, status.st_ino))
        return tuple(stamp)

    @staticmethod
    def _configuration(material: TlsMaterial) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem
        )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for a Parley gRPC listener: mTLS with `files`, reloaded when they change."""
    return ReloadingServerCredentials(files).credentials()
