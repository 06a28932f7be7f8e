"""Cacheable reads over real gRPC: billing's plan catalog and auth's JWKS send an ETag and
Cache-Control as initial metadata (which the transcoder turns into HTTP headers); the ETag is
stable while the content is, and changes with it. Chat's ListModels is covered in test_chat_models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from runtime.process import build_services, registrations_of
from services.auth.signing_keys import generate_kek
from services.auth.wiring import signing_key_store
from services.billing.ports import BillingUnitOfWork
from services.billing.repository import billing_units_of_work
from services.common.cache import InMemoryReadCache, read_cache_invalidation
from services.common.context import ServiceContext
from services.common.db import Database
from services.common.http_cache import etag_matches, strong_etag
from services.common.revocation import InMemoryRevocationList
from services.common.settings import Settings, load_settings
from services.common.sql_unit_of_work import SqlUnitsOfWork
from tests.support.pki import ServicePki
from tests.support.servers import RunningServer, rich_status, serving


def billing(running: RunningServer) -> billing_pb2_grpc.BillingServiceAsyncStub:
    return billing_pb2_grpc.BillingServiceStub(running.channel)  # type: ignore[return-value]


async def headers_and_reply(call: Any) -> tuple[dict[str, str], Any]:
    """The initial metadata of a unary call as a dict, and its reply."""
    metadata: Sequence[tuple[str, str | bytes]] = await call.initial_metadata()
    reply = await call
    return {key: value for key, value in metadata if isinstance(value, str)}, reply


async def list_plans(running: RunningServer) -> tuple[dict[str, str], billing_pb2.ListPlansResponse]:
    return await headers_and_reply(billing(running).ListPlans(billing_pb2.ListPlansRequest()))


async def get_plan(
    running: RunningServer, plan_id: str
) -> tuple[dict[str, str], billing_pb2.GetPlanResponse]:
    return await headers_and_reply(billing(running).GetPlan(billing_pb2.GetPlanRequest(plan_id=plan_id)))


@pytest.fixture
def read_cache() -> InMemoryReadCache:
    return InMemoryReadCache()


@pytest.fixture
def plans(database: Database, read_cache: InMemoryReadCache) -> SqlUnitsOfWork[BillingUnitOfWork]:
    """Plan writes as production makes them: invalidating the read cache the server reads through."""
    units = billing_units_of_work(database)
    units.after_commit(read_cache_invalidation(read_cache))
    return units


@pytest.fixture
async def running(
    database: Database, read_cache: InMemoryReadCache, service_pki: ServicePki
) -> AsyncIterator[RunningServer]:
    context = ServiceContext(
        load_settings(), database, InMemoryRevocationList(), embedded=False, read_cache=read_cache
    )
    async with serving(registrations_of(build_services(("billing",), context)), pki=service_pki) as running:
        yield running


async def change_plan(plans: SqlUnitsOfWork[BillingUnitOfWork], plan_id: str, **changes: Any) -> None:
    async with plans.write() as uow:
        plan = await uow.plans.get(plan_id)
        assert plan is not None
        await uow.plans.save(replace(plan, **changes))


async def test_list_plans_and_get_plan_send_etag_and_cache_control(running: RunningServer) -> None:
    listed_headers, listed = await list_plans(running)
    got_headers, got = await get_plan(running, "pro")

    assert got.plan.id == "pro"
    assert got.plan == listed.plans[1]
    for headers, reply in ((listed_headers, listed), (got_headers, got)):
        assert headers["cache-control"] == "public, max-age=60"
        assert headers["etag"] == strong_etag(reply)
    # A list and one of its items are different resources with different ETags.
    assert listed_headers["etag"] != got_headers["etag"]


async def test_the_etag_is_stable_until_the_catalog_changes(
    running: RunningServer, plans: SqlUnitsOfWork[BillingUnitOfWork]
) -> None:
    list_before, _ = await list_plans(running)
    team_before, _ = await get_plan(running, "team")
    pro_before, _ = await get_plan(running, "pro")
    list_again, _ = await list_plans(running)
    assert list_again["etag"] == list_before["etag"]

    await change_plan(plans, "team", display_name="Team (2027 pricing)")

    list_after, listed = await list_plans(running)
    team_after, team = await get_plan(running, "team")
    pro_after, _ = await get_plan(running, "pro")
    assert team.plan.display_name == "Team (2027 pricing)"
    assert listed.plans[2] == team.plan
    assert list_after["etag"] != list_before["etag"]
    assert team_after["etag"] != team_before["etag"]
    # An untouched plan keeps its ETag, so a client's conditional request for it still matches.
    assert pro_after["etag"] == pro_before["etag"]
    assert etag_matches(pro_before["etag"], pro_after["etag"])
    assert not etag_matches(team_before["etag"], team_after["etag"])


async def test_get_plan_returns_retired_plans_and_refuses_unknown_ones(
    running: RunningServer, plans: SqlUnitsOfWork[BillingUnitOfWork]
) -> None:
    await change_plan(plans, "free", retire_time=datetime.now(UTC))
    reply = await billing(running).GetPlan(billing_pb2.GetPlanRequest(plan_id="free"))
    assert reply.plan.retired
    assert reply.plan.HasField("retire_time")

    call = billing(running).GetPlan(billing_pb2.GetPlanRequest(plan_id="platinum"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = rich_status(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "PLAN_NOT_FOUND"
    # An error is never cacheable: no ETag or Cache-Control was sent for it.
    assert "etag" not in dict(caught.value.initial_metadata() or ())


# ---- auth: GetJwks returns google.api.HttpBody ---------------------------------------------------


def auth_settings() -> Settings:
    return load_settings(auth_key_encryption_key=generate_kek())


async def jwks_call(settings: Settings, database: Database, pki: ServicePki) -> tuple[dict[str, str], Any]:
    """Start a fresh auth server (no JWKS in memory yet) and call GetJwks on it."""
    context = ServiceContext(settings, database, InMemoryRevocationList(), embedded=False)
    bundles = build_services(("auth",), context)
    for bundle in bundles:
        for prepare in bundle.on_start:
            await prepare()
    async with serving(registrations_of(bundles), pki=pki) as running:
        stub: auth_pb2_grpc.AuthServiceAsyncStub = auth_pb2_grpc.AuthServiceStub(running.channel)  # type: ignore[assignment]
        first = await headers_and_reply(stub.GetJwks(auth_pb2.GetJwksRequest()))
        second = await headers_and_reply(stub.GetJwks(auth_pb2.GetJwksRequest()))
    assert first[0]["etag"] == second[0]["etag"], "the same key set must keep its ETag"
    return first


async def test_get_jwks_sends_etag_and_cache_control_with_its_http_body(
    database: Database, service_pki: ServicePki
) -> None:
    settings = auth_settings()
    headers, body = await jwks_call(settings, database, service_pki)
    assert body.content_type == "application/json"
    assert b'"keys"' in body.data
    assert headers["cache-control"] == "public, max-age=60"
    assert headers["etag"] == strong_etag(body)

    # A rotation changes the key set, and so the ETag.
    await signing_key_store(settings, database, embedded=False).rotate()
    rotated_headers, rotated = await jwks_call(settings, database, service_pki)
    assert rotated.data != body.data
    assert rotated_headers["etag"] != headers["etag"]
    assert not etag_matches(headers["etag"], rotated_headers["etag"])
