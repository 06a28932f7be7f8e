"""The rate-limit service as Envoy sees it: a real grpc.aio server, the generated Envoy stub, and
counters in the real Redis."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.rls import RATE_LIMITED_GRPC_MESSAGE, add_rate_limit_service
from services.common.metrics import new_registry
from services.common.ratelimit import (
    RateLimitConfig,
    RateLimiter,
    RedisRateLimiter,
    load_rate_limit_config,
    parse_rate_limit_config,
)
from tests.support.redis_keys import delete_namespace
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
# What the gateway's local-reply template puts around the service's body fragment.
REPLY_PREFIX = b'{"code":8,'
REPLY_SUFFIX = b',{"@type":"type.googleapis.com/google.rpc.RequestInfo","request_id":"req-1"}]}'

CONFIG = parse_rate_limit_config(
    {
        "domain": "parley",
        "limits": [
            {
                "name": "per_user",
                "descriptor": {"limit": "user_plan"},
                "key": ["user"],
                "rate": {"requests": 2, "per_s": 3600},
                "burst": 2,
            },
            {
                "name": "per_address",
                "descriptor": {"limit": "anonymous"},
                "key": ["remote_address"],
                "rate": {"requests": 100, "per_s": 60},
                "burst": 50,
            },
            {
                "name": "watched",
                "descriptor": {"limit": "watch"},
                "key": ["user"],
                "rate": {"requests": 1, "per_s": 3600},
                "burst": 1,
                "shadow": True,
            },
        ],
        "routes": {
            "default": {
                "on_failure": "allow",
                "descriptors": [
                    {"limit": "user_plan", "entries": ["user"]},
                    {"limit": "anonymous", "entries": ["remote_address"]},
                    {"limit": "watch", "entries": ["user"]},
                ],
            }
        },
    },
    source="test",
)


@dataclass
class RunningRls:
    stub: rls_pb2_grpc.RateLimitServiceStub
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def serving_rls(config: RateLimitConfig, limiter: RateLimiter) -> AsyncIterator[RunningRls]:
    server = grpc.aio.server()
    registry = new_registry()
    add_rate_limit_service(server, config, limiter, registry=registry)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningRls(rls_pb2_grpc.RateLimitServiceStub(channel), registry)
    finally:
        await channel.close()
        await server.stop(grace=None)


@pytest.fixture
async def rls(redis_url: str) -> AsyncIterator[RunningRls]:
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(redis_url, key_prefix=prefix)
    try:
        async with serving_rls(CONFIG, limiter) as running:
            yield running
    finally:
        await limiter.aclose()
        client = Redis.from_url(redis_url)
        await delete_namespace(client, prefix)
        await client.aclose()


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    built = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value) for key, value in entries]
    )
    if hits is not None:
        built.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return built


def user(name: str, *, hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    return descriptor(("limit", "user_plan"), ("user", name), hits=hits)


def address(ip: str) -> ratelimit_pb2.RateLimitDescriptor:
    return descriptor(("limit", "anonymous"), ("remote_address", ip))


async def ask(
    rls: RunningRls, descriptors: Sequence[ratelimit_pb2.RateLimitDescriptor], *, hits_addend: int = 0
) -> rls_pb2.RateLimitResponse:
    request = rls_pb2.RateLimitRequest(domain="parley", descriptors=descriptors, hits_addend=hits_addend)
    response: rls_pb2.RateLimitResponse = await rls.stub.ShouldRateLimit(request, timeout=5)
    return response


def headers(response: rls_pb2.RateLimitResponse) -> dict[str, str]:
    found = {header.key: header.value for header in response.response_headers_to_add}
    assert len(found) == len(response.response_headers_to_add), "no header is sent twice"
    return found


SF_ITEM = re.compile(r'^"(?P<name>[^"\\]*)"(?P<params>(;[a-z][a-z0-9_]*=[0-9]+)*)$')


def structured_item(value: str) -> tuple[str, dict[str, int]]:
    """One structured-field list member: a string with integer parameters (RFC 9651)."""
    match = SF_ITEM.match(value)
    assert match, f"not a structured-field string item with integer parameters: {value!r}"
    params = dict(part.split("=") for part in match["params"].split(";")[1:])
    return match["name"], {key: int(number) for key, number in params.items()}


def status_from_header(value: str) -> status_pb2.Status:
    padded = value + "=" * (-len(value) % 4)
    return status_pb2.Status.FromString(base64.b64decode(padded, validate=True))


# --- allowed -------------------------------------------------------------------------------------


async def test_an_allowed_request_gets_its_limit_and_the_draft_headers(rls: RunningRls) -> None:
    response = await ask(rls, [user("alice")])

    assert response.overall_code == OK
    (status,) = response.statuses
    assert status.code == OK
    assert status.current_limit.name == "per_user"
    assert status.current_limit.requests_per_unit == 2
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.HOUR
    assert status.limit_remaining == 1
    assert status.duration_until_reset.ToTimedelta().total_seconds() == pytest.approx(1800, abs=1)

    sent = headers(response)
    assert set(sent) == {"ratelimit-policy", "ratelimit"}
    assert structured_item(sent["ratelimit-policy"]) == ("per_user", {"q": 2, "w": 3600})
    name, params = structured_item(sent["ratelimit"])
    assert name == "per_user"
    assert params["r"] == 1
    assert params["t"] in (1800, 1801)
    assert not response.raw_body
    assert rls.metric("parley_ratelimit_decisions_total", limit="per_user", result="allowed") == 1
    assert rls.metric("parley_ratelimit_decision_seconds_count") == 1


async def test_the_headers_show_the_most_restrictive_limit(rls: RunningRls) -> None:
    response = await ask(rls, [address("198.51.100.7"), user("bob")])
    assert response.overall_code == OK
    assert [status.limit_remaining for status in response.statuses] == [49, 1]
    assert structured_item(headers(response)["ratelimit"])[0] == "per_user"


async def test_unknown_descriptors_are_allowed_and_counted(rls: RunningRls) -> None:
    response = await ask(rls, [descriptor(("limit", "mystery"), ("user", "carol")), user("carol")])
    assert response.overall_code == OK
    unknown, known = response.statuses
    assert unknown.code == OK
    assert not unknown.HasField("current_limit")
    assert known.current_limit.name == "per_user"
    assert rls.metric("parley_ratelimit_unmatched_total") == 1

    alone = await ask(rls, [descriptor(("limit", "mystery"))])
    assert alone.overall_code == OK
    assert headers(alone) == {}, "no limit applied, so there is nothing to advertise"
    assert rls.metric("parley_ratelimit_unmatched_total") == 2


async def test_hits_addend_is_honoured_and_zero_means_one(rls: RunningRls) -> None:
    assert (await ask(rls, [user("dave")], hits_addend=0)).statuses[0].limit_remaining == 1
    refused = await ask(rls, [user("dave")], hits_addend=2)
    assert refused.overall_code == OVER_LIMIT
    assert refused.statuses[0].limit_remaining == 1, "a refused request spends nothing"

    per_descriptor = await ask(rls, [user("erin", hits=2)], hits_addend=1)
    assert per_descriptor.overall_code == OK
    assert per_descriptor.statuses[0].limit_remaining == 0, "the descriptor's own hits_addend wins"

    enormous = await ask(rls, [user("frida", hits=2**64 - 1)])
    assert enormous.overall_code == OVER_LIMIT
    assert enormous.statuses[0].limit_remaining == 2
    assert int(headers(enormous)["retry-after"]) >= 1


# --- refused -------------------------------------------------------------------------------------


async def test_an_over_limit_answer_carries_retry_after_and_the_rich_status(rls: RunningRls) -> None:
    for _ in range(2):
        assert (await ask(rls, [user("frank")])).overall_code == OK
    response = await ask(rls, [user("frank")])

    assert response.overall_code == OVER_LIMIT
    (status,) = response.statuses
    assert status.code == OVER_LIMIT
    assert status.limit_remaining == 0
    sent = headers(response)
    retry_after = int(sent["retry-after"])
    assert retry_after == 1800, "one request comes back every 1800 s"
    name, params = structured_item(sent["ratelimit"])
    assert (name, params["r"]) == ("per_user", 0)

    rich = status_from_header(sent["grpc-status-details-bin"])
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    # gRPC clients check that the details' message equals grpc-message, which Envoy's local reply
    # sets to the gateway's fixed sentence; the details name the limit.
    assert rich.message == RATE_LIMITED_GRPC_MESSAGE
    info, quota, retry = (
        error_details_pb2.ErrorInfo(),
        error_details_pb2.QuotaFailure(),
        error_details_pb2.RetryInfo(),
    )
    assert [
        detail.Unpack(message) for detail, message in zip(rich.details, (info, quota, retry), strict=True)
    ] == [True] * 3
    assert (info.reason, info.domain) == ("RATE_LIMITED", "parley.dev")
    assert dict(info.metadata) == {"limit": "per_user", "retry_after_s": str(retry_after)}
    assert [violation.subject for violation in quota.violations] == ["per_user:user"]
    assert retry.retry_delay.seconds == retry_after
    assert rls.metric("parley_ratelimit_decisions_total", limit="per_user", result="limited") == 1


async def test_the_body_fragment_becomes_the_gateway_error_json(rls: RunningRls) -> None:
    for _ in range(3):
        response = await ask(rls, [user("grace")])
    assert response.overall_code == OVER_LIMIT

    body = json.loads(REPLY_PREFIX + response.raw_body + REPLY_SUFFIX)
    assert body["code"] == 8
    assert body["message"] == (
        "Rate limit per_user exceeded (2 requests per hour with bursts of 2); retry in 1800 s."
    )
    assert "grace" not in json.dumps(body)
    assert [detail["@type"] for detail in body["details"]] == [
        "type.googleapis.com/google.rpc.ErrorInfo",
        "type.googleapis.com/google.rpc.QuotaFailure",
        "type.googleapis.com/google.rpc.RetryInfo",
        "type.googleapis.com/google.rpc.RequestInfo",
    ]
    info, quota, retry, _request = body["details"]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "RATE_LIMITED",
        "domain": "parley.dev",
        "metadata": {"limit": "per_user", "retry_after_s": "1800"},
    }
    assert quota["violations"][0]["subject"] == "per_user:user"
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "1800s"}


async def test_a_refused_request_spends_none_of_its_other_limits(rls: RunningRls) -> None:
    for _ in range(2):
        await ask(rls, [address("203.0.113.5"), user("heidi")])
    refused = await ask(rls, [address("203.0.113.5"), user("heidi")])
    assert refused.overall_code == OVER_LIMIT
    by_address, by_user = refused.statuses
    assert (by_address.code, by_address.limit_remaining) == (OK, 48)
    assert by_user.code == OVER_LIMIT
    assert (await ask(rls, [address("203.0.113.5")])).statuses[0].limit_remaining == 47


async def test_a_shadow_limit_never_refuses_but_is_counted(rls: RunningRls) -> None:
    watched = descriptor(("limit", "watch"), ("user", "ivan"))
    responses = [await ask(rls, [watched]) for _ in range(3)]
    assert [response.overall_code for response in responses] == [OK, OK, OK]
    assert all(response.statuses[0].code == OK for response in responses)
    assert [response.statuses[0].limit_remaining for response in responses] == [0, 0, 0]
    assert headers(responses[-1]) == {}, "headers advertise enforced limits only"
    assert rls.metric("parley_ratelimit_decisions_total", limit="watched", result="allowed") == 1
    assert rls.metric("parley_ratelimit_decisions_total", limit="watched", result="shadow_limited") == 2


# --- the store fails -----------------------------------------------------------------------------


async def test_an_unreachable_redis_is_unavailable_and_counted(redis_url: str) -> None:
    direct = Redis.from_url(redis_url)
    settings = direct.connection_pool.connection_kwargs
    proxy = TcpProxy(settings.get("host", "127.0.0.1"), settings.get("port", 6379))
    await proxy.start()
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(
        f"redis://127.0.0.1:{proxy.port}/{settings.get('db', 0)}", key_prefix=prefix
    )
    try:
        async with serving_rls(CONFIG, limiter) as rls:
            assert (await ask(rls, [user("judy")])).overall_code == OK
            await proxy.cut()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await ask(rls, [user("judy")])
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert rls.metric("parley_ratelimit_backend_errors_total") == 1

            unmatched_only = await ask(rls, [descriptor(("limit", "mystery"))])
            assert unmatched_only.overall_code == OK, "nothing to ask the store, so nothing fails"

            await proxy.restore()
            recovered = await ask(rls, [user("judy")])
            assert recovered.overall_code == OK
            assert recovered.statuses[0].limit_remaining == 0, "the counter survived the outage"
            assert rls.metric("parley_ratelimit_backend_errors_total") == 1
    finally:
        await limiter.aclose()
        await proxy.close()
        await direct.delete(f"{prefix}rl:per_user:judy")
        await direct.aclose()


async def test_the_shipped_rules_answer_in_the_retry_after_they_promise(redis_url: str) -> None:
    prefix = f"parley-test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(redis_url, key_prefix=prefix)
    login = descriptor(("limit", "login"), ("remote_address", "192.0.2.44"))
    try:
        async with serving_rls(load_rate_limit_config(), limiter) as rls:
            answers = [await ask(rls, [login]) for _ in range(11)]
            assert [answer.overall_code for answer in answers] == [OK] * 10 + [OVER_LIMIT]
            refused = headers(answers[-1])
            assert structured_item(refused["ratelimit-policy"]) == ("login_ip", {"q": 10, "w": 20})
            assert int(refused["retry-after"]) == math.ceil(60 / 30)

            reset = await ask(
                rls, [descriptor(("limit", "forgot_password_email"), ("email", "kim@example.com"))]
            )
            limit = reset.statuses[0].current_limit
            assert (limit.name, limit.requests_per_unit) == ("forgot_password_email", 12)
            assert limit.unit == rls_pb2.RateLimitResponse.RateLimit.HOUR, "3 per 900 s is 12 per hour"
    finally:
        await limiter.aclose()
        client = Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        assert len(keys) == 2
        assert not any(b"kim" in key for key in keys), "email addresses are hashed in keys"
        await client.delete(*keys)
        await client.aclose()
