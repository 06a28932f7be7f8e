"""Contract of `services.common.hot_reads`, on SQLite and PostgreSQL: the same rows, typed the same,
as the ORM's unit of work returns them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, bindparam, insert, select

from services.common.db import Database
from services.common.errors import Unavailable
from services.common.hot_reads import HotRead
from services.common.models import UTCDateTime
from tests.support.tcp_proxy import TcpProxy

metadata = MetaData()
readings = Table(
    "test_hot_readings",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("owner", String(36), nullable=False),
    Column("seen_at", UTCDateTime(), nullable=False),
    Column("gone_at", UTCDateTime(), nullable=True),
    Column("tags", JSON(), nullable=False),
    Column("rank", Integer(), nullable=False),
)

BY_OWNER = HotRead(
    select(readings.c.id, readings.c.seen_at, readings.c.gone_at, readings.c.tags, readings.c.rank)
    .where(readings.c.owner == bindparam("owner"), readings.c.seen_at < bindparam("before"))
    .order_by(readings.c.seen_at.desc(), readings.c.id.desc())
    .limit(bindparam("limit", type_=Integer)),
    lambda values: values,
)
BY_ID = HotRead(select(readings.c.owner).where(readings.c.id == bindparam("id")), lambda values: values[0])

NOON = datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
async def db(database: Database) -> AsyncIterator[Database]:
    async with database.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    async with database.unit_of_work() as session:
        await session.execute(
            insert(readings),
            [
                {
                    "id": f"r{index}",
                    "owner": "ada" if index % 2 == 0 else "bob",
                    "seen_at": NOON - timedelta(minutes=index),
                    "gone_at": None if index % 3 else NOON + timedelta(days=index),
                    "tags": ["t", index] if index % 2 == 0 else {"n": index},
                    "rank": index,
                }
                for index in range(10)
            ],
        )
    yield database


async def test_rows_come_back_as_the_unit_of_work_returns_them(db: Database) -> None:
    found = await db.hot_reads.all(BY_OWNER, owner="ada", before=NOON + timedelta(hours=1), limit=3)
    async with db.unit_of_work(read_only=True) as session:
        expected = (
            await session.execute(
                BY_OWNER.statement, {"owner": "ada", "before": NOON + timedelta(hours=1), "limit": 3}
            )
        ).all()
    assert found == [tuple(row) for row in expected]
    assert [row[0] for row in found] == ["r0", "r2", "r4"]
    first: tuple[Any, ...] = found[0]
    assert first[1] == NOON and first[1].tzinfo == UTC, "datetimes come back timezone-aware, in UTC"
    assert first[2] == NOON, "an optional time is decoded too"
    assert found[1][2] is None
    assert first[3] == ["t", 0], "JSON is decoded"
    assert first[4] == 0


async def test_bound_times_are_compared_in_utc_whatever_their_zone(db: Database) -> None:
    in_paris = (NOON - timedelta(minutes=3)).astimezone(timezone(timedelta(hours=1)))
    found = await db.hot_reads.all(BY_OWNER, owner="bob", before=in_paris, limit=10)
    assert [row[0] for row in found] == ["r5", "r7", "r9"]


async def test_first_and_no_rows(db: Database) -> None:
    assert await db.hot_reads.first(BY_ID, id="r3") == "bob"
    assert await db.hot_reads.first(BY_ID, id="nobody") is None
    assert await db.hot_reads.all(BY_OWNER, owner="carol", before=NOON, limit=5) == []


async def test_committed_writes_are_seen_at_once(db: Database) -> None:
    async with db.unit_of_work() as session:
        await session.execute(
            insert(readings).values(id="new", owner="dan", seen_at=NOON, gone_at=None, tags=[], rank=1)
        )
    assert await db.hot_reads.first(BY_ID, id="new") == "dan"


async def test_a_naive_time_is_refused_before_any_query(db: Database) -> None:
    with pytest.raises(ValueError, match="naive"):
        await db.hot_reads.all(BY_OWNER, owner="ada", before=datetime(2026, 1, 1), limit=1)


@pytest.mark.postgres
async def test_postgres_outage_is_unavailable_and_reads_recover(postgres_url: str) -> None:
    direct = Database(postgres_url)
    async with direct.engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    await direct.dispose()
    url = direct.url
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied_url = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxied = Database(proxied_url, connect_timeout_s=1.0)
    try:
        assert await proxied.hot_reads.first(BY_ID, id="absent") is None
        await proxy.cut()
        with pytest.raises(Unavailable) as refused:
            await proxied.hot_reads.first(BY_ID, id="absent")
        assert refused.value.metadata == {"dependency": "database"}
        await proxy.restore()
        assert await proxied.hot_reads.first(BY_ID, id="absent") is None
    finally:
        await proxied.dispose()
        await proxy.close()
