"""The one credential parser and the one definition of a safe method, and both of their callers: the
gateway's ext_authz check (`EdgeAuthorizer`) and the services' identity resolution
(`IdentityResolver`) read the same headers the same way and refuse them with the same reasons; they
differ only where their policy does (an API key is resolved by the gateway alone)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf import descriptor_pool

from gateway.authz import EdgeAuthorizer
from gateway.descriptors import DescriptorIndex, read_descriptor_set
from parley.auth.v1 import auth_pb2
from parley.common.v1 import common_pb2
from services.common.credentials import (
    ACCESS_TOKEN_COOKIE,
    CSRF_COOKIE,
    CSRF_HEADER,
    Credential,
    check_csrf,
    double_submitted_csrf,
    invalid_token,
    parse_cookies,
    presented_credential,
)
from services.common.errors import (
    ParleyError,
    PermissionDenied,
    Unauthenticated,
    to_status,
    trailing_metadata_for,
)
from services.common.identity import Identity, IdentityResolver
from services.common.roles import role_values
from services.common.safe_methods import SAFE_HTTP_METHODS, SafeMethods, is_safe_http_method
from tests.support.gateway import DESCRIPTOR_SET_PATH

API_KEY = "pk_abcdefghijkl_" + "s" * 43
GOOD_TOKEN = "eyJ.good.token"
AttributeContext = attribute_context_pb2.AttributeContext
# The same call seen by the gateway (HTTP method) and by a service (the gRPC method it is bound to).
SAFE_CALL = ("GET", "/parley.auth.v1.AuthService/GetCurrentUser")  # GET /v1/users/me
UNSAFE_CALL = ("PATCH", "/parley.auth.v1.AuthService/UpdateCurrentUser")  # PATCH /v1/users/me


def refusal(headers: dict[str, str]) -> ParleyError:
    with pytest.raises(ParleyError) as raised:
        presented_credential(headers)
    return raised.value


# ---- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": f"Bearer {API_KEY}"}, Credential("api_key", API_KEY, "authorization")),
        ({"authorization": f"bearer   {API_KEY} "}, Credential("api_key", API_KEY, "authorization")),
        ({"x-api-key": f" {API_KEY}"}, Credential("api_key", API_KEY, "x-api-key")),
        ({"authorization": "Bearer eyJ.a.b"}, Credential("jwt", "eyJ.a.b", "authorization")),
        ({"cookie": f"theme=dark; {ACCESS_TOKEN_COOKIE}=eyJ.c.d"}, Credential("cookie", "eyJ.c.d", "cookie")),
        # The first credential present decides; a failing token is never swapped for another one.
        (
            {"authorization": "Bearer eyJ.a.b", "x-api-key": API_KEY, "cookie": f"{ACCESS_TOKEN_COOKIE}=c"},
            Credential("jwt", "eyJ.a.b", "authorization"),
        ),
        (
            {"x-api-key": API_KEY, "cookie": f"{ACCESS_TOKEN_COOKIE}=c"},
            Credential("api_key", API_KEY, "x-api-key"),
        ),
        # An empty X-API-Key is still the credential presented (auth's format check refuses it).
        ({"x-api-key": ""}, Credential("api_key", "", "x-api-key")),
    ],
)
def test_the_credential_that_decides(headers: dict[str, str], expected: Credential) -> None:
    assert presented_credential(headers) == expected


def test_no_credential_at_all() -> None:
    assert presented_credential({"cookie": f"{CSRF_COOKIE}=x; theme=dark", "authorization": "  "}) is None
    assert presented_credential({}) is None


@pytest.mark.parametrize(
    "authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc", "eyJ.a.b"]
)
def test_a_malformed_authorization_header_is_an_invalid_token(authorization: str) -> None:
    error = refusal({"authorization": authorization, "x-api-key": API_KEY})
    assert (error.reason, error.metadata) == ("TOKEN_INVALID", {"cause": "malformed"})
    assert "Bearer <token>" in error.message


def test_empty_and_conflicting_access_cookies_are_refused() -> None:
    empty = refusal({"cookie": f"{ACCESS_TOKEN_COOKIE}="})
    assert (empty.reason, empty.metadata) == ("TOKEN_INVALID", {"cause": "malformed"})
    conflicting = refusal({"cookie": f"{ACCESS_TOKEN_COOKIE}=a; {ACCESS_TOKEN_COOKIE}=b"})
    assert (conflicting.reason, conflicting.metadata) == ("TOKEN_INVALID", {"cause": "duplicate_cookie"})
    # The same value twice is not a conflict.
    assert presented_credential(
        {"cookie": f"{ACCESS_TOKEN_COOKIE}=a; {ACCESS_TOKEN_COOKIE}=a"}
    ) == Credential("cookie", "a", "cookie")


def test_cookie_header_parsing() -> None:
    assert parse_cookies('a=1; b="two" ;c=3=3; junk; =x; a=4') == {
        "a": ["1", "4"],
        "b": ["two"],
        "c": ["3=3"],
    }


def test_the_double_submitted_csrf_tokens() -> None:
    assert double_submitted_csrf({"cookie": f"{CSRF_COOKIE}=c1; theme=dark", CSRF_HEADER: "h1"}) == (
        "h1",
        "c1",
    )
    assert double_submitted_csrf({}) == ("", "")
    with pytest.raises(PermissionDenied) as conflicting:
        double_submitted_csrf({"cookie": f"{CSRF_COOKIE}=one; {CSRF_COOKIE}=two"})
    assert (conflicting.value.reason, conflicting.value.metadata) == (
        "CSRF_TOKEN_MISMATCH",
        {"cause": "duplicate_cookie"},
    )
    check_csrf("same", "same")
    for header, cookie, reason in [
        ("", "c", "CSRF_TOKEN_MISSING"),
        ("h", "", "CSRF_TOKEN_MISSING"),
        ("h", "H", "CSRF_TOKEN_MISMATCH"),
    ]:
        with pytest.raises(PermissionDenied) as refused:
            check_csrf(header, cookie)
        assert refused.value.reason == reason


# ---- safe methods -------------------------------------------------------------------------------


def test_safe_http_methods() -> None:
    assert {"GET", "HEAD", "OPTIONS"} == SAFE_HTTP_METHODS
    assert is_safe_http_method("get")
    assert is_safe_http_method("OPTIONS")
    for method in ("POST", "PUT", "PATCH", "DELETE", ""):
        assert not is_safe_http_method(method)


def test_a_grpc_method_is_safe_when_bound_to_a_get_rule() -> None:
    is_safe = SafeMethods()
    assert is_safe(SAFE_CALL[1])
    assert not is_safe(UNSAFE_CALL[1])
    assert not is_safe("/parley.auth.v1.AuthInternalService/CheckSession")  # no HTTP rule
    assert not is_safe("/parley.nope.v1.Nothing/Here")  # unknown


def test_the_gateway_retries_exactly_the_calls_the_services_treat_as_safe() -> None:
    """The retry policy (gateway/descriptors.py) and the CSRF rule read the one definition."""
    descriptor_set = read_descriptor_set(DESCRIPTOR_SET_PATH.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_set.file:
        pool.Add(file)
    is_safe = SafeMethods(pool)
    verdicts = {
        f"/{service.full_name}/{method.name}": method.is_read
        for service in DescriptorIndex(descriptor_set).services
        for method in service.methods
    }
    assert {is_safe(name) for name in verdicts} == {True, False}
    assert {name: is_safe(name) for name in verdicts} == verdicts


# ---- both callers, the same headers -------------------------------------------------------------


class FakeVerifier:
    """Accepts GOOD_TOKEN as user u-1; any other token has a bad signature."""

    async def verify(self, token: str) -> Identity:
        if token != GOOD_TOKEN:
            raise invalid_token("The token's signature is not valid.", "signature")
        return Identity(
            user_id="u-1", session_id="s-1", plan="free", roles=frozenset({"user"}), auth_method="jwt"
        )


class FakeAuth:
    """AuthInternalService as the edge calls it: API key `API_KEY` is u-2; a session cookie is verified
    like a token, with the double-submit check on unsafe methods, as the auth servicer does."""

    async def CheckApiKey(self, request: auth_pb2.CheckApiKeyRequest, **_: object) -> Any:
        response = auth_pb2.CheckApiKeyResponse(
            identity=auth_pb2.Identity(user_id="u-2", plan_id="free", roles=role_values(["user"]))
        )
        response.cache_ttl.FromTimedelta(timedelta(seconds=60))
        return response

    async def CheckSession(self, request: auth_pb2.CheckSessionRequest, **_: object) -> Any:
        try:
            identity = await FakeVerifier().verify(request.session_cookie)
            if not is_safe_http_method(request.http_method):
                check_csrf(request.csrf_header, request.csrf_cookie)
        except ParleyError as error:
            # As the error-mapping interceptor sends it: the Status in grpc-status-details-bin.
            raise grpc.aio.AioRpcError(
                error.code,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(*trailing_metadata_for(to_status(error))),
                details=error.message,
            ) from None
        return auth_pb2.CheckSessionResponse(
            identity=auth_pb2.Identity(
                user_id=identity.user_id,
                session_id=identity.session_id,
                plan_id=identity.plan,
                roles=[common_pb2.ROLE_USER],
            )
        )


async def at_the_edge(http_method: str, headers: dict[str, str]) -> str:
    """`allow <auth method>` or the refusal's `REASON[/cause]`, from the edge's CheckResponse."""
    authorizer = EdgeAuthorizer(FakeAuth(), FakeVerifier(), confirmed_age_s=lambda: None)  # type: ignore[arg-type]
    response = await authorizer.check(
        external_auth_pb2.CheckRequest(
            attributes=AttributeContext(
                request=AttributeContext.Request(
                    http=AttributeContext.HttpRequest(id="r-1", method=http_method, headers=headers)
                )
            )
        )
    )
    if response.status.code == 0:
        metadata = dict(response.dynamic_metadata)
        return f"allow {metadata['auth_method']}"
    info = json.loads(response.denied_response.body)["details"][0]
    cause = info.get("metadata", {}).get("cause")
    return f"{info['reason']}/{cause}" if cause else str(info["reason"])


async def in_a_service(grpc_method: str, headers: dict[str, str]) -> str:
    """The same, from a service's identity resolution of a call that needs a user."""
    resolver = IdentityResolver(token_verifier=FakeVerifier())
    try:
        identity = (await resolver.resolve(headers, grpc_method)).require_user()
    except (Unauthenticated, PermissionDenied) as error:
        cause = error.metadata.get("cause")
        return f"{error.reason}/{cause}" if cause else error.reason
    return f"allow {identity.auth_method}"


SESSION = f"{ACCESS_TOKEN_COOKIE}={GOOD_TOKEN}; {CSRF_COOKIE}=c5rf"


@pytest.mark.parametrize(
    ("call", "headers", "edge", "service"),
    [
        (SAFE_CALL, {}, "UNAUTHENTICATED", "UNAUTHENTICATED"),
        (
            SAFE_CALL,
            {"authorization": "Basic dXNlcg=="},
            "TOKEN_INVALID/malformed",
            "TOKEN_INVALID/malformed",
        ),
        (SAFE_CALL, {"authorization": f"Bearer {GOOD_TOKEN}"}, "allow jwt", "allow jwt"),
        (
            SAFE_CALL,
            {"authorization": "Bearer eyJ.forged"},
            "TOKEN_INVALID/signature",
            "TOKEN_INVALID/signature",
        ),
        (SAFE_CALL, {"cookie": SESSION}, "allow cookie", "allow cookie"),
        (UNSAFE_CALL, {"cookie": SESSION}, "CSRF_TOKEN_MISSING/header", "CSRF_TOKEN_MISSING/header"),
        (
            UNSAFE_CALL,
            {"cookie": SESSION, CSRF_HEADER: "other"},
            "CSRF_TOKEN_MISMATCH",
            "CSRF_TOKEN_MISMATCH",
        ),
        (UNSAFE_CALL, {"cookie": SESSION, CSRF_HEADER: "c5rf"}, "allow cookie", "allow cookie"),
        (
            UNSAFE_CALL,
            {"cookie": f"{SESSION}; {CSRF_COOKIE}=again", CSRF_HEADER: "c5rf"},
            "CSRF_TOKEN_MISMATCH/duplicate_cookie",
            "CSRF_TOKEN_MISMATCH/duplicate_cookie",
        ),
        (
            SAFE_CALL,
            {"cookie": f"{ACCESS_TOKEN_COOKIE}="},
            "TOKEN_INVALID/malformed",
            "TOKEN_INVALID/malformed",
        ),
        (
            SAFE_CALL,
            {"cookie": f"{ACCESS_TOKEN_COOKIE}=a; {ACCESS_TOKEN_COOKIE}=b"},
            "TOKEN_INVALID/duplicate_cookie",
            "TOKEN_INVALID/duplicate_cookie",
        ),
        # A bearer token wins over a cookie, and needs no CSRF token.
        (
            UNSAFE_CALL,
            {"authorization": f"Bearer {GOOD_TOKEN}", "cookie": "garbage"},
            "allow jwt",
            "allow jwt",
        ),
        # The policies differ here: only the gateway resolves API keys (with the auth service).
        (SAFE_CALL, {"x-api-key": API_KEY}, "allow api_key", "TOKEN_INVALID/malformed"),
        (SAFE_CALL, {"authorization": f"Bearer {API_KEY}"}, "allow api_key", "TOKEN_INVALID/malformed"),
    ],
)
async def test_the_gateway_and_the_services_read_credentials_alike(
    call: tuple[str, str], headers: dict[str, str], edge: str, service: str
) -> None:
    http_method, grpc_method = call
    assert await at_the_edge(http_method, headers) == edge
    assert await in_a_service(grpc_method, headers) == service
