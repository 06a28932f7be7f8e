"""The outbox relay publishing to real Redis Streams, on SQLite and PostgreSQL: order, counts, outages."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
from redis.asyncio import Redis
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.common.db import Database
from services.common.outbox import OutboxEvent, OutboxRelay, PartialDispatch, add_event
from services.common.streams import (
    STREAM_ROOM_SHARE,
    RedisStreamPublisher,
    StreamFullError,
    decode_entry,
    stream_key,
)
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis

# Short backoff so a test sees the relay retry within its time budget.
RETRY_BASE_S, RETRY_MAX_S = 0.01, 0.05
RELAY_DEADLINE_S = 20.0


@pytest.fixture
async def sources(redis: Redis) -> AsyncIterator[list[str]]:
    """Event sources unique to the test (the Redis database is shared), their streams deleted after."""
    names = [f"test-{uuid4().hex[:12]}-{index}" for index in range(2)]
    try:
        yield names
    finally:
        await redis.delete(*(stream_key(name) for name in names))


class ReplyCuttingProxy:
    """A TCP path to Redis that, once, lets through only the first `replies` replies to a pipeline of
    XADDs and then drops the connection (or, with `stall`, keeps it open and passes nothing more):
    Redis ran every command, the client heard of some.

    The pipeline is the first write containing XADD; the connection handshake (SELECT, CLIENT
    SETINFO) is answered before it, so every byte after it is an XADD reply: `$<n>\\r\\n<id>\\r\\n`.
    """

    def __init__(self, target_host: str, target_port: int, *, replies: int, stall: bool = False) -> None:
        self._target = (target_host, target_port)
        self._replies_before_cut: int | None = replies
        self._stall = stall
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        # Reply lines still to pass on before the cut; None until this connection sends the XADDs.
        lines_left: int | None = None

        async def upstream() -> None:
            nonlocal lines_left
            while chunk := await client_reader.read(65536):
                if b"XADD" in chunk and self._replies_before_cut is not None and lines_left is None:
                    lines_left = 2 * self._replies_before_cut
                    self._replies_before_cut = None  # once: the retry goes through
                server_writer.write(chunk)
                await server_writer.drain()

        async def downstream() -> None:
            nonlocal lines_left
            while chunk := await server_reader.read(65536):
                end = len(chunk)
                if lines_left is not None:
                    end = 0
                    while lines_left and (newline := chunk.find(b"\n", end)) != -1:
                        end, lines_left = newline + 1, lines_left - 1
                    if lines_left:
                        end = len(chunk)
                client_writer.write(chunk[:end])
                await client_writer.drain()
                if lines_left == 0:
                    if self._stall:
                        while await server_reader.read(65536):
                            pass  # swallowed until the client gives up and hangs up
                    return

        async def forward(pipe: Coroutine[None, None, None]) -> None:
            try:
                await pipe
            except (ConnectionError, OSError):
                pass
            finally:  # either direction ending (or being cancelled) ends the connection
                client_writer.transport.abort()
                server_writer.transport.abort()

        for pipe in (upstream(), downstream()):
            task = asyncio.create_task(forward(pipe))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


def registered(user: str) -> events_pb2.UserRegistered:
    return events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com", display_name=user.title())


async def commit(database: Database, produced: Sequence[tuple[str, str]]) -> list[events_pb2.Event]:
    """One unit of work adding one event per (source, subject); returns the envelopes in order."""
    async with database.unit_of_work() as session:
        return [
            add_event(session, source=source, subject=subject, payload=registered(subject))
            for source, subject in produced
        ]


async def stream_events(redis: Redis, source: str) -> list[events_pb2.Event]:
    entries = await redis.xrange(stream_key(source))
    assert entries is not None
    events = []
    for _entry_id, fields in entries:
        assert fields is not None
        events.append(decode_entry(fields))
    return events


async def stream_ids(redis: Redis, source: str) -> list[str]:
    return [event.id for event in await stream_events(redis, source)]


async def unrelayed_rows(database: Database) -> list[OutboxEvent]:
    async with database.unit_of_work(read_only=True) as session:
        return list(
            await session.scalars(
                select(OutboxEvent).where(OutboxEvent.relayed_at.is_(None)).order_by(OutboxEvent.sequence)
            )
        )


async def relay_until_everything_is_relayed(database: Database, relay: OutboxRelay) -> None:
    """Drive the relay (waiting out its backoff) until no row is left unrelayed; bounded in time."""

    async def everything_relayed() -> bool:
        await relay.relay_once()
        return not await unrelayed_rows(database)

    await eventually(
        everything_relayed, what="every outbox row relayed", timeout_s=RELAY_DEADLINE_S, interval_s=0.01
    )


def ids_of(events: Sequence[events_pb2.Event], source: str) -> list[str]:
    return [event.id for event in events if event.source == source]


async def test_committed_events_reach_their_source_streams_in_order_exactly_once(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    auth, billing = sources
    produced: list[events_pb2.Event] = []
    produced += await commit(database, [(auth, "u1"), (billing, "u1"), (auth, "u2")])
    produced += await commit(database, [(billing, "u2"), (billing, "u3")])
    produced += await commit(database, [(auth, "u3"), (auth, "u4"), (billing, "u4"), (auth, "u5")])
    publisher = RedisStreamPublisher.from_url(redis_url)
    try:
        relay = OutboxRelay(database, publisher, batch_size=4)
        relayed = 0
        async with asyncio.timeout(RELAY_DEADLINE_S):
            while batch := await relay.relay_once():
                relayed += batch
    finally:
        await publisher.aclose()

    assert relayed == len(produced) == 9
    assert await unrelayed_rows(database) == []
    assert await stream_events(redis, auth) == [event for event in produced if event.source == auth]
    assert await stream_events(redis, billing) == [event for event in produced if event.source == billing]


async def test_with_redis_cut_nothing_is_marked_and_after_restore_all_arrive_once(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    auth, billing = sources
    target = urlsplit(redis_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    publisher = RedisStreamPublisher.from_url(
        f"redis://127.0.0.1:{proxy.port}{target.path}", socket_timeout_s=1.0
    )
    try:
        relay = OutboxRelay(
            database, publisher, batch_size=3, retry_base_s=RETRY_BASE_S, retry_max_s=RETRY_MAX_S
        )
        produced = await commit(database, [(auth, "u1"), (billing, "u1")])
        assert await relay.relay_once() == 2

        await proxy.cut()
        produced += await commit(database, [(auth, "u2"), (billing, "u2"), (auth, "u3")])
        produced += await commit(database, [(auth, "u4"), (billing, "u3")])
        assert await relay.relay_once() == 0
        waiting = await unrelayed_rows(database)
        assert [row.event_id for row in waiting] == [event.id for event in produced[2:]]
        assert waiting[0].attempts == 1
        assert waiting[0].last_error
        assert await stream_ids(redis, auth) == ids_of(produced[:2], auth)

        await proxy.restore()
        await relay_until_everything_is_relayed(database, relay)
    finally:
        await publisher.aclose()
        await proxy.close()

    # Nothing half-failed (Redis was unreachable, then whole batches went through): no duplicates.
    assert await stream_ids(redis, auth) == ids_of(produced, auth)
    assert await stream_ids(redis, billing) == ids_of(produced, billing)


async def test_a_half_failed_batch_marks_the_confirmed_prefix_and_only_it_can_duplicate(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    auth, billing = sources
    # The billing stream's key holds a string, so XADD to it fails (WRONGTYPE) while auth's succeed.
    await redis.set(stream_key(billing), "not a stream")
    produced = await commit(database, [(auth, "u1"), (auth, "u2"), (billing, "u1"), (auth, "u3")])
    publisher = RedisStreamPublisher.from_url(redis_url)
    try:
        relay = OutboxRelay(database, publisher, retry_base_s=RETRY_BASE_S, retry_max_s=RETRY_MAX_S)
        assert await relay.relay_once() == 2
        waiting = await unrelayed_rows(database)
        assert [row.event_id for row in waiting] == [produced[2].id, produced[3].id]
        assert waiting[0].attempts == 1
        assert "WRONGTYPE" in (waiting[0].last_error or "")
        # Redis ran the XADD behind the failed one too: it is in the stream but not marked relayed.
        assert await stream_ids(redis, auth) == ids_of(produced, auth)

        await redis.delete(stream_key(billing))
        await relay_until_everything_is_relayed(database, relay)
    finally:
        await publisher.aclose()

    auth_ids = await stream_ids(redis, auth)
    billing_ids = await stream_ids(redis, billing)
    assert set(auth_ids) | set(billing_ids) == {event.id for event in produced}  # nothing lost
    assert billing_ids == [produced[2].id]
    duplicated = {event_id for event_id, count in Counter(auth_ids).items() if count > 1}
    # Only the event behind the failure point of the half-failed batch was published twice.
    assert duplicated == {produced[3].id}
    assert auth_ids == [produced[0].id, produced[1].id, produced[3].id, produced[3].id]


async def test_maxlen_keeps_a_stream_without_groups_bounded(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    source = sources[0]
    cap, produced_count = 50, 600
    produced: list[events_pb2.Event] = []
    for first in range(0, produced_count, 200):
        produced += await commit(database, [(source, f"u{index}") for index in range(first, first + 200)])
    publisher = RedisStreamPublisher.from_url(redis_url, max_len=cap)
    try:
        relay = OutboxRelay(database, publisher, batch_size=100)
        await relay_until_everything_is_relayed(database, relay)
    finally:
        await publisher.aclose()

    node_entries = int((await redis.config_get("stream-node-max-entries"))["stream-node-max-entries"] or 0)
    assert node_entries > 0
    length = await redis.xlen(stream_key(source))
    assert cap <= length <= cap + node_entries
    assert length < produced_count
    kept = await stream_ids(redis, source)
    assert kept == [event.id for event in produced[-length:]]  # the newest are kept, in order


async def test_a_group_that_falls_behind_holds_the_relay_back_instead_of_losing_entries(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    """Trimming would drop entries the group has not read; the publisher stops short of that, the
    rest wait in the outbox, and once the group has caught up every event reaches it, in order."""
    source, group = sources[0], "slow-consumer"
    cap, produced_count = 50, 300
    room = int(cap * STREAM_ROOM_SHARE)
    await redis.xgroup_create(stream_key(source), group, id="0", mkstream=True)
    produced = await commit(database, [(source, f"u{index}") for index in range(produced_count)])
    publisher = RedisStreamPublisher.from_url(redis_url, max_len=cap)
    received: list[str] = []
    try:
        relay = OutboxRelay(
            database, publisher, batch_size=100, retry_base_s=RETRY_BASE_S, retry_max_s=RETRY_MAX_S
        )
        assert await relay.relay_once() == room  # the prefix that fits
        assert await relay.relay_once() == 0  # full: nothing more until the group moves
        with pytest.raises(StreamFullError):
            await publisher.dispatch(produced[room:])
        assert len(await unrelayed_rows(database)) == produced_count - room

        async def everything_received() -> bool:
            """Read and acknowledge what is there, making room for the relay, which then adds more."""
            reply: Any = await redis.xreadgroup(group, "reader", {stream_key(source): ">"}, count=20)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    received.append(decode_entry(fields).id)
                    await redis.xack(stream_key(source), group, entry_id)
            await relay.relay_once()
            return len(received) >= produced_count

        await eventually(
            everything_received,
            what=f"{produced_count} events received",
            timeout_s=RELAY_DEADLINE_S,
            interval_s=0.005,  # the relay may be backing off for a few ms
        )
    finally:
        await publisher.aclose()

    assert received == [event.id for event in produced]  # all of them, once, in order
    assert not await unrelayed_rows(database)


async def test_a_connection_lost_mid_batch_marks_exactly_what_redis_confirmed(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    source = sources[0]
    target = urlsplit(redis_url)
    proxy = ReplyCuttingProxy(target.hostname or "127.0.0.1", target.port or 6379, replies=2)
    await proxy.start()
    publisher = RedisStreamPublisher.from_url(f"redis://127.0.0.1:{proxy.port}{target.path}")
    produced = await commit(database, [(source, f"u{index}") for index in range(5)])
    try:
        relay = OutboxRelay(database, publisher, retry_base_s=RETRY_BASE_S, retry_max_s=RETRY_MAX_S)
        assert await relay.relay_once() == 2
        waiting = await unrelayed_rows(database)
        assert [row.event_id for row in waiting] == [event.id for event in produced[2:]]
        assert "ConnectionError" in (waiting[0].last_error or "")
        assert await stream_ids(redis, source) == [event.id for event in produced]  # Redis ran them all

        await relay_until_everything_is_relayed(database, relay)
    finally:
        await publisher.aclose()
        await proxy.close()

    # The unconfirmed tail of the half-failed batch, and only it, is in the stream twice.
    assert await stream_ids(redis, source) == [event.id for event in produced + produced[2:]]


async def test_the_publisher_reports_how_many_events_redis_confirmed(
    redis_url: str, sources: list[str]
) -> None:
    events = []
    for index in range(4):
        event = events_pb2.Event(
            id=str(uuid4()), type="user.registered", source=sources[0], subject=f"u{index}"
        )
        event.user_registered.user_id = f"u{index}"
        events.append(event)
    target = urlsplit(redis_url)
    proxy = ReplyCuttingProxy(target.hostname or "127.0.0.1", target.port or 6379, replies=3)
    await proxy.start()
    publisher = RedisStreamPublisher.from_url(f"redis://127.0.0.1:{proxy.port}{target.path}")
    try:
        with pytest.raises(PartialDispatch) as caught:
            await publisher.dispatch(events)
        assert caught.value.delivered == 3
        assert events[3].id in str(caught.value)
        await publisher.dispatch(events[3:])  # the client reconnects for the retry
    finally:
        await publisher.aclose()
        await proxy.close()


async def test_a_redis_that_stops_answering_mid_batch_fails_it_within_the_socket_timeout(
    database: Database, redis: Redis, redis_url: str, sources: list[str]
) -> None:
    source = sources[0]
    target = urlsplit(redis_url)
    proxy = ReplyCuttingProxy(target.hostname or "127.0.0.1", target.port or 6379, replies=2, stall=True)
    await proxy.start()
    socket_timeout_s = 0.5
    publisher = RedisStreamPublisher.from_url(
        f"redis://127.0.0.1:{proxy.port}{target.path}", socket_timeout_s=socket_timeout_s
    )
    produced = await commit(database, [(source, f"u{index}") for index in range(5)])
    try:
        relay = OutboxRelay(database, publisher, retry_base_s=RETRY_BASE_S, retry_max_s=RETRY_MAX_S)
        began = time.monotonic()
        assert await relay.relay_once() == 2
        # The relay hears of it within the socket timeout instead of waiting for replies forever.
        assert time.monotonic() - began < 5 * socket_timeout_s
        waiting = await unrelayed_rows(database)
        assert [row.event_id for row in waiting] == [event.id for event in produced[2:]]
        assert "TimeoutError" in (waiting[0].last_error or "")

        await relay_until_everything_is_relayed(database, relay)
    finally:
        await publisher.aclose()
        await proxy.close()

    assert await stream_ids(redis, source) == [event.id for event in produced + produced[2:]]
