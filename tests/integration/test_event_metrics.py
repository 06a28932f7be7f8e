"""The event pipeline's backlog gauges against real Redis and a real database: each gauge equals what
Redis (XLEN, XPENDING, XINFO GROUPS) or the outbox says, and a sample never raises when either is down.

Streams and groups are unique to each test (the Redis database is shared with concurrent runs), so the
tests look only at their own label values; every wait is bounded by `DEADLINE_S`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from redis.asyncio import Redis
from sqlalchemy import update

from parley.events.v1 import events_pb2
from services.common.clock import utc_now
from services.common.consumers import (
    Consumer,
    DeadLetter,
    InMemoryProcessedEvents,
    RedisStreamSource,
    dlq_key,
)
from services.common.db import Database
from services.common.dead_letters import SqlDeadLetters
from services.common.event_metrics import EventPipelineMetrics
from services.common.outbox import OutboxEvent, add_event
from services.common.streams import encode_entry, stream_key
from tests.support.gateway import free_port
from tests.support.polling import eventually

DEADLINE_S = 15.0


def registered(user: str) -> events_pb2.Event:
    event = events_pb2.Event(id=str(uuid.uuid4()), type="user.registered", source="test", subject=user)
    event.user_registered.CopyFrom(events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com"))
    return event


@pytest.fixture
async def names(redis: Redis) -> AsyncIterator[tuple[str, str]]:
    """A stream and a consumer group unique to the test; the stream and the group's DLQ are deleted after."""
    stream, group = stream_key(f"test-{uuid.uuid4().hex[:12]}"), f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield stream, group
    finally:
        await redis.delete(stream, dlq_key(group))


def closed_port_client() -> Redis:
    return Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2.0)


async def group_backlog(redis: Redis, stream: str, group: str) -> tuple[int, int]:
    """(pending, lag) of the group, straight from XINFO GROUPS."""
    [info] = [info for info in await redis.xinfo_groups(stream) if info["name"] == group.encode()]
    return int(info["pending"]), int(info["lag"])


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.redis
async def test_gauges_equal_what_redis_reports_for_streams_groups_and_dead_letters(
    redis: Redis, names: tuple[str, str]
) -> None:
    stream, group = names
    events = [registered(f"u-{index}") for index in range(6)]
    poison = events[1]
    for event in events:
        await redis.xadd(stream, encode_entry(event))  # type: ignore[arg-type]
    source = RedisStreamSource(redis, stream=stream, group=group)

    fixed = asyncio.Event()

    async def handler(event: events_pb2.Event) -> None:
        if event.id == poison.id and not fixed.is_set():
            raise RuntimeError("poison")

    # Two entries settled (one handled, one dead-lettered), two delivered and never acked, two unread.
    consumer = Consumer(
        group, handler, source, InMemoryProcessedEvents(), member="m1", max_attempts=1, batch_size=2
    )
    assert await consumer.poll_once(block_s=0) == 2
    assert len(await source.read_new("m2", 2, 0)) == 2

    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)
    assert await metrics.sample(redis=redis) == []

    assert sample_value(registry, "parley_stream_length", stream=stream) == await redis.xlen(stream) == 6
    pending = (await redis.xpending(stream, group))["pending"]
    assert sample_value(registry, "parley_consumer_group_pending", stream=stream, group=group) == pending == 2
    assert sample_value(registry, "parley_consumer_group_lag", stream=stream, group=group) == 2
    dead_letters = await redis.xlen(dlq_key(group))
    assert sample_value(registry, "parley_dead_letters", consumer=group) == dead_letters == 1
    assert sample_value(registry, "parley_event_metrics_sample_errors_total", part="redis") == 0
    # No database given: no outbox lag is exported rather than a made-up 0.
    assert sample_value(registry, "parley_outbox_lag_seconds") is None

    text = generate_latest(registry).decode()
    for family in (
        "parley_stream_length",
        "parley_consumer_group_pending",
        "parley_consumer_group_lag",
        "parley_dead_letters",
        "parley_outbox_lag_seconds",
    ):
        assert f"# TYPE {family} gauge" in text
    assert f'parley_consumer_group_pending{{group="{group}",stream="{stream}"}} 2.0' in text
    assert f'parley_dead_letters{{consumer="{group}"}} 1.0' in text
    assert 'parley_event_metrics_sample_errors_total{part="redis"} 0.0' in text

    # Replaying the dead letter after a fix and handling everything drains every backlog of the group.
    fixed.set()
    assert await source.replay() == 1
    drained = Consumer(group, handler, source, InMemoryProcessedEvents(), member="m2", visibility_timeout_s=0)
    async with asyncio.timeout(DEADLINE_S):
        while await group_backlog(redis, stream, group) != (0, 0):
            await drained.poll_once(block_s=0)
    await metrics.sample(redis=redis, streams=[stream], consumers=[group])
    assert sample_value(registry, "parley_consumer_group_pending", stream=stream, group=group) == 0
    assert sample_value(registry, "parley_consumer_group_lag", stream=stream, group=group) == 0
    assert sample_value(registry, "parley_dead_letters", consumer=group) == 0


async def test_outbox_lag_is_the_age_of_the_oldest_unrelayed_event(database: Database) -> None:
    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)
    assert await metrics.sample(database=database) == []
    assert sample_value(registry, "parley_outbox_lag_seconds") == 0.0

    async with database.unit_of_work() as session:
        event = add_event(session, source="auth", subject="u-1", payload=registered("u-1").user_registered)
    async with database.unit_of_work() as session:
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.event_id == event.id)
            .values(occurred_at=utc_now() - timedelta(seconds=120))
        )
    assert await metrics.sample(database=database) == []

    lag = sample_value(registry, "parley_outbox_lag_seconds")
    assert lag is not None
    assert 120 <= lag < 180
    assert "parley_outbox_lag_seconds 1" in generate_latest(registry).decode()


async def test_embedded_dead_letters_are_counted_from_the_database(database: Database) -> None:
    """Without Redis (`parley up`), dead letters live in the `dead_letters` table and are counted there."""
    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)
    store = SqlDeadLetters(database)
    event = registered("u-2")
    dead = DeadLetter("", event.id, "parley:events:embedded", "boom", 3, utc_now(), event.SerializeToString())
    await store.add("email", dead)
    await store.add("email", dead)
    await store.add("analytics", dead)

    assert await metrics.sample(database=database) == []

    assert sample_value(registry, "parley_dead_letters", consumer="email") == 2
    assert sample_value(registry, "parley_dead_letters", consumer="analytics") == 1
    await store.take("email")
    await metrics.sample(database=database)
    assert sample_value(registry, "parley_dead_letters", consumer="email") is None


async def test_a_database_that_is_down_is_counted_and_its_gauge_dropped(database: Database) -> None:
    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)
    await metrics.sample(database=database)
    assert sample_value(registry, "parley_outbox_lag_seconds") == 0.0
    down = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test", connect_timeout_s=2.0)
    try:
        assert await metrics.sample(database=down) == ["database"]
    finally:
        await down.dispose()

    assert sample_value(registry, "parley_event_metrics_sample_errors_total", part="database") == 1
    # Absent, not frozen at its last value: a stale lag of 0 would hide a stuck relay.
    assert sample_value(registry, "parley_outbox_lag_seconds") is None


@pytest.mark.redis
async def test_a_redis_that_is_down_is_counted_and_its_gauges_dropped_without_raising(
    redis: Redis, names: tuple[str, str]
) -> None:
    stream, group = names
    await redis.xadd(stream, encode_entry(registered("u-1")))  # type: ignore[arg-type]
    await redis.xgroup_create(stream, group, id="0")
    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)
    await metrics.sample(redis=redis, streams=[stream])
    assert sample_value(registry, "parley_stream_length", stream=stream) == 1

    down = closed_port_client()
    try:
        assert await metrics.sample(redis=down, streams=[stream]) == ["redis"]
    finally:
        await down.aclose()

    assert sample_value(registry, "parley_event_metrics_sample_errors_total", part="redis") == 1
    assert sample_value(registry, "parley_stream_length", stream=stream) is None
    assert sample_value(registry, "parley_consumer_group_pending", stream=stream, group=group) is None
    assert "parley_stream_length{" not in generate_latest(registry).decode()


async def test_sample_forever_keeps_sampling_through_an_outage_and_stops_when_asked(
    database: Database,
) -> None:
    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)
    down = closed_port_client()
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        metrics.sample_forever(stop, 0.05, database=database, redis=down, rediscover_s=0.0)
    )

    def sampler_running() -> None:
        assert not sampler.done(), "the sampler stopped on its own"

    def redis_sample_errors() -> float:
        return sample_value(registry, "parley_event_metrics_sample_errors_total", part="redis") or 0

    try:
        await eventually(
            lambda: redis_sample_errors() >= 3,
            what="three failed Redis samples",
            timeout_s=DEADLINE_S,
            alive=sampler_running,
        )
        # The database part is sampled all along, whatever Redis does.
        assert sample_value(registry, "parley_outbox_lag_seconds") == 0.0
        assert sample_value(registry, "parley_event_metrics_sample_errors_total", part="database") == 0
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE_S):
            await sampler
        await down.aclose()


@pytest.mark.redis
async def test_discovery_finds_event_streams_and_dead_letter_streams(
    redis: Redis, names: tuple[str, str]
) -> None:
    stream, group = names
    await redis.xadd(stream, encode_entry(registered("u-1")))  # type: ignore[arg-type]
    await redis.xadd(dlq_key(group), {"event_id": "x"})
    registry = CollectorRegistry()
    metrics = EventPipelineMetrics(registry)

    assert await metrics.sample(redis=redis) == []

    assert sample_value(registry, "parley_stream_length", stream=stream) == 1
    assert sample_value(registry, "parley_dead_letters", consumer=group) == 1
