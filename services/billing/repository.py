"""Billing's SQL: the repositories of `services.billing.ports` and the unit of work that binds them.

Repositories share the unit of work's session and never commit; plan writes mark the cached
catalog stale (`services.billing.plans.PlanCatalog` reads it), and the after-commit hook drops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.billing.models import PlanRecord
from services.billing.plans import Plan
from services.billing.ports import CATALOG_KEY, PLAN_CACHE, BillingUnitOfWork
from services.common.db import Database
from services.common.money import Money
from services.common.sql_unit_of_work import SqlOutbox, SqlTransaction, SqlUnitsOfWork
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

    @property
    def outbox(self) -> SqlOutbox:
        return self._transaction.outbox


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
