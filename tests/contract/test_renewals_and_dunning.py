"""Renewal invoices, collection from the saved card, and dunning, on each SQL adapter.

The consumer is the real one (`Consumer` with an `InProcessSource`), fed the events billing wrote
to its own outbox, so the timers (`invoice.payment_due` with `deliver_after`) are the ones production
relays; the sandbox's cards decide each charge.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from parley.events.v1 import events_pb2
from services.billing.ledger import Estimate, Usage
from services.billing.payments import FAILS_LATER, SUCCEEDS
from services.common.db import Database
from tests.support.billing_world import World, billing_world
from tests.support.domain import payloads


@pytest.fixture
def world(database: Database) -> World:
    return billing_world(database)


async def test_a_renewal_invoices_the_fee_and_the_overage_and_is_collected(world: World) -> None:
    user = await world.register("renew@example.com")
    await world.subscribe(user, "pro", SUCCEEDS)
    # Use 2,000,000 included tokens and 123,456 beyond them (pro bills overage at 1 cent per 1k).
    held, _ = await world.ledger.reserve("big", user, Estimate("gpt-4o-mini", 1_000_000, 1_200_000))
    await world.ledger.settle(held.id, "big", Usage("gpt-4o-mini", "openai", 1_000_000, 1_123_456))
    balance = await world.ledger.balance(user)
    overage = balance.overage_tokens
    assert overage > 0

    world.clock.advance(timedelta(days=32))
    await world.run_due_timers()
    invoices = (await world.invoices.list_invoices(user, page_size=0, page_token="", status=None)).items
    renewal = next(invoice for invoice in invoices if invoice.reason == "period_end")
    assert [(line.kind, line.amount_minor) for line in renewal.lines] == [
        ("subscription", 2_000),
        ("overage", -(-overage * 1 // 1000)),
    ]
    assert renewal.status == "paid"
    succeeded = await payloads(world.database, "payment.succeeded", events_pb2.PaymentSucceeded)
    assert renewal.id in [event.invoice_id for event in succeeded]
    mails = await payloads(world.database, "email.requested", events_pb2.EmailRequested)
    assert ("invoice_receipt", "renew@example.com") in [(mail.template, mail.recipient) for mail in mails]
    subscription, _ = await world.subscriptions.current(user)
    assert (subscription.plan_id, subscription.status) == ("pro", "active")


async def test_dunning_retries_three_times_then_moves_the_user_to_free(world: World) -> None:
    user = await world.register("dunning@example.com")
    await world.subscribe(user, "pro", FAILS_LATER)
    world.clock.advance(timedelta(days=32))
    await world.run_due_timers()
    due_at = world.clock()

    failures = await payloads(world.database, "payment.failed", events_pb2.PaymentFailed)
    assert [(event.attempt, event.next_retry_time.ToDatetime().date()) for event in failures] == [
        (1, (due_at + timedelta(days=3)).date())
    ]
    subscription, _ = await world.subscriptions.current(user)
    assert (subscription.plan_id, subscription.status) == ("pro", "past_due")

    for days, attempts in ((3, 2), (5, 3)):
        world.clock.now = due_at + timedelta(days=days, minutes=1)
        await world.run_due_timers()
        assert len(await payloads(world.database, "payment.failed", events_pb2.PaymentFailed)) == attempts
    # Not yet due: nothing happens before day 7.
    world.clock.now = due_at + timedelta(days=6)
    await world.run_due_timers()
    assert len(await payloads(world.database, "payment.failed", events_pb2.PaymentFailed)) == 3

    world.clock.now = due_at + timedelta(days=7, minutes=1)
    await world.run_due_timers()
    failures = await payloads(world.database, "payment.failed", events_pb2.PaymentFailed)
    assert [event.attempt for event in failures] == [1, 2, 3, 4]
    assert not failures[-1].HasField("next_retry_time")
    [uncollectible] = await payloads(world.database, "invoice.uncollectible", events_pb2.InvoiceUncollectible)
    renewal = await world.invoices.get_invoice(user, uncollectible.invoice_id)
    assert renewal.status == "uncollectible"
    subscription, plan = await world.subscriptions.current(user)
    assert (subscription.plan_id, subscription.status, plan.hard_stop) == ("free", "active", True)
    assert (await world.ledger.balance(user)).plan_id == "free"
    mails = await payloads(world.database, "email.requested", events_pb2.EmailRequested)
    payment_mails = [mail for mail in mails if mail.template == "payment_failed"]
    assert len(payment_mails) == 4
    assert "next_retry_time" not in payment_mails[-1].params
    kinds = [
        change.kind
        for change in await payloads(world.database, "subscription.changed", events_pb2.SubscriptionChanged)
    ]
    assert events_pb2.SUBSCRIPTION_CHANGE_KIND_PAST_DUE in kinds
    assert kinds[-2:] == [
        events_pb2.SUBSCRIPTION_CHANGE_KIND_CANCELLED,
        events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED,
    ]


async def test_a_redelivered_collection_attempt_charges_and_records_once(world: World) -> None:
    user = await world.register("twice@example.com")
    await world.subscribe(user, "pro", SUCCEEDS)
    world.clock.advance(timedelta(days=32))
    await world.run_due_timers()
    due = [event for event, _ in await world.timers() if event.type == "invoice.payment_due"]
    await world.deliver(due[0])  # the same event id again: already processed
    assert (
        len(await payloads(world.database, "payment.succeeded", events_pb2.PaymentSucceeded)) == 2
    )  # checkout + renewal


async def test_the_usage_alert_mail_goes_to_the_registered_address(world: World) -> None:
    user = await world.register("alert@example.com")
    held, _ = await world.ledger.reserve("r", user, Estimate("gpt-4o-mini", 40_000, 41_000))
    await world.ledger.settle(held.id, "r", Usage("gpt-4o-mini", "openai", 40_000, 41_000))
    mails = await payloads(world.database, "email.requested", events_pb2.EmailRequested)
    [alert] = [mail for mail in mails if mail.template == "quota_80"]
    assert (alert.recipient, alert.params["used_tokens"], alert.params["included_tokens"]) == (
        "alert@example.com",
        "81000",
        "100000",
    )
