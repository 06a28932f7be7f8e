"""Per-email limits on sign-in and password-reset mail, spent by the real auth service over real
gRPC, with the limiter in memory and in Redis (shared by two auth replicas)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from runtime.process import identity_for, registrations_of, start_services, stop_services
from services.auth.signing_keys import generate_kek
from services.auth.wiring import build_bundle
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.errors import details_of
from services.common.metrics import new_registry
from services.common.migrate import upgrade_async
from services.common.revocation import InMemoryRevocationList
from services.common.server import ServerDeps, create_server
from services.common.settings import load_settings
from services.common.telemetry import create_tracer_provider
from tests.support.look_alikes import fullwidth, mathematical_bold
from tests.support.pki import ServicePki
from tests.support.rate_limits import scaled_rate_limits
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.asyncio

LOGIN_BURST = 3
FORGOT_BURST = 2


def email_limits_file(directory: Path) -> Path:
    """The shipped rules with small per-email bursts renamed per test (fresh Redis counters), and
    every other limit out of the way."""
    suffix = uuid.uuid4().hex[:8]
    return scaled_rate_limits(
        1,
        overrides={
            "login_email": {
                "name": f"login_email_{suffix}",
                "burst": LOGIN_BURST,
                "rate": {"requests": 1, "per_s": 3600},
            },
            "forgot_password_email": {
                "name": f"forgot_password_email_{suffix}",
                "burst": FORGOT_BURST,
                "rate": {"requests": 1, "per_s": 3600},
            },
        },
        directory=directory,
    )


@asynccontextmanager
async def auth_service(
    database_url: str, limits: Path, redis_url: str | None, pki: ServicePki
) -> AsyncIterator[Any]:
    settings = load_settings(
        database_url=database_url,
        grpc_port=0,
        metrics_port=0,
        auth_key_encryption_key=generate_kek(),
        rate_limits_file=limits,
        redis_url=redis_url,
    )
    database = Database(database_url)
    context = ServiceContext(settings, database, InMemoryRevocationList(), embedded=False)
    bundle = build_bundle(context)
    await start_services([bundle])
    identity = identity_for(settings, [bundle], context, pki.files("auth"))
    server, port = create_server(
        settings,
        ServerDeps(
            services=registrations_of([bundle]),
            identity=identity.resolver,
            registry=new_registry(),
            tracer_provider=create_tracer_provider(service="auth", otlp_endpoint=None),
            tls=pki.files("auth"),
        ),
    )
    await server.start()
    # Sign-ups and sign-ins as the gateway sends them.
    channel = pki.channel(f"127.0.0.1:{port}", as_="gateway")
    try:
        yield cast("auth_pb2_grpc.AuthServiceAsyncStub", auth_pb2_grpc.AuthServiceStub(channel))
    finally:
        await channel.close()
        await server.stop()
        await stop_services([bundle])
        await identity.close()
        await database.dispose()


async def login_code(auth: Any, email: str) -> grpc.StatusCode:
    try:
        await auth.Login(auth_pb2.LoginRequest(email=email, password="not-the-password-1"), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
async def test_login_attempts_per_email_are_limited_and_say_when_to_retry(
    sqlite_url: str, redis_url: str, tmp_path: Path, shared: bool, service_pki: ServicePki
) -> None:
    await upgrade_async(sqlite_url)
    limits = email_limits_file(tmp_path)
    victim, bystander = (f"{name}-{uuid.uuid4().hex[:8]}@example.com" for name in ("victim", "bystander"))
    async with auth_service(sqlite_url, limits, redis_url if shared else None, service_pki) as auth:
        # Unknown accounts spend alike: the limit reveals nothing about which addresses exist.
        codes = [await login_code(auth, victim) for _ in range(LOGIN_BURST)]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * LOGIN_BURST
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth.Login(auth_pb2.LoginRequest(email=victim.upper(), password="x" * 12), timeout=10)
        assert await login_code(auth, bystander) == grpc.StatusCode.UNAUTHENTICATED
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["limit"].startswith("login_email_")) == ("RATE_LIMITED", True)
    assert victim not in error.details()
    trailers = dict(error.trailing_metadata() or ())
    assert int(trailers["retry-after"]) == int(info.metadata["retry_after_s"]) > 0


async def test_two_auth_replicas_share_one_email_budget_in_redis(
    sqlite_url: str, redis_url: str, tmp_path: Path, service_pki: ServicePki
) -> None:
    await upgrade_async(sqlite_url)
    limits = email_limits_file(tmp_path)
    email = f"shared-{uuid.uuid4().hex[:8]}@example.com"
    async with (
        auth_service(sqlite_url, limits, redis_url, service_pki) as first,
        auth_service(sqlite_url, limits, redis_url, service_pki) as second,
    ):
        codes = []
        for attempt in range(FORGOT_BURST + 2):
            replica = (first, second)[attempt % 2]
            try:
                await replica.ForgotPassword(auth_pb2.ForgotPasswordRequest(email=email), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
    assert codes == [grpc.StatusCode.OK] * FORGOT_BURST + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2


async def forgot_code(auth: Any, email: str) -> grpc.StatusCode:
    try:
        await auth.ForgotPassword(auth_pb2.ForgotPasswordRequest(email=email), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
async def test_every_spelling_of_an_address_spends_its_one_budget(
    sqlite_url: str, redis_url: str, tmp_path: Path, shared: bool, service_pki: ServicePki
) -> None:
    """Fullwidth or mathematical letters are the same address (NFKC): they must not buy more guesses."""
    await upgrade_async(sqlite_url)
    local = f"spelled-{uuid.uuid4().hex[:8]}"
    spellings = [
        f"{fullwidth(local)}@example.com",
        f"{local}@{fullwidth('EXAMPLE.COM')}",
        f"{mathematical_bold(local)}@Example.com",
    ]
    assert len(spellings) == LOGIN_BURST
    async with auth_service(
        sqlite_url, email_limits_file(tmp_path), redis_url if shared else None, service_pki
    ) as auth:
        assert [await login_code(auth, email) for email in spellings] == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert await login_code(auth, f"{local}@example.com") == grpc.StatusCode.RESOURCE_EXHAUSTED
        forgot = [await forgot_code(auth, email) for email in [*spellings[:FORGOT_BURST], spellings[-1]]]
    assert forgot == [grpc.StatusCode.OK] * FORGOT_BURST + [grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_login_fails_closed_when_the_limiter_is_down(
    sqlite_url: str, redis_url: str, tmp_path: Path, service_pki: ServicePki
) -> None:
    await upgrade_async(sqlite_url)
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    try:
        async with auth_service(
            sqlite_url, email_limits_file(tmp_path), f"redis://127.0.0.1:{proxy.port}/0", service_pki
        ) as auth:
            email = f"outage-{uuid.uuid4().hex[:8]}@example.com"
            assert await login_code(auth, email) == grpc.StatusCode.UNAUTHENTICATED
            await proxy.cut()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await auth.Login(auth_pb2.LoginRequest(email=email, password="whatever-123"), timeout=10)
    finally:
        await proxy.close()
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(error)
    assert status is not None
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "RATE_LIMITER_UNAVAILABLE"
