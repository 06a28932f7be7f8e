"""BillingService over gRPC: decode, call the domain, encode."""

from __future__ import annotations

import grpc

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from parley.common.v1 import common_pb2
from services.billing.plans import Plan, PlanCatalog
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.http_cache import CATALOG_CACHE, send_cache_headers

_TIERS = {
    "free": common_pb2.PLAN_TIER_FREE,
    "pro": common_pb2.PLAN_TIER_PRO,
    "team": common_pb2.PLAN_TIER_TEAM,
}


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """The public billing API; RPCs not overridden here answer UNIMPLEMENTED until they are built."""

    def __init__(self, catalog: PlanCatalog) -> None:
        self._catalog = catalog

    async def ListPlans(
        self, request: billing_pb2.ListPlansRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListPlansResponse:
        page = await self._catalog.list_plans(
            page_size=request.page_size, page_token=request.page_token, include_retired=request.show_retired
        )
        reply = billing_pb2.ListPlansResponse(
            plans=[plan_to_proto(plan) for plan in page.items], next_page_token=page.next_page_token
        )
        return await send_cache_headers(context, reply, CATALOG_CACHE)

    async def GetPlan(
        self, request: billing_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetPlanResponse:
        plan = await self._catalog.get_plan(request.plan_id)
        reply = billing_pb2.GetPlanResponse(plan=plan_to_proto(plan))
        return await send_cache_headers(context, reply, CATALOG_CACHE)


def plan_to_proto(plan: Plan) -> billing_pb2.Plan:
    message = billing_pb2.Plan(
        id=plan.id,
        display_name=plan.display_name,
        description=plan.description,
        tier=_TIERS.get(plan.tier, common_pb2.PLAN_TIER_UNSPECIFIED),
        monthly_price=money_to_proto(plan.monthly_price),
        included_tokens=plan.included_tokens,
        hard_stop=plan.hard_stop,
        allowed_models=plan.allowed_models,
        rate_limit_tier=plan.rate_limit_tier,
        retired=plan.retired,
        create_time=timestamp_to_proto(plan.create_time),
    )
    if plan.overage_price_per_1k_tokens is not None:
        message.overage_price_per_1k_tokens.CopyFrom(money_to_proto(plan.overage_price_per_1k_tokens))
    if plan.retire_time is not None:
        message.retire_time.CopyFrom(timestamp_to_proto(plan.retire_time))
    return message
