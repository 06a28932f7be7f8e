"""Microservices mode: `parley serve <service>` and `parley gateway`, one process each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from gateway.edge import create_edge_server
from gateway.envoy_process import EnvoyProcess
from gateway.topology import Topology
from runtime.edge_wiring import build_edge_wiring
from runtime.process import (
    build_services,
    identity_for,
    install_stop_signals,
    read_cache_for,
    registrations_of,
    revocation_list_for,
    set_up_observability,
    start_services,
    stop_services,
    until_stopped_or_exited,
)
from services.common.context import ServiceContext
from services.common.contracts import descriptor_set_bytes
from services.common.db import Database
from services.common.health import DependencyProbe
from services.common.metrics import serve_metrics
from services.common.ratelimit import load_rate_limit_config
from services.common.server import ServerDeps, create_server
from services.common.settings import ServiceName, Settings

logger = logging.getLogger(__name__)


async def serve_service(name: ServiceName, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Host one service's gRPC servers until stopped; schema changes are `parley migrate`'s job."""
    observability = set_up_observability(settings, process_name=name)
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    database = Database(settings.resolved_database_url)
    if settings.gateway_secret is None:
        logger.warning("PARLEY_GATEWAY_SECRET is unset: identity headers from a gateway will be refused")
    context = ServiceContext(
        settings,
        database,
        revocation_list_for(settings),
        embedded=False,
        read_cache=read_cache_for(settings, observability.registry),
    )
    bundles = build_services([name], context)
    gateway_secret = settings.gateway_secret.get_secret_value() if settings.gateway_secret else None
    identity = identity_for(settings, bundles, context, gateway_secret)
    server, port = create_server(
        settings,
        ServerDeps(
            services=registrations_of(bundles),
            identity=identity.resolver,
            registry=observability.registry,
            tracer_provider=observability.tracer_provider,
            probes=[DependencyProbe("database", database.ping)],
        ),
    )
    metrics = (
        serve_metrics(observability.registry, settings.metrics_host, settings.metrics_port)
        if (settings.metrics_port)
        else None
    )
    try:
        await start_services(bundles)
        await server.start()
        logger.info(
            "serving %s", name, extra={"grpc_port": port, "metrics_port": metrics.port if metrics else None}
        )
        sys.stdout.write(f"parley {name} serving gRPC on {settings.grpc_host}:{port}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.stop()
        await stop_services(bundles)
        await identity.close()
        await context.read_cache.close()
        if metrics is not None:
            metrics.close()
        await database.dispose()
        observability.tracer_provider.shutdown()


async def run_gateway(topology: Topology, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run Envoy for `topology` plus the edge gRPC server that answers reflection and health."""
    observability = set_up_observability(settings, process_name="gateway")
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    # The edge checks API keys and cookie sessions with auth: where the topology routes auth traffic,
    # unless PARLEY_AUTH_TARGET says otherwise.
    auth = topology.upstreams["auth"]
    edge = build_edge_wiring(
        settings,
        auth_target=settings.auth_target or f"{auth.host}:{auth.port}",
        rate_limits=load_rate_limit_config(topology.rate_limits_path),
        revocations=revocation_list_for(settings),
        registry=observability.registry,
    )
    edge_server, _edge_port = await create_edge_server(
        descriptor_set_bytes(),
        host=topology.edge.host,
        port=topology.edge.port,
        services_for_envoy=edge.services,
    )
    envoy = EnvoyProcess(topology, config_dir=settings.data_dir / "envoy")
    # The edge's own metrics: rate-limit decisions and failures, authorization checks.
    metrics = (
        serve_metrics(observability.registry, settings.metrics_host, settings.metrics_port)
        if settings.metrics_port
        else None
    )
    try:
        await edge_server.start()
        await envoy.start()
        sys.stdout.write(
            f"parley gateway ({topology.name}) listening on http://{topology.listen_address}:"
            f"{topology.http_port}\n"
        )
        sys.stdout.flush()
        await until_stopped_or_exited(stop, envoy)
    finally:
        await envoy.stop()
        with contextlib.suppress(Exception):
            await edge_server.stop(settings.shutdown_grace_s)
        await edge.close()
        if metrics is not None:
            metrics.close()
        observability.tracer_provider.shutdown()
