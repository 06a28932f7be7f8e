"""The credit ledger: hard budgets that hold across replicas, in tokens.

Every change to a user's credit is an append-only ledger entry with its signed effect on four sums
of the account's current period: tokens included by the plan, tokens purchased (credit packs and
what carried over), tokens used (settled) and tokens reserved (held for generations in flight).
`credit_accounts` caches those sums per account and is updated in the same transaction as every
append, so the cached balance always equals what the ledger derives (`LedgerRepository.sums`).

Reserving is one conditional UPDATE of the account's row: on a hard-stop plan it adds to the
reserved sum only if the remaining tokens cover the estimate. The database serialises those
updates per account (a row lock on PostgreSQL, the write lock on SQLite), so concurrent
reservations against one balance can never together take more than it holds, on any number of
replicas.

Reserving and settling are what every generation does, so each first tries `CreditFastPath`: one
atomic write outside any unit of work, which holds row locks only while the database runs it (on
PostgreSQL one statement), and either does everything or nothing. A reservation there is the
conditional hold with the reservation, its ledger entry and its event; a request id already taken
refuses the whole write. A settlement's events depend on the balance it lands on (the overage it
makes, the usage thresholds it crosses), so the fast path only takes a settlement that makes no
overage and crosses no threshold: its events are then the same for any usage up to a bound. They are
computed from the reservation and account as read, and the write applies only if the account still
has the plan, period, allowance and announced threshold that were read, and has used no more than
that bound. Everything else (a repeat, a refusal, an account to start or roll over, a settlement
with something to announce, or one the account moved away from) is done in a unit of work, which
reads under locks and handles every case; the fast path declining costs one more round trip.

The documented bound on going negative: a settlement charges what the generation really used, even
beyond its reservation, because those tokens were produced. So a hard-stop balance can end below
zero by at most what the settlements of the reservations in flight used beyond their estimates;
while it is below zero every new reservation is refused. Chat reserves the prompt plus the reply's
`max_output_tokens`, which a provider cannot exceed, so in practice only a miscounted prompt can
overshoot, and by that much.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Literal

from google.protobuf.message import Message

from parley.events.v1 import events_pb2
from services.billing.invoices import overage_charge_minor
from services.billing.mail import request_mail
from services.billing.ports import (
    BillingUnitOfWork,
    BillingUnitsOfWork,
    CreditFastPath,
    DuplicateReservation,
)
from services.common.clock import Clock, utc_now
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
)
from services.common.ids import new_id
from services.common.model_catalog import ModelCatalog
from services.common.money import Money

if TYPE_CHECKING:
    from services.billing.subscriptions import SubscriptionManager

EntryKind = Literal[
    "grant", "carry", "reservation", "settlement", "release", "expiry", "top_up", "adjustment"
]
ReservationStatus = Literal["held", "settled", "released", "expired"]

# Reservations a caller never settled or released (a crashed chat replica) hold credit until the
# sweeper releases them; a generation that takes longer than this must settle before it ends.
DEFAULT_RESERVATION_TTL: Final = timedelta(minutes=15)
# Shares of the period's allowance whose crossing is announced once per period (usage.threshold_crossed).
USAGE_THRESHOLDS_PERCENT: Final = (80, 100)
# How many expired reservations the sweeper releases per transaction.
SWEEP_BATCH: Final = 100


@dataclass(frozen=True)
class LedgerEntry:
    """One append-only entry: its signed effect on the period's sums."""

    kind: EntryKind
    included_delta: int = 0
    purchased_delta: int = 0
    used_delta: int = 0
    reserved_delta: int = 0
    reservation_id: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class LedgerSums:
    """The four sums of a period, as the ledger derives them or the cached balance holds them."""

    included: int
    purchased: int
    used: int
    reserved: int


@dataclass(frozen=True)
class CreditAccount:
    """The cached balance of an account's current period (today an account is one user)."""

    account_id: str
    plan_id: str
    hard_stop: bool
    period_start: datetime
    period_end: datetime
    included_tokens: int
    purchased_tokens: int
    used_tokens: int
    reserved_tokens: int
    # The highest usage threshold (percent) already announced this period; 0 for none.
    notified_percent: int

    @property
    def remaining_tokens(self) -> int:
        """Included plus purchased minus used and reserved; below zero only within the bound."""
        return self.included_tokens + self.purchased_tokens - self.used_tokens - self.reserved_tokens

    @property
    def overage_tokens(self) -> int:
        """Tokens used beyond the allowance and the prepaid credit this period."""
        return max(0, self.used_tokens - self.included_tokens - self.purchased_tokens)

    @property
    def purchased_available(self) -> int:
        """Prepaid tokens not yet used: usage draws on the allowance first, then on these."""
        return max(0, self.purchased_tokens - max(0, self.used_tokens - self.included_tokens))

    @property
    def sums(self) -> LedgerSums:
        return LedgerSums(self.included_tokens, self.purchased_tokens, self.used_tokens, self.reserved_tokens)

    def before(self, entry: LedgerEntry) -> CreditAccount:
        """This account as it was before the entry's deltas were added (`applied` undone)."""
        return replace(
            self,
            included_tokens=self.included_tokens - entry.included_delta,
            purchased_tokens=self.purchased_tokens - entry.purchased_delta,
            used_tokens=self.used_tokens - entry.used_delta,
            reserved_tokens=self.reserved_tokens - entry.reserved_delta,
        )

    def applied(self, entry: LedgerEntry) -> CreditAccount:
        """This account with the entry's deltas added (what `CreditAccountRepository.apply` stores)."""
        return replace(
            self,
            included_tokens=self.included_tokens + entry.included_delta,
            purchased_tokens=self.purchased_tokens + entry.purchased_delta,
            used_tokens=self.used_tokens + entry.used_delta,
            reserved_tokens=self.reserved_tokens + entry.reserved_delta,
        )


@dataclass(frozen=True)
class Estimate:
    """What a generation is expected to use: it reserves the prompt plus the longest reply."""

    model: str
    input_tokens: int
    max_output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.max_output_tokens


@dataclass(frozen=True)
class Usage:
    """What a generation really used, as the provider reported it."""

    model: str
    provider: str
    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Reservation:
    """Credit held for one generation."""

    id: str
    request_id: str
    account_id: str
    status: ReservationStatus
    period_start: datetime
    reserved_tokens: int
    settled_tokens: int
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    create_time: datetime
    expire_time: datetime
    close_time: datetime | None


@dataclass(frozen=True)
class NewReservation:
    """A reservation as its caller makes it, before the account's hold places it in a period."""

    id: str
    request_id: str
    account_id: str
    reserved_tokens: int
    model: str
    create_time: datetime
    expire_time: datetime

    @property
    def entry(self) -> LedgerEntry:
        """Its ledger entry: the hold."""
        return LedgerEntry("reservation", reserved_delta=self.reserved_tokens, reservation_id=self.id)

    def held_in(self, period_start: datetime) -> Reservation:
        """The reservation held in the account's period starting at `period_start`."""
        return Reservation(
            id=self.id,
            request_id=self.request_id,
            account_id=self.account_id,
            status="held",
            period_start=period_start,
            reserved_tokens=self.reserved_tokens,
            settled_tokens=0,
            model=self.model,
            provider="",
            input_tokens=0,
            output_tokens=0,
            create_time=self.create_time,
            expire_time=self.expire_time,
            close_time=None,
        )


@dataclass(frozen=True)
class SettlementBasis:
    """What a settlement is computed from, read together without a lock."""

    reservation: Reservation
    account: CreditAccount
    # The overage price of the account's plan (None on a hard-stop plan).
    overage_price_per_1k_tokens: Money | None


@dataclass(frozen=True)
class SettledUsage:
    """The settled usage of one model in a period."""

    model: str
    input_tokens: int
    output_tokens: int
    requests: int


@dataclass(frozen=True)
class ModelCost:
    usage: SettledUsage
    cost: Money


@dataclass(frozen=True)
class PeriodUsage:
    """GetUsage: the balance, the usage per model and the overage charged so far."""

    account: CreditAccount
    models: tuple[ModelCost, ...]
    overage_cost: Money


@dataclass(frozen=True)
class Settlement:
    reservation: Reservation
    account: CreditAccount
    cost: Money


class CreditLedger:
    """Reserve, settle and release credit, and the balance and usage derived from the ledger."""

    def __init__(
        self,
        units: BillingUnitsOfWork,
        subscriptions: SubscriptionManager,
        models: ModelCatalog,
        *,
        currency_code: str = "USD",
        reservation_ttl: timedelta = DEFAULT_RESERVATION_TTL,
        clock: Clock = utc_now,
        fast_path: CreditFastPath | None = None,
    ) -> None:
        """Without `fast_path`, every reservation and settlement is a unit of work."""
        if reservation_ttl <= timedelta(0):
            raise ValueError("reservation_ttl must be positive")
        self._units = units
        self._fast_path = fast_path
        self._subscriptions = subscriptions
        self._models = models
        self._currency_code = currency_code
        self._reservation_ttl = reservation_ttl
        self._clock = clock

    async def reserve(
        self, request_id: str, account_id: str, estimate: Estimate
    ) -> tuple[Reservation, CreditAccount]:
        """Hold credit for a generation; a repeat of `request_id` returns the same reservation.

        RESOURCE_EXHAUSTED (INSUFFICIENT_CREDITS, with a QuotaFailure) when a hard-stop balance
        does not cover the estimate.
        """
        _check_estimate(estimate, self._models)
        now = self._clock()
        new = NewReservation(
            id=new_id(),
            request_id=request_id,
            account_id=account_id,
            reserved_tokens=estimate.tokens,
            model=estimate.model,
            create_time=now,
            expire_time=now + self._reservation_ttl,
        )
        if self._fast_path is not None:
            try:
                account = await self._fast_path.reserve(new, new.entry, _reserved_event(new))
            except DuplicateReservation:
                account = None
            if account is not None:
                return new.held_in(account.period_start), account
        # A repeat, a refusal, or an account to start or roll over first: a unit of work answers
        # every case. A concurrent call with the same request id can win the insert; the retry
        # then finds it.
        for _attempt in range(2):
            try:
                return await self._reserve_once(new, estimate)
            except DuplicateReservation:
                continue
        raise FailedPrecondition(
            "Another call with this request_id is still being processed; retry it.",
            reason="CONCURRENT_MODIFICATION",
        )

    async def _reserve_once(
        self, new: NewReservation, estimate: Estimate
    ) -> tuple[Reservation, CreditAccount]:
        now, account_id = new.create_time, new.account_id
        short_of: CreditAccount | None = None
        async with self._units.write() as uow:
            existing = await uow.reservations.by_request(account_id, new.request_id)
            if existing is not None:
                _same_request(existing, estimate)
                return existing, await self._account(uow, account_id, now)
            account = await uow.accounts.hold(account_id, new.reserved_tokens, now=now)
            if account is None:
                current = await uow.accounts.get(account_id)
                if current is None or current.period_end <= now:
                    # No account yet (the user.registered event is still on its way) or its period
                    # ended (the rollover event is late): bring it up to date, then try once more.
                    await self._subscriptions.ensure_current(uow, account_id, now)
                    account = await uow.accounts.hold(account_id, new.reserved_tokens, now=now)
            if account is None:
                short_of = await self._account(uow, account_id, now)
            else:
                reservation = new.held_in(account.period_start)
                await uow.reservations.add(reservation)
                await uow.ledger.append(account_id, account.period_start, new.entry, now=now)
                uow.outbox.record(subject=account_id, payload=_reserved_event(new))
                return reservation, account
        # Raised after the unit of work, so what `ensure_current` set up stays committed.
        assert short_of is not None
        raise _insufficient(short_of, estimate)

    async def settle(self, reservation_id: str, request_id: str, usage: Usage) -> Settlement:
        """Charge the real usage and release the rest of the hold; a repeat returns the same outcome."""
        _check_usage(usage)
        now = self._clock()
        if self._fast_path is not None:
            settlement = await self._settle_fast(self._fast_path, reservation_id, request_id, usage, now)
            if settlement is not None:
                return settlement
        async with self._units.write() as uow:
            settled = await uow.reservations.settle_if_held(reservation_id, request_id, usage, now=now)
            if settled is None:
                return await self._settled_already(uow, reservation_id, request_id, usage, now)
            entry = _settlement_entry(settled)
            account = await uow.accounts.apply_if_current(settled.account_id, entry, now=now)
            if account is None:
                # The period ended (its rollover event is late): the usage counts in the new one.
                await self._subscriptions.ensure_current(uow, settled.account_id, now)
                account = await uow.accounts.apply(settled.account_id, entry, now=now)
            await uow.ledger.append(account.account_id, account.period_start, entry, now=now)
            cost = self._cost(usage.model, usage)
            plan = await self._subscriptions.plan_in(uow, account.plan_id)
            for event in self._settlement_events(
                settled, account.before(entry), account, cost, plan.overage_price_per_1k_tokens
            ):
                uow.outbox.record(subject=account.account_id, payload=event)
            await self._announce_thresholds(uow, account)
            return Settlement(settled, account, cost)

    async def _settle_fast(
        self, fast_path: CreditFastPath, reservation_id: str, request_id: str, usage: Usage, now: datetime
    ) -> Settlement | None:
        """The settlement that crosses no usage threshold and goes into no overage, computed from the
        reservation and account as read, and written in one atomic step that holds the account to
        what the computation assumed. None when it is not such a settlement, or is no longer by the
        time it is written, or is not a settlement at all (unknown, repeated, closed, expired): the
        unit of work answers those."""
        basis = await fast_path.settlement_basis(reservation_id)
        if basis is None:
            return None
        reservation, before = basis.reservation, basis.account
        if reservation.request_id != request_id or reservation.status != "held" or before.period_end <= now:
            return None
        most_used = _most_used_for_a_quiet_settlement(before, usage.tokens)
        if before.used_tokens > most_used:
            # What it announces depends on exactly how much was used: only a lock holds that still.
            return None
        settled = _settled(reservation, usage, now)
        entry = _settlement_entry(settled)
        cost = self._cost(usage.model, usage)
        events = self._settlement_events(
            settled, before, before.applied(entry), cost, basis.overage_price_per_1k_tokens
        )
        account = await fast_path.settle(settled, entry, events, expected=before, most_used=most_used)
        return None if account is None else Settlement(settled, account, cost)

    def _settlement_events(
        self,
        settled: Reservation,
        before: CreditAccount,
        after: CreditAccount,
        cost: Money,
        overage_price: Money | None,
    ) -> list[Message]:
        """CreditsSettled and UsageRecorded of a settlement that took the account from `before` to
        `after` (the usage thresholds it crossed are `_announce_thresholds`')."""
        overage_charge = (
            Money(self._currency_code, 0)
            if overage_price is None
            else Money(
                overage_price.currency_code,
                overage_charge_minor(after.overage_tokens, overage_price.amount_minor)
                - overage_charge_minor(before.overage_tokens, overage_price.amount_minor),
            )
        )
        return [
            events_pb2.CreditsSettled(
                reservation_id=settled.id,
                request_id=settled.request_id,
                user_id=after.account_id,
                reserved_tokens=settled.reserved_tokens,
                settled_tokens=settled.settled_tokens,
                cost=money_to_proto(cost),
                model=settled.model,
                provider=settled.provider,
            ),
            events_pb2.UsageRecorded(
                user_id=after.account_id,
                plan_id=after.plan_id,
                request_id=settled.request_id,
                reservation_id=settled.id,
                model=settled.model,
                provider=settled.provider,
                input_tokens=settled.input_tokens,
                output_tokens=settled.output_tokens,
                overage_tokens=after.overage_tokens - before.overage_tokens,
                cost=money_to_proto(cost),
                overage_charge=money_to_proto(overage_charge),
                period_start_time=timestamp_to_proto(after.period_start),
            ),
        ]

    async def _settled_already(
        self, uow: BillingUnitOfWork, reservation_id: str, request_id: str, usage: Usage, now: datetime
    ) -> Settlement:
        """A repeat's outcome: the reservation was settled on this usage; any other state is refused."""
        reservation = await self._held_or_closed(uow, reservation_id, request_id)
        if reservation.status != "settled":
            _still_held(reservation)
            # Held after all: it was closed and reopened in between, which nothing does.
            raise FailedPrecondition(
                "The reservation changed while it was settled; retry to see its outcome.",
                reason="CONCURRENT_MODIFICATION",
            )
        if (reservation.input_tokens, reservation.output_tokens, reservation.model) != (
            usage.input_tokens,
            usage.output_tokens,
            usage.model,
        ):
            raise FailedPrecondition(
                "The reservation was settled already with another usage.", reason="RESERVATION_CLOSED"
            )
        account = await self._account(uow, reservation.account_id, now)
        return Settlement(reservation, account, self._cost(usage.model, usage))

    async def release(self, reservation_id: str, request_id: str) -> tuple[Reservation, CreditAccount]:
        """Give the hold back without charge; a repeat returns the same outcome."""
        now = self._clock()
        async with self._units.write() as uow:
            reservation = await self._held_or_closed(uow, reservation_id, request_id)
            if reservation.status == "released":
                return reservation, await self._account(uow, reservation.account_id, now)
            _still_held(reservation)
            released = replace(reservation, status="released", close_time=now)
            account = await self._release(uow, released, now, events_pb2.CREDIT_RELEASE_REASON_RELEASED)
            return released, account

    async def top_up(
        self, uow: BillingUnitOfWork, account_id: str, tokens: int, *, reason: str, now: datetime
    ) -> tuple[str, CreditAccount]:
        """Add prepaid tokens within the caller's unit of work (a paid credit pack); (entry id, account)."""
        if tokens <= 0:
            raise ValueError("a top-up adds a positive number of tokens")
        account = await self._account(uow, account_id, now)
        entry = LedgerEntry("top_up", purchased_delta=tokens, reason=reason)
        entry_id = await uow.ledger.append(account.account_id, account.period_start, entry, now=now)
        return entry_id, await uow.accounts.apply(account.account_id, entry, now=now)

    async def release_expired(self, *, limit: int = SWEEP_BATCH) -> int:
        """Release up to `limit` reservations held past their expiry (the sweeper's one pass)."""
        now = self._clock()
        async with self._units.write() as uow:
            due = await uow.reservations.held_past(now, limit=limit)
            for reservation in due:
                expired = replace(reservation, status="expired", close_time=now)
                await self._release(uow, expired, now, events_pb2.CREDIT_RELEASE_REASON_EXPIRED)
        return len(due)

    async def balance(self, account_id: str) -> CreditAccount:
        """The account's balance now (its subscription is started or rolled over first if due)."""
        now = self._clock()
        async with self._units.read() as uow:
            account = await uow.accounts.get(account_id)
        if account is not None and account.period_end > now:
            return account
        async with self._units.write() as uow:
            return await self._subscriptions.ensure_current(uow, account_id, now)

    async def usage(self, account_id: str) -> PeriodUsage:
        """The balance with the period's usage per model and its overage cost so far."""
        account = await self.balance(account_id)
        async with self._units.read() as uow:
            settled = await uow.reservations.usage_by_model(account_id, account.period_start)
        plan = await self._subscriptions.plan(account.plan_id)
        models = tuple(
            ModelCost(
                usage,
                Money(
                    self._currency_code, self._cost_of(usage.model, usage.input_tokens, usage.output_tokens)
                ),
            )
            for usage in settled
        )
        overage_price = plan.overage_price_per_1k_tokens
        overage_cost = (
            Money(plan.monthly_price.currency_code, 0)
            if overage_price is None
            else Money(
                overage_price.currency_code,
                overage_charge_minor(account.overage_tokens, overage_price.amount_minor),
            )
        )
        return PeriodUsage(account, models, overage_cost)

    async def derived_sums(self, account_id: str) -> tuple[LedgerSums, LedgerSums]:
        """(the cached balance's sums, the ledger's sums) of the current period; they must be equal."""
        async with self._units.read() as uow:
            account = await uow.accounts.get(account_id)
            if account is None:
                raise NotFound("There is no credit account for this user.", reason="NOT_FOUND")
            return account.sums, await uow.ledger.sums(account_id, account.period_start)

    # ---- within a unit of work ------------------------------------------------------------------

    async def _account(self, uow: BillingUnitOfWork, account_id: str, now: datetime) -> CreditAccount:
        account = await uow.accounts.get(account_id)
        if account is None or account.period_end <= now:
            return await self._subscriptions.ensure_current(uow, account_id, now)
        return account

    async def _held_or_closed(
        self, uow: BillingUnitOfWork, reservation_id: str, request_id: str
    ) -> Reservation:
        reservation = await uow.reservations.get(reservation_id, for_update=True)
        if reservation is None or reservation.request_id != request_id:
            # One answer for an unknown id and a mismatched request id: neither says the other exists.
            raise NotFound(
                "There is no such reservation for this request_id.", reason="RESERVATION_NOT_FOUND"
            )
        return reservation

    async def _close(self, uow: BillingUnitOfWork, closed: Reservation) -> None:
        if not await uow.reservations.close(closed):
            raise FailedPrecondition(
                "The reservation was closed by a concurrent call; retry to see its outcome.",
                reason="CONCURRENT_MODIFICATION",
            )

    async def _append(
        self, uow: BillingUnitOfWork, account: CreditAccount, entry: LedgerEntry, now: datetime
    ) -> CreditAccount:
        await uow.ledger.append(account.account_id, account.period_start, entry, now=now)
        return await uow.accounts.apply(account.account_id, entry, now=now)

    async def _release(
        self,
        uow: BillingUnitOfWork,
        closed: Reservation,
        now: datetime,
        reason: events_pb2.CreditReleaseReason.ValueType,
    ) -> CreditAccount:
        await self._close(uow, closed)
        account = await self._account(uow, closed.account_id, now)
        kind: EntryKind = "expiry" if closed.status == "expired" else "release"
        entry = LedgerEntry(kind, reserved_delta=-closed.reserved_tokens, reservation_id=closed.id)
        account = await self._append(uow, account, entry, now)
        uow.outbox.record(
            subject=closed.account_id,
            payload=events_pb2.CreditsReleased(
                reservation_id=closed.id,
                request_id=closed.request_id,
                user_id=closed.account_id,
                tokens=closed.reserved_tokens,
                reason=reason,
            ),
        )
        return account

    async def _announce_thresholds(self, uow: BillingUnitOfWork, account: CreditAccount) -> None:
        if account.included_tokens <= 0:
            return
        used_percent = account.used_tokens * 100 // account.included_tokens
        crossed = [
            threshold
            for threshold in USAGE_THRESHOLDS_PERCENT
            if account.notified_percent < threshold <= used_percent
        ]
        for threshold in crossed:
            uow.outbox.record(
                subject=account.account_id,
                payload=events_pb2.UsageThresholdCrossed(
                    user_id=account.account_id,
                    plan_id=account.plan_id,
                    threshold_percent=threshold,
                    included_tokens=account.included_tokens,
                    used_tokens=account.used_tokens,
                    period_start_time=timestamp_to_proto(account.period_start),
                    period_end_time=timestamp_to_proto(account.period_end),
                ),
            )
            await request_mail(
                uow,
                account.account_id,
                f"quota_{threshold}",
                {
                    "used_tokens": str(account.used_tokens),
                    "included_tokens": str(account.included_tokens),
                    "period_end_time": account.period_end.isoformat(),
                },
            )
        if crossed:
            await uow.accounts.mark_notified(account.account_id, max(crossed))

    def _cost(self, model_id: str, usage: Usage) -> Money:
        return Money(self._currency_code, self._cost_of(model_id, usage.input_tokens, usage.output_tokens))

    def _cost_of(self, model_id: str, input_tokens: int, output_tokens: int) -> int:
        model = self._models.get(model_id)
        # Usage of a model the catalog no longer lists (retired since) is still charged in tokens;
        # its money cost at list prices is unknown, so 0.
        return 0 if model is None else model.usage_cost_minor(input_tokens, output_tokens)


def _reserved_event(new: NewReservation) -> events_pb2.CreditsReserved:
    return events_pb2.CreditsReserved(
        reservation_id=new.id,
        request_id=new.request_id,
        user_id=new.account_id,
        tokens=new.reserved_tokens,
        model=new.model,
        expire_time=timestamp_to_proto(new.expire_time),
    )


def _settled(reservation: Reservation, usage: Usage, now: datetime) -> Reservation:
    """The held `reservation` settled on `usage` at `now`."""
    return replace(
        reservation,
        status="settled",
        settled_tokens=usage.tokens,
        model=usage.model,
        provider=usage.provider,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        close_time=now,
    )


def _settlement_entry(settled: Reservation) -> LedgerEntry:
    """Charges what was used and gives back the whole hold."""
    return LedgerEntry(
        "settlement",
        used_delta=settled.settled_tokens,
        reserved_delta=-settled.reserved_tokens,
        reservation_id=settled.id,
    )


def _most_used_for_a_quiet_settlement(account: CreditAccount, tokens: int) -> int:
    """The most tokens `account` may have used for a settlement of `tokens` to cross no usage
    threshold and go into no overage: up to there, what the settlement announces is the same
    whatever exactly was used (no overage, no threshold event), as long as the plan, the period,
    the included and purchased tokens and the thresholds announced stay as they are."""
    most_used_after = account.included_tokens + account.purchased_tokens
    upcoming = [percent for percent in USAGE_THRESHOLDS_PERCENT if percent > account.notified_percent]
    if account.included_tokens > 0 and upcoming:
        # `_announce_thresholds` announces p once used * 100 // included >= p, that is once
        # used * 100 >= p * included.
        most_used_after = min(most_used_after, (min(upcoming) * account.included_tokens - 1) // 100)
    return most_used_after - tokens


def _check_estimate(estimate: Estimate, models: ModelCatalog) -> None:
    if models.get(estimate.model) is None:
        raise InvalidArgument(f"There is no model {estimate.model!r}.", reason="MODEL_NOT_FOUND")
    if estimate.input_tokens < 0 or estimate.max_output_tokens < 0 or estimate.tokens <= 0:
        raise InvalidArgument(
            "An estimate needs a positive number of tokens and no negative count.", reason="INVALID_ARGUMENT"
        )


def _check_usage(usage: Usage) -> None:
    if usage.input_tokens < 0 or usage.output_tokens < 0:
        raise InvalidArgument("Token counts must not be negative.", reason="INVALID_ARGUMENT")
    if not usage.model:
        raise InvalidArgument("actual_usage.model is required.", reason="REQUIRED_FIELD")


def _same_request(existing: Reservation, estimate: Estimate) -> None:
    if (existing.model, existing.reserved_tokens) != (estimate.model, estimate.tokens):
        raise AlreadyExists(
            "This request_id was used for another reservation; use a new one for a new request.",
            reason="REQUEST_ID_REUSED",
        )


def _still_held(reservation: Reservation) -> None:
    if reservation.status == "expired":
        raise FailedPrecondition(
            "The reservation expired and its credit was released; reserve again.",
            reason="RESERVATION_EXPIRED",
        )
    if reservation.status != "held":
        raise FailedPrecondition(
            f"The reservation is {reservation.status} already.", reason="RESERVATION_CLOSED"
        )


def _insufficient(account: CreditAccount, estimate: Estimate) -> ResourceExhausted:
    remaining = max(account.remaining_tokens, 0)
    return ResourceExhausted(
        f"Not enough credit: {estimate.tokens} tokens needed, {remaining} remaining this period.",
        reason="INSUFFICIENT_CREDITS",
        quota_violations=[
            QuotaViolation(
                subject=f"user:{account.account_id}",
                description=(
                    f"plan {account.plan_id}: {remaining} tokens remaining until "
                    f"{account.period_end.isoformat()}; upgrade or buy a credit pack"
                ),
            )
        ],
    )
