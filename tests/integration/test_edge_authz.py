"""The edge authorizer (Envoy's ext_authz service) against the real auth service.

Auth runs from its production wiring (`services.auth.wiring.build_bundle`) in the production server
factory, on a fresh SQLite database; the edge's `Authorization` service runs on its own grpc.aio
server and reaches auth through a TCP proxy, so a test can cut the line, and it follows auth's
credential changes over that line as the gateway does (`gateway.credential_feed`). Every check is a
real `CheckRequest` sent with the generated `AuthorizationStub`, shaped as Envoy sends it. Users,
API keys and sessions are made, revoked, disabled and demoted through auth's own RPCs; the only
tokens not minted by auth's RPCs are signed with auth's real keys (read from the same database with
the same KEK) at chosen times, and one is forged with a stranger's key.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from gateway.authz import EdgeAuthorizer, add_authorization_service
from gateway.credential_feed import CredentialFeedFollower
from gateway.edge import ENVOY_CALLERS
from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from runtime.process import identity_for, registrations_of, start_services
from services.auth.signing_keys import SigningKeyStore, generate_kek
from services.auth.tokens import AccessTokenIssuer
from services.auth.wiring import account_parts, build_bundle, signing_key_store
from services.common.clock import utc_now
from services.common.context import ServiceContext
from services.common.credential_changes import MAX_CONFIRMED_AGE_S, FeedConfirmation
from services.common.credentials import ACCESS_TOKEN_COOKIE, CSRF_COOKIE
from services.common.db import Database
from services.common.errors import details_of
from services.common.identity import (
    CachedJwksVerifier,
    decode_roles_header,
    encode_roles_header,
)
from services.common.interceptors import CallerCheck
from services.common.jwks_client import grpc_jwks_fetcher
from services.common.metrics import new_registry
from services.common.migrate import upgrade_async
from services.common.revocation import InMemoryRevocationList
from services.common.server import ServerDeps, create_server
from services.common.service_tls import server_credentials
from services.common.settings import Settings, load_settings
from services.common.telemetry import create_tracer_provider
from services.common.token_rules import TokenRules
from tests.support.pki import ServicePki
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy

logger = logging.getLogger(__name__)

PASSWORD = "violet-harbour-lantern-42"
AttributeContext = attribute_context_pb2.AttributeContext
# The roles header as services decode it (base64 of a JSON array, as Envoy's claim_to_headers writes).
USER_ROLES = encode_roles_header(["user"])
ADMIN_ROLES = encode_roles_header(["user", "admin"])
IDENTITY_HEADERS = {
    "x-parley-user-id",
    "x-parley-session-id",
    "x-parley-plan",
    "x-parley-roles",
    "x-parley-auth-method",
    "x-parley-token-issued-at",
    "x-parley-token-not-before",
    "x-parley-token-expires-at",
}
# Long enough for the auth replica's in-memory JWKS copy (5 s) to pick up a rotation.
JWKS_PROPAGATION_TIMEOUT_S = 15.0
# The paths Envoy sends the edge after transcoding: an ordinary method and a sensitive one.
GET_CURRENT_USER_PATH = "/parley.auth.v1.AuthService/GetCurrentUser"
CREATE_API_KEY_PATH = "/parley.auth.v1.AuthService/CreateApiKey"


@dataclass
class Account:
    user_id: str
    email: str
    session_id: str
    access_token: str


@dataclass
class Edge:
    """Auth, and the edge authorizer in front of it, with the pieces tests poke at."""

    settings: Settings
    database: Database
    public: auth_pb2_grpc.AuthServiceAsyncStub
    authorization: external_auth_pb2_grpc.AuthorizationStub
    registry: CollectorRegistry
    auth_link: TcpProxy
    signing_keys: SigningKeyStore
    revocations: InMemoryRevocationList
    authorizer: EdgeAuthorizer
    admin: auth_pb2_grpc.AuthAdminServiceAsyncStub

    async def check(
        self, headers: dict[str, str], *, method: str = "GET", path: str = GET_CURRENT_USER_PATH
    ) -> Any:
        request_id = f"req-{uuid.uuid4().hex[:12]}"
        request = external_auth_pb2.CheckRequest(
            attributes=AttributeContext(
                request=AttributeContext.Request(
                    http=AttributeContext.HttpRequest(
                        id=request_id,
                        method=method,
                        path=path,
                        host="api.parley.test",
                        scheme="https",
                        protocol="HTTP/1.1",
                        headers={
                            ":method": method,
                            ":path": path,
                            ":authority": "api.parley.test",
                            "x-request-id": request_id,
                            **headers,
                        },
                    )
                )
            )
        )
        return await self.authorization.Check(request, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def sign_up(self, label: str, *, admin: bool = False) -> Account:
        email = f"{label}-{uuid.uuid4().hex[:10]}@example.com"
        if admin:
            parts = account_parts(self.settings, self.database, self.revocations)
            await parts.admin().create_admin(email, PASSWORD, "Admin")
        else:
            await self.public.Register(
                auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Edge")
            )
        signed_in = await self.public.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        return Account(signed_in.user.id, email, signed_in.session.id, signed_in.tokens.access_token)

    async def api_key(self, account: Account) -> tuple[str, str]:
        """A new API key of the account: (its id, its secret)."""
        created = await self.public.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="edge test"), metadata=bearer(account.access_token)
        )
        return created.api_key.id, created.secret

    async def browser_session(self, email: str) -> tuple[str, str, str]:
        """Sign in with cookies: (the access cookie's value, the CSRF token, the session id)."""
        call = self.public.Login(
            auth_pb2.LoginRequest(
                email=email, password=PASSWORD, token_delivery=auth_pb2.TOKEN_DELIVERY_COOKIE
            )
        )
        response = await call
        cookies: dict[str, str] = {}
        for name, value in await call.initial_metadata():
            if name == "set-cookie":
                pair = str(value).split(";", 1)[0]
                cookie_name, _, cookie_value = pair.partition("=")
                cookies[cookie_name] = cookie_value
        assert cookies[CSRF_COOKIE] == response.csrf_token
        return cookies[ACCESS_TOKEN_COOKIE], response.csrf_token, response.session.id

    def issuer(self, *, issued_ago: timedelta = timedelta(0)) -> AccessTokenIssuer:
        """Auth's token issuer over auth's real keys, with its clock set back by `issued_ago`."""
        return AccessTokenIssuer(
            self.signing_keys,
            issuer=self.settings.jwt_issuer,
            audience=self.settings.jwt_audience,
            ttl=timedelta(seconds=self.settings.access_token_ttl_s),
            clock=lambda: utc_now() - issued_ago,
        )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def edge(sqlite_url: str, service_pki: ServicePki) -> AsyncIterator[Edge]:
    await upgrade_async(sqlite_url)
    settings = load_settings(
        database_url=sqlite_url, grpc_port=0, metrics_port=0, auth_key_encryption_key=generate_kek()
    )
    database = Database(sqlite_url)
    revocations = InMemoryRevocationList()
    context = ServiceContext(settings, database, revocations, embedded=False)
    bundle = build_bundle(context)
    await start_services([bundle])
    identity = identity_for(settings, [bundle], context, service_pki.files("auth"))
    auth_server, auth_port = create_server(
        settings,
        ServerDeps(
            services=registrations_of([bundle]),
            identity=identity.resolver,
            registry=new_registry(),
            tracer_provider=create_tracer_provider(service="auth", otlp_endpoint=None),
            tls=service_pki.files("auth"),
        ),
    )
    await auth_server.start()
    auth_link = TcpProxy("127.0.0.1", auth_port)
    await auth_link.start()
    # The test signs users up as a direct caller with their own tokens; the edge calls as the edge.
    test_channel = service_pki.channel(f"127.0.0.1:{auth_port}", as_="operator")
    edge_to_auth = service_pki.channel(f"127.0.0.1:{auth_link.port}", as_="edge")
    # As the gateway builds it: auth's JWKS over gRPC, refetched on an unknown kid (at once, here).
    verifier = CachedJwksVerifier(
        grpc_jwks_fetcher(edge_to_auth),
        rules=TokenRules.of(settings),
        min_refetch_interval_s=0,
        revocations=revocations,
    )
    registry = CollectorRegistry()
    # grpc.aio channels make async stubs; the generated stubs are typed for the sync flavour.
    internal = cast(
        "auth_pb2_grpc.AuthInternalServiceAsyncStub", auth_pb2_grpc.AuthInternalServiceStub(edge_to_auth)
    )
    confirmation = FeedConfirmation()
    authorizer = EdgeAuthorizer(
        internal,
        verifier,
        confirmed_age_s=confirmation.age_s,
        sensitive_paths=frozenset({CREATE_API_KEY_PATH}),
        registry=registry,
    )
    feed = CredentialFeedFollower(internal, authorizer.decisions, confirmation, registry=registry)
    feed.start()
    edge_server = grpc.aio.server(interceptors=[CallerCheck(ENVOY_CALLERS)])
    add_authorization_service(edge_server, authorizer)
    edge_port = edge_server.add_secure_port("127.0.0.1:0", server_credentials(service_pki.files("edge")))
    await edge_server.start()
    envoy_side = service_pki.channel(f"127.0.0.1:{edge_port}", as_="gateway", server="edge")
    try:
        await eventually(lambda: authorizer.decisions.trusted, what="the edge follows auth's changes")
        yield Edge(
            settings=settings,
            database=database,
            public=cast("auth_pb2_grpc.AuthServiceAsyncStub", auth_pb2_grpc.AuthServiceStub(test_channel)),
            authorization=external_auth_pb2_grpc.AuthorizationStub(envoy_side),
            registry=registry,
            auth_link=auth_link,
            signing_keys=signing_key_store(settings, database, embedded=False),
            revocations=revocations,
            authorizer=authorizer,
            admin=cast(
                "auth_pb2_grpc.AuthAdminServiceAsyncStub", auth_pb2_grpc.AuthAdminServiceStub(test_channel)
            ),
        )
    finally:
        await feed.stop()
        await envoy_side.close()
        await edge_server.stop(None)
        await edge_to_auth.close()
        await test_channel.close()
        await auth_link.close()
        await auth_server.stop()
        await identity.close()
        await database.dispose()


# ---- reading responses --------------------------------------------------------------------------


def headers_of(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def allowed(response: Any) -> dict[str, str]:
    """The upstream headers of an ALLOW, checked to be one."""
    assert response.status.code == 0, response
    assert response.WhichOneof("http_response") == "ok_response"
    return headers_of(response.ok_response.headers)


def denied_json(response: Any, *, status: int, reason: str) -> dict[str, Any]:
    """The JSON error body of a DENY with this HTTP status and reason, checked against the contract."""
    assert response.WhichOneof("http_response") == "denied_response", response
    denied = response.denied_response
    assert denied.status.code == status
    assert headers_of(denied.headers)["content-type"] == "application/json"
    body: dict[str, Any] = json.loads(denied.body)
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == response.status.code != 0
    assert body["message"]
    info, request_info = body["details"][0], body["details"][-1]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["reason"], info["domain"]) == (reason, "parley.dev"), body
    assert request_info == {
        "@type": "type.googleapis.com/google.rpc.RequestInfo",
        "request_id": request_info["request_id"],
    }
    assert request_info["request_id"].startswith("req-")
    return body


def time_headers(token: str) -> dict[str, str]:
    """The identity headers of a token's time claims, as Envoy's jwt_authn copies them."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return {
        "x-parley-token-issued-at": str(claims["iat"]),
        "x-parley-token-not-before": str(claims["nbf"]),
        "x-parley-token-expires-at": str(claims["exp"]),
    }


def challenge(response: Any) -> str | None:
    return headers_of(response.denied_response.headers).get("www-authenticate")


# ---- API keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["authorization", "x-api-key"])
async def test_a_valid_api_key_allows_with_the_identity_headers_and_metadata(edge: Edge, form: str) -> None:
    admin = await edge.sign_up("keys", admin=True)
    _, secret = await edge.api_key(admin)
    headers = {"authorization": f"Bearer {secret}"} if form == "authorization" else {"x-api-key": secret}

    response = await edge.check(headers)

    assert allowed(response) == {
        "x-parley-user-id": admin.user_id,
        "x-parley-plan": "free",
        "x-parley-roles": ADMIN_ROLES,
        "x-parley-auth-method": "api_key",
    }
    assert decode_roles_header(ADMIN_ROLES) == {"user", "admin"}
    removed = list(response.ok_response.headers_to_remove)
    assert removed == [
        "x-parley-session-id",
        "x-parley-token-issued-at",
        "x-parley-token-not-before",
        "x-parley-token-expires-at",
        "x-api-key",
        *(["authorization"] if form == "authorization" else []),
    ]
    assert MessageToDict(response.dynamic_metadata) == {
        "roles": ["user", "admin"],
        "user_id": admin.user_id,
        "auth_method": "api_key",
    }
    assert edge.metric("parley_edge_authz_checks_total", credential="api_key", result="allow") == 1


async def test_a_revoked_api_key_is_refused(edge: Edge) -> None:
    account = await edge.sign_up("revoked")
    key_id, secret = await edge.api_key(account)
    await edge.public.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(api_key_id=key_id), metadata=bearer(account.access_token)
    )

    response = await edge.check({"x-api-key": secret})

    denied_json(response, status=401, reason="API_KEY_REVOKED")
    assert challenge(response) == 'Bearer realm="parley", error="invalid_token"'
    assert edge.metric("parley_edge_authz_checks_total", credential="api_key", result="deny") == 1


async def test_an_unknown_api_key_is_refused(edge: Edge) -> None:
    account = await edge.sign_up("unknown")
    _, secret = await edge.api_key(account)
    wrong_secret = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")

    response = await edge.check({"authorization": f"Bearer {wrong_secret}"})

    body = denied_json(response, status=401, reason="API_KEY_INVALID")
    assert body["details"][0]["metadata"] == {"cause": "unknown"}
    assert secret not in response.denied_response.body


# ---- cookie sessions ----------------------------------------------------------------------------


async def test_a_cookie_session_reads_without_a_csrf_token(edge: Edge) -> None:
    account = await edge.sign_up("cookie-get")
    access, _, session_id = await edge.browser_session(account.email)

    response = await edge.check({"cookie": f"theme=dark; {ACCESS_TOKEN_COOKIE}={access}"})

    assert allowed(response) == {
        "x-parley-user-id": account.user_id,
        "x-parley-session-id": session_id,
        "x-parley-plan": "free",
        "x-parley-roles": USER_ROLES,
        "x-parley-auth-method": "cookie",
        **time_headers(access),
    }
    assert MessageToDict(response.dynamic_metadata)["auth_method"] == "cookie"


async def test_a_cookie_session_writes_only_with_the_matching_csrf_token(edge: Edge) -> None:
    account = await edge.sign_up("cookie-post")
    access, csrf, session_id = await edge.browser_session(account.email)
    cookies = f"{ACCESS_TOKEN_COOKIE}={access}; {CSRF_COOKIE}={csrf}"

    accepted = await edge.check({"cookie": cookies, "x-csrf-token": csrf}, method="POST")
    missing = await edge.check({"cookie": cookies}, method="PATCH")
    forged = await edge.check({"cookie": cookies, "x-csrf-token": "forged-" + csrf}, method="DELETE")

    assert allowed(accepted)["x-parley-session-id"] == session_id
    denied_json(missing, status=403, reason="CSRF_TOKEN_MISSING")
    denied_json(forged, status=403, reason="CSRF_TOKEN_MISMATCH")
    assert challenge(missing) is None
    # A refused write does not taint the session: reading still works.
    allowed(await edge.check({"cookie": cookies}))


# ---- bearer JWTs Envoy could not verify -----------------------------------------------------------


async def test_an_expired_token_is_refused_as_expired(edge: Edge) -> None:
    account = await edge.sign_up("expired")
    stale = await edge.issuer(issued_ago=timedelta(hours=1)).issue(
        account.user_id, account.session_id, "free", ["user"]
    )

    response = await edge.check({"authorization": f"Bearer {stale.token}"})

    denied_json(response, status=401, reason="TOKEN_EXPIRED")
    assert challenge(response) == 'Bearer realm="parley", error="invalid_token"'


async def test_a_forged_token_is_refused_as_invalid(edge: Edge) -> None:
    account = await edge.sign_up("forged")
    real_kid = jwt.get_unverified_header(account.access_token)["kid"]
    claims = jwt.decode(account.access_token, options={"verify_signature": False})
    forged = jwt.encode(
        {**claims, "roles": ["user", "admin"]},
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": real_kid},
    )

    response = await edge.check({"authorization": f"Bearer {forged}"})

    body = denied_json(response, status=401, reason="TOKEN_INVALID")
    assert body["details"][0]["metadata"] == {"cause": "signature"}


async def test_a_token_signed_by_a_key_envoy_does_not_know_yet_is_allowed(edge: Edge) -> None:
    account = await edge.sign_up("rotation")
    # The edge's verifier learns the current key set, as Envoy's jwt_authn cache would.
    allowed(await edge.check({"authorization": f"Bearer {account.access_token}"}))

    new_kid = await edge.signing_keys.rotate()
    await wait_until_published(edge, new_kid)
    fresh = await edge.issuer().issue(account.user_id, account.session_id, "free", ["user"])
    assert jwt.get_unverified_header(fresh.token)["kid"] == new_kid

    response = await edge.check({"authorization": f"Bearer {fresh.token}"})

    assert allowed(response) == {
        "x-parley-user-id": account.user_id,
        "x-parley-session-id": account.session_id,
        "x-parley-plan": "free",
        "x-parley-roles": USER_ROLES,
        "x-parley-auth-method": "jwt",
        **time_headers(fresh.token),
    }
    assert MessageToDict(response.dynamic_metadata) == {
        "roles": ["user"],
        "user_id": account.user_id,
        "auth_method": "jwt",
    }


async def wait_until_published(edge: Edge, kid: str) -> None:
    """Until auth's GetJwks (served from a short in-memory copy) lists `kid`."""

    async def published_kids() -> list[str] | None:
        document = await edge.public.GetJwks(auth_pb2.GetJwksRequest())
        kids = [key["kid"] for key in json.loads(document.data)["keys"]]
        return kids if kid in kids else None

    await eventually(
        published_kids, what=f"kid {kid} published", timeout_s=JWKS_PROPAGATION_TIMEOUT_S, interval_s=0.1
    )


async def test_a_malformed_authorization_header_is_refused(edge: Edge) -> None:
    response = await edge.check({"authorization": "Basic dXNlcjpwYXNz"})

    body = denied_json(response, status=401, reason="TOKEN_INVALID")
    assert body["details"][0]["metadata"] == {"cause": "malformed"}
    assert edge.metric("parley_edge_authz_checks_total", credential="malformed", result="deny") == 1


# ---- no credential, gRPC clients ------------------------------------------------------------------


async def test_no_credential_is_unauthenticated_and_says_what_is_accepted(edge: Edge) -> None:
    response = await edge.check({"cookie": "theme=dark"})

    body = denied_json(response, status=401, reason="UNAUTHENTICATED")
    assert body["code"] == 16
    assert "X-API-Key" in body["message"]
    assert "Bearer" in body["message"]
    assert challenge(response) == 'Bearer realm="parley"'


async def test_a_grpc_client_gets_the_status_in_grpc_status_details_bin(edge: Edge) -> None:
    account = await edge.sign_up("grpc-client")
    stale = await edge.issuer(issued_ago=timedelta(hours=1)).issue(
        account.user_id, account.session_id, "free", ["user"]
    )

    response = await edge.check(
        {"content-type": "application/grpc", "authorization": f"Bearer {stale.token}", "te": "trailers"},
        method="POST",
        path="/parley.auth.v1.AuthService/GetCurrentUser",
    )

    denied = response.denied_response
    headers = headers_of(denied.headers)
    assert "content-type" not in headers
    assert denied.status.code == 401
    status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
    assert (status.code, status.message) == (16, denied.body)
    details = details_of(status)
    info, request_info = details["ErrorInfo"], details["RequestInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert isinstance(request_info, error_details_pb2.RequestInfo)
    assert info.reason == "TOKEN_EXPIRED"
    assert request_info.request_id.startswith("req-")


# ---- caching, credential changes and auth outages ----------------------------------------------


async def cached_key(edge: Edge, account: Account) -> tuple[str, str, dict[str, str]]:
    """A new key of the account, checked at the edge until an answer comes from its cache (nothing
    is cached in the first seconds after the edge (re)subscribed to auth's changes). Returns the
    key's id, its secret and the identity headers it was allowed with."""
    key_id, secret = await edge.api_key(account)
    first = allowed(await edge.check({"x-api-key": secret}))

    async def answered_from_the_cache() -> bool:
        hits = edge.metric("parley_edge_authz_cache_lookups_total", credential="api_key", outcome="hit")
        assert allowed(await edge.check({"x-api-key": secret})) == first
        return (
            edge.metric("parley_edge_authz_cache_lookups_total", credential="api_key", outcome="hit") > hits
        )

    await eventually(answered_from_the_cache, what="the key's answer cached at the edge", interval_s=0.1)
    return key_id, secret, first


async def refused_within(edge: Edge, headers: dict[str, str], reason: str, *, bound_s: float = 1.0) -> float:
    """Poll the edge with `headers` until it refuses with `reason`; returns how long that took."""
    started = time.monotonic()

    async def refused() -> bool:
        response = await edge.check(headers)
        if response.WhichOneof("http_response") != "denied_response":
            return False
        denied_json(response, status=response.denied_response.status.code, reason=reason)
        return True

    await eventually(refused, what=f"the edge refuses with {reason}", timeout_s=bound_s, interval_s=0.005)
    return time.monotonic() - started


async def test_a_cached_key_is_refused_within_a_second_of_its_revocation(edge: Edge) -> None:
    account = await edge.sign_up("revoked-while-cached")
    key_id, secret, _ = await cached_key(edge, account)

    await edge.public.RevokeApiKey(
        auth_pb2.RevokeApiKeyRequest(api_key_id=key_id), metadata=bearer(account.access_token)
    )

    await refused_within(edge, {"x-api-key": secret}, "API_KEY_REVOKED")
    assert edge.metric("parley_edge_authz_cache_evictions_total", cause="user_changed") >= 1


async def test_a_disabled_users_cached_key_is_refused_within_a_second(edge: Edge) -> None:
    admin = await edge.sign_up("disabler", admin=True)
    account = await edge.sign_up("disabled-while-cached")
    _, secret, _ = await cached_key(edge, account)

    await edge.admin.DisableUser(
        auth_pb2.DisableUserRequest(user_id=account.user_id), metadata=bearer(admin.access_token)
    )

    await refused_within(edge, {"x-api-key": secret}, "ACCOUNT_DISABLED")


async def test_a_cached_keys_roles_follow_a_role_change_within_a_second(edge: Edge) -> None:
    root = await edge.sign_up("root", admin=True)
    demoted = await edge.sign_up("demoted", admin=True)
    _, secret, headers = await cached_key(edge, demoted)
    assert headers["x-parley-roles"] == ADMIN_ROLES

    await edge.admin.SetUserRoles(
        auth_pb2.SetUserRolesRequest(user_id=demoted.user_id, roles=[]), metadata=bearer(root.access_token)
    )

    async def demoted_at_the_edge() -> bool:
        return allowed(await edge.check({"x-api-key": secret}))["x-parley-roles"] == USER_ROLES

    await eventually(demoted_at_the_edge, what="the key's roles lose admin", timeout_s=1.0, interval_s=0.005)


async def test_a_sensitive_method_is_checked_with_auth_every_time(edge: Edge) -> None:
    account = await edge.sign_up("sensitive")
    _, secret, _ = await cached_key(edge, account)
    calls = edge.metric("parley_edge_authz_auth_call_seconds_count", rpc="CheckApiKey", outcome="ok")

    for _ in range(2):
        allowed(await edge.check({"x-api-key": secret}, method="POST", path=CREATE_API_KEY_PATH))
    assert (
        edge.metric("parley_edge_authz_auth_call_seconds_count", rpc="CheckApiKey", outcome="ok") == calls + 2
    )
    assert (
        edge.metric("parley_edge_authz_cache_lookups_total", credential="api_key", outcome="sensitive") == 2
    )


async def test_when_the_feed_breaks_the_edge_stops_answering_from_its_cache(edge: Edge) -> None:
    account = await edge.sign_up("cut-off")
    _, secret, first = await cached_key(edge, account)

    # The line to auth carries the feed too: cutting it leaves the cached key unusable, never a pass.
    await edge.auth_link.cut()
    cut_at = time.monotonic()

    async def refused_for_now() -> bool:
        response = await edge.check({"x-api-key": secret})
        if response.WhichOneof("http_response") != "denied_response":
            return False
        denied_json(response, status=503, reason="SERVICE_UNAVAILABLE")
        return True

    await eventually(refused_for_now, what="503 instead of a cached pass", timeout_s=MAX_CONFIRMED_AGE_S)
    logger.info("cached answers stopped %.3f s after the feed was cut", time.monotonic() - cut_at)
    assert edge.metric("parley_edge_credential_feed_fresh") == 0
    assert (
        edge.metric("parley_edge_authz_cache_lookups_total", credential="api_key", outcome="unconfirmed") >= 1
    )

    # Back: the edge resubscribes, starts afresh, and caches again.
    await edge.auth_link.restore()
    await eventually(lambda: edge.authorizer.decisions.trusted, what="the feed is back", timeout_s=10)
    assert edge.metric("parley_edge_authz_cache_evictions_total", cause="resync") >= 1
    assert allowed(await edge.check({"x-api-key": secret})) == first


async def test_when_auth_is_unreachable_the_edge_refuses_with_503(edge: Edge) -> None:
    account = await edge.sign_up("outage")
    _, secret = await edge.api_key(account)
    access, _, _ = await edge.browser_session(account.email)

    await edge.auth_link.cut()
    for headers in ({"x-api-key": secret}, {"cookie": f"{ACCESS_TOKEN_COOKIE}={access}"}):
        response = await edge.check(headers)
        body = denied_json(response, status=503, reason="SERVICE_UNAVAILABLE")
        assert body["code"] == 14
        assert body["details"][0]["metadata"] == {"dependency": "auth"}
        assert challenge(response) is None
    assert edge.metric("parley_edge_authz_checks_total", credential="api_key", result="unavailable") == 1
    assert edge.metric("parley_edge_authz_checks_total", credential="cookie", result="unavailable") == 1
