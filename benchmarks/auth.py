"""`scripts/bench auth`: the auth service's hot RPCs over real gRPC, each compared with a cheap baseline.

The production server (`services.common.server.create_server`: tracing, metrics, identity,
validation and error-mapping interceptors, health, reflection) hosts the auth wiring
(`services.auth.wiring.build_bundle`) in this process, on loopback, over a brand-new database:
PostgreSQL by default (created for the run and dropped after it, on the server named by
PARLEY_TEST_POSTGRES_URL), or a SQLite file with `--sqlite`. Clients are the generated stubs on one
channel, `--concurrency` closed-loop callers (32 by default); every workload stops at `--requests`
or `--seconds`, whichever comes first.

Workloads, in order:
  GetJwks              the baseline: an anonymous RPC through the same chain (one indexed read)
  Health.Check         for scale only: the same interceptor chain and no database at all
  Login                argon2id-bound (one verify per call, in a worker thread): reported, not tuned
  RefreshSession       rotation; every refresh token is presented exactly once, and its successor
                       goes back into the pool for a later call (so no call ever trips reuse detection)
  CheckApiKey cache on   the gateway's API-key check, served from the in-process cache after the first
  CheckApiKey cache off  the same keys against a second server whose ApiKeyManager has cache_ttl_s=0

Caveats: client and server share one process and event loop, so client-side protobuf and HTTP/2
work is counted in every figure (the ratios are the comparable numbers). Logging is at WARNING.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from benchmarks.harness import Measurement, Report, Workload, closed_loop, print_report, scratch_database
from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from runtime.process import (
    identity_for,
    registrations_of,
    revocation_list_for,
    set_up_observability,
    start_services,
)
from services.auth.api_keys import DEFAULT_CACHE_TTL_S
from services.auth.passwords import Argon2Parameters
from services.auth.signing_keys import generate_kek
from services.auth.wiring import build_bundle
from services.common.context import ServiceBundle, ServiceContext
from services.common.db import Database
from services.common.health import DependencyProbe
from services.common.metrics import new_registry
from services.common.migrate import upgrade_async
from services.common.pki import GATEWAY, MICROSERVICES_CERTIFICATES, PkiReport, ensure_pki
from services.common.server import ParleyServer, ServerDeps, ServiceRegistration, create_server
from services.common.service_tls import secure_channel_for
from services.common.settings import Settings, load_settings

BASELINE: Final = "GetJwks"
PASSWORD: Final = "violet-harbour-lantern-42"  # noqa: S105 - the benchmark accounts' password
USERS: Final = 8
KEYS_PER_USER: Final = 4
INTERNAL_SERVICE: Final = auth_pb2.DESCRIPTOR.services_by_name["AuthInternalService"].full_name


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PostgreSQL")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument("--requests", type=int, default=20_000, help="at most this many calls per workload")
    parser.add_argument("--seconds", type=float, default=10.0, help="at most this long per workload")
    arguments = parser.parse_args(argv)
    if arguments.concurrency < 1 or arguments.requests < 1 or arguments.seconds <= 0:
        parser.error("--concurrency and --requests must be at least 1, --seconds positive")
    return arguments


@dataclass
class Servers:
    """The two servers of a run: the auth wiring as deployed, and a CheckApiKey one with no cache."""

    main: grpc.aio.Channel
    uncached: grpc.aio.Channel


async def run(arguments: argparse.Namespace) -> Report:
    # The machine is shared: what else was running is part of the result.
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    async with scratch_database(sqlite=arguments.sqlite) as (url, dialect):
        await upgrade_async(url)
        settings = load_settings(
            database_url=url,
            grpc_port=0,
            metrics_port=0,
            log_level="WARNING",
            log_format="console",
            auth_key_encryption_key=generate_kek(),
        )
        database = Database(url)
        try:
            async with _servers(settings, database) as servers:
                report = await _measure(arguments, servers)
        finally:
            await database.dispose()
    report.notes.update(
        {
            "database": dialect,
            "argon2": asdict(Argon2Parameters()),
            "api_key_cache_ttl_s": DEFAULT_CACHE_TTL_S,
            "users": USERS,
            "api_keys": USERS * KEYS_PER_USER,
            "bounds": {"requests": arguments.requests, "seconds": arguments.seconds},
            "setup": "server and client in one process and event loop, loopback gRPC with mTLS, one channel",
            "load_average_at_start": load_at_start,
        }
    )
    return report


@contextlib.asynccontextmanager
async def _servers(settings: Settings, database: Database) -> AsyncIterator[Servers]:
    with tempfile.TemporaryDirectory(prefix="parley-bench-pki-") as pki_directory:
        # As in production: the server proves it is auth; the client is `parley gateway`'s process
        # (Envoy and the edge), whose certificate may call both the public and the internal RPCs.
        pki = ensure_pki(Path(pki_directory), MICROSERVICES_CERTIFICATES)
        async with _servers_with(settings, database, pki) as servers:
            yield servers


@contextlib.asynccontextmanager
async def _servers_with(settings: Settings, database: Database, pki: PkiReport) -> AsyncIterator[Servers]:
    observability = set_up_observability(settings, process_name="bench-auth")
    context = ServiceContext(settings, database, revocation_list_for(settings), embedded=False)
    deployed = build_bundle(context)
    uncached = build_bundle(context, api_key_cache_ttl_s=0)
    await start_services([deployed, uncached])
    identity = identity_for(settings, [deployed], context, pki.files("auth"))

    def serve(
        registrations: list[ServiceRegistration], registry: CollectorRegistry
    ) -> tuple[ParleyServer, int]:
        return create_server(
            settings,
            ServerDeps(
                services=registrations,
                identity=identity.resolver,
                registry=registry,
                tracer_provider=observability.tracer_provider,
                tls=pki.files("auth"),
                probes=[DependencyProbe("database", database.ping)],
            ),
        )

    main_server, main_port = serve(registrations_of([deployed]), observability.registry)
    # A registry of its own: one registry cannot hold the server metrics twice.
    uncached_server, uncached_port = serve(_internal_only(uncached), new_registry())
    await main_server.start()
    await uncached_server.start()
    main = secure_channel_for(f"127.0.0.1:{main_port}", pki.files(GATEWAY), server="auth")
    uncached_channel = secure_channel_for(f"127.0.0.1:{uncached_port}", pki.files(GATEWAY), server="auth")
    try:
        yield Servers(main, uncached_channel)
    finally:
        await main.close()
        await uncached_channel.close()
        await main_server.stop()
        await uncached_server.stop()
        await identity.close()
        await context.revocations.aclose()


def _internal_only(bundle: ServiceBundle) -> list[ServiceRegistration]:
    """The bundle's AuthInternalService alone: all the cache-off server needs to answer."""
    return [
        registration for registration in bundle.registrations if registration.full_name == INTERNAL_SERVICE
    ]


async def _measure(arguments: argparse.Namespace, servers: Servers) -> Report:
    public = auth_pb2_grpc.AuthServiceStub(servers.main)
    internal = auth_pb2_grpc.AuthInternalServiceStub(servers.main)
    internal_uncached = auth_pb2_grpc.AuthInternalServiceStub(servers.uncached)
    health_stub = health_pb2_grpc.HealthStub(servers.main)
    concurrency = arguments.concurrency

    emails = [f"bench-{index}@example.com" for index in range(USERS)]
    await asyncio.gather(
        *(
            public.Register(auth_pb2.RegisterRequest(email=e, password=PASSWORD, display_name="Bench"))
            for e in emails
        )
    )

    # Every session a Login call starts feeds the refresh pool.
    refresh_pool: asyncio.Queue[str] = asyncio.Queue()

    async def login(index: int) -> auth_pb2.LoginResponse:
        response: auth_pb2.LoginResponse = await public.Login(
            auth_pb2.LoginRequest(email=emails[index % USERS], password=PASSWORD)
        )
        refresh_pool.put_nowait(response.tokens.refresh_token)
        return response

    async def refresh(index: int) -> None:
        try:
            presented = refresh_pool.get_nowait()
        except asyncio.QueueEmpty:
            raise RuntimeError("the refresh-token pool ran dry") from None
        response = await public.RefreshSession(auth_pb2.RefreshSessionRequest(refresh_token=presented))
        # A failed refresh drops its token: presenting it again could look like reuse.
        refresh_pool.put_nowait(response.tokens.refresh_token)

    api_keys = await _create_api_keys(public, emails)

    async def check_cached(index: int) -> object:
        return await internal.CheckApiKey(
            auth_pb2.CheckApiKeyRequest(api_key=api_keys[index % len(api_keys)])
        )

    async def check_uncached(index: int) -> object:
        request = auth_pb2.CheckApiKeyRequest(api_key=api_keys[index % len(api_keys)])
        return await internal_uncached.CheckApiKey(request)

    async def jwks(index: int) -> object:
        return await public.GetJwks(auth_pb2.GetJwksRequest())

    async def health(index: int) -> object:
        return await health_stub.Check(health_pb2.HealthCheckRequest(service=INTERNAL_SERVICE))

    report = Report(benchmark="auth", baseline=BASELINE)
    errors: dict[str, str] = {}

    async def measure(workload: Workload, *, warmup: int) -> Measurement:
        measurement = await closed_loop(
            workload.name,
            workload,
            concurrency=concurrency,
            max_requests=arguments.requests,
            max_seconds=arguments.seconds,
            warmup=warmup,
        )
        report.measurements.append(measurement)
        if workload.first_error is not None:
            errors[workload.name] = workload.first_error
        return measurement

    await measure(Workload(BASELINE, jwks), warmup=concurrency)
    # For scale: the same chain with no database at all.
    await measure(Workload("Health.Check (no database)", health), warmup=concurrency)
    await measure(Workload("Login", login), warmup=2)
    # Refreshes need at least one session per caller (twice that keeps every caller busy).
    missing = 2 * concurrency - refresh_pool.qsize()
    if missing > 0:
        await asyncio.gather(*(login(index) for index in range(missing)))
    report.notes["refresh_sessions"] = refresh_pool.qsize()
    await measure(Workload("RefreshSession", refresh), warmup=concurrency)
    await measure(Workload("CheckApiKey cache on", check_cached), warmup=len(api_keys))
    await measure(Workload("CheckApiKey cache off", check_uncached), warmup=len(api_keys))
    if errors:
        report.notes["first_error"] = errors
    return report


async def _create_api_keys(public: auth_pb2_grpc.AuthServiceStub, emails: list[str]) -> list[str]:
    secrets: list[str] = []
    for email in emails:
        signed_in: auth_pb2.LoginResponse = await public.Login(
            auth_pb2.LoginRequest(email=email, password=PASSWORD)
        )
        metadata = (("authorization", f"Bearer {signed_in.tokens.access_token}"),)
        for index in range(KEYS_PER_USER):
            created: auth_pb2.CreateApiKeyResponse = await public.CreateApiKey(
                auth_pb2.CreateApiKeyRequest(name=f"bench {index}"), metadata=metadata
            )
            secrets.append(created.secret)
    return secrets


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    # Parley never forks Python that uses gRPC; silence grpc's fork-handler warnings as the CLI does.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    report = uvloop.run(run(arguments))
    path = report.write()
    print_report(report, path)
    first_errors = report.notes.get("first_error")
    if isinstance(first_errors, dict):
        for name, error in first_errors.items():
            print(f"first error in {name}: {error}")  # noqa: T201 - a benchmark reports to the terminal.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
