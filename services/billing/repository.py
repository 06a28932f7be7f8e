"""Billing's SQL: the repositories of `services.billing.ports` and the unit of work that binds them.

Repositories share the unit of work's session and never commit; plan writes mark the cached
catalog stale (`services.billing.plans.PlanCatalog` reads it), and the after-commit hook drops it.
`SqlCreditFastPath` is reserve and settle on the database's hot path (`Database.hot_writes`), from
the same tables and row mappings as the repositories.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, Final, cast

from google.protobuf.message import Message
from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    FromClause,
    Insert,
    Select,
    Table,
    bindparam,
    exists,
    func,
    insert,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.billing.checkout import CheckoutSession, CreditPack, Payment
from services.billing.customer_admin import LedgerRecord
from services.billing.idempotency import IdempotencyKey
from services.billing.invoices import Invoice, InvoiceStatus, LineItem
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
from services.billing.models import (
    BillingCustomerRecord,
    CheckoutSessionRecord,
    CreditAccountRecord,
    CreditPackRecord,
    IdempotencyKeyRecord,
    InvoiceLineRecord,
    InvoiceNumberCounterRecord,
    InvoiceRecord,
    LedgerEntryRecord,
    PaymentMethodRecord,
    PaymentRecord,
    PlanRecord,
    ReservationRecord,
    SubscriptionRecord,
    WebhookEventRecord,
)
from services.billing.plans import Plan
from services.billing.ports import (
    CATALOG_KEY,
    PLAN_CACHE,
    BillingUnitOfWork,
    Customer,
    DuplicateReservation,
    SavedPaymentMethod,
)
from services.billing.subscriptions import Subscription
from services.common.db import Database
from services.common.hot_reads import HotRead
from services.common.hot_writes import HotWrite, HotWriteBusy, UniqueViolation
from services.common.ids import new_id
from services.common.models import UTCDateTime
from services.common.money import Money
from services.common.outbox import OutboxEvent, outbox_row
from services.common.processed_events import record_processed
from services.common.sql_unit_of_work import SqlOutbox, SqlTransaction, SqlUnitsOfWork, event_subject
from services.common.unit_of_work import Changes

EVENT_SOURCE: Final = "billing"


def billing_units_of_work(database: Database) -> SqlUnitsOfWork[BillingUnitOfWork]:
    """Billing's units of work over `database`; register after-commit hooks on the result."""
    return SqlUnitsOfWork(database, source=EVENT_SOURCE, bind=SqlBillingUnitOfWork)


class SqlBillingUnitOfWork:
    """`BillingUnitOfWork` over one SQL transaction."""

    def __init__(self, transaction: SqlTransaction) -> None:
        self._transaction = transaction

    @cached_property
    def plans(self) -> SqlPlanRepository:
        return SqlPlanRepository(self._transaction.session, self._transaction.changes)

    @cached_property
    def subscriptions(self) -> SqlSubscriptionRepository:
        return SqlSubscriptionRepository(self._transaction.session)

    @cached_property
    def accounts(self) -> SqlCreditAccountRepository:
        return SqlCreditAccountRepository(self._transaction.session)

    @cached_property
    def ledger(self) -> SqlLedgerRepository:
        return SqlLedgerRepository(self._transaction.session)

    @cached_property
    def ledger_records(self) -> SqlLedgerRecordRepository:
        return SqlLedgerRecordRepository(self._transaction.session)

    @cached_property
    def reservations(self) -> SqlReservationRepository:
        return SqlReservationRepository(self._transaction.session)

    @cached_property
    def credit_packs(self) -> SqlCreditPackRepository:
        return SqlCreditPackRepository(self._transaction.session)

    @cached_property
    def invoices(self) -> SqlInvoiceRepository:
        return SqlInvoiceRepository(self._transaction.session)

    @cached_property
    def checkouts(self) -> SqlCheckoutRepository:
        return SqlCheckoutRepository(self._transaction.session)

    @cached_property
    def payments(self) -> SqlPaymentRepository:
        return SqlPaymentRepository(self._transaction.session)

    @cached_property
    def webhook_events(self) -> SqlWebhookEventRepository:
        return SqlWebhookEventRepository(self._transaction.session)

    @cached_property
    def idempotency_keys(self) -> SqlIdempotencyKeyRepository:
        return SqlIdempotencyKeyRepository(self._transaction.session)

    @cached_property
    def payment_methods(self) -> SqlPaymentMethodRepository:
        return SqlPaymentMethodRepository(self._transaction.session)

    @cached_property
    def customers(self) -> SqlCustomerRepository:
        return SqlCustomerRepository(self._transaction.session)

    @property
    def outbox(self) -> SqlOutbox:
        return self._transaction.outbox

    def record_processed(self, consumer: str, event_id: str) -> None:
        record_processed(self._transaction.session, consumer, event_id)


class SqlPlanRepository:
    """Rows of `plans`."""

    def __init__(self, session: AsyncSession, changes: Changes) -> None:
        self._session = session
        self._changes = changes

    async def all_plans(self) -> Sequence[Plan]:
        rows = (await self._session.scalars(select(PlanRecord))).all()
        return [_to_plan(row) for row in rows]

    async def get(self, plan_id: str) -> Plan | None:
        row = await self._session.get(PlanRecord, plan_id)
        return None if row is None else _to_plan(row)

    async def save(self, plan: Plan) -> None:
        overage = plan.overage_price_per_1k_tokens
        if overage is not None and overage.currency_code != plan.monthly_price.currency_code:
            raise ValueError("a plan's overage price must be in the currency of its monthly price")
        record = await self._session.get(PlanRecord, plan.id, with_for_update=True)
        if record is None:
            record = PlanRecord(id=plan.id, created_at=plan.create_time)
            self._session.add(record)
        record.display_name = plan.display_name
        record.description = plan.description
        record.tier = plan.tier
        record.currency_code = plan.monthly_price.currency_code
        record.monthly_price_minor = plan.monthly_price.amount_minor
        record.included_tokens = plan.included_tokens
        record.overage_price_per_1k_tokens_minor = None if overage is None else overage.amount_minor
        record.allowed_models = list(plan.allowed_models)
        record.rate_limit_tier = plan.rate_limit_tier
        record.sort_order = plan.sort_order
        record.retired_at = plan.retire_time
        await self._session.flush()
        self._changes.mark_stale(PLAN_CACHE, CATALOG_KEY)

    async def add(self, plan: Plan) -> bool:
        overage = plan.overage_price_per_1k_tokens
        if overage is not None and overage.currency_code != plan.monthly_price.currency_code:
            raise ValueError("a plan's overage price must be in the currency of its monthly price")
        statement = (
            _insert_for(self._session)(_PLAN)
            .values(
                id=plan.id,
                display_name=plan.display_name,
                description=plan.description,
                tier=plan.tier,
                currency_code=plan.monthly_price.currency_code,
                monthly_price_minor=plan.monthly_price.amount_minor,
                included_tokens=plan.included_tokens,
                overage_price_per_1k_tokens_minor=None if overage is None else overage.amount_minor,
                allowed_models=list(plan.allowed_models),
                rate_limit_tier=plan.rate_limit_tier,
                sort_order=plan.sort_order,
                retired_at=plan.retire_time,
                created_at=plan.create_time,
                updated_at=plan.create_time,
            )
            .on_conflict_do_nothing(index_elements=[_PLAN.c.id])
            .returning(_PLAN.c.id)
        )
        if (await self._session.execute(statement)).first() is None:
            return False
        self._changes.mark_stale(PLAN_CACHE, CATALOG_KEY)
        return True

    async def get_for_update(self, plan_id: str) -> Plan | None:
        row = await self._session.get(PlanRecord, plan_id, with_for_update=True)
        return None if row is None else _to_plan(row)


_PLAN = cast(Table, PlanRecord.__table__)


def _to_plan(row: PlanRecord) -> Plan:
    overage = row.overage_price_per_1k_tokens_minor
    return Plan(
        id=row.id,
        display_name=row.display_name,
        description=row.description,
        tier=row.tier,
        monthly_price=Money(row.currency_code, row.monthly_price_minor),
        included_tokens=row.included_tokens,
        overage_price_per_1k_tokens=None if overage is None else Money(row.currency_code, overage),
        allowed_models=tuple(row.allowed_models),
        rate_limit_tier=row.rate_limit_tier,
        sort_order=row.sort_order,
        create_time=row.created_at,
        retire_time=row.retired_at,
    )


def _insert_for(session: AsyncSession):  # type: ignore[no-untyped-def]
    """The dialect's INSERT, which has ON CONFLICT."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


class SqlSubscriptionRepository:
    """Rows of `subscriptions`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def current(self, user_id: str, *, for_update: bool = False) -> Subscription | None:
        statement = select(SubscriptionRecord).where(
            SubscriptionRecord.user_id == user_id, SubscriptionRecord.ended_at.is_(None)
        )
        if for_update:
            statement = statement.with_for_update()
        record = (await self._session.scalars(statement)).first()
        return None if record is None else _to_subscription(record)

    async def by_id(self, subscription_id: str, *, for_update: bool = False) -> Subscription | None:
        record = await self._session.get(SubscriptionRecord, subscription_id, with_for_update=for_update)
        return None if record is None else _to_subscription(record)

    async def add(self, subscription: Subscription) -> bool:
        statement = (
            _insert_for(self._session)(SubscriptionRecord)
            .values(
                **_subscription_values(subscription), id=subscription.id, created_at=subscription.create_time
            )
            .on_conflict_do_nothing(index_elements=["user_id"], index_where=text("ended_at IS NULL"))
            .returning(SubscriptionRecord.id)
        )
        return (await self._session.execute(statement)).first() is not None

    async def save(self, subscription: Subscription) -> None:
        await self._session.execute(
            update(SubscriptionRecord)
            .where(SubscriptionRecord.id == subscription.id)
            .values(**_subscription_values(subscription))
            .execution_options(synchronize_session=False)
        )


def _subscription_values(subscription: Subscription) -> dict[str, object]:
    return {
        "user_id": subscription.user_id,
        "plan_id": subscription.plan_id,
        "status": subscription.status,
        "current_period_start": subscription.current_period_start,
        "current_period_end": subscription.current_period_end,
        "cancel_at_period_end": subscription.cancel_at_period_end,
        "pending_plan_id": subscription.pending_plan_id,
        "ended_at": subscription.end_time,
        "updated_at": subscription.update_time,
    }


def _to_subscription(record: SubscriptionRecord) -> Subscription:
    return Subscription(
        id=record.id,
        user_id=record.user_id,
        plan_id=record.plan_id,
        status=record.status,  # type: ignore[arg-type]
        current_period_start=record.current_period_start,
        current_period_end=record.current_period_end,
        cancel_at_period_end=record.cancel_at_period_end,
        pending_plan_id=record.pending_plan_id,
        create_time=record.created_at,
        update_time=record.updated_at,
        end_time=record.ended_at,
    )


_ACCOUNT = cast(Table, CreditAccountRecord.__table__)
_ACCOUNT_COLUMNS = (
    _ACCOUNT.c.account_id,
    _ACCOUNT.c.plan_id,
    _ACCOUNT.c.hard_stop,
    _ACCOUNT.c.period_start,
    _ACCOUNT.c.period_end,
    _ACCOUNT.c.included_tokens,
    _ACCOUNT.c.purchased_tokens,
    _ACCOUNT.c.used_tokens,
    _ACCOUNT.c.reserved_tokens,
    _ACCOUNT.c.notified_percent,
)


def _to_account(row: Any) -> CreditAccount:
    return CreditAccount(
        account_id=row.account_id,
        plan_id=row.plan_id,
        hard_stop=row.hard_stop,
        period_start=row.period_start,
        period_end=row.period_end,
        included_tokens=row.included_tokens,
        purchased_tokens=row.purchased_tokens,
        used_tokens=row.used_tokens,
        reserved_tokens=row.reserved_tokens,
        notified_percent=row.notified_percent,
    )


# Reserve and settle run these on every generation: built once, so a call only binds its values
# (building a statement per call cost four times what running a prebuilt one does).
_NOW = bindparam("now", type_=UTCDateTime())
_ACCOUNT_ID = bindparam("account_id_", type_=_ACCOUNT.c.account_id.type)
_REMAINING = (
    _ACCOUNT.c.included_tokens
    + _ACCOUNT.c.purchased_tokens
    - _ACCOUNT.c.used_tokens
    - _ACCOUNT.c.reserved_tokens
)
_TOKENS = bindparam("tokens", type_=BigInteger())
_GET_ACCOUNT = select(*_ACCOUNT_COLUMNS).where(_ACCOUNT.c.account_id == _ACCOUNT_ID)
_GET_ACCOUNT_FOR_UPDATE = _GET_ACCOUNT.with_for_update()
_HOLD = (
    update(_ACCOUNT)
    .where(
        _ACCOUNT.c.account_id == _ACCOUNT_ID,
        _ACCOUNT.c.period_end > _NOW,
        _ACCOUNT.c.hard_stop.is_(False) | (_REMAINING >= _TOKENS),
    )
    .values(
        reserved_tokens=_ACCOUNT.c.reserved_tokens + _TOKENS,
        updated_at=_NOW,
    )
    .returning(*_ACCOUNT_COLUMNS)
)
_APPLY = (
    update(_ACCOUNT)
    .where(_ACCOUNT.c.account_id == _ACCOUNT_ID)
    .values(
        included_tokens=_ACCOUNT.c.included_tokens + bindparam("included_delta", type_=BigInteger()),
        purchased_tokens=_ACCOUNT.c.purchased_tokens + bindparam("purchased_delta", type_=BigInteger()),
        used_tokens=_ACCOUNT.c.used_tokens + bindparam("used_delta", type_=BigInteger()),
        reserved_tokens=_ACCOUNT.c.reserved_tokens + bindparam("reserved_delta", type_=BigInteger()),
        updated_at=_NOW,
    )
    .returning(*_ACCOUNT_COLUMNS)
)
_APPLY_IF_CURRENT = _APPLY.where(_ACCOUNT.c.period_end > _NOW)


def _deltas(entry: LedgerEntry) -> dict[str, int]:
    return {
        "included_delta": entry.included_delta,
        "purchased_delta": entry.purchased_delta,
        "used_delta": entry.used_delta,
        "reserved_delta": entry.reserved_delta,
    }


class SqlCreditAccountRepository:
    """Rows of `credit_accounts`, in Core statements: reserve and settle run them on every generation."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, account_id: str, *, for_update: bool = False) -> CreditAccount | None:
        statement = _GET_ACCOUNT_FOR_UPDATE if for_update else _GET_ACCOUNT
        row = (await self._session.execute(statement, {"account_id_": account_id})).first()
        return None if row is None else _to_account(row)

    async def open(self, account: CreditAccount) -> None:
        values = {
            "plan_id": account.plan_id,
            "hard_stop": account.hard_stop,
            "period_start": account.period_start,
            "period_end": account.period_end,
            "included_tokens": account.included_tokens,
            "purchased_tokens": account.purchased_tokens,
            "used_tokens": account.used_tokens,
            "reserved_tokens": account.reserved_tokens,
            "notified_percent": account.notified_percent,
            "updated_at": account.period_start,
        }
        statement = _insert_for(self._session)(_ACCOUNT).values(account_id=account.account_id, **values)
        await self._session.execute(
            statement.on_conflict_do_update(index_elements=[_ACCOUNT.c.account_id], set_=values)
        )

    async def hold(self, account_id: str, tokens: int, *, now: datetime) -> CreditAccount | None:
        parameters = {"account_id_": account_id, "tokens": tokens, "now": now}
        row = (await self._session.execute(_HOLD, parameters)).first()
        return None if row is None else _to_account(row)

    async def apply(self, account_id: str, entry: LedgerEntry, *, now: datetime) -> CreditAccount:
        parameters = {"account_id_": account_id, "now": now, **_deltas(entry)}
        return _to_account((await self._session.execute(_APPLY, parameters)).one())

    async def apply_if_current(
        self, account_id: str, entry: LedgerEntry, *, now: datetime
    ) -> CreditAccount | None:
        parameters = {"account_id_": account_id, "now": now, **_deltas(entry)}
        row = (await self._session.execute(_APPLY_IF_CURRENT, parameters)).first()
        return None if row is None else _to_account(row)

    async def change_plan(self, account_id: str, plan_id: str, *, hard_stop: bool) -> None:
        await self._session.execute(
            update(_ACCOUNT)
            .where(_ACCOUNT.c.account_id == account_id)
            .values(plan_id=plan_id, hard_stop=hard_stop)
        )

    async def mark_notified(self, account_id: str, percent: int) -> None:
        await self._session.execute(
            update(_ACCOUNT).where(_ACCOUNT.c.account_id == account_id).values(notified_percent=percent)
        )


_LEDGER = cast(Table, LedgerEntryRecord.__table__)
_APPEND = insert(_LEDGER)


def _entry_row(
    entry_id: str, account_id: str, period_start: datetime, entry: LedgerEntry, now: datetime
) -> dict[str, object]:
    return {"account_id": account_id, "period_start": period_start, **_entry_values(entry_id, entry, now)}


def _entry_values(entry_id: str, entry: LedgerEntry, now: datetime) -> dict[str, object]:
    """An entry's row but for its account and period."""
    return {
        "id": entry_id,
        "kind": entry.kind,
        "reservation_id": entry.reservation_id,
        "reason": entry.reason,
        "created_at": now,
        **_deltas(entry),
    }


class SqlLedgerRepository:
    """Rows of `credit_ledger_entries`: inserted, summed, never updated or deleted."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def append(
        self, account_id: str, period_start: datetime, entry: LedgerEntry, *, now: datetime
    ) -> str:
        entry_id = new_id()
        await self._session.execute(_APPEND, _entry_row(entry_id, account_id, period_start, entry, now))
        return entry_id

    async def sums(self, account_id: str, period_start: datetime) -> LedgerSums:
        row = (
            await self._session.execute(
                select(
                    func.coalesce(func.sum(_LEDGER.c.included_delta), 0),
                    func.coalesce(func.sum(_LEDGER.c.purchased_delta), 0),
                    func.coalesce(func.sum(_LEDGER.c.used_delta), 0),
                    func.coalesce(func.sum(_LEDGER.c.reserved_delta), 0),
                ).where(_LEDGER.c.account_id == account_id, _LEDGER.c.period_start == period_start)
            )
        ).one()
        return LedgerSums(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


_RESERVATION = cast(Table, ReservationRecord.__table__)
_RESERVATION_COLUMNS = tuple(_RESERVATION.c)


def _reservation_row(reservation: Reservation) -> dict[str, object]:
    return {
        "id": reservation.id,
        "account_id": reservation.account_id,
        "request_id": reservation.request_id,
        "period_start": reservation.period_start,
        "reserved_tokens": reservation.reserved_tokens,
        "created_at": reservation.create_time,
        "expires_at": reservation.expire_time,
        **_closing_values(reservation),
    }


def _settled_values(usage: Usage, now: datetime) -> dict[str, object]:
    return {
        "status": "settled",
        "settled_tokens": usage.tokens,
        "model": usage.model,
        "provider": usage.provider,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "closed_at": now,
    }


def _to_reservation(row: Any) -> Reservation:
    return Reservation(
        id=row.id,
        request_id=row.request_id,
        account_id=row.account_id,
        status=row.status,
        period_start=row.period_start,
        reserved_tokens=row.reserved_tokens,
        settled_tokens=row.settled_tokens,
        model=row.model,
        provider=row.provider,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        create_time=row.created_at,
        expire_time=row.expires_at,
        close_time=row.closed_at,
    )


_ADD_RESERVATION = {
    name: dialect_insert(_RESERVATION)
    .on_conflict_do_nothing(index_elements=[_RESERVATION.c.account_id, _RESERVATION.c.request_id])
    .returning(_RESERVATION.c.id)
    for name, dialect_insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
_RESERVATION_ID = bindparam("reservation_id_", type_=_RESERVATION.c.id.type)
_REQUEST_ID = bindparam("request_id_", type_=_RESERVATION.c.request_id.type)
_GET_RESERVATION = select(*_RESERVATION_COLUMNS).where(_RESERVATION.c.id == _RESERVATION_ID)
_GET_RESERVATION_FOR_UPDATE = _GET_RESERVATION.with_for_update()
_BY_REQUEST = select(*_RESERVATION_COLUMNS).where(
    _RESERVATION.c.account_id == _ACCOUNT_ID,
    _RESERVATION.c.request_id == _REQUEST_ID,
)
# The closing columns come from the parameters: status, settled_tokens, model, provider,
# input_tokens, output_tokens, closed_at.
_CLOSE_HELD = update(_RESERVATION).where(
    _RESERVATION.c.id == _RESERVATION_ID, _RESERVATION.c.status == "held"
)
_SETTLE_HELD = _CLOSE_HELD.where(_RESERVATION.c.request_id == _REQUEST_ID).returning(*_RESERVATION_COLUMNS)


def _closing_values(reservation: Reservation) -> dict[str, object]:
    return {
        "status": reservation.status,
        "settled_tokens": reservation.settled_tokens,
        "model": reservation.model,
        "provider": reservation.provider,
        "input_tokens": reservation.input_tokens,
        "output_tokens": reservation.output_tokens,
        "closed_at": reservation.close_time,
    }


class SqlReservationRepository:
    """Rows of `credit_reservations`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, reservation: Reservation) -> None:
        statement = _ADD_RESERVATION[self._session.get_bind().dialect.name]
        if (await self._session.execute(statement, _reservation_row(reservation))).first() is None:
            raise DuplicateReservation(reservation.request_id)

    async def by_request(self, account_id: str, request_id: str) -> Reservation | None:
        parameters = {"account_id_": account_id, "request_id_": request_id}
        row = (await self._session.execute(_BY_REQUEST, parameters)).first()
        return None if row is None else _to_reservation(row)

    async def get(self, reservation_id: str, *, for_update: bool = False) -> Reservation | None:
        statement = _GET_RESERVATION_FOR_UPDATE if for_update else _GET_RESERVATION
        row = (await self._session.execute(statement, {"reservation_id_": reservation_id})).first()
        return None if row is None else _to_reservation(row)

    async def close(self, reservation: Reservation) -> bool:
        parameters = {"reservation_id_": reservation.id, **_closing_values(reservation)}
        result = await self._session.execute(_CLOSE_HELD.returning(_RESERVATION.c.id), parameters)
        return result.first() is not None

    async def settle_if_held(
        self, reservation_id: str, request_id: str, usage: Usage, *, now: datetime
    ) -> Reservation | None:
        parameters = {
            "reservation_id_": reservation_id,
            "request_id_": request_id,
            **_settled_values(usage, now),
        }
        row = (await self._session.execute(_SETTLE_HELD, parameters)).first()
        return None if row is None else _to_reservation(row)

    async def held_past(self, moment: datetime, *, limit: int) -> Sequence[Reservation]:
        statement = (
            select(*_RESERVATION_COLUMNS)
            .where(_RESERVATION.c.status == "held", _RESERVATION.c.expires_at < moment)
            .order_by(_RESERVATION.c.expires_at)
            .limit(limit)
        )
        if self._session.get_bind().dialect.name == "postgresql":
            # Two sweepers (replicas) take different rows instead of waiting on each other's.
            statement = statement.with_for_update(skip_locked=True)
        rows = (await self._session.execute(statement)).all()
        return [_to_reservation(row) for row in rows]

    async def usage_by_model(self, account_id: str, period_start: datetime) -> Sequence[SettledUsage]:
        rows = (
            await self._session.execute(
                select(
                    _RESERVATION.c.model,
                    func.sum(_RESERVATION.c.input_tokens),
                    func.sum(_RESERVATION.c.output_tokens),
                    func.count(),
                )
                .where(
                    _RESERVATION.c.account_id == account_id,
                    _RESERVATION.c.status == "settled",
                    _RESERVATION.c.closed_at >= period_start,
                )
                .group_by(_RESERVATION.c.model)
                .order_by(_RESERVATION.c.model)
            )
        ).all()
        return [SettledUsage(row[0], int(row[1]), int(row[2]), int(row[3])) for row in rows]


# ---- the fast path: reserve and settle as one atomic write each --------------------------------

_OUTBOX = cast(Table, OutboxEvent.__table__)
# The `outbox_row` columns of an event.
_EVENT_COLUMNS: Final = ("event_id", "source", "event_type", "subject", "payload", "occurred_at")


def _binds(table: Table, prefix: str, names: Iterable[str]) -> dict[str, BindParameter[Any]]:
    return {name: bindparam(f"{prefix}{name}", type_=table.c[name].type) for name in names}


def _prefixed(values: Mapping[str, object], prefix: str) -> dict[str, object]:
    return {f"{prefix}{name}": value for name, value in values.items()}


def _copy_prefix(prefix: str, copy: int, copies: int) -> str:
    return f"{prefix}{copy}_" if copies > 1 else f"{prefix}_"


def _rows_from(
    table: Table,
    prefix: str,
    names: Sequence[str],
    account: FromClause,
    *,
    copies: int = 1,
    where: ColumnElement[bool] | None = None,
) -> Insert:
    """INSERT of `copies` rows per row of `account` (the account held or settled): their
    `account_id` and `period_start` (when `table` has them) are the account's, and every other
    column of `names` is bound, as `<prefix>_<name>`, or `<prefix><copy>_<name>` when there are
    several copies."""
    selects = []
    for copy in range(copies):
        binds = _binds(table, _copy_prefix(prefix, copy, copies), names)
        taken = {"account_id": account.c.account_id, "period_start": account.c.period_start}
        columns = [taken[name] if name in taken else binds[name] for name in names]
        one = select(*columns).select_from(account)
        selects.append(one if where is None else one.where(where))
    rows = selects[0] if copies == 1 else union_all(*selects)
    return insert(table).from_select(list(names), rows, include_defaults=False)


# What the fast path writes of a reservation and of an entry; other columns keep their defaults.
_NEW_RESERVATION_COLUMNS: Final = (
    "id",
    "account_id",
    "request_id",
    "status",
    "period_start",
    "reserved_tokens",
    "settled_tokens",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "created_at",
    "expires_at",
    "closed_at",
)
_ENTRY_COLUMNS: Final = (
    "id",
    "account_id",
    "period_start",
    "kind",
    "included_delta",
    "purchased_delta",
    "used_delta",
    "reserved_delta",
    "reservation_id",
    "reason",
    "created_at",
)
# Settling: the account must still be as the settlement was computed for (`CreditFastPath.settle`).
_APPLY_AS_EXPECTED = _APPLY_IF_CURRENT.where(
    _ACCOUNT.c.plan_id == bindparam("plan_id_", type_=_ACCOUNT.c.plan_id.type),
    _ACCOUNT.c.period_start == bindparam("period_start_", type_=UTCDateTime()),
    _ACCOUNT.c.included_tokens == bindparam("included_", type_=BigInteger()),
    _ACCOUNT.c.purchased_tokens == bindparam("purchased_", type_=BigInteger()),
    _ACCOUNT.c.notified_percent == bindparam("notified_", type_=_ACCOUNT.c.notified_percent.type),
    _ACCOUNT.c.used_tokens <= bindparam("most_used", type_=BigInteger()),
)
_HELD_WITH_REQUEST = select(_RESERVATION.c.id).where(
    _RESERVATION.c.id == _RESERVATION_ID,
    _RESERVATION.c.request_id == _REQUEST_ID,
    _RESERVATION.c.status == "held",
)
_CLOSE_AS_SETTLED = (
    update(_RESERVATION)
    .where(_RESERVATION.c.id == _RESERVATION_ID, _RESERVATION.c.status == "held")
    .values(
        {
            **_binds(
                _RESERVATION,
                "s_",
                ("status", "settled_tokens", "model", "provider", "input_tokens", "output_tokens"),
            ),
            "closed_at": _NOW,
        }
    )
    .returning(_RESERVATION.c.id)
)
_SETTLED_EVENTS: Final = 2


def _postgres_reserve() -> Select[Any]:
    # One statement: the hold, and only if it was made, the reservation, its entry and its event.
    # A taken request id fails the reservation's insert, and with it the whole statement.
    held = _HOLD.cte("held")
    return select(*held.c).add_cte(
        _rows_from(_RESERVATION, "r", _NEW_RESERVATION_COLUMNS, held).cte("reservation"),
        _rows_from(_LEDGER, "e", _ENTRY_COLUMNS, held).cte("entry"),
        _rows_from(_OUTBOX, "o", _EVENT_COLUMNS, held).cte("event"),
    )


def _postgres_settle() -> Select[Any]:
    # One statement: lock the reservation if it is held, apply the entry to the account if it is as
    # expected, and only then close the reservation and add the entry and the events. The row locks
    # last as long as the statement.
    locked = _HELD_WITH_REQUEST.with_for_update().cte("locked")
    account = _APPLY_AS_EXPECTED.where(exists(select(locked.c.id))).cte("account")
    return select(*account.c).add_cte(
        _CLOSE_AS_SETTLED.where(exists(select(account.c.account_id))).cte("settled"),
        _rows_from(_LEDGER, "e", _ENTRY_COLUMNS, account).cte("entry"),
        _rows_from(_OUTBOX, "o", _EVENT_COLUMNS, account, copies=_SETTLED_EVENTS).cte("events"),
    )


_ACCOUNT_ROW = _ACCOUNT.c.account_id == _ACCOUNT_ID
_POSTGRES_RESERVE = HotWrite(_postgres_reserve(), _to_account, records_events=True)
_POSTGRES_SETTLE = HotWrite(_postgres_settle(), _to_account, records_events=True)
# SQLite has no CTE that writes: the same steps, one statement each, in one transaction.
_SQLITE_HOLD = HotWrite(_HOLD, _to_account)
_SQLITE_SETTLE_ACCOUNT = HotWrite(_APPLY_AS_EXPECTED.where(exists(_HELD_WITH_REQUEST)), _to_account)
_SQLITE_CLOSE_AS_SETTLED = HotWrite(_CLOSE_AS_SETTLED, lambda row: row.id)
_SQLITE_ADD_RESERVATION = HotWrite(
    _rows_from(_RESERVATION, "r", _NEW_RESERVATION_COLUMNS, _ACCOUNT, where=_ACCOUNT_ROW), lambda row: row
)
_SQLITE_ADD_ENTRY = HotWrite(
    _rows_from(_LEDGER, "e", _ENTRY_COLUMNS, _ACCOUNT, where=_ACCOUNT_ROW), lambda row: row
)
_SQLITE_ADD_EVENT = HotWrite(
    _rows_from(_OUTBOX, "o", _EVENT_COLUMNS, _ACCOUNT, where=_ACCOUNT_ROW),
    lambda row: row,
    records_events=True,
)
_SQLITE_ADD_SETTLED_EVENTS = HotWrite(
    _rows_from(_OUTBOX, "o", _EVENT_COLUMNS, _ACCOUNT, copies=_SETTLED_EVENTS, where=_ACCOUNT_ROW),
    lambda row: row,
    records_events=True,
)


def _to_basis(row: Any) -> SettlementBasis:
    overage = row.plan_overage_minor
    return SettlementBasis(
        reservation=_to_reservation(row),
        account=CreditAccount(
            **{column.key: getattr(row, f"account_{column.key}") for column in _ACCOUNT_COLUMNS}
        ),
        overage_price_per_1k_tokens=None if overage is None else Money(row.plan_currency_code, overage),
    )


_SETTLEMENT_BASIS = HotRead(
    select(
        *_RESERVATION_COLUMNS,
        *(column.label(f"account_{column.key}") for column in _ACCOUNT_COLUMNS),
        _PLAN.c.currency_code.label("plan_currency_code"),
        _PLAN.c.overage_price_per_1k_tokens_minor.label("plan_overage_minor"),
    )
    .join_from(_RESERVATION, _ACCOUNT, _ACCOUNT.c.account_id == _RESERVATION.c.account_id)
    .join(_PLAN, _PLAN.c.id == _ACCOUNT.c.plan_id)
    .where(_RESERVATION.c.id == _RESERVATION_ID),
    _to_basis,
)


def credit_fast_path(database: Database) -> SqlCreditFastPath:
    """Billing's `CreditFastPath` over `database`'s hot path."""
    return SqlCreditFastPath(database)


class SqlCreditFastPath:
    """`CreditFastPath` on the database's hot path: on PostgreSQL each write is one statement whose
    CTEs hold, insert and return; on SQLite, one short transaction of a statement per step."""

    def __init__(self, database: Database) -> None:
        self._reads = database.hot_reads
        self._writes = database.hot_writes
        self._on_postgres = database.dialect_name == "postgresql"

    async def reserve(
        self, reservation: NewReservation, entry: LedgerEntry, event: Message
    ) -> CreditAccount | None:
        parameters = {
            "account_id_": reservation.account_id,
            "tokens": reservation.reserved_tokens,
            "now": reservation.create_time,
            **_prefixed(_new_reservation_row(reservation), "r_"),
            **_prefixed(_entry_values(new_id(), entry, reservation.create_time), "e_"),
            **_event_parameters(reservation.account_id, [event]),
        }
        try:
            if self._on_postgres:
                held = await self._writes.atomic(_POSTGRES_RESERVE, **parameters)
            else:
                held = await self._reserve_on_sqlite(parameters)
        except UniqueViolation:
            raise DuplicateReservation(reservation.request_id) from None
        except HotWriteBusy:
            return None
        return held[0] if held else None

    async def _reserve_on_sqlite(self, parameters: Mapping[str, Any]) -> list[CreditAccount]:
        async with self._writes.transaction() as transaction:
            held = await transaction.fetch(_SQLITE_HOLD, **parameters)
            if held:
                await transaction.fetch(_SQLITE_ADD_RESERVATION, **parameters)
                await transaction.fetch(_SQLITE_ADD_ENTRY, **parameters)
                await transaction.fetch(_SQLITE_ADD_EVENT, **parameters)
            return held

    async def settlement_basis(self, reservation_id: str) -> SettlementBasis | None:
        return await self._reads.first(_SETTLEMENT_BASIS, reservation_id_=reservation_id)

    async def settle(
        self,
        settled: Reservation,
        entry: LedgerEntry,
        events: Sequence[Message],
        *,
        expected: CreditAccount,
        most_used: int,
    ) -> CreditAccount | None:
        if len(events) != _SETTLED_EVENTS:
            raise ValueError(f"a settlement records {_SETTLED_EVENTS} events, not {len(events)}")
        assert settled.close_time is not None
        parameters = {
            "account_id_": settled.account_id,
            "reservation_id_": settled.id,
            "request_id_": settled.request_id,
            "now": settled.close_time,
            "plan_id_": expected.plan_id,
            "period_start_": expected.period_start,
            "included_": expected.included_tokens,
            "purchased_": expected.purchased_tokens,
            "notified_": expected.notified_percent,
            "most_used": most_used,
            **_prefixed(_closing_values(settled), "s_"),
            **_deltas(entry),
            **_prefixed(_entry_values(new_id(), entry, settled.close_time), "e_"),
            **_event_parameters(settled.account_id, events),
        }
        try:
            if self._on_postgres:
                accounts = await self._writes.atomic(_POSTGRES_SETTLE, **parameters)
            else:
                accounts = await self._settle_on_sqlite(parameters)
        except HotWriteBusy:
            return None
        return accounts[0] if accounts else None

    async def _settle_on_sqlite(self, parameters: Mapping[str, Any]) -> list[CreditAccount]:
        async with self._writes.transaction() as transaction:
            accounts = await transaction.fetch(_SQLITE_SETTLE_ACCOUNT, **parameters)
            if accounts:
                await transaction.fetch(_SQLITE_CLOSE_AS_SETTLED, **parameters)
                await transaction.fetch(_SQLITE_ADD_ENTRY, **parameters)
                await transaction.fetch(_SQLITE_ADD_SETTLED_EVENTS, **parameters)
            return accounts


def _new_reservation_row(reservation: NewReservation) -> dict[str, object]:
    """Its row but for the period, which the statement takes from the account it holds."""
    row = _reservation_row(reservation.held_in(reservation.create_time))
    del row["period_start"]  # the stand-in above
    return row


def _event_parameters(account_id: str, events: Sequence[Message]) -> dict[str, object]:
    parameters: dict[str, object] = {}
    for copy, event in enumerate(events):
        _, row = outbox_row(source=EVENT_SOURCE, subject=event_subject(account_id), payload=event)
        prefix = _copy_prefix("o", copy, len(events))
        parameters.update(_prefixed({name: row[name] for name in _EVENT_COLUMNS}, prefix))
    return parameters


class SqlCreditPackRepository:
    """Rows of `credit_packs`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def all_packs(self) -> Sequence[CreditPack]:
        return [_to_pack(row) for row in (await self._session.scalars(select(CreditPackRecord))).all()]

    async def get(self, credit_pack_id: str) -> CreditPack | None:
        row = await self._session.get(CreditPackRecord, credit_pack_id)
        return None if row is None else _to_pack(row)


def _to_pack(row: CreditPackRecord) -> CreditPack:
    return CreditPack(
        id=row.id,
        display_name=row.display_name,
        tokens=row.tokens,
        price=Money(row.currency_code, row.price_minor),
        sort_order=row.sort_order,
        retired=row.retired_at is not None,
    )


_INVOICE = cast(Table, InvoiceRecord.__table__)
_INVOICE_LINE = cast(Table, InvoiceLineRecord.__table__)
_COUNTER = cast(Table, InvoiceNumberCounterRecord.__table__)


class SqlInvoiceRepository:
    """Rows of `invoices` and `invoice_lines`, and the per-year counters of `invoice_number_counters`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, invoice: Invoice) -> None:
        await self._session.execute(insert(_INVOICE).values(id=invoice.id, **_invoice_values(invoice)))
        if invoice.lines:
            await self._session.execute(
                insert(_INVOICE_LINE),
                [
                    {
                        "id": new_id(),
                        "invoice_id": invoice.id,
                        "position": position,
                        "kind": line.kind,
                        "description": line.description,
                        "quantity": line.quantity,
                        "unit_price_minor": line.unit_price_minor,
                        "amount_minor": line.amount_minor,
                        "plan_id": line.plan_id,
                        "credit_pack_id": line.credit_pack_id,
                        "period_start": line.period_start,
                        "period_end": line.period_end,
                    }
                    for position, line in enumerate(invoice.lines)
                ],
            )

    async def get(self, invoice_id: str, *, for_update: bool = False) -> Invoice | None:
        statement = select(_INVOICE).where(_INVOICE.c.id == invoice_id)
        if for_update:
            statement = statement.with_for_update()
        row = (await self._session.execute(statement)).first()
        if row is None:
            return None
        return (await self._with_lines([row]))[0]

    async def save(self, invoice: Invoice) -> None:
        await self._session.execute(
            update(_INVOICE).where(_INVOICE.c.id == invoice.id).values(**_invoice_values(invoice))
        )

    async def next_number(self, year: int) -> int:
        statement = (
            _insert_for(self._session)(_COUNTER)
            .values(year=year, last_number=1)
            .on_conflict_do_update(
                index_elements=[_COUNTER.c.year], set_={"last_number": _COUNTER.c.last_number + 1}
            )
            .returning(_COUNTER.c.last_number)
        )
        number: int = (await self._session.execute(statement)).scalar_one()
        return number

    async def list_for_user(
        self, user_id: str, *, status: InvoiceStatus | None, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[Invoice]:
        statement = select(_INVOICE).where(_INVOICE.c.user_id == user_id)
        if status is not None:
            statement = statement.where(_INVOICE.c.status == status)
        if after is not None:
            created, invoice_id = after
            statement = statement.where(
                (_INVOICE.c.created_at < created)
                | ((_INVOICE.c.created_at == created) & (_INVOICE.c.id < invoice_id))
            )
        statement = statement.order_by(_INVOICE.c.created_at.desc(), _INVOICE.c.id.desc()).limit(limit)
        return await self._with_lines((await self._session.execute(statement)).all())

    async def credit_note_for(self, invoice_id: str) -> Invoice | None:
        row = (
            await self._session.execute(select(_INVOICE).where(_INVOICE.c.credited_invoice_id == invoice_id))
        ).first()
        return None if row is None else (await self._with_lines([row]))[0]

    async def _with_lines(self, rows: Sequence[Any]) -> list[Invoice]:
        if not rows:
            return []
        lines: dict[str, list[LineItem]] = {row.id: [] for row in rows}
        found = await self._session.execute(
            select(_INVOICE_LINE)
            .where(_INVOICE_LINE.c.invoice_id.in_(list(lines)))
            .order_by(_INVOICE_LINE.c.invoice_id, _INVOICE_LINE.c.position)
        )
        for line in found.all():
            lines[line.invoice_id].append(
                LineItem(
                    kind=line.kind,
                    description=line.description,
                    quantity=line.quantity,
                    unit_price_minor=line.unit_price_minor,
                    amount_minor=line.amount_minor,
                    plan_id=line.plan_id,
                    credit_pack_id=line.credit_pack_id,
                    period_start=line.period_start,
                    period_end=line.period_end,
                )
            )
        return [_to_invoice(row, lines[row.id]) for row in rows]


def _invoice_values(invoice: Invoice) -> dict[str, object]:
    return {
        "number": invoice.number,
        "user_id": invoice.user_id,
        "status": invoice.status,
        "reason": invoice.reason,
        "currency_code": invoice.currency_code,
        "subtotal_minor": invoice.subtotal_minor,
        "tax_minor": invoice.tax_minor,
        "total_minor": invoice.total_minor,
        "amount_paid_minor": invoice.amount_paid_minor,
        "period_start": invoice.period_start,
        "period_end": invoice.period_end,
        "created_at": invoice.create_time,
        "finalized_at": invoice.finalize_time,
        "due_at": invoice.due_time,
        "paid_at": invoice.paid_time,
        "closed_at": invoice.close_time,
        "credited_invoice_id": invoice.credited_invoice_id,
        "memo": invoice.memo,
    }


def _to_invoice(row: Any, lines: Sequence[LineItem]) -> Invoice:
    return Invoice(
        id=row.id,
        number=row.number,
        user_id=row.user_id,
        status=row.status,
        reason=row.reason,
        currency_code=row.currency_code,
        lines=tuple(lines),
        subtotal_minor=row.subtotal_minor,
        tax_minor=row.tax_minor,
        total_minor=row.total_minor,
        amount_paid_minor=row.amount_paid_minor,
        period_start=row.period_start,
        period_end=row.period_end,
        create_time=row.created_at,
        finalize_time=row.finalized_at,
        due_time=row.due_at,
        paid_time=row.paid_at,
        close_time=row.closed_at,
        credited_invoice_id=row.credited_invoice_id,
        memo=row.memo,
    )


_CHECKOUT = cast(Table, CheckoutSessionRecord.__table__)


class SqlCheckoutRepository:
    """Rows of `checkout_sessions`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, session: CheckoutSession) -> bool:
        statement = (
            _insert_for(self._session)(_CHECKOUT)
            .values(
                id=session.id,
                user_id=session.user_id,
                request_id=session.request_id,
                provider=session.provider,
                provider_session_id=session.provider_session_id,
                url=session.url,
                status=session.status,
                plan_id=session.plan_id,
                credit_pack_id=session.credit_pack_id,
                invoice_id=session.invoice_id,
                currency_code=session.amount.currency_code,
                amount_minor=session.amount.amount_minor,
                upgrade_fraction_ppm=session.upgrade_fraction_ppm,
                created_at=session.create_time,
                expires_at=session.expire_time,
                completed_at=session.complete_time,
            )
            .on_conflict_do_nothing(index_elements=["user_id", "request_id"])
            .returning(_CHECKOUT.c.id)
        )
        return (await self._session.execute(statement)).first() is not None

    async def by_request(self, user_id: str, request_id: str) -> CheckoutSession | None:
        return await self._first(
            select(_CHECKOUT).where(_CHECKOUT.c.user_id == user_id, _CHECKOUT.c.request_id == request_id)
        )

    async def get(self, checkout_id: str, *, for_update: bool = False) -> CheckoutSession | None:
        statement = select(_CHECKOUT).where(_CHECKOUT.c.id == checkout_id)
        return await self._first(statement.with_for_update() if for_update else statement)

    async def save(self, session: CheckoutSession) -> None:
        await self._session.execute(
            update(_CHECKOUT)
            .where(_CHECKOUT.c.id == session.id)
            .values(status=session.status, completed_at=session.complete_time)
        )

    async def _first(self, statement: Any) -> CheckoutSession | None:
        row = (await self._session.execute(statement)).first()
        if row is None:
            return None
        return CheckoutSession(
            id=row.id,
            user_id=row.user_id,
            request_id=row.request_id,
            provider=row.provider,
            provider_session_id=row.provider_session_id,
            url=row.url,
            status=row.status,
            plan_id=row.plan_id,
            credit_pack_id=row.credit_pack_id,
            invoice_id=row.invoice_id,
            amount=Money(row.currency_code, row.amount_minor),
            create_time=row.created_at,
            expire_time=row.expires_at,
            complete_time=row.completed_at,
            upgrade_fraction_ppm=row.upgrade_fraction_ppm,
        )


_PAYMENT = cast(Table, PaymentRecord.__table__)


class SqlPaymentRepository:
    """Rows of `payments`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, payment: Payment) -> None:
        await self._session.execute(
            insert(_PAYMENT).values(
                id=payment.id,
                invoice_id=payment.invoice_id,
                user_id=payment.user_id,
                provider=payment.provider,
                provider_payment_id=payment.provider_payment_id,
                status=payment.status,
                currency_code=payment.amount.currency_code,
                amount_minor=payment.amount.amount_minor,
                failure_reason=payment.failure_reason,
                attempt=payment.attempt,
                created_at=payment.create_time,
            )
        )

    async def count_for_invoice(self, invoice_id: str) -> int:
        count: int = (
            await self._session.execute(select(func.count()).where(_PAYMENT.c.invoice_id == invoice_id))
        ).scalar_one()
        return count

    async def succeeded_for_invoice(self, invoice_id: str) -> Payment | None:
        row = (
            await self._session.execute(
                select(_PAYMENT)
                .where(_PAYMENT.c.invoice_id == invoice_id, _PAYMENT.c.status == "succeeded")
                .order_by(_PAYMENT.c.created_at.desc(), _PAYMENT.c.id.desc())
                .limit(1)
            )
        ).first()
        if row is None:
            return None
        return Payment(
            id=row.id,
            invoice_id=row.invoice_id,
            user_id=row.user_id,
            provider=row.provider,
            provider_payment_id=row.provider_payment_id,
            status=row.status,
            amount=Money(row.currency_code, row.amount_minor),
            failure_reason=row.failure_reason,
            attempt=row.attempt,
            create_time=row.created_at,
        )


class SqlWebhookEventRepository:
    """Rows of `webhook_events`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def record(self, provider: str, event_id: str, event_type: str, *, now: datetime) -> bool:
        table = cast(Table, WebhookEventRecord.__table__)
        statement = (
            _insert_for(self._session)(table)
            .values(provider=provider, event_id=event_id, event_type=event_type, received_at=now)
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(table.c.event_id)
        )
        return (await self._session.execute(statement)).first() is not None


class SqlPaymentMethodRepository:
    """Rows of `payment_methods`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, user_id: str) -> SavedPaymentMethod | None:
        row = await self._session.get(PaymentMethodRecord, user_id)
        return None if row is None else SavedPaymentMethod(row.provider, row.provider_payment_method)

    async def save(self, user_id: str, method: SavedPaymentMethod, *, now: datetime) -> None:
        table = cast(Table, PaymentMethodRecord.__table__)
        values = {
            "provider": method.provider,
            "provider_payment_method": method.provider_payment_method,
            "updated_at": now,
        }
        await self._session.execute(
            _insert_for(self._session)(table)
            .values(user_id=user_id, **values)
            .on_conflict_do_update(index_elements=[table.c.user_id], set_=values)
        )


class SqlCustomerRepository:
    """Rows of `billing_customers`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, user_id: str) -> Customer | None:
        row = await self._session.get(BillingCustomerRecord, user_id)
        return None if row is None else Customer(row.user_id, row.email, row.display_name)

    async def save(self, customer: Customer, *, now: datetime) -> None:
        table = cast(Table, BillingCustomerRecord.__table__)
        values = {"email": customer.email, "display_name": customer.display_name, "updated_at": now}
        await self._session.execute(
            _insert_for(self._session)(table)
            .values(user_id=customer.user_id, **values)
            .on_conflict_do_update(index_elements=[table.c.user_id], set_=values)
        )


_IDEMPOTENCY_KEY = cast(Table, IdempotencyKeyRecord.__table__)


class SqlIdempotencyKeyRepository:
    """Rows of `billing_idempotency_keys`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def claim(self, key: IdempotencyKey) -> IdempotencyKey | None:
        # ON CONFLICT waits for an uncommitted insert of the same key, so the read below sees the
        # claim of whichever unit of work committed it.
        inserted = await self._session.execute(
            _insert_for(self._session)(_IDEMPOTENCY_KEY)
            .values(
                scope=key.scope,
                request_id=key.request_id,
                operation=key.operation,
                fingerprint=key.fingerprint,
                result_key=key.result_key,
                created_at=key.create_time,
            )
            .on_conflict_do_nothing(index_elements=[_IDEMPOTENCY_KEY.c.scope, _IDEMPOTENCY_KEY.c.request_id])
            .returning(_IDEMPOTENCY_KEY.c.scope)
        )
        if inserted.first() is not None:
            return None
        found = await self.find(key.scope, key.request_id)
        assert found is not None, "the insert stood back only for a committed key"
        return found

    async def find(self, scope: str, request_id: str) -> IdempotencyKey | None:
        row = (
            await self._session.execute(
                select(*_IDEMPOTENCY_KEY.c).where(
                    _IDEMPOTENCY_KEY.c.scope == scope, _IDEMPOTENCY_KEY.c.request_id == request_id
                )
            )
        ).first()
        if row is None:
            return None
        return IdempotencyKey(
            scope=row.scope,
            request_id=row.request_id,
            operation=row.operation,
            fingerprint=row.fingerprint,
            result_key=row.result_key,
            create_time=row.created_at,
        )


class SqlLedgerRecordRepository:
    """Rows of `credit_ledger_entries` read back whole, and the adjustments admins append; apart
    from `SqlLedgerRepository`, which reservations and settlements append through on every call."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, record: LedgerRecord) -> None:
        entry = record.entry
        await self._session.execute(
            insert(_LEDGER).values(
                id=record.id,
                account_id=record.account_id,
                period_start=record.period_start,
                kind=entry.kind,
                included_delta=entry.included_delta,
                purchased_delta=entry.purchased_delta,
                used_delta=entry.used_delta,
                reserved_delta=entry.reserved_delta,
                reservation_id=entry.reservation_id,
                reason=entry.reason,
                created_at=record.create_time,
                actor_id=record.actor_id,
            )
        )

    async def get(self, entry_id: str) -> LedgerRecord | None:
        row = (await self._session.execute(select(_LEDGER).where(_LEDGER.c.id == entry_id))).first()
        return None if row is None else _to_ledger_record(row)

    async def list_for_account(
        self, account_id: str, *, after: tuple[datetime, str] | None, limit: int
    ) -> Sequence[LedgerRecord]:
        statement = select(_LEDGER).where(_LEDGER.c.account_id == account_id)
        if after is not None:
            created, entry_id = after
            statement = statement.where(
                (_LEDGER.c.created_at < created)
                | ((_LEDGER.c.created_at == created) & (_LEDGER.c.id < entry_id))
            )
        statement = statement.order_by(_LEDGER.c.created_at.desc(), _LEDGER.c.id.desc()).limit(limit)
        return [_to_ledger_record(row) for row in (await self._session.execute(statement)).all()]


def _to_ledger_record(row: Any) -> LedgerRecord:
    return LedgerRecord(
        id=row.id,
        account_id=row.account_id,
        period_start=row.period_start,
        entry=LedgerEntry(
            kind=row.kind,
            included_delta=row.included_delta,
            purchased_delta=row.purchased_delta,
            used_delta=row.used_delta,
            reserved_delta=row.reserved_delta,
            reservation_id=row.reservation_id,
            reason=row.reason,
        ),
        actor_id=row.actor_id,
        create_time=row.created_at,
    )
