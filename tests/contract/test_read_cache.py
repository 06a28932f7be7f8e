"""Contract of the read cache: one suite, run against every adapter, plus Redis-only behaviour
(several processes sharing one Redis, and Redis going away).

Time: the in-memory adapter runs on a settable clock; Redis expires keys on its own clock, so its
runs wait out lifetimes of a few hundred milliseconds for real.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from runtime.process import read_cache_for
from services.common.cache import CacheMetrics, InMemoryReadCache, ReadCache, RedisReadCache
from services.common.settings import load_settings
from tests.support.polling import eventually
from tests.support.redis_keys import delete_namespace
from tests.support.tcp_proxy import TcpProxy

ADAPTERS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]
TTL_S = 60.0
SHORT_TTL_S = 0.3
# Bounds every wait on a task or event here; a correct cache needs microseconds.
WAIT_S = 5.0


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class CacheUnderTest:
    cache: ReadCache
    registry: CollectorRegistry
    pass_time: Callable[[float], Awaitable[None]]

    def sample(self, metric: str) -> float:
        return self.registry.get_sample_value(metric, {"cache": self.cache.name}) or 0.0


def text_codec() -> tuple[Callable[[str], bytes], Callable[[bytes], str]]:
    return str.encode, bytes.decode


@dataclass
class Source:
    """The database stand-in: a value, and a count of the loads that read it."""

    value: str = "v1"
    loads: int = 0
    # When set, a load reads the value, then waits for `release` before returning it: a slow query.
    release: asyncio.Event | None = None
    loading: asyncio.Event = field(default_factory=asyncio.Event)

    async def load(self) -> str:
        self.loads += 1
        snapshot = self.value
        self.loading.set()
        if self.release is not None:
            async with asyncio.timeout(WAIT_S):
                await self.release.wait()
        return snapshot


async def read(cache: ReadCache, source: Source, key: str = "k") -> str:
    encode, decode = text_codec()
    return await cache.get_or_load(key, source.load, TTL_S, encode, decode)


def redis_cache(client: Redis, prefix: str, registry: CollectorRegistry, **options: float) -> ReadCache:
    return RedisReadCache(client, key_prefix=prefix, metrics=CacheMetrics(registry), **options)


async def drop_keys(client: Redis, prefix: str) -> None:
    await delete_namespace(client, prefix)


@pytest.fixture(params=ADAPTERS)
async def under_test(request: pytest.FixtureRequest) -> AsyncIterator[CacheUnderTest]:
    registry = CollectorRegistry()
    if request.param == "memory":
        clock = FakeMonotonic()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        cache = InMemoryReadCache(metrics=CacheMetrics(registry), clock=clock)
        yield CacheUnderTest(cache.named("things"), registry, advance)
        return
    redis_url: str = request.getfixturevalue("redis_url")
    client = Redis.from_url(redis_url)
    prefix = f"parley-test:{uuid.uuid4().hex}:cache:"
    try:
        # Entries expire on Redis's own clock, which no test can move: real time has to pass.
        yield CacheUnderTest(redis_cache(client, prefix, registry).named("things"), registry, asyncio.sleep)
    finally:
        await drop_keys(client, prefix)
        await client.aclose()


# ---- get, set, delete, expiry ---------------------------------------------------------------------


async def test_get_set_delete(under_test: CacheUnderTest) -> None:
    cache = under_test.cache
    assert await cache.get("a") is None
    await cache.set("a", b"\x00one", TTL_S)
    await cache.set("b", b"two", TTL_S)
    assert await cache.get("a") == b"\x00one"
    await cache.set("a", b"uno", TTL_S)
    assert await cache.get("a") == b"uno"
    await cache.delete("a", "b", "never-set")
    assert await cache.get("a") is None
    assert await cache.get("b") is None


async def test_entries_expire_after_their_ttl(under_test: CacheUnderTest) -> None:
    cache = under_test.cache
    await cache.set("short", b"x", SHORT_TTL_S)
    await cache.set("long", b"y", TTL_S)
    assert await cache.get("short") == b"x"
    await under_test.pass_time(SHORT_TTL_S + 0.3)
    assert await cache.get("short") is None
    assert await cache.get("long") == b"y"


async def test_names_keep_keys_apart(under_test: CacheUnderTest) -> None:
    cache = under_test.cache
    other = cache.named("others")
    await cache.set("k", b"mine", TTL_S)
    assert await other.get("k") is None
    await other.set("k", b"theirs", TTL_S)
    await other.delete("k")
    assert await cache.get("k") == b"mine"


async def test_invalid_ttls_and_names_are_refused(under_test: CacheUnderTest) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await under_test.cache.set("k", b"x", 0)
    with pytest.raises(ValueError, match="ttl_s"):
        await read_with_ttl(under_test.cache, -1)
    with pytest.raises(ValueError, match="name"):
        under_test.cache.named("a:b")


async def read_with_ttl(cache: ReadCache, ttl_s: float) -> str:
    encode, decode = text_codec()
    return await cache.get_or_load("k", Source().load, ttl_s, encode, decode)


# ---- get_or_load --------------------------------------------------------------------------------------


async def test_get_or_load_loads_once_then_serves_from_the_cache(under_test: CacheUnderTest) -> None:
    source = Source()
    assert await read(under_test.cache, source) == "v1"
    source.value = "v2"  # changed behind the cache's back: no invalidation, so v1 is still served
    assert await read(under_test.cache, source) == "v1"
    assert source.loads == 1
    assert await under_test.cache.get("k") == b"v1"
    assert under_test.sample("parley_cache_misses_total") == 1
    assert under_test.sample("parley_cache_hits_total") == 2


async def test_a_loaded_value_expires_like_any_other(under_test: CacheUnderTest) -> None:
    source = Source()
    encode, decode = text_codec()
    assert await under_test.cache.get_or_load("k", source.load, SHORT_TTL_S, encode, decode) == "v1"
    source.value = "v2"
    await under_test.pass_time(SHORT_TTL_S + 0.3)
    assert await under_test.cache.get_or_load("k", source.load, SHORT_TTL_S, encode, decode) == "v2"
    assert source.loads == 2


async def test_a_failed_load_caches_nothing_and_the_next_read_loads_again(under_test: CacheUnderTest) -> None:
    async def failing() -> str:
        raise LookupError("no such row")

    encode, decode = text_codec()
    with pytest.raises(LookupError):
        await under_test.cache.get_or_load("k", failing, TTL_S, encode, decode)
    source = Source()
    assert await read(under_test.cache, source) == "v1"
    # The failed load gave its lease back, so this load was stored.
    assert await under_test.cache.get("k") == b"v1"


async def concurrent_reads(cache: ReadCache, readers: int) -> tuple[list[str], int]:
    """`readers` concurrent get_or_load calls of one key: their values, and how many loads ran."""
    all_started = asyncio.Event()
    started = 0
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        # Held until every reader has called get_or_load, so they all find this load in flight.
        async with asyncio.timeout(WAIT_S):
            await all_started.wait()
        return "shared"

    async def reader() -> str:
        nonlocal started
        started += 1
        if started == readers:
            all_started.set()
        encode, decode = text_codec()
        return await cache.get_or_load("k", load, TTL_S, encode, decode)

    async with asyncio.timeout(WAIT_S):
        values = await asyncio.gather(*(reader() for _ in range(readers)))
    return values, loads


async def test_concurrent_reads_of_one_key_share_one_load(under_test: CacheUnderTest) -> None:
    values, loads = await concurrent_reads(under_test.cache, 20)
    assert values == ["shared"] * 20
    assert loads == 1
    assert under_test.sample("parley_cache_misses_total") == 1
    assert under_test.sample("parley_cache_hits_total") == 19


async def test_different_keys_load_independently(under_test: CacheUnderTest) -> None:
    first, second = Source(value="one"), Source(value="two")
    async with asyncio.timeout(WAIT_S):
        values = await asyncio.gather(read(under_test.cache, first, "a"), read(under_test.cache, second, "b"))
    assert list(values) == ["one", "two"]
    assert (first.loads, second.loads) == (1, 1)


# ---- the stale-set race ---------------------------------------------------------------------------


async def test_a_load_that_raced_a_write_is_not_stored(under_test: CacheUnderTest) -> None:
    """Reader loads v1; the writer commits v2 and deletes; the reader's late fill must be refused."""
    cache = under_test.cache
    release = asyncio.Event()
    slow = Source(release=release)
    slow_reader = asyncio.create_task(read(cache, slow))
    async with asyncio.timeout(WAIT_S):
        await slow.loading.wait()  # it has read v1 and is "still querying"

    slow.value = "v2"  # the writer commits...
    await cache.delete("k")  # ...then invalidates

    # A read that starts after the write does not join the slow load: it sees v2.
    fresh = Source(value="v2")
    assert await read(cache, fresh) == "v2"
    assert fresh.loads == 1

    release.set()
    async with asyncio.timeout(WAIT_S):
        assert await slow_reader == "v1"  # it began before the write; its answer may be v1...
    # ...but v1 was not stored over v2.
    assert await cache.get("k") == b"v2"
    assert await read(cache, Source(value="unused")) == "v2"


async def test_a_load_that_raced_a_write_is_not_stored_even_when_nothing_else_read(
    under_test: CacheUnderTest,
) -> None:
    cache = under_test.cache
    release = asyncio.Event()
    slow = Source(release=release)
    slow_reader = asyncio.create_task(read(cache, slow))
    async with asyncio.timeout(WAIT_S):
        await slow.loading.wait()
    slow.value = "v2"
    await cache.delete("k")
    release.set()
    async with asyncio.timeout(WAIT_S):
        assert await slow_reader == "v1"
    assert await cache.get("k") is None
    after = Source(value="v2")
    assert await read(cache, after) == "v2"
    assert after.loads == 1


# ---- in memory only --------------------------------------------------------------------------------


async def test_the_memory_cache_evicts_the_least_recently_used_entry() -> None:
    cache = InMemoryReadCache(max_entries=2).named("lru")
    await cache.set("a", b"1", TTL_S)
    await cache.set("b", b"2", TTL_S)
    assert await cache.get("a") == b"1"  # a is now the most recently used
    await cache.set("c", b"3", TTL_S)
    assert await cache.get("b") is None
    assert await cache.get("a") == b"1"
    assert await cache.get("c") == b"3"


async def test_a_memory_cache_of_size_zero_stores_nothing() -> None:
    cache = InMemoryReadCache(max_entries=0).named("off")
    source = Source()
    await cache.set("k", b"x", TTL_S)
    assert await cache.get("k") is None
    assert await read(cache, source) == "v1"
    assert await read(cache, source) == "v1"
    assert source.loads == 2


# ---- Redis: several processes on one Redis ---------------------------------------------------------


@pytest.fixture
async def two_processes(redis_url: str) -> AsyncIterator[tuple[ReadCache, ReadCache]]:
    """Two caches as two replicas hold them: separate clients and in-flight maps, one Redis."""
    prefix = f"parley-test:{uuid.uuid4().hex}:cache:"
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    try:
        first, second = (
            redis_cache(client, prefix, CollectorRegistry()).named("things") for client in clients
        )
        yield first, second
    finally:
        await drop_keys(clients[0], prefix)
        for client in clients:
            await client.aclose()


@pytest.mark.redis
async def test_a_write_in_another_process_refuses_the_stale_fill_and_its_joiners_reload(
    two_processes: tuple[ReadCache, ReadCache],
) -> None:
    here, there = two_processes
    release = asyncio.Event()
    slow = Source(release=release)
    slow_reader = asyncio.create_task(read(here, slow))
    async with asyncio.timeout(WAIT_S):
        await slow.loading.wait()

    slow.value = "v2"
    await there.delete("k")  # the other replica wrote; this process's in-flight load cannot know

    # A read here after the write joins the slow load; the load's fill is refused, so the joiner
    # does not take its v1 but loads for itself.
    late = Source(value="v2")
    late_reader = asyncio.create_task(read(here, late))
    release.set()
    async with asyncio.timeout(WAIT_S):
        assert await slow_reader == "v1"
        assert await late_reader == "v2"
    assert late.loads == 1
    assert await there.get("k") is None
    assert await read(there, Source(value="v2")) == "v2"
    assert await here.get("k") == b"v2"


@pytest.mark.redis
async def test_while_another_process_fills_a_key_readers_load_without_storing(
    two_processes: tuple[ReadCache, ReadCache],
) -> None:
    here, there = two_processes
    release = asyncio.Event()
    slow = Source(release=release)
    slow_reader = asyncio.create_task(read(here, slow))
    async with asyncio.timeout(WAIT_S):
        await slow.loading.wait()

    meanwhile = Source(value="v1")
    assert await read(there, meanwhile) == "v1"
    assert await there.get("k") is None  # the key still belongs to the first filler

    release.set()
    async with asyncio.timeout(WAIT_S):
        assert await slow_reader == "v1"
    assert await there.get("k") == b"v1"


@pytest.mark.redis
async def test_a_filler_that_outlives_its_lease_cannot_overwrite_a_newer_fill(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:cache:"
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    try:
        here, there = (
            redis_cache(client, prefix, CollectorRegistry(), lease_ttl_s=SHORT_TTL_S).named("things")
            for client in clients
        )
        release = asyncio.Event()
        stuck = Source(release=release)
        stuck_reader = asyncio.create_task(read(here, stuck))
        async with asyncio.timeout(WAIT_S):
            await stuck.loading.wait()

        async def lease_expired() -> bool:  # in Redis, on Redis's clock
            return not await clients[0].exists(f"{prefix}things:k")

        await eventually(lease_expired, what="the stuck filler's lease expired", timeout_s=WAIT_S)

        stuck.value = "v2"
        await there.delete("k")
        assert await read(there, Source(value="v2")) == "v2"  # takes a new lease and fills
        release.set()
        async with asyncio.timeout(WAIT_S):
            assert await stuck_reader == "v1"
        assert await here.get("k") == b"v2"
    finally:
        await drop_keys(clients[0], prefix)
        for client in clients:
            await client.aclose()


# ---- Redis: outages ----------------------------------------------------------------------------------


@pytest.fixture
async def redis_behind_proxy(redis_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A Redis URL through a TCP proxy the test can cut, as a network partition would."""
    target = urlsplit(redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    try:
        yield proxy, f"redis://127.0.0.1:{proxy.port}{target.path}"
    finally:
        await proxy.close()


@pytest.mark.redis
async def test_with_redis_down_reads_load_and_writes_succeed(
    redis_behind_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, url = redis_behind_proxy
    registry = CollectorRegistry()
    # The production factory, so its timeouts and retry settings are what is tested.
    root = read_cache_for(load_settings(redis_url=url), registry)
    cache = root.named(f"outage{uuid.uuid4().hex}")
    try:
        source = Source()
        assert await read(cache, source) == "v1"
        assert await cache.get("k") == b"v1"

        await proxy.cut()
        source.value = "v2"
        async with asyncio.timeout(WAIT_S):
            await cache.delete("k")  # a write's invalidation: logged, not raised
            await cache.set("other", b"x", TTL_S)
            assert await read(cache, source) == "v2"  # served by the loader
            assert await cache.get("k") is None
        errors = registry.get_sample_value("parley_cache_errors_total", {"cache": cache.name})
        assert errors is not None
        assert errors >= 1

        # While the cache is out, one process's concurrent reads of a key still share one load.
        values, loads = await concurrent_reads(cache.named(f"outage{uuid.uuid4().hex}"), 10)
        assert values == ["shared"] * 10
        assert loads == 1
    finally:
        await root.close()


@pytest.mark.redis
async def test_the_cache_is_used_again_once_redis_is_back(
    redis_behind_proxy: tuple[TcpProxy, str],
) -> None:
    proxy, url = redis_behind_proxy
    client = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    cache = redis_cache(
        client, f"parley-test:{uuid.uuid4().hex}:cache:", CollectorRegistry(), retry_after_s=0
    )
    cache = cache.named("things")
    try:
        await proxy.cut()
        source = Source()
        assert await read(cache, source) == "v1"
        await proxy.restore()
        assert await read(cache, source) == "v1"
        assert await read(cache, source) == "v1"
        assert source.loads == 2  # one during the outage, one to fill after it
        assert await cache.get("k") == b"v1"
        await cache.delete("k")
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_after_a_failure_reads_skip_redis_for_a_while(redis_behind_proxy: tuple[TcpProxy, str]) -> None:
    proxy, url = redis_behind_proxy
    registry = CollectorRegistry()
    client = Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    prefix = f"parley-test:{uuid.uuid4().hex}:cache:"
    cache = redis_cache(client, prefix, registry, retry_after_s=60).named("things")
    try:
        await proxy.cut()
        source = Source()
        for _ in range(5):
            assert await read(cache, source) == "v1"
        # Only the first read tried Redis; the others went straight to the loader.
        assert registry.get_sample_value("parley_cache_errors_total", {"cache": "things"}) == 1
        assert registry.get_sample_value("parley_cache_misses_total", {"cache": "things"}) == 5
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_client_that_decodes_responses_is_refused(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisReadCache(client)
    finally:
        await client.aclose()
