"""Redis Streams as the event bus: the relay's publisher, and the entry format consumers read.

One stream per event source, `parley:events:<source>`; each entry has the fields `event_id`
(`Event.id`), `type` (`Event.type`) and `event` (the serialized `parley.events.v1.Event`, envelope
and trace context included). An entry that replays a dead letter also has `for_group`: the one
consumer group it is meant for (every other group acknowledges it without handling it, since they
handled the event the first time). `encode_entry`, `decode_entry` and `entry_for_group` are the
only code that writes or reads that format.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Final

from google.protobuf.message import DecodeError
from redis import RedisError, ResponseError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from parley.events.v1 import events_pb2
from services.common.outbox import PartialDispatch
from services.common.redis_multiplex import reply_text

STREAM_KEY_PREFIX: Final = "parley:events:"

FIELD_EVENT_ID: Final = "event_id"
FIELD_TYPE: Final = "type"
FIELD_EVENT: Final = "event"
FIELD_FOR_GROUP: Final = "for_group"

STREAM_MAX_LEN: Final = 1_000_000
"""Approximate cap on the entries kept in each source's stream (`XADD ... MAXLEN ~ <cap>`).

Redis trims by length alone: it does not look at consumer groups, so an entry a group has not read
yet (or has read but not acknowledged) would be dropped all the same once it is `STREAM_MAX_LEN`
entries behind the newest. The publisher therefore never lets that happen: before each batch it
reads every group's backlog on the stream (`XINFO GROUPS`: entries not yet delivered, `lag`, plus
delivered and unacknowledged, `pending`) and publishes only while the backlog stays under
`STREAM_ROOM_SHARE` of the cap. A group that falls that far behind holds the relay back: newer events
wait in the outbox (durable, and counted by the outbox lag gauge) until the group catches up, rather
than being trimmed unread. Size the cap for the backlog a slow consumer may build before it holds up
every other consumer of the database's events: peak events per second of the source x the longest
consumer outage to ride out without holding the relay back. One million entries per source is:

    at   100 events/s  →  10,000 s ≈ 2 h 45 min of backlog
    at 1,000 events/s  →   1,000 s ≈ 16 min of backlog

An entry takes roughly 0.3-1 KB of Redis memory (the serialized event plus field names and stream
bookkeeping), so a full stream is about 0.3-1 GB; size Redis for every source's stream at its cap.
Alert on consumer-group lag well before it nears the cap.

`~` lets Redis trim whole macro nodes only (`stream-node-max-entries`, 100 by default), so a stream
holds at least the cap and at most about one node more; it never holds fewer than the cap.
"""

# The share of the cap a group's backlog may fill before the publisher holds back. Below 1 because
# `lag + pending` counts entries, while trimming goes by position: acknowledged entries between a
# group's oldest pending one and the newest still take room.
STREAM_ROOM_SHARE: Final = 0.9

# A pipeline of one relay batch (500 events by default) answers in milliseconds; a reply this late
# means Redis or the path to it is in trouble, and the relay retries with backoff.
DEFAULT_SOCKET_TIMEOUT_S: Final = 5.0

# The constant parts of `XADD <key> MAXLEN ~ <cap> * <field> <value> ...` in the Redis protocol.
_RESP_XADD: Final = b"$4\r\nXADD\r\n"
_RESP_MAXLEN_APPROXIMATE: Final = b"$6\r\nMAXLEN\r\n$1\r\n~\r\n"
_RESP_AUTO_ID: Final = b"$1\r\n*\r\n"


class StreamFullError(RedisError):
    """A consumer group is so far behind that publishing more would trim entries it has not handled."""

    def __init__(self, stream: str, group: str, backlog: int, room: int) -> None:
        super().__init__(
            f"consumer group {group!r} on {stream} has {backlog} unhandled entries, the stream's room "
            f"is {room}: events wait in the outbox until it catches up"
        )
        self.stream = stream
        self.group = group


class MalformedStreamEntry(ValueError):  # noqa: N818 - named for the condition, like KeyError.
    """A stream entry does not hold a well-formed event in the agreed fields."""


def stream_key(source: str) -> str:
    """The key of the stream carrying the events of `source` (`Event.source`, e.g. "auth")."""
    if not source:
        raise ValueError("an event source must not be empty")
    return STREAM_KEY_PREFIX + source


def encode_entry(event: events_pb2.Event, *, for_group: str | None = None) -> dict[str, bytes]:
    """The fields of the stream entry that carries `event`; with `for_group`, an entry only that
    consumer group handles (a replayed dead letter)."""
    fields = {
        FIELD_EVENT_ID: event.id.encode(),
        FIELD_TYPE: event.type.encode(),
        FIELD_EVENT: event.SerializeToString(),
    }
    if for_group is not None:
        if not for_group:
            raise ValueError("for_group must name a consumer group")
        fields[FIELD_FOR_GROUP] = for_group.encode()
    return fields


def entry_for_group(fields: Mapping[str, bytes]) -> str | None:
    """The consumer group an entry is meant for, or None when it is for every group.

    Takes the fields with text names, as the consumer framework holds them.
    """
    target = fields.get(FIELD_FOR_GROUP)
    return None if target is None else target.decode(errors="replace")


def decode_entry(
    fields: Mapping[bytes, bytes | str] | Mapping[str, bytes | str] | Mapping[bytes | str, bytes | str],
) -> events_pb2.Event:
    """The event in a stream entry's fields, as returned by XRANGE/XREADGROUP.

    Raises `MalformedStreamEntry` when a field is missing, the event does not parse, or the
    `event_id`/`type` fields disagree with the envelope. Read with a client that does not decode
    responses: the `event` field is binary.
    """
    by_name: dict[str, bytes | str] = {reply_text(name): value for name, value in fields.items()}
    missing = [name for name in (FIELD_EVENT_ID, FIELD_TYPE, FIELD_EVENT) if name not in by_name]
    if missing:
        raise MalformedStreamEntry(f"stream entry lacks the field(s) {', '.join(missing)}")
    payload = by_name[FIELD_EVENT]
    if not isinstance(payload, bytes):
        raise MalformedStreamEntry(
            "the event field was decoded as text; read streams with decode_responses=False"
        )
    try:
        event = events_pb2.Event.FromString(payload)
    except DecodeError as error:
        raise MalformedStreamEntry(f"the event field is not a parley.events.v1.Event: {error}") from error
    event_id, event_type = reply_text(by_name[FIELD_EVENT_ID]), reply_text(by_name[FIELD_TYPE])
    if (event.id, event.type) != (event_id, event_type):
        raise MalformedStreamEntry(
            f"entry fields ({event_id!r}, {event_type!r}) disagree with the event "
            f"({event.id!r}, {event.type!r})"
        )
    return event


def _resp_bulk(value: bytes) -> bytes:
    """A bulk string of the Redis protocol."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class RedisStreamPublisher:
    """The outbox relay's dispatcher in microservices mode: XADDs each event to its source's stream.

    A batch is one pipeline (one round trip), in the batch's order, each XADD trimming its stream to
    about `max_len` entries. Replies are read one by one, so when Redis fails part-way the relay
    learns exactly how many events Redis confirmed (`PartialDispatch`) and marks only those.

    Duplicates: an event whose XADD reached Redis but whose reply was lost, or an event behind a
    failed XADD in the same pipeline (Redis runs every pipelined command), is published again when
    the relay retries. That only happens in a batch that half-failed; consumers deduplicate on
    `event_id`. A batch that fails before Redis confirmed anything raises the Redis error itself.
    """

    def __init__(self, client: Redis, *, max_len: int = STREAM_MAX_LEN) -> None:
        if max_len < 1:
            raise ValueError("max_len must be at least 1")
        self._client = client
        self._max_len = max_len
        self._room = max(1, int(max_len * STREAM_ROOM_SHARE))
        self._packed_max_len = _resp_bulk(str(max_len).encode())

    @classmethod
    def from_url(
        cls,
        redis_url: str,
        *,
        max_len: int = STREAM_MAX_LEN,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    ) -> RedisStreamPublisher:
        """A publisher with its own client; no client-side retries, the relay retries with backoff."""
        client = Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # A retried pipeline would publish the events Redis already took a second time.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, max_len=max_len)

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self._client.aclose()

    def packed_xadd(self, event: events_pb2.Event) -> bytes:
        """The XADD that publishes `event`, encoded in the Redis protocol (RESP).

        Written out here rather than by redis-py's `pack_commands`, which costs three times as much
        per event (about 6.6 us against 2 us, a sizeable share of the relay's CPU); a test checks
        that both encodings agree byte for byte.
        """
        fields = encode_entry(event)
        parts = [
            b"*%d\r\n" % (6 + 2 * len(fields)),
            _RESP_XADD,
            _resp_bulk(stream_key(event.source).encode()),
            _RESP_MAXLEN_APPROXIMATE,
            self._packed_max_len,
            _RESP_AUTO_ID,
        ]
        for name, value in fields.items():
            parts.append(_resp_bulk(name.encode()))
            parts.append(_resp_bulk(value))
        return b"".join(parts)

    async def _publishable(self, events: Sequence[events_pb2.Event]) -> int:
        """How many events, from the start of the batch, fit without trimming what a group has not
        handled; raises `StreamFullError` when not even the first one does."""
        streams = list(dict.fromkeys(stream_key(event.source) for event in events))
        async with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        room: dict[str, int] = {}
        holder: dict[str, tuple[str, int]] = {}
        for stream, groups in zip(streams, replies, strict=True):
            if isinstance(groups, ResponseError):
                room[stream] = len(events)  # no such stream yet: no group to protect
                continue
            if isinstance(groups, BaseException):
                raise groups
            room[stream] = len(events)
            for group in groups:
                # `lag` is nil when Redis cannot tell (entries deleted in the middle of the stream).
                backlog = int(group.get("pending") or 0) + int(group.get("lag") or 0)
                if self._room - backlog < room[stream]:
                    room[stream] = max(0, self._room - backlog)
                    holder[stream] = (reply_text(group.get("name", b"")), backlog)
        for fitting, event in enumerate(events):
            stream = stream_key(event.source)
            if room[stream] == 0:
                if fitting == 0:
                    group_name, backlog = holder[stream]
                    raise StreamFullError(stream, group_name, backlog, self._room)
                return fitting
            room[stream] -= 1
        return len(events)

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None:
        if not events:
            return
        fitting = await self._publishable(events)
        await self._publish(events[:fitting])
        if fitting < len(events):
            held = stream_key(events[fitting].source)
            raise PartialDispatch(
                fitting, f"{held} has no room for more events until its consumer groups catch up"
            )

    async def _publish(self, events: Sequence[events_pb2.Event]) -> None:
        """XADD every event in one pipeline; see the class docstring for what a failure raises."""
        packed = b"".join(self.packed_xadd(event) for event in events)
        pool = self._client.connection_pool
        # The client's own Pipeline discards every reply when the connection drops mid-way, so the
        # relay could not tell what Redis has; talking to the connection keeps the replies read.
        connection = await pool.get_connection()
        confirmed = 0
        failure: BaseException | None = None
        # One deadline for the batch's replies instead of one per reply (a timer each, per event).
        batch_timeout_s = connection.socket_timeout or DEFAULT_SOCKET_TIMEOUT_S
        try:
            async with asyncio.timeout(batch_timeout_s):
                await connection.send_packed_command(packed)
                for _ in events:
                    try:
                        await connection.read_response(timeout=math.inf)
                    except ResponseError as error:
                        # An error reply leaves the connection usable: keep reading so it stays in step.
                        failure = failure or error
                    else:
                        if failure is None:
                            confirmed += 1
        except (RedisError, OSError) as error:
            # The connection is now out of step with its replies (read_response already closed it
            # on I/O errors; a ResponseError cannot get here).
            await connection.disconnect()
            failure = failure or error
        finally:
            await pool.release(connection)
        if failure is None:
            return
        if confirmed == 0:
            raise failure
        failed = events[confirmed]
        raise PartialDispatch(
            confirmed,
            f"Redis confirmed {confirmed} of {len(events)} event(s); event {failed.id} ({failed.type}) "
            f"to {stream_key(failed.source)} failed: {type(failure).__name__}: {failure}",
        ) from failure
