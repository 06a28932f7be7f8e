"""Hot reads through the read cache, against real services: the auth service (GetCurrentUser) and the
plan catalog, on SQLite and PostgreSQL, with the cache in a real Redis shared by two instances.

"Served from the cache" is proven twice over: by the cache's hit counter, and by changing the row
behind the services' backs (plain SQL, no invalidation), which a cached read does not see.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import urlsplit

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from sqlalchemy import update

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.common.v1 import common_pb2
from runtime.process import build_services, registrations_of, start_services
from services.auth.models import UserRecord
from services.auth.ports import USER_CACHE
from services.auth.signing_keys import generate_kek
from services.billing.models import PlanRecord
from services.billing.plans import Plan, PlanCatalog
from services.billing.ports import PLAN_CACHE, BillingUnitOfWork
from services.billing.repository import billing_units_of_work
from services.common.cache import CacheMetrics, ReadCache, RedisReadCache, read_cache_invalidation
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.identity import AUTH_METHOD_HEADER, ROLES_HEADER, encode_roles_header
from services.common.money import Money
from services.common.revocation import InMemoryRevocationList
from services.common.settings import Settings, load_settings
from services.common.sql_unit_of_work import SqlUnitsOfWork
from tests.support.auth_accounts import email_token
from tests.support.pki import ServicePki
from tests.support.redis_keys import delete_namespace
from tests.support.servers import serving
from tests.support.tcp_proxy import TcpProxy

PASSWORD = "violet-harbour-lantern-42"
NEW_PASSWORD = "copper-meadow-falcon-77"
ADMIN_ID = "admin-of-the-test"


@dataclass
class AuthInstance:
    """One auth service process: its server, a stub to it, and its cache's metrics."""

    stub: auth_pb2_grpc.AuthServiceStub
    admin: auth_pb2_grpc.AuthAdminServiceStub
    registry: CollectorRegistry

    def cache_count(self, outcome: str) -> float:
        value = self.registry.get_sample_value(f"parley_cache_{outcome}_total", {"cache": USER_CACHE})
        return value or 0.0

    async def current_user(self, user_id: str) -> auth_pb2.User:
        reply = await self.stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=as_user(user_id))
        user: auth_pb2.User = reply.user
        return user


def as_user(user_id: str) -> tuple[tuple[str, str], ...]:
    """The identity headers the gateway sends for `user_id` by API key (the instances' channel is
    the gateway's): no token, so no token claims to check."""
    return (("x-parley-user-id", user_id), (AUTH_METHOD_HEADER, "api_key"))


AS_ADMIN = (*as_user(ADMIN_ID), (ROLES_HEADER, encode_roles_header(["user", "admin"])))
USER_AND_ADMIN = [common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN]


@asynccontextmanager
async def auth_instance(
    settings: Settings, database: Database, cache: ReadCache, registry: CollectorRegistry, pki: ServicePki
) -> AsyncIterator[AuthInstance]:
    """The auth service as `parley serve auth` builds it, with `cache` (metrics in `registry`)."""
    context = ServiceContext(settings, database, InMemoryRevocationList(), embedded=False, read_cache=cache)
    bundles = build_services(["auth"], context)
    await start_services(bundles)
    async with serving(registrations_of(bundles), pki=pki) as running:
        yield AuthInstance(
            auth_pb2_grpc.AuthServiceStub(running.channel),
            auth_pb2_grpc.AuthAdminServiceStub(running.channel),
            registry,
        )


@dataclass
class SharedRedis:
    url: str
    prefix: str

    def cache(self, registry: CollectorRegistry, url: str | None = None) -> ReadCache:
        client = Redis.from_url(url or self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return RedisReadCache(client, key_prefix=self.prefix, metrics=CacheMetrics(registry))


@pytest.fixture
async def shared_redis(redis_url: str) -> AsyncIterator[SharedRedis]:
    prefix = f"parley-test:{uuid.uuid4().hex}:cache:"
    yield SharedRedis(redis_url, prefix)
    client = Redis.from_url(redis_url)
    await delete_namespace(client, prefix)
    await client.aclose()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(auth_key_encryption_key=generate_kek())


@asynccontextmanager
async def two_instances(
    settings: Settings, database: Database, shared_redis: SharedRedis, pki: ServicePki
) -> AsyncIterator[tuple[AuthInstance, AuthInstance]]:
    """Two auth replicas on one database, their read caches in one Redis."""
    async with AsyncExitStack() as stack:
        instances = []
        for _ in range(2):
            registry = CollectorRegistry()
            cache = shared_redis.cache(registry)
            stack.push_async_callback(cache.close)
            instances.append(
                await stack.enter_async_context(auth_instance(settings, database, cache, registry, pki))
            )
        yield instances[0], instances[1]


async def register(instance: AuthInstance, email: str, name: str = "Ada") -> auth_pb2.User:
    reply = await instance.stub.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name=name)
    )
    user: auth_pb2.User = reply.user
    return user


async def rename(instance: AuthInstance, user_id: str, name: str) -> None:
    await instance.stub.UpdateCurrentUser(
        auth_pb2.UpdateCurrentUserRequest(
            user=auth_pb2.User(display_name=name), update_mask=FieldMask(paths=["display_name"])
        ),
        metadata=as_user(user_id),
    )


async def rename_behind_the_services(database: Database, user_id: str, name: str) -> None:
    async with database.unit_of_work() as session:
        await session.execute(update(UserRecord).where(UserRecord.id == user_id).values(display_name=name))


# ---- GetCurrentUser ---------------------------------------------------------------------------------


@pytest.mark.redis
async def test_get_current_user_is_served_from_the_cache_until_the_user_changes(
    settings: Settings, database: Database, shared_redis: SharedRedis, service_pki: ServicePki
) -> None:
    async with two_instances(settings, database, shared_redis, service_pki) as (first, second):
        user = await register(first, "ada@example.com")

        assert (await first.current_user(user.id)).display_name == "Ada"
        assert (first.cache_count("misses"), first.cache_count("hits")) == (1, 0)
        assert (await first.current_user(user.id)).display_name == "Ada"
        assert (await second.current_user(user.id)).display_name == "Ada"
        assert first.cache_count("hits") == 1
        assert (second.cache_count("misses"), second.cache_count("hits")) == (0, 1)  # shared Redis

        # A change no service knows about is not seen: the reads really come from the cache.
        await rename_behind_the_services(database, user.id, "Unseen")
        assert (await second.current_user(user.id)).display_name == "Ada"

        # A change through the service is seen at once, by this replica and the other one.
        await rename(first, user.id, "Countess")
        assert (await first.current_user(user.id)).display_name == "Countess"
        assert (await second.current_user(user.id)).display_name == "Countess"
        await rename(second, user.id, "Lovelace")
        assert (await first.current_user(user.id)).display_name == "Lovelace"
        assert (await second.current_user(user.id)).display_name == "Lovelace"
        # ...and once reloaded, the entry serves reads again.
        hits = first.cache_count("hits") + second.cache_count("hits")
        assert (await second.current_user(user.id)).display_name == "Lovelace"
        assert first.cache_count("hits") + second.cache_count("hits") == hits + 1


@pytest.mark.redis
async def test_every_write_to_a_user_shows_in_the_next_get_current_user(
    settings: Settings, database: Database, shared_redis: SharedRedis, service_pki: ServicePki
) -> None:
    """Each write goes to one replica while the other holds the user cached; the next read there
    must show the write."""
    async with two_instances(settings, database, shared_redis, service_pki) as (writer, reader):
        user = await register(writer, "grace@example.com", "Grace")
        root = await register(writer, "root@example.com", "Root")
        # Another admin, so that disabling Grace (an admin by then) is allowed.
        await writer.admin.SetUserRoles(
            auth_pb2.SetUserRolesRequest(user_id=root.id, roles=USER_AND_ADMIN), metadata=AS_ADMIN
        )

        async def cached() -> auth_pb2.User:
            current = await reader.current_user(user.id)
            hits = reader.cache_count("hits")
            assert await reader.current_user(user.id) == current
            assert reader.cache_count("hits") == hits + 1  # it is cached now
            return current

        before = await cached()
        token = await email_token(database, user.id, "verify_email")
        await writer.stub.VerifyEmail(auth_pb2.VerifyEmailRequest(token=token))
        after = await reader.current_user(user.id)
        assert (before.email_verified, after.email_verified) == (False, True)

        before = await cached()
        await writer.stub.Login(auth_pb2.LoginRequest(email="grace@example.com", password=PASSWORD))
        after = await reader.current_user(user.id)
        assert not before.HasField("last_login_time")
        assert after.HasField("last_login_time")

        before = await cached()
        await writer.stub.ChangePassword(
            auth_pb2.ChangePasswordRequest(current_password=PASSWORD, new_password=NEW_PASSWORD),
            metadata=as_user(user.id),
        )
        after = await reader.current_user(user.id)
        assert after.update_time.ToDatetime() > before.update_time.ToDatetime()

        before = await cached()
        await writer.stub.ForgotPassword(auth_pb2.ForgotPasswordRequest(email="grace@example.com"))
        token = await email_token(database, user.id, "reset_password")
        await writer.stub.ResetPassword(auth_pb2.ResetPasswordRequest(token=token, new_password=PASSWORD))
        after = await reader.current_user(user.id)
        assert after.update_time.ToDatetime() > before.update_time.ToDatetime()

        await cached()
        await writer.admin.SetUserRoles(
            auth_pb2.SetUserRolesRequest(
                user_id=user.id, roles=[common_pb2.ROLE_USER, common_pb2.ROLE_ADMIN]
            ),
            metadata=AS_ADMIN,
        )
        assert list((await reader.current_user(user.id)).roles) == [
            common_pb2.ROLE_USER,
            common_pb2.ROLE_ADMIN,
        ]

        await cached()
        await writer.admin.DisableUser(auth_pb2.DisableUserRequest(user_id=user.id), metadata=AS_ADMIN)
        assert (await reader.current_user(user.id)).disabled

        await cached()
        await writer.admin.EnableUser(auth_pb2.EnableUserRequest(user_id=user.id), metadata=AS_ADMIN)
        assert not (await reader.current_user(user.id)).disabled


@pytest.mark.redis
async def test_an_unknown_user_is_not_found_and_nothing_is_cached(
    settings: Settings, database: Database, shared_redis: SharedRedis, service_pki: ServicePki
) -> None:
    async with two_instances(settings, database, shared_redis, service_pki) as (first, _second):
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await first.current_user("nobody")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert first.cache_count("misses") == 2
        assert first.cache_count("hits") == 0


@pytest.mark.redis
async def test_with_the_cache_down_reads_and_writes_still_work(
    settings: Settings, database: Database, shared_redis: SharedRedis, service_pki: ServicePki
) -> None:
    target = urlsplit(shared_redis.url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    registry = CollectorRegistry()
    cache = shared_redis.cache(registry, url=f"redis://127.0.0.1:{proxy.port}{target.path}")
    try:
        async with auth_instance(settings, database, cache, registry, service_pki) as instance:
            user = await register(instance, "alan@example.com", "Alan")
            assert (await instance.current_user(user.id)).display_name == "Alan"

            await proxy.cut()
            await rename(instance, user.id, "Turing")  # the invalidation fails; the write does not
            assert (await instance.current_user(user.id)).display_name == "Turing"
            assert instance.cache_count("errors") >= 1
    finally:
        await cache.close()
        await proxy.close()


# ---- the plan catalog ----------------------------------------------------------------------------


@dataclass
class PlanReplica:
    """One billing replica's plan catalog and the units of work its writes go through."""

    catalog: PlanCatalog
    units: SqlUnitsOfWork[BillingUnitOfWork]
    registry: CollectorRegistry


@asynccontextmanager
async def plan_readers(
    database: Database, shared_redis: SharedRedis, count: int
) -> AsyncIterator[Sequence[PlanReplica]]:
    async with AsyncExitStack() as stack:
        replicas = []
        for _ in range(count):
            registry = CollectorRegistry()
            cache = shared_redis.cache(registry)
            stack.push_async_callback(cache.close)
            units = billing_units_of_work(database)
            units.after_commit(read_cache_invalidation(cache))
            replicas.append(PlanReplica(PlanCatalog(units, cache), units, registry))
        yield replicas


def plan_cache_hits(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("parley_cache_hits_total", {"cache": PLAN_CACHE}) or 0.0


async def list_ids(catalog: PlanCatalog, *, include_retired: bool = False) -> list[str]:
    page = await catalog.list_plans(page_size=0, page_token="", include_retired=include_retired)
    return [plan.id for plan in page.items]


@pytest.mark.redis
async def test_plan_reads_are_cached_and_every_plan_write_invalidates_them(
    database: Database, shared_redis: SharedRedis
) -> None:
    async with plan_readers(database, shared_redis, 2) as [here, there]:
        catalog, other_catalog = here.catalog, there.catalog
        registry, other_registry = here.registry, there.registry
        assert await list_ids(catalog) == ["free", "pro", "team"]
        pro = await catalog.get_plan("pro")
        assert await list_ids(other_catalog) == ["free", "pro", "team"]
        assert plan_cache_hits(registry) == 1
        assert plan_cache_hits(other_registry) == 1

        # Behind the store's back: not seen, the catalog comes from the cache.
        async with database.unit_of_work() as session:
            await session.execute(
                update(PlanRecord).where(PlanRecord.id == "pro").values(display_name="Hidden")
            )
        assert (await other_catalog.get_plan("pro")).display_name == "Pro"

        # Through the store's write path: seen at once, by every reader.
        async with here.units.write() as uow:
            await uow.plans.save(replace(pro, display_name="Pro 2", monthly_price=Money("USD", 2_500)))
        changed = await other_catalog.get_plan("pro")
        assert (changed.display_name, changed.monthly_price) == ("Pro 2", Money("USD", 2_500))

        async with there.units.write() as uow:
            await uow.plans.save(replace(pro, retire_time=datetime(2031, 1, 1, tzinfo=UTC)))
        assert await list_ids(catalog) == ["free", "team"]
        assert await list_ids(catalog, include_retired=True) == ["free", "pro", "team"]

        added = Plan(
            id="enterprise",
            display_name="Enterprise",
            description="Everything, with a contract.",
            tier="team",
            monthly_price=Money("USD", 50_000),
            included_tokens=100_000_000,
            overage_price_per_1k_tokens=Money("USD", 1),
            allowed_models=("claude-opus",),
            rate_limit_tier="team",
            sort_order=40,
            create_time=datetime(2031, 2, 1, tzinfo=UTC),
            retire_time=None,
        )
        async with here.units.write() as uow:
            await uow.plans.save(added)
        assert await list_ids(other_catalog) == ["free", "team", "enterprise"]
        assert await other_catalog.get_plan("enterprise") == added


@pytest.mark.redis
async def test_a_plan_write_that_rolls_back_keeps_the_cached_catalog(
    database: Database, shared_redis: SharedRedis
) -> None:
    async with plan_readers(database, shared_redis, 1) as [replica]:
        catalog, registry = replica.catalog, replica.registry
        free = await catalog.get_plan("free")
        with pytest.raises(RuntimeError, match="abandoned"):
            async with replica.units.write() as uow:
                await uow.plans.save(replace(free, display_name="Never"))
                raise RuntimeError("abandoned")
        hits = plan_cache_hits(registry)
        assert (await catalog.get_plan("free")).display_name == "Free"
        assert plan_cache_hits(registry) == hits + 1
