"""Buying through a payment provider: credit packs, checkout sessions, and the provider's webhooks.

A checkout is opened for something to buy. The provider is asked for a session outside any
transaction (it is a network call); then one transaction writes the finalized invoice and the
session. The user pays on the provider's page, and the provider tells billing by webhook.

Webhooks are applied once per (provider, event id): the event's id is recorded in the same
transaction as its effect. They are safe out of order: a payment for a session already complete
changes nothing, and a failure reported after the payment succeeded is ignored. A paid top-up
credits the tokens in that same transaction, so the balance reflects it at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, Literal

from parley.common.v1 import common_pb2
from parley.events.v1 import events_pb2
from services.billing.invoices import Invoice, LineItem, draft_invoice, finalize
from services.billing.ledger import CreditLedger
from services.billing.payments import CheckoutRequest, PaymentProvider, ProviderEvent, require_provider
from services.billing.plans import Plan
from services.billing.ports import BillingUnitOfWork, BillingUnitsOfWork, SavedPaymentMethod
from services.billing.subscriptions import PPM, Subscription, SubscriptionManager, remaining_fraction_ppm
from services.common.clock import Clock, utc_now
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.ids import new_id
from services.common.money import Money
from services.common.pagination import BY_INTEGER, Page, keyset_page

CheckoutStatus = Literal["open", "complete", "expired"]
# "refunded": money paid back, recorded on the credit note with a negative amount.
PaymentStatus = Literal["succeeded", "failed", "requires_action", "refunded"]

# How long a checkout accepts payment (Stripe's default for checkout sessions).
CHECKOUT_TTL: Final = timedelta(hours=24)


@dataclass(frozen=True)
class CreditPack:
    id: str
    display_name: str
    tokens: int
    price: Money
    sort_order: int
    retired: bool


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    user_id: str
    request_id: str
    provider: str
    provider_session_id: str
    url: str
    status: CheckoutStatus
    plan_id: str | None
    credit_pack_id: str | None
    invoice_id: str
    amount: Money
    create_time: datetime
    expire_time: datetime
    complete_time: datetime | None
    # For an upgrade: the share of the period left when it was priced, in millionths.
    upgrade_fraction_ppm: int | None = None


@dataclass(frozen=True)
class PlanChange:
    """What ChangeSubscription did: the subscription, when the change takes effect, and for an
    upgrade the invoice to pay and the checkout to pay it at."""

    subscription: Subscription
    effective_time: datetime
    invoice: Invoice | None
    checkout_session: CheckoutSession | None


@dataclass(frozen=True)
class _Purchase:
    invoice: Invoice
    description: str
    fraction_ppm: int | None

    @property
    def invoice_amount(self) -> Money:
        return Money(self.invoice.currency_code, self.invoice.total_minor)


@dataclass(frozen=True)
class Payment:
    id: str
    invoice_id: str
    user_id: str
    provider: str
    provider_payment_id: str
    status: PaymentStatus
    amount: Money
    failure_reason: str | None
    attempt: int
    create_time: datetime


@dataclass(frozen=True)
class WebhookOutcome:
    event_id: str
    duplicate: bool


class Checkout:
    """Credit packs on sale, checkout sessions, and the provider's webhooks."""

    def __init__(
        self,
        units: BillingUnitsOfWork,
        subscriptions: SubscriptionManager,
        ledger: CreditLedger,
        provider: PaymentProvider | None,
        *,
        unconfigured_reason: str = "",
        clock: Clock = utc_now,
    ) -> None:
        self._units = units
        self._subscriptions = subscriptions
        self._ledger = ledger
        self._provider = provider
        self._unconfigured_reason = unconfigured_reason
        self._clock = clock

    async def list_credit_packs(self, *, page_size: int, page_token: str) -> Page[CreditPack]:
        """The packs on sale, smallest first."""

        async def fetch(after: tuple[int, str] | None, limit: int) -> Sequence[CreditPack]:
            async with self._units.read() as uow:
                packs = [pack for pack in await uow.credit_packs.all_packs() if not pack.retired]
            ordered = sorted(packs, key=lambda pack: (pack.sort_order, pack.id))
            return [pack for pack in ordered if after is None or (pack.sort_order, pack.id) > after][:limit]

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("credit_packs",),
            sort_key=BY_INTEGER,
            position=lambda pack: (pack.sort_order, pack.id),
            fetch=fetch,
        )

    async def change_plan(self, user_id: str, request_id: str, plan_id: str) -> PlanChange:
        """ChangeSubscription: an upgrade is paid through a checkout and takes effect once paid; a
        move to a plan that costs no more is scheduled for the end of the period."""
        plan = await self._subscriptions.plan(plan_id)
        subscription, current = await self._subscriptions.current(user_id)
        if plan.retired and plan.id != subscription.plan_id:
            raise FailedPrecondition(f"The plan {plan.id!r} is no longer offered.", reason="PLAN_RETIRED")
        if _is_upgrade(current, plan):
            session = await self.create_session(user_id, request_id, plan_id=plan.id)
            async with self._units.read() as uow:
                invoice = await uow.invoices.get(session.invoice_id)
            return PlanChange(subscription, session.create_time, invoice, session)
        scheduled = await self._subscriptions.schedule_downgrade(user_id, plan)
        return PlanChange(scheduled, scheduled.current_period_end, None, None)

    async def create_session(
        self,
        user_id: str,
        request_id: str,
        *,
        credit_pack_id: str = "",
        plan_id: str = "",
        success_url: str = "",
        cancel_url: str = "",
    ) -> CheckoutSession:
        """A checkout for a credit pack or an upgrade; a repeat of `request_id` returns the same session."""
        provider = require_provider(self._provider, self._unconfigured_reason)
        if bool(credit_pack_id) == bool(plan_id):
            raise InvalidArgument(
                "Name one thing to buy: a credit_pack_id or a plan_id.", reason="REQUIRED_FIELD"
            )
        async with self._units.read() as uow:
            existing = await uow.checkouts.by_request(user_id, request_id)
        if existing is not None:
            return _same_purchase(existing, credit_pack_id=credit_pack_id, plan_id=plan_id)
        now = self._clock()
        purchase = await (
            self._pack_purchase(user_id, credit_pack_id, now)
            if credit_pack_id
            else self._upgrade_purchase(user_id, plan_id, now)
        )
        checkout_id = new_id()
        opened = await provider.create_checkout(
            CheckoutRequest(
                checkout_id=checkout_id,
                amount=purchase.invoice_amount,
                description=purchase.description,
                success_url=success_url,
                cancel_url=cancel_url,
                expires_at=now + CHECKOUT_TTL,
            )
        )
        session = CheckoutSession(
            id=checkout_id,
            user_id=user_id,
            request_id=request_id,
            provider=provider.name,
            provider_session_id=opened.provider_session_id,
            url=opened.url,
            status="open",
            plan_id=plan_id or None,
            credit_pack_id=credit_pack_id or None,
            invoice_id=purchase.invoice.id,
            amount=purchase.invoice_amount,
            create_time=now,
            expire_time=now + CHECKOUT_TTL,
            complete_time=None,
            upgrade_fraction_ppm=purchase.fraction_ppm,
        )
        async with self._units.write() as uow:
            # The session first: if a concurrent call with this request id won, nothing else is
            # written, so no invoice number is spent on the loser.
            if await uow.checkouts.add(session):
                await finalize(uow, purchase.invoice, now=now, due=session.expire_time)
                return session
        async with self._units.read() as uow:
            winner = await uow.checkouts.by_request(user_id, request_id)
        assert winner is not None, "add() lost only to a committed session with this request id"
        return _same_purchase(winner, credit_pack_id=credit_pack_id, plan_id=plan_id)

    async def _pack_purchase(self, user_id: str, credit_pack_id: str, now: datetime) -> _Purchase:
        async with self._units.read() as uow:
            pack = await uow.credit_packs.get(credit_pack_id)
        if pack is None or pack.retired:
            raise NotFound(
                f"There is no credit pack {credit_pack_id!r} on sale.", reason="CREDIT_PACK_NOT_FOUND"
            )
        line = LineItem(
            kind="credits",
            description=pack.display_name,
            quantity=1,
            unit_price_minor=pack.price.amount_minor,
            amount_minor=pack.price.amount_minor,
            credit_pack_id=pack.id,
        )
        invoice = draft_invoice(user_id, "top_up", pack.price.currency_code, [line], now=now)
        return _Purchase(invoice, f"{pack.display_name} for Parley", None)

    async def _upgrade_purchase(self, user_id: str, plan_id: str, now: datetime) -> _Purchase:
        plan = await self._subscriptions.plan(plan_id)
        subscription, current = await self._subscriptions.current(user_id)
        if plan.retired:
            raise FailedPrecondition(f"The plan {plan.id!r} is no longer offered.", reason="PLAN_RETIRED")
        if plan.id == current.id:
            raise FailedPrecondition(f"The subscription is on {plan.id!r} already.", reason="ALREADY_ON_PLAN")
        if plan.monthly_price.currency_code != current.monthly_price.currency_code:
            raise FailedPrecondition(
                "The new plan is priced in another currency than the current one.", reason="CURRENCY_MISMATCH"
            )
        if not _is_upgrade(current, plan):
            raise InvalidArgument(
                f"{plan.id!r} costs no more than {current.id!r}: change to it with ChangeSubscription, "
                "which schedules it for the end of the period.",
                reason="INVALID_ARGUMENT",
            )
        fraction = remaining_fraction_ppm(subscription, now)
        period = (now, subscription.current_period_end)
        lines = [
            LineItem(
                kind="subscription",
                description=f"{plan.display_name} plan, the rest of the current period",
                quantity=1,
                unit_price_minor=plan.monthly_price.amount_minor,
                amount_minor=_prorated(plan.monthly_price.amount_minor, fraction),
                plan_id=plan.id,
                period_start=period[0],
                period_end=period[1],
            )
        ]
        if current.monthly_price.amount_minor:
            lines.append(
                LineItem(
                    kind="proration_credit",
                    description=f"Unused {current.display_name} plan for the rest of the period",
                    quantity=1,
                    unit_price_minor=-current.monthly_price.amount_minor,
                    amount_minor=-_prorated(current.monthly_price.amount_minor, fraction),
                    plan_id=current.id,
                    period_start=period[0],
                    period_end=period[1],
                )
            )
        invoice = draft_invoice(
            user_id, "upgrade", plan.monthly_price.currency_code, lines, now=now, period=period
        )
        return _Purchase(invoice, f"Upgrade to the {plan.display_name} plan", fraction)

    async def handle_webhook(
        self, provider_name: str, body: bytes, signature_header: str | None
    ) -> WebhookOutcome:
        """Verify and apply one webhook delivery."""
        provider = require_provider(self._provider, self._unconfigured_reason)
        if provider_name != provider.name:
            raise NotFound(
                f"This deployment takes payments through {provider.name!r}, not {provider_name!r}.",
                reason="WEBHOOK_PROVIDER_UNKNOWN",
            )
        now = self._clock()
        event = provider.verify_event(body, signature_header, now=now)
        async with self._units.write() as uow:
            if not await uow.webhook_events.record(provider.name, event.event_id, event.event_type, now=now):
                return WebhookOutcome(event.event_id, duplicate=True)
            if event.kind != "ignored":
                await self._apply(uow, provider.name, event, now)
        return WebhookOutcome(event.event_id, duplicate=False)

    async def _apply(
        self, uow: BillingUnitOfWork, provider: str, event: ProviderEvent, now: datetime
    ) -> None:
        session = await uow.checkouts.get(event.checkout_id, for_update=True)
        if session is not None and session.provider == provider and event.kind == "method":
            if event.payment_method:
                await uow.payment_methods.save(
                    session.user_id, SavedPaymentMethod(provider, event.payment_method), now=now
                )
            return
        if session is None or session.provider != provider or session.status == "complete":
            # Not ours, or paid already (a late failure or a repeated payment): nothing changes.
            return
        invoice = await uow.invoices.get(session.invoice_id, for_update=True)
        assert invoice is not None, "every checkout has its invoice"
        attempt = await uow.payments.count_for_invoice(invoice.id) + 1
        if event.kind == "paid":
            if event.amount != session.amount:
                raise InvalidArgument(
                    "The payment's amount or currency differs from the checkout's.",
                    reason="WEBHOOK_PAYLOAD_INVALID",
                )
            payment = self._payment(invoice, provider, event, "succeeded", attempt=attempt, now=now)
            await uow.payments.add(payment)
            paid = replace(invoice, status="paid", amount_paid_minor=invoice.total_minor, paid_time=now)
            await uow.invoices.save(paid)
            await uow.checkouts.save(replace(session, status="complete", complete_time=now))
            if event.payment_method:
                # Renewals are charged to the method of the user's last paid checkout.
                await uow.payment_methods.save(
                    session.user_id, SavedPaymentMethod(provider, event.payment_method), now=now
                )
            await self._deliver(uow, session, paid, payment, now)
            uow.outbox.record(
                subject=invoice.user_id,
                payload=events_pb2.PaymentSucceeded(
                    payment_id=payment.id,
                    invoice_id=invoice.id,
                    user_id=invoice.user_id,
                    amount=money_to_proto(payment.amount),
                    provider=provider,
                    provider_payment_id=payment.provider_payment_id,
                ),
            )
            uow.outbox.record(
                subject=invoice.user_id,
                payload=events_pb2.InvoicePaid(
                    invoice_id=paid.id,
                    number=paid.number or "",
                    user_id=paid.user_id,
                    plan_id=paid.plan_id,
                    total=money_to_proto(Money(paid.currency_code, paid.total_minor)),
                    payment_id=payment.id,
                    paid_time=timestamp_to_proto(now),
                ),
            )
        elif event.kind == "failed":
            payment = self._payment(invoice, provider, event, "failed", attempt=attempt, now=now)
            await uow.payments.add(payment)
            uow.outbox.record(
                subject=invoice.user_id,
                payload=events_pb2.PaymentFailed(
                    payment_id=payment.id,
                    invoice_id=invoice.id,
                    user_id=invoice.user_id,
                    amount=money_to_proto(payment.amount),
                    provider=provider,
                    failure_reason=common_pb2.ErrorReason.Value(f"ERROR_REASON_{event.failure_reason}"),
                    attempt=attempt,
                ),
            )
        else:  # requires_action: the user must finish on the provider's page; nothing is owed or paid yet
            await uow.payments.add(
                self._payment(invoice, provider, event, "requires_action", attempt=attempt, now=now)
            )

    async def _deliver(
        self,
        uow: BillingUnitOfWork,
        session: CheckoutSession,
        invoice: Invoice,
        payment: Payment,
        now: datetime,
    ) -> None:
        """Give the user what they paid for."""
        if session.plan_id is not None:
            plan = await self._subscriptions.plan_in(uow, session.plan_id)
            await self._subscriptions.apply_upgrade(
                uow, session.user_id, plan, fraction_ppm=session.upgrade_fraction_ppm or 0, now=now
            )
            return
        if session.credit_pack_id is None:
            return
        pack = await uow.credit_packs.get(session.credit_pack_id)
        assert pack is not None, "a pack is retired, never deleted"
        entry_id, _ = await self._ledger.top_up(
            uow, session.user_id, pack.tokens, reason=f"credit pack {pack.id}", now=now
        )
        uow.outbox.record(
            subject=session.user_id,
            payload=events_pb2.CreditsToppedUp(
                user_id=session.user_id,
                ledger_entry_id=entry_id,
                credit_pack_id=pack.id,
                tokens=pack.tokens,
                amount=money_to_proto(session.amount),
                invoice_id=invoice.id,
                payment_id=payment.id,
            ),
        )

    @staticmethod
    def _payment(
        invoice: Invoice,
        provider: str,
        event: ProviderEvent,
        status: PaymentStatus,
        *,
        attempt: int,
        now: datetime,
    ) -> Payment:
        return Payment(
            id=new_id(),
            invoice_id=invoice.id,
            user_id=invoice.user_id,
            provider=provider,
            provider_payment_id=event.provider_payment_id,
            status=status,
            amount=event.amount or Money(invoice.currency_code, invoice.total_minor),
            failure_reason=event.failure_reason or None,
            attempt=attempt,
            create_time=now,
        )


def _same_purchase(session: CheckoutSession, *, credit_pack_id: str, plan_id: str) -> CheckoutSession:
    if (session.credit_pack_id or "", session.plan_id or "") != (credit_pack_id, plan_id):
        raise AlreadyExists(
            "This request_id was used for another checkout; use a new one for a new purchase.",
            reason="REQUEST_ID_REUSED",
        )
    return session


def _is_upgrade(current: Plan, plan: Plan) -> bool:
    return plan.id != current.id and plan.monthly_price.amount_minor > current.monthly_price.amount_minor


def _prorated(amount_minor: int, fraction_ppm: int) -> int:
    """`amount_minor` times the share, rounded half up to whole minor units."""
    return (amount_minor * fraction_ppm + PPM // 2) // PPM
