"""BillingInternalService over real gRPC and mTLS, on SQLite and PostgreSQL: what chat calls, and who may not.

The production server chain (`create_server`: identity, caller check, validation, error mapping)
hosts billing's wiring; clients present the workload certificates of tests/support/pki.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.common.db import Database
from services.common.migrate import upgrade_async
from tests.support.pki import ServicePki
from tests.support.servers import RunningServer, hosted, rich_status, serving

RESERVE = "parley.billing.v1.BillingInternalService/ReserveCredits"


@dataclass
class Billing:
    running: RunningServer

    def internal(self, *, as_: str = "chat") -> billing_pb2_grpc.BillingInternalServiceStub:
        return billing_pb2_grpc.BillingInternalServiceStub(self.running.channel_as(as_))


@pytest.fixture
async def billing(database_url: str, service_pki: ServicePki) -> AsyncIterator[Billing]:
    await upgrade_async(database_url)
    database = Database(database_url)
    try:
        async with serving(hosted(["billing"], database), pki=service_pki) as running:
            yield Billing(running)
    finally:
        await database.dispose()


def reserve_request(user_id: str, request_id: str, tokens: int) -> billing_pb2.ReserveCreditsRequest:
    return billing_pb2.ReserveCreditsRequest(
        request_id=request_id,
        user_id=user_id,
        estimate=billing_pb2.CreditEstimate(
            model="gpt-4o-mini", input_tokens=tokens // 2, max_output_tokens=tokens - tokens // 2
        ),
    )


async def test_chat_reserves_settles_and_reads_the_balance(billing: Billing) -> None:
    internal = billing.internal()
    user_id = str(uuid.uuid4())
    reserved = await internal.ReserveCredits(reserve_request(user_id, "req-1", 3_000))
    assert reserved.reservation.status == billing_pb2.RESERVATION_STATUS_HELD
    assert (reserved.balance.plan_id, reserved.balance.reserved_tokens) == ("free", 3_000)

    settled = await internal.SettleReservation(
        billing_pb2.SettleReservationRequest(
            reservation_id=reserved.reservation.id,
            request_id="req-1",
            actual_usage=billing_pb2.ActualUsage(
                input_tokens=1_000, output_tokens=1_500, model="gpt-4o-mini", provider="openai"
            ),
        )
    )
    assert settled.reservation.status == billing_pb2.RESERVATION_STATUS_SETTLED
    assert (settled.balance.used_tokens, settled.balance.reserved_tokens) == (2_500, 0)
    assert settled.cost.currency_code == "USD"

    again = await internal.ReserveCredits(reserve_request(user_id, "req-2", 1_000))
    released = await internal.ReleaseReservation(
        billing_pb2.ReleaseReservationRequest(reservation_id=again.reservation.id, request_id="req-2")
    )
    assert released.reservation.status == billing_pb2.RESERVATION_STATUS_RELEASED
    balance = await internal.GetBalance(billing_pb2.GetBalanceRequest(user_id=user_id))
    assert (balance.balance.used_tokens, balance.balance.remaining_tokens) == (2_500, 100_000 - 2_500)


async def test_an_exhausted_budget_is_resource_exhausted_with_a_quota_failure(billing: Billing) -> None:
    internal = billing.internal()
    user_id = str(uuid.uuid4())
    await internal.ReserveCredits(reserve_request(user_id, "big", 99_000))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await internal.ReserveCredits(reserve_request(user_id, "more", 2_000))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(caught.value)
    info = status["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "INSUFFICIENT_CREDITS"
    quota = status["QuotaFailure"]
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert [violation.subject for violation in quota.violations] == [f"user:{user_id}"]


async def test_a_hundred_parallel_reservations_over_grpc_admit_exactly_one(billing: Billing) -> None:
    internal = billing.internal()
    user_id = str(uuid.uuid4())
    await internal.GetBalance(billing_pb2.GetBalanceRequest(user_id=user_id))

    async def attempt(index: int) -> grpc.StatusCode:
        try:
            await internal.ReserveCredits(reserve_request(user_id, f"req-{index}", 50_001))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(attempt(index) for index in range(100)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 99
    balance = await internal.GetBalance(billing_pb2.GetBalanceRequest(user_id=user_id))
    assert balance.balance.reserved_tokens == 50_001


async def test_missing_fields_and_unknown_ids_are_typed_errors(billing: Billing) -> None:
    internal = billing.internal()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await internal.ReserveCredits(billing_pb2.ReserveCreditsRequest(user_id=str(uuid.uuid4())))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await internal.ReleaseReservation(
            billing_pb2.ReleaseReservationRequest(reservation_id=str(uuid.uuid4()), request_id="nope")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "RESERVATION_NOT_FOUND"


@pytest.mark.parametrize("caller", ["gateway", "operator", "auth"])
async def test_only_chat_may_call_the_internal_service(billing: Billing, caller: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing.internal(as_=caller).ReserveCredits(reserve_request(str(uuid.uuid4()), "req", 10))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "CALLER_NOT_ALLOWED"
    assert info.metadata["method"] == RESERVE
