"""Where the gateway listens and where its upstreams live, for each way of running Parley: embedded
(`parley up`), local microservices (`parley serve` per service) and Kubernetes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from gateway.settings import GatewayConfigError, GatewaySettings, load_gateway_settings
from services.common.pki import TlsFiles
from services.common.ratelimit import DEFAULT_RATE_LIMITS_FILE
from services.common.settings import (
    DEFAULT_EDGE_PORT,
    DEFAULT_ENVOY_ADMIN_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SERVICE_PORTS,
    SERVICE_NAMES,
    ServiceName,
)
from services.common.token_rules import DEFAULT_AUDIENCE, DEFAULT_ISSUER

TopologyName = Literal["embedded", "local", "k8s"]
# The cluster of the gateway's own gRPC server (reflection, health, rate limits, ext_authz).
EDGE_CLUSTER: Final = "edge"
# Every upstream cluster is named after its service (SERVICE_NAMES); this one is the OTLP collector.
OTLP_CLUSTER: Final = "otlp"


@dataclass(frozen=True)
class Upstream:
    """One gRPC endpoint the gateway forwards to (a DNS name or an IP literal).

    The service upstreams and the edge are Parley workloads named like their cluster: Envoy reaches
    them over mTLS and accepts only the certificate of that workload (`spiffe://parley.local/<name>`).
    """

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class TlsListener:
    """The HTTPS listener: its port and the PEM certificate chain and private key it serves."""

    port: int
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Topology:
    """Where the gateway listens and where each upstream lives, for one way of running Parley."""

    name: TopologyName
    http_port: int
    admin_port: int
    listen_address: str
    # By service name (SERVICE_NAMES): "auth", "chat", "billing", "analytics".
    upstreams: Mapping[str, Upstream]
    # The gateway's own gRPC server: reflection, health, rate limits and ext_authz.
    edge: Upstream
    # The certificate Envoy presents to the services and the edge, and the CA it checks them with.
    gateway_tls: TlsFiles
    descriptor_set_path: Path
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # None: JSON access log lines go to Envoy's stdout.
    access_log_path: Path | None = None
    # /healthz is 503 unless at least this percentage of each upstream cluster's hosts is healthy.
    min_healthy_percent: float = 100.0
    settings: GatewaySettings = field(default_factory=load_gateway_settings)
    # Claims jwt_authn insists on; the auth service issues tokens with these (PARLEY_JWT_ISSUER and
    # PARLEY_JWT_AUDIENCE, through `runtime.topologies.with_edge_settings`).
    jwt_issuer: str = DEFAULT_ISSUER
    jwt_audience: str = DEFAULT_AUDIENCE
    # Browser origins allowed to call the API (with credentials); empty: no cross-origin access.
    cors_allowed_origins: tuple[str, ...] = ()
    # A second listener serving HTTPS (and h2 over ALPN) when set.
    tls: TlsListener | None = None
    rate_limits_path: Path = DEFAULT_RATE_LIMITS_FILE
    # Where Envoy sends its spans (OTLP/gRPC); None: to the edge server, which accepts and drops them.
    otlp: Upstream | None = None

    def __post_init__(self) -> None:
        missing = sorted(set(SERVICE_NAMES) - set(self.upstreams))
        if missing:
            raise GatewayConfigError(f"topology {self.name!r} has no upstream for {', '.join(missing)}")
        if self.max_request_bytes <= 0:
            raise GatewayConfigError("max_request_bytes must be positive")
        if not 0.0 <= self.min_healthy_percent <= 100.0:
            raise GatewayConfigError("min_healthy_percent must lie within 0..100")
        for origin in self.cors_allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise GatewayConfigError(f"CORS origin {origin!r} must be http(s)://host[:port]")
        if "*" in self.cors_allowed_origins:
            # Credentials (cookie sessions) with a wildcard origin would let any site act as the user.
            raise GatewayConfigError(
                "CORS origins must be listed; '*' is refused because credentials are allowed"
            )
        if self.tls is not None:
            for path in (self.tls.cert_path, self.tls.key_path):
                if not path.is_file():
                    raise GatewayConfigError(f"TLS file {path} does not exist")


def embedded_topology(
    grpc_port: int,
    edge_port: int,
    http_port: int,
    admin_port: int,
    *,
    gateway_tls: TlsFiles,
    descriptor_set_path: Path,
    listen_address: str = "127.0.0.1",
    grpc_host: str = "127.0.0.1",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    access_log_path: Path | None = None,
    settings: GatewaySettings | None = None,
) -> Topology:
    """`parley up`: one process hosts every servicer on `grpc_port`, so all four clusters point at it."""
    return Topology(
        name="embedded",
        http_port=http_port,
        admin_port=admin_port,
        listen_address=listen_address,
        upstreams={name: Upstream(name, grpc_host, grpc_port) for name in SERVICE_NAMES},
        edge=Upstream(EDGE_CLUSTER, grpc_host, edge_port),
        gateway_tls=gateway_tls,
        descriptor_set_path=descriptor_set_path,
        max_request_bytes=max_request_bytes,
        access_log_path=access_log_path,
        settings=settings or load_gateway_settings(),
    )


def local_topology(
    *,
    gateway_tls: TlsFiles,
    descriptor_set_path: Path,
    http_port: int = DEFAULT_HTTP_PORT,
    admin_port: int = DEFAULT_ENVOY_ADMIN_PORT,
    edge_port: int = DEFAULT_EDGE_PORT,
    service_ports: Mapping[ServiceName, int] = DEFAULT_SERVICE_PORTS,
    host: str = "127.0.0.1",
    listen_address: str = "127.0.0.1",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    access_log_path: Path | None = None,
    settings: GatewaySettings | None = None,
) -> Topology:
    """Microservices on one machine: `parley serve <svc>` per service, each on its own port."""
    return Topology(
        name="local",
        http_port=http_port,
        admin_port=admin_port,
        listen_address=listen_address,
        upstreams={name: Upstream(name, host, service_ports[name]) for name in SERVICE_NAMES},
        edge=Upstream(EDGE_CLUSTER, host, edge_port),
        gateway_tls=gateway_tls,
        descriptor_set_path=descriptor_set_path,
        max_request_bytes=max_request_bytes,
        access_log_path=access_log_path,
        settings=settings or load_gateway_settings(),
    )


def k8s_topology(
    *,
    gateway_tls: TlsFiles,
    descriptor_set_path: Path,
    namespace: str = "parley",
    cluster_domain: str = "cluster.local",
    # Each service's pod listens on the default gRPC port, and its Service exposes that port.
    service_port: int = DEFAULT_GRPC_PORT,
    http_port: int = DEFAULT_HTTP_PORT,
    admin_port: int = DEFAULT_ENVOY_ADMIN_PORT,
    edge_port: int = DEFAULT_EDGE_PORT,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    min_healthy_percent: float = 1.0,
    settings: GatewaySettings | None = None,
) -> Topology:
    """Kubernetes: services by DNS name (headless, so each pod is its own host), edge as a sidecar.

    /healthz only needs some healthy pod per service here: one bad replica must not take the whole
    gateway out of its load balancer.
    """
    return Topology(
        name="k8s",
        http_port=http_port,
        admin_port=admin_port,
        listen_address="0.0.0.0",  # noqa: S104 - the pod's listener must be reachable by its Service.
        upstreams={
            name: Upstream(name, f"{name}.{namespace}.svc.{cluster_domain}", service_port)
            for name in SERVICE_NAMES
        },
        edge=Upstream(EDGE_CLUSTER, "127.0.0.1", edge_port),
        gateway_tls=gateway_tls,
        descriptor_set_path=descriptor_set_path,
        max_request_bytes=max_request_bytes,
        min_healthy_percent=min_healthy_percent,
        settings=settings or load_gateway_settings(),
    )
