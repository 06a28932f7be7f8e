"""The plan catalog: what a plan is and how the catalog is listed (no I/O types here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.common.errors import NotFound
from services.common.money import Money
from services.common.pagination import (
    PageCursor,
    cursor_sort_key_and_id,
    decode_page_token,
    effective_page_size,
    encode_page_token,
    query_fingerprint,
)


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


@dataclass(frozen=True)
class PlanPage:
    plans: tuple[Plan, ...]
    next_page_token: str


class PlanStore(Protocol):
    """Reads plans in catalog order (sort_order, then id)."""

    async def list_after(
        self, *, after: tuple[int, str] | None, limit: int, include_retired: bool
    ) -> Sequence[Plan]: ...

    async def get(self, plan_id: str) -> Plan | None: ...


# Opens one unit of work and hands the caller a store bound to it.
PlanStoreFactory = Callable[[], AbstractAsyncContextManager[PlanStore]]


class PlanCatalog:
    """Lists the plan catalog, page by page."""

    def __init__(self, stores: PlanStoreFactory) -> None:
        self._stores = stores

    async def list_plans(self, *, page_size: int, page_token: str, include_retired: bool) -> PlanPage:
        limit = effective_page_size(page_size)
        query = query_fingerprint("plans", include_retired)
        cursor = decode_page_token(page_token, expected_query=query)
        after = cursor_sort_key_and_id(cursor, int) if cursor else None
        async with self._stores() as store:
            # One extra row tells whether another page exists without a COUNT query.
            found = list(
                await store.list_after(after=after, limit=limit + 1, include_retired=include_retired)
            )
        page, more = found[:limit], len(found) > limit
        next_token = ""
        if more:
            last = page[-1]
            next_token = encode_page_token(PageCursor(after=(str(last.sort_order), last.id), query=query))
        return PlanPage(plans=tuple(page), next_page_token=next_token)

    async def get_plan(self, plan_id: str) -> Plan:
        """One plan, retired or not; an unknown id is NOT_FOUND (PLAN_NOT_FOUND)."""
        async with self._stores() as store:
            plan = await store.get(plan_id)
        if plan is None:
            raise NotFound(f"There is no plan {plan_id!r}.", reason="PLAN_NOT_FOUND")
        return plan
