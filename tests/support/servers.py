"""Start the production gRPC server factory in-process for tests: port 0, mTLS with the session's PKI,
the real interceptor chain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

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
from tests.support.pki import SERVICES, ServicePki


def hosted(names: Sequence[ServiceName], database: Database) -> list[ServiceRegistration]:
    """The registrations the named services' wiring builds, as `parley serve` would host them."""
    context = ServiceContext(load_settings(), database, InMemoryRevocationList(), embedded=False)
    return registrations_of(build_services(names, context))


@dataclass
class RunningServer:
    """A started server; `channel` calls it as the gateway (whose identity headers it believes)."""

    server: ParleyServer
    port: int
    registry: CollectorRegistry
    pki: ServicePki
    channel: grpc.aio.Channel
    _opened: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel_as(self, workload: str) -> grpc.aio.Channel:
        """A channel presenting workload `workload`'s certificate; closed with the server."""
        channel = self.pki.channel(self.target, as_=workload)
        self._opened.append(channel)
        return channel

    async def close_channels(self) -> None:
        for channel in (self.channel, *self._opened):
            await channel.close()


@asynccontextmanager
async def serving(
    services: Sequence[ServiceRegistration],
    *,
    pki: ServicePki,
    probes: Sequence[DependencyProbe] = (),
    tracer_provider: TracerProvider | None = None,
    probe_interval_s: float = 60,
) -> AsyncIterator[RunningServer]:
    """A started server for `services` (presenting the services process's certificate of `pki`) and a
    channel to it as the gateway; both closed afterwards."""
    registry = new_registry()
    server, port = create_server(
        load_settings(grpc_port=0, metrics_port=0, health_probe_interval_s=probe_interval_s),
        ServerDeps(
            services=services,
            identity=IdentityResolver(token_verifier=NoTokenVerifier()),
            registry=registry,
            tracer_provider=tracer_provider or create_tracer_provider(service="test", otlp_endpoint=None),
            tls=pki.files(SERVICES),
            probes=probes,
        ),
    )
    await server.start()
    try:
        running = RunningServer(server, port, registry, pki, pki.channel(f"127.0.0.1:{port}", as_="gateway"))
        try:
            yield running
        finally:
            await running.close_channels()
    finally:
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
