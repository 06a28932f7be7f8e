"""Billing's persistence as its domain sees it: one unit of work with typed repositories.

Same shape as every service (`services.common.unit_of_work`): `write()` and `read()` yield a
`BillingUnitOfWork`; repositories return frozen dataclasses, never commit, and mark what they change
stale so the after-commit hooks drop cached copies. The SQL implementation is
`services.billing.repository`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from services.common.unit_of_work import Outbox, UnitsOfWork

if TYPE_CHECKING:
    from services.billing.plans import Plan

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


class BillingUnitOfWork(Protocol):
    """One transaction of the billing service, with its repositories and its outbox."""

    @property
    def plans(self) -> PlanRepository: ...

    @property
    def outbox(self) -> Outbox: ...


BillingUnitsOfWork = UnitsOfWork[BillingUnitOfWork]
