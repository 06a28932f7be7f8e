"""HTTP methods at the gateway: a method a path does not serve is a JSON 405 with Allow, HEAD answers
like GET without the body, a path no route matches stays a 404, CORS preflights and gRPC still work,
and every reply Envoy makes before routing a request carries a request id and a message.

Real Envoy, the real edge server and a real gRPC upstream (health plus a stand-in ListPlans), driven
over raw sockets where a client library would refuse or normalize the request (QUERY, PROPFIND, a
malformed header, HEAD), and by httpx over HTTP/2 and grpcurl.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from tests.support.gateway import (
    HealthUpstream,
    RunningGateway,
    embedded_test_topology,
    grpcurl,
    public_service_names,
    running_gateway,
    start_health_upstream,
    wait_for_healthz,
)
from tests.support.pki import ServicePki
from tests.support.raw_http import RawResponse, request_bytes, send, send_raw

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

LIST_PLANS = "/parley.billing.v1.BillingService/ListPlans"
ALLOWED_ORIGIN = "https://app.parley.example"
JSON = {"content-type": "application/json"}
# Reply headers that differ between two answers to the same request.
PER_REPLY_HEADERS = frozenset({"date", "x-request-id", "ratelimit"})


class StandInListPlans(grpc.GenericRpcHandler):
    """ListPlans answered with an empty response: a GET route with a real 200 behind it."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != LIST_PLANS:
            return None

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b""  # every field at its default: a valid ListPlansResponse

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def upstream(service_pki: ServicePki) -> AsyncIterator[HealthUpstream]:
    server = await start_health_upstream(
        public_service_names(), pki=service_pki, handlers=[StandInListPlans()]
    )
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(upstream: HealthUpstream, service_pki: ServicePki) -> AsyncIterator[RunningGateway]:
    topology = dataclasses.replace(
        embedded_test_topology(upstream.port, pki=service_pki), cors_allowed_origins=(ALLOWED_ORIGIN,)
    )
    async with running_gateway(topology, pki=service_pki) as running:
        await wait_for_healthz(running.http_url, 200)
        yield running


def port_of(gateway: RunningGateway) -> int:
    return gateway.topology.http_port


async def raw_request(
    gateway: RunningGateway, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> RawResponse:
    """One request over a raw socket, sent from a thread: the upstream and the edge server answer on
    this test's event loop, which a blocking socket call would hold up."""
    return await asyncio.to_thread(send, port_of(gateway), method, path, headers=headers, body=body)


def assert_request_id(response: RawResponse, body: dict[str, Any]) -> str:
    """The body's RequestInfo names the reply's x-request-id, a fresh UUID (never null)."""
    (request_info,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.RequestInfo")]
    request_id = request_info["request_id"]
    assert request_id is not None, body
    assert request_id == response.header("x-request-id"), (body, response.headers)
    uuid.UUID(request_id)
    return str(request_id)


def error_info(body: dict[str, Any]) -> dict[str, Any]:
    (info,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["domain"] == "parley.dev"
    return dict(info)


def assert_json_error(response: RawResponse, *, status: int, code: int, reason: str) -> dict[str, Any]:
    assert response.status == status, (response.status, response.headers, response.body)
    assert response.header("content-type") == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code
    assert body["message"], body
    assert error_info(body)["reason"] == reason, body
    assert_request_id(response, body)
    return body


# (method, path, extra request headers, the Allow header the path answers with)
NOT_SERVED = [
    ("OPTIONS", "/v1/billing/plans", {}, "GET, HEAD"),
    # Envoy takes QUERY only with a content type (it carries a body); without one see below.
    ("QUERY", "/v1/billing/plans", JSON, "GET, HEAD"),
    ("PROPFIND", "/v1/users/me", {}, "GET, HEAD, PATCH"),
    ("TRACE", "/v1/auth/register", {}, "POST"),
    ("POST", "/v1/billing/plans", JSON, "GET, HEAD"),
    ("DELETE", "/v1/auth/register", {}, "POST"),
    ("PUT", "/v1/conversations/c1", JSON, "GET, HEAD, PATCH, DELETE"),
    ("PATCH", "/v1/users/me/sessions", JSON, "GET, HEAD"),
    # A custom verb belongs to its path: `:disable` is DisableUser (POST), not GetUser's `{user_id}`.
    ("GET", "/v1/admin/users/u1:disable", {}, "POST"),
    ("POST", "/v1/admin/users/u1", JSON, "GET, HEAD"),
    # Unversioned paths are negotiated first, then answered like the version's own.
    ("PATCH", "/api/billing/plans", JSON, "GET, HEAD"),
    # A gRPC method's path serves gRPC POSTs only.
    ("GET", LIST_PLANS, {}, "POST"),
    ("OPTIONS", LIST_PLANS, {}, "POST"),
    # The gateway's own pages.
    ("POST", "/docs", JSON, "GET, HEAD"),
    ("DELETE", "/openapi.json", {}, "GET, HEAD"),
    ("PUT", "/livez", {}, "GET, HEAD"),
    ("DELETE", "/healthz", {}, "GET, HEAD"),
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "allow"),
    NOT_SERVED,
    ids=[f"{method} {path}" for method, path, _, _ in NOT_SERVED],
)
async def test_a_method_the_path_does_not_serve_is_a_json_405_naming_the_ones_it_does(
    gateway: RunningGateway, method: str, path: str, headers: dict[str, str], allow: str
) -> None:
    body = b"{}" if headers else b""

    response = await raw_request(gateway, method, path, headers, body)

    error = assert_json_error(response, status=405, code=12, reason="METHOD_NOT_ALLOWED")
    assert response.header_values("allow") == [allow]
    assert error_info(error)["metadata"] == {"method": method, "allow": allow}
    assert error["message"] == f"This path does not serve the {method} method; it serves {allow}."


async def test_head_on_a_path_that_does_not_serve_get_is_a_405_without_a_body(
    gateway: RunningGateway,
) -> None:
    response = await raw_request(gateway, "HEAD", "/v1/auth/login")

    assert response.status == 405
    assert response.header_values("allow") == ["POST"]
    assert response.header("content-type") == "application/json"
    uuid.UUID(response.header("x-request-id") or "")
    assert response.body == b""


NOT_FOUND = [
    ("OPTIONS", "/v1/no/such/thing"),
    ("PROPFIND", "/nowhere"),
    ("GET", "/v1/no/such/thing"),
    ("HEAD", "/v1/no/such/thing"),
    ("GET", "/parley.auth.v1.AuthInternalService/CheckApiKey"),
    # A known custom verb where no method takes it is no path (the transcoder reads `:disable` so).
    ("GET", "/v1/billing/plans/p1:disable"),
    # A POST that is not gRPC on a gRPC method's path reaches no route.
    ("POST", LIST_PLANS),
]


@pytest.mark.parametrize(("method", "path"), NOT_FOUND, ids=[f"{m} {p}" for m, p in NOT_FOUND])
async def test_a_path_no_route_matches_stays_a_json_404(
    gateway: RunningGateway, method: str, path: str
) -> None:
    headers = JSON if method == "POST" else {}

    response = await raw_request(gateway, method, path, headers, b"{}" if headers else b"")

    if method == "HEAD":
        assert (response.status, response.body) == (404, b"")
        assert response.header("content-type") == "application/json"
        return
    error = assert_json_error(response, status=404, code=5, reason="ROUTE_NOT_FOUND")
    assert response.header("allow") is None
    assert error["message"] == "No API route matches this method and path."


async def test_a_cors_preflight_is_still_answered_by_the_cors_policy(gateway: RunningGateway) -> None:
    preflight = await raw_request(
        gateway,
        "OPTIONS",
        "/v1/users/me",
        {"origin": ALLOWED_ORIGIN, "access-control-request-method": "PATCH"},
    )

    assert preflight.status == 200, preflight.body
    assert preflight.header("access-control-allow-origin") == ALLOWED_ORIGIN
    assert "PATCH" in (preflight.header("access-control-allow-methods") or "")
    assert preflight.header("allow") is None


HEAD_PATHS = ["/v1/billing/plans", "/api/billing/plans", "/docs", "/openapi.json", "/livez", "/healthz"]


def comparable_headers(headers: Any) -> list[tuple[str, str]]:
    return sorted((name.lower(), value) for name, value in headers if name.lower() not in PER_REPLY_HEADERS)


@pytest.mark.parametrize("path", HEAD_PATHS)
async def test_head_on_a_get_route_answers_like_get_without_a_body_over_http1(
    gateway: RunningGateway, path: str
) -> None:
    get = await raw_request(gateway, "GET", path)
    head = await raw_request(gateway, "HEAD", path)

    assert get.status == 200, get.body
    assert get.body
    assert head.status == get.status
    assert comparable_headers(head.headers) == comparable_headers(get.headers)
    assert head.body == b""


@pytest.mark.parametrize("path", HEAD_PATHS)
async def test_head_on_a_get_route_answers_like_get_without_a_body_over_http2(
    gateway: RunningGateway, path: str
) -> None:
    # HTTP/2 with prior knowledge: there Envoy's codec would send a body to a HEAD if it were given one.
    async with httpx.AsyncClient(http1=False, http2=True, base_url=gateway.http_url, timeout=10.0) as client:
        get = await client.get(path)
        head = await client.head(path)

    assert (get.http_version, head.http_version) == ("HTTP/2", "HTTP/2")
    assert get.status_code == 200, get.text
    assert head.status_code == get.status_code
    assert comparable_headers(head.headers.multi_items()) == comparable_headers(get.headers.multi_items())
    assert head.content == b""


# Requests Envoy refuses before it routes them, or gives them an id: (raw bytes, status, reason, cause).
REFUSED_BEFORE_ROUTING = [
    (request_bytes("QUERY", "/v1/billing/plans"), 400, "MALFORMED_REQUEST", "query_missing_content_type"),
    (request_bytes("FROB", "/v1/billing/plans"), 400, "MALFORMED_REQUEST", "http1.codec_error"),
    (
        b"GET /v1/billing/plans HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
        400,
        "MALFORMED_REQUEST",
        "http1.codec_error",
    ),
    (
        b"GET /v1/billing/plans HTTP/1.1\r\nConnection: close\r\n\r\n",
        400,
        "MALFORMED_REQUEST",
        "missing_host_header",
    ),
    (b"GET  HTTP/1.1\r\nHost: a\r\n\r\n", 400, "MALFORMED_REQUEST", "http1.codec_error"),
    (
        request_bytes("GET", "/v1/billing/plans", headers={"x-padding": "p" * 70 * 1024}),
        431,
        "REQUEST_REJECTED",
        "http1.headers_too_large",
    ),
]


@pytest.mark.parametrize(
    ("raw", "status", "reason", "cause"),
    REFUSED_BEFORE_ROUTING,
    ids=[
        "query-without-content-type",
        "unknown-method",
        "header-without-colon",
        "no-host",
        "no-path",
        "huge-header",
    ],
)
async def test_a_request_refused_before_routing_gets_a_request_id_and_a_message(
    gateway: RunningGateway, raw: bytes, status: int, reason: str, cause: str
) -> None:
    response = await asyncio.to_thread(send_raw, port_of(gateway), raw)

    body = assert_json_error(response, status=status, code=3, reason=reason)
    assert error_info(body)["metadata"] == {"cause": cause}
    assert body["message"] == (
        "The gateway refused this request before routing it: it is not valid HTTP or breaks a "
        f"protocol limit ({cause})."
    )


async def test_every_refusal_before_routing_has_its_own_request_id(gateway: RunningGateway) -> None:
    raw = request_bytes("FROB", "/v1/billing/plans")

    first, second = [await asyncio.to_thread(send_raw, port_of(gateway), raw) for _ in range(2)]

    assert first.header("x-request-id") != second.header("x-request-id")


async def test_grpc_clients_still_reach_the_services_through_the_gateway(gateway: RunningGateway) -> None:
    listed = await grpcurl("-plaintext", gateway.grpc_target, "list")
    called = await grpcurl("-plaintext", "-d", "{}", gateway.grpc_target, LIST_PLANS.removeprefix("/"))

    assert listed.returncode == 0, listed.stderr
    assert "parley.billing.v1.BillingService" in listed.stdout.split()
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {}


async def test_json_clients_still_reach_the_services_through_the_gateway(gateway: RunningGateway) -> None:
    response = await raw_request(gateway, "GET", "/v1/billing/plans")

    assert response.status == 200, response.body
    assert response.json() == {"plans": [], "next_page_token": ""}
