"""Billing's persistence as its domain sees it: one unit of work with typed repositories.

Same shape as every service (`services.common.unit_of_work`): `write()` and `read()` yield a
`BillingUnitOfWork`; repositories return frozen dataclasses, never commit, and mark what they change
stale so the after-commit hooks drop cached copies. The SQL implementation is
`services.billing.repository`. Reserve and settle also have `CreditFastPath`: one atomic write each,
outside any unit of work, for their common case (ADR 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Final, Protocol

from services.common.unit_of_work import Outbox, UnitsOfWork

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from services.billing.checkout import CheckoutSession, CreditPack, Payment
    from services.billing.customer_admin import LedgerRecord
    from services.billing.idempotency import IdempotencyKey
    from services.billing.invoices import Invoice, InvoiceStatus
    from services.billing.ledger import (
        CreditAccount,
        LedgerEntry,
        LedgerSums,
        NewReservation,
        Reservation,
        SettledUsage,
        SettlementBasis,
        Usage,
    )
    from services.billing.plans import Plan
    from services.billing.subscriptions import Subscription

# The read cache's name for the plan catalog; every plan write marks its one entry stale.
PLAN_CACHE: Final = "billing.plans.v1"
CATALOG_KEY: Final = "catalog"


class PlanRepository(Protocol):
    async def all_plans(self) -> Sequence[Plan]:
        """Every plan, retired ones included, in no particular order."""
        ...

    async def get(self, plan_id: str) -> Plan | None:
        """The plan with this id, retired or not."""
        ...

    async def save(self, plan: Plan) -> None:
        """Insert the plan, or update the one with its id (its create_time stays as stored); the
        cached catalog is dropped once the unit of work commits. The price and the overage price
        must share one currency (ValueError otherwise)."""
        ...

    async def add(self, plan: Plan) -> bool:
        """Insert a new plan; False (and nothing written) when a plan with its id exists, even one a
        concurrent unit of work has not committed yet. Drops the cached catalog like `save`."""
        ...

    async def get_for_update(self, plan_id: str) -> Plan | None:
        """`get`, locking the plan's row until the unit of work ends."""
        ...


class DuplicateReservation(Exception):  # noqa: N818 - named for the condition, like KeyError.
    """A reservation with this account and request id exists already (a concurrent retry won)."""


class SubscriptionRepository(Protocol):
    async def current(self, user_id: str, *, for_update: bool = False) -> Subscription | None:
        """The user's subscription that has not ended; `for_update` locks it until the unit ends."""
        ...

    async def by_id(self, subscription_id: str, *, for_update: bool = False) -> Subscription | None: ...

    async def add(self, subscription: Subscription) -> bool:
        """Insert it; False (and nothing written) when the user already has a current subscription."""
        ...

    async def save(self, subscription: Subscription) -> None:
        """Write its mutable fields (plan, status, period, pending changes, end)."""
        ...


class CreditAccountRepository(Protocol):
    """The cached balances (`credit_accounts`): one row per account, the sums of its current period."""

    async def get(self, account_id: str, *, for_update: bool = False) -> CreditAccount | None: ...

    async def open(self, account: CreditAccount) -> None:
        """Insert the account's row, or replace it with a new period's (a rollover)."""
        ...

    async def hold(self, account_id: str, tokens: int, *, now: datetime) -> CreditAccount | None:
        """Add `tokens` to the reserved sum in one conditional update, if the account's period is
        current at `now` and, on a hard-stop plan, its remaining tokens cover them; the account
        after the hold, or None when it was not made (nothing changed)."""
        ...

    async def apply(self, account_id: str, entry: LedgerEntry, *, now: datetime) -> CreditAccount:
        """Add the entry's deltas to the sums; the account after."""
        ...

    async def apply_if_current(
        self, account_id: str, entry: LedgerEntry, *, now: datetime
    ) -> CreditAccount | None:
        """`apply`, if the account's period is current at `now`; None when it is not (nothing changed)."""
        ...

    async def change_plan(self, account_id: str, plan_id: str, *, hard_stop: bool) -> None:
        """The account's plan changed within the period (an upgrade)."""
        ...

    async def mark_notified(self, account_id: str, percent: int) -> None:
        """Record that the usage threshold `percent` was announced this period."""
        ...


class LedgerRepository(Protocol):
    """The append-only credit ledger (`credit_ledger_entries`)."""

    async def append(
        self, account_id: str, period_start: datetime, entry: LedgerEntry, *, now: datetime
    ) -> str:
        """Add the entry; its id."""
        ...

    async def sums(self, account_id: str, period_start: datetime) -> LedgerSums:
        """The sums of every entry of the account's period: what the cached balance must equal."""
        ...


class LedgerRecordRepository(Protocol):
    """The ledger's entries as stored, with their ids, times and actors: what admins read, and the
    adjustments they append (`credit_ledger_entries` too)."""

    async def add(self, record: LedgerRecord) -> None:
        """Append the entry with its id, time and actor (the cached balance is the caller's)."""
        ...

    async def get(self, entry_id: str) -> LedgerRecord | None: ...

    async def list_for_account(
        self, account_id: str, *, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[LedgerRecord]:
        """The account's entries of every period by (create time, id) descending, strictly after `after`."""
        ...


class ReservationRepository(Protocol):
    async def add(self, reservation: Reservation) -> None:
        """Insert it; `DuplicateReservation` when its (account, request id) exists already."""
        ...

    async def by_request(self, account_id: str, request_id: str) -> Reservation | None: ...

    async def get(self, reservation_id: str, *, for_update: bool = False) -> Reservation | None: ...

    async def close(self, reservation: Reservation) -> bool:
        """Write a closed reservation's outcome if it is still held; False when another call closed
        it first (nothing written)."""
        ...

    async def settle_if_held(
        self, reservation_id: str, request_id: str, usage: Usage, *, now: datetime
    ) -> Reservation | None:
        """Settle the reservation on `usage` at `now` in one conditional update, if it is held and
        `request_id` is its own; the settled reservation, or None (nothing written) otherwise."""
        ...

    async def held_past(self, moment: datetime, *, limit: int) -> Sequence[Reservation]:
        """Up to `limit` held reservations that expired before `moment`, oldest first."""
        ...

    async def usage_by_model(self, account_id: str, period_start: datetime) -> Sequence[SettledUsage]:
        """The settled usage of the account's period per model."""
        ...


class CreditFastPath(Protocol):
    """Reservation and settlement as one atomic write each, outside any unit of work: the calls
    every generation makes, in their common case.

    Each write does everything it says or nothing, and says which. When it did nothing, the ledger
    does the call in a unit of work, which handles every case. Row locks are held only while the
    database runs the write, so callers contending for one account wait the least they can.
    """

    async def reserve(
        self, reservation: NewReservation, entry: LedgerEntry, event: Message
    ) -> CreditAccount | None:
        """Hold `reservation.reserved_tokens` on its account, with the reservation, its ledger
        `entry` and `event` recorded in the account's current period; the account after the hold.
        Held only if the account's period is current at the reservation's create time and, on a
        hard-stop plan, the remaining tokens cover it: None otherwise (nothing written).
        `DuplicateReservation` (nothing written) when the account has a reservation with its
        request id."""
        ...

    async def settlement_basis(self, reservation_id: str) -> SettlementBasis | None:
        """The reservation, its account and the overage price of the account's plan as they are
        now, read without a lock; None when there is no such reservation."""
        ...

    async def settle(
        self,
        settled: Reservation,
        entry: LedgerEntry,
        events: Sequence[Message],
        *,
        expected: CreditAccount,
        most_used: int,
    ) -> CreditAccount | None:
        """Write the reservation's outcome as `settled`, and `entry` to its account's sums and
        ledger, with `events`, if the reservation is still held and the account still has the
        plan, the period, the included and purchased tokens and the announced threshold of
        `expected`, a period current at `settled.close_time`, and at most `most_used` tokens
        used; the account after, or None (nothing written)."""
        ...


class CreditPackRepository(Protocol):
    async def all_packs(self) -> Sequence[CreditPack]:
        """Every pack, retired ones included."""
        ...

    async def get(self, credit_pack_id: str) -> CreditPack | None: ...


class InvoiceRepository(Protocol):
    async def add(self, invoice: Invoice) -> None:
        """Insert the invoice with its lines."""
        ...

    async def get(self, invoice_id: str, *, for_update: bool = False) -> Invoice | None: ...

    async def save(self, invoice: Invoice) -> None:
        """Write its state, amounts paid and times (lines and number never change once written)."""
        ...

    async def next_number(self, year: int) -> int:
        """The next invoice sequence number of `year`; the counter stays locked until the unit ends,
        so numbers are given in commit order with no gaps."""
        ...

    async def list_for_user(
        self, user_id: str, *, status: InvoiceStatus | None, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[Invoice]:
        """The user's invoices by (create time, id) descending, strictly after `after`."""
        ...

    async def credit_note_for(self, invoice_id: str) -> Invoice | None:
        """The credit note that refunds the invoice, if one was issued (at most one is)."""
        ...


class CheckoutRepository(Protocol):
    async def add(self, session: CheckoutSession) -> bool:
        """Insert it; False (nothing written) when the user has a session with its request id."""
        ...

    async def by_request(self, user_id: str, request_id: str) -> CheckoutSession | None: ...

    async def get(self, checkout_id: str, *, for_update: bool = False) -> CheckoutSession | None: ...

    async def save(self, session: CheckoutSession) -> None:
        """Write its status and completion time."""
        ...


class PaymentRepository(Protocol):
    async def add(self, payment: Payment) -> None: ...

    async def count_for_invoice(self, invoice_id: str) -> int: ...

    async def succeeded_for_invoice(self, invoice_id: str) -> Payment | None:
        """The payment that paid the invoice, if one did."""
        ...


class WebhookEventRepository(Protocol):
    async def record(self, provider: str, event_id: str, event_type: str, *, now: datetime) -> bool:
        """Record a provider event as applied; False when it was recorded before (a redelivery)."""
        ...


@dataclass(frozen=True)
class SavedPaymentMethod:
    provider: str
    provider_payment_method: str


@dataclass(frozen=True)
class Customer:
    """Who billing mails about an account."""

    user_id: str
    email: str
    display_name: str


class PaymentMethodRepository(Protocol):
    async def get(self, user_id: str) -> SavedPaymentMethod | None: ...

    async def save(self, user_id: str, method: SavedPaymentMethod, *, now: datetime) -> None:
        """Make `method` the one the user's renewals are charged to."""
        ...


class CustomerRepository(Protocol):
    async def get(self, user_id: str) -> Customer | None: ...

    async def save(self, customer: Customer, *, now: datetime) -> None:
        """Insert the customer, or update their address and name."""
        ...


class IdempotencyKeyRepository(Protocol):
    """The request ids billing's mutating RPCs have acted on (`billing_idempotency_keys`)."""

    async def claim(self, key: IdempotencyKey) -> IdempotencyKey | None:
        """Insert the key unless its (scope, request id) is taken; None when inserted, else the key
        that holds it (nothing written). A claim racing an uncommitted one for the same id waits
        for that unit of work to end."""
        ...

    async def find(self, scope: str, request_id: str) -> IdempotencyKey | None:
        """The key that holds (scope, request id), if a committed call claimed it."""
        ...


class BillingUnitOfWork(Protocol):
    """One transaction of the billing service, with its repositories and its outbox."""

    @property
    def plans(self) -> PlanRepository: ...

    @property
    def subscriptions(self) -> SubscriptionRepository: ...

    @property
    def accounts(self) -> CreditAccountRepository: ...

    @property
    def ledger(self) -> LedgerRepository: ...

    @property
    def ledger_records(self) -> LedgerRecordRepository: ...

    @property
    def reservations(self) -> ReservationRepository: ...

    @property
    def credit_packs(self) -> CreditPackRepository: ...

    @property
    def invoices(self) -> InvoiceRepository: ...

    @property
    def checkouts(self) -> CheckoutRepository: ...

    @property
    def payments(self) -> PaymentRepository: ...

    @property
    def webhook_events(self) -> WebhookEventRepository: ...

    @property
    def idempotency_keys(self) -> IdempotencyKeyRepository: ...

    @property
    def payment_methods(self) -> PaymentMethodRepository: ...

    @property
    def customers(self) -> CustomerRepository: ...

    def record_processed(self, consumer: str, event_id: str) -> None:
        """Record that `consumer` handled the event, committed with the handler's effect (a second
        commit of the same record fails, and the effect is rolled back with it)."""
        ...

    @property
    def outbox(self) -> Outbox: ...


BillingUnitsOfWork = UnitsOfWork[BillingUnitOfWork]
