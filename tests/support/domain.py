"""What domain tests of every service share: a settable clock, the outbox's events, and refusals."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from google.protobuf.message import Message
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.common.db import Database
from services.common.errors import ParleyError
from services.common.events import payload_of
from services.common.outbox import OutboxEvent

START = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)

ErrorT = TypeVar("ErrorT", bound=ParleyError)
PayloadT = TypeVar("PayloadT", bound=Message)


class Clock:
    """A settable clock shared by every component under test."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass(frozen=True)
class StoredEvent:
    type: str
    subject: str
    source: str
    event: events_pb2.Event
    payload: Message


async def outbox(database: Database, event_type: str | None = None) -> list[StoredEvent]:
    """The events in the outbox, oldest first (only those of `event_type` when given)."""
    async with database.unit_of_work(read_only=True) as session:
        rows = list(await session.scalars(select(OutboxEvent).order_by(OutboxEvent.sequence)))
    found = []
    for row in rows:
        event = events_pb2.Event.FromString(row.payload)
        assert event.type == row.event_type
        found.append(StoredEvent(row.event_type, row.subject, row.source, event, payload_of(event)))
    return [item for item in found if event_type is None or item.type == event_type]


async def payloads(database: Database, event_type: str, kind: type[PayloadT]) -> list[PayloadT]:
    found = []
    for item in await outbox(database, event_type):
        assert isinstance(item.payload, kind)
        found.append(item.payload)
    return found


async def refusal(awaitable: Awaitable[object], kind: type[ErrorT]) -> ErrorT:
    """The error `awaitable` raises, checked to be a `kind`."""
    with pytest.raises(kind) as raised:
        await awaitable
    return raised.value
