"""Collecting renewal invoices from the saved payment method, and dunning when that fails.

A paid plan's period end makes an invoice: the next period's fee, and the ended period's overage.
It is finalized in the rollover's transaction along with `invoice.payment_due` (attempt 1), which
billing consumes: it charges the saved payment method (outside any transaction, with the invoice
and attempt as the idempotency key, so a redelivered attempt cannot charge twice), then records the
outcome in one transaction with the event's idempotency record.

Dunning: a failed attempt marks the subscription past due, mails the user and schedules the next
attempt with `deliver_after` at the due date plus `retry_days` (3, 5 and 7 days by default). When the
last retry fails too, the invoice becomes uncollectible and the user is moved to the free plan at
once. A payment that succeeds while past due makes the subscription active again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final

from parley.common.v1 import common_pb2
from parley.events.v1 import events_pb2
from services.billing.checkout import Payment
from services.billing.invoices import Invoice
from services.billing.mail import request_mail
from services.billing.payments import ChargeResult, PaymentProvider
from services.billing.ports import BillingUnitOfWork, BillingUnitsOfWork
from services.billing.subscriptions import SubscriptionManager
from services.common.clock import Clock, utc_now
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.ids import new_id
from services.common.money import Money

DUNNING_RETRY_DAYS: Final = (3, 5, 7)


class Collections:
    """Charges due invoices to saved payment methods, and runs dunning."""

    def __init__(
        self,
        units: BillingUnitsOfWork,
        subscriptions: SubscriptionManager,
        provider: PaymentProvider | None,
        *,
        retry_days: Sequence[int] = DUNNING_RETRY_DAYS,
        clock: Clock = utc_now,
    ) -> None:
        self._units = units
        self._subscriptions = subscriptions
        self._provider = provider
        self._retry_days = tuple(retry_days)
        self._clock = clock

    async def attempt(self, invoice_id: str, attempt: int) -> ChargeResult | None:
        """Charge the invoice's total to the saved method (no transaction is open meanwhile); None
        when it is no longer open (paid already, or given up on)."""
        async with self._units.read() as uow:
            invoice = await uow.invoices.get(invoice_id)
            method = None if invoice is None else await uow.payment_methods.get(invoice.user_id)
        if invoice is None or invoice.status != "open":
            return None
        if method is None or self._provider is None or method.provider != self._provider.name:
            return ChargeResult("failed", "", "PAYMENT_DECLINED")
        return await self._provider.charge(
            method.provider_payment_method,
            Money(invoice.currency_code, invoice.total_minor),
            idempotency_key=f"{invoice.id}:{attempt}",
            description=f"Parley invoice {invoice.number}",
        )

    async def record(
        self, uow: BillingUnitOfWork, invoice_id: str, attempt: int, result: ChargeResult | None
    ) -> None:
        """Apply an attempt's outcome within the consumer's unit of work."""
        if result is None:
            return
        now = self._clock()
        invoice = await uow.invoices.get(invoice_id, for_update=True)
        if invoice is None or invoice.status != "open":
            return
        method = await uow.payment_methods.get(invoice.user_id)
        payment = Payment(
            id=new_id(),
            invoice_id=invoice.id,
            user_id=invoice.user_id,
            provider=method.provider if method else (self._provider.name if self._provider else ""),
            provider_payment_id=result.provider_payment_id,
            status=result.status,
            amount=Money(invoice.currency_code, invoice.total_minor),
            failure_reason=result.failure_reason or None,
            attempt=attempt,
            create_time=now,
        )
        await uow.payments.add(payment)
        if result.status == "succeeded":
            await self._paid(uow, invoice, payment, now)
        else:
            await self._failed(uow, invoice, payment, attempt, now)

    async def _paid(self, uow: BillingUnitOfWork, invoice: Invoice, payment: Payment, now: datetime) -> None:
        paid = replace(invoice, status="paid", amount_paid_minor=invoice.total_minor, paid_time=now)
        await uow.invoices.save(paid)
        total = Money(paid.currency_code, paid.total_minor)
        uow.outbox.record(
            subject=paid.user_id,
            payload=events_pb2.PaymentSucceeded(
                payment_id=payment.id,
                invoice_id=paid.id,
                user_id=paid.user_id,
                amount=money_to_proto(total),
                provider=payment.provider,
                provider_payment_id=payment.provider_payment_id,
            ),
        )
        uow.outbox.record(
            subject=paid.user_id,
            payload=events_pb2.InvoicePaid(
                invoice_id=paid.id,
                number=paid.number or "",
                user_id=paid.user_id,
                plan_id=paid.plan_id,
                total=money_to_proto(total),
                payment_id=payment.id,
                paid_time=timestamp_to_proto(now),
            ),
        )
        await request_mail(uow, paid.user_id, "invoice_receipt", _invoice_params(paid))
        await self._subscriptions.mark_paid_up(uow, paid.user_id, now)

    async def _failed(
        self, uow: BillingUnitOfWork, invoice: Invoice, payment: Payment, attempt: int, now: datetime
    ) -> None:
        due = invoice.due_time or invoice.create_time
        retry_at = (
            due + timedelta(days=self._retry_days[attempt - 1]) if attempt <= len(self._retry_days) else None
        )
        failed = events_pb2.PaymentFailed(
            payment_id=payment.id,
            invoice_id=invoice.id,
            user_id=invoice.user_id,
            amount=money_to_proto(payment.amount),
            provider=payment.provider,
            failure_reason=common_pb2.ErrorReason.Value(
                f"ERROR_REASON_{payment.failure_reason or 'PAYMENT_DECLINED'}"
            ),
            attempt=attempt,
        )
        params = _invoice_params(invoice)
        if retry_at is not None:
            failed.next_retry_time.CopyFrom(timestamp_to_proto(retry_at))
            params["next_retry_time"] = retry_at.isoformat()
        uow.outbox.record(subject=invoice.user_id, payload=failed)
        await request_mail(uow, invoice.user_id, "payment_failed", params)
        if retry_at is not None:
            uow.outbox.record(
                subject=invoice.user_id,
                payload=events_pb2.InvoicePaymentDue(
                    invoice_id=invoice.id, user_id=invoice.user_id, attempt=attempt + 1
                ),
                deliver_after=retry_at,
            )
            await self._subscriptions.mark_past_due(uow, invoice.user_id, now)
            return
        closed = replace(invoice, status="uncollectible", close_time=now)
        await uow.invoices.save(closed)
        uow.outbox.record(
            subject=closed.user_id,
            payload=events_pb2.InvoiceUncollectible(
                invoice_id=closed.id,
                number=closed.number or "",
                user_id=closed.user_id,
                total=money_to_proto(Money(closed.currency_code, closed.total_minor)),
            ),
        )
        await self._subscriptions.end_for_nonpayment(uow, closed.user_id, now)


def _invoice_params(invoice: Invoice) -> dict[str, str]:
    return {
        "invoice_number": invoice.number or "",
        "amount_minor": str(invoice.total_minor),
        "currency": invoice.currency_code,
    }
