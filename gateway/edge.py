"""The gateway's own gRPC server: what Envoy asks the edge, and what operators ask the gateway.

It listens with mTLS like every Parley server. Its services for Envoy (rate limits, ext_authz, the
span receiver) answer the gateway's workload only; health and reflection any workload of the CA.

- Reflection and health: Envoy routes `grpc.reflection.*` and `grpc.health.v1.Health` here, so
  `grpcurl <gateway> list` shows exactly the public Parley services whatever process hosts them.
- Envoy's global rate-limit service (gateway/rls.py), over Redis or, embedded, in memory.
- Envoy's ext_authz service (gateway/authz.py): API keys, cookie sessions, JWTs Envoy could not verify.
- An OTLP trace receiver for Envoy's spans when no collector is configured: Envoy needs somewhere to
  send them to create trace ids at all; they are counted and dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from gateway.authz import EdgeAuthorizer, add_authorization_service
from gateway.descriptors import DescriptorIndex, is_internal_service, public_services, read_descriptor_set
from gateway.rls import add_rate_limit_service
from services.common.callers import CallerPolicy
from services.common.interceptors import CallerCheck
from services.common.listeners import ensure_free
from services.common.pki import GATEWAY, TlsFiles
from services.common.ratelimit import RateLimitConfig, RateLimiter
from services.common.reflection import add_reflection_service
from services.common.service_tls import server_credentials

logger = logging.getLogger(__name__)


def public_files(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file of the set with internal services removed.

    Reflection answers `describe` with whole files, so an internal service defined next to a public
    one would otherwise leak its schema to anyone who asks for the file. Messages stay: public RPCs
    may share them.
    """
    files = []
    for file in descriptor_set.file:
        kept = [
            index
            for index, service in enumerate(file.service)
            if not is_internal_service(f"{file.package}.{service.name}")
        ]
        if len(kept) == len(file.service):
            files.append(file)
            continue
        public_file = descriptor_pb2.FileDescriptorProto()
        public_file.CopyFrom(file)
        del public_file.service[:]
        public_file.service.extend(file.service[index] for index in kept)
        _keep_comments_of_services(public_file, {old: new for new, old in enumerate(kept)})
        files.append(public_file)
    return files


def _keep_comments_of_services(file: descriptor_pb2.FileDescriptorProto, new_index: dict[int, int]) -> None:
    """Drop the source locations (comments) of removed services and renumber those of the kept ones."""
    service_field = descriptor_pb2.FileDescriptorProto.SERVICE_FIELD_NUMBER
    kept = descriptor_pb2.SourceCodeInfo()
    for location in file.source_code_info.location:
        path = list(location.path)
        if len(path) >= 2 and path[0] == service_field:
            if path[1] not in new_index:
                continue
            path[1] = new_index[path[1]]
        kept_location = kept.location.add()
        kept_location.CopyFrom(location)
        kept_location.path[:] = path
    file.source_code_info.CopyFrom(kept)


@dataclass(frozen=True)
class EdgeServices:
    """What the edge server answers for Envoy besides reflection and health."""

    rate_limits: RateLimitConfig
    limiter: RateLimiter
    authorizer: EdgeAuthorizer
    registry: CollectorRegistry


class DroppingTraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Accepts Envoy's spans when no OTLP collector is configured, and counts what it drops."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._dropped = Counter(
            "parley_gateway_spans_dropped",
            "Envoy spans received with no OTLP collector configured to forward them to.",
            registry=registry,
        )

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        self._dropped.inc(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


# Who may call the edge's services for Envoy.
ENVOY_CALLERS = CallerPolicy({}, default=frozenset({GATEWAY}))


async def create_edge_server(
    descriptor_set: bytes, host: str, port: int, tls: TlsFiles, services_for_envoy: EdgeServices
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start the edge server with certificate `tls`; port 0 picks a free port, which is
    returned."""
    parsed = read_descriptor_set(descriptor_set)
    services = [service.full_name for service in public_services(DescriptorIndex(parsed))]
    server = grpc.aio.server(interceptors=[CallerCheck(ENVOY_CALLERS)])
    add_rate_limit_service(
        server,
        services_for_envoy.rate_limits,
        services_for_envoy.limiter,
        registry=services_for_envoy.registry,
    )
    add_authorization_service(server, services_for_envoy.authorizer)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        DroppingTraceReceiver(services_for_envoy.registry), server
    )

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # The edge answers for itself only: the overall server status is its own liveness.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    add_reflection_service(server, [*services, health.SERVICE_NAME], public_files(parsed))

    # Checked first: gRPC would log its own error line for a taken port before failing.
    ensure_free("edge_port", host, port)
    credentials = server_credentials(tls)
    try:
        bound_port = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:
        bound_port = 0
    if bound_port == 0:
        raise OSError(f"the edge gRPC server could not bind {host}:{port}")
    await server.start()
    logger.info("edge gRPC server listening", extra={"host": host, "port": bound_port, "services": services})
    return server, bound_port
