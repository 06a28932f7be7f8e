"""Contract of the transactional outbox and its relay, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic import command
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import select, text, update

from parley.events.v1 import events_pb2
from services.common.clock import utc_now
from services.common.db import Database
from services.common.events import payload_of
from services.common.migrate import alembic_config, upgrade_async
from services.common.outbox import (
    InProcessDispatcher,
    OutboxEvent,
    OutboxRelay,
    add_event,
    outbox_lag_seconds,
    prune_relayed,
)
from tests.support.polling import eventually


class RecordingDispatcher:
    """Delivers into a list; can be told to fail its next calls, or to take its time."""

    def __init__(self, *, failures: int = 0, delay_s: float = 0.0, log: list[str] | None = None) -> None:
        self.failures_left = failures
        self.delay_s = delay_s
        self.calls = 0
        self.delivered: list[str] = [] if log is None else log

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None:
        self.calls += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("stream unavailable")
        if self.delay_s:
            # A slow dispatch, as a real stream's is: concurrent relays' batches overlap in real time,
            # which is the race the advisory lock must win.
            await asyncio.sleep(self.delay_s)
        self.delivered.extend(event.id for event in events)


def registered(user: str) -> events_pb2.UserRegistered:
    return events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com", display_name=user.title())


async def commit_events(db: Database, users: Sequence[str]) -> list[str]:
    """One transaction adding one event per user; returns the event ids in the order added."""
    async with db.unit_of_work() as session:
        return [
            add_event(session, source="auth", subject=user, payload=registered(user)).id for user in users
        ]


async def relay_until_idle(relay: OutboxRelay) -> int:
    total = 0
    while relayed := await relay.relay_once():
        total += relayed
    return total


async def outbox_rows(db: Database) -> list[OutboxEvent]:
    async with db.unit_of_work(read_only=True) as session:
        return list(await session.scalars(select(OutboxEvent).order_by(OutboxEvent.sequence)))


async def warmed_up(database: Database, dispatcher: RecordingDispatcher) -> None:
    """Have the running relay deliver one event, then forget it: the relay has made a pass and is
    waiting now, so whatever it delivers next, something woke it for."""
    [warm_up] = await commit_events(database, ["warm-up"])
    await eventually(lambda: dispatcher.delivered == [warm_up], what="the warm-up event relayed")
    dispatcher.calls = 0
    dispatcher.delivered.clear()


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


async def test_event_of_a_rolled_back_transaction_never_appears(database: Database) -> None:
    dispatcher = RecordingDispatcher()
    with pytest.raises(RuntimeError):
        async with database.unit_of_work() as session:
            add_event(session, source="auth", subject="u1", payload=registered("u1"))
            await session.flush()
            raise RuntimeError("the state change failed")
    assert await OutboxRelay(database, dispatcher).relay_once() == 0
    assert dispatcher.delivered == []
    assert await outbox_rows(database) == []
    assert await outbox_lag_seconds(database) == 0.0


async def test_committed_events_are_relayed_exactly_once_in_commit_order(database: Database) -> None:
    expected: list[str] = []
    for users in (["a"], ["b", "c", "d"], ["e", "f"], ["g", "h", "i", "j", "k"]):
        expected += await commit_events(database, users)
    dispatcher = RecordingDispatcher()
    relay = OutboxRelay(database, dispatcher, batch_size=3)

    assert await relay_until_idle(relay) == len(expected)
    assert await relay.relay_once() == 0
    assert dispatcher.delivered == expected
    rows = await outbox_rows(database)
    assert all(row.relayed_at is not None and row.relayed_at.tzinfo is UTC for row in rows)
    assert all(row.attempts == 0 for row in rows)


async def test_envelope_carries_the_event(database: Database) -> None:
    received: list[events_pb2.Event] = []

    async def consumer(event: events_pb2.Event) -> None:
        received.append(event)

    dispatcher = InProcessDispatcher()
    dispatcher.subscribe("recorder", consumer)
    tracer = TracerProvider().get_tracer("test")
    before = utc_now()
    with tracer.start_as_current_span("register") as span:
        async with database.unit_of_work() as session:
            returned = add_event(session, source="auth", subject="user-1", payload=registered("user-1"))
    explicit = events_pb2.TraceContext(
        traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", tracestate="k=v"
    )
    async with database.unit_of_work() as session:
        add_event(
            session, source="auth", subject="user-2", payload=registered("user-2"), trace_context=explicit
        )
        add_event(session, source="auth", subject="user-3", payload=registered("user-3"))

    await relay_until_idle(OutboxRelay(database, dispatcher))

    first, second, untraced = received
    assert first == returned
    assert first.type == "user.registered"
    assert first.source == "auth"
    assert first.subject == "user-1"
    assert first.WhichOneof("payload") == "user_registered"
    assert payload_of(first) == registered("user-1")
    assert before <= first.time.ToDatetime(tzinfo=UTC) <= utc_now()
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert first.trace_context.traceparent.split("-")[1] == trace_id
    assert second.trace_context == explicit
    assert not untraced.HasField("trace_context")
    rows = await outbox_rows(database)
    assert [row.event_type for row in rows] == ["user.registered"] * 3
    assert rows[0].occurred_at == first.time.ToDatetime(tzinfo=UTC)


async def test_failed_dispatch_is_recorded_and_retried_after_backoff(database: Database) -> None:
    clock = SteppedClock()
    expected = await commit_events(database, ["a", "b"])
    dispatcher = RecordingDispatcher(failures=2)
    # Backoff of 0.3-0.6s (jitter), by the relay's clock, which only the test moves.
    relay = OutboxRelay(database, dispatcher, retry_base_s=0.6, retry_max_s=0.6, clock=clock)

    assert await relay.relay_once() == 0
    head, second = await outbox_rows(database)
    assert head.relayed_at is None
    assert head.attempts == 1
    assert head.last_error == "ConnectionError: stream unavailable"
    assert head.next_attempt_at is not None
    assert clock.now + timedelta(seconds=0.3) <= head.next_attempt_at <= clock.now + timedelta(seconds=0.6)
    assert second.attempts == 0
    assert second.relayed_at is None

    # Still backing off: the dispatcher is not even called, and nothing overtakes the failed event.
    assert await relay.relay_once() == 0
    assert dispatcher.calls == 1

    clock.advance(seconds=0.6)  # past the longest backoff
    assert await relay.relay_once() == 0
    head, _ = await outbox_rows(database)
    assert head.attempts == 2

    clock.advance(seconds=0.6)
    assert await relay.relay_once() == 2
    assert dispatcher.delivered == expected
    head, second = await outbox_rows(database)
    assert head.relayed_at is not None
    assert second.relayed_at is not None
    assert head.next_attempt_at is None
    assert head.attempts == 2


async def test_a_partial_dispatch_marks_what_was_delivered(database: Database) -> None:
    expected = await commit_events(database, ["a", "b", "c", "d"])
    seen: list[str] = []
    fail_on = {expected[2]}

    async def consumer(event: events_pb2.Event) -> None:
        if event.id in fail_on:
            fail_on.discard(event.id)
            raise ValueError("consumer hiccup")
        seen.append(event.id)

    dispatcher = InProcessDispatcher()
    dispatcher.subscribe("flaky", consumer)
    clock = SteppedClock()
    relay = OutboxRelay(database, dispatcher, retry_base_s=0.01, retry_max_s=0.01, clock=clock)

    assert await relay.relay_once() == 2
    rows = await outbox_rows(database)
    assert [row.relayed_at is not None for row in rows] == [True, True, False, False]
    assert rows[2].attempts == 1
    assert rows[2].last_error == "ValueError: consumer hiccup"

    assert await relay.relay_once() == 0  # backing off
    clock.advance(seconds=0.01)
    assert await relay.relay_once() == 2
    assert seen == expected


async def test_in_process_dispatcher_delivers_each_event_to_every_matching_consumer(
    database: Database,
) -> None:
    expected = await commit_events(database, ["a", "b"])
    log: list[tuple[str, str]] = []

    def recorder(name: str) -> Callable[[events_pb2.Event], Awaitable[None]]:
        async def handle(event: events_pb2.Event) -> None:
            log.append((name, event.id))

        return handle

    dispatcher = InProcessDispatcher()
    dispatcher.subscribe("everything", recorder("everything"))
    dispatcher.subscribe("registrations", recorder("registrations"), event_types=["user.registered"])
    dispatcher.subscribe("other", recorder("other"), event_types={"chat.message_sent"})
    with pytest.raises(ValueError, match="already subscribed"):
        dispatcher.subscribe("other", recorder("other"))

    await relay_until_idle(OutboxRelay(database, dispatcher))

    assert log == [
        ("everything", expected[0]),
        ("registrations", expected[0]),
        ("everything", expected[1]),
        ("registrations", expected[1]),
    ]


async def test_a_new_relay_picks_up_what_is_pending(database: Database) -> None:
    clock = SteppedClock()
    first_batch = await commit_events(database, ["a", "b"])
    crashed = OutboxRelay(
        database, RecordingDispatcher(failures=1), retry_base_s=0.01, retry_max_s=0.01, clock=clock
    )
    assert await crashed.relay_once() == 0
    second_batch = await commit_events(database, ["c"])

    clock.advance(seconds=0.01)  # the retry the crashed relay scheduled is due
    dispatcher = RecordingDispatcher()
    assert await relay_until_idle(OutboxRelay(database, dispatcher, clock=clock)) == 3
    assert dispatcher.delivered == first_batch + second_batch


async def test_run_relays_when_woken_and_survives_errors(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = RecordingDispatcher()
    # A long idle poll: only wake() can explain a prompt delivery.
    relay = OutboxRelay(database, dispatcher, idle_poll_s=60, retry_base_s=0.01, retry_max_s=0.05)
    async with running(relay) as task:
        await warmed_up(database, dispatcher)
        dispatcher.failures_left = 1
        first = await commit_events(database, ["a"])
        relay.wake()
        await eventually(lambda: dispatcher.calls >= 1, what="a first, failing, dispatch")
        relay.wake()
        await eventually(lambda: dispatcher.delivered == first, what="the event relayed on its retry")

        # The outbox table vanishing (a database error, not a dispatch failure) must not end the loop.
        async with database.unit_of_work() as session:
            await session.execute(text("ALTER TABLE outbox_events RENAME TO outbox_events_away"))
        relay.wake()
        await eventually(
            lambda: "outbox relay failed" in caplog.text, what="the relay logging the database error"
        )
        assert not task.done()
        async with database.unit_of_work() as session:
            await session.execute(text("ALTER TABLE outbox_events_away RENAME TO outbox_events"))

        second = await commit_events(database, ["b", "c"])
        relay.wake()
        await eventually(
            lambda: dispatcher.delivered == first + second,
            what="the relay back at work once the table is back",
            timeout_s=5,
        )
    assert task.done()


async def test_a_commit_that_wrote_events_wakes_the_relay(database: Database) -> None:
    dispatcher = RecordingDispatcher()
    # The idle poll is far longer than the bound below, so only the commit hook can deliver in time.
    relay = OutboxRelay(database, dispatcher, idle_poll_s=600)
    async with running(relay):
        await warmed_up(database, dispatcher)
        first = await commit_events(database, ["a", "b"])
        await eventually(lambda: dispatcher.delivered == first, what="the commit hook waking the relay")
        # A commit without events does not wake it; a later one with events does.
        async with database.unit_of_work() as session:
            await session.execute(text("SELECT 1"))
        second = await commit_events(database, ["c"])
        await eventually(lambda: dispatcher.delivered == first + second, what="the second commit relayed")


async def test_outbox_lag_is_the_age_of_the_oldest_unrelayed_event(database: Database) -> None:
    assert await outbox_lag_seconds(database) == 0.0
    await commit_events(database, ["a", "b"])
    async with database.unit_of_work() as session:
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.subject == "a")
            .values(occurred_at=utc_now() - timedelta(seconds=30))
        )
    lag = await outbox_lag_seconds(database)
    assert 30 <= lag < 40
    await relay_until_idle(OutboxRelay(database, RecordingDispatcher()))
    assert await outbox_lag_seconds(database) == 0.0


@pytest.mark.postgres
async def test_concurrent_relays_on_postgres_deliver_each_event_once_in_order(postgres_url: str) -> None:
    await upgrade_async(postgres_url)
    db = Database(postgres_url)
    log: list[str] = []
    relays = [
        OutboxRelay(db, RecordingDispatcher(delay_s=0.005, log=log), batch_size=4, idle_poll_s=0.005)
        for _ in range(3)
    ]
    expected: list[str] = []
    try:
        async with running(relays[0]), running(relays[1]), running(relays[2]):
            for round_ in range(25):
                expected += await commit_events(db, [f"u{round_}-{index}" for index in range(round_ % 4 + 1)])
                for relay in relays:
                    relay.wake()
            await eventually(lambda: len(log) >= len(expected), what="every event relayed", timeout_s=20)
        # Stopped, so every batch in flight has finished; and one more pass each finds nothing left.
        assert [await relay.relay_once() for relay in relays] == [0, 0, 0]
        assert log == expected
        assert await outbox_lag_seconds(db) == 0.0
    finally:
        await db.dispose()


async def test_a_failed_dispatch_is_retried_when_due_without_a_wake(database: Database) -> None:
    dispatcher = RecordingDispatcher(failures=2)
    # The idle poll is far longer than the bound: only the scheduled retries can deliver in time.
    relay = OutboxRelay(database, dispatcher, idle_poll_s=600, retry_base_s=0.05, retry_max_s=0.2)
    async with running(relay):
        committed = await commit_events(database, ["a"])
        await eventually(lambda: dispatcher.delivered == committed, what="the event relayed on its retries")
    assert dispatcher.calls == 3


class SteppedClock:
    """The relay's clock, moved by the test: due times are crossed without waiting for them."""

    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


async def commit_delayed(db: Database, user: str, deliver_after: datetime) -> str:
    async with db.unit_of_work() as session:
        return add_event(
            session, source="auth", subject=user, payload=registered(user), deliver_after=deliver_after
        ).id


async def test_a_delayed_event_is_relayed_once_due_and_not_before(database: Database) -> None:
    clock = SteppedClock()
    delayed = await commit_delayed(database, "later", clock.now + timedelta(minutes=10))
    dispatcher = RecordingDispatcher()
    relay = OutboxRelay(database, dispatcher, clock=clock)

    assert await relay.relay_once() == 0
    clock.advance(minutes=9, seconds=59)
    assert await relay.relay_once() == 0
    assert dispatcher.calls == 0

    clock.advance(seconds=1)
    assert await relay.relay_once() == 1
    assert dispatcher.delivered == [delayed]
    [row] = await outbox_rows(database)
    assert row.deliver_after == clock.now
    assert row.relayed_at == clock.now


async def test_a_delayed_event_does_not_hold_back_the_events_behind_it(database: Database) -> None:
    clock = SteppedClock()
    first = await commit_events(database, ["a"])
    delayed = await commit_delayed(database, "later", clock.now + timedelta(hours=1))
    behind = await commit_events(database, ["b", "c"])
    dispatcher = RecordingDispatcher()
    # A batch of one: the delayed row, though first in line, must not fill the batch either.
    relay = OutboxRelay(database, dispatcher, batch_size=1, clock=clock)

    assert await relay_until_idle(relay) == 3
    assert dispatcher.delivered == first + behind

    clock.advance(hours=1)
    assert await relay_until_idle(relay) == 1
    assert dispatcher.delivered == [*first, *behind, delayed]


async def test_due_delayed_events_go_out_in_sequence_order_behind_a_failed_one(database: Database) -> None:
    clock = SteppedClock()
    head = await commit_events(database, ["a"])
    delayed = await commit_delayed(database, "later", clock.now + timedelta(minutes=1))
    behind = await commit_events(database, ["b"])
    dispatcher = RecordingDispatcher(failures=1)
    # The retry of the failed head is due 30 to 60 minutes later, by the relay's clock.
    relay = OutboxRelay(database, dispatcher, retry_base_s=3600, retry_max_s=3600, clock=clock)

    assert await relay.relay_once() == 0
    head_row = (await outbox_rows(database))[0]
    assert head_row.attempts == 1
    assert head_row.next_attempt_at is not None

    # The delayed event is due now, but the head is still backing off: nothing overtakes it.
    clock.advance(minutes=2)
    assert await relay.relay_once() == 0
    assert dispatcher.calls == 1

    clock.now = head_row.next_attempt_at
    assert await relay_until_idle(relay) == 3
    assert dispatcher.delivered == [*head, delayed, *behind]


async def test_add_event_refuses_a_due_time_that_is_not_utc(database: Database) -> None:
    naive = datetime.now()
    elsewhere = datetime.now(timezone(timedelta(hours=2))) + timedelta(hours=1)
    for deliver_after in (naive, elsewhere):
        with pytest.raises(ValueError, match="deliver_after"):
            async with database.unit_of_work() as session:
                add_event(
                    session, source="auth", subject="u", payload=registered("u"), deliver_after=deliver_after
                )
    assert await outbox_rows(database) == []


async def test_a_due_time_already_past_is_due_at_once(database: Database) -> None:
    past = await commit_delayed(database, "past", utc_now() - timedelta(minutes=5))
    [row] = await outbox_rows(database)
    assert row.deliver_after is None
    dispatcher = RecordingDispatcher()
    assert await OutboxRelay(database, dispatcher).relay_once() == 1
    assert dispatcher.delivered == [past]


async def test_outbox_lag_counts_delayed_events_only_from_their_due_time(database: Database) -> None:
    await commit_delayed(database, "future", utc_now() + timedelta(hours=1))
    assert await outbox_lag_seconds(database) == 0.0

    await commit_delayed(database, "due", utc_now() + timedelta(hours=1))
    async with database.unit_of_work() as session:
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.subject == "due")
            .values(
                occurred_at=utc_now() - timedelta(hours=2), deliver_after=utc_now() - timedelta(seconds=30)
            )
        )
    lag = await outbox_lag_seconds(database)
    assert 30 <= lag < 40  # from its due time, not from when it was written two hours ago

    await relay_until_idle(OutboxRelay(database, RecordingDispatcher()))
    assert await outbox_lag_seconds(database) == 0.0
    assert [row.relayed_at is None for row in await outbox_rows(database)] == [True, False]


class TimedDispatcher(RecordingDispatcher):
    """Also notes when each batch arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[datetime] = []

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None:
        self.arrivals.append(utc_now())
        await super().dispatch(events)


async def test_run_wakes_for_the_nearest_due_time(database: Database) -> None:
    dispatcher = TimedDispatcher()
    # The idle poll is far longer than the bound: only the wake-up at the due time can deliver in time.
    relay = OutboxRelay(database, dispatcher, idle_poll_s=600)
    async with running(relay):
        due_at = utc_now() + timedelta(seconds=0.3)
        delayed = await commit_delayed(database, "soon", due_at)
        await eventually(lambda: dispatcher.delivered == [delayed], what="the delayed event relayed")
    assert due_at <= dispatcher.arrivals[0] < due_at + timedelta(seconds=1)


async def test_the_revision_downgrades_and_upgrades_with_the_data(database_url: str) -> None:
    await upgrade_async(database_url)
    db = Database(database_url)
    try:
        kept = await commit_events(db, ["a"])
        config = alembic_config(database_url)
        await asyncio.to_thread(command.downgrade, config, "046ef069fa2b")
        async with db.unit_of_work(read_only=True) as session:
            payloads = (await session.execute(text("SELECT payload FROM outbox_events"))).scalars().all()
        assert [events_pb2.Event.FromString(payload).id for payload in payloads] == kept
        await upgrade_async(database_url)
        await db.dispose()  # the schema changed under the pool's cached statements
        dispatcher = RecordingDispatcher()
        assert await relay_until_idle(OutboxRelay(db, dispatcher)) == 1
        assert dispatcher.delivered == kept
    finally:
        await db.dispose()


async def test_pruning_deletes_only_events_relayed_before_the_cutoff(database: Database) -> None:
    old_relayed = await commit_events(database, [f"old-{index}" for index in range(5)])
    old_unrelayed, recent_relayed = await commit_events(database, ["waiting", "recent"])
    now = utc_now()
    async with database.unit_of_work() as session:
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.event_id.in_(old_relayed))
            .values(relayed_at=now - timedelta(days=10))
        )
        await session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.event_id == old_unrelayed)
            .values(occurred_at=now - timedelta(days=30))
        )
        await session.execute(
            update(OutboxEvent).where(OutboxEvent.event_id == recent_relayed).values(relayed_at=now)
        )

    # Batches smaller than the work: every batch is its own short transaction.
    assert await prune_relayed(database, older_than=now - timedelta(days=7), batch_size=2) == 5
    assert [row.event_id for row in await outbox_rows(database)] == [old_unrelayed, recent_relayed]
    assert await prune_relayed(database, older_than=now - timedelta(days=7)) == 0
    with pytest.raises(ValueError, match="naive"):
        await prune_relayed(database, older_than=datetime(2026, 1, 1))
