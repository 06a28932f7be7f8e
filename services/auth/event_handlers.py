"""What auth does with the events it consumes.

- `subscription.changed` (billing): the user's plan follows their subscription
  (`AccountService.apply_plan_within`), so the plan claim of the next access token a refresh mints
  is the new plan. A change that ends a subscription (status cancelled) names the plan that ended,
  not the user's: billing starts the successor on free in the same transaction, and that change
  (`CREATED`) is the one that moves the user.

Each event's effect and its idempotency record commit in one unit of work, so a redelivery after a
crash changes nothing; the credential caches hear of a changed plan after that commit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from parley.billing.v1 import billing_pb2
from parley.events.v1 import events_pb2
from services.auth.accounts import PLAN_ID_MAX, AccountService
from services.auth.ports import AuthUnitsOfWork
from services.common.consumers import EventSubscription, current_delivery

AUTH_CONSUMER: Final = "auth"
SUBSCRIPTION_CHANGED: Final = "subscription.changed"


class UnusableEventError(ValueError):
    """An event whose payload breaks its contract: no attempt can apply it, so the consumer
    dead-letters it at once (`services.common.consumers.is_retryable`)."""

    retryable = False


class AuthEventHandler:
    def __init__(self, units: AuthUnitsOfWork, accounts: AccountService) -> None:
        self._units = units
        self._accounts = accounts

    async def __call__(self, event: events_pb2.Event) -> None:
        delivery = current_delivery()
        change = event.subscription_changed
        if not 0 < len(change.plan_id) <= PLAN_ID_MAX:
            raise UnusableEventError(
                f"subscription.changed {event.id} names no usable plan id ({len(change.plan_id)} characters)"
            )
        async with self._units.write() as uow:
            applied = None
            if change.status != billing_pb2.SUBSCRIPTION_STATUS_CANCELLED:
                applied = await self._accounts.apply_plan_within(
                    uow,
                    change.user_id,
                    change.plan_id,
                    effective_time=_effective_time(event),
                    recorded_at=event.time.ToDatetime(tzinfo=UTC),
                )
            uow.record_processed(delivery.consumer, delivery.event_id)
        if applied is not None:
            await self._accounts.announce_plan_change(applied)


def _effective_time(event: events_pb2.Event) -> datetime:
    change = event.subscription_changed
    # Billing always sets it; should a producer not, the moment the change committed is the next best.
    stamp = change.effective_time if change.HasField("effective_time") else event.time
    return stamp.ToDatetime(tzinfo=UTC)


def auth_subscription(units: AuthUnitsOfWork, accounts: AccountService) -> EventSubscription:
    return EventSubscription(
        consumer=AUTH_CONSUMER,
        handler=AuthEventHandler(units, accounts),
        event_types=frozenset({SUBSCRIPTION_CHANGED}),
        sources=("billing",),
    )
