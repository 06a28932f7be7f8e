"""A billing world for domain tests: the real ledger, checkout, collections, customer admin and
consumer over one test database, a settable clock, and the sandbox paying by test card."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from parley.events.v1 import events_pb2
from services.billing.checkout import Checkout, CheckoutSession
from services.billing.collections import Collections
from services.billing.customer_admin import CustomerAdmin
from services.billing.event_handlers import BILLING_CONSUMER, billing_subscription
from services.billing.invoices import InvoiceBook
from services.billing.ledger import CreditLedger
from services.billing.payments import SandboxPaymentProvider
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work, credit_fast_path
from services.billing.subscriptions import SubscriptionManager
from services.common.consumers import Consumer, InProcessSource
from services.common.db import Database
from services.common.ids import new_id
from services.common.model_catalog import load_model_catalog
from services.common.outbox import OutboxEvent
from services.common.processed_events import SqlProcessedEvents
from tests.support.domain import Clock

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
    customer_admin: CustomerAdmin

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


def billing_world(database: Database, provider: SandboxPaymentProvider | None = None) -> World:
    """The world over `database`, paying through `provider` (a new sandbox when None)."""
    clock = Clock()
    units = billing_units_of_work(database)
    subscriptions = SubscriptionManager(units, PlanCatalog(units), clock=clock)
    # As billing serves it: reserve and settle take the fast path when they can.
    ledger = CreditLedger(
        units, subscriptions, load_model_catalog(), clock=clock, fast_path=credit_fast_path(database)
    )
    provider = provider or SandboxPaymentProvider([SECRET])
    checkout = Checkout(units, subscriptions, ledger, provider, clock=clock)
    collections = Collections(units, subscriptions, provider, clock=clock)
    subscription = billing_subscription(units, subscriptions, collections, clock=clock)
    invoices = InvoiceBook(units)
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
        invoices,
        subscriptions,
        consumer,
        source,
        set(),
        CustomerAdmin(units, subscriptions, invoices, provider, clock=clock),
    )
