"""The gateway's own gRPC server: what Envoy asks the edge, and what operators ask the gateway.

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
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from gateway.authz import EdgeAuthorizer, add_authorization_service
from gateway.descriptors import DescriptorIndex, is_internal_service, public_services, read_descriptor_set
from gateway.rls import add_rate_limit_service
from services.common.ratelimit import RateLimitConfig, RateLimiter

logger = logging.getLogger(__name__)


def public_descriptor_pool(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> descriptor_pool.DescriptorPool:
    """A pool holding every file of the set with internal services removed.

    Reflection answers `describe` from whole files, so an internal service defined next to a public
    one would otherwise leak its schema to anyone who asks for the file. Messages stay: public RPCs
    may share them.
    """
    pool = descriptor_pool.DescriptorPool()
    known_files = {file.name for file in descriptor_set.file}
    for file in descriptor_set.file:
        public_file = descriptor_pb2.FileDescriptorProto()
        public_file.CopyFrom(file)
        kept = [
            service for service in file.service if not is_internal_service(f"{file.package}.{service.name}")
        ]
        if len(kept) != len(file.service):
            del public_file.service[:]
            public_file.service.extend(kept)
            # Source locations point at service indexes that no longer exist.
            public_file.ClearField("source_code_info")
        pool.Add(public_file)
    # The edge's own services, so `grpcurl describe grpc.health.v1.Health` works as well.
    for own_file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        if own_file.name not in known_files:
            own_proto = descriptor_pb2.FileDescriptorProto()
            own_file.CopyToProto(own_proto)
            pool.Add(own_proto)
    return pool


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


async def create_edge_server(
    descriptor_set: bytes, host: str, port: int, services_for_envoy: EdgeServices
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start the edge server; port 0 picks a free port, which is returned."""
    parsed = read_descriptor_set(descriptor_set)
    services = [service.full_name for service in public_services(DescriptorIndex(parsed))]
    server = grpc.aio.server()
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

    reflection.enable_server_reflection(
        [*services, reflection.SERVICE_NAME, health.SERVICE_NAME],
        server,
        pool=public_descriptor_pool(parsed),
    )

    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"the edge gRPC server could not bind {host}:{port}")
    await server.start()
    logger.info("edge gRPC server listening", extra={"host": host, "port": bound_port, "services": services})
    return server, bound_port
