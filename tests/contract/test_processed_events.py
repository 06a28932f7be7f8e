"""Contract of the idempotency records (`ProcessedEvents`): one suite over memory, Redis, SQLite and
PostgreSQL, then what only the SQL adapter offers: a record written in the handler's own transaction."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import exc, func, select, update

from parley.events.v1 import events_pb2
from services.common.clock import utc_now
from services.common.consumers import (
    BatchProcessedEvents,
    Consumer,
    InMemoryProcessedEvents,
    InProcessSource,
    ProcessedEvents,
    RedisProcessedEvents,
    current_delivery,
)
from services.common.db import Database
from services.common.migrate import upgrade_async
from services.common.outbox import OutboxEvent, add_event
from services.common.processed_events import (
    ProcessedEvent,
    SqlProcessedEvents,
    prune_processed,
    record_processed,
)
from services.common.streams import stream_key
from tests.support.redis_keys import delete_namespace

ADAPTERS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
]
DEADLINE_S = 15.0


def new_event_id() -> str:
    return str(uuid.uuid4())


def make_events(count: int) -> list[events_pb2.Event]:
    events = []
    for index in range(count):
        user = f"user-{index}"
        event = events_pb2.Event(id=new_event_id(), type="user.registered", source="test", subject=user)
        event.user_registered.CopyFrom(events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com"))
        events.append(event)
    return events


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The adapter's name and the URL of its server ("" for memory). Resolved in a sync fixture,
    since an async one cannot ask for the async `postgres_url` by name."""
    fixture = {"memory": None, "redis": "redis_url", "sqlite": "sqlite_url", "postgresql": "postgres_url"}
    name: str = request.param
    url: str = "" if fixture[name] is None else request.getfixturevalue(str(fixture[name]))
    return name, url


@pytest.fixture
async def processed(adapter: tuple[str, str]) -> AsyncIterator[ProcessedEvents]:
    name, url = adapter
    if name == "memory":
        yield InMemoryProcessedEvents()
    elif name == "redis":
        client = Redis.from_url(url)
        prefix = f"parley-test:{uuid.uuid4().hex[:12]}:"
        try:
            yield RedisProcessedEvents(client, ttl_s=600, key_prefix=prefix)
        finally:
            await delete_namespace(client, prefix)
            await client.aclose()
    else:
        await upgrade_async(url)
        db = Database(url)
        try:
            yield SqlProcessedEvents(db)
        finally:
            await db.dispose()


async def test_an_event_is_processed_once_marked(processed: ProcessedEvents) -> None:
    event_id = new_event_id()
    assert not await processed.is_processed("email", event_id)
    await processed.mark_processed("email", event_id)
    assert await processed.is_processed("email", event_id)
    assert not await processed.is_processed("email", new_event_id())


async def test_marking_twice_is_a_no_op(processed: ProcessedEvents) -> None:
    event_id = new_event_id()
    await processed.mark_processed("email", event_id)
    await processed.mark_processed("email", event_id)
    await asyncio.gather(*(processed.mark_processed("email", event_id) for _ in range(3)))
    assert await processed.is_processed("email", event_id)


async def test_each_consumer_has_its_own_records(processed: ProcessedEvents) -> None:
    event_id = new_event_id()
    await processed.mark_processed("email", event_id)
    assert await processed.is_processed("email", event_id)
    assert not await processed.is_processed("analytics", event_id)
    await processed.mark_processed("analytics", event_id)
    assert await processed.is_processed("analytics", event_id)


async def test_a_batch_is_checked_and_marked_in_one_call(processed: ProcessedEvents) -> None:
    assert isinstance(processed, BatchProcessedEvents), "every adapter offers the consumer's batch path"
    done, fresh, other = new_event_id(), new_event_id(), new_event_id()
    await processed.mark_processed("email", done)
    await processed.mark_processed("analytics", other)
    assert await processed.processed_among("email", []) == set()
    assert await processed.processed_among("email", [done, fresh, other, done]) == {done}

    await processed.mark_all_processed("email", [done, fresh, fresh])
    await processed.mark_all_processed("email", [])
    assert await processed.processed_among("email", [done, fresh, other]) == {done, fresh}
    assert await processed.is_processed("email", fresh)
    assert not await processed.is_processed("email", other)


# What follows is the SQL adapter's own: `database` is a fresh, migrated SQLite or PostgreSQL database.


async def records(db: Database) -> list[tuple[str, str]]:
    async with db.unit_of_work(read_only=True) as session:
        rows = await session.execute(
            select(ProcessedEvent.consumer, ProcessedEvent.event_id).order_by(ProcessedEvent.processed_at)
        )
        return [(consumer, event_id) for consumer, event_id in rows]


async def effects(db: Database) -> int:
    """The 'effects' the handlers below apply: events they write to the outbox."""
    async with db.unit_of_work(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(OutboxEvent)) or 0)


def effect(request_event_id: str) -> events_pb2.EmailSent:
    return events_pb2.EmailSent(request_event_id=request_event_id)


async def test_a_record_commits_and_rolls_back_with_the_callers_transaction(database: Database) -> None:
    processed = SqlProcessedEvents(database)
    rolled_back, committed = new_event_id(), new_event_id()
    with pytest.raises(RuntimeError):
        async with database.unit_of_work() as session:
            record_processed(session, "email", rolled_back)
            await session.flush()
            raise RuntimeError("the effect failed")
    async with database.unit_of_work() as session:
        record_processed(session, "email", committed)

    assert not await processed.is_processed("email", rolled_back)
    assert await processed.is_processed("email", committed)
    assert await records(database) == [("email", committed)]


async def test_a_second_record_of_the_same_event_fails_its_transaction(database: Database) -> None:
    # Two members racing on one event: the second commit fails, and takes its effect down with it.
    event_id = new_event_id()
    async with database.unit_of_work() as session:
        add_event(session, source="email", subject="u1", payload=effect(event_id))
        record_processed(session, "email", event_id)
    with pytest.raises(exc.IntegrityError):
        async with database.unit_of_work() as session:
            add_event(session, source="email", subject="u1", payload=effect(event_id))
            record_processed(session, "email", event_id)
    assert await effects(database) == 1
    assert await records(database) == [("email", event_id)]


async def test_prune_deletes_the_records_older_than_the_cutoff(database: Database) -> None:
    processed = SqlProcessedEvents(database)
    old, recent = new_event_id(), new_event_id()
    await processed.mark_processed("email", old)
    await processed.mark_processed("email", recent)
    async with database.unit_of_work() as session:
        await session.execute(
            update(ProcessedEvent)
            .where(ProcessedEvent.event_id == old)
            .values(processed_at=utc_now() - timedelta(days=40))
        )

    assert await prune_processed(database, older_than=utc_now() - timedelta(days=30)) == 1
    assert await records(database) == [("email", recent)]
    assert await prune_processed(database, older_than=utc_now() - timedelta(days=30)) == 0
    with pytest.raises(ValueError, match="naive"):
        await prune_processed(database, older_than=datetime.now())


async def test_names_longer_than_the_columns_are_refused_on_every_database(database: Database) -> None:
    processed = SqlProcessedEvents(database)
    with pytest.raises(ValueError, match="consumer"):
        await processed.mark_processed("c" * 65, new_event_id())
    with pytest.raises(ValueError, match="event id"):
        await processed.mark_processed("email", "e" * 37)
    with pytest.raises(ValueError, match="consumer"):
        async with database.unit_of_work() as session:
            record_processed(session, "", new_event_id())
    assert await records(database) == []


async def test_a_handler_writes_its_effect_and_record_atomically_and_redelivery_is_skipped(
    database: Database,
) -> None:
    group = "effects"
    source = InProcessSource(stream=stream_key("test"), group=group)
    [request] = make_events(1)
    calls: list[int] = []

    async def handler(event: events_pb2.Event) -> None:
        delivery = current_delivery()
        calls.append(delivery.attempt)
        async with database.unit_of_work() as session:
            add_event(session, source="email", subject=event.subject, payload=effect(event.id))
            record_processed(session, delivery.consumer, delivery.event_id)
            if delivery.attempt == 1:
                raise ConnectionError("died before the commit")  # effect and record roll back together

    consumer = Consumer(
        group,
        handler,
        source,
        SqlProcessedEvents(database),
        member="m1",
        backoff_base_s=0.01,
        backoff_cap_s=0.01,
        block_s=0.01,
        handler_records_processing=True,
    )
    source.publish(request)
    async with asyncio.timeout(DEADLINE_S):
        while await source.pending_count() or not calls:
            await consumer.poll_once()
    assert calls == [1, 2]
    assert await effects(database) == 1

    # The same event again (a redelivery): skipped on its record, no second effect.
    source.publish(request)
    assert await consumer.poll_once(block_s=0) == 1
    assert calls == [1, 2]
    assert await effects(database) == 1
    assert await records(database) == [(group, request.id)]
    assert await source.pending_count() == 0
