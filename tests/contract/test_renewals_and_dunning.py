"""Renewal invoices, collection from the saved card, and dunning, on each SQL adapter.

The consumer is the real one (`Consumer` with an `InProcessSource`), fed the events billing wrote
to its own outbox, so the timers (`invoice.payment_due` with `deliver_after`) are the ones production
relays; the sandbox's cards decide each charge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.billing.checkout import Checkout, CheckoutSession
from services.billing.collections import Collections
from services.billing.event_handlers import BILLING_CONSUMER, billing_subscription
from services.billing.invoices import InvoiceBook
from services.billing.ledger import CreditLedger, Estimate, Usage
from services.billing.payments import FAILS_LATER, SUCCEEDS, SandboxPaymentProvider
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work
from services.billing.subscriptions import SubscriptionManager
from services.common.consumers import Consumer, InProcessSource
from services.common.db import Database
from services.common.ids import new_id
from services.common.model_catalog import load_model_catalog
from services.common.outbox import OutboxEvent
from services.common.processed_events import SqlProcessedEvents
from tests.support.domain import Clock, payloads

SECRET = "whsec_renewals"


@dataclass
class World:
    database: Database
    clock: Clock
    provider: SandboxPaymentProvider
    checkout: Checkout
    ledger: CreditLedger
    invoices: InvoiceBook
    subscriptions: SubscriptionManager
    consumer: Consumer
    source: InProcessSource
    delivered: set[str]

    async def register(self, email: str) -> str:
        user = new_id()
        await self.deliver(
            events_pb2.Event(
                id=new_id(),
                type="user.registered",
                user_registered=events_pb2.UserRegistered(user_id=user, email=email),
            )
        )
        return user

    async def subscribe(self, user: str, plan: str, card: str) -> None:
        change = await self.checkout.change_plan(user, f"to-{plan}", plan)
        assert change.checkout_session is not None
        await self.pay(change.checkout_session, card)

    async def pay(self, session: CheckoutSession, card: str) -> None:
        body, header = self.provider.pay(
            session.id, session.provider_session_id, session.amount, card, at=self.clock()
        )
        await self.checkout.handle_webhook("sandbox", body, header)

    async def deliver(self, event: events_pb2.Event) -> None:
        self.source.publish(event)
        while await self.consumer.poll_once(block_s=0):
            pass

    async def run_due_timers(self) -> None:
        """Deliver billing's own timers that are due now, as the outbox relay would, until handling
        them writes no more that are due."""
        for _round in range(10):
            due = [
                event
                for event, deliver_after in await self.timers()
                if event.id not in self.delivered and (deliver_after is None or deliver_after <= self.clock())
            ]
            if not due:
                return
            for event in due:
                self.delivered.add(event.id)
                await self.deliver(event)
        raise AssertionError("timers kept coming due")

    async def timers(self) -> list[tuple[events_pb2.Event, datetime | None]]:
        async with self.database.unit_of_work(read_only=True) as session:
            rows = (
                await session.execute(
                    select(OutboxEvent.payload, OutboxEvent.deliver_after)
                    .where(OutboxEvent.event_type.in_(["invoice.payment_due", "subscription.period_ended"]))
                    .order_by(OutboxEvent.sequence)
                )
            ).all()
        return [(events_pb2.Event.FromString(payload), deliver_after) for payload, deliver_after in rows]


@pytest.fixture
async def world(database: Database) -> World:
    clock = Clock()
    units = billing_units_of_work(database)
    subscriptions = SubscriptionManager(units, PlanCatalog(units), clock=clock)
    ledger = CreditLedger(units, subscriptions, load_model_catalog(), clock=clock)
    provider = SandboxPaymentProvider([SECRET])
    checkout = Checkout(units, subscriptions, ledger, provider, clock=clock)
    collections = Collections(units, subscriptions, provider, clock=clock)
    subscription = billing_subscription(units, subscriptions, collections, clock=clock)
    source = InProcessSource(stream="test", group=BILLING_CONSUMER)
    consumer = Consumer(
        BILLING_CONSUMER,
        subscription.handler,
        source,
        SqlProcessedEvents(database),
        member="test",
        block_s=0,
        handler_records_processing=True,
        event_types=subscription.event_types,
    )
    return World(
        database,
        clock,
        provider,
        checkout,
        ledger,
        InvoiceBook(units),
        subscriptions,
        consumer,
        source,
        set(),
    )


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
