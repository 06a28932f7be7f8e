"""Gateway topologies built from settings and `--upstream` overrides, for `parley gateway`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gateway.render import Topology, Upstream, embedded_topology, k8s_topology, local_topology
from services.common.contracts import descriptor_set_path
from services.common.settings import DEFAULT_SERVICE_PORTS, SERVICE_NAMES, Settings, SettingsError


def topology_from_settings(name: str, settings: Settings, upstream_overrides: Sequence[str]) -> Topology:
    """The topology `name`, with ports from settings and any `service=host:port` overrides applied."""
    if settings.gateway_secret is None:
        raise SettingsError(
            "Invalid Parley settings:\n  PARLEY_GATEWAY_SECRET: required for `parley gateway`; the services "
            "must be started with the same value"
        )
    secret = settings.gateway_secret.get_secret_value()
    common = {
        "descriptor_set_path": descriptor_set_path(),
        "http_port": settings.http_port,
        "admin_port": settings.envoy_admin_port,
        "edge_port": settings.edge_port,
        "max_request_bytes": settings.max_request_bytes,
    }
    topology: Topology
    if name == "k8s":
        topology = k8s_topology(secret, **common)  # type: ignore[arg-type]
    elif name == "embedded":
        topology = embedded_topology(
            settings.grpc_port,
            settings.edge_port,
            settings.http_port,
            settings.envoy_admin_port,
            secret,
            descriptor_set_path=descriptor_set_path(),
            listen_address=settings.http_host,
            max_request_bytes=settings.max_request_bytes,
        )
    else:
        topology = local_topology(
            secret, service_ports=DEFAULT_SERVICE_PORTS, listen_address=settings.http_host, **common  # type: ignore[arg-type]
        )
    return _with_overrides(topology, upstream_overrides)


def _with_overrides(topology: Topology, overrides: Sequence[str]) -> Topology:
    upstreams = dict(topology.upstreams)
    for override in overrides:
        service, _, address = override.partition("=")
        host, _, port = address.rpartition(":")
        if service not in SERVICE_NAMES or not host or not port.isdigit():
            raise SettingsError(
                f"Invalid Parley settings:\n  --upstream {override!r}: expected SERVICE=HOST:PORT with SERVICE one "
                f"of {', '.join(SERVICE_NAMES)}"
            )
        upstreams[service] = Upstream(service, host, int(port))
    return replace(topology, upstreams=upstreams) if overrides else topology
