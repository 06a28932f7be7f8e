"""Customer administration on each SQL adapter (SQLite and PostgreSQL).

Admins look up any user's subscription, balance, ledger and invoices; adjust prepaid credit with an
audited ledger entry; and refund a paid invoice, which issues a credit note, records the refund and
takes a refunded credit pack's tokens back. Both changes are idempotent on the admin's request id.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select

from parley.billing.v1 import billing_pb2
from parley.events.v1 import events_pb2
from services.billing.customer_admin import CustomerAdmin
from services.billing.invoices import Invoice
from services.billing.ledger import Estimate, Usage
from services.billing.models import LedgerEntryRecord, PaymentRecord
from services.billing.payments import SUCCEEDS, RefundResult, SandboxPaymentProvider
from services.billing.repository import billing_units_of_work
from services.common.db import Database
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.ids import new_id
from services.common.money import Money
from tests.support.billing_world import SECRET, World, billing_world
from tests.support.domain import START, payloads, refusal

ADMIN = new_id()
OTHER_ADMIN = new_id()
PACK = "tokens-1m"


class RecordingSandbox(SandboxPaymentProvider):
    """The sandbox, remembering each refund asked of it, and refusing them while `refusing` is set."""

    def __init__(self) -> None:
        super().__init__([SECRET])
        self.refunds: list[tuple[str, Money, str]] = []
        self.refusing = ""

    async def refund(self, provider_payment_id: str, amount: Money, *, idempotency_key: str) -> RefundResult:
        self.refunds.append((provider_payment_id, amount, idempotency_key))
        if self.refusing:
            return RefundResult("failed", "", self.refusing)
        return await super().refund(provider_payment_id, amount, idempotency_key=idempotency_key)


@pytest.fixture
def world(database: Database) -> World:
    return billing_world(database, RecordingSandbox())


def sandbox(world: World) -> RecordingSandbox:
    assert isinstance(world.provider, RecordingSandbox)
    return world.provider


async def bought_pack(world: World, user: str, request_id: str = "buy") -> Invoice:
    """The paid invoice of a credit pack the user bought."""
    session = await world.checkout.create_session(user, request_id, credit_pack_id=PACK)
    await world.pay(session, SUCCEEDS)
    async with billing_units_of_work(world.database).read() as uow:
        invoice = await uow.invoices.get(session.invoice_id)
    assert invoice is not None
    assert invoice.status == "paid"
    return invoice


async def use(world: World, user: str, request: str, tokens: int) -> None:
    held, _ = await world.ledger.reserve(
        request, user, Estimate("gpt-4o-mini", tokens // 2, tokens - tokens // 2)
    )
    await world.ledger.settle(
        held.id, request, Usage("gpt-4o-mini", "openai", tokens // 2, tokens - tokens // 2)
    )


async def balanced(world: World, user: str) -> None:
    cached, derived = await world.ledger.derived_sums(user)
    assert cached == derived


# ---- looking up ----------------------------------------------------------------------------------


async def test_an_admin_reads_any_users_subscription_plan_and_balance(world: World) -> None:
    user = await world.register("ada@example.com")
    await use(world, user, "r1", 1_000)

    customer = await world.customer_admin.customer(user)

    assert (customer.subscription.user_id, customer.subscription.plan_id, customer.plan.id) == (
        user,
        "free",
        "free",
    )
    assert (customer.account.used_tokens, customer.account.remaining_tokens) == (1_000, 99_000)


async def test_an_unknown_user_is_not_found_and_nothing_is_started_for_them(world: World) -> None:
    stranger = new_id()
    refused = await refusal(world.customer_admin.customer(stranger), NotFound)
    assert refused.reason == "NOT_FOUND"
    adjusting = world.customer_admin.adjust_credits("r1", stranger, 5, "goodwill", actor_id=ADMIN)
    assert (await refusal(adjusting, NotFound)).reason == "NOT_FOUND"
    async with billing_units_of_work(world.database).read() as uow:
        assert await uow.subscriptions.current(stranger) is None


async def test_a_lookup_after_the_period_ended_rolls_it_over_first(world: World) -> None:
    user = await world.register("ada@example.com")
    world.clock.advance(timedelta(days=40))
    customer = await world.customer_admin.customer(user)
    assert customer.account.period_start > START
    assert customer.subscription.current_period_start == customer.account.period_start
    assert customer.account.period_end > world.clock()


async def test_ledger_entries_are_listed_newest_first_across_periods_in_pages(world: World) -> None:
    # A minute between steps: entries made at one moment are ordered by id, which says no more.
    user = await world.register("ada@example.com")
    world.clock.advance(timedelta(minutes=1))
    await bought_pack(world, user)
    world.clock.advance(timedelta(minutes=1))
    await use(world, user, "r1", 1_000)
    world.clock.advance(timedelta(days=40))
    await world.ledger.balance(user)  # the rollover
    world.clock.advance(timedelta(minutes=1))
    await world.customer_admin.adjust_credits("adj", user, 7, "goodwill", actor_id=ADMIN)

    everything = await world.customer_admin.ledger_entries(user, page_size=0, page_token="")
    kinds = [record.entry.kind for record in everything.items]
    assert kinds[0] == "adjustment"
    assert set(kinds[1:3]) == {"grant", "carry"}  # the rollover, both at one moment
    assert set(kinds[3:5]) == {"reservation", "settlement"}
    assert kinds[5:] == ["top_up", "grant"]
    assert everything.next_page_token == ""
    times = [record.create_time for record in everything.items]
    assert times == sorted(times, reverse=True)
    assert {record.period_start for record in everything.items} == {
        START,
        everything.items[0].period_start,
    }

    pages, token = [], ""
    while True:
        page = await world.customer_admin.ledger_entries(user, page_size=3, page_token=token)
        pages.append(page.items)
        token = page.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [record.id for page in pages for record in page] == [record.id for record in everything.items]

    someone_else = await world.register("bob@example.com")
    first = await world.customer_admin.ledger_entries(user, page_size=1, page_token="")
    foreign = world.customer_admin.ledger_entries(someone_else, page_size=1, page_token=first.next_page_token)
    assert (await refusal(foreign, InvalidArgument)).reason == "INVALID_PAGE_TOKEN"


async def test_a_users_invoices_are_listed_for_the_admin_credit_notes_included(world: World) -> None:
    user = await world.register("ada@example.com")
    invoice = await bought_pack(world, user)
    world.clock.advance(timedelta(minutes=1))
    credit_note = await world.customer_admin.refund_invoice(
        "ref", user, invoice.id, "duplicate", actor_id=ADMIN
    )

    listed = await world.customer_admin.invoices(user, page_size=0, page_token="", status=None)
    assert [item.id for item in listed.items] == [credit_note.id, invoice.id]
    paid = await world.customer_admin.invoices(user, page_size=1, page_token="", status="paid")
    assert [item.id for item in paid.items] == [credit_note.id]
    assert paid.next_page_token
    open_ones = await world.customer_admin.invoices(user, page_size=0, page_token="", status="open")
    assert open_ones.items == ()


# ---- adjusting credit ----------------------------------------------------------------------------


async def test_an_adjustment_is_an_audited_prepaid_entry_announced_as_a_grant(world: World) -> None:
    user = await world.register("ada@example.com")

    adjustment = await world.customer_admin.adjust_credits(
        "adj-1", user, 250_000, "  outage on 3 March  ", actor_id=ADMIN
    )

    record = adjustment.record
    assert (record.entry.kind, record.entry.purchased_delta, record.entry.reason) == (
        "adjustment",
        250_000,
        "outage on 3 March",
    )
    assert (record.actor_id, record.account_id, record.create_time, record.period_start) == (
        ADMIN,
        user,
        START,
        START,
    )
    assert (adjustment.account.purchased_tokens, adjustment.account.remaining_tokens) == (250_000, 350_000)
    assert (await world.ledger.balance(user)).remaining_tokens == 350_000
    await balanced(world, user)
    [granted] = [
        event
        for event in await payloads(world.database, "credits.granted", events_pb2.CreditsGranted)
        if event.reason == events_pb2.CREDIT_GRANT_REASON_ADJUSTMENT
    ]
    assert (granted.user_id, granted.ledger_entry_id, granted.tokens, granted.plan_id) == (
        user,
        record.id,
        250_000,
        "free",
    )
    async with world.database.unit_of_work(read_only=True) as session:
        stored = (
            await session.execute(select(LedgerEntryRecord).where(LedgerEntryRecord.id == record.id))
        ).scalar_one()
    assert (stored.actor_id, stored.kind, stored.purchased_delta) == (ADMIN, "adjustment", 250_000)


async def test_an_adjustment_is_idempotent_on_the_admins_request_id(world: World) -> None:
    user = await world.register("ada@example.com")
    first = await world.customer_admin.adjust_credits("adj-1", user, 1_000, "goodwill", actor_id=ADMIN)
    world.clock.advance(timedelta(minutes=1))

    again = await world.customer_admin.adjust_credits("adj-1", user, 1_000, "goodwill", actor_id=ADMIN)
    assert again.record == first.record
    assert again.account.purchased_tokens == 1_000

    for tokens, reason, target in ((2_000, "goodwill", user), (1_000, "other", user)):
        reused = world.customer_admin.adjust_credits("adj-1", target, tokens, reason, actor_id=ADMIN)
        assert (await refusal(reused, AlreadyExists)).reason == "REQUEST_ID_REUSED"
    # Request ids are the admin's own: another admin's "adj-1" is a new adjustment.
    other = await world.customer_admin.adjust_credits("adj-1", user, 1_000, "goodwill", actor_id=OTHER_ADMIN)
    assert other.record.id != first.record.id
    assert (await world.ledger.balance(user)).purchased_tokens == 2_000
    adjustments = await payloads(world.database, "credits.granted", events_pb2.CreditsGranted)
    assert [
        event.tokens for event in adjustments if event.reason == events_pb2.CREDIT_GRANT_REASON_ADJUSTMENT
    ] == [
        1_000,
        1_000,
    ]


async def test_a_refused_adjustment_leaves_its_request_id_free(world: World) -> None:
    user = await world.register("ada@example.com")
    await refusal(
        world.customer_admin.adjust_credits("adj-1", new_id(), 5, "goodwill", actor_id=ADMIN), NotFound
    )
    done = await world.customer_admin.adjust_credits("adj-1", user, 5, "goodwill", actor_id=ADMIN)
    assert done.account.purchased_tokens == 5


@pytest.mark.parametrize(
    ("request_id", "tokens", "reason", "fields"),
    [
        ("adj", 0, "goodwill", ["tokens"]),
        ("adj", 10**12 + 1, "goodwill", ["tokens"]),
        ("adj", -(10**12) - 1, "goodwill", ["tokens"]),
        ("adj", 5, "   ", ["reason"]),
        ("adj", 5, "x" * 201, ["reason"]),
        ("r" * 129, 0, "", ["request_id", "reason", "tokens"]),
    ],
)
async def test_invalid_adjustments_are_refused_field_by_field(
    world: World, request_id: str, tokens: int, reason: str, fields: list[str]
) -> None:
    user = await world.register("ada@example.com")
    refused = await refusal(
        world.customer_admin.adjust_credits(request_id, user, tokens, reason, actor_id=ADMIN), InvalidArgument
    )
    assert [violation.field for violation in refused.field_violations] == fields
    assert (await world.ledger.balance(user)).purchased_tokens == 0


async def test_taking_tokens_back_below_zero_stops_a_hard_stop_plan(world: World) -> None:
    user = await world.register("ada@example.com")
    await use(world, user, "r1", 60_000)

    taken = await world.customer_admin.adjust_credits("adj-1", user, -50_000, "abuse", actor_id=ADMIN)

    assert (taken.account.remaining_tokens, taken.account.purchased_tokens) == (-10_000, -50_000)
    refused = await refusal(
        world.ledger.reserve("r2", user, Estimate("gpt-4o-mini", 1, 1)), ResourceExhausted
    )
    assert refused.reason == "INSUFFICIENT_CREDITS"
    await world.customer_admin.adjust_credits("adj-2", user, 20_000, "forgiven", actor_id=ADMIN)
    await world.ledger.reserve("r3", user, Estimate("gpt-4o-mini", 1, 1))
    await balanced(world, user)


async def test_granted_tokens_carry_into_the_next_period_and_a_debt_does_not(world: World) -> None:
    giver, taker = await world.register("giver@example.com"), await world.register("taker@example.com")
    await world.customer_admin.adjust_credits("adj-1", giver, 300_000, "goodwill", actor_id=ADMIN)
    await world.customer_admin.adjust_credits("adj-2", taker, -30_000, "abuse", actor_id=ADMIN)

    world.clock.advance(timedelta(days=31))

    assert (await world.ledger.balance(giver)).remaining_tokens == 100_000 + 300_000
    assert (await world.ledger.balance(taker)).remaining_tokens == 100_000
    await balanced(world, giver)
    await balanced(world, taker)


# ---- refunding -----------------------------------------------------------------------------------


async def test_a_refunded_pack_gets_a_paid_credit_note_and_its_tokens_taken_back(world: World) -> None:
    user = await world.register("ada@example.com")
    invoice = await bought_pack(world, user)
    await use(world, user, "r1", 150_000)  # 100k from the allowance, 50k of the pack
    world.clock.advance(timedelta(hours=1))

    credit_note = await world.customer_admin.refund_invoice(
        "refund-1", user, invoice.id, "bought twice by mistake", actor_id=ADMIN
    )

    assert (credit_note.reason, credit_note.status, credit_note.number) == (
        "credit_note",
        "paid",
        "2031-000002",
    )
    assert (credit_note.credited_invoice_id, credit_note.memo, credit_note.user_id) == (
        invoice.id,
        "bought twice by mistake",
        user,
    )
    assert (credit_note.subtotal_minor, credit_note.total_minor, credit_note.amount_paid_minor) == (
        -1_000,
        -1_000,
        -1_000,
    )
    assert [
        (line.kind, line.credit_pack_id, line.quantity, line.unit_price_minor, line.amount_minor)
        for line in credit_note.lines
    ] == [("credits", PACK, 1, -1_000, -1_000)]
    assert credit_note.paid_time == world.clock()
    # The refunded invoice stays paid: the credit note is what reverses it.
    assert (await world.invoices.get_invoice(user, invoice.id)).status == "paid"
    assert await world.invoices.get_invoice(user, credit_note.id) == credit_note

    [(payment_id, amount, key)] = sandbox(world).refunds
    assert (amount, key) == (Money("USD", 1_000), f"refund:{invoice.id}")
    async with world.database.unit_of_work(read_only=True) as session:
        payments = (
            (
                await session.execute(
                    select(PaymentRecord)
                    .where(PaymentRecord.user_id == user)
                    .order_by(PaymentRecord.created_at)
                )
            )
            .scalars()
            .all()
        )
    assert [(row.invoice_id, row.status, row.amount_minor, row.provider) for row in payments] == [
        (invoice.id, "succeeded", 1_000, "sandbox"),
        (credit_note.id, "refunded", -1_000, "sandbox"),
    ]
    assert payments[0].provider_payment_id == payment_id
    assert payments[1].provider_payment_id.startswith("re_sandbox_")

    [refunded] = await payloads(world.database, "payment.refunded", events_pb2.PaymentRefunded)
    assert (refunded.payment_id, refunded.invoice_id, refunded.user_id, refunded.provider) == (
        payments[0].id,
        invoice.id,
        user,
        "sandbox",
    )
    assert (refunded.amount.currency_code, refunded.amount.amount_minor) == ("USD", 1_000)
    assert (refunded.credit_note_id, refunded.provider_refund_id) == (
        credit_note.id,
        payments[1].provider_payment_id,
    )
    created = await payloads(world.database, "invoice.created", events_pb2.InvoiceCreated)
    assert [(event.invoice_id, event.reason, event.total.amount_minor) for event in created][-1] == (
        credit_note.id,
        billing_pb2.INVOICE_REASON_CREDIT_NOTE,
        -1_000,
    )
    paid = await payloads(world.database, "invoice.paid", events_pb2.InvoicePaid)
    assert credit_note.id not in [event.invoice_id for event in paid]

    # The pack's million tokens are taken back although half of what they paid for was used.
    balance = await world.ledger.balance(user)
    assert (balance.purchased_tokens, balance.remaining_tokens) == (0, -50_000)
    await balanced(world, user)
    [taken] = [
        record
        for record in (await world.customer_admin.ledger_entries(user, page_size=0, page_token="")).items
        if record.entry.kind == "adjustment"
    ]
    assert (taken.entry.purchased_delta, taken.actor_id) == (-1_000_000, ADMIN)
    assert taken.entry.reason == "refund of invoice 2031-000001: bought twice by mistake"
    [granted] = [
        event
        for event in await payloads(world.database, "credits.granted", events_pb2.CreditsGranted)
        if event.reason == events_pb2.CREDIT_GRANT_REASON_ADJUSTMENT
    ]
    assert (granted.tokens, granted.ledger_entry_id) == (-1_000_000, taken.id)


async def test_a_refund_is_idempotent_and_an_invoice_is_refunded_once(world: World) -> None:
    user = await world.register("ada@example.com")
    invoice = await bought_pack(world, user)
    credit_note = await world.customer_admin.refund_invoice(
        "refund-1", user, invoice.id, "duplicate", actor_id=ADMIN
    )

    again = await world.customer_admin.refund_invoice(
        "refund-1", user, invoice.id, "duplicate", actor_id=ADMIN
    )
    assert again == credit_note
    assert len(sandbox(world).refunds) == 1, "a replay does not reach the provider"

    reused = world.customer_admin.refund_invoice(
        "refund-1", user, invoice.id, "another reason", actor_id=ADMIN
    )
    assert (await refusal(reused, AlreadyExists)).reason == "REQUEST_ID_REUSED"
    twice = world.customer_admin.refund_invoice("refund-2", user, invoice.id, "duplicate", actor_id=ADMIN)
    refused = await refusal(twice, FailedPrecondition)
    assert refused.reason == "INVOICE_NOT_REFUNDABLE"
    assert f"credit note {credit_note.number}" in refused.message
    of_credit_note = world.customer_admin.refund_invoice(
        "refund-3", user, credit_note.id, "x", actor_id=ADMIN
    )
    assert (await refusal(of_credit_note, FailedPrecondition)).reason == "INVOICE_NOT_REFUNDABLE"
    assert len(sandbox(world).refunds) == 1
    assert len(await payloads(world.database, "payment.refunded", events_pb2.PaymentRefunded)) == 1
    assert (await world.ledger.balance(user)).purchased_tokens == 0


async def test_concurrent_refunds_of_one_invoice_refund_it_once(world: World) -> None:
    user = await world.register("ada@example.com")
    invoice = await bought_pack(world, user)

    outcomes = await asyncio.gather(
        *(
            world.customer_admin.refund_invoice(f"refund-{n}", user, invoice.id, "duplicate", actor_id=ADMIN)
            for n in range(4)
        ),
        world.customer_admin.refund_invoice("refund-0", user, invoice.id, "duplicate", actor_id=ADMIN),
        return_exceptions=True,
    )

    credit_notes = {outcome.id for outcome in outcomes if isinstance(outcome, Invoice)}
    refusals = [outcome for outcome in outcomes if not isinstance(outcome, Invoice)]
    assert len(credit_notes) == 1
    assert all(
        isinstance(error, FailedPrecondition) and error.reason == "INVOICE_NOT_REFUNDABLE"
        for error in refusals
    )
    # Whoever reached the provider asked for the same refund, keyed by the invoice.
    assert {key for _, _, key in sandbox(world).refunds} == {f"refund:{invoice.id}"}
    assert len(await payloads(world.database, "payment.refunded", events_pb2.PaymentRefunded)) == 1
    assert (await world.ledger.balance(user)).purchased_tokens == 0
    await balanced(world, user)


async def test_only_a_paid_invoice_of_that_user_is_refunded(world: World) -> None:
    user, other = await world.register("ada@example.com"), await world.register("bob@example.com")
    unpaid = await world.checkout.create_session(user, "buy", credit_pack_id=PACK)

    not_paid = world.customer_admin.refund_invoice("r1", user, unpaid.invoice_id, "x", actor_id=ADMIN)
    assert (await refusal(not_paid, FailedPrecondition)).reason == "INVOICE_NOT_REFUNDABLE"
    for owner, invoice_id in ((other, unpaid.invoice_id), (user, new_id())):
        missing = world.customer_admin.refund_invoice("r2", owner, invoice_id, "x", actor_id=ADMIN)
        assert (await refusal(missing, NotFound)).reason == "NOT_FOUND"
    assert sandbox(world).refunds == []


async def test_a_refund_the_provider_refuses_changes_nothing_and_leaves_the_id_free(world: World) -> None:
    user = await world.register("ada@example.com")
    invoice = await bought_pack(world, user)
    sandbox(world).refusing = "charge_disputed"

    refused = await refusal(
        world.customer_admin.refund_invoice("refund-1", user, invoice.id, "duplicate", actor_id=ADMIN),
        FailedPrecondition,
    )

    assert refused.reason == "INVOICE_NOT_REFUNDABLE"
    assert "charge_disputed" in refused.message
    assert await payloads(world.database, "payment.refunded", events_pb2.PaymentRefunded) == []
    assert (await world.ledger.balance(user)).purchased_tokens == 1_000_000
    sandbox(world).refusing = ""
    credit_note = await world.customer_admin.refund_invoice(
        "refund-1", user, invoice.id, "duplicate", actor_id=ADMIN
    )
    assert credit_note.number == "2031-000002"


async def test_refunding_an_upgrade_returns_the_money_and_keeps_the_plan(world: World) -> None:
    user = await world.register("ada@example.com")
    world.clock.advance(timedelta(days=10))
    await world.subscribe(user, "pro", SUCCEEDS)
    [upgrade] = (await world.invoices.list_invoices(user, page_size=0, page_token="", status="paid")).items

    credit_note = await world.customer_admin.refund_invoice(
        "refund-1", user, upgrade.id, "goodwill", actor_id=ADMIN
    )

    assert credit_note.total_minor == -upgrade.total_minor < 0
    assert (credit_note.period_start, credit_note.period_end) == (upgrade.period_start, upgrade.period_end)
    assert [line.amount_minor for line in credit_note.lines] == [-line.amount_minor for line in upgrade.lines]
    customer = await world.customer_admin.customer(user)
    assert customer.subscription.plan_id == "pro"
    entries = (await world.customer_admin.ledger_entries(user, page_size=0, page_token="")).items
    assert "adjustment" not in [record.entry.kind for record in entries]


async def test_without_a_payment_provider_refunds_are_unavailable(database: Database) -> None:
    world = billing_world(database)
    units = billing_units_of_work(database)
    admin = CustomerAdmin(units, world.subscriptions, world.invoices, None, unconfigured_reason="no secrets")
    refused = await refusal(admin.refund_invoice("r1", new_id(), new_id(), "x", actor_id=ADMIN), Unavailable)
    assert refused.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert "no secrets" in refused.message
