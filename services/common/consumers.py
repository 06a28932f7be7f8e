"""The consumer framework every event consumer shares (email worker, analytics ingester, billing).

Delivery is at least once; effects happen once because every consumer keeps an idempotency record
per (consumer, event id). The moving parts:

- `EventSource` (port): one consumer group on one event stream. `RedisStreamSource` uses Redis
  Streams consumer groups (XREADGROUP, XACK, XCLAIM, XAUTOCLAIM, the pending entries list);
  `InProcessSource` keeps the same semantics in memory for embedded mode, fed by the outbox relay's
  `InProcessDispatcher` through `InProcessSource.deliver`.
- `ProcessedEvents` (port): the idempotency records. `RedisProcessedEvents` (`SET key 1 NX EX ttl`)
  and `InMemoryProcessedEvents`. An adapter that also implements `BatchProcessedEvents` (both of
  these do) is asked once per batch instead of once per event.
- `Consumer`: the runner. It reads a batch, looks up which of its events were already processed
  (one query), runs the handler for the others in stream order, records the handled events as
  processed (one write) and only then acknowledges the batch (one XACK). A handler error leaves the
  entry unacknowledged and schedules a retry with exponential backoff and full jitter (or later, when
  the error carries `retry_after_s`); the attempt number is the entry's delivery count, so it
  survives the consumer's death. After `max_attempts`, or at once for an error that is not retryable
  (`is_retryable`), the entry goes to the dead-letter stream `parley:dlq:<consumer>` with the error,
  and the original is acked. Entries a dead consumer left pending longer than the visibility timeout
  are reclaimed (XAUTOCLAIM, looked for at most once a second, more often for short timeouts).
- Replays: `EventSource.replay` puts a dead letter back on the shared stream marked `for_group` (see
  `services.common.streams`); every other group acknowledges that entry without handling it.

Recording happens once per batch, after every handler of the batch returned: a consumer killed
outright mid-batch (SIGKILL, power loss) leaves the events it had handled in that batch unrecorded,
and they are handled again on redelivery, like an effect whose record was never written. A consumer
that is cancelled or fails mid-batch records them before it stops. Handlers whose effects must not
repeat record in their own transaction (below).

A handler whose effect lives in a database should write the idempotency record in the same
transaction as the effect; otherwise a crash between the commit and the record applies the effect
twice on redelivery. For that, construct the `Consumer` with `handler_records_processing=True`: the
runner still skips events already recorded, but leaves the recording to the handler, which reads the
consumer name and event id from `current_delivery()` and writes them inside its unit of work (e.g. a
unique row in its own database; its `ProcessedEvents` adapter must read the same records).

Sizing the visibility timeout: longer than the slowest handler call plus the backoff cap, or a live
consumer's entries are reclaimed by another (still correct, since effects are idempotent, but wasted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol, runtime_checkable

from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis import ResponseError
from redis.asyncio import Redis

from parley.events.v1 import events_pb2
from services.common.metrics import RPC_LATENCY_BUCKETS
from services.common.outbox import trace_context_of
from services.common.redis_multiplex import reply_text
from services.common.streams import (
    FIELD_EVENT,
    FIELD_EVENT_ID,
    STREAM_MAX_LEN,
    MalformedStreamEntry,
    decode_entry,
    encode_entry,
    entry_for_group,
)

logger = logging.getLogger(__name__)

DLQ_KEY_PREFIX: Final = "parley:dlq:"
PROCESSED_KEY_PREFIX: Final = "parley:processed:"
# Long enough to outlast any redelivery (stream retention, a DLQ replay days later).
DEFAULT_PROCESSED_TTL_S: Final = 30 * 24 * 3600
_ERROR_MAX_CHARS: Final = 2000
# A retry is due at the latest this share of the visibility timeout after its delivery; the rest is
# room for the remainder of the batch and for the poll that claims it (see `Consumer._retry_due_at`).
_RETRY_WITHIN_VISIBILITY: Final = 0.9

EventHandler = Callable[[events_pb2.Event], Awaitable[None]]


def dlq_key(consumer: str) -> str:
    """The dead-letter stream of a consumer (its consumer group name)."""
    if not consumer:
        raise ValueError("a consumer name must not be empty")
    return DLQ_KEY_PREFIX + consumer


def backoff_ceiling_s(attempt: int, base_s: float, cap_s: float) -> float:
    """The upper bound of the delay before retry number `attempt` (1 = after the first failure)."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    return min(cap_s, base_s * 2.0 ** min(attempt - 1, 62))


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, ceiling], so consumers that failed together do not retry together."""
    return rng.uniform(0.0, backoff_ceiling_s(attempt, base_s, cap_s))


def is_retryable(error: BaseException) -> bool:
    """False for a handler error that says another attempt cannot help (`retryable = False` on it):
    the consumer dead-letters that event at once instead of retrying it."""
    return getattr(error, "retryable", True) is not False


def retry_after_of(error: BaseException) -> float | None:
    """The earliest sensible retry the error names (a positive `retry_after_s`, e.g. an SMTP
    server's or a rate limit's), or None."""
    value = getattr(error, "retry_after_s", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to one member of a consumer group."""

    entry_id: str
    stream: str
    fields: Mapping[str, bytes]
    # How many times the group has delivered this entry, this time included.
    deliveries: int

    def decode(self) -> events_pb2.Event:
        """The event; raises `MalformedStreamEntry` when the entry does not hold one."""
        return decode_entry(self.fields)

    @property
    def event_id(self) -> str:
        return self.fields.get(FIELD_EVENT_ID, b"").decode(errors="replace")


@dataclass(frozen=True)
class DeadLetter:
    """An entry that exhausted its attempts, as stored in `parley:dlq:<consumer>`."""

    dead_letter_id: str
    event_id: str
    stream: str
    error: str
    attempts: int
    failed_at: datetime
    event: bytes


class EventSource(Protocol):
    """One consumer group reading one event stream, and the group's dead letters."""

    @property
    def stream(self) -> str: ...

    @property
    def group(self) -> str: ...

    async def ensure_group(self) -> None:
        """Create the group (from the stream's start) if it does not exist yet; idempotent."""

    async def read_new(self, member: str, count: int, block_s: float) -> list[Delivery]:
        """Up to `count` entries never delivered to the group, waiting up to `block_s` for one."""

    async def claim(self, member: str, entry_ids: Sequence[str]) -> list[Delivery]:
        """Deliver these pending entries again to `member` (for its retries); entries no longer
        pending (acked, dead-lettered, trimmed) are left out."""

    async def reclaim_idle(self, member: str, min_idle_s: float, count: int) -> list[Delivery]:
        """Take over up to `count` entries pending longer than `min_idle_s` (a dead consumer's)."""

    async def ack(self, entry_ids: Sequence[str]) -> None:
        """Acknowledge entries: they leave the pending list and are never delivered again."""

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Write the entry to the group's dead-letter stream and acknowledge it, atomically."""

    async def pending_count(self) -> int:
        """Entries delivered to the group and not acknowledged yet."""

    async def dead_letters(self) -> list[DeadLetter]:
        """The group's dead letters, oldest first."""

    async def replay(self, dead_letter_id: str | None = None) -> int:
        """Put one dead letter (or all when None) back on its stream, for this group only, and
        delete it from the DLQ; returns how many were replayed."""


class DeadLetterStore(Protocol):
    """Durable dead letters per consumer (`services.common.dead_letters.SqlDeadLetters`), for the
    in-process source of embedded mode, whose dead letters must survive a restart."""

    async def add(self, consumer: str, dead_letter: DeadLetter) -> str:
        """Store a dead letter (its `dead_letter_id` is ignored) and return the id it got."""

    async def take(self, consumer: str, dead_letter_id: str | None = None) -> list[DeadLetter]:
        """Delete one dead letter (every one when None) and return what was deleted, oldest first."""

    async def list(self, consumer: str) -> list[DeadLetter]:
        """The consumer's dead letters, oldest first."""


class ProcessedEvents(Protocol):
    """Idempotency records: which events each consumer has already processed."""

    async def is_processed(self, consumer: str, event_id: str) -> bool: ...

    async def mark_processed(self, consumer: str, event_id: str) -> None: ...


@runtime_checkable
class BatchProcessedEvents(ProcessedEvents, Protocol):
    """Idempotency records that answer for a whole batch in one query (the consumer's fast path)."""

    async def processed_among(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        """The ids among `event_ids` that `consumer` has already processed."""

    async def mark_all_processed(self, consumer: str, event_ids: Sequence[str]) -> None:
        """Record every one of `event_ids` as processed by `consumer` (idempotent)."""


async def _processed_among(processed: ProcessedEvents, consumer: str, event_ids: Sequence[str]) -> set[str]:
    if isinstance(processed, BatchProcessedEvents):
        return await processed.processed_among(consumer, event_ids)
    return {event_id for event_id in event_ids if await processed.is_processed(consumer, event_id)}


async def _mark_all_processed(processed: ProcessedEvents, consumer: str, event_ids: Sequence[str]) -> None:
    if isinstance(processed, BatchProcessedEvents):
        await processed.mark_all_processed(consumer, event_ids)
        return
    for event_id in event_ids:
        await processed.mark_processed(consumer, event_id)


def _fields(raw: Mapping[Any, Any]) -> dict[str, bytes]:
    return {
        reply_text(name): value if isinstance(value, bytes) else str(value).encode()
        for name, value in raw.items()
    }


def _entries(reply: Any) -> list[tuple[str, dict[str, bytes]]]:
    """Stream entries as redis-py returns them (id, fields), typed; entries deleted since (their
    fields None) are left out."""
    return [(reply_text(entry_id), _fields(raw)) for entry_id, raw in reply or [] if raw is not None]


def _dead_letter_fields(delivery: Delivery, error: str, failed_at: datetime) -> dict[str, bytes]:
    return {
        FIELD_EVENT: delivery.fields.get(FIELD_EVENT, b""),
        FIELD_EVENT_ID: delivery.fields.get(FIELD_EVENT_ID, b""),
        "stream": delivery.stream.encode(),
        "error": error[:_ERROR_MAX_CHARS].encode(),
        "attempts": str(delivery.deliveries).encode(),
        "failed_at": failed_at.isoformat().encode(),
    }


def _dead_letter_from(dead_letter_id: str, fields: Mapping[str, bytes]) -> DeadLetter:
    return DeadLetter(
        dead_letter_id=dead_letter_id,
        event_id=fields.get(FIELD_EVENT_ID, b"").decode(errors="replace"),
        stream=fields.get("stream", b"").decode(),
        error=fields.get("error", b"").decode(errors="replace"),
        attempts=int(fields.get("attempts", b"0")),
        failed_at=datetime.fromisoformat(fields.get("failed_at", b"1970-01-01T00:00:00+00:00").decode()),
        event=fields.get(FIELD_EVENT, b""),
    )


def _replay_fields(dead: DeadLetter, group: str) -> dict[str, bytes]:
    """The stream entry that re-delivers a dead letter to `group` only (the agreed entry format)."""
    try:
        return encode_entry(events_pb2.Event.FromString(dead.event), for_group=group)
    except DecodeError as error:
        raise MalformedStreamEntry(
            f"dead letter {dead.dead_letter_id} holds no decodable event; it cannot be replayed"
        ) from error


# Dead-letters an entry only while it is still pending: another member that handled it meanwhile
# (after reclaiming it) already acked it, and it must not land in the DLQ as well.
_DEAD_LETTER_SCRIPT: Final = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
    return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class RedisStreamSource:
    """A consumer group on a Redis stream.

    Use a client with `decode_responses=False` (the event field is binary) and a socket timeout
    longer than the consumer's `block_s` (XREADGROUP BLOCK holds the connection that long).
    """

    def __init__(self, client: Redis, *, stream: str, group: str, max_len: int = STREAM_MAX_LEN) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._dlq = dlq_key(group)
        self._max_len = max_len
        # XAUTOCLAIM scans the pending list in pages; continuing from the last cursor reaches every
        # idle entry however long the list is.
        self._autoclaim_cursor = "0-0"

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def group(self) -> str:
        return self._group

    async def ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def read_new(self, member: str, count: int, block_s: float) -> list[Delivery]:
        block_ms = max(1, int(block_s * 1000)) if block_s > 0 else None
        reply: Any = await self._client.xreadgroup(
            self._group, member, {self._stream: ">"}, count=count, block=block_ms
        )
        deliveries: list[Delivery] = []
        for _stream, entries in reply or []:
            for entry_id, fields in _entries(entries):
                deliveries.append(Delivery(entry_id, self._stream, fields, 1))
        return deliveries

    async def _with_delivery_counts(self, reply: Any) -> list[Delivery]:
        """Claimed entries with the delivery count Redis keeps for each in the pending list."""
        entries = _entries(reply)
        if not entries:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id, _fields_of_entry in entries:
                pipe.xpending_range(self._stream, self._group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        deliveries = []
        for (entry_id, fields), pending in zip(entries, replies, strict=True):
            if not pending:
                continue  # acked in between
            count = int(pending[0]["times_delivered"])
            deliveries.append(Delivery(entry_id, self._stream, fields, count))
        return deliveries

    async def claim(self, member: str, entry_ids: Sequence[str]) -> list[Delivery]:
        if not entry_ids:
            return []
        entries = await self._client.xclaim(self._stream, self._group, member, 0, list(entry_ids))
        return await self._with_delivery_counts(entries)

    async def reclaim_idle(self, member: str, min_idle_s: float, count: int) -> list[Delivery]:
        reply = await self._client.xautoclaim(
            self._stream,
            self._group,
            member,
            int(min_idle_s * 1000),
            start_id=self._autoclaim_cursor,
            count=count,
        )
        self._autoclaim_cursor = reply_text(reply[0])
        return await self._with_delivery_counts(reply[1])

    async def ack(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self._client.xack(self._stream, self._group, *entry_ids)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        fields = _dead_letter_fields(delivery, error, datetime.now(UTC))
        arguments: list[bytes | str] = [self._group, delivery.entry_id]
        for name, value in fields.items():
            arguments += [name, value]
        await self._client.eval(_DEAD_LETTER_SCRIPT, 2, self._stream, self._dlq, *arguments)

    async def pending_count(self) -> int:
        summary = await self._client.xpending(self._stream, self._group)
        return int(summary["pending"])

    async def dead_letters(self) -> list[DeadLetter]:
        entries = await self._client.xrange(self._dlq)
        return [_dead_letter_from(entry_id, fields) for entry_id, fields in _entries(entries)]

    async def replay(self, dead_letter_id: str | None = None) -> int:
        if dead_letter_id is None:
            chosen = await self.dead_letters()
        else:
            entries = await self._client.xrange(self._dlq, min=dead_letter_id, max=dead_letter_id)
            chosen = [_dead_letter_from(entry_id, fields) for entry_id, fields in _entries(entries)]
        for dead in chosen:
            fields = _replay_fields(dead, self._group)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xadd(dead.stream, fields, maxlen=self._max_len, approximate=True)  # type: ignore[arg-type]
                pipe.xdel(self._dlq, dead.dead_letter_id)
                await pipe.execute()
        return len(chosen)


@dataclass
class _PendingEntry:
    member: str
    delivered_at: float
    deliveries: int


@dataclass
class _InProcessEntry:
    entry_id: str
    fields: dict[str, bytes]
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class InProcessSource:
    """One consumer group on an in-memory stream, with the Redis adapter's semantics (embedded mode).

    Feed it from the outbox relay with `dispatcher.subscribe(<consumer>, source.deliver)`: `deliver`
    returns only once the group has acknowledged or dead-lettered the event, so the relay marks the
    outbox row relayed only after the consumer is done with it, and the outbox stays the durable
    queue. Dead letters go to `dead_letters` (the `dead_letters` table) when given, written before
    the event counts as settled, so they survive a restart; without it they are kept in memory.
    `replay` puts them back on this in-memory stream; from another process, replay through the
    outbox instead (`SqlDeadLetters.requeue_in_outbox`, what `parley events dlq replay` does).
    """

    def __init__(
        self,
        *,
        stream: str,
        group: str,
        clock: Callable[[], float] = time.monotonic,
        settle_timeout_s: float = 300.0,
        dead_letters: DeadLetterStore | None = None,
    ) -> None:
        self._stream = stream
        self._group = group
        self._clock = clock
        self._settle_timeout_s = settle_timeout_s
        self._durable_dead = dead_letters
        self._entries: dict[str, _InProcessEntry] = {}
        self._sequence = 0
        # Entries up to this sequence were delivered to the group at least once.
        self._last_delivered = 0
        self._pending: dict[str, _PendingEntry] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._dead_sequence = 0
        self._appended = asyncio.Event()

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def group(self) -> str:
        return self._group

    def publish(self, event: events_pb2.Event, *, for_group: str | None = None) -> str:
        """Append an event to the stream (for `for_group` only, as a replay is); returns its entry id."""
        return self._append(encode_entry(event, for_group=for_group)).entry_id

    def _append(self, fields: dict[str, bytes]) -> _InProcessEntry:
        self._sequence += 1
        entry = _InProcessEntry(f"{self._sequence}-0", fields)
        self._entries[entry.entry_id] = entry
        self._appended.set()
        self._appended = asyncio.Event()
        return entry

    async def deliver(self, event: events_pb2.Event) -> None:
        """Append an event and wait until the group has acknowledged or dead-lettered it.

        A `TimeoutError` (no consumer running, or one still retrying) makes the relay retry; the copy
        published again is then skipped by the consumer's idempotency record.
        """
        entry = self._append(encode_entry(event))
        async with asyncio.timeout(self._settle_timeout_s):
            await entry.settled.wait()

    async def ensure_group(self) -> None:
        return None

    def _deliver_to(self, member: str, entry: _InProcessEntry) -> Delivery:
        pending = self._pending.get(entry.entry_id)
        deliveries = 1 if pending is None else pending.deliveries + 1
        self._pending[entry.entry_id] = _PendingEntry(member, self._clock(), deliveries)
        return Delivery(entry.entry_id, self._stream, dict(entry.fields), deliveries)

    async def read_new(self, member: str, count: int, block_s: float) -> list[Delivery]:
        if self._sequence <= self._last_delivered and block_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(block_s):
                    await self._appended.wait()
        deliveries: list[Delivery] = []
        for entry in list(self._entries.values()):
            if len(deliveries) >= count:
                break
            if int(entry.entry_id.split("-")[0]) > self._last_delivered:
                self._last_delivered = int(entry.entry_id.split("-")[0])
                deliveries.append(self._deliver_to(member, entry))
        return deliveries

    async def claim(self, member: str, entry_ids: Sequence[str]) -> list[Delivery]:
        return [
            self._deliver_to(member, self._entries[entry_id])
            for entry_id in entry_ids
            if entry_id in self._pending and entry_id in self._entries
        ]

    async def reclaim_idle(self, member: str, min_idle_s: float, count: int) -> list[Delivery]:
        now = self._clock()
        idle = [
            entry_id
            for entry_id, pending in self._pending.items()
            if now - pending.delivered_at >= min_idle_s
        ][:count]
        return await self.claim(member, idle)

    def _settle(self, entry_id: str) -> None:
        self._pending.pop(entry_id, None)
        entry = self._entries.pop(entry_id, None)
        if entry is not None:
            entry.settled.set()

    async def ack(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            if entry_id in self._pending:
                self._settle(entry_id)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        if delivery.entry_id not in self._pending:
            return  # already settled by another member
        fields = _dead_letter_fields(delivery, error, datetime.now(UTC))
        if self._durable_dead is not None:
            # Stored before settling: the relay marks the outbox row relayed once `deliver` returns.
            await self._durable_dead.add(self._group, _dead_letter_from("", fields))
        else:
            self._dead_sequence += 1
            dead_letter_id = f"{self._dead_sequence}-0"
            self._dead[dead_letter_id] = _dead_letter_from(dead_letter_id, fields)
        self._settle(delivery.entry_id)

    async def pending_count(self) -> int:
        return len(self._pending)

    async def dead_letters(self) -> list[DeadLetter]:
        if self._durable_dead is not None:
            return await self._durable_dead.list(self._group)
        return list(self._dead.values())

    async def replay(self, dead_letter_id: str | None = None) -> int:
        if self._durable_dead is not None:
            return await self._replay_durable(self._durable_dead, dead_letter_id)
        chosen = list(self._dead) if dead_letter_id is None else [dead_letter_id]
        replayed = 0
        for chosen_id in chosen:
            dead = self._dead.get(chosen_id)
            if dead is None:
                continue
            self._append(_replay_fields(dead, self._group))
            del self._dead[chosen_id]
            replayed += 1
        return replayed

    async def _replay_durable(self, store: DeadLetterStore, dead_letter_id: str | None) -> int:
        chosen = [
            dead
            for dead in await store.list(self._group)
            if dead_letter_id is None or dead.dead_letter_id == dead_letter_id
        ]
        replayed = 0
        for dead in chosen:
            # Encoded before it is taken, so a letter that cannot be replayed stays in the table.
            fields = _replay_fields(dead, self._group)
            if await store.take(self._group, dead.dead_letter_id):  # not taken by someone else meanwhile
                self._append(fields)
                replayed += 1
        return replayed


# SET NX EX for every key of a batch, in one round trip and one command.
_MARK_PROCESSED_SCRIPT: Final = """
for _, key in ipairs(KEYS) do
    redis.call('SET', key, '1', 'NX', 'EX', ARGV[1])
end
return #KEYS
"""


class RedisProcessedEvents:
    """Idempotency records in Redis: one key per (consumer, event id), expiring after `ttl_s`."""

    def __init__(self, client: Redis, *, ttl_s: int = DEFAULT_PROCESSED_TTL_S, key_prefix: str = "") -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._key_prefix = key_prefix + PROCESSED_KEY_PREFIX
        self._mark_script = client.register_script(_MARK_PROCESSED_SCRIPT)

    def _key(self, consumer: str, event_id: str) -> str:
        return f"{self._key_prefix}{consumer}:{event_id}"

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        return bool(await self._client.exists(self._key(consumer, event_id)))

    async def mark_processed(self, consumer: str, event_id: str) -> None:
        await self._client.set(self._key(consumer, event_id), b"1", nx=True, ex=self._ttl_s)

    async def processed_among(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        values = await self._client.mget([self._key(consumer, event_id) for event_id in event_ids])
        return {event_id for event_id, value in zip(event_ids, values, strict=True) if value is not None}

    async def mark_all_processed(self, consumer: str, event_ids: Sequence[str]) -> None:
        if event_ids:
            keys = [self._key(consumer, event_id) for event_id in event_ids]
            # One command for the batch; a record that exists keeps its expiry, like SET NX.
            await self._mark_script(keys=keys, args=[self._ttl_s])


class InMemoryProcessedEvents:
    """Idempotency records in this process's memory (embedded mode and tests)."""

    def __init__(self) -> None:
        self._processed: set[tuple[str, str]] = set()

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        return (consumer, event_id) in self._processed

    async def mark_processed(self, consumer: str, event_id: str) -> None:
        self._processed.add((consumer, event_id))

    async def processed_among(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        return {event_id for event_id in event_ids if (consumer, event_id) in self._processed}

    async def mark_all_processed(self, consumer: str, event_ids: Sequence[str]) -> None:
        self._processed.update((consumer, event_id) for event_id in event_ids)


class ConsumerMetrics:
    """Handler latency, retries and dead letters of each consumer (group pending counts:
    `parley_consumer_group_pending`, in `services.common.event_metrics`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handler_latency = Histogram(
            "parley_consumer_handler_seconds",
            "Time a consumer's handler took per event, by outcome (ok or error).",
            ("consumer", "outcome"),
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "parley_consumer_retries_total",
            "Handler failures that scheduled a retry.",
            ("consumer",),
            registry=registry,
        )
        self.dead_letters = Counter(
            "parley_consumer_dead_letters_total",
            "Entries moved to the dead-letter stream.",
            ("consumer",),
            registry=registry,
        )


@dataclass(frozen=True)
class EventSubscription:
    """A service's event consumer, run wherever the service is hosted.

    `parley up` feeds it from the outbox relay in process; `parley serve` reads the Redis streams of
    `sources` (one per producing service) as the consumer group `consumer`. The handler records each
    event as processed in its own transaction (`Consumer(handler_records_processing=True)`).
    """

    consumer: str
    handler: EventHandler
    event_types: frozenset[str]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class CurrentDelivery:
    """What a handler may need beyond the event: for writing its own idempotency record."""

    consumer: str
    event_id: str
    attempt: int


_current_delivery: ContextVar[CurrentDelivery | None] = ContextVar("parley_current_delivery", default=None)


def current_delivery() -> CurrentDelivery:
    """The delivery being handled; only valid inside a `Consumer`'s handler call."""
    delivery = _current_delivery.get()
    if delivery is None:
        raise RuntimeError("current_delivery() is only available inside a consumer's handler")
    return delivery


class Consumer:
    """Runs one member of a consumer group: reads batches from `source`, handles each event once.

    Retry delays: the backoff delay, or the error's `retry_after_s` when that is later, but never
    later than `_RETRY_WITHIN_VISIBILITY` of the visibility timeout after the entry was delivered.
    The entry's idle time in the group counts from that delivery; a retry due past the visibility
    timeout would let another member reclaim the entry first, and then both would work on it (this
    member's claim takes it back while the other is handling it). The margin is room for the rest of
    the batch and for the poll that claims the retry.
    """

    def __init__(
        self,
        name: str,
        handler: EventHandler,
        source: EventSource,
        processed: ProcessedEvents,
        *,
        member: str,
        batch_size: int = 32,
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        visibility_timeout_s: float = 120.0,
        block_s: float = 1.0,
        handler_records_processing: bool = False,
        event_types: Collection[str] | None = None,
        metrics: ConsumerMetrics | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`event_types`: the types the handler wants (every type when None); a stream carries every
        event of its source, and the others are acknowledged without a handler call or a record."""
        if batch_size < 1 or max_attempts < 1:
            raise ValueError("batch_size and max_attempts must be at least 1")
        if name != source.group:
            raise ValueError(f"consumer {name!r} must read its own group, not {source.group!r}")
        self.name = name
        self.member = member
        self._handler = handler
        self._source = source
        self._processed = processed
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._visibility_timeout_s = visibility_timeout_s
        self._block_s = block_s
        self._handler_records_processing = handler_records_processing
        self._event_types = None if event_types is None else frozenset(event_types)
        self._metrics = metrics
        self._tracer = None if tracer_provider is None else tracer_provider.get_tracer(__name__)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security.
        # Entry id → monotonic time its retry is due (entries this member failed and still holds).
        self._retry_due: dict[str, float] = {}
        self._group_ready = False
        # Looking for a dead member's idle entries costs a round trip; once a second is soon enough
        # for a timeout of minutes (shorter timeouts are checked proportionally more often).
        self._reclaim_interval_s = min(1.0, visibility_timeout_s / 4)
        self._next_reclaim_at = 0.0
        self._handler_latency = (
            {}
            if metrics is None
            else {outcome: metrics.handler_latency.labels(name, outcome) for outcome in ("ok", "error")}
        )

    async def poll_once(self, block_s: float | None = None) -> int:
        """Read and handle one batch (due retries, idle entries of dead members, then new entries);
        returns how many entries it settled (acked or dead-lettered)."""
        if not self._group_ready:
            await self._source.ensure_group()
            self._group_ready = True
        read_at = time.monotonic()
        due = [entry_id for entry_id, due_at in self._retry_due.items() if due_at <= read_at]
        due = due[: self._batch_size]
        for entry_id in due:
            del self._retry_due[entry_id]
        batch = await self._source.claim(self.member, due) if due else []
        room = self._batch_size - len(batch)
        if room > 0 and read_at >= self._next_reclaim_at:
            reclaimed = await self._source.reclaim_idle(self.member, self._visibility_timeout_s, room)
            batch += reclaimed
            # A full page means more idle entries may be waiting: look again on the next poll.
            full = len(reclaimed) >= room
            self._next_reclaim_at = read_at if full else read_at + self._reclaim_interval_s
        room = self._batch_size - len(batch)
        if room > 0:
            wait_s = self._block_s if block_s is None else block_s
            if batch:
                wait_s = 0.0
            elif self._retry_due:
                wait_s = min(wait_s, max(0.0, min(self._retry_due.values()) - time.monotonic()))
            batch += await self._source.read_new(self.member, room, wait_s)
        return await self._handle_batch(batch, read_at)

    async def _handle_batch(self, batch: Sequence[Delivery], read_at: float) -> int:
        to_ack: list[str] = []
        dead = 0
        events: list[tuple[Delivery, events_pb2.Event]] = []
        seen: set[str] = set()
        for delivery in batch:
            if delivery.entry_id in seen:
                continue  # reclaimed and claimed in the same poll
            seen.add(delivery.entry_id)
            self._retry_due.pop(delivery.entry_id, None)
            target = entry_for_group(delivery.fields)
            if target is not None and target != self.name:
                # Another group's replay: this group handled the event when it was first published.
                to_ack.append(delivery.entry_id)
                continue
            try:
                event = delivery.decode()
            except MalformedStreamEntry as error:
                await self._dead_letter(delivery, f"MalformedStreamEntry: {error}")
                dead += 1
                continue
            if self._event_types is not None and event.type not in self._event_types:
                to_ack.append(delivery.entry_id)
                continue
            events.append((delivery, event))
        done = (
            await _processed_among(self._processed, self.name, [event.id for _delivery, event in events])
            if events
            else set()
        )
        handled: list[str] = []
        try:
            for delivery, event in events:
                if event.id in done:
                    to_ack.append(delivery.entry_id)  # processed before, or earlier in this batch
                    continue
                outcome = await self._handle(delivery, event, read_at)
                if outcome == "ack":
                    to_ack.append(delivery.entry_id)
                    done.add(event.id)
                    handled.append(event.id)
                elif outcome == "dead":
                    dead += 1
        except BaseException:
            # Stopping mid-batch (cancelled, or the source failed): record what the handlers already
            # did, so the redelivery skips it. Nothing is acked; the entries are delivered again.
            with contextlib.suppress(Exception):
                await self._record_processed(handled)
            raise
        await self._record_processed(handled)
        # Acknowledged only after every handler of the batch returned and its record was written.
        await self._source.ack(to_ack)
        return len(to_ack) + dead

    async def _record_processed(self, event_ids: Sequence[str]) -> None:
        if event_ids and not self._handler_records_processing:
            await _mark_all_processed(self._processed, self.name, event_ids)

    async def _handle(self, delivery: Delivery, event: events_pb2.Event, read_at: float) -> str:
        started = time.perf_counter()
        try:
            await self._call_handler(event, delivery.deliveries)
        except Exception as error:  # noqa: BLE001 - any handler failure is retried, then dead-lettered.
            self._observe(started, "error")
            return await self._failed(delivery, error, read_at)
        self._observe(started, "ok")
        return "ack"

    async def _call_handler(self, event: events_pb2.Event, attempt: int) -> None:
        """Run the handler in the trace the event was produced in (events it emits continue it)."""
        delivery_token = _current_delivery.set(CurrentDelivery(self.name, event.id, attempt))
        trace_token = (
            otel_context.attach(trace_context_of(event)) if event.trace_context.traceparent else None
        )
        try:
            if self._tracer is None:
                await self._handler(event)
                return
            with self._tracer.start_as_current_span(
                f"consume {event.type}",
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "parley.consumer": self.name,
                    "parley.event_id": event.id,
                    "parley.attempt": attempt,
                },
            ):
                await self._handler(event)
        finally:
            if trace_token is not None:
                otel_context.detach(trace_token)
            _current_delivery.reset(delivery_token)

    def _observe(self, started: float, outcome: str) -> None:
        histogram = self._handler_latency.get(outcome)
        if histogram is not None:
            histogram.observe(time.perf_counter() - started)

    def _retry_due_at(self, delivery: Delivery, error: Exception, read_at: float) -> float:
        """When the failed entry is retried (monotonic time); see the class docstring."""
        delay_s = backoff_delay_s(delivery.deliveries, self._backoff_base_s, self._backoff_cap_s, self._rng)
        retry_after_s = retry_after_of(error)
        if retry_after_s is not None:
            delay_s = max(delay_s, retry_after_s)
        now = time.monotonic()
        latest = read_at + _RETRY_WITHIN_VISIBILITY * self._visibility_timeout_s
        return max(now, min(now + delay_s, latest))

    async def _failed(self, delivery: Delivery, error: Exception, read_at: float) -> str:
        error_text = f"{type(error).__name__}: {error}"
        if delivery.deliveries >= self._max_attempts or not is_retryable(error):
            logger.error(
                "consumer %s dead-letters event %s after %d attempt(s): %s",
                self.name,
                delivery.event_id,
                delivery.deliveries,
                error_text,
            )
            await self._dead_letter(delivery, error_text)
            return "dead"
        due_at = self._retry_due_at(delivery, error, read_at)
        self._retry_due[delivery.entry_id] = due_at
        if self._metrics is not None:
            self._metrics.retries.labels(self.name).inc()
        logger.warning(
            "consumer %s failed on event %s (attempt %d), retrying in %.2fs: %s",
            self.name,
            delivery.event_id,
            delivery.deliveries,
            due_at - time.monotonic(),
            error_text,
        )
        return "retry"

    async def _dead_letter(self, delivery: Delivery, error_text: str) -> None:
        await self._source.dead_letter(delivery, error_text)
        if self._metrics is not None:
            self._metrics.dead_letters.labels(self.name).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set. Source errors (Redis down) are logged and retried with backoff."""
        failures = 0
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception:
                failures += 1
                pause_s = backoff_delay_s(failures, self._backoff_base_s, self._backoff_cap_s, self._rng)
                logger.exception("consumer %s could not poll; retrying in %.2fs", self.name, pause_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause_s):
                        await stop.wait()
            else:
                failures = 0
