"""The relay worker's (and `parley up`'s) housekeeping, on SQLite and PostgreSQL: relayed events and
idempotency records past their retention go, everything still needed stays."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select, update

from parley.events.v1 import events_pb2
from runtime.workers import keep_pipeline_history_pruned, prune_pipeline_history
from services.common.clock import utc_now
from services.common.db import Database
from services.common.outbox import OutboxEvent, add_event
from services.common.processed_events import ProcessedEvent, SqlProcessedEvents
from services.common.settings import load_settings
from tests.support.polling import eventually

DEADLINE_S = 10.0


async def add_events(database: Database, count: int) -> list[str]:
    async with database.unit_of_work() as session:
        return [
            add_event(session, source="auth", subject=user, payload=events_pb2.UserEnabled(user_id=user)).id
            for user in (f"u{index}" for index in range(count))
        ]


async def remaining(database: Database) -> tuple[list[str], list[str]]:
    async with database.unit_of_work(read_only=True) as session:
        events = list(await session.scalars(select(OutboxEvent.event_id).order_by(OutboxEvent.sequence)))
        records = list(
            await session.scalars(select(ProcessedEvent.event_id).order_by(ProcessedEvent.event_id))
        )
    return events, records


async def mark_relayed(database: Database, event_id: str, days_ago: float) -> None:
    async with database.unit_of_work() as session:
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.event_id == event_id)
            .values(relayed_at=utc_now() - timedelta(days=days_ago))
        )


async def test_history_past_its_retention_is_pruned_and_the_rest_kept(database: Database) -> None:
    settings = load_settings(outbox_retention_days=7, processed_retention_days=30)
    old_relayed, unrelayed, recent_relayed = await add_events(database, 3)
    now = utc_now()
    await mark_relayed(database, old_relayed, days_ago=8)
    await mark_relayed(database, recent_relayed, days_ago=6)
    processed = SqlProcessedEvents(database)
    await processed.mark_all_processed("email", ["old-record", "recent-record"])
    async with database.unit_of_work() as session:
        await session.execute(
            update(ProcessedEvent)
            .where(ProcessedEvent.event_id == "old-record")
            .values(processed_at=now - timedelta(days=31))
        )

    assert await prune_pipeline_history(database, settings, now=now) == (1, 1)

    assert await remaining(database) == ([unrelayed, recent_relayed], ["recent-record"])
    assert await processed.is_processed("email", "recent-record")


async def test_the_housekeeping_task_prunes_at_once_and_stops_when_asked(database: Database) -> None:
    settings = load_settings(outbox_retention_days=1)
    [event_id] = await add_events(database, 1)
    await mark_relayed(database, event_id, days_ago=2)
    stop = asyncio.Event()
    task = asyncio.create_task(keep_pipeline_history_pruned(stop, database, settings, interval_s=3600))

    async def pruned() -> bool:
        return not (await remaining(database))[0]

    await eventually(pruned, what="the relayed event pruned", timeout_s=DEADLINE_S, interval_s=0.01)
    stop.set()
    async with asyncio.timeout(DEADLINE_S):
        await task
