"""Turn a gateway topology into Envoy bootstrap YAML.

The template (`envoy/envoy.yaml.j2`) holds the shape of the config and `envoy/gateway.yaml` holds the
limits, timeouts and error mappings; this module only decides what varies per deployment: where the
upstreams live, which ports to bind, and which services the descriptor set makes public.
"""

from __future__ import annotations

import html
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from gateway.rls import RATE_LIMITED_GRPC_MESSAGE
from gateway.routes import (
    EXT_AUTHZ_DISABLED,
    EXT_AUTHZ_FILTER,
    RATE_LIMIT_FILTERS,
    USER_ID_HEADER,
    RouteTarget,
    edge_routes,
    method_routes,
)
from services.common.ratelimit import DEFAULT_RATE_LIMITS_FILE, RateLimitConfigError, load_rate_limit_config

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
LUA_TEMPLATE_NAME = "api_edge.lua.j2"
SELF_CLUSTER = "gateway_self"
TRACE_CLUSTER = "otlp"
VERSION_ERROR_HEADER = "x-parley-api-version-error"
MEDIA_TYPE_ERROR_HEADER = "x-parley-media-type-error"
DOCS_STYLE = "body{font-family:sans-serif;margin:2em}td{padding:.2em 1em;border-bottom:1px solid #ddd}"
JWKS_PATH = "/.well-known/jwks.json"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
# jwt_authn copies these claims of a verified token into the identity headers services trust (an array
# claim, `roles`, arrives as base64 of its JSON); ext_authz sets the same headers for other credentials.
IDENTITY_CLAIM_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-parley-user-id", "sub"),
    ("x-parley-session-id", "sid"),
    ("x-parley-plan", "plan"),
    ("x-parley-roles", "roles"),
    ("x-parley-token-issued-at", "iat"),
)
# Envoy's own JSON and OpenAPI documents are served from memory; the OpenAPI document is ~200 KiB.
MAX_DIRECT_RESPONSE_BYTES = 4 * MIB


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
    # Only replies carrying this Envoy response flag (e.g. RLSE: the rate-limit service failed).
    response_flag: str = ""
    # ErrorInfo metadata; values may use Envoy substitutions such as %REQ(...)%.
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleRequirement:
    """Every method of a service whose name ends with `service_suffix` needs `role`."""

    service_suffix: str
    role: str


@dataclass(frozen=True)
class Deprecation:
    """A deprecated API package: when it was deprecated, when it goes away, and what replaces it."""

    package: str
    successor: str
    deprecated_at: datetime
    sunset: datetime


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
    write_retry_on: str
    num_retries: int
    outlier_consecutive_gateway_failure: int
    outlier_interval_ms: int
    outlier_base_ejection_time_ms: int
    outlier_max_ejection_percent: int
    identity_header_prefix: str
    gateway_secret_header: str
    xff_num_trusted_hops: int
    grpc_only_response_headers: tuple[str, ...]
    open_methods: frozenset[str]
    role_requirements: tuple[RoleRequirement, ...]
    jwks_cache_duration_s: int
    jwt_max_lifetime_s: int
    ext_authz_timeout_ms: int
    ext_authz_headers: tuple[str, ...]
    rate_limit_timeout_ms: int
    security_headers: tuple[tuple[str, str], ...]
    strict_transport_security: str
    docs_content_security_policy: str
    cors_allow_methods: str
    cors_allow_headers: str
    cors_expose_headers: str
    cors_max_age_s: int
    api_version_header: str
    unversioned_prefix: str
    stable_versions: tuple[str, ...]
    deprecations: tuple[Deprecation, ...]
    openapi_path: str
    docs_page_path: str
    error_domain: str
    local_replies: tuple[LocalReply, ...]


def load_gateway_settings(path: Path = SETTINGS_FILE) -> GatewaySettings:
    """Read the gateway tunables; a missing or mistyped key fails here rather than inside Envoy."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        timeouts, health, limits = raw["timeouts"], raw["health_check"], raw["limits"]
        retries, outlier = raw["retries"], raw["outlier_detection"]
        authentication, cors, versions = raw["authentication"], raw["cors"], raw["api_versions"]
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
            write_retry_on=str(retries["write_retry_on"]),
            num_retries=int(retries["num_retries"]),
            outlier_consecutive_gateway_failure=int(outlier["consecutive_gateway_failure"]),
            outlier_interval_ms=int(outlier["interval_ms"]),
            outlier_base_ejection_time_ms=int(outlier["base_ejection_time_ms"]),
            outlier_max_ejection_percent=int(outlier["max_ejection_percent"]),
            identity_header_prefix=str(raw["identity_header_prefix"]).lower(),
            gateway_secret_header=str(raw["gateway_secret_header"]).lower(),
            xff_num_trusted_hops=int(raw["xff_num_trusted_hops"]),
            grpc_only_response_headers=tuple(str(h).lower() for h in raw["grpc_only_response_headers"]),
            open_methods=frozenset(str(method) for method in authentication["open_methods"]),
            role_requirements=tuple(
                RoleRequirement(str(entry["service_suffix"]), str(entry["role"]))
                for entry in authentication["role_required"]
            ),
            jwks_cache_duration_s=int(authentication["jwks_cache_duration_s"]),
            jwt_max_lifetime_s=int(authentication["jwt_max_lifetime_s"]),
            ext_authz_timeout_ms=int(authentication["ext_authz_timeout_ms"]),
            ext_authz_headers=tuple(str(h).lower() for h in authentication["ext_authz_headers"]),
            rate_limit_timeout_ms=int(raw["rate_limiting"]["timeout_ms"]),
            security_headers=tuple((str(k), str(v)) for k, v in raw["security_headers"].items()),
            strict_transport_security=str(raw["strict_transport_security"]),
            docs_content_security_policy=str(raw["docs_content_security_policy"]),
            cors_allow_methods=str(cors["allow_methods"]),
            cors_allow_headers=str(cors["allow_headers"]),
            cors_expose_headers=str(cors["expose_headers"]),
            cors_max_age_s=int(cors["max_age_s"]),
            api_version_header=str(versions["header"]),
            unversioned_prefix=str(versions["unversioned_prefix"]),
            stable_versions=tuple(str(version) for version in versions["stable"]),
            deprecations=tuple(
                Deprecation(
                    package=str(package),
                    successor=str(entry["successor"]),
                    deprecated_at=_utc(entry["deprecated_at"]),
                    sunset=_utc(entry["sunset"]),
                )
                for package, entry in (versions.get("deprecated") or {}).items()
            ),
            openapi_path=str(raw["docs"]["openapi_path"]),
            docs_page_path=str(raw["docs"]["page_path"]),
            error_domain=str(raw["error_domain"]),
            local_replies=tuple(_parse_local_reply(entry) for entry in raw["local_replies"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise GatewayConfigError(f"{path}: invalid gateway settings ({error!r})") from error


def _utc(value: object) -> datetime:
    """A timestamp from the settings file (YAML may already have parsed it); naive means UTC."""
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


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
        response_flag=str(entry.get("response_flag", "")),
        metadata={str(key): str(value) for key, value in (entry.get("metadata") or {}).items()},
    )


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
    # Claims jwt_authn insists on; the auth service issues tokens with these.
    jwt_issuer: str = "parley"
    jwt_audience: str = "parley-api"
    # Browser origins allowed to call the API (with credentials); empty: no cross-origin access.
    cors_allowed_origins: tuple[str, ...] = ()
    # A second listener serving HTTPS (and h2 over ALPN) when set.
    tls: TlsListener | None = None
    rate_limits_path: Path = DEFAULT_RATE_LIMITS_FILE
    # Where Envoy sends its spans (OTLP/gRPC); None: to the edge server, which accepts and drops them.
    otlp: Upstream | None = None

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
class PublicMethod:
    """One RPC of a public service, with the HTTP binding its `google.api.http` rule gives it."""

    name: str
    streaming: bool
    # Lower-case HTTP verb of the primary binding ("get", "post", ...), "" without a rule.
    http_verb: str
    # Every path the method answers on (primary binding first), e.g. "/v1/conversations/{id}".
    http_paths: tuple[str, ...]
    # The request is google.api.HttpBody: its body reaches the service byte for byte, any media type.
    raw_body: bool = False

    @property
    def is_read(self) -> bool:
        """GETs are safe and idempotent: the only calls the gateway may retry."""
        return self.http_verb == "get"


@dataclass(frozen=True)
class PublicService:
    """A client-facing gRPC service found in the descriptor set."""

    full_name: str
    area: str
    streaming_methods: tuple[str, ...]
    methods: tuple[PublicMethod, ...] = ()

    @property
    def package(self) -> str:
        return self.full_name.rsplit(".", 1)[0]

    @property
    def version(self) -> str:
        """The API version of its package: "v1" for `parley.chat.v1`."""
        return self.package.rsplit(".", 1)[1]


def is_public_service(full_name: str) -> bool:
    """Parley services are public unless their name says they are internal-only."""
    return full_name.startswith(f"{PROTO_ROOT_PACKAGE}.") and not full_name.endswith(INTERNAL_SERVICE_SUFFIX)


def read_descriptor_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(data)
    return descriptor_set


def public_services(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[PublicService]:
    """Every Parley service that the gateway exposes, sorted by full name."""
    messages = {
        f".{file.package}.{message.name}": message
        for file in descriptor_set.file
        for message in file.message_type
    }
    found: list[PublicService] = []
    for file in descriptor_set.file:
        for service in file.service:
            full_name = f"{file.package}.{service.name}"
            if not is_public_service(full_name):
                continue
            methods = tuple(_public_method(method, messages) for method in service.method)
            streaming = tuple(method.name for method in methods if method.streaming)
            found.append(PublicService(full_name, file.package.split(".")[1], streaming, methods))
    return sorted(found, key=lambda service: service.full_name)


_HTTP_VERBS = ("get", "put", "post", "delete", "patch")


def _http_binding(rule: http_pb2.HttpRule) -> tuple[str, str]:
    for verb in _HTTP_VERBS:
        path = getattr(rule, verb)
        if path:
            return verb, path
    if rule.HasField("custom"):
        return rule.custom.kind.lower(), rule.custom.path
    return "", ""


_HTTP_BODY = ".google.api.HttpBody"


def _takes_raw_body(
    method: descriptor_pb2.MethodDescriptorProto,
    rule: http_pb2.HttpRule,
    messages: Mapping[str, descriptor_pb2.DescriptorProto],
) -> bool:
    """The request is an HttpBody, or its HTTP body field is: the transcoder passes those bytes as sent."""
    if method.input_type == _HTTP_BODY:
        return True
    request = messages.get(method.input_type)
    if request is None or not rule.body or rule.body == "*":
        return False
    return any(field.name == rule.body and field.type_name == _HTTP_BODY for field in request.field)


def _public_method(
    method: descriptor_pb2.MethodDescriptorProto, messages: Mapping[str, descriptor_pb2.DescriptorProto]
) -> PublicMethod:
    rule = method.options.Extensions[annotations_pb2.http]
    verb, path = _http_binding(rule)
    extra_paths = [_http_binding(extra)[1] for extra in rule.additional_bindings]
    return PublicMethod(
        name=method.name,
        streaming=method.server_streaming or method.client_streaming,
        http_verb=verb,
        http_paths=tuple(found for found in (path, *extra_paths) if found),
        raw_body=_takes_raw_body(method, rule, messages),
    )


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


def _response_flag_filter(flag: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": [flag]}}


def _and(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": list(filters)}}


def _passthrough(content_type: str | None = None) -> dict[str, Any]:
    """Keep the body the producing filter chose (ext_authz and the rate-limit service write their own)."""
    override: dict[str, Any] = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}}
    if content_type:
        override["content_type"] = content_type
    return override


def _local_reply_mappers(topology: Topology) -> list[dict[str, Any]]:
    """`local_reply_config.mappers`, first match wins: /healthz, then the replies whose producer wrote
    the details (ext_authz refusals, rate limiting), then gRPC clients, then JSON clients.

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
    media_type_error_request = {
        "header_filter": {"header": {"name": MEDIA_TYPE_ERROR_HEADER, "present_match": True}}
    }
    version_error_request = {
        "header_filter": {"header": {"name": VERSION_ERROR_HEADER, "present_match": True}}
    }
    # The rate-limit service's raw body is a JSON fragment: `"message":"…","details":[{…},{…}` — the
    # request id is only known here, so the gateway closes the object around it.
    rate_limited_json = (
        '{"code":8,%LOCAL_REPLY_BODY%,{"@type":"type.googleapis.com/google.rpc.RequestInfo",'
        '"request_id":"%REQ(X-REQUEST-ID)%"}]}'
    )
    mappers: list[dict[str, Any]] = [
        {
            "filter": _and(_status_filter("EQ", 200), healthz_request),
            "body_format_override": {"json_format": {"status": "SERVING"}},
        },
        {
            "filter": _and(_status_filter("EQ", 503), healthz_request),
            "body_format_override": {
                "json_format": error_body(
                    14, settings.healthz_not_serving_message, "UPSTREAM_UNAVAILABLE", {}
                )
            },
        },
        {
            "filter": _and(_status_filter("EQ", 400), version_error_request),
            "body_format_override": {
                "json_format": error_body(
                    3,
                    f"The {settings.api_version_header} header names a version that does not serve "
                    "this path.",
                    "UNSUPPORTED_API_VERSION",
                    {"requested_version": f"%REQ({VERSION_ERROR_HEADER})%"},
                )
            },
        },
        {
            "filter": _and(_status_filter("EQ", 415), media_type_error_request),
            "body_format_override": {
                "json_format": error_body(
                    3,
                    "Request bodies are JSON: send them with Content-Type: application/json.",
                    "UNSUPPORTED_MEDIA_TYPE",
                    {"content_type": f"%REQ({MEDIA_TYPE_ERROR_HEADER})%"},
                )
            },
        },
        # ext_authz refusals (401/403) carry the auth service's own reason and details, shaped by the
        # edge server for the client kind (JSON body, or a message plus grpc-status-details-bin).
        {
            "filter": _and(
                _response_flag_filter("UAEX"), _status_range_filter(401, 403), _GRPC_CLIENT_FILTER
            ),
            "body_format_override": _passthrough(),
        },
        {
            "filter": _and(_response_flag_filter("UAEX"), _status_range_filter(401, 403)),
            "body_format_override": _passthrough("application/json"),
        },
        {
            "filter": _and(_response_flag_filter("RL"), _GRPC_CLIENT_FILTER),
            "body_format_override": {"text_format_source": {"inline_string": RATE_LIMITED_GRPC_MESSAGE}},
        },
        {
            "filter": _response_flag_filter("RL"),
            "body_format_override": {
                "text_format_source": {"inline_string": rate_limited_json},
                "content_type": "application/json",
            },
        },
    ]
    for reply in settings.local_replies:
        mappers.append(
            {
                "filter": _and(_reply_filter(reply), _GRPC_CLIENT_FILTER),
                "body_format_override": {"text_format_source": {"inline_string": reply.message}},
            }
        )
    for reply in settings.local_replies:
        metadata = dict(reply.metadata)
        if reply.status_low == 413:
            metadata["max_request_bytes"] = str(topology.max_request_bytes)
        mappers.append(
            {
                "filter": _reply_filter(reply),
                "body_format_override": {
                    "json_format": error_body(reply.grpc_code, reply.message, reply.reason, metadata)
                },
            }
        )
    return mappers


def _reply_filter(reply: LocalReply) -> dict[str, Any]:
    status = _status_range_filter(reply.status_low, reply.status_high)
    return _and(status, _response_flag_filter(reply.response_flag)) if reply.response_flag else status


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


def _template_environment(template_dir: Path) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - the output is YAML or Lua, never HTML.
        keep_trailing_newline=True,
    )
    # JSON is valid YAML (and a valid Lua string literal for plain text) and escapes every string
    # safely; structured values go through it.
    environment.filters["tojson"] = lambda value: json.dumps(value, sort_keys=False)
    # Block YAML for larger structures, so the rendered file stays readable when debugging it.
    environment.filters["toyaml"] = lambda value: yaml.dump(
        value, Dumper=_PlainDumper, default_flow_style=False, sort_keys=False, width=1000
    ).rstrip("\n")
    environment.filters["duration_ms"] = _duration_ms
    return environment


def _versions_by_segment(
    services: Sequence[PublicService], settings: GatewaySettings
) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """For the Lua negotiation: each first path segment under /vN/, the versions serving it, and the
    newest stable one of those."""
    offered: dict[str, set[str]] = {}
    for service in services:
        for method in service.methods:
            for path in method.http_paths:
                parts = path.strip("/").split("/")
                if len(parts) >= 2 and parts[0] == service.version:
                    segment = parts[1].split(":")[0]
                    offered.setdefault(segment, set()).add(service.version)

    def version_number(version: str) -> int:
        return int(version.removeprefix("v")) if version.removeprefix("v").isdigit() else 0

    offered_sorted = [
        (segment, sorted(versions, key=version_number)) for segment, versions in sorted(offered.items())
    ]
    newest_stable = [
        (segment, stable[-1])
        for segment, versions in offered_sorted
        if (stable := [version for version in versions if version in settings.stable_versions])
    ]
    return offered_sorted, newest_stable


def _docs_page(services: Sequence[PublicService], settings: GatewaySettings) -> str:
    """A dependency-free HTML index of the public API: every method with its HTTP binding."""
    rows = []
    for service in services:
        for method in service.methods:
            binding = html.escape(
                " | ".join(f"{method.http_verb.upper()} {path}" for path in method.http_paths) or "gRPC only"
            )
            rows.append(
                f"<tr><td>{html.escape(service.full_name)}/{html.escape(method.name)}</td><td>{binding}</td></tr>"
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Parley API</title>"
        f"<style>{DOCS_STYLE}</style></head><body><h1>Parley API</h1>"
        f'<p>OpenAPI 3.1: <a href="{settings.openapi_path}">{settings.openapi_path}</a>. '
        f"Unversioned paths under <code>{settings.unversioned_prefix}</code> follow the "
        f"<code>{settings.api_version_header}</code> header.</p>"
        f"<table>{''.join(rows)}</table></body></html>"
    )


def _docs_routes(topology: Topology, services: Sequence[PublicService]) -> list[dict[str, Any]]:
    settings = topology.settings
    # Answered by Envoy itself: no credentials, and no transcoder (it would refuse a path no RPC has).
    open_route = {
        EXT_AUTHZ_FILTER: EXT_AUTHZ_DISABLED,
        TRANSCODER_FILTER: {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        },
    }
    openapi_path = topology.descriptor_set_path.resolve().parent / "openapi.json"
    routes: list[dict[str, Any]] = [
        {
            "name": "docs_page",
            "match": {"path": settings.docs_page_path},
            "direct_response": {"status": 200, "body": {"inline_string": _docs_page(services, settings)}},
            "response_headers_to_add": [
                {"header": {"key": "content-type", "value": "text/html; charset=utf-8"}},
                {
                    "header": {
                        "key": "content-security-policy",
                        "value": settings.docs_content_security_policy,
                    }
                },
                {"header": {"key": "cache-control", "value": "public, max-age=300"}},
            ],
            "typed_per_filter_config": open_route,
        },
    ]
    if openapi_path.is_file():
        routes.append(
            {
                "name": "openapi",
                "match": {"path": settings.openapi_path},
                "direct_response": {"status": 200, "body": {"filename": str(openapi_path)}},
                "response_headers_to_add": [
                    {"header": {"key": "content-type", "value": "application/json"}},
                    {"header": {"key": "cache-control", "value": "public, max-age=300"}},
                ],
                "typed_per_filter_config": open_route,
            }
        )
    # Browser preflights: the CORS filter answers them (off-list origins without CORS headers) once
    # a forwarding route matches - it ignores direct responses. This one matches every OPTIONS
    # request; only a non-preflight OPTIONS would reach its cluster, and the edge answers 404-like.
    routes.insert(
        0,
        {
            "name": "cors_preflight",
            "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "OPTIONS"}}]},
            "route": {"cluster": topology.edge.name, "timeout": "5s"},
            "typed_per_filter_config": open_route,
        },
    )
    # Envoy's own liveness: answered without touching any upstream (also the benchmark's ceiling).
    routes.append(
        {
            "name": "livez",
            "match": {"path": "/livez"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"status":"ALIVE"}'}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            "typed_per_filter_config": open_route,
        }
    )
    return routes


def _cors_policy(topology: Topology) -> dict[str, Any]:
    settings = topology.settings
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in topology.cors_allowed_origins],
        "allow_methods": settings.cors_allow_methods,
        "allow_headers": settings.cors_allow_headers,
        "expose_headers": settings.cors_expose_headers,
        "max_age": str(settings.cors_max_age_s),
        "allow_credentials": True,
        # A browser preflight from an origin off the list gets no CORS headers and stops there.
        "forward_not_matching_preflights": False,
    }


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
    try:
        rate_limits = load_rate_limit_config(topology.rate_limits_path)
    except RateLimitConfigError as error:
        raise GatewayConfigError(str(error)) from error
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
    targets = [RouteTarget(service, _cluster_for(service, topology.upstreams)) for service in services]
    routes = [
        *_docs_routes(topology, services),
        *method_routes(targets, settings, rate_limits),
        *edge_routes([*REFLECTION_SERVICES, HEALTH_SERVICE], topology.edge.name, settings),
    ]

    api_headers = list(settings.security_headers)
    listeners: list[dict[str, Any]] = [
        {"name": "parley_http", "port": topology.http_port, "tls": None, "security_headers": api_headers}
    ]
    if topology.tls is not None:
        listeners.append(
            {
                "name": "parley_https",
                "port": topology.tls.port,
                "tls": {
                    "cert_path": str(topology.tls.cert_path.resolve()),
                    "key_path": str(topology.tls.key_path.resolve()),
                },
                "security_headers": [
                    *api_headers,
                    ("Strict-Transport-Security", settings.strict_transport_security),
                ],
            }
        )

    environment = _template_environment(template_dir)
    offered_versions, newest_stable = _versions_by_segment(services, settings)
    lua_source = environment.get_template(LUA_TEMPLATE_NAME).render(
        unversioned_prefix=settings.unversioned_prefix,
        version_header=settings.api_version_header,
        version_error_header=VERSION_ERROR_HEADER,
        media_type_error_header=MEDIA_TYPE_ERROR_HEADER,
        raw_body_prefixes=sorted(
            {
                path.split("{", 1)[0]
                for service in services
                for method in service.methods
                if method.raw_body
                for path in method.http_paths
            }
        ),
        offered_versions=offered_versions,
        newest_stable=newest_stable,
    )
    otlp = (
        {
            "host": topology.otlp.host,
            "port": topology.otlp.port,
            "discovery": _discovery_type(topology.otlp.host),
        }
        if topology.otlp
        else None
    )
    template = environment.get_template(TEMPLATE_NAME)
    return template.render(
        topology=topology,
        settings=settings,
        services=services,
        routes=routes,
        listeners=listeners,
        clusters=clusters,
        edge=topology.edge,
        edge_discovery=_discovery_type(topology.edge.host),
        descriptor_set_path=str(topology.descriptor_set_path.resolve()),
        local_reply_mappers=_local_reply_mappers(topology),
        access_log_path=str(topology.access_log_path) if topology.access_log_path else None,
        lua_source=lua_source,
        cors_policy=_cors_policy(topology),
        identity_claims=IDENTITY_CLAIM_HEADERS,
        user_id_header=USER_ID_HEADER,
        jwks_uri=f"http://127.0.0.1:{topology.http_port}{JWKS_PATH}",
        self_cluster=SELF_CLUSTER,
        trace_cluster=TRACE_CLUSTER if otlp else topology.edge.name,
        otlp=otlp,
        rate_limit_filters=RATE_LIMIT_FILTERS,
        rate_limit_domain=rate_limits.domain,
        max_direct_response_bytes=MAX_DIRECT_RESPONSE_BYTES,
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
