"""Invoices: what a user is billed, numbered without gaps per year once finalized.

An invoice is made as a draft with its lines, then finalized in the same transaction that takes the
next number of its year from `invoice_number_counters` (a row updated under lock, so numbers are
sequential and gapless even across replicas). States: draft → open → paid, void or uncollectible.
Amounts are whole minor units of one currency; tax is 0 unless a rate is configured.

A refund is a credit note: an invoice of its own (reason "credit_note"), numbered by the same
counter, whose lines negate the refunded invoice's and which names it (`credited_invoice_id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Final, Literal

from parley.billing.v1 import billing_pb2
from parley.events.v1 import events_pb2
from services.billing.ports import BillingUnitOfWork, BillingUnitsOfWork

if TYPE_CHECKING:
    from services.billing.ledger import CreditAccount
    from services.billing.plans import Plan
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.errors import NotFound
from services.common.ids import new_id
from services.common.money import Money
from services.common.pagination import BY_TIME, Page, keyset_page

InvoiceStatus = Literal["draft", "open", "paid", "void", "uncollectible"]
InvoiceReason = Literal["period_end", "upgrade", "top_up", "credit_note"]
LineKind = Literal["subscription", "overage", "credits", "proration_credit"]

INVOICE_REASONS: Final[dict[InvoiceReason, billing_pb2.InvoiceReason.ValueType]] = {
    "period_end": billing_pb2.INVOICE_REASON_PERIOD_END,
    "upgrade": billing_pb2.INVOICE_REASON_UPGRADE,
    "top_up": billing_pb2.INVOICE_REASON_TOP_UP,
    "credit_note": billing_pb2.INVOICE_REASON_CREDIT_NOTE,
}

# Basis points of tax on every invoice (0: no tax is configured).
DEFAULT_TAX_BASIS_POINTS: Final = 0


@dataclass(frozen=True)
class LineItem:
    kind: LineKind
    description: str
    quantity: int
    unit_price_minor: int
    amount_minor: int
    plan_id: str | None = None
    credit_pack_id: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None


@dataclass(frozen=True)
class Invoice:
    id: str
    number: str | None
    user_id: str
    status: InvoiceStatus
    reason: InvoiceReason
    currency_code: str
    lines: tuple[LineItem, ...]
    subtotal_minor: int
    tax_minor: int
    total_minor: int
    amount_paid_minor: int
    period_start: datetime | None
    period_end: datetime | None
    create_time: datetime
    finalize_time: datetime | None
    due_time: datetime | None
    paid_time: datetime | None
    close_time: datetime | None
    # For a credit note: the invoice it refunds, and the admin's reason printed on it.
    credited_invoice_id: str | None = None
    memo: str | None = None

    @property
    def plan_id(self) -> str:
        """The plan the invoice bills a fee for (empty for a credit pack)."""
        return next((line.plan_id for line in self.lines if line.kind == "subscription" and line.plan_id), "")


def draft_invoice(
    user_id: str,
    reason: InvoiceReason,
    currency_code: str,
    lines: Sequence[LineItem],
    *,
    now: datetime,
    tax_basis_points: int = DEFAULT_TAX_BASIS_POINTS,
    period: tuple[datetime, datetime] | None = None,
) -> Invoice:
    """A draft with its totals: subtotal is the lines' sum, tax rounds half up once on the subtotal."""
    subtotal = sum(line.amount_minor for line in lines)
    tax = (subtotal * tax_basis_points + 5_000) // 10_000 if subtotal > 0 else 0
    return Invoice(
        id=new_id(),
        number=None,
        user_id=user_id,
        status="draft",
        reason=reason,
        currency_code=currency_code,
        lines=tuple(lines),
        subtotal_minor=subtotal,
        tax_minor=tax,
        total_minor=subtotal + tax,
        amount_paid_minor=0,
        period_start=None if period is None else period[0],
        period_end=None if period is None else period[1],
        create_time=now,
        finalize_time=None,
        due_time=None,
        paid_time=None,
        close_time=None,
    )


def invoice_number(year: int, sequence: int) -> str:
    """The printed number: the year and the invoice's place in it, e.g. "2031-000042"."""
    return f"{year}-{sequence:06d}"


async def finalize(uow: BillingUnitOfWork, invoice: Invoice, *, now: datetime, due: datetime) -> Invoice:
    """Number the draft (the next of its year, gapless), open it, store it and announce it."""
    sequence = await uow.invoices.next_number(now.year)
    finalized = replace(
        invoice, status="open", number=invoice_number(now.year, sequence), finalize_time=now, due_time=due
    )
    await uow.invoices.add(finalized)
    created = events_pb2.InvoiceCreated(
        invoice_id=finalized.id,
        number=finalized.number or "",
        user_id=finalized.user_id,
        plan_id=finalized.plan_id,
        reason=INVOICE_REASONS[finalized.reason],
        subtotal=money_to_proto(Money(finalized.currency_code, finalized.subtotal_minor)),
        tax=money_to_proto(Money(finalized.currency_code, finalized.tax_minor)),
        total=money_to_proto(Money(finalized.currency_code, finalized.total_minor)),
    )
    if finalized.period_start is not None and finalized.period_end is not None:
        created.period_start_time.CopyFrom(timestamp_to_proto(finalized.period_start))
        created.period_end_time.CopyFrom(timestamp_to_proto(finalized.period_end))
    uow.outbox.record(subject=finalized.user_id, payload=created)
    return finalized


def overage_charge_minor(overage_tokens: int, price_per_1k_minor: int) -> int:
    """A period's overage in whole minor units, rounded up once on the period's total."""
    return -(-overage_tokens * price_per_1k_minor // 1000)


async def invoice_period_end(
    uow: BillingUnitOfWork,
    user_id: str,
    *,
    ended_plan: Plan,
    ended: CreditAccount | None,
    next_plan: Plan,
    next_period: tuple[datetime, datetime],
    now: datetime,
) -> Invoice | None:
    """The invoice of a period end, finalized and queued for collection; None when nothing is owed."""
    lines: list[LineItem] = []
    if next_plan.monthly_price.amount_minor > 0:
        lines.append(
            LineItem(
                kind="subscription",
                description=f"{next_plan.display_name} plan",
                quantity=1,
                unit_price_minor=next_plan.monthly_price.amount_minor,
                amount_minor=next_plan.monthly_price.amount_minor,
                plan_id=next_plan.id,
                period_start=next_period[0],
                period_end=next_period[1],
            )
        )
    overage_price = ended_plan.overage_price_per_1k_tokens
    if ended is not None and overage_price is not None and ended.overage_tokens > 0:
        thousands = -(-ended.overage_tokens // 1000)
        lines.append(
            LineItem(
                kind="overage",
                description=f"{ended.overage_tokens} tokens beyond the allowance",
                quantity=thousands,
                unit_price_minor=overage_price.amount_minor,
                amount_minor=overage_charge_minor(ended.overage_tokens, overage_price.amount_minor),
                plan_id=ended_plan.id,
                period_start=ended.period_start,
                period_end=ended.period_end,
            )
        )
    if sum(line.amount_minor for line in lines) <= 0:
        return None
    invoice = draft_invoice(
        user_id, "period_end", next_plan.monthly_price.currency_code, lines, now=now, period=next_period
    )
    invoice = await finalize(uow, invoice, now=now, due=now)
    uow.outbox.record(
        subject=user_id,
        payload=events_pb2.InvoicePaymentDue(invoice_id=invoice.id, user_id=user_id, attempt=1),
    )
    return invoice


class InvoiceBook:
    """The caller's invoices, newest first, and one by id (only the owner sees it)."""

    def __init__(self, units: BillingUnitsOfWork) -> None:
        self._units = units

    async def list_invoices(
        self, user_id: str, *, page_size: int, page_token: str, status: InvoiceStatus | None
    ) -> Page[Invoice]:
        async def fetch(after: tuple[datetime, str] | None, limit: int) -> Sequence[Invoice]:
            async with self._units.read() as uow:
                return await uow.invoices.list_for_user(user_id, status=status, after=after, limit=limit)

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("invoices", user_id, status or ""),
            sort_key=BY_TIME,
            position=lambda invoice: (invoice.create_time, invoice.id),
            fetch=fetch,
        )

    async def get_invoice(self, user_id: str, invoice_id: str) -> Invoice:
        async with self._units.read() as uow:
            invoice = await uow.invoices.get(invoice_id)
        if invoice is None or invoice.user_id != user_id:
            # Someone else's invoice is as absent as one that does not exist: ids do not leak.
            raise NotFound("There is no such invoice.", reason="NOT_FOUND")
        return invoice
