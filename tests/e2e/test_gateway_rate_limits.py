"""Global rate limits through real gateways: Envoy, the edge's rate-limit service, Redis, and the
real services of a `parley up` behind them.

Each test gets limits of its own (renamed, so its Redis counters are fresh) and tight enough to be
reached in a few requests."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from gateway.topology import Topology
from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.common.errors import details_of
from services.common.ratelimit import load_rate_limit_config
from tests.support.gateway import RunningGateway, embedded_test_topology, running_gateway
from tests.support.parley_process import EmbeddedPorts, ParleyProcess
from tests.support.pki import ServicePki, embedded_pki
from tests.support.rate_limits import scaled_rate_limits
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

HOUR = 3600.0


@dataclass(frozen=True)
class Services:
    """A running `parley up`: its ports, and the PKI it made (whose gateway and edge certificates
    the test gateways present, as its own gateway does)."""

    ports: EmbeddedPorts
    pki: ServicePki


@pytest.fixture(scope="module")
def parley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """The real services (and their own gateway, unused here) for the test gateways to front."""
    data_dir = tmp_path_factory.mktemp("parley-limits")
    ports = EmbeddedPorts()
    env = {**ports.env(), "PARLEY_DATA_DIR": str(data_dir)}
    process = ParleyProcess(["up"], env=env, log_path=data_dir / "up.log")
    process.start()
    try:
        process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        yield Services(ports, embedded_pki(data_dir))
    finally:
        process.terminate()


def tight_limits(directory: Path, **limits: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    """The shipped rules with the named limits replaced; every limit renamed with a fresh suffix."""
    suffix = uuid.uuid4().hex[:8]
    renamed = {rule.name: f"{rule.name}_{suffix}" for rule in load_rate_limit_config().rules}
    overrides = {name: {"name": renamed[name], **limits.get(name, {})} for name in renamed}
    return scaled_rate_limits(1, overrides=overrides, directory=directory), renamed


def topology_for(services: Services, limits_file: Path) -> Topology:
    topology = embedded_test_topology(services.ports.grpc, pki=services.pki)
    return dataclasses.replace(topology, rate_limits_path=limits_file)


@pytest_asyncio.fixture(loop_scope="module")
async def two_gateways(
    parley: Services, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[list[RunningGateway], dict[str, str], int]]:
    burst = 20
    limits_file, names = tight_limits(
        tmp_path, anonymous={"burst": burst, "rate": {"requests": 1, "per_s": HOUR}}
    )
    async with (
        running_gateway(topology_for(parley, limits_file), pki=parley.pki, redis_url=redis_url) as first,
        running_gateway(topology_for(parley, limits_file), pki=parley.pki, redis_url=redis_url) as second,
    ):
        yield [first, second], names, burst


async def test_two_gateways_sharing_redis_let_exactly_the_limit_through(
    two_gateways: tuple[list[RunningGateway], dict[str, str], int],
) -> None:
    gateways, names, burst = two_gateways
    requests = 3 * burst
    # Concurrent, but not so many at once that a decision outlives the filter's timeout on this
    # 2-core machine (a timed-out decision fails open, by design, and would not be counted).
    in_flight = asyncio.Semaphore(8)

    async def get(client: httpx.AsyncClient, index: int) -> httpx.Response:
        async with in_flight:
            return await client.get(f"{gateways[index % 2].http_url}/v1/billing/plans")

    async with httpx.AsyncClient(timeout=15.0) as client:
        responses = await asyncio.gather(*(get(client, index) for index in range(requests)))
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == burst, statuses
    assert statuses.count(429) == requests - burst, statuses
    # Both gateways refused some: the budget really is shared, not per process.
    for index in (0, 1):
        assert 429 in statuses[index::2]

    refused = next(response for response in responses if response.status_code == 429)
    assert_rate_limited_body(refused, names["anonymous"])
    allowed = next(response for response in responses if response.status_code == 200)
    assert allowed.headers["ratelimit-policy"].startswith(f'"{names["anonymous"]}";q={burst};w=')
    assert allowed.headers["ratelimit"].startswith(f'"{names["anonymous"]}";r=')


def assert_rate_limited_body(response: httpx.Response, limit: str) -> None:
    """429, the one error shape, QuotaFailure + RetryInfo details, Retry-After and the IETF headers."""
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/json"
    retry_after = int(response.headers["retry-after"])
    assert retry_after > 0
    assert response.headers["ratelimit"].startswith(f'"{limit}";r=0;t=')
    assert response.headers["ratelimit-policy"].startswith(f'"{limit}";q=')
    assert not [name for name in response.headers if name.startswith("grpc-")]
    body = response.json()
    assert body["code"] == 8 and limit in body["message"]
    by_type = {detail["@type"].rsplit(".", 1)[1]: detail for detail in body["details"]}
    assert by_type["ErrorInfo"]["reason"] == "RATE_LIMITED"
    assert by_type["ErrorInfo"]["metadata"]["limit"] == limit
    assert by_type["QuotaFailure"]["violations"][0]["subject"].startswith(f"{limit}:")
    assert by_type["RetryInfo"]["retry_delay"] == f"{retry_after}s"
    assert by_type["RequestInfo"]["request_id"] == response.headers["x-request-id"]


async def test_grpc_callers_get_resource_exhausted_with_the_same_details(
    parley: Services, redis_url: str, tmp_path: Path
) -> None:
    limits_file, names = tight_limits(
        tmp_path, anonymous={"burst": 2, "rate": {"requests": 1, "per_s": HOUR}}
    )
    async with (
        running_gateway(topology_for(parley, limits_file), pki=parley.pki, redis_url=redis_url) as gateway,
        grpc.aio.insecure_channel(gateway.grpc_target) as channel,
    ):
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        for _ in range(2):
            await stub.ListPlans(billing_pb2.ListPlansRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListPlans(billing_pb2.ListPlansRequest(), timeout=10)
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)
    assert status is not None
    details = details_of(status)
    info, quota = details["ErrorInfo"], details["QuotaFailure"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "RATE_LIMITED"
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject.startswith(names["anonymous"])


async def test_signed_in_callers_are_limited_per_user_by_plan(
    parley: Services, redis_url: str, tmp_path: Path
) -> None:
    limits_file, _names = tight_limits(
        tmp_path,
        plan_free={"burst": 3, "rate": {"requests": 1, "per_s": HOUR}},
        anonymous={"burst": 1000},
    )
    async with (
        running_gateway(topology_for(parley, limits_file), pki=parley.pki, redis_url=redis_url) as gateway,
        httpx.AsyncClient(base_url=gateway.http_url, timeout=15.0) as client,
    ):
        headers = []
        for label in ("alice", "bob"):
            email = f"{label}-{uuid.uuid4().hex[:8]}@example.com"
            credentials = {"email": email, "password": "violet-harbour-lantern-42"}
            registered = await client.post("/v1/auth/register", json={**credentials, "display_name": label})
            assert registered.status_code == 200, registered.text
            login = await client.post("/v1/auth/login", json=credentials)
            headers.append({"authorization": f"Bearer {login.json()['tokens']['access_token']}"})
        alice = [(await client.get("/v1/users/me", headers=headers[0])).status_code for _ in range(5)]
        bob = (await client.get("/v1/users/me", headers=headers[1])).status_code
    assert alice == [200, 200, 200, 429, 429]
    assert bob == 200  # another user's budget is untouched


async def test_when_redis_is_down_reads_fail_open_and_login_fails_closed(
    parley: Services, redis_url: str, tmp_path: Path
) -> None:
    limits_file, _ = tight_limits(tmp_path)
    redis_host, redis_port = httpx.URL(redis_url).host, httpx.URL(redis_url).port or 6379
    proxy = TcpProxy(redis_host, redis_port)
    await proxy.start()
    registry = CollectorRegistry()
    try:
        async with (
            running_gateway(
                topology_for(parley, limits_file),
                pki=parley.pki,
                redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                registry=registry,
            ) as gateway,
            httpx.AsyncClient(base_url=gateway.http_url, timeout=15.0) as client,
        ):
            login = {"email": "nobody@example.com", "password": "wrong-password-123"}
            assert (await client.get("/v1/billing/plans")).status_code == 200
            assert (await client.post("/v1/auth/login", json=login)).status_code == 401

            await proxy.cut()
            read = await client.get("/v1/billing/plans")
            assert read.status_code == 200, read.text
            closed = await client.post("/v1/auth/login", json=login)
            assert closed.status_code == 503, closed.text
            body = closed.json()
            reason = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))["reason"]
            assert reason == "RATE_LIMITER_UNAVAILABLE"

            stats = (await client.get(f"{gateway.envoy.admin_url}/stats?filter=ratelimit")).text
            await proxy.restore()
            recovered = await client.post("/v1/auth/login", json=login)
            assert recovered.status_code == 401, recovered.text
    finally:
        await proxy.close()
    counters = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    assert any(
        name.endswith("ratelimit.fail_open.failure_mode_allowed") and int(value) >= 1
        for name, value in counters.items()
    ), stats
    assert any(
        name.endswith("ratelimit.fail_closed.error") and int(value) >= 1 for name, value in counters.items()
    ), stats
    backend_errors = registry.get_sample_value("parley_ratelimit_backend_errors_total")
    assert backend_errors is not None and backend_errors >= 2
