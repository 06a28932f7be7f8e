"""Reconciliation: after a scripted month of usage, upgrades, top-ups, a refund and failed payments,
the ledger and the invoices agree exactly, on each SQL adapter.

What "agree" means, checked from the stored rows, not from the code's own bookkeeping:
- every account's cached balance equals the sums of its ledger entries;
- the tokens of paid credit-pack lines equal the ledger's top-up entries, and their money the packs'
  prices; a refunded pack's credit-note line equals the adjustment that took its tokens back;
- each overage line equals the overage the ledger derives for its period, at the plan's price;
- each upgrade grant equals the plan difference times the share of the period that was invoiced;
- money in equals money billed: succeeded payments sum to the paid invoices, refunds to the credit
  notes (so money in less money refunded is what the paid invoices and credit notes net to), and
  what dunning gave up on is exactly the uncollectible invoices.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from parley.events.v1 import events_pb2
from services.billing.invoices import Invoice, overage_charge_minor
from services.billing.ledger import Estimate, Usage
from services.billing.models import CheckoutSessionRecord, LedgerEntryRecord, PaymentRecord
from services.billing.payments import DECLINED, FAILS_LATER, SUCCEEDS
from services.billing.repository import billing_units_of_work
from services.billing.subscriptions import PPM
from services.common.db import Database
from services.common.ids import new_id
from tests.support.billing_world import World, billing_world
from tests.support.domain import payloads

PLAN_INCLUDED = {"free": 100_000, "pro": 2_000_000, "team": 10_000_000}
PACK_TOKENS = {"tokens-1m": 1_000_000, "tokens-5m": 5_000_000}
ADMIN = new_id()


@pytest.fixture
def world(database: Database) -> World:
    return billing_world(database)


async def use(world: World, user: str, request: str, tokens: int) -> None:
    held, _ = await world.ledger.reserve(
        request, user, Estimate("gpt-4o-mini", tokens // 2, tokens - tokens // 2)
    )
    await world.ledger.settle(
        held.id, request, Usage("gpt-4o-mini", "openai", tokens // 2, tokens - tokens // 2)
    )


async def scripted_month(world: World) -> dict[str, str]:
    users = {
        name: await world.register(f"{name}@example.com")
        for name in ("topper", "upgrader", "defaulter", "retrier")
    }
    # topper: stays on free, buys 1M tokens and uses part of them.
    pack = await world.checkout.create_session(users["topper"], "pack", credit_pack_id="tokens-1m")
    await world.pay(pack, SUCCEEDS)
    await use(world, users["topper"], "t1", 150_000)
    # retrier: a declined top-up, then the same checkout paid.
    retry = await world.checkout.create_session(users["retrier"], "pack", credit_pack_id="tokens-5m")
    await world.pay(retry, DECLINED)
    await world.pay(retry, SUCCEEDS)
    # ... and refunded by an admin two days later.
    world.clock.advance(timedelta(days=2))
    await world.customer_admin.refund_invoice(
        "refund", users["retrier"], retry.invoice_id, "bought by mistake", actor_id=ADMIN
    )

    world.clock.advance(timedelta(days=8))
    # upgrader: to pro ten days in, then into overage.
    await world.subscribe(users["upgrader"], "pro", SUCCEEDS)
    await use(world, users["upgrader"], "u1", 1_000_000)
    await use(world, users["upgrader"], "u2", 1_234_567)
    # defaulter: to team on a card that pays once and then declines.
    await world.subscribe(users["defaulter"], "team", FAILS_LATER)
    await use(world, users["defaulter"], "d1", 50_000)

    # The month ends: renewals, overage, collection and the whole of dunning.
    world.clock.advance(timedelta(days=22))
    await world.run_due_timers()
    for _day in range(8):
        world.clock.advance(timedelta(days=1))
        await world.run_due_timers()
    return users


async def _payments_sum(session: AsyncSession, status: str) -> int:
    """The amounts of the stored payments in `status`: received are positive, paid back negative."""
    total: int = (
        await session.execute(
            select(func.coalesce(func.sum(PaymentRecord.amount_minor), 0)).where(
                PaymentRecord.status == status
            )
        )
    ).scalar_one()
    return total


async def test_after_a_month_the_ledger_and_the_invoices_agree_exactly(world: World) -> None:
    users = await scripted_month(world)
    units = billing_units_of_work(world.database)

    invoices: list[Invoice] = []
    for user in users.values():
        invoices.extend(
            (await world.invoices.list_invoices(user, page_size=200, page_token="", status=None)).items
        )
        cached, derived = await world.ledger.derived_sums(user)
        assert cached == derived, user

    async with world.database.unit_of_work(read_only=True) as session:
        entries = (await session.execute(select(LedgerEntryRecord))).scalars().all()
        shares = dict(
            (
                await session.execute(
                    select(
                        CheckoutSessionRecord.invoice_id, CheckoutSessionRecord.upgrade_fraction_ppm
                    ).where(CheckoutSessionRecord.plan_id.is_not(None))
                )
            ).all()
        )
        paid_in, refunded = [await _payments_sum(session, status) for status in ("succeeded", "refunded")]

    # Top-ups: tokens and money; a refunded pack's tokens come back off the ledger as an adjustment.
    top_up_tokens = sum(entry.purchased_delta for entry in entries if entry.kind == "top_up")
    taken_back = sum(entry.purchased_delta for entry in entries if entry.kind == "adjustment")
    credit_lines = [
        line
        for invoice in invoices
        if invoice.status == "paid"
        for line in invoice.lines
        if line.kind == "credits"
    ]
    bought = [line for line in credit_lines if line.amount_minor > 0]
    credited = [line for line in credit_lines if line.amount_minor < 0]
    assert top_up_tokens == sum(PACK_TOKENS[line.credit_pack_id or ""] for line in bought) == 6_000_000
    assert -taken_back == sum(PACK_TOKENS[line.credit_pack_id or ""] for line in credited) == 5_000_000
    assert sum(line.amount_minor for line in credit_lines) == 1_000 + 4_500 - 4_500

    # Overage: each overage line is the ledger's overage of its period at the plan's price.
    sums: dict[tuple[str, object], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for entry in entries:
        bucket = sums[(entry.account_id, entry.period_start)]
        for field in ("included_delta", "purchased_delta", "used_delta"):
            bucket[field] += getattr(entry, field)
    overage_lines = [
        (invoice, line) for invoice in invoices for line in invoice.lines if line.kind == "overage"
    ]
    assert overage_lines, "the script runs the upgrader into overage"
    for invoice, line in overage_lines:
        period = sums[(invoice.user_id, line.period_start)]
        overage = period["used_delta"] - period["included_delta"] - period["purchased_delta"]
        assert line.amount_minor == overage_charge_minor(overage, line.unit_price_minor)

    # Upgrades: the grant and the fee are the same share of the period (stored with the checkout).
    upgrade_grants = sorted(
        entry.included_delta
        for entry in entries
        if entry.kind == "grant" and entry.reason.startswith("upgrade")
    )
    expected_grants = []
    for invoice in invoices:
        if invoice.reason != "upgrade" or invoice.status != "paid":
            continue
        [fee] = [line for line in invoice.lines if line.kind == "subscription"]
        fraction_ppm = shares[invoice.id] or 0
        assert fee.amount_minor == (fee.unit_price_minor * fraction_ppm + PPM // 2) // PPM
        expected_grants.append(
            (PLAN_INCLUDED[fee.plan_id or ""] - PLAN_INCLUDED["free"]) * fraction_ppm // PPM
        )
    assert len(expected_grants) == 2
    assert upgrade_grants == sorted(expected_grants)

    # Money: what came in is what the paid invoices billed, what went back is what the credit notes
    # credit, and what did not come in is exactly the uncollectible.
    paid = [invoice for invoice in invoices if invoice.status == "paid" and invoice.reason != "credit_note"]
    credit_notes = [invoice for invoice in invoices if invoice.reason == "credit_note"]
    assert paid_in == sum(invoice.total_minor for invoice in paid)
    assert refunded == sum(credit_note.total_minor for credit_note in credit_notes) == -4_500
    assert paid_in + refunded == sum(invoice.total_minor for invoice in paid + credit_notes)
    assert {credit_note.credited_invoice_id for credit_note in credit_notes} <= {
        invoice.id for invoice in paid
    }
    succeeded = await payloads(world.database, "payment.succeeded", events_pb2.PaymentSucceeded)
    assert sum(event.amount.amount_minor for event in succeeded) == paid_in
    refunds = await payloads(world.database, "payment.refunded", events_pb2.PaymentRefunded)
    assert sum(event.amount.amount_minor for event in refunds) == -refunded
    uncollectible = [invoice for invoice in invoices if invoice.status == "uncollectible"]
    written_off = await payloads(world.database, "invoice.uncollectible", events_pb2.InvoiceUncollectible)
    assert [invoice.id for invoice in uncollectible] == [event.invoice_id for event in written_off]
    assert {invoice.user_id for invoice in uncollectible} == {users["defaulter"]}
    assert all(invoice.status in ("paid", "uncollectible") for invoice in invoices)

    async with units.read() as uow:
        defaulter = await uow.subscriptions.current(users["defaulter"])
        upgrader = await uow.subscriptions.current(users["upgrader"])
    assert defaulter is not None and defaulter.plan_id == "free"
    assert upgrader is not None and (upgrader.plan_id, upgrader.status) == ("pro", "active")
