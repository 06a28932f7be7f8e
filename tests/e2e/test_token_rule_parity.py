"""One rule set, everywhere a token is checked: the forgery matrix against every verifier (issue 11,
finding 3).

Each row is a token (a forgery, a token breaking one rule, a revoked one, or a valid one) and the
verdict every verifier must give it: accepted for the same user, or refused with the same reason and
`ErrorInfo` metadata. The verifiers, all real and wired as production wires them:

- `gateway`: `GET /v1/users/me` through Envoy with the token as a bearer token: Envoy's `jwt_authn`,
  then the edge's ext_authz check for what it refused, then the service's check of the identity the
  gateway vouches for. Every row runs twice: signed with a key Envoy has cached, and with one it has
  not (rotated in after Envoy fetched the JWKS, which it then keeps for an hour), which forces the
  ext_authz fallback; whether the edge was asked is checked from its metrics, so a row proves which
  layer refused it.
- `gateway_cookie`: the same request with the token as the access cookie: ext_authz → auth's
  `CheckSession` → the service.
- `edge`: the edge's ext_authz `Check`, called directly as Envoy calls it.
- `service`: the service port, called directly with the token as a bearer token.
- `check_session`: auth's `AuthInternalService.CheckSession` with the token as the access cookie.

The stack runs in this process from the production factories and wiring (auth with its own signing
keys in SQLite, revocations in Redis under a namespace of their own, the edge with the same list,
Envoy as a child). How each verifier is reached is in one place, `VerifierPaths`: when the service
ports change transport (mTLS, issue 11 part B), that class and `token_stack` are what to adapt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis as AsyncRedis

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from runtime.process import build_services, identity_for, registrations_of, start_services, stop_services
from services.auth.signing_keys import SigningKey, SigningKeyStore, generate_kek
from services.auth.wiring import signing_key_store
from services.common.context import ServiceContext
from services.common.credentials import ACCESS_TOKEN_COOKIE
from services.common.db import Database
from services.common.metrics import new_registry
from services.common.migrate import upgrade_async
from services.common.redis_multiplex import MultiplexedRedis
from services.common.revocation import RedisRevocationList, RevocationFeedMirror
from services.common.server import ServerDeps, create_server
from services.common.settings import Settings, load_settings
from services.common.telemetry import create_tracer_provider
from tests.support.databases import fresh_sqlite_url
from tests.support.gateway import (
    RunningGateway,
    embedded_test_topology,
    fast_settings,
    running_gateway,
)
from tests.support.outbox import emailed_token
from tests.support.pki import SERVICES, ServicePki
from tests.support.polling import eventually
from tests.support.redis_keys import delete_namespace

pytestmark = [pytest.mark.envoy, pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

PASSWORD = "violet-harbour-lantern-42"
NEW_PASSWORD = "copper-meadow-falcon-77"
# Envoy keeps the JWKS this long: a key rotated in after its first fetch stays unknown to it.
ENVOY_JWKS_CACHE_S = 3600
# Auth republishes its JWKS within 5 s, the edge refetches on an unknown kid at most every 5 s.
KEY_PROPAGATION_TIMEOUT_S = 30.0
AttributeContext = attribute_context_pb2.AttributeContext


# ---- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a verifier decided: the user it accepted, or the reason and metadata it refused with."""

    user_id: str = ""
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        if self.user_id:
            return f"accepted({self.user_id})"
        return f"refused({self.reason}, {dict(self.metadata)})"


def accepted(user_id: str) -> Verdict:
    return Verdict(user_id=user_id)


def refused(reason: str, **metadata: str) -> Verdict:
    return Verdict(reason=reason, metadata=metadata)


def invalid(cause: str, **extra: str) -> Verdict:
    return refused("TOKEN_INVALID", cause=cause, **extra)


def _from_status(status: status_pb2.Status) -> Verdict:
    infos = [detail for detail in status.details if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "parley.dev", info
    return Verdict(reason=info.reason, metadata=dict(info.metadata))


def _from_grpc_error(error: grpc.aio.AioRpcError) -> Verdict:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), f"no rich status on {error.code()}: {error.details()}"
    return _from_status(status_pb2.Status.FromString(raw))


def _from_http(response: httpx.Response) -> Verdict:
    if response.status_code == 200:
        return accepted(str(response.json()["user"]["id"]))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    infos = [d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert len(infos) == 1, body
    assert infos[0]["domain"] == "parley.dev", body
    return Verdict(reason=infos[0]["reason"], metadata=infos[0].get("metadata", {}))


# ---- the stack ----------------------------------------------------------------------------------


@dataclass
class TokenStack:
    """The services (auth hosted from its production wiring), the gateway in front, and the handles
    the matrix needs: the database (auth's outbox), the signing keys, the edge's metrics."""

    settings: Settings
    database_path: Path
    services_port: int
    # Who the matrix calls the service port and the edge as.
    pki: ServicePki
    gateway: RunningGateway
    edge_registry: CollectorRegistry
    # Auth's signing keys (the same database and KEK); the active one when Envoy fetched the JWKS.
    keys: SigningKeyStore
    cached_key: SigningKey

    def edge_jwt_checks(self) -> float:
        """How many bearer JWTs the edge's ext_authz check has decided so far."""
        return sum(
            self.edge_registry.get_sample_value(
                "parley_edge_authz_checks_total", {"credential": "jwt", "result": result}
            )
            or 0.0
            for result in ("allow", "deny", "unavailable")
        )


def _revocation_list(redis_url: str, prefix: str) -> RedisRevocationList:
    """The list as each process of a deployment with Redis reads it: its own client and mirror."""
    return RedisRevocationList(
        MultiplexedRedis.from_url(redis_url),
        key_prefix=prefix,
        mirror=RevocationFeedMirror(redis_url, key_prefix=prefix),
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def token_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, service_pki: ServicePki
) -> AsyncIterator[TokenStack]:
    database_url = fresh_sqlite_url(tmp_path_factory.mktemp("token-rules"))
    database_path = Path(database_url.removeprefix("sqlite+aiosqlite:///"))
    await upgrade_async(database_url)
    settings = load_settings(
        database_url=database_url, grpc_port=0, metrics_port=0, auth_key_encryption_key=generate_kek()
    )
    prefix = f"parley:test:token-rules:{uuid.uuid4().hex}:"
    database = Database(database_url)
    services_revocations = _revocation_list(redis_url, prefix)
    edge_revocations = _revocation_list(redis_url, prefix)
    context = ServiceContext(settings, database, services_revocations, embedded=False)
    bundles = build_services(["auth"], context)
    await start_services(bundles)
    identity = identity_for(settings, bundles, context, service_pki.files(SERVICES))
    server, port = create_server(
        settings,
        ServerDeps(
            services=registrations_of(bundles),
            identity=identity.resolver,
            registry=new_registry(),
            tracer_provider=create_tracer_provider(service="token-rules", otlp_endpoint=None),
            tls=service_pki.files(SERVICES),
        ),
    )
    await server.start()
    gateway_settings = fast_settings()
    gateway_settings = gateway_settings.model_copy(
        update={
            "authentication": gateway_settings.authentication.model_copy(
                update={"jwks_cache_duration_s": ENVOY_JWKS_CACHE_S}
            )
        }
    )
    edge_registry = CollectorRegistry()
    keys = signing_key_store(settings, database, embedded=False)
    try:
        cached_key = await keys.active_signing_key()
        # Envoy fetches the JWKS as it starts, and keeps it for ENVOY_JWKS_CACHE_S.
        async with running_gateway(
            embedded_test_topology(port, settings=gateway_settings, pki=service_pki),
            pki=service_pki,
            registry=edge_registry,
            revocations=edge_revocations,
        ) as gateway:
            yield TokenStack(
                settings=settings,
                database_path=database_path,
                services_port=port,
                pki=service_pki,
                gateway=gateway,
                edge_registry=edge_registry,
                keys=keys,
                cached_key=cached_key,
            )
    finally:
        await server.stop()
        await stop_services(bundles)
        await identity.close()
        await services_revocations.aclose()
        await edge_revocations.aclose()
        await database.dispose()
        client = AsyncRedis.from_url(redis_url)
        try:
            await delete_namespace(client, prefix)
        finally:
            await client.aclose()


# ---- how each verifier is reached (the one place to adapt when a transport changes) -------------


class VerifierPaths:
    """Presents a token to each verifier and reads its verdict."""

    PATHS = ("gateway", "gateway_cookie", "edge", "service", "check_session")

    def __init__(self, stack: TokenStack) -> None:
        self.http = httpx.AsyncClient(base_url=stack.gateway.http_url, timeout=15.0)
        services = f"127.0.0.1:{stack.services_port}"
        # A direct caller of a public method is the operator with a user's token; CheckSession is
        # the edge's; the edge's own Check is Envoy's (the gateway workload).
        self._as_operator = stack.pki.channel(services, as_="operator")
        self._as_edge = stack.pki.channel(services, as_="edge")
        edge = stack.gateway.topology.edge
        self._edge = stack.pki.channel(f"{edge.host}:{edge.port}", as_="gateway", server="edge")
        # grpc.aio channels make async stubs; the generated stubs are typed for the sync flavour.
        self._auth = cast(
            "auth_pb2_grpc.AuthServiceAsyncStub", auth_pb2_grpc.AuthServiceStub(self._as_operator)
        )
        self._internal = cast(
            "auth_pb2_grpc.AuthInternalServiceAsyncStub",
            auth_pb2_grpc.AuthInternalServiceStub(self._as_edge),
        )
        self._authorization = external_auth_pb2_grpc.AuthorizationStub(self._edge)

    async def close(self) -> None:
        await self.http.aclose()
        await self._as_operator.close()
        await self._as_edge.close()
        await self._edge.close()

    async def verdict(self, path: str, token: str) -> Verdict:
        if path == "gateway":
            return _from_http(
                await self.http.get("/v1/users/me", headers={"authorization": f"Bearer {token}"})
            )
        if path == "gateway_cookie":
            return _from_http(
                await self.http.get("/v1/users/me", headers={"cookie": f"{ACCESS_TOKEN_COOKIE}={token}"})
            )
        if path == "edge":
            return await self._edge_check(token)
        if path == "service":
            try:
                reply = await self._auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as error:
                return _from_grpc_error(error)
            return accepted(reply.user.id)
        assert path == "check_session", path
        try:
            checked = await self._internal.CheckSession(
                auth_pb2.CheckSessionRequest(session_cookie=token, http_method="GET"), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return _from_grpc_error(error)
        return accepted(checked.identity.user_id)

    async def _edge_check(self, token: str) -> Verdict:
        request_id = f"req-{uuid.uuid4().hex[:12]}"
        headers = {
            ":method": "GET",
            ":path": "/v1/users/me",
            ":authority": "api.parley.test",
            "x-request-id": request_id,
            "authorization": f"Bearer {token}",
        }
        request = external_auth_pb2.CheckRequest(
            attributes=AttributeContext(
                request=AttributeContext.Request(
                    http=AttributeContext.HttpRequest(
                        id=request_id, method="GET", path="/v1/users/me", headers=headers
                    )
                )
            )
        )
        response = await self._authorization.Check(request, timeout=10)
        if response.WhichOneof("http_response") == "ok_response":
            allowed = {option.header.key: option.header.value for option in response.ok_response.headers}
            return accepted(allowed["x-parley-user-id"])
        return _from_status(response.status)


# ---- the accounts and tokens the rows use -------------------------------------------------------


@dataclass(frozen=True)
class Account:
    user_id: str
    session_id: str
    access_token: str


@dataclass(frozen=True)
class Kit:
    """What the rows build tokens from: a live session, a signed-out one, and a user whose tokens
    were all cut off (then signed in again, so only the cutoff can refuse an older token)."""

    issuer: str
    audience: str
    live: Account
    signed_out: Account
    cut_off: Account
    cutoff_at: int
    # Rotated in after Envoy fetched the JWKS: auth and the edge know it, Envoy does not.
    uncached_key: SigningKey

    def claims(self, account: Account | None = None, **changes: Any) -> dict[str, Any]:
        """Valid claims for `account` (the live one by default), issued now; a None change drops a claim."""
        owner = account or self.live
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": owner.user_id,
            "sid": owner.session_id,
            "plan": "free",
            "roles": ["user"],
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
        }
        claims.update(changes)
        return {name: value for name, value in claims.items() if value is not None}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_part(value: Mapping[str, Any]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def signed(key: SigningKey, claims: Mapping[str, Any], **header: Any) -> str:
    """A token signed with `key` (Ed25519) under its kid, with `header` changes."""
    signing_input = (
        f"{_json_part({'alg': 'EdDSA', 'typ': 'JWT', 'kid': key.kid, **header})}.{_json_part(claims)}"
    )
    return f"{signing_input}.{_b64url(key.private_key.sign(signing_input.encode()))}"


def unsigned(key: SigningKey, claims: Mapping[str, Any]) -> str:
    return f"{_json_part({'alg': 'none', 'typ': 'JWT', 'kid': key.kid})}.{_json_part(claims)}."


def hs256_with_public_key(key: SigningKey, claims: Mapping[str, Any]) -> str:
    """Algorithm confusion: HMAC keyed with the key's public bytes, under its kid."""
    public = key.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    signing_input = f"{_json_part({'alg': 'HS256', 'typ': 'JWT', 'kid': key.kid})}.{_json_part(claims)}"
    return f"{signing_input}.{_b64url(hmac.new(public, signing_input.encode(), hashlib.sha256).digest())}"


def with_header(token: str, **changes: Any) -> str:
    """The token's signature under an edited header."""
    header, claims, signature = token.split(".")
    edited = {**json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))), **changes}
    return f"{_json_part(edited)}.{claims}.{signature}"


def flipped_signature(token: str) -> str:
    head, claims, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{claims}.{_b64url(bytes(raw))}"


# ---- the matrix ---------------------------------------------------------------------------------

Build = Callable[[Kit, SigningKey], str]
HOUR = 3600


@dataclass(frozen=True)
class Row:
    build: Build
    # The verdict for the live account's user (or the account the row names), from every verifier.
    expected: Callable[[Kit], Verdict]
    # Whether Envoy's jwt_authn vouches for the token when it knows the key: then the edge is never
    # asked, and the service alone applies the rule Envoy cannot.
    envoy_vouches: bool


def _now() -> int:
    return int(time.time())


ROWS = {
    "valid": Row(lambda k, key: signed(key, k.claims()), lambda k: accepted(k.live.user_id), True),
    "alg-none": Row(lambda k, key: unsigned(key, k.claims()), lambda k: invalid("algorithm"), False),
    "hs256-signed-with-the-public-key": Row(
        lambda k, key: hs256_with_public_key(key, k.claims()), lambda k: invalid("algorithm"), False
    ),
    "unknown-kid": Row(
        lambda k, key: signed(SigningKey("no-such-key", Ed25519PrivateKey.generate()), k.claims()),
        lambda k: invalid("unknown_kid"),
        False,
    ),
    "kid-of-another-algorithm": Row(
        lambda k, key: with_header(signed(key, k.claims()), alg="ES256"),
        lambda k: invalid("algorithm"),
        False,
    ),
    "bad-signature": Row(
        lambda k, key: flipped_signature(signed(key, k.claims())), lambda k: invalid("signature"), False
    ),
    "wrong-iss": Row(
        lambda k, key: signed(key, k.claims(iss="https://evil.example")), lambda k: invalid("issuer"), False
    ),
    "wrong-aud": Row(
        lambda k, key: signed(key, k.claims(aud="another-api")), lambda k: invalid("audience"), False
    ),
    "expired": Row(
        lambda k, key: signed(key, k.claims(iat=_now() - 1500, nbf=_now() - 1500, exp=_now() - 600)),
        lambda k: refused("TOKEN_EXPIRED"),
        False,
    ),
    # Envoy lets `exp` pass within its clock skew; the service refuses from the forwarded `exp`.
    "expired-within-envoys-clock-skew": Row(
        lambda k, key: signed(key, k.claims(iat=_now() - 920, nbf=_now() - 920, exp=_now() - 20)),
        lambda k: refused("TOKEN_EXPIRED"),
        True,
    ),
    "lifetime-48h": Row(
        lambda k, key: signed(key, k.claims(exp=_now() + 48 * HOUR)), lambda k: invalid("lifetime"), False
    ),
    # Envoy's max_lifetime bounds what is left (`exp - now`), not `exp - iat`.
    "lifetime-48h-nearly-over": Row(
        lambda k, key: signed(
            key, k.claims(iat=_now() - 47 * HOUR, nbf=_now() - 47 * HOUR, exp=_now() + HOUR)
        ),
        lambda k: invalid("lifetime"),
        True,
    ),
    "no-iat": Row(
        lambda k, key: signed(key, k.claims(iat=None)), lambda k: invalid("missing_claim", claim="iat"), True
    ),
    "no-nbf": Row(
        lambda k, key: signed(key, k.claims(nbf=None)), lambda k: invalid("missing_claim", claim="nbf"), True
    ),
    "nbf-in-the-future": Row(
        lambda k, key: signed(key, k.claims(nbf=_now() + HOUR)), lambda k: invalid("not_yet_valid"), False
    ),
    "iat-in-the-future": Row(
        lambda k, key: signed(key, k.claims(iat=_now() + HOUR, exp=_now() + HOUR + 600)),
        lambda k: invalid("issued_in_future"),
        True,
    ),
    "no-exp": Row(
        lambda k, key: signed(key, k.claims(exp=None)), lambda k: invalid("missing_claim", claim="exp"), False
    ),
    "empty-sub": Row(
        lambda k, key: signed(key, k.claims(sub="")), lambda k: invalid("claims", claim="sub"), False
    ),
    "revoked-session": Row(
        lambda k, key: signed(key, k.claims(k.signed_out)), lambda k: refused("SESSION_REVOKED"), True
    ),
    "revoked-session-without-iat": Row(
        lambda k, key: signed(key, k.claims(k.signed_out, iat=None)),
        lambda k: invalid("missing_claim", claim="iat"),
        True,
    ),
    "user-cutoff": Row(
        lambda k, key: signed(
            key, k.claims(k.cut_off, iat=k.cutoff_at - 5, nbf=k.cutoff_at - 5, exp=k.cutoff_at + 895)
        ),
        lambda k: refused("SESSION_REVOKED"),
        True,
    ),
    "issued-after-the-user-cutoff": Row(
        lambda k, key: signed(key, k.claims(k.cut_off)), lambda k: accepted(k.cut_off.user_id), True
    ),
}


async def _register(client: httpx.AsyncClient, tag: str) -> str:
    email = f"{tag}.{uuid.uuid4().hex[:12]}@example.com"
    registered = await client.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": tag}
    )
    assert registered.status_code == 200, registered.text
    return email


async def _login(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> Account:
    response = await client.post("/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    body = response.json()
    return Account(body["user"]["id"], body["session"]["id"], body["tokens"]["access_token"])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def paths(token_stack: TokenStack) -> AsyncIterator[VerifierPaths]:
    verifier_paths = VerifierPaths(token_stack)
    try:
        yield verifier_paths
    finally:
        await verifier_paths.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def kit(token_stack: TokenStack, paths: VerifierPaths) -> Kit:
    """The accounts, made as users make them, through the gateway (a sign-out, a password reset);
    then a key rotated in, and the wait until auth publishes it and the edge has learnt it."""
    client = paths.http
    live = await _login(client, await _register(client, "live"))
    signed_out = await _login(client, await _register(client, "signed-out"))
    logout = await client.post(
        "/v1/auth/logout", json={}, headers={"authorization": f"Bearer {signed_out.access_token}"}
    )
    assert logout.status_code == 200, logout.text

    cut_off_email = await _register(client, "cut-off")
    user_id = (await _login(client, cut_off_email)).user_id
    forgot = await client.post("/v1/auth/forgot-password", json={"email": cut_off_email})
    assert forgot.status_code == 200, forgot.text
    reset_token = emailed_token(token_stack.database_path, user_id=user_id, template="password_reset")
    cutoff_at = _now()
    reset = await client.post(
        "/v1/auth/reset-password", json={"token": reset_token, "new_password": NEW_PASSWORD}
    )
    assert reset.status_code == 200, reset.text
    # Signed in again after the reset: a session the cutoff did not end (the issuer waits out the
    # cutoff's second, so this sign-in's tokens are newer than the cutoff).
    cut_off = await _login(client, cut_off_email, NEW_PASSWORD)

    await token_stack.keys.rotate()
    uncached_key = await token_stack.keys.active_signing_key()
    settings = token_stack.settings
    built = Kit(
        settings.jwt_issuer, settings.jwt_audience, live, signed_out, cut_off, cutoff_at, uncached_key
    )
    probe = signed(uncached_key, built.claims())

    async def edge_knows_the_new_key() -> bool:
        return await paths.verdict("edge", probe) == accepted(live.user_id)

    await eventually(
        edge_knows_the_new_key,
        what="auth publishing, and the edge learning, the rotated-in key",
        timeout_s=KEY_PROPAGATION_TIMEOUT_S,
        interval_s=0.5,
    )
    return built


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
@pytest.mark.parametrize("key", ["key-envoy-has", "key-envoy-lacks"])
async def test_every_verifier_gives_the_same_verdict(
    token_stack: TokenStack, paths: VerifierPaths, kit: Kit, row: str, key: str
) -> None:
    case = ROWS[row]
    signing_key = token_stack.cached_key if key == "key-envoy-has" else kit.uncached_key
    token = case.build(kit, signing_key)
    expected = case.expected(kit)

    edge_checks_before = token_stack.edge_jwt_checks()
    verdicts = {"gateway": await paths.verdict("gateway", token)}
    edge_asked = token_stack.edge_jwt_checks() > edge_checks_before
    for path in VerifierPaths.PATHS[1:]:
        verdicts[path] = await paths.verdict(path, token)

    differing = {path: verdict for path, verdict in verdicts.items() if verdict != expected}
    assert not differing, f"every verifier should say {expected!r}; these did not: {differing}"
    assert list(verdicts) == list(VerifierPaths.PATHS)
    # Which layer of the gateway decided: Envoy vouches (the service applies what Envoy cannot), or
    # the edge's fallback decides; a key Envoy lacks always takes the fallback.
    envoy_vouched = key == "key-envoy-has" and case.envoy_vouches
    assert edge_asked is not envoy_vouched, f"edge asked: {edge_asked}"
