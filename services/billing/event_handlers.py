"""What billing does with the events it consumes, and its sweeper.

- `user.registered` (auth): the new user starts on the free plan.
- `subscription.period_ended` (billing's own timer, delivered at the period's end): roll it over.

Each event's effect and its idempotency record commit in one unit of work, so a redelivery after a
crash changes nothing (and the effects are no-ops when repeated anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from parley.events.v1 import events_pb2
from services.billing.ledger import SWEEP_BATCH, CreditLedger
from services.billing.ports import BillingUnitsOfWork
from services.billing.subscriptions import SubscriptionManager
from services.common.consumers import EventSubscription, current_delivery

logger = logging.getLogger(__name__)

BILLING_CONSUMER: Final = "billing"
USER_REGISTERED: Final = "user.registered"
PERIOD_ENDED: Final = "subscription.period_ended"
# How often the sweeper looks for reservations that expired unsettled; a hold outlives its expiry by
# at most this long.
SWEEP_INTERVAL_S: Final = 5.0


class BillingEventHandler:
    def __init__(self, units: BillingUnitsOfWork, subscriptions: SubscriptionManager) -> None:
        self._units = units
        self._subscriptions = subscriptions

    async def __call__(self, event: events_pb2.Event) -> None:
        delivery = current_delivery()
        async with self._units.write() as uow:
            if event.type == USER_REGISTERED:
                await self._subscriptions.start_for_new_user(uow, event.user_registered.user_id)
            elif event.type == PERIOD_ENDED:
                await self._subscriptions.roll_over_if_due(uow, event.subscription_period_ended.user_id)
            uow.record_processed(delivery.consumer, delivery.event_id)


def billing_subscription(units: BillingUnitsOfWork, subscriptions: SubscriptionManager) -> EventSubscription:
    return EventSubscription(
        consumer=BILLING_CONSUMER,
        handler=BillingEventHandler(units, subscriptions),
        event_types=frozenset({USER_REGISTERED, PERIOD_ENDED}),
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
