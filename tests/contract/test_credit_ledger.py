"""The credit ledger and subscriptions on each SQL adapter (SQLite and PostgreSQL).

Hard budgets: reservations never take more than a hard-stop balance holds, however many arrive at
once; settlement, release and expiry give back exactly what was held; the cached balance always
equals the sums the append-only ledger derives; every change writes its event in the same
transaction; and periods roll over from the outbox's delayed event or from the first call after.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.billing.ledger import CreditAccount, CreditLedger, Estimate, Usage
from services.billing.plans import PlanCatalog
from services.billing.ports import BillingUnitOfWork
from services.billing.repository import billing_units_of_work, credit_fast_path
from services.billing.subscriptions import SubscriptionManager, add_months, period_containing
from services.common.db import Database
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.model_catalog import load_model_catalog
from services.common.models import new_id
from services.common.outbox import OutboxEvent
from services.common.sql_unit_of_work import SqlUnitsOfWork
from tests.support.domain import START, Clock, outbox, payloads, refusal

FREE_ALLOWANCE = 100_000
TTL = timedelta(minutes=15)


@dataclass
class Billing:
    database: Database
    clock: Clock
    units: SqlUnitsOfWork[BillingUnitOfWork]
    subscriptions: SubscriptionManager
    ledger: CreditLedger

    async def consistent(self, user_id: str) -> CreditAccount:
        """The balance, checked to equal what the ledger derives."""
        cached, derived = await self.ledger.derived_sums(user_id)
        assert cached == derived
        return await self.ledger.balance(user_id)


@pytest.fixture(params=["fast path", "units of work only"])
def billing(database: Database, request: pytest.FixtureRequest) -> Billing:
    """The ledger as served (its fast path first) and without the fast path, which is what it falls
    back to: every guarantee holds either way."""
    clock = Clock()
    units = billing_units_of_work(database)
    subscriptions = SubscriptionManager(units, PlanCatalog(units), clock=clock)
    fast_path = credit_fast_path(database) if request.param == "fast path" else None
    ledger = CreditLedger(
        units, subscriptions, load_model_catalog(), reservation_ttl=TTL, clock=clock, fast_path=fast_path
    )
    return Billing(database, clock, units, subscriptions, ledger)


def estimate(tokens: int, *, model: str = "gpt-4o-mini") -> Estimate:
    return Estimate(model=model, input_tokens=tokens // 2, max_output_tokens=tokens - tokens // 2)


def usage(input_tokens: int, output_tokens: int, *, model: str = "gpt-4o-mini") -> Usage:
    return Usage(model=model, provider="openai", input_tokens=input_tokens, output_tokens=output_tokens)


async def test_a_first_reservation_starts_the_free_plan_and_holds_credit(billing: Billing) -> None:
    user = new_id()
    reservation, account = await billing.ledger.reserve("req-1", user, estimate(1_000))

    assert reservation.status == "held"
    assert reservation.reserved_tokens == 1_000
    assert reservation.expire_time == START + TTL
    assert (account.plan_id, account.hard_stop) == ("free", True)
    assert (account.included_tokens, account.reserved_tokens, account.used_tokens) == (
        FREE_ALLOWANCE,
        1_000,
        0,
    )
    assert account.remaining_tokens == FREE_ALLOWANCE - 1_000
    assert (account.period_start, account.period_end) == (START, add_months(START, 1))
    assert await billing.consistent(user) == account

    subscription, plan = await billing.subscriptions.current(user)
    assert (subscription.plan_id, subscription.status, plan.id) == ("free", "active", "free")
    changes = await payloads(billing.database, "subscription.changed", events_pb2.SubscriptionChanged)
    assert [(change.user_id, change.kind) for change in changes] == [
        (user, events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED)
    ]
    grants = await payloads(billing.database, "credits.granted", events_pb2.CreditsGranted)
    assert [(grant.tokens, grant.reason) for grant in grants] == [
        (FREE_ALLOWANCE, events_pb2.CREDIT_GRANT_REASON_PERIOD_ALLOWANCE)
    ]
    reserved = await payloads(billing.database, "credits.reserved", events_pb2.CreditsReserved)
    assert [(event.reservation_id, event.tokens) for event in reserved] == [(reservation.id, 1_000)]


async def test_the_period_end_is_a_delayed_event_at_the_end_of_the_period(billing: Billing) -> None:
    user = new_id()
    await billing.ledger.balance(user)
    timers = [item for item in await outbox(billing.database) if item.type == "subscription.period_ended"]
    assert len(timers) == 1
    payload = timers[0].payload
    assert isinstance(payload, events_pb2.SubscriptionPeriodEnded)
    assert payload.period_end_time.ToDatetime().replace(tzinfo=START.tzinfo) == add_months(START, 1)
    async with billing.database.unit_of_work(read_only=True) as session:
        deliver_after = (
            await session.scalars(
                select(OutboxEvent.deliver_after).where(OutboxEvent.event_type == "subscription.period_ended")
            )
        ).one()
    assert deliver_after == add_months(START, 1)


async def test_settling_charges_the_usage_and_releases_the_rest_of_the_hold(billing: Billing) -> None:
    user = new_id()
    reservation, _ = await billing.ledger.reserve("req-1", user, estimate(2_000))
    settlement = await billing.ledger.settle(reservation.id, "req-1", usage(300, 900))

    assert settlement.reservation.status == "settled"
    assert settlement.reservation.settled_tokens == 1_200
    assert (settlement.account.used_tokens, settlement.account.reserved_tokens) == (1_200, 0)
    assert settlement.account.remaining_tokens == FREE_ALLOWANCE - 1_200
    # gpt-4o-mini: 0.015 cents per 1k input, 0.06 per 1k output: 0.0045 + 0.054 cents, rounded once.
    assert settlement.cost.amount_minor == 0
    assert await billing.consistent(user) == settlement.account

    recorded = await payloads(billing.database, "usage.recorded", events_pb2.UsageRecorded)
    assert [(event.input_tokens, event.output_tokens, event.overage_tokens) for event in recorded] == [
        (300, 900, 0)
    ]
    settled = await payloads(billing.database, "credits.settled", events_pb2.CreditsSettled)
    assert [(event.reserved_tokens, event.settled_tokens) for event in settled] == [(2_000, 1_200)]

    usage_now = await billing.ledger.usage(user)
    assert [
        (model.usage.model, model.usage.requests, model.usage.output_tokens) for model in usage_now.models
    ] == [("gpt-4o-mini", 1, 900)]
    assert usage_now.overage_cost.amount_minor == 0


async def test_model_cost_is_rounded_once_per_settlement(billing: Billing) -> None:
    user = new_id()
    reservation, _ = await billing.ledger.reserve("req-1", user, estimate(60_000))
    settlement = await billing.ledger.settle(reservation.id, "req-1", usage(10_000, 50_000))
    # 10 x 0.015 + 50 x 0.06 = 3.15 cents -> 3.
    assert settlement.cost.amount_minor == 3


async def test_every_call_is_idempotent_on_its_ids(billing: Billing) -> None:
    user = new_id()
    first, _ = await billing.ledger.reserve("req-1", user, estimate(1_000))
    again, account = await billing.ledger.reserve("req-1", user, estimate(1_000))
    assert again == first
    assert account.reserved_tokens == 1_000

    reused = await refusal(billing.ledger.reserve("req-1", user, estimate(5_000)), AlreadyExists)
    assert reused.reason == "REQUEST_ID_REUSED"

    settled = await billing.ledger.settle(first.id, "req-1", usage(100, 100))
    repeated = await billing.ledger.settle(first.id, "req-1", usage(100, 100))
    assert repeated.reservation == settled.reservation
    assert repeated.account.used_tokens == 200

    other_usage = await refusal(billing.ledger.settle(first.id, "req-1", usage(100, 101)), FailedPrecondition)
    assert other_usage.reason == "RESERVATION_CLOSED"
    after_settle = await refusal(billing.ledger.release(first.id, "req-1"), FailedPrecondition)
    assert after_settle.reason == "RESERVATION_CLOSED"

    second, _ = await billing.ledger.reserve("req-2", user, estimate(1_000))
    released, account = await billing.ledger.release(second.id, "req-2")
    assert (await billing.ledger.release(second.id, "req-2"))[0] == released
    assert account.reserved_tokens == 0
    assert (await billing.consistent(user)).used_tokens == 200


async def test_an_unknown_reservation_and_a_mismatched_request_id_get_the_same_not_found(
    billing: Billing,
) -> None:
    user = new_id()
    reservation, _ = await billing.ledger.reserve("req-1", user, estimate(1_000))
    unknown = await refusal(billing.ledger.settle(new_id(), "req-1", usage(1, 1)), NotFound)
    mismatched = await refusal(billing.ledger.settle(reservation.id, "req-2", usage(1, 1)), NotFound)
    assert unknown.reason == mismatched.reason == "RESERVATION_NOT_FOUND"
    assert unknown.message == mismatched.message


async def test_bad_estimates_and_usage_are_invalid_arguments(billing: Billing) -> None:
    user = new_id()
    unknown_model = await refusal(
        billing.ledger.reserve("r", user, estimate(10, model="no-such")), InvalidArgument
    )
    assert unknown_model.reason == "MODEL_NOT_FOUND"
    for bad in (Estimate("gpt-4o-mini", -1, 10), Estimate("gpt-4o-mini", 0, 0)):
        refused = await refusal(billing.ledger.reserve("r", user, bad), InvalidArgument)
        assert refused.reason == "INVALID_ARGUMENT"
    reservation, _ = await billing.ledger.reserve("r", user, estimate(10))
    negative = await refusal(billing.ledger.settle(reservation.id, "r", usage(-1, 5)), InvalidArgument)
    assert negative.reason == "INVALID_ARGUMENT"
    assert (await billing.consistent(user)).reserved_tokens == 10


async def test_a_hard_stop_refuses_what_the_balance_does_not_cover(billing: Billing) -> None:
    user = new_id()
    await billing.ledger.reserve("req-1", user, estimate(FREE_ALLOWANCE - 500))
    refused = await refusal(billing.ledger.reserve("req-2", user, estimate(501)), ResourceExhausted)
    assert refused.reason == "INSUFFICIENT_CREDITS"
    [violation] = refused.quota_violations
    assert violation.subject == f"user:{user}"
    assert "500 tokens remaining" in violation.description
    # Exactly what remains still fits.
    await billing.ledger.reserve("req-3", user, estimate(500))
    assert (await billing.consistent(user)).remaining_tokens == 0


async def test_a_refused_first_reservation_keeps_the_new_subscription(billing: Billing) -> None:
    user = new_id()
    await refusal(billing.ledger.reserve("req-1", user, estimate(FREE_ALLOWANCE + 1)), ResourceExhausted)
    subscription, _ = await billing.subscriptions.current(user)
    assert subscription.plan_id == "free"
    assert len(await payloads(billing.database, "subscription.changed", events_pb2.SubscriptionChanged)) == 1


async def test_a_hundred_parallel_reservations_against_a_balance_for_one_admit_exactly_one(
    billing: Billing,
) -> None:
    user = new_id()
    await billing.ledger.balance(user)
    per_request = FREE_ALLOWANCE // 2 + 1

    async def attempt(index: int) -> bool:
        try:
            await billing.ledger.reserve(f"req-{index}", user, estimate(per_request))
        except ResourceExhausted:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt(index) for index in range(100)))
    assert outcomes.count(True) == 1
    account = await billing.consistent(user)
    assert account.reserved_tokens == per_request
    assert account.remaining_tokens >= 0
    assert len(await payloads(billing.database, "credits.reserved", events_pb2.CreditsReserved)) == 1


async def test_parallel_retries_of_one_request_make_one_reservation(billing: Billing) -> None:
    user = new_id()
    await billing.ledger.balance(user)
    results = await asyncio.gather(
        *(billing.ledger.reserve("same", user, estimate(1_000)) for _ in range(20))
    )
    assert len({reservation.id for reservation, _ in results}) == 1
    assert (await billing.consistent(user)).reserved_tokens == 1_000


async def test_a_settlement_beyond_its_estimate_goes_negative_by_that_much_and_no_further(
    billing: Billing,
) -> None:
    user = new_id()
    reservation, _ = await billing.ledger.reserve("req-1", user, estimate(FREE_ALLOWANCE))
    settlement = await billing.ledger.settle(reservation.id, "req-1", usage(FREE_ALLOWANCE, 700))
    # The documented bound: below zero by what the settlement used beyond its reservation.
    assert settlement.account.remaining_tokens == -700
    refused = await refusal(billing.ledger.reserve("req-2", user, estimate(1)), ResourceExhausted)
    assert refused.reason == "INSUFFICIENT_CREDITS"
    assert (await billing.consistent(user)).remaining_tokens == -700


async def test_the_sweeper_releases_reservations_that_expired_unsettled(billing: Billing) -> None:
    user = new_id()
    reservation, _ = await billing.ledger.reserve("req-1", user, estimate(5_000))
    assert await billing.ledger.release_expired() == 0

    billing.clock.advance(TTL + timedelta(seconds=1))
    assert await billing.ledger.release_expired() == 1
    assert await billing.ledger.release_expired() == 0
    account = await billing.consistent(user)
    assert (account.reserved_tokens, account.used_tokens) == (0, 0)
    released = await payloads(billing.database, "credits.released", events_pb2.CreditsReleased)
    assert [(event.reservation_id, event.reason) for event in released] == [
        (reservation.id, events_pb2.CREDIT_RELEASE_REASON_EXPIRED)
    ]
    late = await refusal(billing.ledger.settle(reservation.id, "req-1", usage(1, 1)), FailedPrecondition)
    assert late.reason == "RESERVATION_EXPIRED"


async def test_usage_thresholds_are_announced_once_per_period(billing: Billing) -> None:
    user = new_id()
    for index, tokens in enumerate((79_000, 1_000, 5_000, 15_000)):
        reservation, _ = await billing.ledger.reserve(f"req-{index}", user, estimate(tokens))
        await billing.ledger.settle(reservation.id, f"req-{index}", usage(tokens // 2, tokens - tokens // 2))
    crossed = await payloads(billing.database, "usage.threshold_crossed", events_pb2.UsageThresholdCrossed)
    assert [(event.threshold_percent, event.used_tokens) for event in crossed] == [
        (80, 80_000),
        (100, 100_000),
    ]


async def test_a_period_rolls_over_with_a_fresh_allowance_and_the_holds_carried(billing: Billing) -> None:
    user = new_id()
    spent, _ = await billing.ledger.reserve("req-1", user, estimate(30_000))
    await billing.ledger.settle(spent.id, "req-1", usage(10_000, 20_000))
    held, _ = await billing.ledger.reserve("req-2", user, estimate(4_000))

    billing.clock.advance(timedelta(days=40))
    account = await billing.consistent(user)
    assert (account.period_start, account.period_end) == (add_months(START, 1), add_months(START, 2))
    assert (account.included_tokens, account.used_tokens, account.reserved_tokens) == (
        FREE_ALLOWANCE,
        0,
        4_000,
    )

    # The held reservation settles into the new period.
    await billing.ledger.settle(held.id, "req-2", usage(1_000, 1_000))
    assert (await billing.consistent(user)).used_tokens == 2_000
    renewals = [
        change.kind
        for change in await payloads(billing.database, "subscription.changed", events_pb2.SubscriptionChanged)
    ]
    assert renewals == [
        events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED,
        events_pb2.SUBSCRIPTION_CHANGE_KIND_RENEWED,
    ]


async def test_consuming_the_period_end_rolls_over_once(billing: Billing) -> None:
    user = new_id()
    await billing.ledger.balance(user)
    billing.clock.advance(timedelta(days=31))
    async with billing.units.write() as uow:
        await billing.subscriptions.roll_over_if_due(uow, user)
    async with billing.units.write() as uow:
        await billing.subscriptions.roll_over_if_due(uow, user)
    subscription, _ = await billing.subscriptions.current(user)
    assert subscription.current_period_start == add_months(START, 1)
    grants = await payloads(billing.database, "credits.granted", events_pb2.CreditsGranted)
    assert len(grants) == 2


def test_periods_are_calendar_months_clamped_to_the_month_length() -> None:
    anchor = START.replace(month=1, day=31)
    assert add_months(anchor, 1).day == 28  # 2031 is not a leap year
    assert add_months(anchor, 2).day == 31
    assert period_containing(anchor, anchor) == (anchor, add_months(anchor, 1))
    inside_march = anchor.replace(month=3, day=5)
    assert period_containing(anchor, inside_march) == (add_months(anchor, 1), add_months(anchor, 2))
    assert period_containing(anchor, add_months(anchor, 14)) == (
        add_months(anchor, 14),
        add_months(anchor, 15),
    )


async def test_many_first_calls_at_once_do_not_exhaust_the_connection_pool(billing: Billing) -> None:
    # Each first call starts a subscription inside a unit of work; a plan read that took a second
    # pooled connection there made concurrent first calls wait on each other until the pool timed out.
    users = [new_id() for _ in range(64)]
    balances = await asyncio.gather(*(billing.ledger.balance(user) for user in users))
    assert {balance.plan_id for balance in balances} == {"free"}
    settled = await asyncio.gather(
        *(billing.ledger.reserve(f"first-{index}", new_id(), estimate(10)) for index in range(64))
    )
    assert len(settled) == 64
