"""Contract of auth following billing's subscription: `subscription.changed` consumed as the group
`auth` (the production consumer of `runtime.workers`, its records in the database) puts the user on
the event's plan, once per event, never back to an older change, and every cached copy of the user
hears of it. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from parley.billing.v1 import billing_pb2
from parley.events.v1 import events_pb2
from runtime.workers import subscription_consumer
from services.auth.accounts import AccountService, User
from services.auth.api_keys import ApiKeyManager
from services.auth.event_handlers import AUTH_CONSUMER, auth_subscription
from services.auth.models import UserRecord
from services.auth.passwords import PasswordHasher, PasswordPolicy
from services.auth.ports import AuthUnitOfWork
from services.auth.repository import auth_units_of_work
from services.auth.sessions import SessionManager
from services.common.cache import InMemoryReadCache, read_cache_invalidation
from services.common.consumers import Consumer, InProcessSource
from services.common.db import Database
from services.common.encoding import timestamp_to_proto
from services.common.processed_events import ProcessedEvent
from services.common.revocation import InMemoryRevocationList
from services.common.sql_unit_of_work import SqlUnitsOfWork
from services.common.streams import stream_key
from tests.support.auth_accounts import ACCESS_TTL, CHEAP_ARGON2, STRONG_PASSWORD, fast_settings
from tests.support.domain import START, Clock

EFFECTIVE = START - timedelta(days=1)


class Heard:
    """A listener of credential changes (as the edges' caches are) that records whom it was told of."""

    def __init__(self) -> None:
        self.users: list[str] = []

    def forget_user(self, user_id: str) -> int:
        self.users.append(user_id)
        return 0

    def forget_everything(self) -> int:
        return 0


@dataclass
class World:
    database: Database
    units: SqlUnitsOfWork[AuthUnitOfWork]
    clock: Clock
    accounts: AccountService
    revocations: InMemoryRevocationList
    heard: Heard
    source: InProcessSource
    consumer: Consumer

    async def register(self, email: str = "ada@example.com") -> User:
        return await self.accounts.register(email, STRONG_PASSWORD, "Ada")

    async def deliver(self, *events: events_pb2.Event) -> int:
        """Publish the events and let the consumer settle them; how many it settled."""
        for event in events:
            self.source.publish(event)
        return await self.consumer.poll_once(block_s=0)


@pytest.fixture
def world(database: Database) -> World:
    clock = Clock()
    units = auth_units_of_work(database)
    cache = InMemoryReadCache()
    units.after_commit(read_cache_invalidation(cache))
    revocations = InMemoryRevocationList(clock=clock)
    heard = Heard()
    revocations.credential_changes().subscribe(heard)
    sessions = SessionManager(units, revocations, access_ttl=ACCESS_TTL, clock=clock)
    accounts = AccountService(
        units,
        hasher=PasswordHasher(CHEAP_ARGON2),
        policy=PasswordPolicy(),
        sessions=sessions,
        settings=fast_settings(),
        clock=clock,
        read_cache=cache,
    )
    source = InProcessSource(stream=stream_key("billing"), group=AUTH_CONSUMER)
    consumer = subscription_consumer(
        auth_subscription(units, accounts), source, database=database, member="m1"
    )
    return World(database, units, clock, accounts, revocations, heard, source, consumer)


def subscription_changed(
    user_id: str,
    plan_id: str,
    effective_time: datetime | None = EFFECTIVE,
    *,
    kind: events_pb2.SubscriptionChangeKind.ValueType = events_pb2.SUBSCRIPTION_CHANGE_KIND_UPGRADED,
    status: billing_pb2.SubscriptionStatus.ValueType = billing_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    recorded_at: datetime = START,
    event_id: str | None = None,
) -> events_pb2.Event:
    """The event as billing writes it (its id, envelope and the payload fields auth reads);
    `recorded_at` is the envelope's time, when billing recorded the change."""
    change = events_pb2.SubscriptionChanged(
        subscription_id=str(uuid.uuid4()), user_id=user_id, kind=kind, plan_id=plan_id, status=status
    )
    if effective_time is not None:
        change.effective_time.CopyFrom(timestamp_to_proto(effective_time))
    return events_pb2.Event(
        id=event_id or str(uuid.uuid4()),
        type="subscription.changed",
        source="billing",
        subject=user_id,
        time=timestamp_to_proto(recorded_at),
        subscription_changed=change,
    )


async def stored(database: Database, user_id: str) -> UserRecord:
    async with database.unit_of_work(read_only=True) as session:
        record = await session.get(UserRecord, user_id)
    assert record is not None
    return record


async def processed_ids(database: Database) -> Sequence[str]:
    async with database.unit_of_work(read_only=True) as session:
        return list(
            await session.scalars(
                select(ProcessedEvent.event_id)
                .where(ProcessedEvent.consumer == AUTH_CONSUMER)
                .order_by(ProcessedEvent.event_id)
            )
        )


async def set_plan_behind_the_services(database: Database, user_id: str, plan_id: str) -> None:
    async with database.unit_of_work() as session:
        await session.execute(update(UserRecord).where(UserRecord.id == user_id).values(plan_id=plan_id))


async def test_a_subscription_change_puts_the_user_on_its_plan(world: World) -> None:
    user = await world.register()
    assert (user.plan_id, user.plan_changed_at) == ("free", None)
    world.clock.advance(timedelta(minutes=5))
    event = subscription_changed(user.id, "pro")

    assert await world.deliver(event) == 1

    record = await stored(world.database, user.id)
    assert (record.plan_id, record.plan_changed_at) == ("pro", EFFECTIVE)
    assert record.updated_at == world.clock.now
    assert await processed_ids(world.database) == [event.id]
    assert await world.source.pending_count() == 0
    # The edges' caches of the user's credential decisions are told; no token is refused.
    assert world.heard.users == [user.id]
    assert await world.revocations.user_cutoff(user.id) is None


async def test_a_redelivered_event_changes_nothing_and_is_recorded_once(world: World) -> None:
    user = await world.register()
    event = subscription_changed(user.id, "pro")
    assert await world.deliver(event) == 1
    # Behind the services' back: handling the event again would put the user back on pro.
    await set_plan_behind_the_services(world.database, user.id, "team")
    before = await stored(world.database, user.id)
    world.clock.advance(timedelta(minutes=5))

    again = subscription_changed(user.id, "pro", event_id=event.id)
    assert await world.deliver(again) == 1

    after = await stored(world.database, user.id)
    assert (after.plan_id, after.plan_changed_at, after.updated_at) == ("team", EFFECTIVE, before.updated_at)
    assert await processed_ids(world.database) == [event.id]
    assert world.heard.users == [user.id]


async def test_an_older_change_arriving_after_a_newer_one_is_ignored(world: World) -> None:
    user = await world.register()
    newer = subscription_changed(user.id, "team", EFFECTIVE)
    older = subscription_changed(user.id, "pro", EFFECTIVE - timedelta(seconds=1))

    assert await world.deliver(newer) == 1
    assert await world.deliver(older) == 1

    record = await stored(world.database, user.id)
    assert (record.plan_id, record.plan_changed_at) == ("team", EFFECTIVE)
    # Handled, so recorded: a redelivery of the older one is skipped without looking again.
    assert sorted(await processed_ids(world.database)) == sorted([newer.id, older.id])
    assert world.heard.users == [user.id]

    # A change at the same moment, recorded at the same moment, is not older: it applies.
    same_moment = subscription_changed(user.id, "pro", EFFECTIVE)
    assert await world.deliver(same_moment) == 1
    assert (await stored(world.database, user.id)).plan_id == "pro"


async def test_changes_effective_at_one_moment_are_ordered_by_when_billing_recorded_them(
    world: World,
) -> None:
    """Billing records a period's roll-over and an upgrade paid right after it in one transaction,
    both effective at its `now`; the upgrade, recorded second, is the plan in effect."""
    user = await world.register()
    renewed = subscription_changed(
        user.id, "free", EFFECTIVE, kind=events_pb2.SUBSCRIPTION_CHANGE_KIND_RENEWED, recorded_at=START
    )
    upgraded = subscription_changed(user.id, "pro", EFFECTIVE, recorded_at=START + timedelta(microseconds=40))

    # The roll-over's handling failed and is retried after the upgrade went through.
    assert await world.deliver(upgraded) == 1
    assert await world.deliver(renewed) == 1

    record = await stored(world.database, user.id)
    assert (record.plan_id, record.plan_changed_at, record.plan_change_recorded_at) == (
        "pro",
        EFFECTIVE,
        START + timedelta(microseconds=40),
    )


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "reordered"])
async def test_an_ended_subscription_does_not_move_the_user_its_free_successor_does(
    world: World, in_order: bool
) -> None:
    """A subscription cancelled at its period end: billing records it ended (naming the plan that
    ended) and a new one on free, in one transaction at one moment. The ended one is never applied,
    so the order holds even when both were recorded within one clock tick."""
    user = await world.register()
    assert await world.deliver(subscription_changed(user.id, "pro", EFFECTIVE - timedelta(days=30))) == 1
    ended = subscription_changed(
        user.id,
        "pro",
        EFFECTIVE,
        kind=events_pb2.SUBSCRIPTION_CHANGE_KIND_CANCELLED,
        status=billing_pb2.SUBSCRIPTION_STATUS_CANCELLED,
        recorded_at=START,
    )
    successor = subscription_changed(
        user.id,
        "free",
        EFFECTIVE,
        kind=events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED,
        recorded_at=START,
    )

    for event in (ended, successor) if in_order else (successor, ended):
        assert await world.deliver(event) == 1

    assert (await stored(world.database, user.id)).plan_id == "free"
    assert {ended.id, successor.id} <= set(await processed_ids(world.database))


async def test_a_renewal_on_the_same_plan_moves_the_time_and_announces_nothing(world: World) -> None:
    user = await world.register()
    renewal_time = EFFECTIVE + timedelta(days=30)
    renewed = subscription_changed(
        user.id, "free", renewal_time, kind=events_pb2.SUBSCRIPTION_CHANGE_KIND_RENEWED
    )
    assert await world.deliver(renewed) == 1
    assert (await stored(world.database, user.id)).plan_changed_at == renewal_time
    assert world.heard.users == []

    # So an upgrade from before the renewal, arriving late, cannot take the user off free.
    late = subscription_changed(user.id, "pro", EFFECTIVE)
    assert await world.deliver(late) == 1
    assert (await stored(world.database, user.id)).plan_id == "free"


async def test_the_cached_user_and_api_key_checks_follow_the_plan(world: World) -> None:
    keys = ApiKeyManager(world.units, changes=InMemoryRevocationList(clock=world.clock), clock=world.clock)
    world.units.after_commit(keys.invalidate)
    user = await world.register()
    created = await keys.create(user.id, name="ci")
    assert (await world.accounts.get_user(user.id)).plan_id == "free"
    assert (await keys.check(created.plaintext)).plan_id == "free"
    # Both are cached now: a change no service knows about is not seen.
    await set_plan_behind_the_services(world.database, user.id, "team")
    assert (await world.accounts.get_user(user.id)).plan_id == "free"
    assert (await keys.check(created.plaintext)).plan_id == "free"

    assert await world.deliver(subscription_changed(user.id, "pro")) == 1

    current = await world.accounts.get_user(user.id)
    assert (current.plan_id, current.plan_changed_at) == ("pro", EFFECTIVE)
    assert (await keys.check(created.plaintext)).plan_id == "pro"


async def test_an_unknown_user_is_recorded_and_nothing_changes(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    user = await world.register()
    caplog.set_level("INFO", logger="services.auth.accounts")
    event = subscription_changed("no-such-user", "pro")

    assert await world.deliver(event) == 1

    assert await processed_ids(world.database) == [event.id]
    assert (await stored(world.database, user.id)).plan_id == "free"
    assert world.heard.users == []
    assert any("no-such-user" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("plan_id", ["", "p" * 33])
async def test_an_event_without_a_usable_plan_is_dead_lettered_at_once(world: World, plan_id: str) -> None:
    user = await world.register()
    event = subscription_changed(user.id, plan_id)

    assert await world.deliver(event) == 1

    [dead] = await world.source.dead_letters()
    assert (dead.event_id, dead.attempts) == (event.id, 1)
    assert "UnusableEventError" in dead.error
    assert await processed_ids(world.database) == []
    assert (await stored(world.database, user.id)).plan_id == "free"


async def test_without_an_effective_time_the_events_commit_time_counts(world: World) -> None:
    user = await world.register()
    assert await world.deliver(subscription_changed(user.id, "pro", None)) == 1
    record = await stored(world.database, user.id)
    assert (record.plan_id, record.plan_changed_at) == ("pro", START)
