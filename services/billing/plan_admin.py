"""Plan catalog administration: adding plans and retiring them.

Only admins get here (the servicer checks the role). Both operations are idempotent on the
caller's `request_id` (`services.billing.idempotency`). A retired plan stays in the catalog: it is
no longer offered, GetPlan still answers for it, and its subscribers keep it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final

from services.billing.idempotency import (
    IdempotencyKey,
    claim_request_id,
    fingerprint,
    request_id_violations,
)
from services.billing.plans import PLAN_TIERS, Plan, plan_terms
from services.billing.ports import BillingUnitOfWork, BillingUnitsOfWork
from services.billing.subscriptions import FREE_PLAN_ID
from services.common.clock import Clock, utc_now
from services.common.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound
from services.common.model_catalog import ModelCatalog
from services.common.money import Money
from services.common.ratelimit import RateLimitConfig

PLAN_ID_PATTERN: Final = re.compile(r"[a-z][a-z0-9-]{1,31}")
DISPLAY_NAME_MAX: Final = 100
DESCRIPTION_MAX: Final = 500
# Gaps between the catalog positions of the seeded plans, so new plans fit between them.
SORT_ORDER_STEP: Final = 10
# The rate-limit descriptor entry that carries the caller's plan (see envoy/ratelimits.yaml).
RATE_LIMIT_PLAN_ENTRY: Final = "plan"

CREATE_PLAN: Final = "CreatePlan"
RETIRE_PLAN: Final = "RetirePlan"


@dataclass(frozen=True)
class PriceDraft:
    """A price as the request states it, before it is checked and becomes `Money`."""

    currency_code: str
    amount_minor: int
    minor_nanos: int = 0


@dataclass(frozen=True)
class PlanDraft:
    """A plan as an admin submits it; what the catalog decides (position, times) is not in it."""

    id: str
    display_name: str
    description: str
    # A name of `PLAN_TIERS`; "" when the request left it unspecified.
    tier: str
    monthly_price: PriceDraft | None
    included_tokens: int
    # None: a hard stop at the allowance, which `hard_stop` must then say too.
    overage_price_per_1k_tokens: PriceDraft | None
    hard_stop: bool
    allowed_models: tuple[str, ...]
    rate_limit_tier: str


def plan_rate_limit_tiers(rate_limits: RateLimitConfig) -> frozenset[str]:
    """The plan names the gateway's rate limits tell apart: the `plan` values of their rules.

    A plan whose tier is not among them would silently get the limits for unknown plans.
    """
    return frozenset(
        rule.descriptor[RATE_LIMIT_PLAN_ENTRY]
        for rule in rate_limits.rules
        if RATE_LIMIT_PLAN_ENTRY in rule.descriptor
    )


class PlanAdmin:
    """Adds plans to the catalog and retires them."""

    def __init__(
        self,
        units: BillingUnitsOfWork,
        models: ModelCatalog,
        rate_limit_tiers: Collection[str],
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._units = units
        self._models = models
        self._rate_limit_tiers = frozenset(rate_limit_tiers)
        self._clock = clock

    async def create_plan(self, request_id: str, draft: PlanDraft, *, actor_id: str) -> Plan:
        """Add the plan, listed after every plan that costs no more; a retry with the same request
        id and plan returns the stored plan. PLAN_ALREADY_EXISTS when its id is taken."""
        violations = request_id_violations(request_id) + self._draft_violations(draft)
        # A draft without a price has a violation already; the second test is for the type checker.
        if violations or draft.monthly_price is None:
            raise _invalid(violations)
        now = self._clock()
        plan = _plan_of(draft, draft.monthly_price, now)
        key = IdempotencyKey(
            scope=actor_id,
            request_id=request_id,
            operation=CREATE_PLAN,
            fingerprint=fingerprint(plan_terms(plan)),
            result_key=plan.id,
            create_time=now,
        )
        async with self._units.write() as uow:
            earlier = await claim_request_id(uow, key)
            if earlier is not None:
                return await _stored_plan(uow, earlier)
            placed = replace(plan, sort_order=_sort_order_for(plan, await uow.plans.all_plans()))
            if not await uow.plans.add(placed):
                raise AlreadyExists(
                    f"There is a plan {plan.id!r} already; plan ids are never reused.",
                    reason="PLAN_ALREADY_EXISTS",
                    metadata={"plan_id": plan.id},
                )
            return placed

    async def retire_plan(self, request_id: str, plan_id: str, *, actor_id: str) -> Plan:
        """Stop offering the plan; retiring a retired plan returns it unchanged. The free plan,
        where every new user starts, cannot be retired."""
        violations = request_id_violations(request_id)
        if violations:
            raise _invalid(violations)
        if plan_id == FREE_PLAN_ID:
            # No ErrorReason says "this plan must stay on sale", so this is plain INVALID_ARGUMENT.
            raise _invalid(
                [
                    FieldViolation(
                        "plan_id",
                        "the free plan cannot be retired: every new user starts on it",
                        "INVALID_ARGUMENT",
                    )
                ]
            )
        if not PLAN_ID_PATTERN.fullmatch(plan_id):
            raise _no_such_plan(plan_id)
        now = self._clock()
        key = IdempotencyKey(
            scope=actor_id,
            request_id=request_id,
            operation=RETIRE_PLAN,
            fingerprint=fingerprint(plan_id),
            result_key=plan_id,
            create_time=now,
        )
        async with self._units.write() as uow:
            earlier = await claim_request_id(uow, key)
            if earlier is not None:
                return await _stored_plan(uow, earlier)
            plan = await uow.plans.get_for_update(plan_id)
            if plan is None:
                raise _no_such_plan(plan_id)
            if plan.retired:
                return plan
            retired = replace(plan, retire_time=now)
            await uow.plans.save(retired)
            return retired

    def _draft_violations(self, draft: PlanDraft) -> list[FieldViolation]:
        return [
            *_wording_violations(draft),
            *_pricing_violations(draft),
            *self._entitlement_violations(draft),
        ]

    def _entitlement_violations(self, draft: PlanDraft) -> Iterator[FieldViolation]:
        """What subscribers get: the models and the gateway's rate-limit tier."""
        if not draft.allowed_models:
            yield _plan_violation("allowed_models", "must name at least one model")
        for index, model_id in enumerate(draft.allowed_models):
            if self._models.get(model_id) is None:
                yield _plan_violation(
                    f"allowed_models[{index}]", f"there is no model {model_id!r} in the model catalog"
                )
            elif model_id in draft.allowed_models[:index]:
                yield _plan_violation(f"allowed_models[{index}]", f"{model_id!r} is listed twice")
        if draft.rate_limit_tier not in self._rate_limit_tiers:
            known = ", ".join(sorted(self._rate_limit_tiers))
            yield _plan_violation(
                "rate_limit_tier", f"must be a plan tier of the gateway's rate limits: {known}"
            )


def _plan_violation(field: str, description: str, reason: str = "INVALID_ARGUMENT") -> FieldViolation:
    return FieldViolation(f"plan.{field}", description, reason)


def _wording_violations(draft: PlanDraft) -> Iterator[FieldViolation]:
    """How the plan is named and described."""
    if not PLAN_ID_PATTERN.fullmatch(draft.id):
        yield _plan_violation(
            "id", "must be 2 to 32 characters: a lower-case letter, then lower-case letters, digits or '-'"
        )
    if not 0 < len(draft.display_name.strip()) <= DISPLAY_NAME_MAX:
        yield _plan_violation("display_name", f"must be 1 to {DISPLAY_NAME_MAX} characters")
    if len(draft.description.strip()) > DESCRIPTION_MAX:
        yield _plan_violation("description", f"must be at most {DESCRIPTION_MAX} characters")
    if draft.tier not in PLAN_TIERS:
        yield _plan_violation("tier", f"must be one of {', '.join(PLAN_TIERS)}")


def _pricing_violations(draft: PlanDraft) -> Iterator[FieldViolation]:
    """The price, the allowance, and what happens past it: overage at a price, or a hard stop."""
    monthly, overage = draft.monthly_price, draft.overage_price_per_1k_tokens
    if monthly is None:
        yield _plan_violation("monthly_price", "is required (0 for a free plan)")
    else:
        yield from _price_violations("plan.monthly_price", monthly)
    if draft.included_tokens < 0:
        yield _plan_violation("included_tokens", "must not be negative")
    if overage is None:
        if not draft.hard_stop:
            yield _plan_violation(
                "hard_stop", "must be true when no overage price is set: usage then stops at the allowance"
            )
        return
    yield from _price_violations("plan.overage_price_per_1k_tokens", overage)
    if monthly is not None and overage.currency_code != monthly.currency_code:
        yield _plan_violation(
            "overage_price_per_1k_tokens.currency_code",
            "must be the currency of monthly_price",
            "CURRENCY_MISMATCH",
        )
    if draft.hard_stop:
        yield _plan_violation(
            "hard_stop", "must be false when an overage price is set: a hard stop has no overage"
        )


def _price_violations(path: str, price: PriceDraft) -> Iterator[FieldViolation]:
    code = price.currency_code
    if not (len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()):
        yield FieldViolation(
            f"{path}.currency_code", "must be an upper-case ISO 4217 code such as USD", "INVALID_ARGUMENT"
        )
    if price.amount_minor < 0:
        yield FieldViolation(f"{path}.amount_minor", "must not be negative", "INVALID_ARGUMENT")
    if price.minor_nanos != 0:
        yield FieldViolation(
            f"{path}.minor_nanos", "must be 0: plan prices are whole minor units", "INVALID_ARGUMENT"
        )


def _invalid(violations: Sequence[FieldViolation]) -> InvalidArgument:
    fields = ", ".join(dict.fromkeys(violation.field for violation in violations))
    return InvalidArgument(
        f"The request has invalid fields: {fields}.", reason="INVALID_ARGUMENT", field_violations=violations
    )


def _no_such_plan(plan_id: str) -> NotFound:
    return NotFound(f"There is no plan {plan_id!r}.", reason="PLAN_NOT_FOUND")


def _plan_of(draft: PlanDraft, monthly_price: PriceDraft, now: datetime) -> Plan:
    """The checked draft as a plan on sale; its catalog position is set when it is added."""
    currency = monthly_price.currency_code
    overage = draft.overage_price_per_1k_tokens
    return Plan(
        id=draft.id,
        display_name=draft.display_name.strip(),
        description=draft.description.strip(),
        tier=draft.tier,
        monthly_price=Money(currency, monthly_price.amount_minor),
        included_tokens=draft.included_tokens,
        overage_price_per_1k_tokens=None if overage is None else Money(currency, overage.amount_minor),
        allowed_models=draft.allowed_models,
        rate_limit_tier=draft.rate_limit_tier,
        sort_order=0,
        create_time=now,
        retire_time=None,
    )


def _sort_order_for(plan: Plan, catalog: Sequence[Plan]) -> int:
    """A catalog position after every plan that costs no more than `plan` and before the dearer
    ones, since ListPlans lists plans cheapest first (amounts are compared across currencies: the
    catalog has one in practice)."""
    price = plan.monthly_price.amount_minor
    after = max(
        (other.sort_order for other in catalog if other.monthly_price.amount_minor <= price), default=None
    )
    before = min(
        (other.sort_order for other in catalog if other.monthly_price.amount_minor > price), default=None
    )
    if before is None:
        return (after if after is not None else 0) + SORT_ORDER_STEP
    if after is None:
        return before - SORT_ORDER_STEP
    # Midway leaves room on both sides for later plans; once none is left, ties go by plan id.
    return (after + before) // 2


async def _stored_plan(uow: BillingUnitOfWork, plan_id: str) -> Plan:
    plan = await uow.plans.get(plan_id)
    if plan is None:
        raise _no_such_plan(plan_id)
    return plan
