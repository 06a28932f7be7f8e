"""Credit packs, checkout, signed webhooks and invoices on each SQL adapter (SQLite and PostgreSQL).

The sandbox provider is the real adapter here: its `pay` makes the signed delivery it would send,
and the tests also send tampered, stale, replayed and out-of-order ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, timedelta

import pytest

from parley.billing.v1 import billing_pb2
from parley.common.v1 import common_pb2
from parley.events.v1 import events_pb2
from services.billing.checkout import Checkout, CheckoutSession
from services.billing.invoices import InvoiceBook
from services.billing.ledger import CreditLedger
from services.billing.payments import (
    DECLINED,
    INSUFFICIENT_FUNDS,
    REQUIRES_ACTION,
    SUCCEEDS,
    SandboxPaymentProvider,
)
from services.billing.plans import PlanCatalog
from services.billing.repository import billing_units_of_work, credit_fast_path
from services.billing.subscriptions import SubscriptionManager
from services.billing.webhook_signatures import sign
from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.ids import new_id
from services.common.model_catalog import load_model_catalog
from services.common.money import Money
from tests.support.domain import START, Clock, payloads, refusal

SECRET = "whsec_test_secret"
PACK = "tokens-1m"
PACK_PRICE = Money("USD", 1_000)


@dataclass
class World:
    database: Database
    clock: Clock
    provider: SandboxPaymentProvider
    checkout: Checkout
    ledger: CreditLedger
    invoices: InvoiceBook
    checkout_subscriptions: SubscriptionManager

    def delivery(
        self, session: CheckoutSession, card: str = SUCCEEDS, amount: Money = PACK_PRICE
    ) -> tuple[bytes, str]:
        return self.provider.pay(session.id, session.provider_session_id, amount, card, at=self.clock())

    async def pay(self, session: CheckoutSession, card: str = SUCCEEDS, amount: Money = PACK_PRICE) -> bool:
        body, header = self.delivery(session, card, amount)
        return (await self.checkout.handle_webhook("sandbox", body, header)).duplicate


def build(database: Database, provider: SandboxPaymentProvider | None) -> World:
    clock = Clock()
    units = billing_units_of_work(database)
    subscriptions = SubscriptionManager(units, PlanCatalog(units), clock=clock)
    # As billing serves it: reserve and settle take the fast path when they can.
    ledger = CreditLedger(
        units, subscriptions, load_model_catalog(), clock=clock, fast_path=credit_fast_path(database)
    )
    checkout = Checkout(units, subscriptions, ledger, provider, unconfigured_reason="no secrets", clock=clock)
    assert provider is not None
    return World(database, clock, provider, checkout, ledger, InvoiceBook(units), subscriptions)


@pytest.fixture
def world(database: Database) -> World:
    return build(database, SandboxPaymentProvider([SECRET]))


async def test_the_credit_packs_on_sale_smallest_first(world: World) -> None:
    page = await world.checkout.list_credit_packs(page_size=0, page_token="")
    assert [(pack.id, pack.tokens, pack.price) for pack in page.items] == [
        ("tokens-1m", 1_000_000, Money("USD", 1_000)),
        ("tokens-5m", 5_000_000, Money("USD", 4_500)),
    ]
    first = await world.checkout.list_credit_packs(page_size=1, page_token="")
    second = await world.checkout.list_credit_packs(page_size=1, page_token=first.next_page_token)
    assert [pack.id for pack in second.items] == ["tokens-5m"]


async def test_a_paid_top_up_credits_the_balance_at_once(world: World) -> None:
    user = new_id()
    session = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)
    assert (session.status, session.amount, session.provider) == ("open", PACK_PRICE, "sandbox")
    assert session.url.endswith(session.provider_session_id)
    [invoice] = (await world.invoices.list_invoices(user, page_size=0, page_token="", status=None)).items
    assert (invoice.status, invoice.reason, invoice.total_minor, invoice.number) == (
        "open",
        "top_up",
        1_000,
        "2031-000001",
    )
    assert [(line.kind, line.credit_pack_id, line.amount_minor) for line in invoice.lines] == [
        ("credits", PACK, 1_000)
    ]

    assert await world.pay(session) is False
    balance = await world.ledger.balance(user)
    assert balance.purchased_tokens == 1_000_000
    assert balance.remaining_tokens == 100_000 + 1_000_000
    cached, derived = await world.ledger.derived_sums(user)
    assert cached == derived
    paid = await world.invoices.get_invoice(user, invoice.id)
    assert (paid.status, paid.amount_paid_minor, paid.paid_time) == ("paid", 1_000, START)

    topped = await payloads(world.database, "credits.topped_up", events_pb2.CreditsToppedUp)
    assert [(event.user_id, event.tokens, event.invoice_id) for event in topped] == [
        (user, 1_000_000, invoice.id)
    ]
    assert len(await payloads(world.database, "payment.succeeded", events_pb2.PaymentSucceeded)) == 1
    assert len(await payloads(world.database, "invoice.paid", events_pb2.InvoicePaid)) == 1


async def test_a_replayed_webhook_changes_nothing(world: World) -> None:
    user = new_id()
    session = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)
    body, header = world.delivery(session)
    first = await world.checkout.handle_webhook("sandbox", body, header)
    again = await world.checkout.handle_webhook("sandbox", body, header)
    assert (first.duplicate, again.duplicate, again.event_id) == (False, True, first.event_id)
    # A second, different payment event for the same session (the provider retried) is no-op too.
    assert await world.pay(session) is False
    assert (await world.ledger.balance(user)).purchased_tokens == 1_000_000
    assert len(await payloads(world.database, "credits.topped_up", events_pb2.CreditsToppedUp)) == 1


@pytest.mark.parametrize(
    ("card", "reason"), [(DECLINED, "PAYMENT_DECLINED"), (INSUFFICIENT_FUNDS, "PAYMENT_INSUFFICIENT_FUNDS")]
)
async def test_a_failed_payment_leaves_the_invoice_open_and_can_be_retried(
    world: World, card: str, reason: str
) -> None:
    user = new_id()
    session = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)
    await world.pay(session, card)
    failed = await payloads(world.database, "payment.failed", events_pb2.PaymentFailed)
    assert [(event.attempt, event.failure_reason) for event in failed] == [
        (1, common_pb2.ErrorReason.Value(f"ERROR_REASON_{reason}"))
    ]
    assert (await world.ledger.balance(user)).purchased_tokens == 0
    [invoice] = (await world.invoices.list_invoices(user, page_size=0, page_token="", status=None)).items
    assert invoice.status == "open"

    await world.pay(session, SUCCEEDS)
    assert (await world.ledger.balance(user)).purchased_tokens == 1_000_000
    # A failure reported after the payment succeeded (out of order) is ignored.
    await world.pay(session, DECLINED)
    assert len(await payloads(world.database, "payment.failed", events_pb2.PaymentFailed)) == 1


async def test_requires_action_records_the_attempt_and_owes_nothing(world: World) -> None:
    user = new_id()
    session = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)
    await world.pay(session, REQUIRES_ACTION)
    [invoice] = (await world.invoices.list_invoices(user, page_size=0, page_token="", status=None)).items
    assert invoice.status == "open"
    assert await payloads(world.database, "payment.failed", events_pb2.PaymentFailed) == []


async def test_tampered_stale_and_unsigned_webhooks_are_refused_and_change_nothing(world: World) -> None:
    user = new_id()
    session = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)
    body, header = world.delivery(session)

    tampered = body.replace(b'"amount_total":1000', b'"amount_total":1001')
    for bad_body, bad_header, reason in (
        (tampered, header, "WEBHOOK_SIGNATURE_INVALID"),
        (body, None, "WEBHOOK_SIGNATURE_INVALID"),
        (body, sign(body, "whsec_someone_else", at=world.clock()), "WEBHOOK_SIGNATURE_INVALID"),
        (body, sign(body, SECRET, at=world.clock() - timedelta(minutes=6)), "WEBHOOK_SIGNATURE_EXPIRED"),
    ):
        refused = await refusal(
            world.checkout.handle_webhook("sandbox", bad_body, bad_header), InvalidArgument
        )
        assert refused.reason == reason

    wrong_amount, wrong_header = world.delivery(session, amount=Money("USD", 1))
    refused = await refusal(
        world.checkout.handle_webhook("sandbox", wrong_amount, wrong_header), InvalidArgument
    )
    assert refused.reason == "WEBHOOK_PAYLOAD_INVALID"
    garbage = b'{"id": "evt_1", "type": "checkout.session.completed", "data": []}'
    refused = await refusal(
        world.checkout.handle_webhook("sandbox", garbage, sign(garbage, SECRET, at=world.clock())),
        InvalidArgument,
    )
    assert refused.reason == "WEBHOOK_PAYLOAD_INVALID"
    unknown = await refusal(world.checkout.handle_webhook("stripe", body, header), NotFound)
    assert unknown.reason == "WEBHOOK_PROVIDER_UNKNOWN"

    assert (await world.ledger.balance(user)).purchased_tokens == 0
    # The genuine delivery still works afterwards: the refused ones recorded nothing.
    assert (await world.checkout.handle_webhook("sandbox", body, header)).duplicate is False
    assert (await world.ledger.balance(user)).purchased_tokens == 1_000_000


async def test_checkout_is_idempotent_on_its_request_id(world: World) -> None:
    user = new_id()
    first = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)
    assert await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK) == first
    reused = await refusal(
        world.checkout.create_session(user, "buy-1", credit_pack_id="tokens-5m"), AlreadyExists
    )
    assert reused.reason == "REQUEST_ID_REUSED"
    together = await asyncio.gather(
        *(world.checkout.create_session(user, "buy-2", credit_pack_id=PACK) for _ in range(10))
    )
    assert len({session.id for session in together}) == 1
    invoices = (await world.invoices.list_invoices(user, page_size=0, page_token="", status=None)).items
    assert len(invoices) == 2


async def test_invoice_numbers_are_gapless_per_year_under_concurrency(world: World) -> None:
    users = [new_id() for _ in range(12)]
    await asyncio.gather(*(world.checkout.create_session(user, "buy", credit_pack_id=PACK) for user in users))
    world.clock.advance(timedelta(days=366))
    await world.checkout.create_session(users[0], "next-year", credit_pack_id=PACK)
    numbers: list[str] = []
    for user in users:
        page = await world.invoices.list_invoices(user, page_size=0, page_token="", status=None)
        numbers.extend(invoice.number or "" for invoice in page.items)
    numbers.sort()
    assert numbers == [f"2031-{index:06d}" for index in range(1, 13)] + ["2032-000001"]


async def test_invoices_are_listed_newest_first_and_only_to_their_owner(world: World) -> None:
    user, other = new_id(), new_id()
    for index in range(3):
        await world.checkout.create_session(user, f"buy-{index}", credit_pack_id=PACK)
        world.clock.advance(timedelta(minutes=1))
    first = await world.invoices.list_invoices(user, page_size=2, page_token="", status=None)
    second = await world.invoices.list_invoices(
        user, page_size=2, page_token=first.next_page_token, status=None
    )
    listed = [*first.items, *second.items]
    assert [invoice.create_time for invoice in listed] == sorted(
        (i.create_time for i in listed), reverse=True
    )
    assert second.next_page_token == ""
    assert (await world.invoices.list_invoices(user, page_size=0, page_token="", status="paid")).items == ()
    hidden = await refusal(world.invoices.get_invoice(other, listed[0].id), NotFound)
    missing = await refusal(world.invoices.get_invoice(other, new_id()), NotFound)
    assert hidden.message == missing.message


async def test_unknown_packs_plans_and_a_missing_provider_are_typed_errors(database: Database) -> None:
    world = build(database, SandboxPaymentProvider([SECRET]))
    user = new_id()
    missing = await refusal(world.checkout.create_session(user, "r", credit_pack_id="tokens-9t"), NotFound)
    assert missing.reason == "CREDIT_PACK_NOT_FOUND"
    nothing = await refusal(world.checkout.create_session(user, "r"), InvalidArgument)
    assert nothing.reason == "REQUIRED_FIELD"

    unconfigured = Checkout(
        billing_units_of_work(database),
        SubscriptionManager(billing_units_of_work(database), PlanCatalog(billing_units_of_work(database))),
        world.ledger,
        None,
        unconfigured_reason="set PARLEY_BILLING_WEBHOOK_SECRETS",
    )
    off = await refusal(unconfigured.create_session(user, "r", credit_pack_id=PACK), Unavailable)
    assert off.reason == "PAYMENT_PROVIDER_UNAVAILABLE"
    assert "PARLEY_BILLING_WEBHOOK_SECRETS" in off.message


# ---- plan changes -------------------------------------------------------------------------------


async def test_an_upgrade_is_prorated_paid_through_checkout_and_takes_effect_at_once(world: World) -> None:
    user = new_id()
    await world.ledger.balance(user)  # on free since START
    world.clock.advance(timedelta(days=15, hours=12))  # 31-day March: half the period is left
    change = await world.checkout.change_plan(user, "up-1", "pro")
    assert change.subscription.plan_id == "free"  # nothing changes before the payment
    assert change.checkout_session is not None and change.invoice is not None
    assert (change.invoice.reason, change.invoice.status) == ("upgrade", "open")
    assert [(line.kind, line.amount_minor) for line in change.invoice.lines] == [("subscription", 1_000)]
    assert change.checkout_session.amount == Money("USD", 1_000)

    await world.pay(change.checkout_session, amount=Money("USD", 1_000))
    subscription, plan = await world.checkout_subscriptions.current(user)
    assert (subscription.plan_id, plan.id) == ("pro", "pro")
    assert subscription.current_period_end == change.subscription.current_period_end  # same period
    balance = await world.ledger.balance(user)
    assert (balance.plan_id, balance.hard_stop) == ("pro", False)
    # Pro includes 2,000,000 tokens against free's 100,000: half the difference is granted.
    assert balance.included_tokens == 100_000 + 950_000
    cached, derived = await world.ledger.derived_sums(user)
    assert cached == derived
    kinds = [
        change.kind
        for change in await payloads(world.database, "subscription.changed", events_pb2.SubscriptionChanged)
    ]
    assert kinds == [
        events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED,
        events_pb2.SUBSCRIPTION_CHANGE_KIND_UPGRADED,
    ]
    grants = await payloads(world.database, "credits.granted", events_pb2.CreditsGranted)
    assert [(grant.reason, grant.tokens) for grant in grants][-1] == (
        events_pb2.CREDIT_GRANT_REASON_UPGRADE,
        950_000,
    )
    # What revenue analytics read off the invoice events: plan, reason, period, amounts.
    [created] = await payloads(world.database, "invoice.created", events_pb2.InvoiceCreated)
    assert (created.plan_id, created.reason, created.total.amount_minor) == (
        "pro",
        billing_pb2.INVOICE_REASON_UPGRADE,
        1_000,
    )
    assert created.period_end_time.ToDatetime(tzinfo=UTC) == change.subscription.current_period_end
    [paid] = await payloads(world.database, "invoice.paid", events_pb2.InvoicePaid)
    assert (paid.plan_id, paid.number) == ("pro", created.number)


async def test_an_upgrade_between_paid_plans_credits_the_unused_part_of_the_old_one(world: World) -> None:
    user = new_id()
    await world.ledger.balance(user)
    first = await world.checkout.change_plan(user, "up-1", "pro")
    assert first.checkout_session is not None
    await world.pay(first.checkout_session, amount=first.checkout_session.amount)
    world.clock.advance(timedelta(days=15, hours=12))
    second = await world.checkout.change_plan(user, "up-2", "team")
    assert second.invoice is not None and second.checkout_session is not None
    # Team 5,000 for half a period, less pro's 2,000 for the same half.
    assert [(line.kind, line.amount_minor) for line in second.invoice.lines] == [
        ("subscription", 2_500),
        ("proration_credit", -1_000),
    ]
    assert second.invoice.total_minor == 1_500


async def test_downgrades_and_cancellations_wait_for_the_period_end_and_can_be_undone(world: World) -> None:
    user = new_id()
    await world.ledger.balance(user)
    upgrade = await world.checkout.change_plan(user, "up", "team")
    assert upgrade.checkout_session is not None
    await world.pay(upgrade.checkout_session, amount=upgrade.checkout_session.amount)

    down = await world.checkout.change_plan(user, "down", "pro")
    assert (down.subscription.plan_id, down.subscription.pending_plan_id) == ("team", "pro")
    assert down.effective_time == down.subscription.current_period_end
    assert (await world.checkout.change_plan(user, "down-again", "pro")).subscription == down.subscription
    resumed = await world.checkout_subscriptions.resume(user)
    assert resumed.pending_plan_id is None
    not_pending = await refusal(world.checkout_subscriptions.resume(user), FailedPrecondition)
    assert not_pending.reason == "SUBSCRIPTION_NOT_CANCELLING"

    cancelled = await world.checkout_subscriptions.cancel(user)
    assert cancelled.cancel_at_period_end is True
    assert (await world.checkout_subscriptions.cancel(user)) == cancelled
    world.clock.advance(timedelta(days=32))
    after, plan = await world.checkout_subscriptions.current(user)
    assert (after.plan_id, after.status, plan.hard_stop) == ("free", "active", True)
    assert after.id != cancelled.id
    assert after.create_time == cancelled.current_period_end
    balance = await world.ledger.balance(user)
    assert (balance.plan_id, balance.included_tokens) == ("free", 100_000)
    kinds = [
        change.kind
        for change in await payloads(world.database, "subscription.changed", events_pb2.SubscriptionChanged)
    ]
    assert kinds[-2:] == [
        events_pb2.SUBSCRIPTION_CHANGE_KIND_CANCELLED,
        events_pb2.SUBSCRIPTION_CHANGE_KIND_CREATED,
    ]


async def test_a_scheduled_downgrade_applies_at_the_period_end(world: World) -> None:
    user = new_id()
    await world.ledger.balance(user)
    upgrade = await world.checkout.change_plan(user, "up", "team")
    assert upgrade.checkout_session is not None
    await world.pay(upgrade.checkout_session, amount=upgrade.checkout_session.amount)
    await world.checkout.change_plan(user, "down", "pro")
    world.clock.advance(timedelta(days=32))
    subscription, _ = await world.checkout_subscriptions.current(user)
    assert (subscription.plan_id, subscription.pending_plan_id) == ("pro", None)
    assert (await world.ledger.balance(user)).included_tokens == 2_000_000


async def test_plan_changes_refuse_what_makes_no_sense(world: World) -> None:
    user = new_id()
    await world.ledger.balance(user)
    same = await refusal(world.checkout.change_plan(user, "r1", "free"), FailedPrecondition)
    assert same.reason == "ALREADY_ON_PLAN"
    unknown = await refusal(world.checkout.change_plan(user, "r2", "platinum"), NotFound)
    assert unknown.reason == "PLAN_NOT_FOUND"
    free_cancel = await refusal(world.checkout_subscriptions.cancel(user), FailedPrecondition)
    assert free_cancel.reason == "SUBSCRIPTION_NOT_CANCELLABLE"
    both = await refusal(
        world.checkout.create_session(user, "r3", credit_pack_id=PACK, plan_id="pro"), InvalidArgument
    )
    assert both.reason == "REQUIRED_FIELD"
    first = await world.checkout.change_plan(user, "up", "pro")
    assert first.checkout_session is not None
    reused = await refusal(world.checkout.change_plan(user, "up", "team"), AlreadyExists)
    assert reused.reason == "REQUEST_ID_REUSED"


async def test_the_card_is_saved_from_the_payment_intent_and_renewal_intents_are_ignored(
    world: World,
) -> None:
    user = new_id()
    session = await world.checkout.create_session(user, "buy-1", credit_pack_id=PACK)

    def signed(event: Mapping[str, object]) -> tuple[bytes, str]:
        body = json.dumps(event).encode()
        return body, sign(body, SECRET, at=world.clock())

    # As Stripe reports a checkout's card: on the payment intent, with our checkout in its metadata.
    succeeded = {
        "id": "evt_pi_ok",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": "pi_1",
                "payment_method": "pm_card_visa",
                "metadata": {"parley_checkout_id": session.id},
            }
        },
    }
    assert (await world.checkout.handle_webhook("sandbox", *signed(succeeded))).duplicate is False
    # A renewal charge's own events carry no checkout: acknowledged, nothing changes.
    renewal_failed = {
        "id": "evt_pi_renewal",
        "type": "payment_intent.payment_failed",
        "data": {"object": {"id": "pi_2", "last_payment_error": {"decline_code": "insufficient_funds"}}},
    }
    assert (await world.checkout.handle_webhook("sandbox", *signed(renewal_failed))).duplicate is False
    assert await payloads(world.database, "payment.failed", events_pb2.PaymentFailed) == []
    async with billing_units_of_work(world.database).read() as uow:
        saved = await uow.payment_methods.get(user)
    assert saved is not None
    assert (saved.provider, saved.provider_payment_method) == ("sandbox", "pm_card_visa")
