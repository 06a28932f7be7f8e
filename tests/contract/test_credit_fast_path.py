"""The credit fast path (`CreditFastPath`) on each SQL adapter: each write does all it says or
nothing, writes what the unit-of-work path writes, and holds under concurrency.

The ledger's own contract runs with and without it (tests/contract/test_credit_ledger.py); these
tests pin down the port itself: when it declines, nothing at all was written.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest
from google.protobuf.message import Message

from parley.events.v1 import events_pb2
from services.billing.ledger import (
    CreditAccount,
    CreditLedger,
    Estimate,
    LedgerEntry,
    NewReservation,
    Reservation,
    Usage,
)
from services.billing.plans import PlanCatalog
from services.billing.ports import DuplicateReservation
from services.billing.repository import SqlCreditFastPath, billing_units_of_work, credit_fast_path
from services.billing.subscriptions import SubscriptionManager
from services.common.db import Database
from services.common.model_catalog import load_model_catalog
from services.common.models import new_id
from tests.support.domain import START, Clock, outbox

TTL = timedelta(minutes=15)
ESTIMATE = Estimate("gpt-4o-mini", input_tokens=400, max_output_tokens=600)
USAGE = Usage("gpt-4o-mini", "openai", input_tokens=400, output_tokens=350)


@dataclass
class Ledgers:
    database: Database
    clock: Clock
    fast_path: SqlCreditFastPath
    fast: CreditLedger
    units_only: CreditLedger

    async def account(self, user_id: str) -> CreditAccount:
        return await self.units_only.balance(user_id)


@pytest.fixture
def ledgers(database: Database) -> Ledgers:
    clock = Clock()
    units = billing_units_of_work(database)
    subscriptions = SubscriptionManager(units, PlanCatalog(units), clock=clock)
    fast_path = credit_fast_path(database)

    models = load_model_catalog()

    def ledger(path: SqlCreditFastPath | None) -> CreditLedger:
        return CreditLedger(units, subscriptions, models, reservation_ttl=TTL, clock=clock, fast_path=path)

    return Ledgers(database, clock, fast_path, ledger(fast_path), ledger(None))


def new_reservation(user: str, tokens: int, clock: Clock, *, request_id: str = "req-1") -> NewReservation:
    return NewReservation(
        id=new_id(),
        request_id=request_id,
        account_id=user,
        reserved_tokens=tokens,
        model="gpt-4o-mini",
        create_time=clock(),
        expire_time=clock() + TTL,
    )


def reserved_event(reservation: NewReservation) -> Message:
    return events_pb2.CreditsReserved(reservation_id=reservation.id, user_id=reservation.account_id)


def without_ids(message: Message) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    for field in ("reservation_id", "request_id", "user_id"):
        if copy.DESCRIPTOR.fields_by_name.get(field) is not None:
            copy.ClearField(field)
    return copy


async def test_the_fast_path_writes_what_a_unit_of_work_writes(ledgers: Ledgers) -> None:
    fast_user, units_user = new_id(), new_id()
    results = []
    for ledger, user in ((ledgers.fast, fast_user), (ledgers.units_only, units_user)):
        await ledger.balance(user)
        reservation, held = await ledger.reserve("req-1", user, ESTIMATE)
        settlement = await ledger.settle(reservation.id, "req-1", USAGE)
        results.append((reservation, held, settlement))
    (fast_reservation, fast_held, fast_settled), (reservation, held, settled) = results
    assert replace(fast_reservation, id="", account_id="") == replace(reservation, id="", account_id="")
    assert replace(fast_held, account_id="") == replace(held, account_id="")
    assert replace(fast_settled.reservation, id="", account_id="") == replace(
        settled.reservation, id="", account_id=""
    )
    assert replace(fast_settled.account, account_id="") == replace(settled.account, account_id="")
    assert fast_settled.cost == settled.cost
    for user in (fast_user, units_user):
        cached, derived = await ledgers.units_only.derived_sums(user)
        assert cached == derived

    events = await outbox(ledgers.database)
    for event_type in ("credits.reserved", "credits.settled", "usage.recorded"):
        [fast_event] = [e for e in events if e.type == event_type and e.subject == fast_user]
        [event] = [e for e in events if e.type == event_type and e.subject == units_user]
        assert (fast_event.source, fast_event.event.type) == (event.source, event.event.type)
        assert without_ids(fast_event.payload) == without_ids(event.payload)


async def test_a_reservation_it_cannot_make_writes_nothing(ledgers: Ledgers) -> None:
    user = new_id()
    # No account yet: the unit of work starts the subscription.
    assert await ledgers.fast_path.reserve(*_reserving(user, 10, ledgers.clock)) is None
    await ledgers.fast.balance(user)
    before = await ledgers.account(user)
    events_before = len(await outbox(ledgers.database))

    assert (
        await ledgers.fast_path.reserve(*_reserving(user, before.remaining_tokens + 1, ledgers.clock)) is None
    )

    held = await ledgers.fast_path.reserve(*_reserving(user, 10, ledgers.clock, request_id="taken"))
    assert held is not None and held.reserved_tokens == 10
    with pytest.raises(DuplicateReservation):
        await ledgers.fast_path.reserve(*_reserving(user, 10, ledgers.clock, request_id="taken"))

    assert (await ledgers.account(user)).reserved_tokens == 10
    assert len(await outbox(ledgers.database)) == events_before + 1

    ledgers.clock.advance(timedelta(days=40))  # the period ended: the unit of work rolls it over
    assert await ledgers.fast_path.reserve(*_reserving(user, 10, ledgers.clock)) is None
    assert len(await outbox(ledgers.database)) == events_before + 1


def _reserving(
    user: str, tokens: int, clock: Clock, *, request_id: str = "req-1"
) -> tuple[NewReservation, LedgerEntry, Message]:
    reservation = new_reservation(user, tokens, clock, request_id=request_id)
    return reservation, reservation.entry, reserved_event(reservation)


async def test_a_settlement_on_an_account_that_moved_writes_nothing(ledgers: Ledgers) -> None:
    user = new_id()
    reservation, _ = await ledgers.fast.reserve("req-1", user, ESTIMATE)
    basis = await ledgers.fast_path.settlement_basis(reservation.id)
    assert basis is not None and basis.reservation == reservation
    settled = replace(
        reservation,
        status="settled",
        settled_tokens=USAGE.tokens,
        provider=USAGE.provider,
        input_tokens=USAGE.input_tokens,
        output_tokens=USAGE.output_tokens,
        close_time=START,
    )
    entry = LedgerEntry(
        "settlement",
        used_delta=USAGE.tokens,
        reserved_delta=-reservation.reserved_tokens,
        reservation_id=settled.id,
    )
    events = [events_pb2.CreditsSettled(reservation_id=settled.id), events_pb2.UsageRecorded()]
    account = basis.account
    events_before = len(await outbox(ledgers.database))

    for expected, most_used in (
        (replace(account, purchased_tokens=account.purchased_tokens + 1), 10**9),
        (replace(account, notified_percent=80), 10**9),
        (replace(account, plan_id="pro"), 10**9),
        (account, account.used_tokens - 1),
    ):
        assert (
            await ledgers.fast_path.settle(settled, entry, events, expected=expected, most_used=most_used)
            is None
        )
    for not_so in (replace(settled, request_id="another"), replace(settled, close_time=account.period_end)):
        assert (
            await ledgers.fast_path.settle(not_so, entry, events, expected=account, most_used=10**9) is None
        )
    assert await ledgers.account(user) == account
    assert len(await outbox(ledgers.database)) == events_before
    assert await _reservation(ledgers, reservation.id) == reservation

    after = await ledgers.fast_path.settle(
        settled, entry, events, expected=account, most_used=account.used_tokens
    )
    assert after is not None
    assert (after.used_tokens, after.reserved_tokens) == (USAGE.tokens, 0)
    assert len(await outbox(ledgers.database)) == events_before + 2
    assert await ledgers.fast_path.settle(settled, entry, events, expected=account, most_used=10**9) is None


async def _reservation(ledgers: Ledgers, reservation_id: str) -> Reservation | None:
    basis = await ledgers.fast_path.settlement_basis(reservation_id)
    return None if basis is None else basis.reservation


async def test_parallel_settlements_of_one_reservation_settle_it_once(ledgers: Ledgers) -> None:
    user = new_id()
    reservation, _ = await ledgers.fast.reserve("req-1", user, ESTIMATE)
    outcomes = await asyncio.gather(*(ledgers.fast.settle(reservation.id, "req-1", USAGE) for _ in range(20)))
    assert {outcome.reservation for outcome in outcomes} == {outcomes[0].reservation}
    account = await ledgers.account(user)
    assert (account.used_tokens, account.reserved_tokens) == (USAGE.tokens, 0)
    assert len([e for e in await outbox(ledgers.database) if e.type == "credits.settled"]) == 1
    cached, derived = await ledgers.units_only.derived_sums(user)
    assert cached == derived


async def test_its_writes_wake_the_outbox_relay(ledgers: Ledgers) -> None:
    woken: list[str] = []
    ledgers.database.hot_writes.after_events_committed(lambda: woken.append("relay"))
    user = new_id()
    await ledgers.fast.balance(user)
    reservation, _ = await ledgers.fast.reserve("req-1", user, ESTIMATE)
    await ledgers.fast.settle(reservation.id, "req-1", USAGE)
    assert woken == ["relay", "relay"]
