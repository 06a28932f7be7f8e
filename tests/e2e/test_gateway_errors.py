"""Errors the gateway produces itself, health, and what gRPC clients can see through it.

Real Envoy, the real edge server and a real gRPC upstream (health service plus a few recorded
handlers standing in for Parley RPCs), driven by httpx and the grpcurl binary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from gateway.descriptors import DescriptorIndex, is_internal_service
from gateway.envoy_process import EnvoyProcess, EnvoyStartError
from services.common.identity import decode_roles_header
from services.common.listeners import PortInUseError
from tests.support.gateway import (
    DESCRIPTOR_SET_PATH,
    REPO_ROOT,
    TEST_API_KEY,
    TEST_API_KEY_HEADERS,
    TEST_USER_ID,
    HealthUpstream,
    RunningGateway,
    embedded_test_topology,
    fast_settings,
    free_port,
    grpcurl,
    internal_service_names,
    public_service_names,
    running_gateway,
    start_health_upstream,
    wait_for_healthz,
)
from tests.support.pki import ServicePki
from tests.support.polling import eventually

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

MAX_REQUEST_BYTES = 64 * 1024
UNARY_TIMEOUT_S = 1
REGISTER = "/parley.auth.v1.AuthService/Register"
GET_CURRENT_USER = "/parley.auth.v1.AuthService/GetCurrentUser"
LIST_PLANS = "/parley.billing.v1.BillingService/ListPlans"


class StandInRpcs(grpc.GenericRpcHandler):
    """Answers a few real Parley methods with raw bytes, recording what metadata reached them."""

    def __init__(self) -> None:
        self.metadata: dict[str, list[tuple[str, str]]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        behaviours: dict[str, Callable[[bytes, grpc.aio.ServicerContext], Any]] = {
            REGISTER: self._empty_response,
            GET_CURRENT_USER: self._not_found,
            LIST_PLANS: self._too_slow,
        }
        behaviour = behaviours.get(method)
        if behaviour is None:
            return None

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.metadata[method] = [(key, str(value)) for key, value in context.invocation_metadata() or ()]
            result: bytes = await behaviour(request, context)
            return result

        # No (de)serializers: requests and responses stay raw bytes, so any message shape works.
        return grpc.unary_unary_rpc_method_handler(handle)

    @staticmethod
    async def _empty_response(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""  # every field at its default: a valid message of any type

    @staticmethod
    async def _not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort_with_status(rpc_status.to_status(service_error()))
        raise AssertionError("abort_with_status returns only by raising")

    @staticmethod
    async def _too_slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # A hold in the fake upstream, in real time: Envoy's route timeout (real time) is under test.
        await asyncio.sleep(UNARY_TIMEOUT_S * 10)
        return b""


def service_error() -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(reason="USER_NOT_FOUND", domain="parley.dev", metadata={"k": "v"})
    )
    return status_pb2.Status(code=code_pb2.NOT_FOUND, message="No such user.", details=[detail])


@pytest.fixture(scope="module")
def stand_in() -> StandInRpcs:
    return StandInRpcs()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def upstream(stand_in: StandInRpcs, service_pki: ServicePki) -> AsyncIterator[HealthUpstream]:
    server = await start_health_upstream(public_service_names(), pki=service_pki, handlers=[stand_in])
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def access_log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway") / "envoy-stdout.log"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(
    upstream: HealthUpstream, access_log_path: Path, service_pki: ServicePki
) -> AsyncIterator[RunningGateway]:
    topology = embedded_test_topology(
        upstream.port,
        pki=service_pki,
        settings=fast_settings(unary_timeout_s=UNARY_TIMEOUT_S),
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with access_log_path.open("wb") as envoy_stdout:
        async with running_gateway(topology, pki=service_pki, stdout=envoy_stdout.fileno()) as running:
            await wait_for_healthz(running.http_url, 200)
            yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(gateway: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.http_url, timeout=10.0) as http:
        yield http


def assert_clean_headers(response: httpx.Response) -> None:
    assert "server" not in response.headers
    assert [name for name in response.headers if name.startswith(("grpc-", "x-envoy-"))] == []
    uuid.UUID(response.headers["x-request-id"])


def assert_gateway_error(
    response: httpx.Response,
    *,
    status: int,
    code: int,
    reason: str,
    message: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """The exact Parley error body, with the request id the response header carries."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert_clean_headers(response)
    error_info: dict[str, Any] = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "parley.dev",
    }
    if metadata:
        error_info["metadata"] = metadata
    assert response.json() == {
        "code": code,
        "message": message,
        "details": [
            error_info,
            {
                "@type": "type.googleapis.com/google.rpc.RequestInfo",
                "request_id": response.headers["x-request-id"],
            },
        ],
    }


async def test_unknown_path_is_a_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/no/such/thing")

    assert_gateway_error(
        response,
        status=404,
        code=5,
        reason="ROUTE_NOT_FOUND",
        message="No API route matches this method and path.",
    )


async def test_wrong_method_on_a_known_path_is_a_json_405(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/auth/register")

    # The methods a path does not serve: tests/e2e/test_gateway_methods.py.
    assert_gateway_error(
        response,
        status=405,
        code=12,
        reason="METHOD_NOT_ALLOWED",
        message="This path does not serve the DELETE method; it serves POST.",
        metadata={"method": "DELETE", "allow": "POST"},
    )
    assert response.headers["allow"] == "POST"


async def test_malformed_json_is_a_400_with_the_parser_message(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/auth/register", content=b"{", headers={"content-type": "application/json"}
    )

    assert_gateway_error(
        response,
        status=400,
        code=3,
        reason="MALFORMED_REQUEST",
        message="Unexpected end of string. Expected an object key or }.\n\n^",
    )


async def test_unknown_query_parameter_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/billing/plans", params={"no_such_field": "1"})

    assert_gateway_error(
        response,
        status=400,
        code=3,
        reason="MALFORMED_REQUEST",
        message='Could not find field "no_such_field" in the type "parley.billing.v1.ListPlansRequest".',
    )


async def test_oversize_body_is_a_413(client: httpx.AsyncClient) -> None:
    body = json.dumps({"email": "a" * MAX_REQUEST_BYTES}).encode()

    response = await client.post(
        "/v1/auth/register", content=body, headers={"content-type": "application/json"}
    )

    assert_gateway_error(
        response,
        status=413,
        code=8,
        reason="REQUEST_TOO_LARGE",
        message="The request body is larger than the gateway accepts.",
        metadata={"max_request_bytes": str(MAX_REQUEST_BYTES)},
    )


async def test_slow_upstream_is_a_504(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/billing/plans")

    assert_gateway_error(
        response, status=504, code=4, reason="UPSTREAM_TIMEOUT", message="The service did not answer in time."
    )


async def test_json_to_an_internal_service_path_is_a_404(client: httpx.AsyncClient) -> None:
    for service in internal_service_names():
        response = await client.post(f"/{service}/Anything", json={})

        assert_gateway_error(
            response,
            status=404,
            code=5,
            reason="ROUTE_NOT_FOUND",
            message="No API route matches this method and path.",
        )


async def test_a_protected_route_without_a_credential_is_refused_at_the_edge(
    client: httpx.AsyncClient, stand_in: StandInRpcs
) -> None:
    stand_in.metadata.pop(GET_CURRENT_USER, None)

    response = await client.get("/v1/users/me")

    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"].startswith('Bearer realm="')
    assert_clean_headers(response)
    body = response.json()
    assert body["code"] == 16 and body["message"]
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "UNAUTHENTICATED",
            "domain": "parley.dev",
        },
        {
            "@type": "type.googleapis.com/google.rpc.RequestInfo",
            "request_id": response.headers["x-request-id"],
        },
    ]
    # Refused by the edge: the service never saw the call.
    assert GET_CURRENT_USER not in stand_in.metadata


async def test_service_errors_pass_through_untouched(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/users/me", headers=TEST_API_KEY_HEADERS)

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert_clean_headers(response)
    # The service's own google.rpc.Status, not rewritten into a gateway error.
    assert response.json() == {
        "code": 5,
        "message": "No such user.",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "USER_NOT_FOUND",
                "domain": "parley.dev",
                "metadata": {"k": "v"},
            }
        ],
    }


async def test_success_reaches_the_service_with_only_gateway_identity_headers(
    client: httpx.AsyncClient, stand_in: StandInRpcs
) -> None:
    response = await client.post(
        "/v1/auth/register",
        json={},
        headers={
            "x-parley-user-id": "forged-user",
            "X-Parley-Gateway-Secret": "forged-secret",
            "x-parley-anything-else": "forged",
            "x-request-id": "client-chosen-id",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert_clean_headers(response)
    received = stand_in.metadata[REGISTER]
    # Every client-sent x-parley-* header is gone, and the gateway adds none of its own: it proves
    # itself with its certificate, so no request carries a bearer secret.
    assert [key for key, _ in received if key.startswith("x-parley-")] == []
    assert "forged" not in str(received)
    # An untrusted client cannot choose the request id; the one the service saw is the one returned.
    assert response.headers["x-request-id"] != "client-chosen-id"
    assert ("x-request-id", response.headers["x-request-id"]) in received
    # Envoy continues the caller's trace: same trace id, its own span as the parent.
    (traceparent,) = [value for key, value in received if key == "traceparent"]
    version, trace_id, parent_span_id, _flags = traceparent.split("-")
    assert (version, trace_id) == ("00", "0af7651916cd43dd8448eb211c80319c")
    assert parent_span_id != "b7ad6b7169203331"


async def test_a_credential_reaches_the_service_as_gateway_identity_headers(
    client: httpx.AsyncClient, stand_in: StandInRpcs
) -> None:
    response = await client.get(
        "/v1/users/me",
        headers={**TEST_API_KEY_HEADERS, "x-parley-user-id": "forged-user", "x-parley-roles": "admin"},
    )

    assert response.status_code == 404, response.text  # the stand-in's answer: the call got through
    received = dict(stand_in.metadata[GET_CURRENT_USER])
    parley_headers = {key: value for key, value in received.items() if key.startswith("x-parley-")}
    assert decode_roles_header(parley_headers.pop("x-parley-roles")) == frozenset({"user"})
    assert parley_headers == {
        "x-parley-user-id": TEST_USER_ID,
        "x-parley-plan": "free",
        "x-parley-auth-method": "api_key",
    }
    # The key itself stops at the edge.
    assert "x-api-key" not in received
    assert TEST_API_KEY not in str(stand_in.metadata[GET_CURRENT_USER])


async def test_access_log_is_json_with_request_id_and_traceparent(
    client: httpx.AsyncClient, access_log_path: Path
) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = await client.get("/v1/no/such/thing", headers={"traceparent": traceparent})
    request_id = response.headers["x-request-id"]

    def logged() -> list[dict[str, Any]]:
        lines = access_log_path.read_text().splitlines()
        entries = (json.loads(line) for line in lines if line.startswith("{"))
        return [entry for entry in entries if entry["request_id"] == request_id]

    # Envoy flushes its access log asynchronously.
    (entry,) = await eventually(logged, what=f"the access log of request {request_id}", interval_s=0.1)
    assert entry["traceparent"] == traceparent
    assert entry["status"] == 404
    assert entry["path"] == "/v1/no/such/thing"


async def test_healthz_follows_upstream_health(client: httpx.AsyncClient, upstream: HealthUpstream) -> None:
    healthy = await client.get("/healthz")
    assert healthy.status_code == 200
    assert healthy.headers["content-type"] == "application/json"
    assert healthy.json() == {"status": "SERVING"}
    assert_clean_headers(healthy)

    await upstream.set_status("parley.billing.v1.BillingService", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        await wait_for_healthz(str(client.base_url).rstrip("/"), 503)
        unhealthy = await client.get("/healthz")
        assert_gateway_error(
            unhealthy,
            status=503,
            code=14,
            reason="UPSTREAM_UNAVAILABLE",
            message="The gateway is not serving: an upstream service is not healthy.",
        )
        # Envoy does not route to a NOT_SERVING service (no panic routing): a fast 503.
        plans = await client.get("/v1/billing/plans")
        assert_gateway_error(
            plans,
            status=503,
            code=14,
            reason="UPSTREAM_UNAVAILABLE",
            message="The service is unavailable; try again shortly.",
        )
    finally:
        await upstream.set_status("parley.billing.v1.BillingService", health_pb2.HealthCheckResponse.SERVING)
    await wait_for_healthz(str(client.base_url).rstrip("/"), 200)


def listed_services(stdout: str) -> list[str]:
    return sorted(line.strip() for line in stdout.splitlines() if line.strip())


async def test_grpcurl_lists_exactly_the_public_services(gateway: RunningGateway) -> None:
    result = await grpcurl("-plaintext", gateway.grpc_target, "list")

    assert result.returncode == 0, result.stderr
    assert listed_services(result.stdout) == sorted(
        [
            *public_service_names(),
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )


async def test_grpcurl_describes_public_services_but_not_internal_ones(gateway: RunningGateway) -> None:
    public = await grpcurl("-plaintext", gateway.grpc_target, "describe", "parley.auth.v1.AuthService")
    assert public.returncode == 0, public.stderr
    assert "rpc Register ( .parley.auth.v1.RegisterRequest )" in public.stdout

    for service in internal_service_names():
        hidden = await grpcurl("-plaintext", gateway.grpc_target, "describe", service)
        assert hidden.returncode != 0
        assert f"Symbol not found: {service}" in hidden.stderr


def internal_methods() -> Sequence[str]:
    index = DescriptorIndex.from_bytes(DESCRIPTOR_SET_PATH.read_bytes())
    return [
        f"{service.full_name}/{method.name}"
        for service in index.services
        if is_internal_service(service.full_name)
        for method in service.methods
    ]


async def test_grpc_calls_to_internal_services_are_unimplemented(gateway: RunningGateway) -> None:
    methods = internal_methods()
    assert methods
    for method in methods:
        # The schema comes from the descriptor set: the gateway's reflection will not describe it.
        result = await grpcurl(
            "-plaintext", "-protoset", str(DESCRIPTOR_SET_PATH), "-d", "{}", gateway.grpc_target, method
        )

        assert result.returncode != 0
        assert "Code: Unimplemented\n  Message: No API route matches this method and path." in result.stderr


async def test_grpc_clients_get_service_status_and_details(gateway: RunningGateway) -> None:
    anonymous = await grpcurl(
        "-plaintext", "-d", "{}", gateway.grpc_target, "parley.auth.v1.AuthService/GetCurrentUser"
    )
    assert anonymous.returncode != 0
    assert "Code: Unauthenticated" in anonymous.stderr
    assert '"reason":"UNAUTHENTICATED"' in anonymous.stderr

    result = await grpcurl(
        "-plaintext",
        "-H",
        f"x-api-key: {TEST_API_KEY}",
        "-d",
        "{}",
        gateway.grpc_target,
        "parley.auth.v1.AuthService/GetCurrentUser",
    )

    assert result.returncode != 0
    assert "Code: NotFound\n  Message: No such user." in result.stderr
    assert '"reason":"USER_NOT_FOUND"' in result.stderr


async def test_grpc_health_through_the_gateway_is_the_edge(gateway: RunningGateway) -> None:
    result = await grpcurl("-plaintext", gateway.grpc_target, "grpc.health.v1.Health/Check")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


@pytest_asyncio.fixture(loop_scope="module")
async def gateway_without_upstream(service_pki: ServicePki) -> AsyncIterator[RunningGateway]:
    # Nothing listens on the upstream port: every health check and every connection fails.
    topology = embedded_test_topology(free_port(), pki=service_pki)
    async with running_gateway(topology, pki=service_pki) as running:
        yield running


async def test_unreachable_upstream_is_a_json_503(gateway_without_upstream: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway_without_upstream.http_url, timeout=10.0) as http:
        await wait_for_healthz(gateway_without_upstream.http_url, 503)
        response = await http.post("/v1/auth/register", json={})
        healthz = await http.get("/healthz")

    assert_gateway_error(
        response,
        status=503,
        code=14,
        reason="UPSTREAM_UNAVAILABLE",
        message="The service is unavailable; try again shortly.",
    )
    assert_gateway_error(
        healthz,
        status=503,
        code=14,
        reason="UPSTREAM_UNAVAILABLE",
        message="The gateway is not serving: an upstream service is not healthy.",
    )
    result = await grpcurl(
        "-plaintext", "-d", "{}", gateway_without_upstream.grpc_target, "parley.auth.v1.AuthService/Register"
    )
    assert "Code: Unavailable\n  Message: The service is unavailable; try again shortly." in result.stderr


def process_running(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie only waits for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_port_another_gateway_holds_is_refused_before_envoy_starts(gateway: RunningGateway) -> None:
    # The running gateway already holds this HTTP port.
    clashing = dataclasses.replace(gateway.topology, admin_port=free_port())
    envoy = EnvoyProcess(clashing, startup_timeout_s=20.0)

    with pytest.raises(PortInUseError) as raised:
        await envoy.start()

    assert (raised.value.setting, raised.value.port) == ("http_port", clashing.http_port)
    assert envoy.pid is None, "no Envoy was started"


async def test_envoy_that_cannot_start_reports_its_stderr(
    upstream: HealthUpstream, service_pki: ServicePki
) -> None:
    envoy = EnvoyProcess(
        embedded_test_topology(upstream.port, pki=service_pki), log_level="nonsense", startup_timeout_s=20.0
    )

    with pytest.raises(EnvoyStartError, match="before becoming ready") as raised:
        await envoy.start()

    assert "invalid log level" in str(raised.value)
    assert envoy.returncode is not None


async def test_stop_ends_the_envoy_process(upstream: HealthUpstream, service_pki: ServicePki) -> None:
    envoy = EnvoyProcess(embedded_test_topology(upstream.port, pki=service_pki))
    await envoy.start()
    pid = envoy.pid
    assert pid is not None
    assert process_running(pid)

    await envoy.stop()
    await envoy.stop()  # idempotent

    assert envoy.returncode is not None
    assert not process_running(pid)


ORPHAN_SCRIPT = """
import asyncio, sys
from pathlib import Path
from gateway.envoy_process import EnvoyProcess
from tests.support.gateway import embedded_test_topology, free_port
from tests.support.pki import ServicePki

async def main() -> None:
    envoy = EnvoyProcess(embedded_test_topology(free_port(), pki=ServicePki(Path(sys.argv[1]))))
    await envoy.start()
    print(envoy.pid, flush=True)
    await asyncio.Event().wait()  # until the test kills this process

asyncio.run(main())
"""


async def test_envoy_dies_with_a_killed_parent(service_pki: ServicePki) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ORPHAN_SCRIPT,
        str(service_pki.directory),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert parent.stdout is not None
    try:
        envoy_pid = int(await asyncio.wait_for(parent.stdout.readline(), timeout=30.0))
        assert process_running(envoy_pid)
    finally:
        parent.kill()  # SIGKILL: no stop(), no atexit, nothing in Python runs
        await parent.wait()

    await eventually(
        lambda: not process_running(envoy_pid), what=f"Envoy (pid {envoy_pid}) exited", timeout_s=5
    )
