"""Contract of `services.common.db` and the shared column types, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import pytest
from sqlalchemy import Column, MetaData, String, Table, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.db import Database, DatabaseUnavailable
from services.common.models import Timestamps, UTCDateTime, UuidPrimaryKey
from tests.support.tcp_proxy import TcpProxy

# Test-only tables live on their own metadata, never on `Base`, so the schema under test stays exact.
test_metadata = MetaData()
notes = Table(
    "test_notes",
    test_metadata,
    Column("id", String(36), primary_key=True),
    Column("body", String(200), nullable=False),
    Column("noted_at", UTCDateTime(), nullable=True),
)


class _TestBase(DeclarativeBase):
    metadata = test_metadata


class Gadget(UuidPrimaryKey, Timestamps, _TestBase):
    __tablename__ = "test_gadgets"

    name: Mapped[str] = mapped_column(String(50))


@pytest.fixture
async def db(database: Database) -> Database:
    async with database.engine.begin() as connection:
        await connection.run_sync(test_metadata.create_all)
    return database


async def _count_notes(db: Database) -> int:
    async with db.unit_of_work(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(notes)) or 0)


async def test_unit_of_work_commits_on_success(db: Database) -> None:
    async with db.unit_of_work() as session:
        await session.execute(insert(notes).values(id="a", body="kept"))
    async with db.unit_of_work() as session:
        assert await session.scalar(select(notes.c.body).where(notes.c.id == "a")) == "kept"


async def test_unit_of_work_rolls_back_and_reraises_on_error(db: Database) -> None:
    class BoomError(Exception):
        pass

    with pytest.raises(BoomError):
        async with db.unit_of_work() as session:
            await session.execute(insert(notes).values(id="b", body="discarded"))
            await session.flush()
            raise BoomError
    assert await _count_notes(db) == 0


async def test_unit_of_work_rolls_back_when_cancelled(db: Database) -> None:
    inserted = asyncio.Event()

    async def slow_rpc() -> None:
        async with db.unit_of_work() as session:
            await session.execute(insert(notes).values(id="c", body="cancelled"))
            inserted.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(slow_rpc())
    await inserted.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _count_notes(db) == 0


async def test_read_only_unit_of_work_refuses_writes(db: Database) -> None:
    with pytest.raises(DBAPIError):
        async with db.unit_of_work(read_only=True) as session:
            await session.execute(insert(notes).values(id="d", body="refused"))
    # The pooled connection is fit for writing again afterwards.
    async with db.unit_of_work() as session:
        await session.execute(insert(notes).values(id="e", body="fine"))
    assert await _count_notes(db) == 1


async def test_utc_datetime_round_trips_as_aware_utc(db: Database) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    written = datetime(2026, 3, 1, 8, 15, 30, 123456, tzinfo=india)
    async with db.unit_of_work() as session:
        await session.execute(insert(notes).values(id="t", body="time", noted_at=written))
    async with db.unit_of_work() as session:
        read = await session.scalar(select(notes.c.noted_at).where(notes.c.id == "t"))
        # Comparisons in SQL see the same instant, whatever zone the bound value is in.
        later = await session.scalar(
            select(func.count())
            .select_from(notes)
            .where(notes.c.noted_at > written - timedelta(microseconds=1))
        )
    assert read == written
    assert read is not None
    assert read.tzinfo is UTC
    assert read.hour == 2
    assert read.minute == 45
    assert later == 1


async def test_utc_datetime_refuses_naive_values(db: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with db.unit_of_work() as session:
            await session.execute(insert(notes).values(id="n", body="naive", noted_at=datetime(2026, 1, 1)))


async def test_mixins_give_time_ordered_ids_and_aware_timestamps(db: Database) -> None:
    before = datetime.now(UTC)
    async with db.unit_of_work() as session:
        gadgets = [Gadget(name=f"g{index}") for index in range(3)]
        session.add_all(gadgets)
    # Readable after commit without a refresh (expire_on_commit=False, values set in Python).
    for gadget in gadgets:
        assert UUID(gadget.id).version == 7
        assert gadget.created_at.tzinfo is UTC
        assert before <= gadget.created_at <= datetime.now(UTC)
    first_id = gadgets[0].id
    async with db.unit_of_work() as session:
        stored = await session.get(Gadget, first_id)
        assert stored is not None
        created_at = stored.created_at
        stored.name = "renamed"
    assert stored.updated_at > created_at
    assert stored.created_at == created_at
    async with db.unit_of_work() as session:
        # A row written by plain SQL gets its timestamps from the database's server defaults.
        await session.execute(text("INSERT INTO test_gadgets (id, name) VALUES ('raw', 'raw')"))
        raw = await session.get(Gadget, "raw")
        assert raw is not None
        assert raw.created_at.tzinfo is UTC
        assert abs(raw.created_at - datetime.now(UTC)) < timedelta(minutes=1)


async def test_concurrent_writers_do_not_fail(db: Database) -> None:
    # Read-then-write transactions are the pattern that makes SQLite fail with "database is locked"
    # when transactions begin deferred; here they must all queue and succeed.
    async def writer(index: int) -> None:
        async with db.unit_of_work() as session:
            seen = await session.scalar(select(func.count()).select_from(notes))
            await asyncio.sleep(0)
            await session.execute(insert(notes).values(id=f"w{index}", body=f"saw {seen}"))

    await asyncio.gather(*(writer(index) for index in range(60)))
    assert await _count_notes(db) == 60


async def test_readers_and_ping_do_not_wait_for_a_writer(db: Database) -> None:
    async with db.unit_of_work() as writer:
        await writer.execute(insert(notes).values(id="w", body="uncommitted"))
        await writer.flush()
        async with asyncio.timeout(2):
            await db.ping()
            assert await _count_notes(db) == 0
    assert await _count_notes(db) == 1


async def test_ping_answers(database: Database) -> None:
    await database.ping()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_ping_raises_unavailable_for_a_closed_port() -> None:
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/test", connect_timeout_s=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable):
            await db.ping()
    finally:
        await db.dispose()
    assert time.monotonic() - started < 2.0


async def test_ping_raises_unavailable_in_time_when_the_server_never_answers() -> None:
    # Accepts TCP connections and then says nothing: the case that hangs clients without timeouts.
    silent_peers: list[asyncio.StreamWriter] = []

    async def stay_silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_peers.append(writer)

    server = await asyncio.start_server(stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test", connect_timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable):
            await db.ping()
    finally:
        await db.dispose()
        for peer in silent_peers:
            peer.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 1.5


@pytest.mark.postgres
async def test_ping_follows_the_server_going_away_and_coming_back(postgres_url: str) -> None:
    target = make_url(postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    db = Database(target.set(port=proxy.port).render_as_string(hide_password=False), connect_timeout_s=1.0)
    try:
        await db.ping()
        await proxy.cut()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await db.ping()
        assert time.monotonic() - started < 2.0
        await proxy.restore()
        await db.ping()
    finally:
        await db.dispose()
        await proxy.close()


def test_rejects_an_in_memory_sqlite_database() -> None:
    with pytest.raises(ValueError, match="file-backed"):
        Database("sqlite+aiosqlite:///:memory:")


async def test_sqlite_gets_its_directory_wal_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "parley.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        async with db.engine.connect() as connection:
            journal = await connection.exec_driver_sql("PRAGMA journal_mode")
            assert journal.scalar() == "wal"
            foreign_keys = await connection.exec_driver_sql("PRAGMA foreign_keys")
            assert foreign_keys.scalar() == 1
        assert db.dialect_name == "sqlite"
        assert path.parent.is_dir()
    finally:
        await db.dispose()
