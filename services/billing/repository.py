"""Billing's SQL: repositories take a session and never commit.

The plan catalog is small and read on every pricing page, so reads are served from the read cache
as one entry holding the whole catalog (retired plans included), paged in memory. Every plan write
goes through `SqlPlanStore.save` in a unit of work from `PlanStoreOpener.writing()`, which deletes
that entry once the write commits.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.billing.models import PlanRecord
from services.billing.plans import Plan
from services.common.cache import InMemoryReadCache, ReadCache, mark_stale, unit_of_work_invalidating
from services.common.db import Database
from services.common.money import Money

PLAN_CACHE: Final = "billing.plans.v1"
_CATALOG_KEY: Final = "catalog"
# Plans change a few times a year, and every change invalidates the entry; the TTL only bounds how
# long a change made while the cache was unreachable can go unseen.
PLAN_CATALOG_TTL_S: Final = 300.0


class SqlPlanStore:
    """The plan catalog over SQLAlchemy: reads, and the writes that invalidate the cached catalog."""

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

    async def get(self, plan_id: str) -> Plan | None:
        """The plan with this id, retired or not."""
        row = await self._session.get(PlanRecord, plan_id)
        return None if row is None else _to_plan(row)

    async def all_plans(self) -> list[Plan]:
        """Every plan, retired ones included."""
        rows = (await self._session.scalars(select(PlanRecord))).all()
        return [_to_plan(row) for row in rows]

    async def save(self, plan: Plan) -> None:
        """Insert the plan, or update the one with its id (its create_time stays as stored).

        The session must come from `PlanStoreOpener.writing()`: the cached catalog is deleted once
        the change commits. The price and the overage price must share one currency.
        """
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
        mark_stale(self._session, PLAN_CACHE, _CATALOG_KEY)


class CachedPlanStore:
    """Catalog reads from the read cache, loading the whole catalog in one query on a miss."""

    def __init__(self, database: Database, cache: ReadCache) -> None:
        self._database = database
        self._cache = cache.named(PLAN_CACHE)

    async def list_after(
        self, *, after: tuple[int, str] | None, limit: int, include_retired: bool
    ) -> Sequence[Plan]:
        offered = [plan for plan in await self._catalog() if include_retired or not plan.retired]
        if after is not None:
            offered = [plan for plan in offered if (plan.sort_order, plan.id) > after]
        return offered[:limit]

    async def get(self, plan_id: str) -> Plan | None:
        """The plan with this id, retired or not."""
        return next((plan for plan in await self._catalog() if plan.id == plan_id), None)

    async def _catalog(self) -> list[Plan]:
        """Every plan in catalog order (sort_order, then id)."""
        return await self._cache.get_or_load(
            _CATALOG_KEY, self._load, ttl_s=PLAN_CATALOG_TTL_S, encode=encode_plans, decode=decode_plans
        )

    async def _load(self) -> list[Plan]:
        async with self._database.unit_of_work(read_only=True) as session:
            plans = await SqlPlanStore(session).all_plans()
        # Sorted here rather than by the database's collation, so paging over the cached list is
        # consistent with itself on every dialect.
        return sorted(plans, key=lambda plan: (plan.sort_order, plan.id))


class PlanStoreOpener:
    """Hands out plan stores: cached reads per call, and writing units of work that invalidate them.

    Without a `read_cache` nothing is cached: every read loads the catalog.
    """

    def __init__(self, database: Database, read_cache: ReadCache | None = None) -> None:
        self._database = database
        self._read_cache = read_cache if read_cache is not None else InMemoryReadCache(max_entries=0)

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[CachedPlanStore]:
        yield CachedPlanStore(self._database, self._read_cache)

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[SqlPlanStore]:
        """One writing unit of work; the cached catalog is deleted once it commits."""
        async with unit_of_work_invalidating(self._database, self._read_cache) as session:
            yield SqlPlanStore(session)


def encode_plans(plans: Sequence[Plan]) -> bytes:
    """Plans as the read cache stores them: JSON, money as minor units, times in ISO 8601."""
    return json.dumps([_plan_fields(plan) for plan in plans], separators=(",", ":")).encode()


def decode_plans(data: bytes) -> list[Plan]:
    return [_plan_from_fields(fields) for fields in json.loads(data)]


def _plan_fields(plan: Plan) -> dict[str, Any]:
    overage = plan.overage_price_per_1k_tokens
    return {
        "id": plan.id,
        "display_name": plan.display_name,
        "description": plan.description,
        "tier": plan.tier,
        "currency_code": plan.monthly_price.currency_code,
        "monthly_price_minor": plan.monthly_price.amount_minor,
        "included_tokens": plan.included_tokens,
        "overage_price_per_1k_tokens_minor": None if overage is None else overage.amount_minor,
        "allowed_models": list(plan.allowed_models),
        "rate_limit_tier": plan.rate_limit_tier,
        "sort_order": plan.sort_order,
        "create_time": plan.create_time.isoformat(),
        "retire_time": None if plan.retire_time is None else plan.retire_time.isoformat(),
    }


def _plan_from_fields(fields: dict[str, Any]) -> Plan:
    currency = fields["currency_code"]
    overage = fields["overage_price_per_1k_tokens_minor"]
    retire_time = fields["retire_time"]
    return Plan(
        id=fields["id"],
        display_name=fields["display_name"],
        description=fields["description"],
        tier=fields["tier"],
        monthly_price=Money(currency, fields["monthly_price_minor"]),
        included_tokens=fields["included_tokens"],
        overage_price_per_1k_tokens=None if overage is None else Money(currency, overage),
        allowed_models=tuple(fields["allowed_models"]),
        rate_limit_tier=fields["rate_limit_tier"],
        sort_order=fields["sort_order"],
        create_time=datetime.fromisoformat(fields["create_time"]),
        retire_time=None if retire_time is None else datetime.fromisoformat(retire_time),
    )


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
