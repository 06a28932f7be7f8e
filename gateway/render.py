"""Turn a gateway topology into Envoy bootstrap YAML.

The template (`envoy/envoy.yaml.j2`) holds the shape of the config and `envoy/gateway.yaml` holds the
limits, timeouts and error mappings; this module only decides what varies per deployment: where the
upstreams live, which ports to bind, and which services the descriptor set makes public.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from google.protobuf import descriptor_pb2

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
TEMPLATE_NAME = "envoy.yaml.j2"
SETTINGS_FILE = ENVOY_DIR / "gateway.yaml"

# The areas the gateway routes to; each has its own upstream cluster named after it.
UPSTREAM_AREAS: tuple[str, ...] = ("auth", "chat", "billing", "analytics")
EDGE_CLUSTER = "edge"
PROTO_ROOT_PACKAGE = "parley"
INTERNAL_SERVICE_SUFFIX = "InternalService"

# Operator tooling the edge gRPC server answers for every client (grpcurl, k8s probes).
REFLECTION_SERVICES: tuple[str, ...] = (
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)
HEALTH_SERVICE = "grpc.health.v1.Health"

MIB = 1024 * 1024
DEFAULT_ADMIN_PORT = 9901
DEFAULT_HTTP_PORT = 8080
DEFAULT_EDGE_PORT = 50052
LOCAL_SERVICE_PORTS: Mapping[str, int] = {"auth": 50061, "chat": 50062, "billing": 50063, "analytics": 50064}
K8S_SERVICE_PORT = 50051

TopologyName = Literal["embedded", "local", "k8s"]


class GatewayConfigError(Exception):
    """The topology, settings or descriptor set cannot produce a valid gateway config."""


@dataclass(frozen=True)
class Upstream:
    """One gRPC endpoint the gateway forwards to (a DNS name or an IP literal)."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class LocalReply:
    """How one class of Envoy-generated error is rewritten into the Parley error shape."""

    status_low: int
    status_high: int
    grpc_code: int
    reason: str
    message: str


@dataclass(frozen=True)
class GatewaySettings:
    """The tunables from `envoy/gateway.yaml`; every value is data, not code."""

    connect_timeout_ms: int
    unary_timeout_s: int
    stream_timeout_s: int
    stream_idle_timeout_s: int
    request_headers_timeout_s: int
    downstream_idle_timeout_s: int
    health_check_interval_ms: int
    health_check_unhealthy_interval_ms: int
    health_check_timeout_ms: int
    health_check_unhealthy_threshold: int
    health_check_healthy_threshold: int
    healthy_panic_threshold_percent: float
    healthz_path: str
    healthz_not_serving_message: str
    max_downstream_connections: int
    max_request_headers_kb: int
    max_concurrent_streams: int
    upstream_max_connections: int
    upstream_max_pending_requests: int
    upstream_max_requests: int
    upstream_max_retries: int
    retry_on: str
    num_retries: int
    outlier_consecutive_gateway_failure: int
    outlier_interval_ms: int
    outlier_base_ejection_time_ms: int
    outlier_max_ejection_percent: int
    identity_header_prefix: str
    gateway_secret_header: str
    grpc_only_response_headers: tuple[str, ...]
    error_domain: str
    local_replies: tuple[LocalReply, ...]


def load_gateway_settings(path: Path = SETTINGS_FILE) -> GatewaySettings:
    """Read the gateway tunables; a missing or mistyped key fails here rather than inside Envoy."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        timeouts, health, limits = raw["timeouts"], raw["health_check"], raw["limits"]
        retries, outlier = raw["retries"], raw["outlier_detection"]
        return GatewaySettings(
            connect_timeout_ms=int(timeouts["connect_ms"]),
            unary_timeout_s=int(timeouts["unary_s"]),
            stream_timeout_s=int(timeouts["stream_s"]),
            stream_idle_timeout_s=int(timeouts["stream_idle_s"]),
            request_headers_timeout_s=int(timeouts["request_headers_s"]),
            downstream_idle_timeout_s=int(timeouts["downstream_idle_s"]),
            health_check_interval_ms=int(health["interval_ms"]),
            health_check_unhealthy_interval_ms=int(health["unhealthy_interval_ms"]),
            health_check_timeout_ms=int(health["timeout_ms"]),
            health_check_unhealthy_threshold=int(health["unhealthy_threshold"]),
            health_check_healthy_threshold=int(health["healthy_threshold"]),
            healthy_panic_threshold_percent=float(health["healthy_panic_threshold_percent"]),
            healthz_path=str(raw["healthz"]["path"]),
            healthz_not_serving_message=str(raw["healthz"]["not_serving_message"]),
            max_downstream_connections=int(limits["max_downstream_connections"]),
            max_request_headers_kb=int(limits["max_request_headers_kb"]),
            max_concurrent_streams=int(limits["max_concurrent_streams"]),
            upstream_max_connections=int(limits["upstream_max_connections"]),
            upstream_max_pending_requests=int(limits["upstream_max_pending_requests"]),
            upstream_max_requests=int(limits["upstream_max_requests"]),
            upstream_max_retries=int(limits["upstream_max_retries"]),
            retry_on=str(retries["retry_on"]),
            num_retries=int(retries["num_retries"]),
            outlier_consecutive_gateway_failure=int(outlier["consecutive_gateway_failure"]),
            outlier_interval_ms=int(outlier["interval_ms"]),
            outlier_base_ejection_time_ms=int(outlier["base_ejection_time_ms"]),
            outlier_max_ejection_percent=int(outlier["max_ejection_percent"]),
            identity_header_prefix=str(raw["identity_header_prefix"]).lower(),
            gateway_secret_header=str(raw["gateway_secret_header"]).lower(),
            grpc_only_response_headers=tuple(str(h).lower() for h in raw["grpc_only_response_headers"]),
            error_domain=str(raw["error_domain"]),
            local_replies=tuple(_parse_local_reply(entry) for entry in raw["local_replies"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise GatewayConfigError(f"{path}: invalid gateway settings ({error!r})") from error


def _parse_local_reply(entry: Mapping[str, Any]) -> LocalReply:
    if "status" in entry:
        low = high = int(entry["status"])
    else:
        low, high = (int(bound) for bound in entry["status_range"])
    if not 400 <= low <= high <= 599:
        raise ValueError(f"local reply statuses must lie within 400..599, got {low}..{high}")
    return LocalReply(
        status_low=low,
        status_high=high,
        grpc_code=int(entry["grpc_code"]),
        reason=str(entry["reason"]),
        message=str(entry["message"]),
    )


@dataclass(frozen=True)
class Topology:
    """Where the gateway listens and where each upstream lives, for one way of running Parley."""

    name: TopologyName
    http_port: int
    admin_port: int
    listen_address: str
    # Keys are the areas in UPSTREAM_AREAS: "auth", "chat", "billing", "analytics".
    upstreams: Mapping[str, Upstream]
    # The gateway's own gRPC server: reflection and health (and later rate limiting).
    edge: Upstream
    # Kept out of repr so a logged or printed topology never shows it.
    gateway_secret: str = field(repr=False)
    descriptor_set_path: Path
    max_request_bytes: int = MIB
    # None: JSON access log lines go to Envoy's stdout.
    access_log_path: Path | None = None
    # /healthz is 503 unless at least this percentage of each upstream cluster's hosts is healthy.
    min_healthy_percent: float = 100.0
    settings: GatewaySettings = field(default_factory=load_gateway_settings)

    def __post_init__(self) -> None:
        missing = sorted(set(UPSTREAM_AREAS) - set(self.upstreams))
        if missing:
            raise GatewayConfigError(f"topology {self.name!r} has no upstream for {', '.join(missing)}")
        if not self.gateway_secret or not self.gateway_secret.isprintable():
            raise GatewayConfigError(
                "the gateway secret must be non-empty printable text (it is a header value)"
            )
        if self.max_request_bytes <= 0:
            raise GatewayConfigError("max_request_bytes must be positive")
        if not 0.0 <= self.min_healthy_percent <= 100.0:
            raise GatewayConfigError("min_healthy_percent must lie within 0..100")


def embedded_topology(
    grpc_port: int,
    edge_port: int,
    http_port: int,
    admin_port: int,
    secret: str,
    *,
    descriptor_set_path: Path,
    listen_address: str = "127.0.0.1",
    grpc_host: str = "127.0.0.1",
    max_request_bytes: int = MIB,
    access_log_path: Path | None = None,
    settings: GatewaySettings | None = None,
) -> Topology:
    """`parley up`: one process hosts every servicer on `grpc_port`, so all four clusters point at it."""
    return Topology(
        name="embedded",
        http_port=http_port,
        admin_port=admin_port,
        listen_address=listen_address,
        upstreams={area: Upstream(area, grpc_host, grpc_port) for area in UPSTREAM_AREAS},
        edge=Upstream(EDGE_CLUSTER, grpc_host, edge_port),
        gateway_secret=secret,
        descriptor_set_path=descriptor_set_path,
        max_request_bytes=max_request_bytes,
        access_log_path=access_log_path,
        settings=settings or load_gateway_settings(),
    )


def local_topology(
    secret: str,
    *,
    descriptor_set_path: Path,
    http_port: int = DEFAULT_HTTP_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    edge_port: int = DEFAULT_EDGE_PORT,
    service_ports: Mapping[str, int] = LOCAL_SERVICE_PORTS,
    host: str = "127.0.0.1",
    listen_address: str = "127.0.0.1",
    max_request_bytes: int = MIB,
    access_log_path: Path | None = None,
    settings: GatewaySettings | None = None,
) -> Topology:
    """Microservices on one machine: `parley serve <svc>` per service, each on its own port."""
    return Topology(
        name="local",
        http_port=http_port,
        admin_port=admin_port,
        listen_address=listen_address,
        upstreams={area: Upstream(area, host, service_ports[area]) for area in UPSTREAM_AREAS},
        edge=Upstream(EDGE_CLUSTER, host, edge_port),
        gateway_secret=secret,
        descriptor_set_path=descriptor_set_path,
        max_request_bytes=max_request_bytes,
        access_log_path=access_log_path,
        settings=settings or load_gateway_settings(),
    )


def k8s_topology(
    secret: str,
    *,
    descriptor_set_path: Path,
    namespace: str = "parley",
    cluster_domain: str = "cluster.local",
    service_port: int = K8S_SERVICE_PORT,
    http_port: int = DEFAULT_HTTP_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    edge_port: int = DEFAULT_EDGE_PORT,
    max_request_bytes: int = MIB,
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
            area: Upstream(area, f"{area}.{namespace}.svc.{cluster_domain}", service_port)
            for area in UPSTREAM_AREAS
        },
        edge=Upstream(EDGE_CLUSTER, "127.0.0.1", edge_port),
        gateway_secret=secret,
        descriptor_set_path=descriptor_set_path,
        max_request_bytes=max_request_bytes,
        min_healthy_percent=min_healthy_percent,
        settings=settings or load_gateway_settings(),
    )


@dataclass(frozen=True)
class PublicService:
    """A client-facing gRPC service found in the descriptor set."""

    full_name: str
    area: str
    streaming_methods: tuple[str, ...]


def is_public_service(full_name: str) -> bool:
    """Parley services are public unless their name says they are internal-only."""
    return full_name.startswith(f"{PROTO_ROOT_PACKAGE}.") and not full_name.endswith(INTERNAL_SERVICE_SUFFIX)


def read_descriptor_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(data)
    return descriptor_set


def public_services(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[PublicService]:
    """Every Parley service that the gateway exposes, sorted by full name."""
    found: list[PublicService] = []
    for file in descriptor_set.file:
        for service in file.service:
            full_name = f"{file.package}.{service.name}"
            if not is_public_service(full_name):
                continue
            streaming = tuple(
                method.name for method in service.method if method.server_streaming or method.client_streaming
            )
            found.append(PublicService(full_name, file.package.split(".")[1], streaming))
    return sorted(found, key=lambda service: service.full_name)


def _discovery_type(host: str) -> str:
    """IP literals are STATIC; names are STRICT_DNS, re-resolved so k8s headless services yield every pod."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _duration_ms(milliseconds: int) -> str:
    return f"{milliseconds / 1000:g}s"


def _status_filter(op: Literal["EQ", "GE", "LE"], status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": op,
                "value": {
                    "default_value": status,
                    "runtime_key": f"parley.local_reply.{op.lower()}_{status}",
                },
            }
        }
    }


def _status_range_filter(low: int, high: int) -> dict[str, Any]:
    if low == high:
        return _status_filter("EQ", low)
    return {"and_filter": {"filters": [_status_filter("GE", low), _status_filter("LE", high)]}}


# A request from a gRPC client: gRPC content type, and not a JSON request the transcoder rewrote
# into gRPC (the transcoder records the original path in x-envoy-original-path). Envoy itself
# decides from the client's original headers that a local reply must be gRPC-shaped.
_GRPC_CLIENT_FILTER: dict[str, Any] = {
    "and_filter": {
        "filters": [
            {
                "header_filter": {
                    "header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
                }
            },
            {
                "header_filter": {
                    "header": {"name": "x-envoy-original-path", "present_match": True, "invert_match": True}
                }
            },
        ]
    }
}


def _local_reply_mappers(topology: Topology) -> list[dict[str, Any]]:
    """`local_reply_config.mappers`, first match wins: /healthz, then gRPC clients, then JSON clients.

    gRPC clients get Envoy's gRPC-shaped reply (grpc-status from the HTTP status, e.g. 404 becomes
    UNIMPLEMENTED) with our message as grpc-message; everyone else gets the JSON error shape.
    """
    settings = topology.settings
    request_info = {
        "@type": "type.googleapis.com/google.rpc.RequestInfo",
        "request_id": "%REQ(X-REQUEST-ID)%",
    }

    def error_body(code: int, message: str, reason: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        error_info: dict[str, Any] = {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": settings.error_domain,
        }
        if metadata:
            error_info["metadata"] = dict(metadata)
        return {"code": code, "message": message, "details": [error_info, request_info]}

    healthz_request = {
        "header_filter": {"header": {"name": ":path", "string_match": {"exact": settings.healthz_path}}}
    }
    mappers: list[dict[str, Any]] = [
        {
            "filter": {"and_filter": {"filters": [_status_filter("EQ", 200), healthz_request]}},
            "body_format_override": {"json_format": {"status": "SERVING"}},
        },
        {
            "filter": {"and_filter": {"filters": [_status_filter("EQ", 503), healthz_request]}},
            "body_format_override": {
                "json_format": error_body(
                    14,
                    settings.healthz_not_serving_message,
                    "UPSTREAM_UNAVAILABLE",
                    {},
                )
            },
        },
    ]
    for reply in settings.local_replies:
        mappers.append(
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            _status_range_filter(reply.status_low, reply.status_high),
                            _GRPC_CLIENT_FILTER,
                        ]
                    }
                },
                "body_format_override": {"text_format_source": {"inline_string": reply.message}},
            }
        )
    for reply in settings.local_replies:
        metadata = {"max_request_bytes": str(topology.max_request_bytes)} if reply.status_low == 413 else {}
        mappers.append(
            {
                "filter": _status_range_filter(reply.status_low, reply.status_high),
                "body_format_override": {
                    "json_format": error_body(reply.grpc_code, reply.message, reply.reason, metadata)
                },
            }
        )
    return mappers


def _cluster_for(service: PublicService, upstreams: Mapping[str, Upstream]) -> str:
    if service.area not in upstreams:
        raise GatewayConfigError(
            f"{service.full_name} belongs to area {service.area!r}, which has no upstream"
        )
    return service.area


def _health_service_by_area(services: Sequence[PublicService]) -> dict[str, str]:
    """The service each cluster's gRPC health check names: `parley.billing.v1.BillingService` for
    billing, i.e. the area's conventionally named service, else its first public service."""
    names_by_area: dict[str, list[str]] = {}
    for service in services:
        names_by_area.setdefault(service.area, []).append(service.full_name)
    return {
        area: next((name for name in names if name.endswith(f".{area.capitalize()}Service")), names[0])
        for area, names in names_by_area.items()
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-structures out in full instead of as YAML anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_envoy_config(topology: Topology, *, template_dir: Path = ENVOY_DIR) -> str:
    """The complete Envoy bootstrap for `topology`, as YAML."""
    try:
        descriptor_bytes = topology.descriptor_set_path.read_bytes()
    except OSError as error:
        raise GatewayConfigError(
            f"cannot read descriptor set {topology.descriptor_set_path}: {error}"
        ) from error
    services = public_services(read_descriptor_set(descriptor_bytes))
    if not services:
        raise GatewayConfigError(f"{topology.descriptor_set_path} holds no public Parley service")
    health_services = _health_service_by_area(services)
    settings = topology.settings

    clusters = [
        {
            "name": area,
            "host": upstream.host,
            "port": upstream.port,
            "discovery": _discovery_type(upstream.host),
            # An area with no public service yet is still checked, via the server's overall health.
            "health_service": health_services.get(area, ""),
        }
        for area, upstream in sorted(topology.upstreams.items())
        if area in UPSTREAM_AREAS
    ]
    routes = [
        {
            "service": service.full_name,
            "cluster": _cluster_for(service, topology.upstreams),
            "streaming_methods": service.streaming_methods,
        }
        for service in services
    ]

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - the output is YAML, never HTML.
        keep_trailing_newline=True,
    )
    # JSON is valid YAML and escapes every string safely; structured values go through it.
    environment.filters["tojson"] = lambda value: json.dumps(value, sort_keys=False)
    # Block YAML for larger structures, so the rendered file stays readable when debugging it.
    environment.filters["toyaml"] = lambda value: yaml.dump(
        value, Dumper=_PlainDumper, default_flow_style=False, sort_keys=False, width=1000
    ).rstrip("\n")
    environment.filters["duration_ms"] = _duration_ms
    template = environment.get_template(TEMPLATE_NAME)
    return template.render(
        topology=topology,
        settings=settings,
        services=services,
        routes=routes,
        clusters=clusters,
        edge=topology.edge,
        edge_discovery=_discovery_type(topology.edge.host),
        edge_services=[*REFLECTION_SERVICES, HEALTH_SERVICE],
        descriptor_set_path=str(topology.descriptor_set_path.resolve()),
        local_reply_mappers=_local_reply_mappers(topology),
        access_log_path=str(topology.access_log_path) if topology.access_log_path else None,
    )


def write_envoy_config(topology: Topology, path: Path) -> Path:
    """Render and write the config readable only by its owner (it carries the gateway secret)."""
    rendered = render_envoy_config(topology)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(rendered)
    path.chmod(0o600)
    return path
