"""The public edge through the real gateway (`parley up`: Envoy, the edge server, every service):
authentication at the edge, error and header hygiene, CORS, TLS, gRPC-Web, versions and caching."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from parley.billing.v1 import billing_pb2, billing_pb2_grpc
from services.common.errors import details_of
from tests.support.gateway import free_port
from tests.support.outbox import read_events
from tests.support.parley_process import EmbeddedPorts, ParleyProcess
from tests.support.polling import eventually_sync
from tests.support.tls import self_signed_certificate

pytestmark = pytest.mark.envoy

ALLOWED_ORIGIN = "https://app.parley.example"
PASSWORD = "violet-harbour-lantern-42"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@dataclass(frozen=True)
class Edge:
    http: httpx.Client
    https: httpx.Client
    ports: EmbeddedPorts
    https_port: int
    data_dir: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.http}"


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    data_dir = tmp_path_factory.mktemp("parley-edge")
    cert_path, key_path = self_signed_certificate(data_dir)
    ports = EmbeddedPorts()
    https_port = free_port()
    process = ParleyProcess(
        ["up"],
        env={
            **ports.env(),
            "PARLEY_DATA_DIR": str(data_dir),
            "PARLEY_CORS_ALLOWED_ORIGINS": f"{ALLOWED_ORIGIN}, http://localhost:5173",
            "PARLEY_TLS_CERT_FILE": str(cert_path),
            "PARLEY_TLS_KEY_FILE": str(key_path),
            "PARLEY_HTTPS_PORT": str(https_port),
        },
        log_path=data_dir / "parley.log",
    )
    process.start()
    try:
        process.wait_until_http_ok(f"http://127.0.0.1:{ports.http}/healthz")
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=15.0) as http,
            httpx.Client(
                base_url=f"https://127.0.0.1:{https_port}",
                timeout=15.0,
                verify=ssl.create_default_context(cafile=str(cert_path)),
            ) as https,
        ):
            yield Edge(http, https, ports, https_port, data_dir)
    finally:
        process.terminate()


def error_of(response: httpx.Response, *, status: int, code: int, reason: str) -> dict[str, Any]:
    """The one error shape: code, message, details (ErrorInfo + RequestInfo = x-request-id)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["message"], body
    info = next(d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
    assert (info["reason"], info["domain"]) == (reason, "parley.dev"), body
    request_info = next(d for d in body["details"] if d["@type"].endswith("google.rpc.RequestInfo"))
    assert request_info["request_id"] == response.headers["x-request-id"]
    return body


def signed_in(edge: Edge, label: str) -> dict[str, str]:
    """A new account's bearer header."""
    email = f"{label}-{uuid.uuid4().hex[:10]}@example.com"
    registered = edge.http.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": label}
    )
    assert registered.status_code == 200, registered.text
    login = edge.http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return {"authorization": f"Bearer {login.json()['tokens']['access_token']}"}


# ---- edge authentication ------------------------------------------------------------------------


def test_a_protected_route_without_credentials_is_a_json_401_from_the_gateway(edge: Edge) -> None:
    response = edge.http.get("/v1/users/me")
    body = error_of(response, status=401, code=16, reason="UNAUTHENTICATED")
    assert "API key" in body["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_open_routes_need_no_credentials(edge: Edge) -> None:
    for path in (
        "/v1/billing/plans",
        "/.well-known/jwks.json",
        "/healthz",
        "/docs",
        "/openapi.json",
        "/livez",
    ):
        response = edge.http.get(path)
        assert response.status_code == 200, (path, response.text)


def test_jwt_api_key_and_cookie_reach_the_service_as_one_identity(edge: Edge) -> None:
    headers = signed_in(edge, "three-ways")
    me = edge.http.get("/v1/users/me", headers=headers)
    assert me.status_code == 200, me.text
    user_id = me.json()["user"]["id"]

    key = edge.http.post("/v1/users/me/api-keys", json={"name": "edge"}, headers=headers)
    assert key.status_code == 200, key.text
    secret = key.json()["secret"]
    for key_headers in ({"authorization": f"Bearer {secret}"}, {"x-api-key": secret}):
        as_key = edge.http.get("/v1/users/me", headers=key_headers)
        assert as_key.status_code == 200, as_key.text
        assert as_key.json()["user"]["id"] == user_id

    wrong_key = edge.http.get("/v1/users/me", headers={"x-api-key": "pk_" + "x" * 40})
    error_of(wrong_key, status=401, code=16, reason="API_KEY_INVALID")


def test_a_forged_bearer_token_is_refused_at_the_edge_with_its_reason(edge: Edge) -> None:
    headers = signed_in(edge, "forged")
    header, payload, _signature = headers["authorization"].removeprefix("Bearer ").split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'not-a-signature').decode().rstrip('=')}"
    response = edge.http.get("/v1/users/me", headers={"authorization": f"Bearer {forged}"})
    body = error_of(response, status=401, code=16, reason="TOKEN_INVALID")
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["metadata"]["cause"] == "signature"


def test_a_missing_role_is_a_json_403_naming_the_role(edge: Edge) -> None:
    response = edge.http.get("/v1/admin/users", headers=signed_in(edge, "not-admin"))
    body = error_of(response, status=403, code=7, reason="PERMISSION_DENIED")
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["metadata"] == {"role": "admin"}


def test_grpc_callers_get_the_same_refusal_as_a_rich_status(edge: Edge) -> None:
    with grpc.insecure_channel(edge.grpc_target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), timeout=10)
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    status = rpc_status.from_call(error)
    assert status is not None
    info = details_of(status)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "UNAUTHENTICATED"


# ---- one error shape, clean and hardened headers --------------------------------------------------


def test_every_gateway_error_has_the_one_shape_and_the_security_headers(edge: Edge) -> None:
    cases = [
        (
            edge.http.post(
                "/v1/auth/login", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
        ),
        (edge.http.get("/v1/users/me"), 401),
        (edge.http.get("/v1/admin/users", headers=signed_in(edge, "shape")), 403),
        (edge.http.get("/v1/no-such-thing"), 404),
        (edge.http.post("/v1/auth/login", content=b"email=a", headers={"content-type": "text/plain"}), 415),
        (edge.http.post("/v1/auth/register", content=b"x" * (2 * 1024 * 1024)), 413),
        (edge.http.get("/api/billing/plans", headers={"parley-api-version": "9"}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        body = response.json()
        assert set(body) == {"code", "message", "details"}, body
        assert any(d["@type"].endswith("RequestInfo") for d in body["details"])
        assert_clean_headers(response)


def assert_clean_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert "x-request-id" in response.headers
    assert "server" not in response.headers
    assert not [name for name in response.headers if name.startswith(("grpc-", "x-envoy-"))], response.headers
    assert "strict-transport-security" not in response.headers  # plain HTTP: HSTS only over TLS


def test_successful_json_answers_are_clean_too(edge: Edge) -> None:
    response = edge.http.get("/v1/billing/plans")
    assert response.status_code == 200
    assert_clean_headers(response)
    assert response.headers["parley-api-version"] == "v1"


def test_the_docs_page_has_its_own_content_security_policy(edge: Edge) -> None:
    page = edge.http.get("/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert "style-src 'unsafe-inline'" in page.headers["content-security-policy"]
    assert "/v1/billing/plans" in page.text
    openapi = edge.http.get("/openapi.json").json()
    assert openapi["openapi"].startswith("3.1")


# ---- CORS ---------------------------------------------------------------------------------------


def test_cors_preflight_from_an_allowed_origin_allows_credentials(edge: Edge) -> None:
    preflight = edge.http.options(
        "/v1/users/me",
        headers={
            "origin": ALLOWED_ORIGIN,
            "access-control-request-method": "PATCH",
            "access-control-request-headers": "content-type, x-csrf-token",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
    assert "x-csrf-token" in preflight.headers["access-control-allow-headers"]

    actual = edge.http.get("/v1/billing/plans", headers={"origin": ALLOWED_ORIGIN})
    assert actual.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in actual.headers["access-control-expose-headers"]
    # A refusal is readable by the page too, so it can show the error.
    refused = edge.http.get("/v1/users/me", headers={"origin": ALLOWED_ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_cors_refuses_an_origin_off_the_list(edge: Edge) -> None:
    preflight = edge.http.options(
        "/v1/users/me",
        headers={"origin": "https://evil.example", "access-control-request-method": "GET"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    actual = edge.http.get("/v1/billing/plans", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in actual.headers


# ---- TLS ----------------------------------------------------------------------------------------


def test_tls_listener_serves_json_with_hsts(edge: Edge) -> None:
    response = edge.https.get("/v1/billing/plans")
    assert response.status_code == 200, response.text
    assert response.headers["strict-transport-security"].startswith("max-age=")
    error = edge.https.get("/v1/users/me")
    assert error.status_code == 401
    assert "strict-transport-security" in error.headers


def test_tls_listener_serves_grpc_over_h2(edge: Edge) -> None:
    certificate = (edge.data_dir / "cert.pem").read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
    with grpc.secure_channel(
        f"127.0.0.1:{edge.https_port}", credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        plans = billing_pb2_grpc.BillingServiceStub(channel).ListPlans(
            billing_pb2.ListPlansRequest(), timeout=10
        )
    assert {plan.id for plan in plans.plans} >= {"free", "pro", "team"}


# ---- gRPC-Web -----------------------------------------------------------------------------------


def grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        frames.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return frames


def test_grpc_web_clients_reach_public_services(edge: Edge) -> None:
    message = billing_pb2.ListPlansRequest().SerializeToString()
    response = edge.http.post(
        "/parley.billing.v1.BillingService/ListPlans",
        content=struct.pack(">BI", 0, len(message)) + message,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "origin": ALLOWED_ORIGIN},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/grpc-web")
    frames = grpc_web_frames(response.content)
    data = [payload for flags, payload in frames if flags == 0]
    trailers = [payload for flags, payload in frames if flags & 0x80]
    plans = billing_pb2.ListPlansResponse.FromString(data[0])
    assert {plan.id for plan in plans.plans} >= {"free", "pro", "team"}
    assert b"grpc-status:0" in trailers[0].replace(b" ", b"")


# ---- logs and traces ----------------------------------------------------------------------------


def access_log_entries(edge: Edge, request_id: str) -> list[dict[str, Any]]:
    """Envoy's access-log entries (JSON lines with a path) for one request, once Envoy flushed them."""

    def logged() -> list[dict[str, Any]]:
        lines = (edge.data_dir / "parley.log").read_text(errors="replace").splitlines()
        entries = (json.loads(line) for line in lines if request_id in line and line.startswith("{"))
        return [entry for entry in entries if "path" in entry]

    # Envoy flushes its access log every second.
    return eventually_sync(logged, what=f"the access log of request {request_id}", interval_s=0.2)


def test_access_logs_are_json_with_request_and_trace_ids(edge: Edge) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    email = f"traced-{uuid.uuid4().hex[:10]}@example.com"
    response = edge.http.post(
        "/v1/auth/register",
        json={"email": email, "password": PASSWORD, "display_name": "Traced"},
        headers={"traceparent": traceparent},
    )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    entries = access_log_entries(edge, request_id)
    access = [entry for entry in entries if entry["path"] == "/v1/auth/register"]
    assert access, entries
    assert access[0]["trace_id"] == trace_id
    assert access[0]["grpc_path"] == "/parley.auth.v1.AuthService/Register"
    # The service saw the same trace: the event its write produced carries it onward.
    user_id = response.json()["user"]["id"]
    (registered,) = read_events(edge.data_dir / "parley.db", "user.registered", user_id)
    assert registered.trace_context.traceparent.split("-")[1] == trace_id


def test_a_request_without_traceparent_still_gets_a_logged_trace_id(edge: Edge) -> None:
    request_id = edge.http.get("/v1/billing/plans").headers["x-request-id"]
    logged = access_log_entries(edge, request_id)
    assert len(logged[0]["trace_id"]) == 32 and int(logged[0]["trace_id"], 16) != 0


# ---- versions -----------------------------------------------------------------------------------


def test_v1_chat_is_deprecated_with_a_sunset_and_a_successor(edge: Edge) -> None:
    v1 = edge.http.get("/v1/models")
    assert v1.status_code == 200, v1.text
    assert v1.headers["parley-api-version"] == "v1"
    assert v1.headers["deprecation"].startswith("@")
    sunset = parsedate_to_datetime(v1.headers["sunset"])
    assert sunset > dt.datetime.fromtimestamp(int(v1.headers["deprecation"][1:]), dt.UTC)
    assert v1.headers["link"] == '</v2/models>; rel="successor-version"'

    v2 = edge.http.get("/v2/models")
    assert v2.status_code == 200, v2.text
    assert v2.headers["parley-api-version"] == "v2"
    assert "deprecation" not in v2.headers
    assert v1.json() != v2.json()


def test_unversioned_paths_follow_the_version_header_or_the_newest_stable(edge: Edge) -> None:
    newest = edge.http.get("/api/models")
    assert newest.status_code == 200, newest.text
    assert newest.headers["parley-api-version"] == "v2"
    assert newest.headers["vary"].lower() == "parley-api-version"
    assert newest.json() == edge.http.get("/v2/models").json()

    for asked in ("1", "v1", "V1"):
        pinned = edge.http.get("/api/models", headers={"parley-api-version": asked})
        assert pinned.headers["parley-api-version"] == "v1", asked
        assert pinned.json() == edge.http.get("/v1/models").json()

    only_v1 = edge.http.get("/api/billing/plans")
    assert only_v1.status_code == 200 and only_v1.headers["parley-api-version"] == "v1"

    unknown = edge.http.get("/api/models", headers={"parley-api-version": "7"})
    body = error_of(unknown, status=400, code=3, reason="UNSUPPORTED_API_VERSION")
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["metadata"] == {"requested_version": "v7"}


# ---- caching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/billing/plans", "/v2/models", "/.well-known/jwks.json"])
def test_cacheable_reads_carry_an_etag_and_answer_if_none_match_with_304(edge: Edge, path: str) -> None:
    first = edge.http.get(path)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert "max-age=" in first.headers["cache-control"]

    again = edge.http.get(path, headers={"if-none-match": etag})
    assert again.status_code == 304, again.text
    assert again.content == b""
    assert again.headers["etag"] == etag

    for other in ('"something-else"', f'W/{etag}, "x"'):
        revalidated = edge.http.get(path, headers={"if-none-match": other})
        assert revalidated.status_code == (304 if etag in other else 200), other


def test_json_routes_take_json_and_webhooks_take_any_media_type(edge: Edge) -> None:
    login = b'{"email": "nobody@example.com", "password": "not-the-password-1"}'
    for media_type in ("application/json", "application/json; charset=utf-8", "application/merge-patch+json"):
        response = edge.http.post("/v1/auth/login", content=login, headers={"content-type": media_type})
        error_of(response, status=401, code=16, reason="INVALID_CREDENTIALS")
    form = edge.http.post(
        "/v1/auth/login", content=b"email=a", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    body = error_of(form, status=415, code=3, reason="UNSUPPORTED_MEDIA_TYPE")
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["metadata"] == {"content_type": "application/x-www-form-urlencoded"}
    # A webhook's body reaches billing byte for byte whatever its type (the signature covers it).
    webhook = edge.http.post(
        "/v1/billing/webhooks/stripe", content=b"t=1,v1=abc", headers={"content-type": "text/plain"}
    )
    assert webhook.status_code != 415, webhook.text
