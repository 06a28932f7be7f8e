"""Chat v1 and v2 side by side over real gRPC: ListModels from the model catalog in both shapes,
cache headers on both, and every other RPC still honestly UNIMPLEMENTED."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from parley.chat.v1 import chat_pb2, chat_pb2_grpc
from parley.chat.v2 import chat_pb2 as chat_v2_pb2
from parley.chat.v2 import chat_pb2_grpc as chat_v2_pb2_grpc
from parley.common.v1 import common_pb2
from services.chat.wiring import build_bundle
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.http_cache import etag_matches, strong_etag
from services.common.model_catalog import ModelCatalog, UnitPrice, load_model_catalog
from services.common.revocation import InMemoryRevocationList
from services.common.settings import load_settings
from tests.support.databases import fresh_sqlite_url
from tests.support.pki import ServicePki
from tests.support.servers import RunningServer, hosted, rich_status, serving

V1_SERVICE = "parley.chat.v1.ChatService"
V2_SERVICE = "parley.chat.v2.ChatService"
SHIPPED_IDS = ["parley-local", "gpt-4o-mini", "gpt-4o", "claude-sonnet", "claude-opus"]
ALL_KINDS = [
    chat_v2_pb2.CONTENT_PART_KIND_TEXT,
    chat_v2_pb2.CONTENT_PART_KIND_IMAGE_URL,
    chat_v2_pb2.CONTENT_PART_KIND_TOOL_CALL,
    chat_v2_pb2.CONTENT_PART_KIND_TOOL_RESULT,
]


def v1(running: RunningServer) -> chat_pb2_grpc.ChatServiceAsyncStub:
    return chat_pb2_grpc.ChatServiceStub(running.channel)  # type: ignore[return-value]


def v2(running: RunningServer) -> chat_v2_pb2_grpc.ChatServiceAsyncStub:
    return chat_v2_pb2_grpc.ChatServiceStub(running.channel)  # type: ignore[return-value]


@pytest.fixture
async def unused_database(tmp_path: Path) -> AsyncIterator[Database]:
    """Chat reads no tables yet; the service context still carries a database, never migrated."""
    database = Database(fresh_sqlite_url(tmp_path))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
async def running(unused_database: Database, service_pki: ServicePki) -> AsyncIterator[RunningServer]:
    async with serving(hosted(("chat",), unused_database), pki=service_pki) as running:
        yield running


def money(currency: str, minor: int, nanos: int = 0) -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, amount_minor=minor, minor_nanos=nanos)


async def test_v1_lists_the_catalog_with_text_only_models(running: RunningServer) -> None:
    reply = await v1(running).ListModels(chat_pb2.ListModelsRequest())
    assert [model.id for model in reply.models] == SHIPPED_IDS
    assert reply.next_page_token == ""
    mini = reply.models[1]
    assert (mini.display_name, mini.provider) == ("GPT-4o mini", "openai")
    assert (mini.context_window, mini.max_output_tokens) == (128_000, 16_384)
    assert mini.input_price_per_1k_tokens == money("USD", 0, 15_000_000)
    assert mini.output_price_per_1k_tokens == money("USD", 0, 60_000_000)
    assert list(mini.allowed_plans) == ["free", "pro", "team"]
    assert list(reply.models[4].allowed_plans) == ["team"]
    # v1's Model has no notion of content kinds: its messages are plain text.
    assert "accepted_part_kinds" not in chat_pb2.Model.DESCRIPTOR.fields_by_name


async def test_v2_lists_the_same_models_with_their_part_kinds(running: RunningServer) -> None:
    first = await v1(running).ListModels(chat_pb2.ListModelsRequest())
    second = await v2(running).ListModels(chat_v2_pb2.ListModelsRequest())
    assert [model.id for model in second.models] == SHIPPED_IDS
    by_id = {model.id: model for model in second.models}
    assert list(by_id["parley-local"].accepted_part_kinds) == [chat_v2_pb2.CONTENT_PART_KIND_TEXT]
    for model_id in ("gpt-4o-mini", "gpt-4o", "claude-sonnet", "claude-opus"):
        assert list(by_id[model_id].accepted_part_kinds) == ALL_KINDS
    # Everything v1 says about a model, v2 says identically.
    for old, new in zip(first.models, second.models, strict=True):
        assert (old.id, old.display_name, old.provider) == (new.id, new.display_name, new.provider)
        assert (old.context_window, old.max_output_tokens) == (new.context_window, new.max_output_tokens)
        assert old.input_price_per_1k_tokens == new.input_price_per_1k_tokens
        assert old.output_price_per_1k_tokens == new.output_price_per_1k_tokens
        assert list(old.allowed_plans) == list(new.allowed_plans)


def test_v2_messages_are_content_parts_where_v1_messages_are_text() -> None:
    content = chat_pb2.Message.DESCRIPTOR.fields_by_name["content"]
    assert content.type == content.TYPE_STRING
    assert "parts" not in chat_pb2.Message.DESCRIPTOR.fields_by_name
    parts = chat_v2_pb2.Message.DESCRIPTOR.fields_by_name["parts"]
    assert parts.message_type is not None
    assert parts.message_type.full_name == "parley.chat.v2.ContentPart"
    assert parts.is_repeated
    assert "content" not in chat_v2_pb2.Message.DESCRIPTOR.fields_by_name
    for request in (chat_v2_pb2.SendMessageRequest, chat_v2_pb2.StreamMessageRequest):
        assert "parts" in request.DESCRIPTOR.fields_by_name
        assert "content" not in request.DESCRIPTOR.fields_by_name


async def test_v2_pages_walk_the_catalog(running: RunningServer) -> None:
    seen: list[str] = []
    token = ""
    for _ in range(len(SHIPPED_IDS) + 1):
        reply = await v2(running).ListModels(chat_v2_pb2.ListModelsRequest(page_size=2, page_token=token))
        assert len(reply.models) <= 2
        seen.extend(model.id for model in reply.models)
        token = reply.next_page_token
        if not token:
            break
    assert seen == SHIPPED_IDS


async def test_a_negative_page_size_is_invalid_in_both_versions(running: RunningServer) -> None:
    calls = [
        v1(running).ListModels(chat_pb2.ListModelsRequest(page_size=-1)),
        v2(running).ListModels(chat_v2_pb2.ListModelsRequest(page_size=-1)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad_request = rich_status(caught.value)["BadRequest"]
        assert isinstance(bad_request, error_details_pb2.BadRequest)
        assert [v.field for v in bad_request.field_violations] == ["page_size"]


async def test_list_models_sends_etag_and_cache_control(running: RunningServer) -> None:
    for stub, request in (
        (v1(running), chat_pb2.ListModelsRequest()),
        (v2(running), chat_v2_pb2.ListModelsRequest()),
    ):
        call = stub.ListModels(request)
        headers = dict(await call.initial_metadata())
        reply = await call
        assert headers["cache-control"] == "public, max-age=60"
        assert headers["etag"] == strong_etag(reply)
        assert etag_matches(f'W/"stale", {headers["etag"]}', str(headers["etag"]))


async def _models_etag(
    stub: chat_v2_pb2_grpc.ChatServiceAsyncStub, request: chat_v2_pb2.ListModelsRequest
) -> str:
    call = stub.ListModels(request)
    etag = dict(await call.initial_metadata())["etag"]
    await call
    assert isinstance(etag, str)
    return etag


async def test_the_etag_is_stable_per_content_and_differs_between_versions_and_pages(
    running: RunningServer,
) -> None:
    first = await _models_etag(v2(running), chat_v2_pb2.ListModelsRequest())
    assert await _models_etag(v2(running), chat_v2_pb2.ListModelsRequest()) == first
    call = v1(running).ListModels(chat_pb2.ListModelsRequest())
    v1_etag = dict(await call.initial_metadata())["etag"]
    await call
    # The same catalog in another shape is another representation.
    assert v1_etag != first
    page_one = await _models_etag(v2(running), chat_v2_pb2.ListModelsRequest(page_size=2))
    assert page_one not in {first, v1_etag}


async def test_a_changed_catalog_changes_the_etag(unused_database: Database, service_pki: ServicePki) -> None:
    shipped = load_model_catalog()
    cheaper = [
        replace(model, input_price_per_1k_tokens=UnitPrice("USD", 0, 1)) if model.id == "gpt-4o" else model
        for model in shipped.models
    ]
    context = ServiceContext(load_settings(), unused_database, InMemoryRevocationList(), embedded=False)
    async with serving(build_bundle(context, catalog=shipped).registrations, pki=service_pki) as before:
        etag_before = await _models_etag(v2(before), chat_v2_pb2.ListModelsRequest())
    async with serving(
        build_bundle(context, catalog=ModelCatalog(cheaper)).registrations, pki=service_pki
    ) as after:
        etag_after = await _models_etag(v2(after), chat_v2_pb2.ListModelsRequest())
        reply = await v2(after).ListModels(chat_v2_pb2.ListModelsRequest())
    assert etag_after != etag_before
    assert reply.models[2].input_price_per_1k_tokens == money("USD", 0, 1)


async def test_other_rpcs_stay_unimplemented_in_both_versions(running: RunningServer) -> None:
    calls = {
        f"{V1_SERVICE}/SendMessage": v1(running).SendMessage(
            chat_pb2.SendMessageRequest(conversation_id="c1", content="hello")
        ),
        f"{V2_SERVICE}/SendMessage": v2(running).SendMessage(
            chat_v2_pb2.SendMessageRequest(
                conversation_id="c1",
                parts=[
                    chat_v2_pb2.ContentPart(text=chat_v2_pb2.TextPart(text="what is in this picture?")),
                    chat_v2_pb2.ContentPart(
                        image_url=chat_v2_pb2.ImageUrlPart(url="https://example.com/a.png")
                    ),
                ],
            )
        ),
        f"{V2_SERVICE}/ListConversations": v2(running).ListConversations(
            chat_v2_pb2.ListConversationsRequest()
        ),
    }
    for method, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = rich_status(caught.value)["ErrorInfo"]
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert (info.reason, info.metadata["method"]) == ("NOT_IMPLEMENTED", method)

    hello = [chat_v2_pb2.ContentPart(text=chat_v2_pb2.TextPart(text="hello"))]
    stream = v2(running).StreamMessage(chat_v2_pb2.StreamMessageRequest(conversation_id="c1", parts=hello))
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stream:
            pass
    assert streamed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_both_versions_report_serving(running: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in (V1_SERVICE, V2_SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_model_catalog_and_the_plan_catalog_agree(
    database: Database, service_pki: ServicePki
) -> None:
    # Two sources name the same relation (billing's plans.allowed_models, the catalog's allowed_plans);
    # this fails the build when one is edited without the other.
    async with serving(hosted(("billing", "chat"), database), pki=service_pki) as running:
        billing = billing_pb2_grpc.BillingServiceStub(running.channel)
        plans = (await billing.ListPlans(billing_pb2.ListPlansRequest(show_retired=True))).plans
        models = (await v2(running).ListModels(chat_v2_pb2.ListModelsRequest())).models
    assert plans
    for plan in plans:
        offered = {model.id for model in models if plan.id in model.allowed_plans}
        assert set(plan.allowed_models) == offered, plan.id
    known_plans = {plan.id for plan in plans}
    assert {plan for model in models for plan in model.allowed_plans} <= known_plans
