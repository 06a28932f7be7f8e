"""Start the production gRPC server factory in-process for tests: port 0, the real interceptor chain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from runtime.process import build_services, registrations_of
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.errors import details_of
from services.common.health import DependencyProbe
from services.common.identity import IdentityResolver, NoTokenVerifier
from services.common.metrics import new_registry
from services.common.revocation import InMemoryRevocationList
from services.common.server import ParleyServer, ServerDeps, ServiceRegistration, create_server
from services.common.settings import ServiceName, load_settings
from services.common.telemetry import create_tracer_provider

GATEWAY_SECRET = "test-gateway-secret"


def hosted(names: Sequence[ServiceName], database: Database) -> list[ServiceRegistration]:
    """The registrations the named services' wiring builds, as `parley serve` would host them."""
    context = ServiceContext(load_settings(), database, InMemoryRevocationList(), embedded=False)
    return registrations_of(build_services(names, context))


@dataclass
class RunningServer:
    server: ParleyServer
    port: int
    registry: CollectorRegistry
    channel: grpc.aio.Channel


@asynccontextmanager
async def serving(
    services: Sequence[ServiceRegistration],
    *,
    probes: Sequence[DependencyProbe] = (),
    tracer_provider: TracerProvider | None = None,
    probe_interval_s: float = 60,
) -> AsyncIterator[RunningServer]:
    """A started server for `services` and a channel to it; both closed afterwards."""
    registry = new_registry()
    server, port = create_server(
        load_settings(grpc_port=0, metrics_port=0, health_probe_interval_s=probe_interval_s),
        ServerDeps(
            services=services,
            identity=IdentityResolver(gateway_secret=GATEWAY_SECRET, token_verifier=NoTokenVerifier()),
            registry=registry,
            tracer_provider=tracer_provider or create_tracer_provider(service="test", otlp_endpoint=None),
            probes=probes,
        ),
    )
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(server, port, registry, channel)
    finally:
        await channel.close()
        await server.stop()


def rich_status(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """The google.rpc.Status a client reads off the trailers: its message and details by type name."""
    # grpcio-status also checks that the Status agrees with the call's own code and message.
    status = rpc_status.from_call(error)
    assert status is not None, "every error must carry grpc-status-details-bin"
    return {"message": status.message, **details_of(status)}


class CrashingBilling(billing_pb2_grpc.BillingServiceServicer):
    """Application code with a bug: GetPlan raises, to exercise the error path end to end."""

    async def GetPlan(
        self, request: billing_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetPlanResponse:
        raise RuntimeError("secret internals: /srv/app.py line 42")


def crashing_billing() -> ServiceRegistration:
    return ServiceRegistration(
        "parley.billing.v1.BillingService",
        CrashingBilling(),  # type: ignore[abstract]
        billing_pb2_grpc.add_BillingServiceServicer_to_server,
    )
