"""The pure parts of the edge authorizer: reading Envoy's CheckRequest headers, picking the credential,
the identity-header encodings, the answer cache and what makes it forget or refuse to answer, and
the shapes of allow and deny responses.

One group drives `EdgeAuthorizer` with a stand-in for `AuthInternalService`: the real auth never
lets a cookie session be cached (its `cache_ttl` is 0), so the CSRF check on a cached session can
only be reached this way; and the feed's age is a number the test sets.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import jwt
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from gateway.authz import (
    Denial,
    EdgeAuthorizer,
    EdgeIdentity,
    allowed_response,
    denied_response,
    request_headers,
    secret_digest,
    token_time_headers,
)
from parley.auth.v1 import auth_pb2
from parley.common.v1 import common_pb2
from services.common.credentials import ACCESS_TOKEN_COOKIE, CSRF_COOKIE, Credential
from services.common.errors import PermissionDenied, Unauthenticated, details_of
from services.common.identity import (
    Identity,
    decode_roles_header,
    encode_roles_header,
)
from services.common.roles import ordered_roles, role_names

API_KEY = "pk_abcdefghijkl_" + "s" * 43
AttributeContext = attribute_context_pb2.AttributeContext
HttpRequest = AttributeContext.HttpRequest


def header_values(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


# ---- headers ---------------------------------------------------------------------------------------


def test_headers_come_from_the_map_lower_cased() -> None:
    http = HttpRequest(headers={"X-API-Key": API_KEY, "cookie": "a=1; b=2", ":method": "GET"})
    assert request_headers(http) == {"x-api-key": API_KEY, "cookie": "a=1; b=2", ":method": "GET"}


def test_raw_header_maps_join_repeats_as_envoy_does() -> None:
    http = HttpRequest(
        header_map=base_pb2.HeaderMap(
            headers=[
                base_pb2.HeaderValue(key="Cookie", raw_value=b"a=1"),
                base_pb2.HeaderValue(key="cookie", raw_value=b"b=2"),
                base_pb2.HeaderValue(key="accept", value="text/html"),
                base_pb2.HeaderValue(key="accept", raw_value=b"application/json"),
            ]
        ),
        headers={"ignored": "when a raw map is present"},
    )
    assert request_headers(http) == {"cookie": "a=1; b=2", "accept": "text/html,application/json"}


# ---- encodings ----------------------------------------------------------------------------------


def test_roles_follow_the_contract_order_as_tokens_do() -> None:
    assert ordered_roles({"admin", "user"}) == ("user", "admin")
    assert ordered_roles(["zeta", "admin", "alpha", "user", "admin"]) == ("user", "admin", "alpha", "zeta")
    assert role_names([common_pb2.ROLE_ADMIN, common_pb2.ROLE_UNSPECIFIED, common_pb2.ROLE_USER]) == (
        "user",
        "admin",
    )


def test_the_time_claims_are_read_from_the_token_as_jwt_authn_copies_them() -> None:
    claims = {"sub": "u", "iat": 1_800_000_000, "nbf": 1_800_000_000, "exp": 1_800_000_900}
    token = jwt.encode(claims, "k" * 32, algorithm="HS256")
    assert token_time_headers(token) == {
        "x-parley-token-issued-at": "1800000000",
        "x-parley-token-not-before": "1800000000",
        "x-parley-token-expires-at": "1800000900",
    }
    # A claim that is absent, or not whole seconds, gets no header: the services refuse the identity.
    odd = jwt.encode({"sub": "u", "iat": 1.5e9, "nbf": True, "exp": "soon"}, "k" * 32, algorithm="HS256")
    assert token_time_headers(odd) == {}
    assert token_time_headers(jwt.encode({"sub": "u"}, "k" * 32, algorithm="HS256")) == {}
    assert token_time_headers("not a token") == {}


def test_cache_keys_never_contain_the_secret() -> None:
    digest = secret_digest("api_key", API_KEY)
    assert API_KEY not in digest
    assert len(digest) == 64
    assert digest == secret_digest("api_key", API_KEY)
    assert digest != secret_digest("cookie", API_KEY)


# ---- the answer cache ---------------------------------------------------------------------------


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FeedAge:
    """How long ago the credential-change feed was confirmed current, as the test says."""

    def __init__(self, age_s: float | None = 0.0) -> None:
        self.age_s = age_s

    def __call__(self) -> float | None:
        return self.age_s


class CountingApiKeys:
    """Stands in for AuthInternalService.CheckApiKey: every key is a user, cached for `ttl_s`.
    `during_call` runs while a call is in flight (to land a change there)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.calls: list[str] = []
        self.skipped_cache: list[bool] = []
        self.during_call: Callable[[], object] = lambda: None

    async def CheckApiKey(
        self, request: auth_pb2.CheckApiKeyRequest, **_: object
    ) -> auth_pb2.CheckApiKeyResponse:
        self.calls.append(request.api_key)
        self.skipped_cache.append(request.skip_cache)
        self.during_call()
        response = auth_pb2.CheckApiKeyResponse(
            identity=auth_pb2.Identity(user_id=owner_of(request.api_key), roles=[common_pb2.ROLE_USER])
        )
        response.cache_ttl.FromTimedelta(timedelta(seconds=self.ttl_s))
        return response


def owner_of(api_key: str) -> str:
    return f"owner-of-{api_key}"


async def test_allowed_answers_expire_after_the_ttl_auth_gives() -> None:
    clock = FakeMonotonic()
    keys = CountingApiKeys(ttl_s=30)
    authorizer = EdgeAuthorizer(keys, NoTokens(), confirmed_age_s=FeedAge(), monotonic=clock)  # type: ignore[arg-type]
    request = check_request("GET", {"x-api-key": API_KEY})
    await authorizer.check(request)
    clock.now += 29.9
    assert (await authorizer.check(request)).status.code == 0
    assert len(keys.calls) == 1
    clock.now += 0.1
    await authorizer.check(request)
    assert len(keys.calls) == 2
    # A TTL of zero means "do not cache".
    keys.ttl_s = 0
    uncached = check_request("GET", {"x-api-key": "pk_uncached"})
    await authorizer.check(uncached)
    await authorizer.check(uncached)
    assert keys.calls[2:] == ["pk_uncached", "pk_uncached"]


async def test_the_answer_cache_is_bounded_and_evicts_the_least_recently_used() -> None:
    keys = CountingApiKeys(ttl_s=60)
    authorizer = EdgeAuthorizer(
        keys,  # type: ignore[arg-type]
        NoTokens(),
        confirmed_age_s=FeedAge(),
        cache_entries=3,
        monotonic=FakeMonotonic(),
    )

    async def check(key: str) -> None:
        assert (await authorizer.check(check_request("GET", {"x-api-key": key}))).status.code == 0

    for key in ("pk_0", "pk_1", "pk_2", "pk_0", "pk_3"):  # pk_0 is used again, so pk_1 is the oldest
        await check(key)
    assert keys.calls == ["pk_0", "pk_1", "pk_2", "pk_3"]
    await check("pk_1")  # evicted: asked again, which evicts pk_2
    for key in ("pk_0", "pk_3", "pk_1"):
        await check(key)
    assert keys.calls == ["pk_0", "pk_1", "pk_2", "pk_3", "pk_1"]


# ---- what the cache may answer --------------------------------------------------------------------


async def checks_reaching_auth(authorizer: EdgeAuthorizer, keys: CountingApiKeys, key: str = API_KEY) -> int:
    """Check `key` once and say how many checks so far reached auth."""
    assert (await authorizer.check(check_request("GET", {"x-api-key": key}))).status.code == 0
    return len(keys.calls)


@pytest.mark.parametrize(
    ("age_s", "answered_from_the_cache"),
    [(0.0, True), (0.99, True), (1.0, False), (None, False)],
)
async def test_cached_answers_are_used_only_while_the_feed_is_confirmed_within_a_second(
    age_s: float | None, answered_from_the_cache: bool
) -> None:
    keys = CountingApiKeys(ttl_s=30)
    feed = FeedAge(0.0)
    registry = CollectorRegistry()
    authorizer = EdgeAuthorizer(
        keys,  # type: ignore[arg-type]
        NoTokens(),
        confirmed_age_s=feed,
        registry=registry,
        monotonic=FakeMonotonic(),
    )
    await checks_reaching_auth(authorizer, keys)

    feed.age_s = age_s
    assert await checks_reaching_auth(authorizer, keys) == (1 if answered_from_the_cache else 2)
    outcome = "hit" if answered_from_the_cache else "unconfirmed"
    assert metric(registry, "parley_edge_authz_cache_lookups_total", credential="api_key", outcome=outcome)


async def test_a_change_to_a_user_makes_the_edge_forget_that_users_answers_only() -> None:
    keys = CountingApiKeys(ttl_s=600)
    clock = FakeMonotonic()
    authorizer = EdgeAuthorizer(keys, NoTokens(), confirmed_age_s=FeedAge(), monotonic=clock)  # type: ignore[arg-type]
    await checks_reaching_auth(authorizer, keys, "pk_a")
    await checks_reaching_auth(authorizer, keys, "pk_b")

    assert authorizer.decisions.forget_user(owner_of("pk_a")) == 1
    clock.now += 60  # past the settle window (the answer had no change to wait out here anyway)
    assert await checks_reaching_auth(authorizer, keys, "pk_b") == 2
    assert await checks_reaching_auth(authorizer, keys, "pk_a") == 3
    assert await checks_reaching_auth(authorizer, keys, "pk_a") == 3

    assert authorizer.decisions.forget_everything() == 2
    assert await checks_reaching_auth(authorizer, keys, "pk_b") == 4


async def test_an_answer_a_change_overtook_is_used_once_and_not_cached() -> None:
    keys = CountingApiKeys(ttl_s=30)
    clock = FakeMonotonic()
    authorizer = EdgeAuthorizer(keys, NoTokens(), confirmed_age_s=FeedAge(), monotonic=clock)  # type: ignore[arg-type]
    keys.during_call = lambda: authorizer.decisions.forget_user(owner_of(API_KEY))

    assert await checks_reaching_auth(authorizer, keys) == 1
    keys.during_call = lambda: None
    assert await checks_reaching_auth(authorizer, keys) == 2, "the first answer was not kept"


async def test_answers_about_a_user_who_just_changed_are_not_cached_for_two_seconds() -> None:
    # Another auth replica may still answer from its own cache, up to a second behind the feed.
    keys = CountingApiKeys(ttl_s=30)
    clock = FakeMonotonic()
    authorizer = EdgeAuthorizer(keys, NoTokens(), confirmed_age_s=FeedAge(), monotonic=clock)  # type: ignore[arg-type]
    authorizer.decisions.forget_user(owner_of(API_KEY))

    clock.now += 1.9
    assert await checks_reaching_auth(authorizer, keys) == 1
    assert await checks_reaching_auth(authorizer, keys) == 2
    clock.now += 0.2
    assert await checks_reaching_auth(authorizer, keys) == 3
    assert await checks_reaching_auth(authorizer, keys) == 3


CREATE_API_KEY = "/parley.auth.v1.AuthService/CreateApiKey"


async def test_sensitive_methods_are_checked_afresh_by_auth_every_time() -> None:
    keys = CountingApiKeys(ttl_s=30)
    registry = CollectorRegistry()
    authorizer = EdgeAuthorizer(
        keys,  # type: ignore[arg-type]
        NoTokens(),
        confirmed_age_s=FeedAge(),
        sensitive_paths=frozenset({CREATE_API_KEY}),
        registry=registry,
        monotonic=FakeMonotonic(),
    )
    await checks_reaching_auth(authorizer, keys)
    assert await checks_reaching_auth(authorizer, keys) == 1, "cached for ordinary methods"

    for path in (CREATE_API_KEY, f"{CREATE_API_KEY}?alt=json"):
        request = check_request("POST", {"x-api-key": API_KEY}, path=path)
        assert (await authorizer.check(request)).status.code == 0
    assert keys.skipped_cache == [False, True, True]
    assert (
        metric(registry, "parley_edge_authz_cache_lookups_total", credential="api_key", outcome="sensitive")
        == 2
    )


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---- response shapes ----------------------------------------------------------------------------

ADMIN = EdgeIdentity(
    user_id="u-1",
    session_id="s-1",
    plan="pro",
    roles=("user", "admin"),
    auth_method="cookie",
    token_times={
        "x-parley-token-issued-at": "1800000000",
        "x-parley-token-not-before": "1800000000",
        "x-parley-token-expires-at": "1800000900",
    },
)


def test_an_allow_sets_every_identity_header_and_the_metadata() -> None:
    response = allowed_response(ADMIN, Credential("cookie", "eyJ", "cookie"))
    assert response.status.code == 0
    assert header_values(response.ok_response.headers) == {
        "x-parley-user-id": "u-1",
        "x-parley-session-id": "s-1",
        "x-parley-plan": "pro",
        "x-parley-roles": encode_roles_header(["user", "admin"]),
        "x-parley-auth-method": "cookie",
        "x-parley-token-issued-at": "1800000000",
        "x-parley-token-not-before": "1800000000",
        "x-parley-token-expires-at": "1800000900",
    }
    roles = header_values(response.ok_response.headers)["x-parley-roles"]
    assert decode_roles_header(roles) == {"user", "admin"}
    assert {option.append_action for option in response.ok_response.headers} == {
        base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    }
    assert list(response.ok_response.headers_to_remove) == ["x-api-key"]
    assert MessageToDict(response.dynamic_metadata) == {
        "roles": ["user", "admin"],
        "user_id": "u-1",
        "auth_method": "cookie",
    }


def test_an_api_key_allow_removes_the_key_and_the_headers_it_cannot_fill() -> None:
    identity = EdgeIdentity(user_id="u-2", session_id="", plan="free", roles=("user",), auth_method="api_key")
    response = allowed_response(identity, Credential("api_key", API_KEY, "authorization"))
    assert set(header_values(response.ok_response.headers)) == {
        "x-parley-user-id",
        "x-parley-plan",
        "x-parley-roles",
        "x-parley-auth-method",
    }
    assert list(response.ok_response.headers_to_remove) == [
        "x-parley-session-id",
        "x-parley-token-issued-at",
        "x-parley-token-not-before",
        "x-parley-token-expires-at",
        "x-api-key",
        "authorization",
    ]


def test_a_json_denial_carries_the_full_status_and_a_challenge() -> None:
    error = Unauthenticated("The token has expired.", reason="TOKEN_EXPIRED")
    response = denied_response(
        Denial.of(error, credential_refused=True), request_id="req-7", grpc_client=False
    )
    denied = response.denied_response
    assert denied.status.code == 401
    assert header_values(denied.headers) == {
        "www-authenticate": 'Bearer realm="parley", error="invalid_token"',
        "content-type": "application/json",
    }
    assert json.loads(denied.body) == {
        "code": 16,
        "message": "The token has expired.",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "TOKEN_EXPIRED",
                "domain": "parley.dev",
            },
            {"@type": "type.googleapis.com/google.rpc.RequestInfo", "request_id": "req-7"},
        ],
    }
    assert response.status.code == 16


def test_a_grpc_denial_carries_the_status_in_details_bin() -> None:
    error = PermissionDenied("The CSRF token does not match.", reason="CSRF_TOKEN_MISMATCH")
    response = denied_response(
        Denial.of(error, credential_refused=True), request_id="req-8", grpc_client=True
    )
    denied = response.denied_response
    assert (denied.status.code, denied.body) == (403, "The CSRF token does not match.")
    headers = header_values(denied.headers)
    assert set(headers) == {"grpc-status-details-bin"}  # a 403 has no challenge, gRPC no JSON type
    status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    assert (status.code, status.message) == (7, "The CSRF token does not match.")
    details = details_of(status)
    info, request_info = details["ErrorInfo"], details["RequestInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert isinstance(request_info, error_details_pb2.RequestInfo)
    assert (info.reason, request_info.request_id) == ("CSRF_TOKEN_MISMATCH", "req-8")


def test_no_credential_gets_a_plain_challenge() -> None:
    denial = Denial.of(Unauthenticated("Sign in."), credential_refused=False)
    denied = denied_response(denial, request_id="", grpc_client=False).denied_response
    assert header_values(denied.headers)["www-authenticate"] == 'Bearer realm="parley"'
    assert [detail["@type"] for detail in json.loads(denied.body)["details"]] == [
        "type.googleapis.com/google.rpc.ErrorInfo"
    ]


# ---- the authorizer with a cacheable session ----------------------------------------------------


class CacheableSessions:
    """Stands in for AuthInternalService.CheckSession with a positive cache_ttl, counting calls."""

    def __init__(self) -> None:
        self.calls: list[auth_pb2.CheckSessionRequest] = []

    async def CheckSession(
        self, request: auth_pb2.CheckSessionRequest, **_: object
    ) -> auth_pb2.CheckSessionResponse:
        self.calls.append(request)
        if request.http_method != "GET" and request.csrf_header != request.csrf_cookie:
            raise AssertionError("the cached path must not need auth for CSRF")
        response = auth_pb2.CheckSessionResponse(
            identity=auth_pb2.Identity(
                user_id="u-3", session_id="s-3", plan_id="free", roles=[common_pb2.ROLE_USER]
            )
        )
        response.cache_ttl.FromTimedelta(timedelta(seconds=60))
        return response


class NoTokens:
    async def verify(self, token: str) -> Identity:
        raise AssertionError("no bearer token in these requests")


def check_request(
    method: str, headers: dict[str, str], *, path: str = "/parley.auth.v1.AuthService/X"
) -> Any:
    return external_auth_pb2.CheckRequest(
        attributes=AttributeContext(
            request=AttributeContext.Request(
                http=HttpRequest(id="req-9", method=method, path=path, headers=headers)
            )
        )
    )


async def test_a_cached_session_still_checks_csrf_on_unsafe_methods() -> None:
    sessions = CacheableSessions()
    authorizer = EdgeAuthorizer(sessions, NoTokens(), confirmed_age_s=FeedAge())  # type: ignore[arg-type]
    cookie = f"{ACCESS_TOKEN_COOKIE}=eyJ.session.token; {CSRF_COOKIE}=csrf-1"
    first = await authorizer.check(check_request("GET", {"cookie": cookie}))
    assert first.status.code == 0
    assert len(sessions.calls) == 1

    forged = await authorizer.check(check_request("POST", {"cookie": cookie, "x-csrf-token": "other"}))
    assert forged.denied_response.status.code == 403
    assert json.loads(forged.denied_response.body)["details"][0]["reason"] == "CSRF_TOKEN_MISMATCH"
    missing = await authorizer.check(check_request("DELETE", {"cookie": cookie}))
    assert json.loads(missing.denied_response.body)["details"][0]["reason"] == "CSRF_TOKEN_MISSING"
    matching = await authorizer.check(check_request("POST", {"cookie": cookie, "x-csrf-token": "csrf-1"}))
    assert matching.status.code == 0
    assert header_values(matching.ok_response.headers)["x-parley-user-id"] == "u-3"
    # Every answer after the first came from the cache.
    assert len(sessions.calls) == 1


class RefusingSessions:
    def __init__(self, reason: str, code: grpc.StatusCode) -> None:
        self.reason, self.code, self.calls = reason, code, 0

    async def CheckSession(
        self, request: auth_pb2.CheckSessionRequest, **_: object
    ) -> auth_pb2.CheckSessionResponse:
        self.calls += 1
        status = status_pb2.Status(code=self.code.value[0], message="refused")
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain="parley.dev"))
        raise grpc.aio.AioRpcError(
            self.code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
            details="refused",
        )


@pytest.mark.parametrize(
    ("reason", "code", "calls_for_three_checks"),
    [
        ("SESSION_REVOKED", grpc.StatusCode.UNAUTHENTICATED, 1),  # denial cached (for at most 1 s)
        ("CSRF_TOKEN_MISMATCH", grpc.StatusCode.PERMISSION_DENIED, 3),  # per request: never cached
    ],
)
async def test_which_denials_are_cached(
    reason: str, code: grpc.StatusCode, calls_for_three_checks: int
) -> None:
    clock = FakeMonotonic()
    sessions = RefusingSessions(reason, code)
    authorizer = EdgeAuthorizer(
        sessions,  # type: ignore[arg-type]
        NoTokens(),
        confirmed_age_s=FeedAge(None),
        denial_cache_ttl_s=30,
        monotonic=clock,
    )
    request = check_request("POST", {"cookie": f"{ACCESS_TOKEN_COOKIE}=eyJ.x.y", "x-csrf-token": "t"})
    for _ in range(3):
        response = await authorizer.check(request)
        assert json.loads(response.denied_response.body)["details"][0]["reason"] == reason
    assert sessions.calls == calls_for_three_checks
    # However long a denial TTL is asked for, a denial is forgotten after one second.
    clock.now += 1.0
    await authorizer.check(request)
    assert sessions.calls == calls_for_three_checks + 1
