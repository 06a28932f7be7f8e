"""The service framework end to end over real gRPC: the production factory, on port 0, with the real
interceptors, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy.engine import make_url

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from services.common.db import Database
from services.common.health import DependencyProbe
from services.common.migrate import upgrade_async
from tests.support.pki import ServicePki
from tests.support.polling import eventually
from tests.support.servers import (
    RunningServer,
    crashing_billing,
    hosted,
    rich_status,
    serving,
)
from tests.support.tcp_proxy import TcpProxy


def billing(running: RunningServer) -> billing_pb2_grpc.BillingServiceAsyncStub:
    return billing_pb2_grpc.BillingServiceStub(running.channel)  # type: ignore[return-value]


@pytest.fixture
async def running(database: Database, service_pki: ServicePki) -> AsyncIterator[RunningServer]:
    async with serving(hosted(("billing", "chat"), database), pki=service_pki) as running:
        yield running


async def test_list_plans_reads_the_seeded_catalog(running: RunningServer) -> None:
    reply = await billing(running).ListPlans(billing_pb2.ListPlansRequest())
    assert [plan.id for plan in reply.plans] == ["free", "pro", "team"]
    pro = reply.plans[1]
    assert (pro.monthly_price.currency_code, pro.monthly_price.amount_minor) == ("USD", 2000)
    assert pro.included_tokens == 2_000_000
    assert not pro.hard_stop
    assert reply.plans[0].hard_stop
    assert not reply.plans[0].HasField("overage_price_per_1k_tokens")
    assert pro.create_time.seconds > 0
    assert reply.next_page_token == ""


async def test_pagination_walks_every_plan_once(running: RunningServer) -> None:
    first = await billing(running).ListPlans(billing_pb2.ListPlansRequest(page_size=2))
    assert [plan.id for plan in first.plans] == ["free", "pro"]
    assert first.next_page_token
    second = await billing(running).ListPlans(
        billing_pb2.ListPlansRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [plan.id for plan in second.plans] == ["team"]
    assert second.next_page_token == ""


async def test_negative_page_size_is_a_typed_invalid_argument(running: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing(running).ListPlans(
            billing_pb2.ListPlansRequest(page_size=-1), metadata=(("x-request-id", "req-123"),)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rich_status(caught.value)
    info = status["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "parley.dev")
    bad_request = status["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [(v.field, v.reason) for v in bad_request.field_violations] == [("page_size", "INVALID_PAGE_SIZE")]
    request_info = status["RequestInfo"]
    assert isinstance(request_info, error_details_pb2.RequestInfo)
    assert request_info.request_id == "req-123"


async def test_forged_page_token_is_refused(running: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await billing(running).ListPlans(billing_pb2.ListPlansRequest(page_token="forged"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_PAGE_TOKEN"


async def test_contract_only_rpcs_answer_unimplemented_honestly(running: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat_pb2_grpc.ChatServiceStub(running.channel).ListConversations(
            chat_pb2.ListConversationsRequest()
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "NOT_IMPLEMENTED"
    assert info.metadata["method"] == "parley.chat.v1.ChatService/ListConversations"


async def test_server_streaming_rpcs_go_through_the_same_chain(running: RunningServer) -> None:
    chat: chat_pb2_grpc.ChatServiceAsyncStub = chat_pb2_grpc.ChatServiceStub(running.channel)  # type: ignore[assignment]
    stream = chat.StreamMessage(chat_pb2.StreamMessageRequest(conversation_id="c1", content="hello"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "NOT_IMPLEMENTED"


async def test_identity_headers_are_believed_from_the_gateway_only(running: RunningServer) -> None:
    operator = billing_pb2_grpc.BillingServiceStub(running.channel_as("operator"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await operator.ListPlans(billing_pb2.ListPlansRequest(), metadata=(("x-parley-user-id", "admin"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("UNTRUSTED_IDENTITY", {"cause": "identity_headers"})

    reply = await billing(running).ListPlans(
        billing_pb2.ListPlansRequest(), metadata=(("x-parley-user-id", "u1"),)
    )
    assert len(reply.plans) == 3


async def test_metrics_count_each_rpc_by_code(running: RunningServer) -> None:
    await billing(running).ListPlans(billing_pb2.ListPlansRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await billing(running).ListPlans(billing_pb2.ListPlansRequest(page_size=-5))
    labels = {"grpc_service": "parley.billing.v1.BillingService", "grpc_method": "ListPlans"}
    sample = running.registry.get_sample_value
    # The client may see the reply before the server's interceptor has finished counting it.
    await eventually(
        lambda: sample("parley_rpc_server_handling_seconds_count", labels) == 2,
        what="both calls timed",
        timeout_s=5.0,
        interval_s=0.01,
    )
    assert sample("parley_rpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    assert sample("parley_rpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}) == 1
    assert sample("parley_rpc_server_handling_seconds_count", labels) == 2
    assert sample("parley_rpc_server_in_flight", labels) == 0


async def test_health_and_reflection_are_registered(running: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "parley.billing.v1.BillingService", "parley.chat.v1.ChatService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for response in responses:
        names = {service.name for service in response.list_services_response.service}
    assert {
        "parley.billing.v1.BillingService",
        "parley.billing.v1.BillingAdminService",
        "parley.billing.v1.BillingInternalService",
        "parley.chat.v1.ChatService",
        "grpc.health.v1.Health",
    } <= names


async def test_unexpected_crash_is_internal_without_leaking_details(service_pki: ServicePki) -> None:
    async with serving([crashing_billing()], pki=service_pki) as running:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await billing(running).GetPlan(billing_pb2.GetPlanRequest(plan_id="pro"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in (caught.value.details() or "")
    assert "Traceback" not in (caught.value.details() or "")
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "INTERNAL"


@pytest.mark.postgres
async def test_health_follows_database_reachability(postgres_url: str, service_pki: ServicePki) -> None:
    """NOT_SERVING while PostgreSQL cannot be reached, SERVING again once it returns."""
    await upgrade_async(postgres_url)
    target = make_url(postgres_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    database = Database(
        target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        connect_timeout_s=1.0,
    )
    probes = [DependencyProbe("database", database.ping, timeout_s=1.0)]
    try:
        async with serving(
            hosted(("billing",), database), pki=service_pki, probes=probes, probe_interval_s=0.2
        ) as running:
            health = health_pb2_grpc.HealthStub(running.channel)
            service = "parley.billing.v1.BillingService"

            async def status() -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                return int(reply.status)

            assert await status() == health_pb2.HealthCheckResponse.SERVING
            await proxy.cut()
            not_serving = status_is(status, health_pb2.HealthCheckResponse.NOT_SERVING)
            await eventually(not_serving, what="NOT_SERVING without the database", interval_s=0.1)
            await proxy.restore()
            serving_again = status_is(status, health_pb2.HealthCheckResponse.SERVING)
            await eventually(serving_again, what="SERVING with the database back", interval_s=0.1)
    finally:
        await database.dispose()
        await proxy.close()


def status_is(read: Callable[[], Awaitable[int]], expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await read() == expected

    return check
