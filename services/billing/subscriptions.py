"""Subscriptions and their periods: every user has one, starting on `free`.

A user's subscription is started by the first of: billing consuming `user.registered`, or any
billing call for the user (a reservation may arrive before the event). Both go through
`ensure_current`, which is idempotent: one current subscription per user is a unique index, and
a concurrent start finds the winner's row.

Periods are calendar months anchored at the subscription's start, the day clamped to the month's
length (a subscription started on 31 January renews on 28 or 29 February, then 31 March). When a
period starts, billing writes `subscription.period_ended` with `deliver_after` at its end: its own
timer, carried by the outbox, so no process needs a cron. Consuming it rolls the period over; so
does any call that finds the period ended first, whichever comes first, and the other is a no-op.
A rollover resets the allowance, carries unused prepaid tokens and open reservations into the new
period, and applies a scheduled downgrade or cancellation.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final, Literal

from parley.billing.v1 import billing_pb2
from parley.events.v1 import events_pb2
from services.billing.invoices import invoice_period_end
from services.billing.ledger import CreditAccount, LedgerEntry
from services.billing.plans import Plan, PlanCatalog, plan_tier_to_proto
from services.billing.ports import BillingUnitOfWork, BillingUnitsOfWork
from services.common.clock import Clock, utc_now
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.errors import FailedPrecondition, NotFound
from services.common.ids import new_id

SubscriptionStatus = Literal["active", "incomplete", "past_due", "cancelled"]

FREE_PLAN_ID: Final = "free"
# Millionths: the unit of proration shares.
PPM: Final = 1_000_000

_STATUSES: Final = {
    "active": billing_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    "incomplete": billing_pb2.SUBSCRIPTION_STATUS_INCOMPLETE,
    "past_due": billing_pb2.SUBSCRIPTION_STATUS_PAST_DUE,
    "cancelled": billing_pb2.SUBSCRIPTION_STATUS_CANCELLED,
}


@dataclass(frozen=True)
class Subscription:
    id: str
    user_id: str
    plan_id: str
    status: SubscriptionStatus
    current_period_start: datetime
    current_period_end: datetime
    cancel_at_period_end: bool
    pending_plan_id: str | None
    create_time: datetime
    update_time: datetime
    end_time: datetime | None


def add_months(anchor: datetime, months: int) -> datetime:
    """`anchor` moved by whole calendar months, its day clamped to the target month's length."""
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_containing(anchor: datetime, moment: datetime) -> tuple[datetime, datetime]:
    """The monthly period (start, end) anchored at `anchor` that contains `moment` (>= anchor)."""
    months = max(0, (moment.year - anchor.year) * 12 + moment.month - anchor.month)
    while months > 0 and add_months(anchor, months) > moment:
        months -= 1
    while add_months(anchor, months + 1) <= moment:
        months += 1
    return add_months(anchor, months), add_months(anchor, months + 1)


class SubscriptionManager:
    """Starts, reads and rolls over subscriptions, and opens each period's credit account."""

    def __init__(self, units: BillingUnitsOfWork, plans: PlanCatalog, *, clock: Clock = utc_now) -> None:
        self._units = units
        self._plans = plans
        self._clock = clock

    async def plan(self, plan_id: str) -> Plan:
        """A plan from the cached catalog; outside a unit of work only (a miss opens one to load it)."""
        return await self._plans.get_plan(plan_id)

    async def plan_in(self, uow: BillingUnitOfWork, plan_id: str) -> Plan:
        """A plan read in the caller's unit of work. Code holding a unit of work must use this, never
        `plan`: loading the catalog would take a second pooled connection while this one is held,
        and enough concurrent callers doing that exhaust the pool and wait on each other."""
        plan = await uow.plans.get(plan_id)
        if plan is None:
            raise NotFound(f"There is no plan {plan_id!r}.", reason="PLAN_NOT_FOUND")
        return plan

    async def current(self, user_id: str) -> tuple[Subscription, Plan]:
        """The user's subscription and its plan, started or rolled over first if due."""
        now = self._clock()
        async with self._units.read() as uow:
            subscription = await uow.subscriptions.current(user_id)
        if subscription is None or subscription.current_period_end <= now:
            async with self._units.write() as uow:
                await self.ensure_current(uow, user_id, now)
                subscription = await uow.subscriptions.current(user_id)
        assert subscription is not None  # ensure_current made one
        return subscription, await self.plan(subscription.plan_id)

    async def start_for_new_user(self, uow: BillingUnitOfWork, user_id: str) -> None:
        """`user.registered`: start the user on the free plan (a no-op if they have a subscription)."""
        await self.ensure_current(uow, user_id, self._clock())

    async def roll_over_if_due(self, uow: BillingUnitOfWork, user_id: str) -> None:
        """`subscription.period_ended`: roll the period over if it has ended (a no-op otherwise)."""
        await self.ensure_current(uow, user_id, self._clock())

    async def schedule_downgrade(self, user_id: str, plan: Plan) -> Subscription:
        """Move to `plan` (which costs no more) when the period ends; a repeat changes nothing."""
        now = self._clock()
        async with self._units.write() as uow:
            subscription = await self._current(uow, user_id, now)
            if subscription.plan_id == plan.id and subscription.pending_plan_id is None:
                raise _already_on(plan)
            if subscription.pending_plan_id == plan.id and not subscription.cancel_at_period_end:
                return subscription
            if subscription.plan_id == plan.id:  # back to the plan in effect: the pending change is undone
                return await self._resume(uow, subscription, now)
            changed = replace(
                subscription, pending_plan_id=plan.id, cancel_at_period_end=False, update_time=now
            )
            await uow.subscriptions.save(changed)
            current_plan = await self.plan_in(uow, subscription.plan_id)
            self._record_change(
                uow,
                changed,
                current_plan,
                events_pb2.SUBSCRIPTION_CHANGE_KIND_DOWNGRADE_SCHEDULED,
                previous=None,
                now=now,
            )
            return changed

    async def cancel(self, user_id: str) -> Subscription:
        """End the paid plan when the period ends (back to free); a repeat changes nothing."""
        now = self._clock()
        async with self._units.write() as uow:
            subscription = await self._current(uow, user_id, now)
            if subscription.plan_id == FREE_PLAN_ID:
                raise FailedPrecondition(
                    "The free plan has nothing to cancel.", reason="SUBSCRIPTION_NOT_CANCELLABLE"
                )
            if subscription.cancel_at_period_end:
                return subscription
            changed = replace(subscription, cancel_at_period_end=True, pending_plan_id=None, update_time=now)
            await uow.subscriptions.save(changed)
            plan = await self.plan_in(uow, subscription.plan_id)
            self._record_change(
                uow,
                changed,
                plan,
                events_pb2.SUBSCRIPTION_CHANGE_KIND_CANCEL_SCHEDULED,
                previous=None,
                now=now,
            )
            return changed

    async def resume(self, user_id: str) -> Subscription:
        """Undo a scheduled cancellation or downgrade before the period ends."""
        now = self._clock()
        async with self._units.write() as uow:
            subscription = await self._current(uow, user_id, now)
            if not subscription.cancel_at_period_end and subscription.pending_plan_id is None:
                raise FailedPrecondition(
                    "Nothing is scheduled to change at the end of the period.",
                    reason="SUBSCRIPTION_NOT_CANCELLING",
                )
            return await self._resume(uow, subscription, now)

    async def apply_upgrade(
        self, uow: BillingUnitOfWork, user_id: str, plan: Plan, *, fraction_ppm: int, now: datetime
    ) -> Subscription:
        """A paid upgrade takes effect at once: the plan changes within the current period, and the
        allowance grows by the new plan's extra tokens for the share of the period that was paid."""
        account = await self.ensure_current(uow, user_id, now)
        subscription = await uow.subscriptions.current(user_id, for_update=True)
        assert subscription is not None
        if subscription.plan_id == plan.id:
            return subscription
        previous = await self.plan_in(uow, subscription.plan_id)
        upgraded = replace(
            subscription, plan_id=plan.id, pending_plan_id=None, cancel_at_period_end=False, update_time=now
        )
        await uow.subscriptions.save(upgraded)
        extra_tokens = max(0, plan.included_tokens - previous.included_tokens) * fraction_ppm // PPM
        entry = LedgerEntry("grant", included_delta=extra_tokens, reason=f"upgrade to {plan.id}")
        entry_id = await uow.ledger.append(user_id, account.period_start, entry, now=now)
        await uow.accounts.apply(user_id, entry, now=now)
        await uow.accounts.change_plan(user_id, plan.id, hard_stop=plan.hard_stop)
        uow.outbox.record(
            subject=user_id,
            payload=events_pb2.CreditsGranted(
                user_id=user_id,
                ledger_entry_id=entry_id,
                tokens=extra_tokens,
                reason=events_pb2.CREDIT_GRANT_REASON_UPGRADE,
                plan_id=plan.id,
                period_start_time=timestamp_to_proto(account.period_start),
                period_end_time=timestamp_to_proto(account.period_end),
            ),
        )
        self._record_change(
            uow, upgraded, plan, events_pb2.SUBSCRIPTION_CHANGE_KIND_UPGRADED, previous=previous, now=now
        )
        return upgraded

    async def _current(self, uow: BillingUnitOfWork, user_id: str, now: datetime) -> Subscription:
        await self.ensure_current(uow, user_id, now)
        subscription = await uow.subscriptions.current(user_id, for_update=True)
        assert subscription is not None
        return subscription

    async def _resume(
        self, uow: BillingUnitOfWork, subscription: Subscription, now: datetime
    ) -> Subscription:
        resumed = replace(subscription, cancel_at_period_end=False, pending_plan_id=None, update_time=now)
        await uow.subscriptions.save(resumed)
        plan = await self.plan_in(uow, subscription.plan_id)
        self._record_change(
            uow, resumed, plan, events_pb2.SUBSCRIPTION_CHANGE_KIND_RESUMED, previous=None, now=now
        )
        return resumed

    async def ensure_current(self, uow: BillingUnitOfWork, user_id: str, now: datetime) -> CreditAccount:
        """The user's credit account for the period containing `now`: the subscription is started on
        free if there is none, and rolled over if its period ended."""
        # Locks in one order everywhere, the account's row before the subscription's, so two calls
        # that both bring a user up to date queue instead of deadlocking.
        account = await uow.accounts.get(user_id, for_update=True)
        if account is not None and account.period_end > now:
            return account
        subscription = await uow.subscriptions.current(user_id, for_update=True)
        if subscription is None:
            subscription = await self._start_free(uow, user_id, now)
            if subscription is None:  # a concurrent start won; its row is committed and visible now
                subscription = await uow.subscriptions.current(user_id, for_update=True)
                assert subscription is not None
        if subscription.current_period_end <= now:
            await self._roll_over(uow, subscription, now)
        account = await uow.accounts.get(user_id, for_update=True)
        assert account is not None, "every subscription opens its account"
        return account

    async def _start_free(self, uow: BillingUnitOfWork, user_id: str, now: datetime) -> Subscription | None:
        plan = await self.plan_in(uow, FREE_PLAN_ID)
        start, end = now, add_months(now, 1)
        subscription = Subscription(
            id=new_id(),
            user_id=user_id,
            plan_id=plan.id,
            status="active",
            current_period_start=start,
            current_period_end=end,
            cancel_at_period_end=False,
            pending_plan_id=None,
            create_time=now,
            update_time=now,
            end_time=None,
        )
        if not await uow.subscriptions.add(subscription):
            return None
        await self._open_period(uow, subscription, plan, carried_purchased=0, carried_reserved=0, now=now)
        self._record_change(
            uow, subscription, plan, events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED, previous=None, now=now
        )
        return subscription

    async def _roll_over(self, uow: BillingUnitOfWork, subscription: Subscription, now: datetime) -> None:
        previous_plan = await self.plan_in(uow, subscription.plan_id)
        account = await uow.accounts.get(subscription.user_id, for_update=True)
        if subscription.cancel_at_period_end:
            await self._replace_with_free(uow, subscription, subscription.current_period_end, account, now)
            return
        if subscription.pending_plan_id:
            plan = await self.plan_in(uow, subscription.pending_plan_id)
            kind = events_pb2.SUBSCRIPTION_CHANGE_KIND_DOWNGRADED
        else:
            plan = previous_plan
            kind = events_pb2.SUBSCRIPTION_CHANGE_KIND_RENEWED
        start, end = period_containing(subscription.create_time, now)
        renewed = replace(
            subscription,
            plan_id=plan.id,
            current_period_start=start,
            current_period_end=end,
            pending_plan_id=None,
            update_time=now,
        )
        await uow.subscriptions.save(renewed)
        await self._open_period(uow, renewed, plan, now=now, **_carried(account))
        self._record_change(uow, renewed, plan, kind, previous=previous_plan, now=now)
        await invoice_period_end(
            uow,
            subscription.user_id,
            ended_plan=previous_plan,
            ended=account,
            next_plan=plan,
            next_period=(start, end),
            now=now,
        )

    async def mark_past_due(self, uow: BillingUnitOfWork, user_id: str, now: datetime) -> None:
        """A renewal payment failed: the subscription is past due while dunning retries."""
        subscription = await uow.subscriptions.current(user_id, for_update=True)
        if subscription is None or subscription.status == "past_due":
            return
        past_due = replace(subscription, status="past_due", update_time=now)
        await uow.subscriptions.save(past_due)
        plan = await self.plan_in(uow, past_due.plan_id)
        self._record_change(
            uow, past_due, plan, events_pb2.SUBSCRIPTION_CHANGE_KIND_PAST_DUE, previous=None, now=now
        )

    async def mark_paid_up(self, uow: BillingUnitOfWork, user_id: str, now: datetime) -> None:
        """A payment succeeded: a past-due subscription is active again."""
        subscription = await uow.subscriptions.current(user_id, for_update=True)
        if subscription is None or subscription.status != "past_due":
            return
        active = replace(subscription, status="active", update_time=now)
        await uow.subscriptions.save(active)
        plan = await self.plan_in(uow, active.plan_id)
        self._record_change(
            uow, active, plan, events_pb2.SUBSCRIPTION_CHANGE_KIND_REACTIVATED, previous=None, now=now
        )

    async def end_for_nonpayment(self, uow: BillingUnitOfWork, user_id: str, now: datetime) -> None:
        """Dunning gave up: the paid subscription ends now, and the user is on free from now."""
        subscription = await uow.subscriptions.current(user_id, for_update=True)
        if subscription is None or subscription.plan_id == FREE_PLAN_ID:
            return
        account = await uow.accounts.get(user_id, for_update=True)
        await self._replace_with_free(uow, subscription, now, account, now)

    async def _replace_with_free(
        self,
        uow: BillingUnitOfWork,
        subscription: Subscription,
        ended_at: datetime,
        account: CreditAccount | None,
        now: datetime,
    ) -> None:
        """End `subscription` at `ended_at` and start a new one on free there, with its own period."""
        previous_plan = await self.plan_in(uow, subscription.plan_id)
        ended = replace(
            subscription, status="cancelled", cancel_at_period_end=False, end_time=ended_at, update_time=now
        )
        await uow.subscriptions.save(ended)
        self._record_change(
            uow,
            ended,
            previous_plan,
            events_pb2.SUBSCRIPTION_CHANGE_KIND_CANCELLED,
            previous=previous_plan,
            now=now,
        )
        free = await self.plan_in(uow, FREE_PLAN_ID)
        start, end = period_containing(ended_at, now)
        successor = Subscription(
            id=new_id(),
            user_id=subscription.user_id,
            plan_id=free.id,
            status="active",
            current_period_start=start,
            current_period_end=end,
            cancel_at_period_end=False,
            pending_plan_id=None,
            create_time=ended_at,
            update_time=now,
            end_time=None,
        )
        await uow.subscriptions.add(successor)
        await self._open_period(uow, successor, free, now=now, **_carried(account))
        self._record_change(
            uow, successor, free, events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED, previous=previous_plan, now=now
        )
        if ended_at == subscription.current_period_end:
            # The period ran to its end: its overage is still owed.
            await invoice_period_end(
                uow,
                subscription.user_id,
                ended_plan=previous_plan,
                ended=account,
                next_plan=free,
                next_period=(start, end),
                now=now,
            )

    async def _open_period(
        self,
        uow: BillingUnitOfWork,
        subscription: Subscription,
        plan: Plan,
        *,
        carried_purchased: int,
        carried_reserved: int,
        now: datetime,
    ) -> None:
        start = subscription.current_period_start
        account = CreditAccount(
            account_id=subscription.user_id,
            plan_id=plan.id,
            hard_stop=plan.hard_stop,
            period_start=start,
            period_end=subscription.current_period_end,
            included_tokens=0,
            purchased_tokens=0,
            used_tokens=0,
            reserved_tokens=0,
            notified_percent=0,
        )
        entries = [LedgerEntry("grant", included_delta=plan.included_tokens, reason="period allowance")]
        if carried_purchased or carried_reserved:
            entries.append(
                LedgerEntry(
                    "carry",
                    purchased_delta=carried_purchased,
                    reserved_delta=carried_reserved,
                    reason="unused prepaid credit and open reservations from the previous period",
                )
            )
        for entry in entries:
            account = account.applied(entry)
        await uow.accounts.open(account)
        grant_id = ""
        for entry in entries:
            entry_id = await uow.ledger.append(subscription.user_id, start, entry, now=now)
            grant_id = grant_id or entry_id
        uow.outbox.record(
            subject=subscription.user_id,
            payload=events_pb2.CreditsGranted(
                user_id=subscription.user_id,
                ledger_entry_id=grant_id,
                tokens=plan.included_tokens,
                reason=events_pb2.CREDIT_GRANT_REASON_PERIOD_ALLOWANCE,
                plan_id=plan.id,
                period_start_time=timestamp_to_proto(start),
                period_end_time=timestamp_to_proto(subscription.current_period_end),
            ),
        )
        uow.outbox.record(
            subject=subscription.user_id,
            payload=events_pb2.SubscriptionPeriodEnded(
                subscription_id=subscription.id,
                user_id=subscription.user_id,
                period_start_time=timestamp_to_proto(start),
                period_end_time=timestamp_to_proto(subscription.current_period_end),
            ),
            deliver_after=subscription.current_period_end,
        )

    def _record_change(
        self,
        uow: BillingUnitOfWork,
        subscription: Subscription,
        plan: Plan,
        kind: events_pb2.SubscriptionChangeKind.ValueType,
        *,
        previous: Plan | None,
        now: datetime,
    ) -> None:
        change = events_pb2.SubscriptionChanged(
            subscription_id=subscription.id,
            user_id=subscription.user_id,
            kind=kind,
            plan_id=plan.id,
            plan_tier=plan_tier_to_proto(plan.tier),
            status=_STATUSES[subscription.status],
            monthly_price=money_to_proto(plan.monthly_price),
            effective_time=timestamp_to_proto(now),
            period_start_time=timestamp_to_proto(subscription.current_period_start),
            period_end_time=timestamp_to_proto(subscription.current_period_end),
            pending_plan_id=subscription.pending_plan_id or "",
        )
        if previous is not None:
            change.previous_plan_id = previous.id
            change.previous_monthly_price.CopyFrom(money_to_proto(previous.monthly_price))
        uow.outbox.record(subject=subscription.user_id, payload=change)


def _carried(account: CreditAccount | None) -> dict[str, int]:
    """What a new period takes over from the account's last one: unused prepaid tokens, open holds."""
    return {
        "carried_purchased": 0 if account is None else account.purchased_available,
        "carried_reserved": 0 if account is None else account.reserved_tokens,
    }


def remaining_fraction_ppm(subscription: Subscription, now: datetime) -> int:
    """The share of the current period still ahead at `now`, in millionths (upgrades are prorated by it)."""
    whole = (subscription.current_period_end - subscription.current_period_start).total_seconds()
    left = (subscription.current_period_end - now).total_seconds()
    return max(0, min(PPM, round(PPM * left / whole))) if whole > 0 else 0


def _already_on(plan: Plan) -> FailedPrecondition:
    return FailedPrecondition(f"The subscription is on {plan.id!r} already.", reason="ALREADY_ON_PLAN")


def subscription_status_to_proto(status: SubscriptionStatus) -> billing_pb2.SubscriptionStatus.ValueType:
    return _STATUSES[status]
