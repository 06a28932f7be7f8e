"""Billing's SQL: repositories take a session and never commit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.billing.models import PlanRecord
from services.billing.plans import Plan
from services.common.db import Database
from services.common.money import Money


class SqlPlanStore:
    """Plan catalog reads over SQLAlchemy."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list_after(
        self, *, after: tuple[int, str] | None, limit: int, include_retired: bool
    ) -> Sequence[Plan]:
        query = select(PlanRecord).order_by(PlanRecord.sort_order, PlanRecord.id).limit(limit)
        if not include_retired:
            query = query.where(PlanRecord.retired_at.is_(None))
        if after is not None:
            query = query.where(tuple_(PlanRecord.sort_order, PlanRecord.id) > tuple_(*after))
        rows = (await self._session.scalars(query)).all()
        return [_to_plan(row) for row in rows]


class PlanStoreOpener:
    """Opens a read-only unit of work per call and yields a plan store bound to it."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[SqlPlanStore]:
        async with self._database.unit_of_work(read_only=True) as session:
            yield SqlPlanStore(session)


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
