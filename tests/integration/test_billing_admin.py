"""BillingAdminService over real gRPC and mTLS, on SQLite and PostgreSQL: admins add and retire plans,
everyone else is refused, and the public catalog shows the change at once.

The production server chain (`create_server`: identity, caller check, validation, error mapping)
hosts billing's wiring; calls come through the gateway's channel with the identity headers it sets.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from parley.common.v1 import common_pb2
from services.common.db import Database
from services.common.identity import AUTH_METHOD_HEADER, ROLES_HEADER, USER_ID_HEADER, encode_roles_header
from services.common.migrate import upgrade_async
from tests.support.pki import ServicePki
from tests.support.servers import RunningServer, hosted, rich_status, serving

Metadata = tuple[tuple[str, str], ...]


def identity_headers(*roles: str) -> Metadata:
    """What the gateway sets for a caller with an API key holding these roles."""
    return (
        (USER_ID_HEADER, str(uuid.uuid4())),
        (AUTH_METHOD_HEADER, "api_key"),
        (ROLES_HEADER, encode_roles_header(list(roles))),
    )


AS_ADMIN = identity_headers("user", "admin")
AS_USER = identity_headers("user")


@dataclass
class Billing:
    running: RunningServer

    @property
    def admin(self) -> billing_pb2_grpc.BillingAdminServiceStub:
        return billing_pb2_grpc.BillingAdminServiceStub(self.running.channel)

    @property
    def public(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.running.channel)

    async def offered(self) -> list[str]:
        reply = await self.public.ListPlans(billing_pb2.ListPlansRequest())
        return [plan.id for plan in reply.plans]


@pytest.fixture
async def billing(database_url: str, service_pki: ServicePki) -> AsyncIterator[Billing]:
    await upgrade_async(database_url)
    database = Database(database_url)
    try:
        async with serving(hosted(["billing"], database), pki=service_pki) as running:
            yield Billing(running)
    finally:
        await database.dispose()


def plus_plan() -> billing_pb2.Plan:
    return billing_pb2.Plan(
        id="plus",
        display_name="Plus",
        description="Between free and pro.",
        tier=common_pb2.PLAN_TIER_PRO,
        monthly_price=common_pb2.Money(currency_code="USD", amount_minor=1_000),
        included_tokens=500_000,
        overage_price_per_1k_tokens=common_pb2.Money(currency_code="USD", amount_minor=2),
        allowed_models=["parley-local", "gpt-4o-mini"],
        rate_limit_tier="pro",
    )


def create(request_id: str, plan: billing_pb2.Plan) -> billing_pb2.CreatePlanRequest:
    return billing_pb2.CreatePlanRequest(request_id=request_id, plan=plan)


def retire(request_id: str, plan_id: str) -> billing_pb2.RetirePlanRequest:
    return billing_pb2.RetirePlanRequest(request_id=request_id, plan_id=plan_id)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = rich_status(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    bad_request = rich_status(error)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    return [violation.field for violation in bad_request.field_violations]


async def test_an_admin_adds_a_plan_and_the_public_catalog_offers_it(billing: Billing) -> None:
    assert await billing.offered() == ["free", "pro", "team"]
    submitted = plus_plan()
    # OUTPUT_ONLY fields in the request are ignored.
    submitted.retired = True
    submitted.create_time.CopyFrom(Timestamp(seconds=1))
    submitted.retire_time.CopyFrom(Timestamp(seconds=2))

    reply = await billing.admin.CreatePlan(create("req-1", submitted), metadata=AS_ADMIN)

    stored = reply.plan
    assert (stored.id, stored.tier, stored.hard_stop, stored.retired) == (
        "plus",
        common_pb2.PLAN_TIER_PRO,
        False,
        False,
    )
    assert (stored.monthly_price.amount_minor, stored.overage_price_per_1k_tokens.amount_minor) == (1_000, 2)
    assert stored.create_time.seconds > 1
    assert not stored.HasField("retire_time")
    assert (await billing.public.GetPlan(billing_pb2.GetPlanRequest(plan_id="plus"))).plan == stored
    assert await billing.offered() == ["free", "plus", "pro", "team"]

    again = await billing.admin.CreatePlan(create("req-1", plus_plan()), metadata=AS_ADMIN)
    assert again.plan == stored


async def test_an_admin_retires_a_plan_that_stays_readable(billing: Billing) -> None:
    assert await billing.offered() == ["free", "pro", "team"]

    reply = await billing.admin.RetirePlan(retire("req-1", "team"), metadata=AS_ADMIN)

    assert reply.plan.retired
    assert reply.plan.HasField("retire_time")
    assert await billing.offered() == ["free", "pro"]
    listed = await billing.public.ListPlans(billing_pb2.ListPlansRequest(show_retired=True))
    assert [plan.id for plan in listed.plans] == ["free", "pro", "team"]
    assert (await billing.public.GetPlan(billing_pb2.GetPlanRequest(plan_id="team"))).plan == reply.plan
    again = await billing.admin.RetirePlan(retire("req-2", "team"), metadata=AS_ADMIN)
    assert again.plan == reply.plan


@pytest.mark.parametrize(
    ("metadata", "code", "reason"),
    [
        (AS_USER, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        ((), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    ],
    ids=["user", "anonymous"],
)
async def test_only_admins_may_change_the_catalog(
    billing: Billing, metadata: Metadata, code: grpc.StatusCode, reason: str
) -> None:
    for call in (
        billing.admin.CreatePlan(create("req-1", plus_plan()), metadata=metadata),
        billing.admin.RetirePlan(retire("req-2", "pro"), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == code
        assert error_info(refused.value).reason == reason
    assert await billing.offered() == ["free", "pro", "team"]


async def test_invalid_fields_are_invalid_argument_with_field_violations(billing: Billing) -> None:
    plan = plus_plan()
    plan.id = "Plus!"
    plan.tier = common_pb2.PLAN_TIER_UNSPECIFIED
    plan.hard_stop = True
    plan.allowed_models.append("gpt-5")
    plan.monthly_price.minor_nanos = 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.admin.CreatePlan(create("req-1", plan), metadata=AS_ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "INVALID_ARGUMENT"
    assert violated_fields(refused.value) == [
        "plan.id",
        "plan.tier",
        "plan.monthly_price.minor_nanos",
        "plan.hard_stop",
        "plan.allowed_models[2]",
    ]


async def test_a_missing_request_id_or_plan_is_required_field(billing: Billing) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.admin.CreatePlan(billing_pb2.CreatePlanRequest(), metadata=AS_ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(violated_fields(refused.value)) == ["plan", "request_id"]


async def test_reusing_a_request_id_for_another_plan_is_request_id_reused(billing: Billing) -> None:
    await billing.admin.CreatePlan(create("req-1", plus_plan()), metadata=AS_ADMIN)
    other = plus_plan()
    other.id = "plus-two"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.admin.CreatePlan(create("req-1", other), metadata=AS_ADMIN)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(refused.value).reason == "REQUEST_ID_REUSED"


async def test_a_taken_plan_id_is_plan_already_exists(billing: Billing) -> None:
    taken = plus_plan()
    taken.id = "pro"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.admin.CreatePlan(create("req-1", taken), metadata=AS_ADMIN)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(refused.value).reason == "PLAN_ALREADY_EXISTS"


async def test_retiring_free_or_an_unknown_plan_is_refused(billing: Billing) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.admin.RetirePlan(retire("req-1", "free"), metadata=AS_ADMIN)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(refused.value) == ["plan_id"]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await billing.admin.RetirePlan(retire("req-2", "platinum"), metadata=AS_ADMIN)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(refused.value).reason == "PLAN_NOT_FOUND"
