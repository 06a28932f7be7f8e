"""Contract of the consumer framework: one suite, run against Redis Streams and the in-process source
(its dead letters in memory, or in the `dead_letters` table on SQLite and PostgreSQL).

Every wait is bounded by `DEADLINE_S`: it polls the handler's own records, or the source's state,
never sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from parley.events.v1 import events_pb2
from services.common.consumers import (
    Consumer,
    ConsumerMetrics,
    EventSource,
    InMemoryProcessedEvents,
    InProcessSource,
    ProcessedEvents,
    RedisProcessedEvents,
    RedisStreamSource,
    current_delivery,
    dlq_key,
)
from services.common.db import Database
from services.common.dead_letters import SqlDeadLetters
from services.common.migrate import upgrade_async
from services.common.outbox import InProcessDispatcher, current_trace_context
from services.common.processed_events import SqlProcessedEvents
from services.common.streams import encode_entry, stream_key
from tests.support.databases import fresh_postgres_database, fresh_sqlite_url
from tests.support.polling import eventually
from tests.support.redis_keys import delete_namespace

ADAPTERS = [
    "memory",
    "memory+sqlite",
    pytest.param("memory+postgres", marks=pytest.mark.postgres),
    pytest.param("redis", marks=pytest.mark.redis),
]
DEADLINE_S = 15.0
# Short backoff and polls so retries happen within the test's budget.
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 0.2
BLOCK_S = 0.05


@dataclass
class Harness:
    group: str
    source: EventSource
    processed: ProcessedEvents
    # publish(event, for_group): append to the stream, for one group only when for_group is set.
    publish_for: Callable[[events_pb2.Event, str | None], Awaitable[None]]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.metrics = ConsumerMetrics(self.registry)

    def consumer(
        self,
        handler: Recorder,
        *,
        member: str = "m1",
        event_types: Collection[str] | None = None,
        **options: float,
    ) -> Consumer:
        settings: dict[str, float] = {
            "batch_size": 10,
            "max_attempts": 5,
            "backoff_base_s": BACKOFF_BASE_S,
            "backoff_cap_s": BACKOFF_CAP_S,
            "visibility_timeout_s": 30.0,
            "block_s": BLOCK_S,
        }
        settings.update(options)
        return Consumer(
            self.group,
            handler,
            self.source,
            self.processed,
            member=member,
            batch_size=int(settings["batch_size"]),
            max_attempts=int(settings["max_attempts"]),
            backoff_base_s=settings["backoff_base_s"],
            backoff_cap_s=settings["backoff_cap_s"],
            visibility_timeout_s=settings["visibility_timeout_s"],
            block_s=settings["block_s"],
            event_types=event_types,
            metrics=self.metrics,
            rng=MaxJitter(),
        )

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name, {"consumer": self.group}) or 0.0

    async def publish(self, event: events_pb2.Event) -> None:
        await self.publish_for(event, None)

    async def publish_all(self, events: Iterable[events_pb2.Event]) -> None:
        for event in events:
            await self.publish(event)


class RetryLaterError(RuntimeError):
    """A handler failure that names the earliest sensible retry, like the email worker's."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MaxJitter(random.Random):
    """Jitter that always picks the top of the range, so a test can check the backoff was waited."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Recorder:
    """A handler that records every call (event id, attempt, time) and applies an 'effect' per success."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []
        self.effects: Counter[str] = Counter()
        self.failing: dict[str, int] = {}  # event id → failures left (a large number: always)
        self.retry_after_s: float | None = None  # carried by the failures when set
        self.hang_on: str | None = None
        self.hung = asyncio.Event()

    async def __call__(self, event: events_pb2.Event) -> None:
        self.calls.append((event.id, current_delivery().attempt, time.monotonic()))
        if event.id == self.hang_on:
            self.hung.set()
            await asyncio.Event().wait()  # dies here: the test cancels the consumer
        if self.failing.get(event.id, 0) > 0:
            self.failing[event.id] -= 1
            if self.retry_after_s is not None:
                raise RetryLaterError(f"cannot handle {event.id} yet", self.retry_after_s)
            raise RuntimeError(f"cannot handle {event.id} yet")
        self.effects[event.id] += 1

    def calls_for(self, event_id: str) -> list[tuple[str, int, float]]:
        return [call for call in self.calls if call[0] == event_id]

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        await eventually(condition, what=what, timeout_s=DEADLINE_S, details=lambda: f"calls: {self.calls}")


def nothing_pending(source: EventSource) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await source.pending_count() == 0

    return check


def make_events(count: int) -> list[events_pb2.Event]:
    events = []
    for index in range(count):
        user = f"user-{index}"
        event = events_pb2.Event(id=str(uuid.uuid4()), type="user.registered", source="test", subject=user)
        event.user_registered.CopyFrom(events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com"))
        events.append(event)
    return events


@pytest.fixture(params=ADAPTERS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    group = f"test-{uuid.uuid4().hex[:12]}"
    stream = stream_key(group)
    if request.param == "memory":
        memory_source = InProcessSource(stream=stream, group=group)
        yield Harness(group, memory_source, InMemoryProcessedEvents(), publishing_to(memory_source))
        return
    if request.param == "memory+sqlite":
        async with embedded_harness(
            group, stream, fresh_sqlite_url(request.getfixturevalue("tmp_path"))
        ) as ready:
            yield ready
        return
    if request.param == "memory+postgres":
        server_url: str = request.getfixturevalue("postgres_server_url")
        async with fresh_postgres_database(server_url) as url, embedded_harness(group, stream, url) as ready:
            yield ready
        return
    redis_url: str = request.getfixturevalue("redis_url")
    client = Redis.from_url(redis_url)
    prefix = f"parley-test:{group}:"

    async def publish_to_redis(event: events_pb2.Event, for_group: str | None) -> None:
        await client.xadd(stream, encode_entry(event, for_group=for_group))  # type: ignore[arg-type]

    try:
        yield Harness(
            group,
            RedisStreamSource(client, stream=stream, group=group),
            RedisProcessedEvents(client, ttl_s=600, key_prefix=prefix),
            publish_to_redis,
        )
    finally:
        await delete_namespace(client, prefix, stream, dlq_key(group))
        await client.aclose()


def publishing_to(source: InProcessSource) -> Callable[[events_pb2.Event, str | None], Awaitable[None]]:
    async def publish(event: events_pb2.Event, for_group: str | None) -> None:
        source.publish(event, for_group=for_group)

    return publish


@contextlib.asynccontextmanager
async def embedded_harness(group: str, stream: str, database_url: str) -> AsyncIterator[Harness]:
    """Embedded mode's setup: the in-process source with its dead letters, and the idempotency
    records, in the database."""
    await upgrade_async(database_url)
    database = Database(database_url)
    source = InProcessSource(stream=stream, group=group, dead_letters=SqlDeadLetters(database))
    try:
        yield Harness(group, source, SqlProcessedEvents(database), publishing_to(source))
    finally:
        await database.dispose()


class Running:
    """A consumer's `run` loop in a task, stopped (and awaited) on exit."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self._task = asyncio.create_task(self._consumer.run(self._stop))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        async with asyncio.timeout(DEADLINE_S):
            await self._task


async def test_each_event_is_delivered_once_and_acked(harness: Harness) -> None:
    events = make_events(5)
    await harness.publish_all(events)
    handler = Recorder()
    consumer = harness.consumer(handler)

    assert await consumer.poll_once() == 5
    assert [call[0] for call in handler.calls] == [event.id for event in events]
    assert all(call[1] == 1 for call in handler.calls)
    assert await harness.source.pending_count() == 0
    # Nothing is delivered a second time, to this member or to another one of the group.
    assert await consumer.poll_once(block_s=0) == 0
    assert await harness.consumer(handler, member="m2", visibility_timeout_s=0).poll_once(block_s=0) == 0
    assert handler.effects == Counter({event.id: 1 for event in events})


async def test_entries_are_read_in_batches_of_the_batch_size(harness: Harness) -> None:
    events = make_events(7)
    await harness.publish_all(events)
    handler = Recorder()
    consumer = harness.consumer(handler, batch_size=3)

    assert [await consumer.poll_once(block_s=0) for _ in range(4)] == [3, 3, 1, 0]
    assert [call[0] for call in handler.calls] == [event.id for event in events]
    assert await harness.source.pending_count() == 0


async def test_a_failing_handler_is_retried_with_backoff_then_succeeds(harness: Harness) -> None:
    flaky, steady = make_events(2)
    handler = Recorder()
    handler.failing[flaky.id] = 2
    await harness.publish_all([flaky, steady])

    async with Running(harness.consumer(handler)):
        await handler.wait_until(lambda: handler.effects[flaky.id] == 1, "the flaky event handled")

    calls = handler.calls_for(flaky.id)
    # The attempt number is the entry's delivery count.
    assert [attempt for _id, attempt, _at in calls] == [1, 2, 3]
    # MaxJitter makes each delay its ceiling: base after the first failure, 2 x base after the second.
    assert calls[1][2] - calls[0][2] >= BACKOFF_BASE_S
    assert calls[2][2] - calls[1][2] >= 2 * BACKOFF_BASE_S
    assert handler.effects == Counter({flaky.id: 1, steady.id: 1})
    assert len(handler.calls_for(steady.id)) == 1
    assert harness.metric("parley_consumer_retries_total") == 2
    assert harness.metric("parley_consumer_dead_letters_total") == 0
    assert await harness.source.pending_count() == 0
    assert await harness.source.dead_letters() == []


async def test_a_poison_event_is_dead_lettered_while_the_rest_flow(harness: Harness) -> None:
    first, poison, *rest = make_events(5)
    handler = Recorder()
    handler.failing[poison.id] = 1_000
    await harness.publish_all([first, poison, *rest])

    async with Running(harness.consumer(handler, max_attempts=3)):
        await handler.wait_until(lambda: len(handler.calls_for(poison.id)) == 3, "three calls for the poison")
        await handler.wait_until(lambda: sum(handler.effects.values()) == 4, "the other four handled")
        # The dead-letter write follows the last failed call.
        await eventually(nothing_pending(harness.source), what="nothing pending", timeout_s=DEADLINE_S)

    assert handler.effects == Counter({event.id: 1 for event in [first, *rest]})
    assert [attempt for _id, attempt, _at in handler.calls_for(poison.id)] == [1, 2, 3]
    [dead] = await harness.source.dead_letters()
    assert dead.event_id == poison.id
    assert dead.stream == harness.source.stream
    assert dead.attempts == 3
    assert dead.error == f"RuntimeError: cannot handle {poison.id} yet"
    assert events_pb2.Event.FromString(dead.event) == poison
    assert harness.metric("parley_consumer_dead_letters_total") == 1
    assert harness.metric("parley_consumer_retries_total") == 2


async def test_replaying_dead_letters_delivers_them_after_a_fix(harness: Harness) -> None:
    poison_a, poison_b, healthy = make_events(3)
    handler = Recorder()
    handler.failing.update({poison_a.id: 1_000, poison_b.id: 1_000})
    await harness.publish_all([poison_a, poison_b, healthy])
    consumer = harness.consumer(handler, max_attempts=2)

    async with Running(consumer):
        await handler.wait_until(lambda: handler.effects[healthy.id] == 1, "the healthy event handled")

        async def both_dead_lettered() -> bool:
            return len(await harness.source.dead_letters()) == 2

        await eventually(both_dead_lettered, what="both poison events dead-lettered", timeout_s=DEADLINE_S)
    dead = await harness.source.dead_letters()
    assert [letter.event_id for letter in dead] == [poison_a.id, poison_b.id]

    handler.failing.clear()  # the fix
    assert await harness.source.replay(dead[0].dead_letter_id) == 1
    assert [letter.event_id for letter in await harness.source.dead_letters()] == [poison_b.id]
    async with Running(consumer):
        await handler.wait_until(lambda: handler.effects[poison_a.id] == 1, "the replayed event handled")
    assert handler.effects[poison_b.id] == 0

    assert await harness.source.replay() == 1
    assert await harness.source.dead_letters() == []
    async with Running(consumer):
        await handler.wait_until(lambda: handler.effects[poison_b.id] == 1, "the replayed event handled")
    assert handler.effects == Counter({poison_a.id: 1, poison_b.id: 1, healthy.id: 1})
    assert await harness.source.pending_count() == 0


async def test_a_dead_consumers_entries_are_reclaimed_and_each_effect_applied_once(harness: Harness) -> None:
    events = make_events(5)
    await harness.publish_all(events)
    handler = Recorder()
    handler.hang_on = events[2].id
    doomed = harness.consumer(handler, member="doomed")

    # It handles the first two events of its batch, then dies inside the third, before acking any.
    poll = asyncio.create_task(doomed.poll_once())
    async with asyncio.timeout(DEADLINE_S):
        await handler.hung.wait()
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll
    assert handler.effects == Counter({events[0].id: 1, events[1].id: 1})
    assert await harness.source.pending_count() == 5

    handler.hang_on = None
    survivor = harness.consumer(handler, member="survivor", visibility_timeout_s=0.2)
    calls_before = len(handler.calls)
    async with Running(survivor):
        await handler.wait_until(lambda: len(handler.effects) == 5, "every event handled")
        # The two the dead consumer had processed are acknowledged without a call.
        await eventually(nothing_pending(harness.source), what="nothing pending", timeout_s=DEADLINE_S)

    assert handler.effects == Counter({event.id: 1 for event in events})
    # The survivor ran the handler only for the three events the dead consumer had not processed.
    assert sorted(call[0] for call in handler.calls[calls_before:]) == sorted(e.id for e in events[2:])
    assert all(call[1] == 2 for call in handler.calls[calls_before:])


async def test_in_process_delivery_returns_once_the_consumer_is_done() -> None:
    group = "embedded"
    source = InProcessSource(stream=stream_key("test"), group=group, settle_timeout_s=DEADLINE_S)
    dispatcher = InProcessDispatcher()
    dispatcher.subscribe(group, source.deliver)
    handler = Recorder()
    events = make_events(3)
    handler.failing[events[1].id] = 1
    consumer = Consumer(
        group,
        handler,
        source,
        InMemoryProcessedEvents(),
        member="m1",
        backoff_base_s=BACKOFF_BASE_S,
        backoff_cap_s=BACKOFF_CAP_S,
        block_s=BLOCK_S,
    )

    async with Running(consumer):
        await dispatcher.dispatch(events)
        # dispatch returned: every event was handled (one after a retry) and acknowledged.
        assert handler.effects == Counter({event.id: 1 for event in events})
        assert await source.pending_count() == 0


async def test_the_handler_runs_in_the_trace_the_event_was_produced_in(harness: Harness) -> None:
    [event] = make_events(1)
    event.trace_context.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await harness.publish(event)
    seen: list[events_pb2.TraceContext | None] = []

    async def handler(received: events_pb2.Event) -> None:
        seen.append(current_trace_context())

    consumer = Consumer(harness.group, handler, harness.source, harness.processed, member="m1")
    assert await consumer.poll_once(block_s=0) == 1
    assert len(seen) == 1
    assert seen[0] is not None
    assert seen[0].traceparent == event.trace_context.traceparent
    # Outside the handler, the event's trace is no longer current.
    assert current_trace_context() is None


async def test_a_handler_can_record_processing_in_its_own_transaction(harness: Harness) -> None:
    recorded, unrecorded = make_events(2)
    await harness.publish_all([recorded, unrecorded])

    async def handler(event: events_pb2.Event) -> None:
        # Stands for a handler writing the record in the same database transaction as its effect.
        if event.id == recorded.id:
            delivery = current_delivery()
            await harness.processed.mark_processed(delivery.consumer, delivery.event_id)

    consumer = Consumer(
        harness.group,
        handler,
        harness.source,
        harness.processed,
        member="m1",
        handler_records_processing=True,
    )
    assert await consumer.poll_once(block_s=0) == 2
    assert await harness.processed.is_processed(harness.group, recorded.id)
    # The runner leaves the record to such a handler, and writes none of its own.
    assert not await harness.processed.is_processed(harness.group, unrecorded.id)
    assert await harness.source.pending_count() == 0


async def test_an_entry_for_another_group_is_acked_without_handling(harness: Harness) -> None:
    theirs, ours, everyones = make_events(3)
    await harness.publish_for(theirs, "another-group")
    await harness.publish_for(ours, harness.group)
    await harness.publish(everyones)
    handler = Recorder()

    assert await harness.consumer(handler).poll_once(block_s=0) == 3
    assert handler.effects == Counter({ours.id: 1, everyones.id: 1})
    assert await harness.source.pending_count() == 0
    assert not await harness.processed.is_processed(harness.group, theirs.id)


async def test_events_of_types_the_consumer_does_not_want_are_acked_without_handling(
    harness: Harness,
) -> None:
    wanted, other = make_events(2)
    other.type = "user.enabled"
    other.user_enabled.CopyFrom(events_pb2.UserEnabled(user_id=other.subject))
    await harness.publish_all([other, wanted])
    handler = Recorder()

    assert await harness.consumer(handler, event_types={"user.registered"}).poll_once(block_s=0) == 2
    assert handler.effects == Counter({wanted.id: 1})
    assert await harness.source.pending_count() == 0
    assert not await harness.processed.is_processed(harness.group, other.id)


async def test_an_event_published_twice_in_one_batch_is_handled_once(harness: Harness) -> None:
    [event] = make_events(1)
    await harness.publish_all([event, event])
    handler = Recorder()

    assert await harness.consumer(handler).poll_once(block_s=0) == 2
    assert handler.effects == Counter({event.id: 1})
    assert await harness.source.pending_count() == 0


async def test_a_retry_waits_at_least_the_errors_retry_after(harness: Harness) -> None:
    [event] = make_events(1)
    handler = Recorder()
    handler.failing[event.id] = 1
    handler.retry_after_s = 0.4  # well above the backoff (BACKOFF_BASE_S)
    await harness.publish(event)

    async with Running(harness.consumer(handler)):
        await handler.wait_until(lambda: handler.effects[event.id] == 1, "the event handled on its retry")

    first, second = handler.calls_for(event.id)
    assert second[2] - first[2] >= 0.4
    assert second[1] == 2


async def test_a_retry_after_beyond_the_visibility_timeout_is_cut_short(harness: Harness) -> None:
    [event] = make_events(1)
    handler = Recorder()
    handler.failing[event.id] = 1
    handler.retry_after_s = 600.0
    await harness.publish(event)
    visibility_timeout_s = 1.0

    async with Running(harness.consumer(handler, visibility_timeout_s=visibility_timeout_s)):
        await handler.wait_until(lambda: handler.effects[event.id] == 1, "the event handled on its retry")

    # Retried by its holder before the entry looks abandoned, not after 600 s.
    first, second = handler.calls_for(event.id)
    assert second[2] - first[2] < visibility_timeout_s + 0.5
    assert second[1] == 2
    assert await harness.source.pending_count() == 0


class PerEventRecords:
    """Idempotency records with only the per-event methods (the batch methods are optional)."""

    def __init__(self) -> None:
        self._records = InMemoryProcessedEvents()

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        return await self._records.is_processed(consumer, event_id)

    async def mark_processed(self, consumer: str, event_id: str) -> None:
        await self._records.mark_processed(consumer, event_id)


async def test_records_without_batch_methods_are_asked_per_event() -> None:
    group = "per-event"
    source = InProcessSource(stream=stream_key("test"), group=group)
    records = PerEventRecords()
    events = make_events(3)
    await records.mark_processed(group, events[0].id)
    for event in events:
        source.publish(event)
    handler = Recorder()
    consumer = Consumer(group, handler, source, records, member="m1", block_s=BLOCK_S)

    assert await consumer.poll_once(block_s=0) == 3
    assert handler.effects == Counter({events[1].id: 1, events[2].id: 1})
    assert all([await records.is_processed(group, event.id) for event in events])


@pytest.mark.redis
async def test_a_replayed_dead_letter_goes_to_its_own_group_only(redis_url: str) -> None:
    """Two groups read one stream; only the group that dead-lettered an event gets its replay."""
    stream = stream_key(f"test-{uuid.uuid4().hex[:12]}")
    failing_group, healthy_group = (f"test-{uuid.uuid4().hex[:12]}" for _ in range(2))
    prefix = f"parley-test:{failing_group}:"
    client = Redis.from_url(redis_url)
    processed = RedisProcessedEvents(client, ttl_s=600, key_prefix=prefix)
    failing, healthy = Recorder(), Recorder()
    [event] = make_events(1)
    failing.failing[event.id] = 1_000

    def consumer(group: str, handler: Recorder) -> Consumer:
        source = RedisStreamSource(client, stream=stream, group=group)
        return Consumer(group, handler, source, processed, member="m1", max_attempts=1, block_s=BLOCK_S)

    try:
        first, second = consumer(failing_group, failing), consumer(healthy_group, healthy)
        await first.poll_once(block_s=0)  # creates its group before the event is published
        await second.poll_once(block_s=0)
        await client.xadd(stream, encode_entry(event))  # type: ignore[arg-type]
        assert await first.poll_once(block_s=0) == 1  # dead-lettered at its only attempt
        assert await second.poll_once(block_s=0) == 1
        source = RedisStreamSource(client, stream=stream, group=failing_group)
        assert [letter.event_id for letter in await source.dead_letters()] == [event.id]

        failing.failing.clear()
        assert await source.replay() == 1
        assert await second.poll_once(block_s=0) == 1  # acknowledged, not handled again
        assert await first.poll_once(block_s=0) == 1

        assert healthy.effects == Counter({event.id: 1})
        assert len(healthy.calls) == 1
        assert failing.effects == Counter({event.id: 1})
    finally:
        await delete_namespace(client, prefix, stream, dlq_key(failing_group), dlq_key(healthy_group))
        await client.aclose()
