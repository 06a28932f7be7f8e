"""Contract of the GCRA rate limiter: one suite, run against every adapter.

The in-memory adapter runs on a fake clock, so its numbers are exact. The Redis adapter runs on
Redis' own clock: its tests use short periods, wait for the times the limiter itself returns, and
compare durations within `Harness.slack`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from services.common.ratelimit import (
    InMemoryRateLimiter,
    LimitDecision,
    LimitRequest,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitRule,
    RedisRateLimiter,
    is_allowed,
)
from services.common.redis_multiplex import MultiplexedRedis
from tests.support.polling import eventually
from tests.support.redis_keys import delete_namespace
from tests.support.tcp_proxy import TcpProxy

ADAPTERS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]
HOUR = 3600.0
# Added to real-time waits so a wait for the limiter's own retry time lands after it, whatever the
# small differences between the test's clock and Redis'.
REAL_TIME_MARGIN_S = 0.01


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    limiter: RateLimiter
    # Let `seconds` pass for the limiter.
    wait: Callable[[float], Awaitable[None]]
    # How far a returned duration may be from the ideal one (the real time the test itself took).
    slack: float


@pytest.fixture(params=ADAPTERS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield Harness(InMemoryRateLimiter(clock=clock), advance, slack=1e-6)
        return
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    # The production factory: its blocking pool is what lets 200 concurrent decisions share 64
    # connections.
    limiter = RedisRateLimiter.from_url(redis_url, key_prefix=prefix)

    async def sleep(seconds: float) -> None:
        # GCRA runs on Redis's clock (TIME in the script), which no test can move: real time must pass.
        await asyncio.sleep(seconds + REAL_TIME_MARGIN_S)

    try:
        yield Harness(limiter, sleep, slack=0.25)
    finally:
        await limiter.aclose()
        await delete_keys(redis_url, prefix)


async def delete_keys(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        await delete_namespace(client, prefix)
    finally:
        await client.aclose()


def rule(name: str, *, requests: int, per_s: float, burst: int, shadow: bool = False) -> RateLimitRule:
    return RateLimitRule(
        name=name,
        descriptor={"limit": name},
        key=("user",),
        requests=requests,
        per_s=per_s,
        burst=burst,
        shadow=shadow,
    )


async def take(limiter: RateLimiter, limit: RateLimitRule, key: str = "u1", hits: int = 1) -> LimitDecision:
    (decision,) = await limiter.acquire([LimitRequest(f"rl:{limit.name}:{key}", limit, hits=hits)])
    return decision


async def test_the_burst_is_allowed_then_refused(harness: Harness) -> None:
    slow = rule("slow", requests=10, per_s=HOUR, burst=5)  # one request back every 360 s
    decisions = [await take(harness.limiter, slow) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert all(d.limit == 5 and d.retry_after_s == 0 for d in decisions)
    assert decisions[-1].reset_after_s == pytest.approx(5 * 360, abs=harness.slack)

    refused = await take(harness.limiter, slow)
    assert not refused.allowed
    assert refused.refuses
    assert refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(360, abs=harness.slack)
    assert refused.reset_after_s == pytest.approx(5 * 360, abs=harness.slack)


async def test_the_bucket_refills_at_the_sustained_rate(harness: Harness) -> None:
    fast = rule("fast", requests=10, per_s=1, burst=3)  # one request back every 100 ms
    for _ in range(3):
        assert (await take(harness.limiter, fast)).allowed
    refused = await take(harness.limiter, fast)
    assert not refused.allowed

    await harness.wait(refused.retry_after_s)
    assert (await take(harness.limiter, fast)).allowed
    assert not (await take(harness.limiter, fast)).allowed, "one interval wins back exactly one request"

    await harness.wait(0.2)
    two_back = [await take(harness.limiter, fast) for _ in range(3)]
    assert [d.allowed for d in two_back] == [True, True, False]


async def test_retry_after_is_exactly_when_the_request_would_pass(harness: Harness) -> None:
    limit = rule("every_300ms", requests=1, per_s=0.3, burst=1)
    assert (await take(harness.limiter, limit)).allowed
    refused = await take(harness.limiter, limit)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.3, abs=min(harness.slack, 0.05))

    await harness.wait(refused.retry_after_s / 2)
    still_refused = await take(harness.limiter, limit)
    assert not still_refused.allowed
    assert still_refused.retry_after_s == pytest.approx(
        refused.retry_after_s / 2, abs=min(harness.slack, 0.05)
    )

    await harness.wait(still_refused.retry_after_s)
    assert (await take(harness.limiter, limit)).allowed


async def test_a_request_is_decided_all_or_nothing_across_its_limits(harness: Harness) -> None:
    wide = rule("wide", requests=5, per_s=HOUR, burst=5)
    narrow = rule("narrow", requests=2, per_s=HOUR, burst=2)
    both = [LimitRequest("rl:wide:u1", wide), LimitRequest("rl:narrow:u1", narrow)]
    for _ in range(2):
        assert is_allowed(await harness.limiter.acquire(both))

    wide_decision, narrow_decision = await harness.limiter.acquire(both)
    assert not is_allowed([wide_decision, narrow_decision])
    assert narrow_decision.refuses
    assert wide_decision.allowed, "the wide limit alone would have let it through"
    assert wide_decision.remaining == 3, "a refused request reports the untouched counter"

    (wide_alone,) = await harness.limiter.acquire([LimitRequest("rl:wide:u1", wide)])
    assert wide_alone.remaining == 2, "the refused request did not spend the wide limit"


async def test_a_shadow_limit_reports_but_never_refuses(harness: Harness) -> None:
    shadow = rule("shadow", requests=2, per_s=HOUR, burst=2, shadow=True)
    enforced = rule("enforced", requests=10, per_s=HOUR, burst=10)
    requests = [LimitRequest("rl:shadow:u1", shadow), LimitRequest("rl:enforced:u1", enforced)]
    results = [await harness.limiter.acquire(requests) for _ in range(4)]

    assert all(is_allowed(decisions) for decisions in results)
    assert [decisions[0].allowed for decisions in results] == [True, True, False, False]
    over = results[2][0]
    assert not over.refuses
    assert over.remaining == 0
    assert over.retry_after_s == pytest.approx(HOUR / 2, abs=harness.slack)
    assert [decisions[1].remaining for decisions in results] == [9, 8, 7, 6], "enforced limits still count"


async def test_hits_take_several_requests_at_once(harness: Harness) -> None:
    limit = rule("batch", requests=10, per_s=HOUR, burst=10)  # 360 s per request
    assert (await take(harness.limiter, limit, hits=4)).remaining == 6
    assert (await take(harness.limiter, limit, hits=4)).remaining == 2

    refused = await take(harness.limiter, limit, hits=3)
    assert not refused.allowed
    assert refused.remaining == 2
    assert refused.retry_after_s == pytest.approx(360, abs=harness.slack)

    last = await take(harness.limiter, limit, hits=2)
    assert last.allowed
    assert last.remaining == 0


async def test_more_hits_than_the_burst_are_always_refused(harness: Harness) -> None:
    limit = rule("small", requests=10, per_s=HOUR, burst=3)
    refused = await take(harness.limiter, limit, hits=4)
    assert not refused.allowed
    assert refused.remaining == 3, "nothing was spent"
    assert (await take(harness.limiter, limit, hits=3)).allowed


async def test_distinct_keys_count_independently(harness: Harness) -> None:
    limit = rule("per_user", requests=2, per_s=HOUR, burst=2)
    for _ in range(2):
        assert (await take(harness.limiter, limit, key="alice")).allowed
    assert not (await take(harness.limiter, limit, key="alice")).allowed

    bob = await take(harness.limiter, limit, key="bob")
    assert bob.allowed
    assert bob.remaining == 1


async def test_one_counter_named_twice_in_a_request_counts_twice(harness: Harness) -> None:
    limit = rule("twice", requests=3, per_s=HOUR, burst=3)
    same = [LimitRequest("rl:twice:u1", limit), LimitRequest("rl:twice:u1", limit)]
    first, second = await harness.limiter.acquire(same)
    assert (first.remaining, second.remaining) == (2, 1)

    refused = await harness.limiter.acquire(same)
    assert not is_allowed(refused), "the third and fourth request do not both fit"
    assert (await take(harness.limiter, limit)).remaining == 0, "and the refused pair spent nothing"


async def test_an_empty_request_is_allowed(harness: Harness) -> None:
    assert await harness.limiter.acquire([]) == []


async def test_concurrent_requests_never_exceed_the_burst(harness: Harness) -> None:
    limit = rule("crowded", requests=1, per_s=HOUR, burst=50)
    decisions = await asyncio.gather(*(take(harness.limiter, limit) for _ in range(200)))
    assert sum(decision.allowed for decision in decisions) == 50
    assert sorted(decision.remaining for decision in decisions if decision.allowed) == list(range(50))


# --- adapter specifics ---------------------------------------------------------------------------


async def test_in_memory_counters_are_dropped_once_full() -> None:
    clock = FakeClock()
    limiter = InMemoryRateLimiter(clock=clock, min_sweep_size=4)
    limit = rule("tiny", requests=1, per_s=1, burst=1)
    for user in range(3):
        await take(limiter, limit, key=f"u{user}")
    assert limiter.counter_count == 3

    clock.now += 1.0
    for user in range(3, 6):
        await take(limiter, limit, key=f"u{user}")
    assert limiter.counter_count == 3, "the sweep at four counters dropped the three full ones"


@pytest.mark.redis
async def test_redis_counters_expire_when_full(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    try:
        limit = rule("expiring", requests=10, per_s=HOUR, burst=5)
        decision = await take(limiter, limit, hits=2)
        ttl_ms = await client.pttl(f"{prefix}rl:expiring:u1")
        assert 0 < ttl_ms <= decision.reset_after_s * 1000 + 1
        assert decision.reset_after_s == pytest.approx(720, abs=0.25)

        short = rule("short", requests=20, per_s=1, burst=1)
        await take(limiter, short)
        key = f"{prefix}rl:short:u1"
        assert await client.exists(key)

        async def expired() -> bool:
            return not await client.exists(key)

        await eventually(expired, what=f"{key} expired in Redis", timeout_s=5, interval_s=0.01)
    finally:
        await limiter.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_redis_reloads_its_script_after_a_flush(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter(MultiplexedRedis.from_url(redis_url), key_prefix=prefix)
    try:
        limit = rule("flushed", requests=10, per_s=HOUR, burst=3)
        assert (await take(limiter, limit)).remaining == 2
        await client.script_flush()
        assert (await take(limiter, limit)).remaining == 1
    finally:
        await limiter.aclose()
        await delete_namespace(client, prefix)
        await client.aclose()


@pytest.mark.redis
async def test_redis_out_of_reach_raises_unavailable(redis_url: str) -> None:
    direct = Redis.from_url(redis_url)
    settings = direct.connection_pool.connection_kwargs
    proxy = TcpProxy(settings.get("host", "127.0.0.1"), settings.get("port", 6379))
    await proxy.start()
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(
        f"redis://127.0.0.1:{proxy.port}/{settings.get('db', 0)}", key_prefix=prefix
    )
    limit = rule("cut", requests=10, per_s=HOUR, burst=3)
    try:
        assert (await take(limiter, limit)).allowed
        await proxy.cut()
        started = time.perf_counter()
        with pytest.raises(RateLimiterUnavailable) as raised:
            await take(limiter, limit)
        assert time.perf_counter() - started < 0.5, "an outage fails fast, without retries"
        assert raised.value.reason == "RATE_LIMITER_UNAVAILABLE"
        assert "redis" not in raised.value.message.lower(), "clients are not told about our internals"

        await proxy.restore()
        assert (await take(limiter, limit)).remaining == 1, "the limiter recovers with its store"
    finally:
        await limiter.aclose()
        await proxy.close()
        await direct.delete(f"{prefix}rl:cut:u1")
        await direct.aclose()
