"""Plan catalog administration on each SQL adapter (SQLite and PostgreSQL).

Admins add plans and retire them. A new plan is checked field by field and listed cheapest first; a
retired plan is no longer offered but stays readable, and its subscribers keep it across renewals.
Both operations are idempotent on the caller's request id: a retry replays the stored outcome, the
same id for another request is REQUEST_ID_REUSED, and the id of a refused call stays free.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest

from services.billing.ledger import CreditLedger
from services.billing.plan_admin import PlanAdmin, PlanDraft, PriceDraft, plan_rate_limit_tiers
from services.billing.plans import PlanCatalog
from services.billing.ports import BillingUnitOfWork
from services.billing.repository import billing_units_of_work
from services.billing.subscriptions import Subscription, SubscriptionManager, add_months
from services.common.cache import InMemoryReadCache, read_cache_invalidation
from services.common.db import Database
from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ParleyError
from services.common.model_catalog import load_model_catalog
from services.common.models import new_id
from services.common.ratelimit import load_rate_limit_config
from services.common.sql_unit_of_work import SqlUnitsOfWork
from tests.support.domain import START, Clock, refusal

ADMIN = new_id()
OTHER_ADMIN = new_id()

PLUS = PlanDraft(
    id="plus",
    display_name="Plus",
    description="Between free and pro.",
    tier="pro",
    monthly_price=PriceDraft("USD", 1_000),
    included_tokens=500_000,
    overage_price_per_1k_tokens=PriceDraft("USD", 2),
    hard_stop=False,
    allowed_models=("parley-local", "gpt-4o-mini"),
    rate_limit_tier="pro",
)


@dataclass
class Catalog:
    clock: Clock
    units: SqlUnitsOfWork[BillingUnitOfWork]
    plans: PlanCatalog
    admin: PlanAdmin
    subscriptions: SubscriptionManager
    ledger: CreditLedger

    async def offered(self) -> list[str]:
        page = await self.plans.list_plans(page_size=50, page_token="", include_retired=False)
        return [plan.id for plan in page.items]

    async def every_plan(self) -> list[str]:
        page = await self.plans.list_plans(page_size=50, page_token="", include_retired=True)
        return [plan.id for plan in page.items]


@pytest.fixture
def catalog(database: Database) -> Catalog:
    clock = Clock()
    units = billing_units_of_work(database)
    read_cache = InMemoryReadCache()
    units.after_commit(read_cache_invalidation(read_cache))
    plans = PlanCatalog(units, read_cache)
    models = load_model_catalog()
    tiers = plan_rate_limit_tiers(load_rate_limit_config())
    subscriptions = SubscriptionManager(units, plans, clock=clock)
    return Catalog(
        clock=clock,
        units=units,
        plans=plans,
        admin=PlanAdmin(units, models, tiers, clock=clock),
        subscriptions=subscriptions,
        ledger=CreditLedger(units, subscriptions, models, clock=clock),
    )


def violated_fields(error: ParleyError) -> list[str]:
    return [violation.field for violation in error.field_violations]


# ---- creating ------------------------------------------------------------------------------------


async def test_a_new_plan_is_stored_and_offered_at_once_despite_the_cached_catalog(catalog: Catalog) -> None:
    assert await catalog.offered() == ["free", "pro", "team"]  # now cached

    created = await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)

    assert (created.id, created.display_name, created.tier, created.rate_limit_tier) == (
        "plus",
        "Plus",
        "pro",
        "pro",
    )
    assert (created.monthly_price.amount_minor, created.included_tokens) == (1_000, 500_000)
    assert created.overage_price_per_1k_tokens is not None
    assert created.overage_price_per_1k_tokens.amount_minor == 2
    assert created.allowed_models == ("parley-local", "gpt-4o-mini")
    assert (created.create_time, created.retire_time, created.hard_stop) == (START, None, False)
    assert await catalog.plans.get_plan("plus") == created
    assert await catalog.offered() == ["free", "plus", "pro", "team"]


async def test_new_plans_are_listed_cheapest_first(catalog: Catalog) -> None:
    prices = {"starter": 0, "plus": 1_000, "pro-max": 3_000, "enterprise": 100_000, "plus-two": 1_000}
    for index, (plan_id, price) in enumerate(prices.items()):
        draft = replace(PLUS, id=plan_id, monthly_price=PriceDraft("USD", price))
        await catalog.admin.create_plan(f"req-{index}", draft, actor_id=ADMIN)

    assert await catalog.offered() == [
        "free",
        "starter",
        "plus",
        "plus-two",
        "pro",
        "pro-max",
        "team",
        "enterprise",
    ]


async def test_a_hard_stop_plan_has_no_overage_price(catalog: Catalog) -> None:
    draft = replace(PLUS, id="capped", overage_price_per_1k_tokens=None, hard_stop=True)
    created = await catalog.admin.create_plan("req-1", draft, actor_id=ADMIN)
    assert (created.hard_stop, created.overage_price_per_1k_tokens) == (True, None)


async def test_text_is_trimmed_and_the_fields_the_catalog_decides_are_its_own(catalog: Catalog) -> None:
    draft = replace(PLUS, display_name="  Plus  ", description="\n" + "d" * 500 + " ")
    created = await catalog.admin.create_plan("req-1", draft, actor_id=ADMIN)
    assert (created.display_name, created.description) == ("Plus", "d" * 500)
    assert not created.retired


async def test_a_taken_plan_id_is_plan_already_exists_and_leaves_the_request_id_free(
    catalog: Catalog,
) -> None:
    taken = await refusal(
        catalog.admin.create_plan("req-1", replace(PLUS, id="pro"), actor_id=ADMIN), AlreadyExists
    )
    assert taken.reason == "PLAN_ALREADY_EXISTS"
    assert (await catalog.plans.get_plan("pro")).display_name == "Pro"

    # The refused call claimed nothing: the corrected retry may use the same request id.
    created = await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)
    assert created.id == "plus"


# ---- idempotency ---------------------------------------------------------------------------------


async def test_a_retry_returns_the_stored_plan_without_adding_another(catalog: Catalog) -> None:
    first = await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)
    catalog.clock.advance(timedelta(minutes=5))

    again = await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)

    assert again == first
    assert (await catalog.every_plan()).count("plus") == 1


async def test_a_retry_returns_the_plan_as_stored_now(catalog: Catalog) -> None:
    await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)
    retired = await catalog.admin.retire_plan("req-2", "plus", actor_id=ADMIN)

    assert await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN) == retired


async def test_a_request_id_reused_for_another_plan_is_refused(catalog: Catalog) -> None:
    await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)

    for other in (replace(PLUS, id="plus-two"), replace(PLUS, included_tokens=1)):
        reused = await refusal(catalog.admin.create_plan("req-1", other, actor_id=ADMIN), AlreadyExists)
        assert reused.reason == "REQUEST_ID_REUSED"
        assert violated_fields(reused) == ["request_id"]
    assert "plus-two" not in await catalog.every_plan()


async def test_a_request_id_reused_for_another_operation_is_refused(catalog: Catalog) -> None:
    await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)
    reused = await refusal(catalog.admin.retire_plan("req-1", "plus", actor_id=ADMIN), AlreadyExists)
    assert reused.reason == "REQUEST_ID_REUSED"
    assert not (await catalog.plans.get_plan("plus")).retired


async def test_request_ids_belong_to_their_caller(catalog: Catalog) -> None:
    await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)
    other = await catalog.admin.create_plan("req-1", replace(PLUS, id="plus-two"), actor_id=OTHER_ADMIN)
    assert other.id == "plus-two"


async def test_concurrent_retries_of_one_request_create_one_plan(catalog: Catalog) -> None:
    created = await asyncio.gather(
        *(catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN) for _ in range(8))
    )
    assert len({plan.create_time for plan in created}) == 1
    assert all(plan == created[0] for plan in created)
    assert (await catalog.every_plan()).count("plus") == 1


async def test_concurrent_creations_of_one_plan_id_admit_exactly_one(catalog: Catalog) -> None:
    async def attempt(index: int) -> str:
        draft = replace(PLUS, included_tokens=index)
        try:
            await catalog.admin.create_plan(f"req-{index}", draft, actor_id=ADMIN)
        except AlreadyExists as error:
            return error.reason
        return "created"

    outcomes = await asyncio.gather(*(attempt(index) for index in range(8)))
    assert sorted(outcomes) == ["PLAN_ALREADY_EXISTS"] * 7 + ["created"]


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"id": ""}, ["plan.id"]),
        ({"id": "p"}, ["plan.id"]),
        ({"id": "Plus"}, ["plan.id"]),
        ({"id": "9lives"}, ["plan.id"]),
        ({"id": "plus_two"}, ["plan.id"]),
        ({"id": "p" * 33}, ["plan.id"]),
        ({"display_name": "   "}, ["plan.display_name"]),
        ({"display_name": "x" * 101}, ["plan.display_name"]),
        ({"description": "x" * 501}, ["plan.description"]),
        ({"tier": ""}, ["plan.tier"]),
        ({"tier": "platinum"}, ["plan.tier"]),
        ({"monthly_price": None}, ["plan.monthly_price"]),
        (
            {"monthly_price": PriceDraft("usd", 1_000), "overage_price_per_1k_tokens": PriceDraft("usd", 2)},
            [
                "plan.monthly_price.currency_code",
                "plan.overage_price_per_1k_tokens.currency_code",
            ],
        ),
        ({"monthly_price": PriceDraft("USD", -1)}, ["plan.monthly_price.amount_minor"]),
        ({"monthly_price": PriceDraft("USD", 999, 500_000_000)}, ["plan.monthly_price.minor_nanos"]),
        ({"included_tokens": -1}, ["plan.included_tokens"]),
        (
            {"overage_price_per_1k_tokens": PriceDraft("USD", -2)},
            ["plan.overage_price_per_1k_tokens.amount_minor"],
        ),
        (
            {"overage_price_per_1k_tokens": PriceDraft("USD", 0, 15_000_000)},
            ["plan.overage_price_per_1k_tokens.minor_nanos"],
        ),
        (
            {"overage_price_per_1k_tokens": PriceDraft("EUR", 2)},
            ["plan.overage_price_per_1k_tokens.currency_code"],
        ),
        ({"hard_stop": True}, ["plan.hard_stop"]),
        ({"overage_price_per_1k_tokens": None}, ["plan.hard_stop"]),
        ({"allowed_models": ()}, ["plan.allowed_models"]),
        ({"allowed_models": ("gpt-4o-mini", "gpt-5")}, ["plan.allowed_models[1]"]),
        ({"allowed_models": ("gpt-4o-mini", "gpt-4o-mini")}, ["plan.allowed_models[1]"]),
        ({"rate_limit_tier": "platinum"}, ["plan.rate_limit_tier"]),
        ({"rate_limit_tier": ""}, ["plan.rate_limit_tier"]),
        ({"id": "", "tier": "", "allowed_models": ()}, ["plan.id", "plan.tier", "plan.allowed_models"]),
    ],
)
async def test_every_invalid_field_is_a_field_violation(
    catalog: Catalog, changes: dict[str, Any], fields: list[str]
) -> None:
    invalid = await refusal(
        catalog.admin.create_plan("req-1", replace(PLUS, **changes), actor_id=ADMIN),
        InvalidArgument,
    )
    assert invalid.reason == "INVALID_ARGUMENT"
    assert violated_fields(invalid) == fields
    assert await catalog.every_plan() == ["free", "pro", "team"]


async def test_a_currency_mismatch_is_named_as_such(catalog: Catalog) -> None:
    draft = replace(PLUS, overage_price_per_1k_tokens=PriceDraft("EUR", 2))
    invalid = await refusal(catalog.admin.create_plan("req-1", draft, actor_id=ADMIN), InvalidArgument)
    assert [violation.reason for violation in invalid.field_violations] == ["CURRENCY_MISMATCH"]


async def test_an_over_long_request_id_is_a_field_violation(catalog: Catalog) -> None:
    invalid = await refusal(catalog.admin.create_plan("r" * 129, PLUS, actor_id=ADMIN), InvalidArgument)
    assert violated_fields(invalid) == ["request_id"]
    assert (await catalog.admin.create_plan("r" * 128, PLUS, actor_id=ADMIN)).id == "plus"


def test_the_rate_limit_tiers_are_the_plans_the_shipped_rate_limits_tell_apart() -> None:
    assert plan_rate_limit_tiers(load_rate_limit_config()) == {"free", "pro", "team"}


# ---- retiring ------------------------------------------------------------------------------------


async def test_a_retired_plan_is_not_offered_but_stays_readable(catalog: Catalog) -> None:
    assert await catalog.offered() == ["free", "pro", "team"]  # now cached
    catalog.clock.advance(timedelta(days=1))

    retired = await catalog.admin.retire_plan("req-1", "team", actor_id=ADMIN)

    assert (retired.retired, retired.retire_time) == (True, START + timedelta(days=1))
    assert await catalog.plans.get_plan("team") == retired
    assert await catalog.offered() == ["free", "pro"]
    assert await catalog.every_plan() == ["free", "pro", "team"]


async def test_retiring_a_retired_plan_returns_it_unchanged(catalog: Catalog) -> None:
    first = await catalog.admin.retire_plan("req-1", "pro", actor_id=ADMIN)
    catalog.clock.advance(timedelta(hours=1))

    assert await catalog.admin.retire_plan("req-1", "pro", actor_id=ADMIN) == first
    assert await catalog.admin.retire_plan("req-2", "pro", actor_id=ADMIN) == first
    assert first.retire_time == START


async def test_the_free_plan_cannot_be_retired(catalog: Catalog) -> None:
    invalid = await refusal(catalog.admin.retire_plan("req-1", "free", actor_id=ADMIN), InvalidArgument)
    assert violated_fields(invalid) == ["plan_id"]
    assert not (await catalog.plans.get_plan("free")).retired


@pytest.mark.parametrize("plan_id", ["platinum", "Not A Plan", "p" * 200])
async def test_retiring_an_unknown_plan_is_plan_not_found(catalog: Catalog, plan_id: str) -> None:
    missing = await refusal(catalog.admin.retire_plan("req-1", plan_id, actor_id=ADMIN), NotFound)
    assert missing.reason == "PLAN_NOT_FOUND"
    # Nothing was claimed: the request id is still free.
    assert (await catalog.admin.retire_plan("req-1", "pro", actor_id=ADMIN)).retired


async def test_subscribers_of_a_retired_plan_keep_it_across_renewals(catalog: Catalog) -> None:
    await catalog.admin.create_plan("req-1", PLUS, actor_id=ADMIN)
    user_id = new_id()
    a_month_earlier = add_months(START, -1)
    # A subscription on plus whose period ends now, so the next read renews it.
    async with catalog.units.write() as uow:
        assert await uow.subscriptions.add(
            Subscription(
                id=new_id(),
                user_id=user_id,
                plan_id="plus",
                status="active",
                current_period_start=a_month_earlier,
                current_period_end=START,
                cancel_at_period_end=False,
                pending_plan_id=None,
                create_time=a_month_earlier,
                update_time=a_month_earlier,
                end_time=None,
            )
        )

    await catalog.admin.retire_plan("req-2", "plus", actor_id=ADMIN)
    balance = await catalog.ledger.balance(user_id)

    assert (balance.plan_id, balance.included_tokens, balance.hard_stop) == ("plus", 500_000, False)
    subscription, plan = await catalog.subscriptions.current(user_id)
    assert (subscription.plan_id, subscription.current_period_start) == ("plus", START)
    assert (plan.id, plan.retired) == ("plus", True)
