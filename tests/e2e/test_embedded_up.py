"""`parley up` end to end: the real CLI, the real Envoy, real HTTP and grpcurl clients."""

from __future__ import annotations

import json
import signal
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.common.contracts import descriptor_set_bytes, descriptor_set_path
from tests.support.gateway import grpcurl
from tests.support.parley_process import EmbeddedPorts, ParleyProcess, children_of, command_of, pid_alive
from tests.support.polling import eventually_sync
from tests.support.reflection import (
    DESCRIBE_CASES,
    LIST_PLANS_METHOD,
    REFLECTION_VERSIONS,
    DescribeCase,
    assert_grpcurl_describes,
    files_of,
    listed_services,
    reflect,
    service_names_in,
    symbol_request,
)

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"


def parley_services() -> tuple[set[str], set[str]]:
    """(public, internal) Parley service names, read from the committed descriptor set."""
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    names = {
        f"{file.package}.{service.name}"
        for file in descriptor_set.file
        if file.package.startswith("parley.")
        for service in file.service
    }
    internal = {name for name in names if name.endswith("InternalService")}
    return names - internal, internal


@pytest.fixture(scope="module")
def parley_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ParleyProcess, EmbeddedPorts]]:
    data_dir = tmp_path_factory.mktemp("parley-data")
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"],
        env={**ports.env(), "PARLEY_DATA_DIR": str(data_dir)},
        log_path=data_dir / "parley.log",
    )
    process.start()
    process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
    # Envoy can answer /healthz a moment before `parley up` prints where everything listens.
    eventually_sync(lambda: "Parley is up" in process.output(), what="`parley up` announcing itself")
    yield process, ports
    process.terminate()


@pytest.fixture(scope="module")
def gateway(parley_up: tuple[ParleyProcess, EmbeddedPorts]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{parley_up[1].http}", timeout=10.0) as client:
        yield client


def assert_error_body(
    response: httpx.Response, *, status: int, grpc_code: int, reason: str
) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == grpc_code
    assert isinstance(body["message"], str)
    assert body["message"]
    info = next(d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    assert (info["reason"], info["domain"]) == (reason, "parley.dev")
    assert "Traceback" not in response.text
    assert not any(name.startswith("grpc-") for name in response.headers)
    return dict(body)


def test_it_prints_where_everything_listens(parley_up: tuple[ParleyProcess, EmbeddedPorts]) -> None:
    process, ports = parley_up
    output = process.output()
    assert f"http://127.0.0.1:{ports.http}" in output
    assert f"127.0.0.1:{ports.grpc}" in output
    assert f"http://127.0.0.1:{ports.metrics}/metrics" in output


def test_json_call_reaches_a_servicer_and_comes_back_transcoded(gateway: httpx.Client) -> None:
    response = gateway.get("/v1/billing/plans")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    assert "server" not in response.headers or "envoy" not in response.headers["server"].lower()
    assert not any(name.startswith("grpc-") for name in response.headers)
    plans = response.json()["plans"]
    assert [plan["id"] for plan in plans] == ["free", "pro", "team"]
    pro = plans[1]
    # proto field names, int64 as JSON strings, enums by name
    assert pro["monthly_price"] == {"currency_code": "USD", "amount_minor": "2000", "minor_nanos": 0}
    assert pro["included_tokens"] == "2000000"
    assert pro["tier"] == "PLAN_TIER_PRO"
    assert plans[0]["hard_stop"] is True


def test_service_errors_come_back_as_typed_json(gateway: httpx.Client) -> None:
    invalid = gateway.get("/v1/billing/plans", params={"page_size": -1})
    body = assert_error_body(invalid, status=400, grpc_code=3, reason="INVALID_ARGUMENT")
    details = body["details"]
    assert isinstance(details, list)
    bad_request = next(d for d in details if d["@type"].endswith("google.rpc.BadRequest"))
    assert bad_request["field_violations"][0]["field"] == "page_size"
    request_info = next(d for d in details if d["@type"].endswith("google.rpc.RequestInfo"))
    assert request_info["request_id"] == invalid.headers["x-request-id"]

    # GetSubscription needs a caller: without one the gateway refuses it before billing sees it.
    anonymous = gateway.get("/v1/billing/subscription")
    assert_error_body(anonymous, status=401, grpc_code=16, reason="UNAUTHENTICATED")
    unimplemented = gateway.get("/v1/billing/subscription", headers=signed_in(gateway))
    assert_error_body(unimplemented, status=501, grpc_code=12, reason="NOT_IMPLEMENTED")


def signed_in(gateway: httpx.Client) -> dict[str, str]:
    """A new account's bearer header, from registering and signing in through the gateway."""
    email = f"embedded-{uuid.uuid4().hex[:10]}@example.com"
    registered = gateway.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Embedded"}
    )
    assert registered.status_code == 200, registered.text
    login = gateway.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return {"authorization": f"Bearer {login.json()['tokens']['access_token']}"}


def test_gateway_errors_share_the_service_error_shape(gateway: httpx.Client) -> None:
    unknown = gateway.get("/v1/no/such/thing")
    assert_error_body(unknown, status=404, grpc_code=5, reason="ROUTE_NOT_FOUND")

    malformed = gateway.post(
        "/v1/auth/register", content=b'{"email": "a@b.c", ', headers={"content-type": "application/json"}
    )
    assert_error_body(malformed, status=400, grpc_code=3, reason="MALFORMED_REQUEST")

    oversize = gateway.post(
        "/v1/auth/register",
        content=b'{"display_name": "' + b"x" * (2 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_error_body(oversize, status=413, grpc_code=8, reason="REQUEST_TOO_LARGE")


def test_healthz_answers(gateway: httpx.Client) -> None:
    response = gateway.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "SERVING"}


async def test_grpcurl_through_the_gateway_and_direct(parley_up: tuple[ParleyProcess, EmbeddedPorts]) -> None:
    _, ports = parley_up
    public, internal = parley_services()

    through_gateway = await grpcurl("-plaintext", f"127.0.0.1:{ports.http}", "list")
    assert through_gateway.returncode == 0, through_gateway.stderr
    listed = set(through_gateway.stdout.split())
    assert public <= listed
    assert not internal & listed

    direct = await grpcurl("-plaintext", f"127.0.0.1:{ports.grpc}", "list")
    assert direct.returncode == 0, direct.stderr
    assert public | internal <= set(direct.stdout.split())

    for port in (ports.http, ports.grpc):
        call = await grpcurl(
            "-plaintext", "-d", "{}", f"127.0.0.1:{port}", "parley.billing.v1.BillingService/ListPlans"
        )
        assert call.returncode == 0, call.stderr
        assert [plan["id"] for plan in json.loads(call.stdout)["plans"]] == ["free", "pro", "team"]


@pytest.mark.parametrize("case", DESCRIBE_CASES, ids=lambda case: case.symbol)
async def test_grpcurl_describes_every_kind_of_symbol_through_the_gateway_and_direct(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], case: DescribeCase
) -> None:
    _, ports = parley_up
    for port in (ports.http, ports.grpc):
        await assert_grpcurl_describes(f"127.0.0.1:{port}", case)


async def test_grpcurl_prints_a_request_template_through_the_gateway(
    parley_up: tuple[ParleyProcess, EmbeddedPorts],
) -> None:
    _, ports = parley_up
    result = await grpcurl(
        "-plaintext",
        "-msg-template",
        f"127.0.0.1:{ports.http}",
        "describe",
        "parley.billing.v1.ListPlansRequest",
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.split("Message template:\n", 1)[1]) == {
        "pageSize": 0,
        "pageToken": "",
        "showRetired": False,
    }


async def test_internal_services_are_described_on_the_service_port_only(
    parley_up: tuple[ParleyProcess, EmbeddedPorts],
) -> None:
    _, ports = parley_up
    _, internal = parley_services()
    reserve_credits = "parley.billing.v1.BillingInternalService.ReserveCredits"
    for symbol in [*sorted(internal), reserve_credits]:
        hidden = await grpcurl("-plaintext", f"127.0.0.1:{ports.http}", "describe", symbol)
        assert hidden.returncode != 0
        assert f"Symbol not found: {symbol}" in hidden.stderr

        shown = await grpcurl("-plaintext", f"127.0.0.1:{ports.grpc}", "describe", symbol)
        assert shown.returncode == 0, shown.stderr


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_both_reflection_versions_answer_through_the_gateway(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], version: str
) -> None:
    _, ports = parley_up
    public, internal = parley_services()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.http}") as channel:
        listing, method, unknown = await reflect(
            channel,
            version,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            symbol_request(LIST_PLANS_METHOD),
            symbol_request("parley.billing.v1.BillingInternalService"),
        )

    assert set(listed_services(listing)) == {
        *public,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = files_of(method)
    assert files[0].name == "parley/billing/v1/billing.proto"
    # The public view: the billing file comes without its internal service, nor any file with one.
    assert not internal & service_names_in(files)
    assert "parley.billing.v1.BillingService" in service_names_in(files)
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_internal_services_are_unreachable_through_the_gateway(
    parley_up: tuple[ParleyProcess, EmbeddedPorts], gateway: httpx.Client
) -> None:
    _, ports = parley_up
    call = await grpcurl(
        "-plaintext",
        # Reflection through the gateway does not know internal services, so describe it from the contract.
        "-protoset",
        str(descriptor_set_path()),
        "-d",
        "{}",
        f"127.0.0.1:{ports.http}",
        "parley.billing.v1.BillingInternalService/ReserveCredits",
    )
    assert call.returncode != 0
    assert "Code: Unimplemented" in call.stderr or "Code: NotFound" in call.stderr, call.stderr
    response = gateway.post(
        "/parley.billing.v1.BillingInternalService/ReserveCredits",
        content=b"{}",
        headers={"content-type": "application/json"},
    )
    assert_error_body(response, status=404, grpc_code=5, reason="ROUTE_NOT_FOUND")


def test_metrics_are_served(parley_up: tuple[ParleyProcess, EmbeddedPorts], gateway: httpx.Client) -> None:
    gateway.get("/v1/billing/plans")
    metrics = httpx.get(f"http://127.0.0.1:{parley_up[1].metrics}/metrics", timeout=5.0).text
    assert 'parley_rpc_server_handled_total{grpc_code="OK",grpc_method="ListPlans"' in metrics
    assert 'parley_dependency_up{dependency="database"} 1.0' in metrics


def test_logs_are_json_lines(parley_up: tuple[ParleyProcess, EmbeddedPorts]) -> None:
    records = []
    for line in parley_up[0].output().splitlines():
        if line.startswith("{") and '"service"' in line:
            records.append(json.loads(line))
    assert records, "parley up logged no JSON lines"
    assert all({"time", "level", "service", "message"} <= record.keys() for record in records)


def test_signals_stop_everything_and_a_restart_keeps_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ports = EmbeddedPorts()
    env = {**ports.env(), "PARLEY_DATA_DIR": str(data_dir)}
    first = ParleyProcess(["up"], env=env, log_path=tmp_path / "first.log")
    first.start()
    first.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
    assert first.process is not None
    children = children_of(first.process.pid)
    commands = sorted(command_of(pid) for pid in children)
    assert len(children) == 2, f"parley up should run Envoy and the edge process as children: {commands}"
    assert any("envoy" in command for command in commands), commands
    assert any("runtime.cli edge" in command for command in commands), commands

    # An operator retires a plan directly in the embedded database while Parley runs.
    with sqlite3.connect(data_dir / "parley.db") as connection:
        connection.execute("UPDATE plans SET retired_at = '2026-01-01 00:00:00' WHERE id = 'team'")
    assert first.terminate() == 0
    assert not any(pid_alive(pid) for pid in children), "Envoy or the edge process outlived parley up"

    second = ParleyProcess(["up"], env=env, log_path=tmp_path / "second.log")
    second.start()
    try:
        second.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        plans = httpx.get(f"http://127.0.0.1:{ports.http}/v1/billing/plans", timeout=10).json()["plans"]
        assert [plan["id"] for plan in plans] == ["free", "pro"]
        retired = httpx.get(
            f"http://127.0.0.1:{ports.http}/v1/billing/plans", params={"show_retired": "true"}, timeout=10
        ).json()["plans"]
        assert retired[-1]["id"] == "team"
        assert retired[-1]["retired"] is True
    finally:
        # Ctrl-C in a terminal sends SIGINT to the foreground process; that must stop cleanly too.
        assert second.terminate(signum=signal.SIGINT) == 0
