"""Plumbing every Parley process shares: observability setup, identity, signals, the service catalog."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.common.cache import CacheMetrics, InMemoryReadCache, ReadCache, RedisReadCache
from services.common.call_context import current_method
from services.common.consumers import EventSubscription
from services.common.context import ServiceBundle, ServiceContext
from services.common.contracts import contract_files
from services.common.db import Database
from services.common.health import DependencyProbe
from services.common.identity import (
    CachedJwksVerifier,
    IdentityResolver,
    JwksTokenVerifier,
    NoTokenVerifier,
    TokenVerifier,
)
from services.common.jwks_client import grpc_jwks_fetcher
from services.common.logs import configure_logging
from services.common.method_access import access_by_path, sensitive_paths
from services.common.metrics import new_registry
from services.common.pki import PkiError, TlsFiles
from services.common.redis_multiplex import MultiplexedRedis
from services.common.revocation import (
    InMemoryRevocationList,
    RedisRevocationList,
    RevocationFeedMirror,
    RevocationList,
)
from services.common.server import ParleyServer, ServerDeps, ServiceRegistration, create_server
from services.common.service_tls import TlsMaterial, secure_channel_for
from services.common.settings import ServiceName, Settings, SettingsError
from services.common.telemetry import create_tracer_provider
from services.common.token_rules import TokenRules

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


def sensitive_methods() -> frozenset[str]:
    """The gRPC paths of every method whose contract marks it sensitive (`MethodAccess.sensitive`),
    read from the generated module of each contract file that defines services."""
    services: list[ServiceDescriptor] = []
    for file in contract_files():
        if file.package.startswith("parley.") and file.service:
            module = importlib.import_module(file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
            services.extend(module.DESCRIPTOR.services_by_name[service.name] for service in file.service)
    return sensitive_paths(access_by_path(services))


def revocation_list_for(settings: Settings) -> RevocationList:
    """Redis when configured (shared by every replica and service), else this process's memory.

    With Redis, checks read the process's mirror of the list, except for calls of sensitive methods,
    which ask Redis itself (an action on the caller's own credentials never rests on a copy)."""
    if settings.redis_url is None:
        return InMemoryRevocationList()
    prefix = "parley:revoked:"
    sensitive = sensitive_methods()
    return RedisRevocationList(
        MultiplexedRedis.from_url(settings.redis_url),
        key_prefix=prefix,
        mirror=RevocationFeedMirror(settings.redis_url, key_prefix=prefix),
        authoritative=lambda: current_method.get() in sensitive,
    )


# A cache read that takes longer than this is abandoned (and counted) for a read of the database:
# Redis answers in well under a millisecond here, and a cache that is slower than the database
# only adds latency. No retries, for the same reason.
CACHE_REDIS_TIMEOUT_S = 0.5


def read_cache_for(settings: Settings, registry: CollectorRegistry) -> ReadCache:
    """Redis when configured (every replica sees every invalidation), else this process's memory."""
    metrics = CacheMetrics(registry)
    if settings.redis_url is None:
        return InMemoryReadCache(metrics=metrics)
    client = Redis.from_url(
        settings.redis_url,
        socket_timeout=CACHE_REDIS_TIMEOUT_S,
        socket_connect_timeout=CACHE_REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    return RedisReadCache(client, key_prefix="cache:", metrics=metrics)


def build_services(names: Sequence[ServiceName], context: ServiceContext) -> list[ServiceBundle]:
    """Each named service's wiring; imported lazily so `serve auth` loads only auth."""
    builders: list[Callable[[ServiceContext], ServiceBundle]] = []
    for name in names:
        if name == "auth":
            from services.auth.wiring import build as builder
        elif name == "chat":
            from services.chat.wiring import build as builder
        elif name == "billing":
            from services.billing.wiring import build as builder
        else:
            from services.analytics.wiring import build as builder
        builders.append(builder)
    return [builder(context) for builder in builders]


@dataclass
class Identity:
    """The identity resolver of one process and the channel its JWKS fetches use, if any."""

    resolver: IdentityResolver
    channel: grpc.aio.Channel | None

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def service_tls_for(settings: Settings, name: str) -> TlsFiles:
    """This process's certificate files (PARLEY_SERVICE_*_FILE, else certificate `name` in the data
    dir's pki folder), checked now: a missing or mismatched file stops the start with one message."""
    files = settings.service_tls_files(name)
    try:
        TlsMaterial.read(files)
    except (OSError, PkiError) as error:
        raise SettingsError(
            "Invalid Parley settings:\n"
            f"  PARLEY_SERVICE_CA_FILE / _CERT_FILE / _KEY_FILE: {error} (this process needs the "
            f"certificate of workload {name!r}; `parley pki init --dir {settings.pki_dir}` makes one)"
        ) from None
    return files


def identity_for(
    settings: Settings, bundles: Sequence[ServiceBundle], context: ServiceContext, tls: TlsFiles
) -> Identity:
    """How this process verifies callers: its own signing keys when it hosts auth, else auth's JWKS
    (fetched over mTLS with this process's certificate `tls`)."""
    channel = None
    verifier: TokenVerifier
    local_jwks = next((bundle.jwks for bundle in bundles if bundle.jwks is not None), None)
    if settings.jwks_path is not None:
        verifier = JwksTokenVerifier.from_file(
            settings.jwks_path, rules=TokenRules.of(settings), revocations=context.revocations
        )
    elif local_jwks is not None or settings.auth_target is not None:
        if local_jwks is None:
            assert settings.auth_target is not None
            channel = secure_channel_for(settings.auth_target, tls, server="auth")
            local_jwks = grpc_jwks_fetcher(channel)
        verifier = CachedJwksVerifier(
            local_jwks, rules=TokenRules.of(settings), revocations=context.revocations
        )
    else:
        logger.warning("no PARLEY_AUTH_TARGET: bearer tokens cannot be verified by this process")
        verifier = NoTokenVerifier()
    resolver = IdentityResolver(token_verifier=verifier, revocations=context.revocations)
    return Identity(resolver, channel)


@dataclass
class HostedServices:
    """Services of one process on their gRPC server, with what they hold open (`host_services`)."""

    context: ServiceContext
    bundles: list[ServiceBundle]
    identity: Identity
    server: ParleyServer
    port: int

    async def start(self) -> None:
        await start_services(self.bundles)
        await self.server.start()

    async def stop(self) -> None:
        # The edges' credential-change streams never end on their own: ended before the server's
        # grace period, which is for the calls in flight.
        self.context.revocations.credential_changes().close()
        await self.server.stop()
        await stop_services(self.bundles)
        await self.identity.close()
        await self.context.read_cache.close()
        await self.context.revocations.aclose()


def host_services(
    settings: Settings,
    names: Sequence[ServiceName],
    database: Database,
    tls: TlsFiles,
    observability: Observability,
    *,
    embedded: bool,
) -> HostedServices:
    """The named services on one gRPC server (built, not started), as `parley up` and `parley serve`
    host them: mTLS with `tls`, identity from auth's keys, and the database as a health dependency."""
    context = ServiceContext(
        settings,
        database,
        revocation_list_for(settings),
        embedded=embedded,
        read_cache=read_cache_for(settings, observability.registry),
    )
    bundles = build_services(names, context)
    identity = identity_for(settings, bundles, context, tls)
    server, port = create_server(
        settings,
        ServerDeps(
            services=registrations_of(bundles),
            identity=identity.resolver,
            registry=observability.registry,
            tracer_provider=observability.tracer_provider,
            tls=tls,
            probes=[DependencyProbe("database", database.ping)],
        ),
    )
    return HostedServices(context, bundles, identity, server, port)


def registrations_of(bundles: Sequence[ServiceBundle]) -> list[ServiceRegistration]:
    return [registration for bundle in bundles for registration in bundle.registrations]


def subscriptions_of(bundles: Sequence[ServiceBundle]) -> list[EventSubscription]:
    return [subscription for bundle in bundles for subscription in bundle.subscriptions]


async def run_background(bundles: Sequence[ServiceBundle], stop: asyncio.Event) -> None:
    """Every service's background loops, until `stop` is set."""
    await asyncio.gather(*(loop(stop) for bundle in bundles for loop in bundle.background))


async def start_services(bundles: Sequence[ServiceBundle]) -> None:
    for bundle in bundles:
        for step in bundle.on_start:
            await step()


async def stop_services(bundles: Sequence[ServiceBundle]) -> None:
    for bundle in bundles:
        for step in bundle.on_stop:
            await step()


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


def settle_heap() -> None:
    """Collect once, then freeze what start-up built, at the end of a process's start.

    A full (generation 2) collection walks every tracked object, and start-up leaves hundreds of
    thousands (descriptors, models, compiled statements): each full collection then paused the
    event loop for 50-90 ms, the slowest requests under load. Frozen objects are never walked again,
    so later full collections see only what the requests made. They are never freed either, which
    is right for what start-up builds: it lives as long as the process.
    """
    gc.collect()
    gc.freeze()


def connectable_host(bind_host: str) -> str:
    """The address a local client uses to reach a server bound to `bind_host` (wildcards → loopback)."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "", "::", "[::]") else bind_host  # noqa: S104


async def until_stopped_or_exited(
    stop: asyncio.Event, children: Mapping[str, Callable[[], Coroutine[Any, Any, int]]]
) -> None:
    """Return when a stop is requested or a child process (name -> its `wait`) dies; either way the
    caller shuts down."""
    stop_waiter = asyncio.create_task(stop.wait())
    exits: dict[asyncio.Task[int], str] = {
        asyncio.create_task(wait()): name for name, wait in children.items()
    }
    done, pending = await asyncio.wait({stop_waiter, *exits}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done & exits.keys():
        logger.error("%s exited unexpectedly with code %s; stopping", exits[task], task.result())
