"""Customer administration: any user's subscription, ledger and invoices, credit adjustments, refunds.

Only admins get here (the servicer checks the role). Reads never start a subscription: a user billing
does not know is NOT_FOUND, so a mistyped id creates nothing. The two changes are idempotent on the
admin's `request_id` (`services.billing.idempotency`):

- An adjustment is one ledger entry of kind "adjustment" on the prepaid sum, signed, with the admin
  (`actor_id`) and their reason, announced as `credits.granted` (reason ADJUSTMENT, the signed
  tokens). Prepaid tokens carry into the next period while positive; a negative prepaid sum does not
  carry (a rollover carries what is unused, never a debt). Taking tokens back may leave the balance
  below zero: a hard-stop plan then refuses reservations until it is positive again, an overage
  plan bills what is used beyond it as overage.
- A refund pays a paid invoice back in full through the payment provider, then, in one transaction,
  issues the credit note (an invoice of reason "credit_note" with the lines negated, numbered by the
  same gapless counter, created paid), records the refund as a payment of the credit note (status
  "refunded", a negative amount: money going back), announces `payment.refunded`, and takes a credit
  pack's tokens back with an adjustment. The plan an upgrade or renewal bought stays: a refund
  returns money, and changing the plan is the subscription's business.

The provider is called before that transaction, as every network call is, with an idempotency key
made of the invoice (not the request), so two refunds of one invoice racing each other, or a retry
after the transaction failed, reach the same refund at the provider and money goes back once. The
transaction then re-checks the invoice under its row lock: the loser of a race is refused with
INVOICE_NOT_REFUNDABLE, and at most one credit note per invoice is a unique index besides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final

from parley.events.v1 import events_pb2
from services.billing.checkout import Payment
from services.billing.idempotency import (
    IdempotencyKey,
    claim_request_id,
    fingerprint,
    replayed_result,
    request_id_violations,
)
from services.billing.invoices import Invoice, InvoiceBook, InvoiceStatus, draft_invoice, finalize
from services.billing.ledger import CreditAccount, LedgerEntry
from services.billing.payments import PaymentProvider, RefundResult, require_provider
from services.billing.plans import Plan
from services.billing.ports import BillingUnitOfWork, BillingUnitsOfWork
from services.billing.subscriptions import Subscription, SubscriptionManager
from services.common.clock import Clock, utc_now
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.common.ids import new_id
from services.common.money import Money
from services.common.pagination import BY_TIME, Page, keyset_page

ADJUST_CREDITS: Final = "AdjustCredits"
REFUND_INVOICE: Final = "RefundInvoice"
# The width of `credit_ledger_entries.reason` and `invoices.memo`; longer reasons are refused.
REASON_MAX_LENGTH: Final = 200
# Far beyond any real grant, and low enough that no number of adjustments overflows the int64 sums.
MAX_ADJUSTMENT_TOKENS: Final = 1_000_000_000_000


@dataclass(frozen=True)
class LedgerRecord:
    """A stored ledger entry: the entry, where it belongs, when it was made and by which admin."""

    id: str
    account_id: str
    period_start: datetime
    entry: LedgerEntry
    # The admin behind an adjustment; None for the entries billing makes on its own.
    actor_id: str | None
    create_time: datetime


@dataclass(frozen=True)
class CustomerView:
    """GetCustomer: the subscription, its plan and the current period's balance."""

    subscription: Subscription
    plan: Plan
    account: CreditAccount


@dataclass(frozen=True)
class Adjustment:
    """AdjustCredits: the entry and the balance after it (the balance now, on a replay)."""

    record: LedgerRecord
    account: CreditAccount


class CustomerAdmin:
    """Looks up any user's billing, adjusts their prepaid credit and refunds their invoices."""

    def __init__(
        self,
        units: BillingUnitsOfWork,
        subscriptions: SubscriptionManager,
        invoices: InvoiceBook,
        provider: PaymentProvider | None,
        *,
        unconfigured_reason: str = "",
        clock: Clock = utc_now,
    ) -> None:
        self._units = units
        self._subscriptions = subscriptions
        self._invoices = invoices
        self._provider = provider
        self._unconfigured_reason = unconfigured_reason
        self._clock = clock

    async def customer(self, user_id: str) -> CustomerView:
        """The user's subscription, plan and balance, rolled over first if its period ended."""
        now = self._clock()
        async with self._units.read() as uow:
            subscription = await uow.subscriptions.current(user_id)
            account = await uow.accounts.get(user_id)
        if subscription is None:
            raise _unknown_customer()
        if account is None or account.period_end <= now or subscription.current_period_end <= now:
            async with self._units.write() as uow:
                account = await self._subscriptions.ensure_current(uow, user_id, now)
                subscription = await uow.subscriptions.current(user_id)
            assert subscription is not None, "a subscription ends only when its successor starts"
        return CustomerView(subscription, await self._subscriptions.plan(subscription.plan_id), account)

    async def ledger_entries(self, user_id: str, *, page_size: int, page_token: str) -> Page[LedgerRecord]:
        """The user's ledger entries of every period, newest first."""

        async def fetch(after: tuple[datetime, str] | None, limit: int) -> Sequence[LedgerRecord]:
            async with self._units.read() as uow:
                return await uow.ledger_records.list_for_account(user_id, after=after, limit=limit)

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("ledger_entries", user_id),
            sort_key=BY_TIME,
            position=lambda record: (record.create_time, record.id),
            fetch=fetch,
        )

    async def invoices(
        self, user_id: str, *, page_size: int, page_token: str, status: InvoiceStatus | None
    ) -> Page[Invoice]:
        """The user's invoices, credit notes included, newest first: the user's own list."""
        return await self._invoices.list_invoices(
            user_id, page_size=page_size, page_token=page_token, status=status
        )

    async def adjust_credits(
        self, request_id: str, user_id: str, tokens: int, reason: str, *, actor_id: str
    ) -> Adjustment:
        """Add `tokens` prepaid tokens (take them back when negative) as an audited ledger entry; a
        retry with the same request id and parameters returns the same entry."""
        violations = request_id_violations(request_id) + _reason_violations(reason)
        if tokens == 0:
            violations.append(FieldViolation("tokens", "must not be 0", "INVALID_ARGUMENT"))
        elif abs(tokens) > MAX_ADJUSTMENT_TOKENS:
            violations.append(
                FieldViolation(
                    "tokens", f"must be at most {MAX_ADJUSTMENT_TOKENS} either way", "INVALID_ARGUMENT"
                )
            )
        if violations:
            raise _invalid(violations)
        reason = reason.strip()
        now = self._clock()
        entry_id = new_id()
        key = IdempotencyKey(
            scope=actor_id,
            request_id=request_id,
            operation=ADJUST_CREDITS,
            fingerprint=fingerprint(user_id, tokens, reason),
            result_key=entry_id,
            create_time=now,
        )
        async with self._units.write() as uow:
            earlier = await claim_request_id(uow, key)
            if earlier is not None:
                record = await uow.ledger_records.get(earlier)
                assert record is not None, "a request id is claimed together with its entry"
                return Adjustment(record, await self._subscriptions.ensure_current(uow, user_id, now))
            if await uow.subscriptions.current(user_id) is None:
                raise _unknown_customer()
            account = await self._subscriptions.ensure_current(uow, user_id, now)
            record, account = await self._adjust(
                uow, account, tokens, reason, actor_id=actor_id, now=now, entry_id=entry_id
            )
            return Adjustment(record, account)

    async def refund_invoice(
        self, request_id: str, user_id: str, invoice_id: str, reason: str, *, actor_id: str
    ) -> Invoice:
        """Refund the user's paid invoice in full; its credit note. A retry with the same request id
        and parameters returns the same credit note."""
        violations = request_id_violations(request_id) + _reason_violations(reason)
        if violations:
            raise _invalid(violations)
        provider = require_provider(self._provider, self._unconfigured_reason)
        reason = reason.strip()
        now = self._clock()
        key = IdempotencyKey(
            scope=actor_id,
            request_id=request_id,
            operation=REFUND_INVOICE,
            fingerprint=fingerprint(user_id, invoice_id, reason),
            result_key=new_id(),
            create_time=now,
        )
        async with self._units.read() as uow:
            # A finished refund, or a request id used for something else, never reaches the provider.
            earlier = await replayed_result(uow, key)
            if earlier is not None:
                return await _stored_invoice(uow, earlier)
            invoice = await uow.invoices.get(invoice_id)
            if invoice is None or invoice.user_id != user_id:
                raise NotFound("The user has no such invoice.", reason="NOT_FOUND")
            payment = await _refundable_payment(uow, invoice, provider.name)
        refund = await provider.refund(
            payment.provider_payment_id,
            Money(invoice.currency_code, invoice.amount_paid_minor),
            idempotency_key=f"refund:{invoice.id}",
        )
        if refund.status == "failed":
            raise FailedPrecondition(
                f"The payment provider refused the refund ({refund.failure_reason or 'no reason given'}).",
                reason="INVOICE_NOT_REFUNDABLE",
                metadata={"invoice_id": invoice.id},
            )
        async with self._units.write() as uow:
            earlier = await claim_request_id(uow, key)
            if earlier is not None:  # a concurrent retry of this request committed first
                return await _stored_invoice(uow, earlier)
            invoice = await uow.invoices.get(invoice_id, for_update=True)
            assert invoice is not None, "invoices are never deleted"
            payment = await _refundable_payment(uow, invoice, provider.name)
            # Before the credit note takes the invoice counter: the account and subscription rows are
            # locked before the counter everywhere (a rollover invoices after opening the period).
            await self._take_back_packs(uow, invoice, reason, actor_id=actor_id, now=now)
            credit_note = await _issue_credit_note(uow, invoice, key.result_key, reason, now=now)
            await self._record_refund(
                uow,
                invoice,
                paid_by=payment,
                credit_note=credit_note,
                refund=refund,
                provider=provider.name,
                now=now,
            )
            return credit_note

    async def _take_back_packs(
        self, uow: BillingUnitOfWork, invoice: Invoice, reason: str, *, actor_id: str, now: datetime
    ) -> None:
        tokens = 0
        for line in invoice.lines:
            if line.kind == "credits" and line.credit_pack_id:
                pack = await uow.credit_packs.get(line.credit_pack_id)
                assert pack is not None, "a pack is retired, never deleted"
                tokens += pack.tokens * line.quantity
        if tokens:
            account = await self._subscriptions.ensure_current(uow, invoice.user_id, now)
            note = f"refund of invoice {invoice.number}: {reason}"[:REASON_MAX_LENGTH]
            await self._adjust(uow, account, -tokens, note, actor_id=actor_id, now=now)

    @staticmethod
    async def _record_refund(
        uow: BillingUnitOfWork,
        invoice: Invoice,
        *,
        paid_by: Payment,
        credit_note: Invoice,
        refund: RefundResult,
        provider: str,
        now: datetime,
    ) -> None:
        await uow.payments.add(
            Payment(
                id=new_id(),
                invoice_id=credit_note.id,
                user_id=credit_note.user_id,
                provider=provider,
                provider_payment_id=refund.provider_refund_id,
                status="refunded",
                amount=Money(credit_note.currency_code, credit_note.total_minor),
                failure_reason=None,
                attempt=1,
                create_time=now,
            )
        )
        uow.outbox.record(
            subject=invoice.user_id,
            payload=events_pb2.PaymentRefunded(
                payment_id=paid_by.id,
                invoice_id=invoice.id,
                user_id=invoice.user_id,
                amount=money_to_proto(Money(invoice.currency_code, invoice.amount_paid_minor)),
                provider=provider,
                credit_note_id=credit_note.id,
                provider_refund_id=refund.provider_refund_id,
            ),
        )

    async def _adjust(
        self,
        uow: BillingUnitOfWork,
        account: CreditAccount,
        tokens: int,
        reason: str,
        *,
        actor_id: str,
        now: datetime,
        entry_id: str | None = None,
    ) -> tuple[LedgerRecord, CreditAccount]:
        entry = LedgerEntry("adjustment", purchased_delta=tokens, reason=reason)
        record = LedgerRecord(
            id=entry_id or new_id(),
            account_id=account.account_id,
            period_start=account.period_start,
            entry=entry,
            actor_id=actor_id,
            create_time=now,
        )
        await uow.ledger_records.add(record)
        account = await uow.accounts.apply(account.account_id, entry, now=now)
        uow.outbox.record(
            subject=account.account_id,
            payload=events_pb2.CreditsGranted(
                user_id=account.account_id,
                ledger_entry_id=record.id,
                tokens=tokens,
                reason=events_pb2.CREDIT_GRANT_REASON_ADJUSTMENT,
                plan_id=account.plan_id,
                period_start_time=timestamp_to_proto(account.period_start),
                period_end_time=timestamp_to_proto(account.period_end),
            ),
        )
        return record, account


async def _refundable_payment(uow: BillingUnitOfWork, invoice: Invoice, provider: str) -> Payment:
    """The payment to pay back: the one that paid `invoice`, if the invoice can be refunded."""
    if invoice.reason == "credit_note":
        raise _not_refundable(invoice, "A credit note cannot be refunded.")
    if invoice.status != "paid":
        raise _not_refundable(invoice, f"Only a paid invoice can be refunded; this one is {invoice.status}.")
    credit_note = await uow.invoices.credit_note_for(invoice.id)
    if credit_note is not None:
        raise _not_refundable(
            invoice, f"The invoice was refunded already, by credit note {credit_note.number}."
        )
    payment = await uow.payments.succeeded_for_invoice(invoice.id)
    if payment is None or invoice.amount_paid_minor <= 0:
        raise _not_refundable(invoice, "Nothing was paid on this invoice through a payment provider.")
    if payment.provider != provider:
        raise _not_refundable(
            invoice,
            f"The invoice was paid through {payment.provider!r}; this deployment takes payments "
            f"through {provider!r}.",
        )
    return payment


async def _issue_credit_note(
    uow: BillingUnitOfWork, invoice: Invoice, credit_note_id: str, memo: str, *, now: datetime
) -> Invoice:
    """The credit note of `invoice`: its lines and totals negated, numbered, and paid by the refund."""
    lines = [
        replace(line, unit_price_minor=-line.unit_price_minor, amount_minor=-line.amount_minor)
        for line in invoice.lines
    ]
    period = (
        None
        if invoice.period_start is None or invoice.period_end is None
        else (invoice.period_start, invoice.period_end)
    )
    draft = draft_invoice(
        invoice.user_id, "credit_note", invoice.currency_code, lines, now=now, period=period
    )
    # The refunded invoice's tax comes back with it, whatever rate applies today.
    draft = replace(
        draft,
        id=credit_note_id,
        tax_minor=-invoice.tax_minor,
        total_minor=-invoice.total_minor,
        credited_invoice_id=invoice.id,
        memo=memo,
    )
    opened = await finalize(uow, draft, now=now, due=now)
    paid = replace(opened, status="paid", amount_paid_minor=opened.total_minor, paid_time=now)
    await uow.invoices.save(paid)
    return paid


async def _stored_invoice(uow: BillingUnitOfWork, invoice_id: str) -> Invoice:
    invoice = await uow.invoices.get(invoice_id)
    assert invoice is not None, "a request id is claimed together with its credit note"
    return invoice


def _reason_violations(reason: str) -> list[FieldViolation]:
    # REQUIRED (not empty) is checked before the RPC; blank and over-long are the domain's.
    if not reason.strip():
        return [FieldViolation("reason", "must not be blank", "INVALID_ARGUMENT")]
    if len(reason.strip()) > REASON_MAX_LENGTH:
        return [
            FieldViolation("reason", f"must be at most {REASON_MAX_LENGTH} characters", "INVALID_ARGUMENT")
        ]
    return []


def _invalid(violations: Sequence[FieldViolation]) -> InvalidArgument:
    fields = ", ".join(dict.fromkeys(violation.field for violation in violations))
    return InvalidArgument(
        f"The request has invalid fields: {fields}.", reason="INVALID_ARGUMENT", field_violations=violations
    )


def _unknown_customer() -> NotFound:
    return NotFound("Billing knows no user with this id.", reason="NOT_FOUND")


def _not_refundable(invoice: Invoice, message: str) -> FailedPrecondition:
    return FailedPrecondition(message, reason="INVOICE_NOT_REFUNDABLE", metadata={"invoice_id": invoice.id})
