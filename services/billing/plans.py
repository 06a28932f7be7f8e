"""The plan catalog: what a plan is and how the catalog is listed (no SQL types here)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from parley.common.v1 import common_pb2
from services.billing.ports import CATALOG_KEY, PLAN_CACHE, BillingUnitsOfWork
from services.common.cache import InMemoryReadCache, ReadCache
from services.common.errors import NotFound
from services.common.money import Money
from services.common.pagination import BY_INTEGER, Page, keyset_page


@dataclass(frozen=True)
class Plan:
    """A subscription plan as customers see it."""

    id: str
    display_name: str
    description: str
    tier: str
    monthly_price: Money
    included_tokens: int
    overage_price_per_1k_tokens: Money | None
    allowed_models: tuple[str, ...]
    rate_limit_tier: str
    sort_order: int
    create_time: datetime
    retire_time: datetime | None

    @property
    def retired(self) -> bool:
        return self.retire_time is not None

    @property
    def hard_stop(self) -> bool:
        return self.overage_price_per_1k_tokens is None


_PLAN_TIERS: Final = {
    "free": common_pb2.PLAN_TIER_FREE,
    "pro": common_pb2.PLAN_TIER_PRO,
    "team": common_pb2.PLAN_TIER_TEAM,
}


PLAN_TIERS: Final = tuple(_PLAN_TIERS)


def plan_tier_to_proto(tier: str) -> common_pb2.PlanTier.ValueType:
    return _PLAN_TIERS.get(tier, common_pb2.PLAN_TIER_UNSPECIFIED)


def plan_tier_from_proto(tier: common_pb2.PlanTier.ValueType) -> str:
    """The tier's name; "" for UNSPECIFIED or a value this build does not know."""
    return next((name for name, value in _PLAN_TIERS.items() if value == tier), "")


# Plans change a few times a year, and every change drops the cached catalog after commit; the TTL
# only bounds how long a change made while the cache was unreachable can go unseen.
PLAN_CATALOG_TTL_S: Final = 300.0


class PlanCatalog:
    """Lists the plan catalog, page by page, from the read cache.

    The catalog is small and read on every pricing page, so it is cached as one entry holding every
    plan (retired ones included), loaded in one query on a miss and paged in memory. Plan writes
    (`uow.plans.save`) drop that entry once they commit, through the units' after-commit hook.
    Without a `read_cache` nothing is cached: every read loads the catalog.
    """

    def __init__(self, units: BillingUnitsOfWork, read_cache: ReadCache | None = None) -> None:
        self._units = units
        cache = read_cache if read_cache is not None else InMemoryReadCache(max_entries=0)
        self._cache = cache.named(PLAN_CACHE)

    async def list_plans(self, *, page_size: int, page_token: str, include_retired: bool) -> Page[Plan]:
        """Plans in catalog order (sort_order, then id); retired ones only with `include_retired`."""

        async def fetch(after: tuple[int, str] | None, limit: int) -> Sequence[Plan]:
            offered = [plan for plan in await self._catalog() if include_retired or not plan.retired]
            if after is not None:
                offered = [plan for plan in offered if (plan.sort_order, plan.id) > after]
            return offered[:limit]

        return await keyset_page(
            page_size=page_size,
            page_token=page_token,
            query=("plans", include_retired),
            sort_key=BY_INTEGER,
            position=lambda plan: (plan.sort_order, plan.id),
            fetch=fetch,
        )

    async def get_plan(self, plan_id: str) -> Plan:
        """One plan, retired or not; an unknown id is NOT_FOUND (PLAN_NOT_FOUND)."""
        plan = next((plan for plan in await self._catalog() if plan.id == plan_id), None)
        if plan is None:
            raise NotFound(f"There is no plan {plan_id!r}.", reason="PLAN_NOT_FOUND")
        return plan

    async def _catalog(self) -> list[Plan]:
        """Every plan in catalog order (sort_order, then id)."""
        return await self._cache.get_or_load(
            CATALOG_KEY, self._load, ttl_s=PLAN_CATALOG_TTL_S, encode=encode_plans, decode=decode_plans
        )

    async def _load(self) -> list[Plan]:
        async with self._units.read() as uow:
            plans = await uow.plans.all_plans()
        # Sorted here rather than by the database's collation, so paging over the cached list is
        # consistent with itself on every dialect.
        return sorted(plans, key=lambda plan: (plan.sort_order, plan.id))


def encode_plans(plans: Sequence[Plan]) -> bytes:
    """Plans as the read cache stores them: JSON, money as minor units, times in ISO 8601."""
    return json.dumps([_plan_fields(plan) for plan in plans], separators=(",", ":")).encode()


def decode_plans(data: bytes) -> list[Plan]:
    return [_plan_from_fields(fields) for fields in json.loads(data)]


def plan_terms(plan: Plan) -> dict[str, Any]:
    """What an admin chooses about a plan, as plain values (its catalog position and times aside)."""
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
    }


def _plan_fields(plan: Plan) -> dict[str, Any]:
    return {
        **plan_terms(plan),
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
