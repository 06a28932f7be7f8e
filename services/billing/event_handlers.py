"""What billing does with the events it consumes, and its sweeper.

- `user.registered` (auth): the new user starts on the free plan, and billing keeps their address
  and name for its mails; `user.email_verified` (auth) keeps the address current.
- `subscription.period_ended` (billing's own timer, delivered at the period's end): roll it over.
- `invoice.payment_due` (billing's own timer): charge the invoice to the saved payment method. The
  charge happens before the unit of work opens (it is a call to the provider, idempotent on the
  invoice and attempt); its outcome and the idempotency record then commit together.

Each event's effect and its idempotency record commit in one unit of work, so a redelivery after a
crash changes nothing (and the effects are no-ops when repeated anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Final

from parley.events.v1 import events_pb2
from services.billing.collections import Collections
from services.billing.ledger import SWEEP_BATCH, CreditLedger
from services.billing.ports import BillingUnitsOfWork, Customer
from services.billing.subscriptions import SubscriptionManager
from services.common.clock import Clock, utc_now
from services.common.consumers import EventSubscription, current_delivery

logger = logging.getLogger(__name__)

BILLING_CONSUMER: Final = "billing"
USER_REGISTERED: Final = "user.registered"
EMAIL_VERIFIED: Final = "user.email_verified"
PERIOD_ENDED: Final = "subscription.period_ended"
PAYMENT_DUE: Final = "invoice.payment_due"
# How often the sweeper looks for reservations that expired unsettled; a hold outlives its expiry by
# at most this long.
SWEEP_INTERVAL_S: Final = 5.0


class BillingEventHandler:
    def __init__(
        self,
        units: BillingUnitsOfWork,
        subscriptions: SubscriptionManager,
        collections: Collections,
        *,
        clock: Clock,
    ) -> None:
        self._units = units
        self._subscriptions = subscriptions
        self._collections = collections
        self._clock = clock

    async def __call__(self, event: events_pb2.Event) -> None:
        delivery = current_delivery()
        charge = None
        if event.type == PAYMENT_DUE:
            due = event.invoice_payment_due
            charge = await self._collections.attempt(due.invoice_id, due.attempt)
        async with self._units.write() as uow:
            if event.type == USER_REGISTERED:
                registered = event.user_registered
                await uow.customers.save(
                    Customer(registered.user_id, registered.email, registered.display_name), now=self._clock()
                )
                await self._subscriptions.start_for_new_user(uow, registered.user_id)
            elif event.type == EMAIL_VERIFIED:
                verified = event.user_email_verified
                known = await uow.customers.get(verified.user_id)
                if known is not None:
                    await uow.customers.save(replace(known, email=verified.email), now=self._clock())
            elif event.type == PERIOD_ENDED:
                await self._subscriptions.roll_over_if_due(uow, event.subscription_period_ended.user_id)
            elif event.type == PAYMENT_DUE:
                due = event.invoice_payment_due
                await self._collections.record(uow, due.invoice_id, due.attempt, charge)
            uow.record_processed(delivery.consumer, delivery.event_id)


def billing_subscription(
    units: BillingUnitsOfWork,
    subscriptions: SubscriptionManager,
    collections: Collections,
    *,
    clock: Clock = utc_now,
) -> EventSubscription:
    return EventSubscription(
        consumer=BILLING_CONSUMER,
        handler=BillingEventHandler(units, subscriptions, collections, clock=clock),
        event_types=frozenset({USER_REGISTERED, EMAIL_VERIFIED, PERIOD_ENDED, PAYMENT_DUE}),
        sources=("auth", "billing"),
    )


def reservation_sweeper(
    ledger: CreditLedger, *, interval_s: float = SWEEP_INTERVAL_S
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """The background loop that releases expired reservations until `stop` is set."""

    async def sweep(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                # A full batch means more may be waiting: sweep again at once.
                while await ledger.release_expired() == SWEEP_BATCH and not stop.is_set():
                    pass
            except Exception:
                logger.exception("releasing expired reservations failed; trying again in %.0fs", interval_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stop.wait()

    return sweep
