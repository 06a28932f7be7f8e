"""BillingService over gRPC: decode, call the domain, encode."""

from __future__ import annotations

import grpc

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.billing.ledger import CreditAccount, CreditLedger, Estimate, Reservation, Usage
from services.billing.plans import Plan, PlanCatalog, plan_tier_to_proto
from services.billing.subscriptions import Subscription, SubscriptionManager, subscription_status_to_proto
from services.common.call_context import current_identity
from services.common.encoding import money_to_proto, timestamp_to_proto
from services.common.http_cache import CATALOG_CACHE, send_cache_headers


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """The public billing API; RPCs not overridden here answer UNIMPLEMENTED until they are built."""

    def __init__(
        self, catalog: PlanCatalog, subscriptions: SubscriptionManager, ledger: CreditLedger
    ) -> None:
        self._catalog = catalog
        self._subscriptions = subscriptions
        self._ledger = ledger

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

    async def GetSubscription(
        self, request: billing_pb2.GetSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetSubscriptionResponse:
        caller = current_identity.get().require_user()
        subscription, plan = await self._subscriptions.current(caller.user_id)
        return billing_pb2.GetSubscriptionResponse(
            subscription=subscription_to_proto(subscription), plan=plan_to_proto(plan)
        )

    async def GetUsage(
        self, request: billing_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetUsageResponse:
        caller = current_identity.get().require_user()
        usage = await self._ledger.usage(caller.user_id)
        return billing_pb2.GetUsageResponse(
            balance=balance_to_proto(usage.account),
            models=[
                billing_pb2.ModelUsage(
                    model=model.usage.model,
                    input_tokens=model.usage.input_tokens,
                    output_tokens=model.usage.output_tokens,
                    requests=model.usage.requests,
                    cost=money_to_proto(model.cost),
                )
                for model in usage.models
            ],
            overage_cost=money_to_proto(usage.overage_cost),
        )


class BillingInternalServicer(billing_pb2_grpc.BillingInternalServiceServicer):
    """Credit reservations for the chat service (its contract admits only chat's workload)."""

    def __init__(self, ledger: CreditLedger) -> None:
        self._ledger = ledger

    async def ReserveCredits(
        self, request: billing_pb2.ReserveCreditsRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ReserveCreditsResponse:
        estimate = Estimate(
            model=request.estimate.model,
            input_tokens=request.estimate.input_tokens,
            max_output_tokens=request.estimate.max_output_tokens,
        )
        reservation, account = await self._ledger.reserve(request.request_id, request.user_id, estimate)
        return billing_pb2.ReserveCreditsResponse(
            reservation=reservation_to_proto(reservation), balance=balance_to_proto(account)
        )

    async def SettleReservation(
        self, request: billing_pb2.SettleReservationRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.SettleReservationResponse:
        usage = request.actual_usage
        settlement = await self._ledger.settle(
            request.reservation_id,
            request.request_id,
            Usage(
                model=usage.model,
                provider=usage.provider,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
            ),
        )
        return billing_pb2.SettleReservationResponse(
            reservation=reservation_to_proto(settlement.reservation),
            balance=balance_to_proto(settlement.account),
            cost=money_to_proto(settlement.cost),
        )

    async def ReleaseReservation(
        self, request: billing_pb2.ReleaseReservationRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ReleaseReservationResponse:
        reservation, account = await self._ledger.release(request.reservation_id, request.request_id)
        return billing_pb2.ReleaseReservationResponse(
            reservation=reservation_to_proto(reservation), balance=balance_to_proto(account)
        )

    async def GetBalance(
        self, request: billing_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetBalanceResponse:
        return billing_pb2.GetBalanceResponse(
            balance=balance_to_proto(await self._ledger.balance(request.user_id))
        )


_RESERVATION_STATUSES = {
    "held": billing_pb2.RESERVATION_STATUS_HELD,
    "settled": billing_pb2.RESERVATION_STATUS_SETTLED,
    "released": billing_pb2.RESERVATION_STATUS_RELEASED,
    "expired": billing_pb2.RESERVATION_STATUS_EXPIRED,
}


def reservation_to_proto(reservation: Reservation) -> billing_pb2.CreditReservation:
    message = billing_pb2.CreditReservation(
        id=reservation.id,
        request_id=reservation.request_id,
        user_id=reservation.account_id,
        status=_RESERVATION_STATUSES[reservation.status],
        reserved_tokens=reservation.reserved_tokens,
        settled_tokens=reservation.settled_tokens,
        model=reservation.model,
        create_time=timestamp_to_proto(reservation.create_time),
        expire_time=timestamp_to_proto(reservation.expire_time),
    )
    if reservation.close_time is not None:
        message.close_time.CopyFrom(timestamp_to_proto(reservation.close_time))
    return message


def balance_to_proto(account: CreditAccount) -> billing_pb2.Balance:
    return billing_pb2.Balance(
        user_id=account.account_id,
        plan_id=account.plan_id,
        period_start_time=timestamp_to_proto(account.period_start),
        period_end_time=timestamp_to_proto(account.period_end),
        included_tokens=account.included_tokens,
        purchased_tokens=account.purchased_available,
        used_tokens=account.used_tokens,
        reserved_tokens=account.reserved_tokens,
        remaining_tokens=account.remaining_tokens,
        overage_tokens=account.overage_tokens,
        hard_stop=account.hard_stop,
    )


def subscription_to_proto(subscription: Subscription) -> billing_pb2.Subscription:
    message = billing_pb2.Subscription(
        id=subscription.id,
        user_id=subscription.user_id,
        plan_id=subscription.plan_id,
        status=subscription_status_to_proto(subscription.status),
        current_period_start_time=timestamp_to_proto(subscription.current_period_start),
        current_period_end_time=timestamp_to_proto(subscription.current_period_end),
        cancel_at_period_end=subscription.cancel_at_period_end,
        pending_plan_id=subscription.pending_plan_id or "",
        create_time=timestamp_to_proto(subscription.create_time),
        update_time=timestamp_to_proto(subscription.update_time),
    )
    if subscription.end_time is not None:
        message.end_time.CopyFrom(timestamp_to_proto(subscription.end_time))
    return message


def plan_to_proto(plan: Plan) -> billing_pb2.Plan:
    message = billing_pb2.Plan(
        id=plan.id,
        display_name=plan.display_name,
        description=plan.description,
        tier=plan_tier_to_proto(plan.tier),
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
