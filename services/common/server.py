"""The server factory every Parley process uses: mTLS, one interceptor chain, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from services.common.callers import CallerPolicy
from services.common.contracts import contract_files
from services.common.health import DependencyProbe, HealthMonitor
from services.common.identity import IdentityResolver
from services.common.interceptors import CallPipeline
from services.common.listeners import ensure_free
from services.common.metrics import HealthMetrics, RpcMetrics
from services.common.pki import TlsFiles
from services.common.reflection import add_reflection_service
from services.common.service_tls import server_credentials
from services.common.settings import Settings
from services.common.telemetry import records_spans
from services.common.validation import RequestValidator

logger = logging.getLogger(__name__)

# Two servers must never share a port silently: grpc enables SO_REUSEPORT by default on Linux.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service implementation and the generated function that adds it to a server."""

    full_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class ServerDeps:
    """Everything `create_server` needs besides settings; built by the composition root."""

    services: Sequence[ServiceRegistration]
    identity: IdentityResolver
    registry: CollectorRegistry
    tracer_provider: TracerProvider
    # The process's certificate: the listener requires a client certificate from the same CA.
    tls: TlsFiles
    probes: Sequence[DependencyProbe] = ()
    validator: RequestValidator = field(default_factory=RequestValidator)


class ParleyServer:
    """A grpc.aio server plus the health monitor that must live exactly as long as it does."""

    def __init__(self, server: grpc.aio.Server, monitor: HealthMonitor, *, grace_s: float) -> None:
        self.grpc = server
        self.health = monitor
        self._grace_s = grace_s
        self._stop_monitor = asyncio.Event()
        self._monitor_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The first verdict is published before serving, so no probe ever sees a stale SERVING.
        await self.health.probe_once()
        await self.grpc.start()
        self._monitor_task = asyncio.create_task(self.health.run(self._stop_monitor), name="health-monitor")

    async def stop(self) -> None:
        await self.health.shutting_down()
        self._stop_monitor.set()
        if self._monitor_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        await self.grpc.stop(self._grace_s)

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


def create_server(settings: Settings, deps: ServerDeps) -> tuple[ParleyServer, int]:
    """Build (not start) the server, bound to settings.grpc_host:grpc_port; port 0 picks a free one.

    The port speaks TLS only and requires a client certificate from the CA of `deps.tls`, so no byte
    of an unauthenticated peer reaches a servicer; each method then admits the callers its contract
    names (`services.common.callers`).
    """
    tracing = records_spans(deps.tracer_provider)
    service_names = [registration.full_name for registration in deps.services]
    interceptors: list[grpc.aio.ServerInterceptor] = [
        CallPipeline(
            RpcMetrics(deps.registry),
            CallerPolicy.from_contracts(service_names),
            deps.identity,
            deps.validator,
            continue_trace=not tracing,
        )
    ]
    if tracing:
        # Outermost, so the span covers the whole call; without recording, the pipeline only
        # continues the caller's trace context, which is all logs and outbox events need.
        interceptors.insert(0, aio_server_interceptor(tracer_provider=deps.tracer_provider))
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    for registration in deps.services:
        registration.add_to_server(registration.servicer, server)

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection_service(server, [*service_names, "grpc.health.v1.Health"], contract_files())
    monitor = HealthMonitor(
        health_servicer,
        service_names,
        deps.probes,
        interval_s=settings.health_probe_interval_s,
        metrics=HealthMetrics(deps.registry),
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    # Checked first: gRPC would log its own error line for a taken port before failing.
    ensure_free("grpc_port", settings.grpc_host, settings.grpc_port)
    credentials = server_credentials(deps.tls)
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC on {address}")
    return ParleyServer(server, monitor, grace_s=settings.shutdown_grace_s), port


def contract_only(
    full_name: str, servicer_base: type[Any], add_to_server: Callable[[Any, grpc.aio.Server], None]
) -> ServiceRegistration:
    """Register a service whose RPCs are specified but not built yet.

    The generated base class raises NotImplementedError for every method, which the error-mapping
    interceptor answers as UNIMPLEMENTED with reason NOT_IMPLEMENTED: honest, never fake data.
    """
    return ServiceRegistration(full_name=full_name, servicer=servicer_base(), add_to_server=add_to_server)


def contract_only_services(
    pb2_module: ModuleType, pb2_grpc_module: ModuleType, *, except_services: Sequence[str] = ()
) -> list[ServiceRegistration]:
    """`contract_only` for every service a generated proto module declares (except those named)."""
    registrations = []
    for name, service in pb2_module.DESCRIPTOR.services_by_name.items():
        if name in except_services:
            continue
        registrations.append(
            contract_only(
                service.full_name,
                getattr(pb2_grpc_module, f"{name}Servicer"),
                getattr(pb2_grpc_module, f"add_{name}Servicer_to_server"),
            )
        )
    return registrations
