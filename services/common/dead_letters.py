"""Dead letters in the service's own database: embedded mode's dead-letter queue.

Microservices mode keeps a consumer's dead letters in the Redis stream `parley:dlq:<consumer>`.
Embedded mode (`parley up`) has no Redis streams: its `InProcessSource` writes them here, to the
`dead_letters` table next to the outbox, so they survive a restart and `parley events dlq` can list
and replay them from another process.

Replaying from another process goes through the outbox, the durable queue of embedded mode:
`requeue_in_outbox` deletes the dead letter and puts its event back in `outbox_events` in one unit of
work, and the relay (the running `parley up`, or the next one) delivers it again. Every in-process
consumer of that event type receives it again; those that processed it skip it by their idempotency
records, and the one that dead-lettered it has none for it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from google.protobuf.message import DecodeError
from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, Text, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from parley.events.v1 import events_pb2
from services.common.clock import utc_now
from services.common.consumers import DeadLetter
from services.common.db import Database
from services.common.models import UUID_LENGTH, Base, UTCDateTime
from services.common.outbox import EVENTS_ADDED, OutboxEvent
from services.common.processed_events import CONSUMER_MAX_LENGTH
from services.common.streams import MalformedStreamEntry

STREAM_MAX_LENGTH: Final = 255


class DeadLetterRow(Base):
    """One event a consumer gave up on, with the error and the event as it was delivered."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        # Every query names one consumer and reads or picks its letters by id.
        Index("ix_dead_letters_consumer_id", "consumer", "id"),
        # AUTOINCREMENT: SQLite must never give a replayed letter's id to a new one.
        {"sqlite_autoincrement": True},
    )

    # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    consumer: Mapped[str] = mapped_column(String(CONSUMER_MAX_LENGTH))
    event_id: Mapped[str] = mapped_column(String(UUID_LENGTH))
    stream: Mapped[str] = mapped_column(String(STREAM_MAX_LENGTH))
    error: Mapped[str] = mapped_column(Text())
    attempts: Mapped[int] = mapped_column(Integer())
    failed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The serialized `parley.events.v1.Event`, as the consumer received it.
    event: Mapped[bytes] = mapped_column(LargeBinary())


def _checked_consumer(consumer: str) -> str:
    if not 0 < len(consumer) <= CONSUMER_MAX_LENGTH:
        raise ValueError(f"a consumer name is 1 to {CONSUMER_MAX_LENGTH} characters, not {len(consumer)}")
    return consumer


def _row_id(dead_letter_id: str) -> int | None:
    """The row id a dead-letter id names, or None when it names none (ids are what `list` shows)."""
    return int(dead_letter_id) if dead_letter_id.isascii() and dead_letter_id.isdigit() else None


def _dead_letter(row: DeadLetterRow) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=str(row.id),
        event_id=row.event_id,
        stream=row.stream,
        error=row.error,
        attempts=row.attempts,
        failed_at=row.failed_at,
        event=row.event,
    )


class SqlDeadLetters:
    """Each consumer's dead letters in the `dead_letters` table, PostgreSQL or SQLite, oldest first."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(self, consumer: str, dead_letter: DeadLetter) -> str:
        """Store a dead letter (its `dead_letter_id` is ignored) and return the id it got."""
        row = DeadLetterRow(
            consumer=_checked_consumer(consumer),
            # Only a malformed entry carries anything but a UUID here; keep what fits.
            event_id=dead_letter.event_id[:UUID_LENGTH],
            stream=dead_letter.stream[:STREAM_MAX_LENGTH],
            error=dead_letter.error,
            attempts=dead_letter.attempts,
            failed_at=dead_letter.failed_at,
            event=dead_letter.event,
        )
        async with self._db.unit_of_work() as session:
            session.add(row)
            await session.flush()
            return str(row.id)

    async def take(self, consumer: str, dead_letter_id: str | None = None) -> list[DeadLetter]:
        """Delete one dead letter (every one of the consumer's when None) and return what was deleted,
        oldest first; an unknown id takes nothing. Two concurrent takes never both get one letter."""
        async with self._db.unit_of_work() as session:
            return await _take(session, consumer, dead_letter_id)

    async def requeue_in_outbox(self, consumer: str, dead_letter_id: str | None = None) -> int:
        """Put one dead letter (every one when None) back in the outbox for the relay to deliver
        again, and delete it, in one unit of work; returns how many were requeued (0 for an unknown id).

        The event's outbox row, relayed or not, is replaced by a new unrelayed one (same event id,
        type, source, subject and payload; written now, at the end of the sequence). A new row rather
        than resetting the old one: a relay that handed the old row out and has not marked it relayed
        yet marks it by its sequence, and would otherwise mark the requeued event relayed unsent. A
        letter whose event cannot be decoded raises `MalformedStreamEntry` and nothing is requeued.
        """
        async with self._db.unit_of_work() as session:
            taken = await _take(session, consumer, dead_letter_id)
            # One row per event: an event dead-lettered twice (redelivered after a crash) goes out once.
            rows = {row.event_id: row for row in map(_outbox_row, taken)}
            if rows:
                await session.execute(
                    delete(OutboxEvent)
                    .where(OutboxEvent.event_id.in_(list(rows)))
                    .execution_options(synchronize_session=False)
                )
                session.add_all(rows.values())
                # A relay in this process wakes on the commit instead of at its next idle poll.
                session.info[EVENTS_ADDED] = True
        return len(taken)

    async def counts(self) -> dict[str, int]:
        """How many dead letters each consumer has (consumers with none are left out)."""
        async with self._db.unit_of_work(read_only=True) as session:
            rows = await session.execute(
                select(DeadLetterRow.consumer, func.count()).group_by(DeadLetterRow.consumer)
            )
            return {consumer: int(count) for consumer, count in rows}

    # Last in the class: below this method, `list` in the class body names it rather than the type.

    async def list(self, consumer: str) -> list[DeadLetter]:
        """The consumer's dead letters, oldest first."""
        async with self._db.unit_of_work(read_only=True) as session:
            rows = await session.scalars(
                select(DeadLetterRow).where(DeadLetterRow.consumer == consumer).order_by(DeadLetterRow.id)
            )
            return [_dead_letter(row) for row in rows]


async def _take(session: AsyncSession, consumer: str, dead_letter_id: str | None) -> list[DeadLetter]:
    statement = delete(DeadLetterRow).where(DeadLetterRow.consumer == consumer)
    if dead_letter_id is not None:
        row_id = _row_id(dead_letter_id)
        if row_id is None:
            return []
        statement = statement.where(DeadLetterRow.id == row_id)
    # DELETE … RETURNING: on PostgreSQL a letter another transaction deleted meanwhile is not returned.
    rows = await session.scalars(
        statement.returning(DeadLetterRow).execution_options(synchronize_session=False)
    )
    return [_dead_letter(row) for row in sorted(rows, key=lambda row: row.id)]


def _outbox_row(dead: DeadLetter) -> OutboxEvent:
    try:
        event = events_pb2.Event.FromString(dead.event)
    except DecodeError as error:
        raise MalformedStreamEntry(
            f"dead letter {dead.dead_letter_id} holds no decodable event; it cannot be replayed"
        ) from error
    if not event.id or not event.type:
        raise MalformedStreamEntry(f"dead letter {dead.dead_letter_id} holds an event without id or type")
    return OutboxEvent(
        event_id=event.id,
        source=event.source,
        event_type=event.type,
        subject=event.subject,
        payload=dead.event,
        occurred_at=utc_now(),
    )
