"""Idempotency records in the service's own database: which events each consumer has processed.

The SQL adapter of `services.common.consumers.ProcessedEvents`, next to the Redis and in-memory
ones. What it adds: a handler whose effect lives in this database writes the record in the same
transaction as the effect (`record_processed`, with `Consumer(handler_records_processing=True)`),
so the two commit together or not at all, and a redelivered event is skipped.

One row per (consumer, event id). The primary key is what makes "once" hold under a race: if two
members of a group handle the same event at once (a reclaim of a slow member's entry), the second
transaction to commit fails on the key and rolls back its effect with it; its retry then finds the
record and skips the event. Records are kept until `prune_processed` deletes them; keep them longer
than any redelivery can come (stream retention, a dead-letter replay days later), as the Redis
adapter's TTL does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import String, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from services.common.clock import utc_now
from services.common.db import Database
from services.common.models import UUID_LENGTH, Base, UTCDateTime

CONSUMER_MAX_LENGTH: Final = 64


class ProcessedEvent(Base):
    """The record that `consumer` has processed the event `event_id`."""

    __tablename__ = "processed_events"

    consumer: Mapped[str] = mapped_column(String(CONSUMER_MAX_LENGTH), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    # Indexed for `prune_processed`, which deletes by age.
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


def _checked(consumer: str, event_id: str) -> None:
    # PostgreSQL would refuse an over-long value and SQLite would store it: refuse it on both alike.
    if not 0 < len(consumer) <= CONSUMER_MAX_LENGTH:
        raise ValueError(f"a consumer name is 1 to {CONSUMER_MAX_LENGTH} characters, not {len(consumer)}")
    if not 0 < len(event_id) <= UUID_LENGTH:
        raise ValueError(f"an event id is 1 to {UUID_LENGTH} characters, not {len(event_id)}")


def record_processed(session: AsyncSession, consumer: str, event_id: str) -> None:
    """Record, inside the caller's unit of work, that `consumer` processed `event_id`.

    For handlers run with `Consumer(handler_records_processing=True)`: write the effect and this
    record in one unit of work. Never flushes or commits; if the record already exists the commit
    fails (IntegrityError) and the effect is rolled back with it, which is the point.
    """
    _checked(consumer, event_id)
    session.add(ProcessedEvent(consumer=consumer, event_id=event_id, processed_at=utc_now()))


class SqlProcessedEvents:
    """`ProcessedEvents` in the service's database (the `processed_events` table), PostgreSQL or SQLite."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        async with self._db.unit_of_work(read_only=True) as session:
            found = await session.scalar(
                select(ProcessedEvent.event_id)
                .where(ProcessedEvent.consumer == consumer, ProcessedEvent.event_id == event_id)
                .limit(1)
            )
        return found is not None

    async def processed_among(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        """The ids among `event_ids` that `consumer` has processed: one query for a consumer's batch."""
        if not event_ids:
            return set()
        async with self._db.unit_of_work(read_only=True) as session:
            found = await session.scalars(
                select(ProcessedEvent.event_id).where(
                    ProcessedEvent.consumer == consumer, ProcessedEvent.event_id.in_(set(event_ids))
                )
            )
            return set(found)

    async def mark_processed(self, consumer: str, event_id: str) -> None:
        """Record the event as processed in a unit of work of its own; a second mark is a no-op."""
        await self.mark_all_processed(consumer, [event_id])

    async def mark_all_processed(self, consumer: str, event_ids: Sequence[str]) -> None:
        """Record every event as processed in one statement; records that exist stay as they are."""
        if not event_ids:
            return
        for event_id in event_ids:
            _checked(consumer, event_id)
        insert = postgresql.insert if self._db.dialect_name == "postgresql" else sqlite.insert
        now = utc_now()
        rows = [{"consumer": consumer, "event_id": event_id, "processed_at": now} for event_id in event_ids]
        statement = (
            insert(ProcessedEvent)
            .values(rows)
            .on_conflict_do_nothing(index_elements=[ProcessedEvent.consumer, ProcessedEvent.event_id])
        )
        async with self._db.unit_of_work() as session:
            await session.execute(statement)


async def prune_processed(db: Database, *, older_than: datetime) -> int:
    """Delete the records made before `older_than` (timezone-aware); returns how many were deleted."""
    if older_than.tzinfo is None or older_than.utcoffset() is None:
        raise ValueError(f"naive datetime {older_than!r} given; use a timezone-aware one (e.g. utc_now())")
    async with db.unit_of_work() as session:
        result: Any = await session.execute(
            delete(ProcessedEvent)
            .where(ProcessedEvent.processed_at < older_than)
            .execution_options(synchronize_session=False)
        )
    return int(result.rowcount or 0)
