"""Plumbing every Parley process shares: observability setup, identity, signals, the service catalog."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from gateway.envoy_process import EnvoyProcess
from services.common.db import Database
from services.common.identity import IdentityResolver, JwksTokenVerifier, NoTokenVerifier, TokenVerifier
from services.common.logs import configure_logging
from services.common.metrics import new_registry
from services.common.server import ServiceRegistration
from services.common.settings import ServiceName, Settings
from services.common.telemetry import create_tracer_provider

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observability:
    """The metrics registry and tracer provider of one process."""

    registry: CollectorRegistry
    tracer_provider: TracerProvider


def set_up_observability(settings: Settings, *, process_name: str) -> Observability:
    configure_logging(service=process_name, level=settings.log_level, log_format=settings.log_format)
    return Observability(
        registry=new_registry(),
        tracer_provider=create_tracer_provider(service=process_name, otlp_endpoint=settings.otlp_endpoint),
    )


def token_verifier_for(settings: Settings) -> TokenVerifier:
    """The verifier for direct-call JWTs: a configured JWKS file, or one that refuses every token."""
    if settings.jwks_path is None:
        return NoTokenVerifier()
    return JwksTokenVerifier.from_file(
        settings.jwks_path, issuer=settings.jwt_issuer, audience=settings.jwt_audience
    )


def identity_resolver_for(settings: Settings, gateway_secret: str | None) -> IdentityResolver:
    return IdentityResolver(gateway_secret=gateway_secret, token_verifier=token_verifier_for(settings))


def service_registrations(name: ServiceName, database: Database) -> list[ServiceRegistration]:
    """The gRPC services one Parley service hosts; imported lazily so `serve auth` loads only auth."""
    builder: Callable[[Database], list[ServiceRegistration]]
    if name == "auth":
        from services.auth.wiring import registrations as builder
    elif name == "chat":
        from services.chat.wiring import registrations as builder
    elif name == "billing":
        from services.billing.wiring import registrations as builder
    else:
        from services.analytics.wiring import registrations as builder
    return builder(database)


def all_registrations(names: Sequence[ServiceName], database: Database) -> list[ServiceRegistration]:
    return [registration for name in names for registration in service_registrations(name, database)]


def install_stop_signals(stop: asyncio.Event) -> None:
    """Ctrl-C and SIGTERM both ask for a clean shutdown instead of killing the process mid-flight."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _request_stop, stop, signum)


def _request_stop(stop: asyncio.Event, signum: int) -> None:
    if stop.is_set():
        return
    logger.info("received %s, shutting down", signal.Signals(signum).name)
    stop.set()


def connectable_host(bind_host: str) -> str:
    """The address a local client uses to reach a server bound to `bind_host` (wildcards → loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "", "::", "[::]") else bind_host  # noqa: S104


async def until_stopped_or_exited(stop: asyncio.Event, envoy: EnvoyProcess) -> None:
    """Return when a stop is requested or the Envoy child dies; either way the caller shuts down."""
    stop_waiter = asyncio.create_task(stop.wait())
    envoy_waiter = asyncio.create_task(envoy.wait())
    done, pending = await asyncio.wait({stop_waiter, envoy_waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if envoy_waiter in done:
        logger.error("envoy exited unexpectedly with code %s; stopping", envoy_waiter.result())
