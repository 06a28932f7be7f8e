"""Microservices mode: `parley serve <service>` and `parley gateway`, one process each."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.envoy_process import EnvoyProcess
from gateway.topology import Topology
from runtime.edge_wiring import serving_edge
from runtime.process import (
    host_services,
    install_stop_signals,
    revocation_list_for,
    run_background,
    service_tls_for,
    set_up_observability,
    settle_heap,
    subscriptions_of,
    until_stopped_or_exited,
)
from runtime.workers import run_service_consumers
from services.common.db import Database
from services.common.metrics import serve_metrics
from services.common.pki import EDGE
from services.common.ratelimit import DEFAULT_RATE_LIMITS_FILE, load_rate_limit_config
from services.common.settings import DEFAULT_SERVICE_PORTS, ServiceName, Settings, SettingsError

logger = logging.getLogger(__name__)


async def serve_service(name: ServiceName, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Host one service's gRPC servers until stopped; schema changes are `parley migrate`'s job."""
    tls = service_tls_for(settings, name)
    observability = set_up_observability(settings, process_name=name)
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    database = Database(settings.resolved_database_url)
    services = host_services(settings, [name], database, tls, observability, embedded=False)
    subscriptions = subscriptions_of(services.bundles)
    if subscriptions and settings.redis_url is None:
        raise SettingsError(
            f"parley serve {name} needs PARLEY_REDIS_URL: it consumes events from Redis Streams "
            "(embedded mode, `parley up`, runs its consumers in process instead)"
        )
    metrics = (
        serve_metrics(observability.registry, settings.metrics_host, settings.metrics_port)
        if (settings.metrics_port)
        else None
    )
    try:
        await services.start()
        logger.info(
            "serving %s",
            name,
            extra={"grpc_port": services.port, "metrics_port": metrics.port if metrics else None},
        )
        sys.stdout.write(f"parley {name} serving gRPC on {settings.grpc_host}:{services.port}\n")
        sys.stdout.flush()
        settle_heap()
        await asyncio.gather(
            stop.wait(),
            run_background(services.bundles, stop),
            run_service_consumers(
                subscriptions,
                database,
                settings.redis_url or "",
                stop,
                registry=observability.registry,
                tracer_provider=observability.tracer_provider,
            ),
        )
    finally:
        stop.set()
        await services.stop()
        if metrics is not None:
            metrics.close()
        await database.dispose()
        observability.tracer_provider.shutdown()


async def run_gateway(topology: Topology, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run Envoy for `topology` plus the edge gRPC server (reflection, health, rate limits, ext_authz).

    Both are in this process's trust: Envoy presents the topology's certificate and the edge server
    the same one, which names both workloads (`gateway` and `edge`).
    """
    observability = set_up_observability(settings, process_name="gateway")
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    # The edge checks API keys and cookie sessions with auth: where the topology routes auth traffic,
    # unless PARLEY_AUTH_TARGET says otherwise.
    auth = topology.upstreams["auth"]
    rate_limits = load_rate_limit_config(topology.rate_limits_path)
    revocations = revocation_list_for(settings)
    envoy = EnvoyProcess(topology, config_dir=settings.data_dir / "envoy")
    # The edge's own metrics: rate-limit decisions and failures, authorization checks.
    metrics = (
        serve_metrics(observability.registry, settings.metrics_host, settings.metrics_port)
        if settings.metrics_port
        else None
    )
    try:
        async with serving_edge(
            settings,
            host=topology.edge.host,
            port=topology.edge.port,
            tls=topology.gateway_tls,
            auth_target=settings.auth_target or f"{auth.host}:{auth.port}",
            rate_limits=rate_limits,
            revocations=revocations,
            registry=observability.registry,
        ):
            try:
                await envoy.start()
                sys.stdout.write(
                    f"parley gateway ({topology.name}) listening on http://{topology.listen_address}:"
                    f"{topology.http_port}\n"
                )
                sys.stdout.flush()
                settle_heap()
                await until_stopped_or_exited(stop, {"envoy": envoy.wait})
            finally:
                await envoy.stop()
    finally:
        await revocations.aclose()
        if metrics is not None:
            metrics.close()
        observability.tracer_provider.shutdown()


async def run_edge(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """`parley edge`: the gateway's edge server alone, for an Envoy that runs elsewhere (`parley up`
    starts it as a child, so rate-limit decisions never queue behind the services' own work)."""
    # The data file first: a bad one stops the process before anything is started.
    rate_limits = load_rate_limit_config(settings.rate_limits_file or DEFAULT_RATE_LIMITS_FILE)
    tls = service_tls_for(settings, EDGE)
    observability = set_up_observability(settings, process_name="edge")
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    # Without Redis there is no shared revocation list to read; the services still refuse revoked
    # tokens themselves, from the token's issue time that the edge passes on.
    revocations = revocation_list_for(settings) if settings.redis_url else None
    metrics = (
        serve_metrics(
            observability.registry,
            settings.metrics_host,
            settings.edge_metrics_port,
            setting="edge_metrics_port",
        )
        if settings.edge_metrics_port
        else None
    )
    try:
        async with serving_edge(
            settings,
            host="127.0.0.1",
            port=settings.edge_port,
            tls=tls,
            auth_target=settings.auth_target or f"127.0.0.1:{DEFAULT_SERVICE_PORTS['auth']}",
            rate_limits=rate_limits,
            revocations=revocations,
            registry=observability.registry,
        ) as port:
            logger.info(
                "serving the edge", extra={"port": port, "metrics_port": metrics.port if metrics else None}
            )
            sys.stdout.write(f"parley edge serving gRPC on 127.0.0.1:{port}\n")
            sys.stdout.flush()
            settle_heap()
            await stop.wait()
    finally:
        if revocations is not None:
            await revocations.aclose()
        if metrics is not None:
            metrics.close()
        observability.tracer_provider.shutdown()
