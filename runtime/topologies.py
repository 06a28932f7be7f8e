"""Gateway topologies built from settings and `--upstream` overrides, for `parley gateway`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gateway.topology import (
    OTLP_CLUSTER,
    TlsListener,
    Topology,
    Upstream,
    embedded_topology,
    k8s_topology,
    local_topology,
)
from runtime.process import service_tls_for
from services.common.contracts import descriptor_set_path
from services.common.pki import GATEWAY
from services.common.ratelimit import DEFAULT_RATE_LIMITS_FILE
from services.common.settings import SERVICE_NAMES, Settings, SettingsError


def topology_from_settings(name: str, settings: Settings, upstream_overrides: Sequence[str]) -> Topology:
    """The topology `name`, with ports from settings and any `service=host:port` overrides applied.

    Envoy and the edge server of `parley gateway` present one certificate, which names both
    workloads: PARLEY_SERVICE_*_FILE, else `gateway` in the data dir's pki folder.
    """
    gateway_tls = service_tls_for(settings, GATEWAY)
    descriptors = descriptor_set_path()
    topology: Topology
    if name == "k8s":
        topology = k8s_topology(
            gateway_tls=gateway_tls,
            descriptor_set_path=descriptors,
            http_port=settings.http_port,
            admin_port=settings.envoy_admin_port,
            edge_port=settings.edge_port,
            max_request_bytes=settings.max_request_bytes,
        )
    elif name == "embedded":
        topology = embedded_topology(
            settings.grpc_port,
            settings.edge_port,
            settings.http_port,
            settings.envoy_admin_port,
            gateway_tls=gateway_tls,
            descriptor_set_path=descriptors,
            listen_address=settings.http_host,
            max_request_bytes=settings.max_request_bytes,
        )
    else:
        # Upstream ports are `parley serve`'s defaults (DEFAULT_SERVICE_PORTS); --upstream overrides them.
        topology = local_topology(
            gateway_tls=gateway_tls,
            descriptor_set_path=descriptors,
            http_port=settings.http_port,
            admin_port=settings.envoy_admin_port,
            edge_port=settings.edge_port,
            listen_address=settings.http_host,
            max_request_bytes=settings.max_request_bytes,
        )
    return with_edge_settings(_with_overrides(topology, upstream_overrides), settings)


def with_edge_settings(topology: Topology, settings: Settings) -> Topology:
    """The parts of the gateway config that come from PARLEY_* settings in every topology."""
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = TlsListener(settings.https_port, settings.tls_cert_file, settings.tls_key_file)
    return replace(
        topology,
        jwt_issuer=settings.jwt_issuer,
        jwt_audience=settings.jwt_audience,
        cors_allowed_origins=settings.cors_allowed_origins,
        tls=tls,
        rate_limits_path=settings.rate_limits_file or DEFAULT_RATE_LIMITS_FILE,
        otlp=otlp_upstream(settings.otlp_endpoint),
    )


def otlp_upstream(endpoint: str | None) -> Upstream | None:
    """The OTLP/gRPC collector as an Envoy upstream: `http://collector:4317` or `collector:4317`."""
    if not endpoint:
        return None
    address = endpoint.split("://", 1)[-1].rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SettingsError(f"Invalid Parley settings:\n  PARLEY_OTLP_ENDPOINT: {endpoint!r} needs host:port")
    return Upstream(OTLP_CLUSTER, host.strip("[]"), int(port))


def _with_overrides(topology: Topology, overrides: Sequence[str]) -> Topology:
    upstreams = dict(topology.upstreams)
    for override in overrides:
        service, _, address = override.partition("=")
        host, _, port = address.rpartition(":")
        if service not in SERVICE_NAMES or not host or not port.isdigit():
            raise SettingsError(
                f"Invalid Parley settings:\n  --upstream {override!r}: expected SERVICE=HOST:PORT "
                f"with SERVICE one of {', '.join(SERVICE_NAMES)}"
            )
        upstreams[service] = Upstream(service, host, int(port))
    return replace(topology, upstreams=upstreams) if overrides else topology
