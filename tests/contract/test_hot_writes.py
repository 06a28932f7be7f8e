"""Contract of `services.common.hot_writes`, on SQLite and PostgreSQL: writes commit whole or not at
all, values round-trip as through a session, a unique constraint's refusal is `UniqueViolation`, and
writes that record events wake the outbox relay once committed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import BigInteger, Column, MetaData, String, Table, bindparam, insert, select, update

from services.common.db import Database
from services.common.hot_writes import HotWrite, HotWriteBusy, UniqueViolation
from services.common.models import UTCDateTime

metadata = MetaData()
counters = Table(
    "test_hot_counters",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("value", BigInteger(), nullable=False),
    Column("changed_at", UTCDateTime(), nullable=False),
)

ADD = HotWrite(
    insert(counters).values(
        id=bindparam("new_id", type_=String()),
        value=bindparam("start", type_=BigInteger()),
        changed_at=bindparam("now", type_=UTCDateTime()),
    ),
    lambda row: row,
)
# Adds `by` unless the counter would pass `most`; the counter after, or no row.
BUMP = HotWrite(
    update(counters)
    .where(
        counters.c.id == bindparam("counter", type_=String()),
        counters.c.value + bindparam("by", type_=BigInteger()) <= bindparam("most", type_=BigInteger()),
    )
    .values(
        value=counters.c.value + bindparam("by", type_=BigInteger()),
        changed_at=bindparam("now", type_=UTCDateTime()),
    )
    .returning(counters.c.value, counters.c.changed_at),
    lambda row: (row.value, row.changed_at),
    records_events=True,
)
NOON = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
async def db(database: Database) -> AsyncIterator[Database]:
    async with database.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    await database.hot_writes.atomic(ADD, new_id="c1", start=0, now=NOON)
    yield database


async def value_of(db: Database, counter: str) -> tuple[int, datetime] | None:
    async with db.unit_of_work(read_only=True) as session:
        row = (
            await session.execute(
                select(counters.c.value, counters.c.changed_at).where(counters.c.id == counter)
            )
        ).first()
    return None if row is None else (row.value, row.changed_at)


async def test_an_atomic_write_returns_its_rows_typed_as_a_session_reads_them(db: Database) -> None:
    later = NOON + timedelta(minutes=1)
    assert await db.hot_writes.atomic(BUMP, counter="c1", by=5, most=10, now=later) == [(5, later)]
    assert await db.hot_writes.atomic(BUMP, counter="c1", by=6, most=10, now=later) == []
    assert await value_of(db, "c1") == (5, later)


async def test_a_transaction_commits_whole_or_rolls_back_whole(db: Database) -> None:
    async with db.hot_writes.transaction() as transaction:
        await transaction.fetch(BUMP, counter="c1", by=1, most=100, now=NOON)
        await transaction.fetch(ADD, new_id="c2", start=7, now=NOON)
    assert await value_of(db, "c1") == (1, NOON)
    assert await value_of(db, "c2") == (7, NOON)

    with pytest.raises(RuntimeError):
        async with db.hot_writes.transaction() as transaction:
            await transaction.fetch(BUMP, counter="c1", by=1, most=100, now=NOON)
            raise RuntimeError("the caller changed its mind")
    assert await value_of(db, "c1") == (1, NOON)


async def test_a_refused_unique_row_is_a_unique_violation_and_writes_nothing(db: Database) -> None:
    with pytest.raises(UniqueViolation):
        await db.hot_writes.atomic(ADD, new_id="c1", start=3, now=NOON)
    with pytest.raises(UniqueViolation):
        async with db.hot_writes.transaction() as transaction:
            await transaction.fetch(BUMP, counter="c1", by=1, most=100, now=NOON)
            await transaction.fetch(ADD, new_id="c1", start=3, now=NOON)
    assert await value_of(db, "c1") == (0, NOON)
    # The connection is fit for the next write.
    assert await db.hot_writes.atomic(BUMP, counter="c1", by=2, most=100, now=NOON) == [(2, NOON)]


async def test_concurrent_conditional_writes_never_pass_their_condition(db: Database) -> None:
    outcomes = await asyncio.gather(
        *(db.hot_writes.atomic(BUMP, counter="c1", by=3, most=10, now=NOON) for _ in range(20))
    )
    assert sum(1 for rows in outcomes if rows) == 3
    assert await value_of(db, "c1") == (9, NOON)


async def test_writes_that_record_events_wake_the_listeners_once_committed(db: Database) -> None:
    woken: list[str] = []
    db.hot_writes.after_events_committed(lambda: woken.append("relay"))
    await db.hot_writes.atomic(ADD, new_id="c2", start=0, now=NOON)
    assert woken == []
    await db.hot_writes.atomic(BUMP, counter="c1", by=1, most=10, now=NOON)
    assert woken == ["relay"]
    with pytest.raises(RuntimeError):
        async with db.hot_writes.transaction() as transaction:
            await transaction.fetch(BUMP, counter="c1", by=1, most=10, now=NOON)
            raise RuntimeError("rolled back")
    assert woken == ["relay"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_gives_up_at_once_on_another_process_write_lock(db: Database) -> None:
    database = db.url.database
    assert database is not None
    other = sqlite3.connect(database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(HotWriteBusy):
            await db.hot_writes.atomic(BUMP, counter="c1", by=1, most=10, now=NOON)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert await db.hot_writes.atomic(BUMP, counter="c1", by=1, most=10, now=NOON) == [(1, NOON)]
