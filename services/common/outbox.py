"""The transactional outbox: events are written in the same transaction as the state change they
describe, and a relay later hands them, in order, to a dispatcher (Redis Streams, or in-process
handlers when embedded).

Delivery is at least once: an event is marked relayed only after the dispatcher returned, so a crash
in between delivers it again. Consumers deduplicate on `Event.id`.

Order: events are relayed in `sequence` order, and the relay never skips past an event that failed;
it retries that one (with backoff) before anything behind it. On SQLite the sequence is the commit
order (writers are serialized). On PostgreSQL it is the insert order; events about one subject keep
their order as long as the state change that emits them holds the subject's row lock, which every
update of that row does.

Delayed events ("send this at T"): `add_event(..., deliver_after=T)`. Such an event is not due
before T; until then it is not relayed, holds nothing back, and does not count as outbox lag. From T
on it is an ordinary due event, relayed in sequence order among the due ones (so it goes out after
due events written after it that were relayed while it waited). T is compared with the relay's
clock (`OutboxRelay(clock=...)`, `utc_now` by default), the same clock that times retries and
`relayed_at`, not the database server's: producers compute T from their own clock, and application
hosts keep theirs in sync. A running relay wakes at the nearest due time it knows of, and polls at
least every `idle_poll_s` (0.5 s by default) for rows other processes committed; so a delayed event
is relayed within `idle_poll_s` of its due time by the relay's clock, unless a failed event ahead
of it is backing off or the relay is working through a backlog.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol, cast
from uuid import uuid4

from google.protobuf.message import DecodeError, Message
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column

from parley.events.v1 import events_pb2
from services.common.clock import utc_now
from services.common.db import Database
from services.common.events import event_type_for, payload_field_for
from services.common.models import UUID_LENGTH, Base, UTCDateTime

logger = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that lets one relay at a time work on the outbox. Advisory
# lock keys are one shared bigint space per database, so derive ours from a name nobody else uses.
RELAY_ADVISORY_LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"parley.outbox.relay").digest()[:8], "big", signed=True
)

_LAST_ERROR_MAX_CHARS: Final = 2000
# Session.info key set by add_event, so a commit hook knows the transaction wrote events.
EVENTS_ADDED: Final = "parley.outbox.events_added"
# The predicates of the two partial indexes; the relay's queries repeat them so both databases use them.
_UNRELAYED_IMMEDIATE: Final = "relayed_at IS NULL AND deliver_after IS NULL"
_UNRELAYED_DELAYED: Final = "relayed_at IS NULL AND deliver_after IS NOT NULL"


class OutboxEvent(Base):
    """One event waiting to be relayed (or already relayed, until pruned)."""

    __tablename__ = "outbox_events"
    __table_args__ = (
        # Only unrelayed rows are indexed: the relay's scans stay small however long the history gets.
        # Immediate rows are read in sequence order, delayed ones by due time, each from its own index,
        # so however many rows are due far in the future, none of them is scanned to reach due ones.
        Index(
            "ix_outbox_events_unrelayed_immediate",
            "sequence",
            postgresql_where=text(_UNRELAYED_IMMEDIATE),
            sqlite_where=text(_UNRELAYED_IMMEDIATE),
        ),
        Index(
            "ix_outbox_events_unrelayed_delayed",
            "deliver_after",
            postgresql_where=text(_UNRELAYED_DELAYED),
            sqlite_where=text(_UNRELAYED_DELAYED),
        ),
        # AUTOINCREMENT: SQLite must never reuse the sequence of a deleted row.
        {"sqlite_autoincrement": True},
    )

    # SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
    sequence: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(UUID_LENGTH), unique=True)
    source: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str] = mapped_column(String(255))
    # The serialized `parley.events.v1.Event`, envelope included: exactly what consumers receive.
    payload: Mapped[bytes] = mapped_column(LargeBinary())
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime())
    relayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer(), default=0, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Not due before this time (a delayed event); None: due once committed.
    deliver_after: Mapped[datetime | None] = mapped_column(UTCDateTime())


# Inserts `outbox_row` rows: one statement, built once, for any number of them.
INSERT_EVENTS: Final = insert(cast(Table, OutboxEvent.__table__))


def current_trace_context() -> events_pb2.TraceContext | None:
    """The W3C trace context of the current OpenTelemetry span, or None outside any recorded trace."""
    carrier: dict[str, str] = {}
    # The W3C propagator itself rather than the global one: the envelope's fields are W3C headers.
    TraceContextTextMapPropagator().inject(carrier)
    traceparent = carrier.get("traceparent")
    if not traceparent:
        return None
    return events_pb2.TraceContext(traceparent=traceparent, tracestate=carrier.get("tracestate", ""))


def trace_context_of(event: events_pb2.Event) -> Context:
    """An OpenTelemetry context that continues the trace the event was produced in (for consumers)."""
    carrier = {"traceparent": event.trace_context.traceparent}
    if event.trace_context.tracestate:
        carrier["tracestate"] = event.trace_context.tracestate
    return TraceContextTextMapPropagator().extract(carrier)


def add_event(
    session: AsyncSession,
    *,
    source: str,
    subject: str,
    payload: Message,
    trace_context: events_pb2.TraceContext | None = None,
    deliver_after: datetime | None = None,
) -> events_pb2.Event:
    """Put an event in the outbox as part of the caller's transaction, and return its envelope.

    Never commits: the event becomes visible to the relay exactly when, and only if, the caller's
    unit of work commits. Without `trace_context`, the current OpenTelemetry span's is used.
    `deliver_after` (timezone-aware UTC) delays the event: it is not relayed before that time. A
    time already past makes it due at once, like no delay.
    """
    event, row = outbox_row(
        source=source,
        subject=subject,
        payload=payload,
        trace_context=trace_context,
        deliver_after=deliver_after,
    )
    session.info[EVENTS_ADDED] = True
    session.add(OutboxEvent(**row))
    return event


def outbox_row(
    *,
    source: str,
    subject: str,
    payload: Message,
    trace_context: events_pb2.TraceContext | None = None,
    deliver_after: datetime | None = None,
) -> tuple[events_pb2.Event, dict[str, Any]]:
    """An event's envelope and the `outbox_events` row that carries it, as `add_event` adds it; for
    writers that insert rows themselves (`INSERT_EVENTS`), which then set `EVENTS_ADDED` or wake the
    relay once they committed."""
    # A naive time's utcoffset() is None: refused too, since guessing its zone shifts it by hours.
    if deliver_after is not None and deliver_after.utcoffset() != timedelta(0):
        raise ValueError(f"deliver_after must be timezone-aware UTC, like utc_now(): {deliver_after!r}")
    field = payload_field_for(payload)
    occurred_at = utc_now()
    if deliver_after is not None and deliver_after <= occurred_at:
        # Due now: stored as an immediate event, so the lag it may build is measured from occurred_at.
        deliver_after = None
    event = events_pb2.Event(id=str(uuid4()), type=event_type_for(payload), source=source, subject=subject)
    event.time.FromDatetime(occurred_at)
    context = trace_context if trace_context is not None else current_trace_context()
    if context is not None:
        event.trace_context.CopyFrom(context)
    getattr(event, field).CopyFrom(payload)
    row = {
        "event_id": event.id,
        "source": source,
        "event_type": event.type,
        "subject": subject,
        "payload": event.SerializeToString(),
        "occurred_at": occurred_at,
        "deliver_after": deliver_after,
    }
    return event, row


class PartialDispatch(Exception):  # noqa: N818 - it reports an outcome, not a programming error.
    """Raised by a dispatcher when only the first `delivered` events of the batch were delivered.

    Raise it `from` the underlying error. The relay marks those events relayed and retries from the
    next one.
    """

    def __init__(self, delivered: int, message: str = "") -> None:
        super().__init__(message or f"delivered {delivered} event(s) before failing")
        self.delivered = delivered


class EventDispatcher(Protocol):
    """Where the relay hands events: Redis Streams in microservices mode, handlers in process when embedded.

    `dispatch` delivers the events in the given order. Returning means every event was delivered.
    Raising `PartialDispatch(n)` means the first n were delivered and the rest were not. Raising
    anything else means none of them counts as delivered: all are dispatched again later, which
    consumers tolerate because they deduplicate on the event id.
    """

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None: ...


EventHandler = Callable[[events_pb2.Event], Awaitable[None]]


@dataclass(frozen=True)
class _Subscription:
    consumer: str
    handler: EventHandler
    event_types: frozenset[str] | None

    def wants(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


class InProcessDispatcher:
    """Delivers events to handlers in this process (embedded mode): each event, in order, to every
    subscriber that wants its type, before the next event.

    A handler that raises stops the batch there (`PartialDispatch`): that event goes to every
    subscriber again on the next attempt, including the ones that already handled it.
    """

    def __init__(self) -> None:
        self._subscriptions: list[_Subscription] = []

    def subscribe(
        self,
        consumer: str,
        handler: EventHandler,
        event_types: Collection[str] | None = None,
    ) -> None:
        """Register `handler` under the name `consumer`, for `event_types` (every type when None)."""
        if any(subscription.consumer == consumer for subscription in self._subscriptions):
            raise ValueError(f"consumer {consumer!r} is already subscribed")
        wanted = None if event_types is None else frozenset(event_types)
        self._subscriptions.append(_Subscription(consumer, handler, wanted))

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None:
        for delivered, event in enumerate(events):
            for subscription in self._subscriptions:
                if not subscription.wants(event.type):
                    continue
                try:
                    await subscription.handler(event)
                except Exception as error:
                    raise PartialDispatch(
                        delivered,
                        f"consumer {subscription.consumer!r} failed on event {event.id} ({event.type})",
                    ) from error


@dataclass(frozen=True)
class _PendingEvent:
    sequence: int
    event_id: str
    attempts: int
    payload: bytes


@dataclass(frozen=True)
class _Outcome:
    delivered: int
    error: BaseException | None


class OutboxRelay:
    """Moves committed outbox events to the dispatcher, in order, at least once.

    On PostgreSQL several relays (one per replica) may run: each batch happens under a
    transaction-level advisory lock, so only one relay works at a time and none delivers an event
    another already delivered. On SQLite run one relay per database file (embedded mode does).
    """

    def __init__(
        self,
        db: Database,
        dispatcher: EventDispatcher,
        *,
        batch_size: int = 500,
        idle_poll_s: float = 0.5,
        retry_base_s: float = 0.5,
        retry_max_s: float = 60.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """`clock` (timezone-aware UTC) decides when delayed events and retries are due; tests inject one."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._db = db
        self._dispatcher = dispatcher
        self._batch_size = batch_size
        self._idle_poll_s = idle_poll_s
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._clock = clock
        # One batch at a time per relay, whoever calls relay_once.
        self._batch_lock = asyncio.Lock()
        # The earliest time the last batch found something becomes due (a retry, a delayed event),
        # so `run` wakes for it instead of waiting a whole idle poll.
        self._wake_at: datetime | None = None
        self._wake = asyncio.Event()
        # Events committed in this process are relayed at once instead of at the next idle poll.
        db.after_commit(self._wake_if_events_committed)
        db.hot_writes.after_events_committed(self.wake)

    def _wake_if_events_committed(self, session: Session) -> None:
        if session.info.pop(EVENTS_ADDED, False):
            self.wake()

    def wake(self) -> None:
        """Make a waiting `run` loop poll now (call it after committing events; event-loop thread only)."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Relay one batch; returns how many events were delivered and marked relayed.

        Returns 0 when nothing is due, or when another relay holds the PostgreSQL lock. A dispatch
        failure does not raise: it is recorded on the event (attempts, last_error, next_attempt_at),
        and that event and everything behind it wait for the retry. Database errors do raise.
        """
        async with self._batch_lock:
            if self._db.dialect_name == "postgresql":
                return await self._relay_under_advisory_lock()
            return await self._relay_in_two_transactions()

    async def _relay_under_advisory_lock(self) -> int:
        # The transaction spans the dispatch, so the lock is held until the marks are committed:
        # the next relay to get it sees them, and cannot deliver the same events again.
        async with self._db.unit_of_work() as session:
            locked = await session.scalar(select(func.pg_try_advisory_xact_lock(RELAY_ADVISORY_LOCK_KEY)))
            if not locked:
                return 0
            pending = await self._due_events(session)
            if not pending:
                return 0
            outcome = await self._dispatch(pending)
            await self._record(session, pending, outcome)
        return outcome.delivered

    async def _relay_in_two_transactions(self) -> int:
        # SQLite has one writer per file: holding a write transaction across the dispatch would
        # block every handler that writes (in-process consumers do) until it timed out. So read,
        # dispatch with no transaction open, then record in a short write transaction.
        async with self._db.unit_of_work(read_only=True) as session:
            pending = await self._due_events(session)
        if not pending:
            return 0
        outcome = await self._dispatch(pending)
        async with self._db.unit_of_work() as session:
            await self._record(session, pending, outcome)
        return outcome.delivered

    async def _due_events(self, session: AsyncSession) -> list[_PendingEvent]:
        """The next batch in sequence order: immediate rows and delayed rows whose time has come,
        cut before the first one still backing off from a failed dispatch."""
        now = self._clock()
        columns = (
            OutboxEvent.sequence,
            OutboxEvent.event_id,
            OutboxEvent.attempts,
            OutboxEvent.payload,
            OutboxEvent.next_attempt_at,
        )
        # Two index range scans, each stopping after one batch, merged by sequence: a predicate with
        # OR would walk the not-yet-due rows (or sort the whole backlog) on every poll.
        immediate = (
            select(*columns)
            .where(text(_UNRELAYED_IMMEDIATE))
            .order_by(OutboxEvent.sequence)
            .limit(self._batch_size)
            .subquery()
        )
        delayed_due = (
            select(*columns)
            .where(text(_UNRELAYED_DELAYED), OutboxEvent.deliver_after <= now)
            .order_by(OutboxEvent.sequence)
            .limit(self._batch_size)
            .subquery()
        )
        due = union_all(select(immediate), select(delayed_due)).subquery()
        rows = (await session.execute(select(due).order_by(due.c.sequence).limit(self._batch_size))).all()
        pending: list[_PendingEvent] = []
        for sequence, event_id, attempts, payload, next_attempt_at in rows:
            if next_attempt_at is not None and next_attempt_at > now:
                self._wake_no_later_than(next_attempt_at)
                break  # still backing off; nothing behind it may overtake it
            pending.append(_PendingEvent(sequence, event_id, attempts, payload))
        if len(pending) < self._batch_size:  # not a full batch, so `run` may sleep: until when?
            next_delayed: datetime | None = await session.scalar(
                select(OutboxEvent.deliver_after)
                .where(text(_UNRELAYED_DELAYED), OutboxEvent.deliver_after > now)
                .order_by(OutboxEvent.deliver_after)
                .limit(1)
            )
            if next_delayed is not None:
                self._wake_no_later_than(next_delayed)
        return pending

    def _wake_no_later_than(self, moment: datetime) -> None:
        if self._wake_at is None or moment < self._wake_at:
            self._wake_at = moment

    async def _dispatch(self, pending: Sequence[_PendingEvent]) -> _Outcome:
        events: list[events_pb2.Event] = []
        undecodable: BaseException | None = None
        for item in pending:
            try:
                events.append(events_pb2.Event.FromString(item.payload))
            except DecodeError as error:
                undecodable = error
                break  # the events before it still go out; this one is retried (and alerts via lag)
        try:
            if events:
                await self._dispatcher.dispatch(events)
        except PartialDispatch as partial:
            delivered = min(max(partial.delivered, 0), len(events))
            return _Outcome(delivered, partial.__cause__ or partial)
        except Exception as error:  # noqa: BLE001 - any dispatcher failure is recorded and retried.
            return _Outcome(0, error)
        return _Outcome(len(events), undecodable)

    async def _record(
        self, session: AsyncSession, pending: Sequence[_PendingEvent], outcome: _Outcome
    ) -> None:
        now = self._clock()
        delivered = [item.sequence for item in pending[: outcome.delivered]]
        if delivered:
            await session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.sequence.in_(delivered), OutboxEvent.relayed_at.is_(None))
                .values(relayed_at=now, next_attempt_at=None)
                .execution_options(synchronize_session=False)
            )
        if outcome.error is None or outcome.delivered >= len(pending):
            return
        failed = pending[outcome.delivered]
        attempts = failed.attempts + 1
        retry_in = self._retry_delay_s(attempts)
        error_text = f"{type(outcome.error).__name__}: {outcome.error}"[:_LAST_ERROR_MAX_CHARS]
        next_attempt_at = now + timedelta(seconds=retry_in)
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.sequence == failed.sequence)
            .values(attempts=attempts, last_error=error_text, next_attempt_at=next_attempt_at)
            .execution_options(synchronize_session=False)
        )
        self._wake_no_later_than(next_attempt_at)
        logger.warning(
            "outbox event %s failed to dispatch (attempt %d), retrying in %.1fs: %s",
            failed.event_id,
            attempts,
            retry_in,
            error_text,
        )

    def _retry_delay_s(self, attempts: int) -> float:
        """Exponential backoff with jitter, so relays on several replicas do not retry in lockstep."""
        ceiling = min(self._retry_max_s, self._retry_base_s * 2.0 ** min(attempts - 1, 32))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security.

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set. Never raises: errors are logged and retried with backoff."""
        consecutive_failures = 0
        while not stop.is_set():
            self._wake.clear()
            self._wake_at = None
            try:
                relayed = await self.relay_once()
            except Exception:
                consecutive_failures += 1
                pause_s = self._retry_delay_s(consecutive_failures)
                logger.exception("outbox relay failed; retrying in %.1fs", pause_s)
            else:
                consecutive_failures = 0
                if relayed >= self._batch_size:
                    continue  # a full batch: more are probably waiting
                pause_s = self._idle_poll_s
                if self._wake_at is not None:
                    pause_s = min(pause_s, max(0.0, (self._wake_at - self._clock()).total_seconds()))
            await self._pause(stop, pause_s)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)


async def outbox_lag_seconds(db: Database) -> float:
    """How long the oldest due unrelayed event has been waiting, in seconds; 0 when none is.

    An event waits from the moment it became due: `occurred_at`, or `deliver_after` for a delayed
    one. Delayed events not due yet are not lag.
    """
    now = utc_now()
    async with db.unit_of_work(read_only=True) as session:
        oldest_immediate: datetime | None = await session.scalar(
            select(OutboxEvent.occurred_at)
            .where(text(_UNRELAYED_IMMEDIATE))
            .order_by(OutboxEvent.sequence)
            .limit(1)
        )
        oldest_delayed: datetime | None = await session.scalar(
            select(OutboxEvent.deliver_after)
            .where(text(_UNRELAYED_DELAYED), OutboxEvent.deliver_after <= now)
            .order_by(OutboxEvent.deliver_after)
            .limit(1)
        )
    waiting_since = [moment for moment in (oldest_immediate, oldest_delayed) if moment is not None]
    if not waiting_since:
        return 0.0
    return max(0.0, (now - min(waiting_since)).total_seconds())


async def prune_relayed(db: Database, *, older_than: datetime, batch_size: int = 10_000) -> int:
    """Delete events relayed before `older_than` (timezone-aware); returns how many were deleted.

    Unrelayed events are never deleted, however old. Deletes in batches of `batch_size`, each its
    own short transaction, so SQLite's single write lock is never held for long.
    """
    if older_than.tzinfo is None or older_than.utcoffset() is None:
        raise ValueError(f"naive datetime {older_than!r} given; use a timezone-aware one (e.g. utc_now())")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    deleted = 0
    while True:
        async with db.unit_of_work() as session:
            batch = (
                select(OutboxEvent.sequence)
                .where(OutboxEvent.relayed_at.is_not(None), OutboxEvent.relayed_at < older_than)
                .order_by(OutboxEvent.sequence)
                .limit(batch_size)
                .scalar_subquery()
            )
            result: Any = await session.execute(
                delete(OutboxEvent)
                .where(OutboxEvent.sequence.in_(batch))
                .execution_options(synchronize_session=False)
            )
        count = int(result.rowcount or 0)
        deleted += count
        if count < batch_size:
            return deleted
