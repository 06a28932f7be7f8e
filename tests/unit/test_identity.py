"""Identity resolution: gateway headers, access JWTs (bearer and cookie), CSRF, revocation, and every way
a credential can be wrong.

The forged-token matrix runs against `CachedJwksVerifier` with real keys: a `SigningKeyStore` on a
SQLite file and tokens from `AccessTokenIssuer`, with injected clocks so expiry and rotation are exact.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.api import httpbody_pb2
from google.rpc import error_details_pb2

from parley.auth.v1 import auth_pb2, auth_pb2_grpc
from services.auth.repository import auth_units_of_work
from services.auth.signing_keys import SigningKeyStore, generate_kek, load_kek
from services.auth.tokens import AccessTokenIssuer
from services.common.call_context import current_identity
from services.common.credentials import ACCESS_TOKEN_COOKIE, CSRF_COOKIE, CSRF_HEADER, parse_cookies
from services.common.db import Database
from services.common.errors import ParleyError, PermissionDenied, Unauthenticated, Unavailable
from services.common.identity import (
    ANONYMOUS,
    CachedJwksVerifier,
    Identity,
    IdentityResolver,
    JwksTokenVerifier,
    NoTokenVerifier,
    decode_roles_header,
    encode_roles_header,
)
from services.common.jwks_client import grpc_jwks_fetcher
from services.common.metrics import new_registry
from services.common.migrate import upgrade_async
from services.common.revocation import InMemoryRevocationList
from services.common.safe_methods import SafeMethods
from services.common.server import ServerDeps, ServiceRegistration, create_server
from services.common.settings import load_settings
from services.common.telemetry import create_tracer_provider
from services.common.token_rules import TokenRules
from tests.support.pki import SERVICES, ServicePki
from tests.support.servers import rich_status

ISSUER = "parley-test"
AUDIENCE = "parley-api"
RULES = TokenRules(issuer=ISSUER, audience=AUDIENCE)
TTL = timedelta(minutes=15)
START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
NOW = int(START.timestamp())

GET_METHOD = "/parley.auth.v1.AuthService/GetCurrentUser"  # GET /v1/users/me
PATCH_METHOD = "/parley.auth.v1.AuthService/UpdateCurrentUser"  # PATCH /v1/users/me
POST_METHOD = "/parley.auth.v1.AuthService/Logout"  # POST /v1/auth/logout
INTERNAL_METHOD = "/parley.auth.v1.AuthInternalService/CheckSession"  # no HTTP rule


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def resolve_strictly(
    resolver: IdentityResolver, metadata: Mapping[str, str], method: str = "", *, from_gateway: bool = False
) -> Identity:
    """Resolve and demand a user, as an RPC that needs one does: a refused credential raises here."""
    return (await resolver.resolve(metadata, method, from_gateway=from_gateway)).require_user()


def _reason(error: pytest.ExceptionInfo[ParleyError]) -> str:
    """The stable reason, plus the cause when there is one, e.g. 'TOKEN_INVALID/algorithm'."""
    cause = error.value.metadata.get("cause")
    return f"{error.value.reason}/{cause}" if cause else error.value.reason


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------------
# A fixed JWKS (JwksTokenVerifier): the original checks, now async.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def static_verifier(signing_key: Ed25519PrivateKey) -> JwksTokenVerifier:
    public = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    jwks = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": _b64(public), "kid": "k1", "alg": "EdDSA"}]}
    return JwksTokenVerifier(jwks, rules=RULES)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "user-1",
        "sid": "session-1",
        "plan": "pro",
        "roles": ["user", "admin"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "j1",
    }
    claims.update(overrides)
    return claims


def _token(key: Ed25519PrivateKey, claims: dict[str, Any], kid: str = "k1") -> str:
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


async def test_valid_token_gives_its_identity(
    static_verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey
) -> None:
    identity = await static_verifier.verify(_token(signing_key, _claims()))
    assert identity == Identity(
        user_id="user-1",
        session_id="session-1",
        plan="pro",
        roles=frozenset({"user", "admin"}),
        auth_method="jwt",
    )


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        (_claims(exp=int(time.time()) - 10), "TOKEN_EXPIRED"),
        (_claims(iss="someone-else"), "TOKEN_INVALID/issuer"),
        (_claims(aud="other-api"), "TOKEN_INVALID/audience"),
    ],
)
async def test_wrong_claims_are_refused(
    static_verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey, claims: dict[str, Any], reason: str
) -> None:
    with pytest.raises(Unauthenticated) as error:
        await static_verifier.verify(_token(signing_key, claims))
    assert _reason(error) == reason


async def test_static_jwks_refuses_unknown_kids_other_keys_and_garbage(
    static_verifier: JwksTokenVerifier, signing_key: Ed25519PrivateKey
) -> None:
    with pytest.raises(Unauthenticated) as unknown:
        await static_verifier.verify(_token(signing_key, _claims(), kid="k-unknown"))
    assert _reason(unknown) == "TOKEN_INVALID/unknown_kid"
    with pytest.raises(Unauthenticated) as other_key:
        await static_verifier.verify(_token(Ed25519PrivateKey.generate(), _claims()))
    assert _reason(other_key) == "TOKEN_INVALID/signature"
    with pytest.raises(Unauthenticated) as garbage:
        await static_verifier.verify("not-a-jwt")
    assert _reason(garbage) == "TOKEN_INVALID/malformed"


def test_a_configured_jwks_with_a_symmetric_or_kidless_key_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="not an accepted algorithm"):
        JwksTokenVerifier({"keys": [{"kty": "oct", "k": _b64(b"s" * 32), "kid": "h1"}]}, rules=RULES)
    public = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with pytest.raises(ValueError, match="needs a 'kid'"):
        JwksTokenVerifier({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": _b64(public)}]}, rules=RULES)
    with pytest.raises(TypeError):
        JwksTokenVerifier({"keys": "none"}, rules=RULES)


# ---------------------------------------------------------------------------------------------------
# Real keys: SigningKeyStore on SQLite, AccessTokenIssuer, CachedJwksVerifier.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def key_database(sqlite_url: str) -> AsyncIterator[Database]:
    await upgrade_async(sqlite_url)
    database = Database(sqlite_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


@pytest.fixture
async def keys(key_database: Database, clock: Clock) -> SigningKeyStore:
    store = SigningKeyStore(
        auth_units_of_work(key_database),
        load_kek(generate_kek(), None, embedded_data_dir=None),
        clock=clock,
        access_token_ttl=TTL,
    )
    await store.ensure_active_key()
    return store


@pytest.fixture
def issuer(keys: SigningKeyStore, clock: Clock) -> AccessTokenIssuer:
    return AccessTokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, ttl=TTL, clock=clock)


@dataclass
class CountingFetch:
    """Serves the store's JWKS and counts the calls; can be told to fail."""

    keys: SigningKeyStore
    calls: int = 0
    failing: bool = False
    # When set, each fetch waits for it: a fetch that is still under way.
    gate: asyncio.Event | None = None

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionError("auth is down")
        return await self.keys.jwks()


@pytest.fixture
def fetch(keys: SigningKeyStore) -> CountingFetch:
    return CountingFetch(keys)


@pytest.fixture
def revocations(clock: Clock) -> InMemoryRevocationList:
    return InMemoryRevocationList(clock=clock)


@pytest.fixture
def verifier(
    fetch: CountingFetch, clock: Clock, ticker: Ticker, revocations: InMemoryRevocationList
) -> CachedJwksVerifier:
    return CachedJwksVerifier(
        fetch,
        rules=RULES,
        cache_ttl_s=300,
        min_refetch_interval_s=5,
        revocations=revocations,
        clock=clock,
        monotonic=ticker,
    )


async def _issue(issuer: AccessTokenIssuer, session_id: str = "session-1") -> str:
    issued = await issuer.issue("user-1", session_id, "pro", ["user", "admin"])
    return issued.token


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    decode = lambda part: json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # noqa: E731
    return decode(header), decode(payload), signature


def _assemble(header: dict[str, Any], payload: dict[str, Any], signature: str) -> str:
    encode = lambda part: _b64(json.dumps(part).encode())  # noqa: E731
    return f"{encode(header)}.{encode(payload)}.{signature}"


async def test_issued_token_has_exactly_the_contract_header_and_claims(
    issuer: AccessTokenIssuer, keys: SigningKeyStore, clock: Clock
) -> None:
    issued = await issuer.issue("user-1", "session-1", "pro", ("user", "admin"))
    header, claims, _ = _segments(issued.token)
    active = await keys.active_signing_key()
    assert header == {"alg": "EdDSA", "kid": active.kid, "typ": "JWT"}
    assert set(claims) == {"sub", "sid", "plan", "roles", "iss", "aud", "iat", "nbf", "exp", "jti"}
    assert claims["sub"] == "user-1"
    assert claims["sid"] == "session-1"
    assert claims["plan"] == "pro"
    assert claims["roles"] == ["user", "admin"]
    assert (claims["iss"], claims["aud"]) == (ISSUER, AUDIENCE)
    assert claims["iat"] == claims["nbf"] == int(START.timestamp())
    assert claims["exp"] - claims["iat"] == 900
    assert issued.expires_at == START + TTL
    assert claims["jti"] == issued.jti
    assert issued.token not in repr(issued)
    again = await issuer.issue("user-1", "session-1", "pro", ["user"])
    assert again.jti != issued.jti


async def test_a_real_token_verifies_to_its_identity(
    verifier: CachedJwksVerifier, issuer: AccessTokenIssuer
) -> None:
    identity = await verifier.verify(await _issue(issuer))
    assert identity == Identity(
        user_id="user-1",
        session_id="session-1",
        plan="pro",
        roles=frozenset({"user", "admin"}),
        auth_method="jwt",
    )


# Each forgery gets the genuine token, the genuine signing key and its kid, and returns a forged token.
Forgery = Callable[[str, Ed25519PrivateKey, str], str]


def _alg_none(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    header, claims, _ = _segments(token)
    return _assemble({**header, "alg": "none"}, claims, "")


def _hmac_with(secret_of: Callable[[Ed25519PrivateKey], bytes]) -> Forgery:
    """The confusion attack: HS256 keyed with the (public) verification key."""

    def forge(token: str, key: Ed25519PrivateKey, kid: str) -> str:
        header, claims, _ = _segments(token)
        unsigned = _assemble({**header, "alg": "HS256"}, {**claims, "roles": ["admin"]}, "")[:-1]
        signature = hmac.new(secret_of(key), unsigned.encode(), hashlib.sha256).digest()
        return f"{unsigned}.{_b64(signature)}"

    return forge


def _header_alg(algorithm: str) -> Forgery:
    """A genuine signature under a header claiming another asymmetric algorithm."""

    def forge(token: str, key: Ed25519PrivateKey, kid: str) -> str:
        header, claims, signature = _segments(token)
        return _assemble({**header, "alg": algorithm}, claims, signature)

    return forge


def _resigned(**changes: Any) -> Forgery:
    """Signed with the genuine key, but with claims changed (a None value drops the claim)."""

    def forge(token: str, key: Ed25519PrivateKey, kid: str) -> str:
        _, claims, _ = _segments(token)
        claims.update(changes)
        claims = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"})

    return forge


def _unknown_kid(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    _, claims, _ = _segments(token)
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "made-up-kid"})


def _no_kid(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    _, claims, _ = _segments(token)
    return jwt.encode(claims, key, algorithm="EdDSA")


def _tampered_payload(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    header, claims, signature = _segments(token)
    return _assemble(header, {**claims, "roles": ["user", "admin", "superuser"]}, signature)


def _tampered_signature(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    head, payload, signature = token.split(".")
    # The first character carries six signature bits (the last one partly carries padding).
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return f"{head}.{payload}.{flipped}"


def _other_key(token: str, key: Ed25519PrivateKey, kid: str) -> str:
    _, claims, _ = _segments(token)
    return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid})


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _pem_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


FORGERIES: list[tuple[str, Forgery, str]] = [
    ("alg none", _alg_none, "TOKEN_INVALID/algorithm"),
    ("HS256 keyed with the raw public key", _hmac_with(_raw_public), "TOKEN_INVALID/algorithm"),
    ("HS256 keyed with the PEM public key", _hmac_with(_pem_public), "TOKEN_INVALID/algorithm"),
    ("RS256 header on an Ed25519 key", _header_alg("RS256"), "TOKEN_INVALID/algorithm"),
    ("ES256 header on an Ed25519 key", _header_alg("ES256"), "TOKEN_INVALID/algorithm"),
    ("unknown kid", _unknown_kid, "TOKEN_INVALID/unknown_kid"),
    ("no kid", _no_kid, "TOKEN_INVALID/missing_kid"),
    ("wrong iss", _resigned(iss="evil-issuer"), "TOKEN_INVALID/issuer"),
    ("wrong aud", _resigned(aud="other-api"), "TOKEN_INVALID/audience"),
    ("expired", _resigned(exp=int(START.timestamp()) - 1), "TOKEN_EXPIRED"),
    ("expiring this instant", _resigned(exp=int(START.timestamp())), "TOKEN_EXPIRED"),
    ("tampered payload", _tampered_payload, "TOKEN_INVALID/signature"),
    ("tampered signature", _tampered_signature, "TOKEN_INVALID/signature"),
    ("signed by another key under the real kid", _other_key, "TOKEN_INVALID/signature"),
    ("missing exp", _resigned(exp=None), "TOKEN_INVALID/missing_claim"),
    ("missing sub", _resigned(sub=None), "TOKEN_INVALID/missing_claim"),
    ("missing iat", _resigned(iat=None), "TOKEN_INVALID/missing_claim"),
    ("missing nbf", _resigned(nbf=None), "TOKEN_INVALID/missing_claim"),
    ("missing iss", _resigned(iss=None), "TOKEN_INVALID/missing_claim"),
    ("missing aud", _resigned(aud=None), "TOKEN_INVALID/missing_claim"),
    ("empty sub", _resigned(sub=""), "TOKEN_INVALID/claims"),
    ("exp not a number", _resigned(exp="tomorrow"), "TOKEN_INVALID/claims"),
    ("iat not whole seconds", _resigned(iat=START.timestamp() + 0.5), "TOKEN_INVALID/claims"),
    ("roles not a list", _resigned(roles="admin"), "TOKEN_INVALID/claims"),
    (
        "a 48-hour lifetime",
        _resigned(exp=int(START.timestamp()) + 48 * 3600),
        "TOKEN_INVALID/lifetime",
    ),
    (
        "a 48-hour lifetime, nearly over",
        _resigned(
            iat=int(START.timestamp()) - 47 * 3600,
            nbf=int(START.timestamp()) - 47 * 3600,
            exp=int(START.timestamp()) + 3600,
        ),
        "TOKEN_INVALID/lifetime",
    ),
    ("issued in the future", _resigned(iat=int(START.timestamp()) + 3600), "TOKEN_INVALID/issued_in_future"),
    ("not valid yet", _resigned(nbf=int(START.timestamp()) + 3600), "TOKEN_INVALID/not_yet_valid"),
    ("garbage", lambda token, key, kid: "not-a-jwt", "TOKEN_INVALID/malformed"),
]


@pytest.mark.parametrize(
    ("forgery", "reason"), [(f, r) for _, f, r in FORGERIES], ids=[n for n, _, _ in FORGERIES]
)
async def test_forged_tokens_are_refused_with_their_exact_reason(
    verifier: CachedJwksVerifier,
    issuer: AccessTokenIssuer,
    keys: SigningKeyStore,
    forgery: Forgery,
    reason: str,
) -> None:
    active = await keys.active_signing_key()
    forged = forgery(await _issue(issuer), active.private_key, active.kid)
    with pytest.raises(Unauthenticated) as error:
        await verifier.verify(forged)
    assert _reason(error) == reason


async def test_missing_claim_names_the_claim(
    verifier: CachedJwksVerifier, issuer: AccessTokenIssuer, keys: SigningKeyStore
) -> None:
    active = await keys.active_signing_key()
    forged = _resigned(exp=None)(await _issue(issuer), active.private_key, active.kid)
    with pytest.raises(Unauthenticated) as error:
        await verifier.verify(forged)
    assert error.value.metadata == {"cause": "missing_claim", "claim": "exp"}


async def test_rotation_keeps_old_tokens_valid_until_they_expire_then_drops_the_old_key(
    verifier: CachedJwksVerifier,
    issuer: AccessTokenIssuer,
    keys: SigningKeyStore,
    fetch: CountingFetch,
    clock: Clock,
    ticker: Ticker,
) -> None:
    old_key = await keys.active_signing_key()
    old_token = await _issue(issuer)
    await verifier.verify(old_token)
    assert fetch.calls == 1

    clock.advance(minutes=5)
    new_kid = await keys.rotate()
    assert new_kid != old_key.kid
    new_token = await _issue(issuer)
    assert _segments(new_token)[0]["kid"] == new_kid

    # The cached set predates the rotation, and the refetch budget was spent moments ago.
    with pytest.raises(Unauthenticated) as too_soon:
        await verifier.verify(new_token)
    assert _reason(too_soon) == "TOKEN_INVALID/unknown_kid"
    assert fetch.calls == 1
    ticker.now += 5
    assert (await verifier.verify(new_token)).user_id == "user-1"
    assert fetch.calls == 2

    # Tokens signed before the rotation keep verifying...
    assert (await verifier.verify(old_token)).user_id == "user-1"
    # ...until their own expiry (issued at START, so 10 minutes after the rotation).
    clock.advance(minutes=10)
    with pytest.raises(Unauthenticated) as expired:
        await verifier.verify(old_token)
    assert _reason(expired) == "TOKEN_EXPIRED"

    # The retired key is published for the token lifetime plus the replicas' refresh interval.
    retired_at = START + timedelta(minutes=5)
    window = keys.publication_window
    assert window >= TTL
    published = await keys.jwks(retired_at + window - timedelta(seconds=1))
    assert [key["kid"] for key in published["keys"]] == [new_kid, old_key.kid]
    gone = await keys.jwks(retired_at + window)
    assert [key["kid"] for key in gone["keys"]] == [new_kid]

    # Once the verifier's cache expires it forgets the old key: even a fresh token under it fails.
    clock.now = retired_at + window
    ticker.now += 300
    fresh_under_old_key = _resigned(iat=int(clock.now.timestamp()), exp=int(clock.now.timestamp()) + 60)(
        old_token, old_key.private_key, old_key.kid
    )
    with pytest.raises(Unauthenticated) as unknown:
        await verifier.verify(fresh_under_old_key)
    assert _reason(unknown) == "TOKEN_INVALID/unknown_kid"
    assert (await verifier.verify(await _issue(issuer))).user_id == "user-1"


async def test_unknown_kids_cannot_hammer_the_jwks_endpoint(
    verifier: CachedJwksVerifier,
    issuer: AccessTokenIssuer,
    keys: SigningKeyStore,
    fetch: CountingFetch,
    ticker: Ticker,
) -> None:
    active = await keys.active_signing_key()
    genuine = await _issue(issuer)
    forged = [
        jwt.encode(_segments(genuine)[1], active.private_key, algorithm="EdDSA", headers={"kid": f"kid-{n}"})
        for n in range(20)
    ]
    for token in forged:
        with pytest.raises(Unauthenticated):
            await verifier.verify(token)
    assert fetch.calls == 1  # the first fetch only; the budget was spent by it

    ticker.now += 5
    results = await asyncio.gather(*(verifier.verify(token) for token in forged), return_exceptions=True)
    assert all(isinstance(result, Unauthenticated) for result in results)
    assert fetch.calls == 2  # twenty concurrent unknown kids, one refetch


async def test_calls_during_the_first_fetch_wait_for_its_keys(
    verifier: CachedJwksVerifier, issuer: AccessTokenIssuer, fetch: CountingFetch
) -> None:
    token = await _issue(issuer)
    fetch.gate = asyncio.Event()
    first = asyncio.create_task(verifier.verify(token))
    while fetch.calls == 0:
        await asyncio.sleep(0)
    # These arrive while the first fetch is under way, within the refetch budget it spent.
    others = [asyncio.create_task(verifier.verify(token)) for _ in range(3)]
    await asyncio.sleep(0)
    fetch.gate.set()
    identities = await asyncio.gather(first, *others)
    assert {identity.user_id for identity in identities} == {"user-1"}
    assert fetch.calls == 1


async def test_a_failing_fetch_keeps_the_cached_keys_and_no_keys_is_unavailable(
    verifier: CachedJwksVerifier, issuer: AccessTokenIssuer, fetch: CountingFetch, ticker: Ticker
) -> None:
    token = await _issue(issuer)
    fetch.failing = True
    with pytest.raises(Unavailable) as unavailable:
        await verifier.verify(token)
    assert unavailable.value.reason == "SERVICE_UNAVAILABLE"
    assert unavailable.value.metadata == {"dependency": "jwks"}
    # Within the refetch interval nobody asks again.
    with pytest.raises(Unavailable):
        await verifier.verify(token)
    assert fetch.calls == 1

    fetch.failing = False
    ticker.now += 5
    assert (await verifier.verify(token)).user_id == "user-1"

    fetch.failing = True
    ticker.now += 3600  # long past the cache TTL: the refetch fails, the stale keys still verify
    assert (await verifier.verify(token)).user_id == "user-1"
    assert fetch.calls == 3


async def test_revoked_sessions_and_users_are_refused(
    verifier: CachedJwksVerifier, issuer: AccessTokenIssuer, revocations: InMemoryRevocationList, clock: Clock
) -> None:
    first = await _issue(issuer, session_id="session-1")
    second = await _issue(issuer, session_id="session-2")
    await revocations.revoke_session("session-1", until=clock() + TTL)
    with pytest.raises(Unauthenticated) as revoked:
        await verifier.verify(first)
    assert _reason(revoked) == "SESSION_REVOKED"
    assert (await verifier.verify(second)).session_id == "session-2"

    clock.advance(seconds=30)
    await revocations.revoke_user_tokens_before("user-1", clock(), until=clock() + TTL)
    with pytest.raises(Unauthenticated) as user_revoked:
        await verifier.verify(second)
    assert _reason(user_revoked) == "SESSION_REVOKED"
    clock.advance(seconds=1)
    assert (await verifier.verify(await _issue(issuer, session_id="session-3"))).session_id == "session-3"


# ---------------------------------------------------------------------------------------------------
# The resolver: gateway headers, bearer, cookies and CSRF.
# ---------------------------------------------------------------------------------------------------


async def test_identity_headers_are_believed_from_the_gateway_only() -> None:
    resolver = IdentityResolver(token_verifier=NoTokenVerifier())
    headers = {
        "x-parley-user-id": "u1",
        "x-parley-roles": encode_roles_header(["user", "admin"]),
        "x-parley-plan": "team",
        "x-parley-auth-method": "api_key",
        "cookie": f"{ACCESS_TOKEN_COOKIE}=garbage",
    }
    identity = await resolver.resolve(headers, POST_METHOD, from_gateway=True)
    assert identity.user_id == "u1"
    assert identity.roles == frozenset({"user", "admin"})
    assert identity.auth_method == "api_key"

    # From any other caller (its certificate names another workload), every identity header is refused.
    for header in ("x-parley-user-id", "x-parley-roles", "x-parley-token-issued-at", "x-parley-session-id"):
        with pytest.raises(Unauthenticated) as spoofed:
            await resolve_strictly(resolver, {header: "u1"})
        assert _reason(spoofed) == "UNTRUSTED_IDENTITY/identity_headers"


def _vouched(auth_method: str | None = None, **times: int | str | None) -> dict[str, str]:
    """Gateway headers for a token-based identity issued at START and valid for TTL; `times` (iat,
    nbf, exp) override the time headers, None dropping one, as for a token that lacked the claim."""
    values: dict[str, int | str | None] = {"iat": NOW, "nbf": NOW, "exp": NOW + 900}
    values.update(times)
    names = {"iat": "issued-at", "nbf": "not-before", "exp": "expires-at"}
    headers = {
        "x-parley-user-id": "user-1",
        "x-parley-session-id": "session-1",
        "x-parley-roles": encode_roles_header(["user"]),
        **{
            f"x-parley-token-{names[claim]}": str(value)
            for claim, value in values.items()
            if value is not None
        },
    }
    if auth_method is not None:
        headers["x-parley-auth-method"] = auth_method
    return headers


@pytest.fixture
def gateway_resolver(clock: Clock, revocations: InMemoryRevocationList) -> IdentityResolver:
    return IdentityResolver(token_verifier=NoTokenVerifier(), revocations=revocations, clock=clock)


@pytest.mark.parametrize("auth_method", [None, "jwt", "cookie"])
async def test_a_vouched_token_identity_with_its_time_claims_is_accepted(
    gateway_resolver: IdentityResolver, auth_method: str | None
) -> None:
    identity = await resolve_strictly(gateway_resolver, _vouched(auth_method), from_gateway=True)
    assert (identity.user_id, identity.session_id, identity.auth_method) == (
        "user-1",
        "session-1",
        auth_method or "jwt",  # jwt_authn sets no auth-method header
    )


@pytest.mark.parametrize(
    ("times", "reason"),
    [
        pytest.param({"iat": None}, "TOKEN_INVALID/missing_claim", id="no-iat"),
        pytest.param({"nbf": None}, "TOKEN_INVALID/missing_claim", id="no-nbf"),
        pytest.param({"exp": None}, "TOKEN_INVALID/missing_claim", id="no-exp"),
        pytest.param({"iat": "", "nbf": "", "exp": ""}, "TOKEN_INVALID/missing_claim", id="empty-headers"),
        # Envoy lets `exp` run late by its clock skew; the service does not.
        pytest.param({"exp": NOW - 20}, "TOKEN_EXPIRED", id="expired-within-envoys-skew"),
        pytest.param(
            {"iat": NOW + 3600, "exp": NOW + 4000}, "TOKEN_INVALID/issued_in_future", id="iat-ahead"
        ),
        pytest.param({"nbf": NOW + 3600}, "TOKEN_INVALID/not_yet_valid", id="nbf-ahead"),
        # Envoy's max_lifetime bounds `exp - now` only.
        pytest.param(
            {"iat": NOW - 47 * 3600, "nbf": NOW - 47 * 3600, "exp": NOW + 3600},
            "TOKEN_INVALID/lifetime",
            id="48h-lifetime",
        ),
    ],
)
@pytest.mark.parametrize("auth_method", [None, "cookie"])
async def test_a_vouched_token_identity_breaking_a_token_rule_is_refused(
    gateway_resolver: IdentityResolver,
    auth_method: str | None,
    times: dict[str, int | str | None],
    reason: str,
) -> None:
    identity = await gateway_resolver.resolve(_vouched(auth_method, **times), from_gateway=True)
    assert not identity.is_authenticated
    with pytest.raises(Unauthenticated) as refused:
        identity.require_user()
    assert _reason(refused) == reason


async def test_a_vouched_identity_is_refused_once_its_session_or_user_is_revoked(
    gateway_resolver: IdentityResolver, revocations: InMemoryRevocationList, clock: Clock
) -> None:
    await revocations.revoke_session("session-1", until=clock() + TTL)
    for auth_method in (None, "cookie"):
        with pytest.raises(Unauthenticated) as revoked:
            await resolve_strictly(gateway_resolver, _vouched(auth_method), from_gateway=True)
        assert _reason(revoked) == "SESSION_REVOKED"
        # Without its `iat` the identity is refused all the same, never waved through.
        with pytest.raises(Unauthenticated) as no_iat:
            await resolve_strictly(gateway_resolver, _vouched(auth_method, iat=None), from_gateway=True)
        assert _reason(no_iat) == "TOKEN_INVALID/missing_claim"

    other_session = {**_vouched(), "x-parley-session-id": "session-2"}
    assert (
        await resolve_strictly(gateway_resolver, other_session, from_gateway=True)
    ).session_id == "session-2"
    clock.advance(seconds=5)
    await revocations.revoke_user_tokens_before("user-1", clock(), until=clock() + TTL)
    with pytest.raises(Unauthenticated) as cut_off:
        await resolve_strictly(gateway_resolver, other_session, from_gateway=True)
    assert _reason(cut_off) == "SESSION_REVOKED"
    issued_after = int(clock().timestamp()) + 1
    later = {
        **_vouched(iat=issued_after, nbf=issued_after, exp=issued_after + 900),
        "x-parley-session-id": "s-3",
    }
    assert (await resolve_strictly(gateway_resolver, later, from_gateway=True)).session_id == "s-3"


async def test_an_api_key_identity_carries_no_token_and_needs_no_time_claims(
    gateway_resolver: IdentityResolver, revocations: InMemoryRevocationList, clock: Clock
) -> None:
    headers = {key: value for key, value in _vouched("api_key").items() if "-token-" not in key}
    del headers["x-parley-session-id"]
    assert (await resolve_strictly(gateway_resolver, headers, from_gateway=True)).auth_method == "api_key"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(_vouched(iat="1.7e9"), id="iat-not-digits"),
        pytest.param(_vouched(exp="-5"), id="exp-negative"),
        pytest.param(_vouched(nbf="\u00b2"), id="nbf-a-unicode-digit"),
        pytest.param(_vouched("password"), id="unknown-auth-method"),
    ],
)
async def test_vouched_headers_no_gateway_of_ours_sets_are_a_gateway_fault(
    gateway_resolver: IdentityResolver, headers: dict[str, str]
) -> None:
    with pytest.raises(Unauthenticated) as refused:
        await gateway_resolver.resolve(headers, from_gateway=True)
    assert _reason(refused) == "UNTRUSTED_IDENTITY/identity_headers"


async def test_roles_header_is_base64_json_and_anything_else_is_a_gateway_fault() -> None:
    # jwt_authn copies the `roles` claim as base64 of its JSON; every credential uses that format.
    assert encode_roles_header(["user", "admin"]) == base64.b64encode(b'["user","admin"]').decode()
    assert decode_roles_header(encode_roles_header(["user", "admin"])) == frozenset({"user", "admin"})
    assert decode_roles_header("") == frozenset()

    resolver = IdentityResolver(token_verifier=NoTokenVerifier())
    for malformed in ("user,admin", base64.b64encode(b"not json").decode()):
        with pytest.raises(Unauthenticated) as refused:
            await resolver.resolve({"x-parley-user-id": "u1", "x-parley-roles": malformed}, from_gateway=True)
        assert _reason(refused) == "UNTRUSTED_IDENTITY/identity_headers"


async def test_no_credentials_is_anonymous_and_bearer_without_jwks_is_refused() -> None:
    resolver = IdentityResolver(token_verifier=NoTokenVerifier())
    assert await resolver.resolve({}) is ANONYMOUS
    assert await resolver.resolve({"cookie": "theme=dark; lang=en"}, POST_METHOD) is ANONYMOUS
    with pytest.raises(Unauthenticated) as error:
        await resolve_strictly(resolver, {"authorization": "Bearer abc"})
    assert _reason(error) == "TOKEN_INVALID/no_verification_keys"
    with pytest.raises(Unauthenticated) as basic:
        await resolve_strictly(resolver, {"authorization": "Basic abc"})
    assert _reason(basic) == "TOKEN_INVALID/malformed"


async def test_role_requirements() -> None:
    with pytest.raises(Unauthenticated):
        ANONYMOUS.require_user()
    resolver = IdentityResolver(token_verifier=NoTokenVerifier())
    user = await resolver.resolve(
        {
            "x-parley-user-id": "u",
            "x-parley-roles": encode_roles_header(["user"]),
            "x-parley-auth-method": "api_key",
        },
        from_gateway=True,
    )
    with pytest.raises(PermissionDenied) as error:
        user.require_role("admin")
    assert error.value.reason == "PERMISSION_DENIED"


def test_safe_methods_come_from_the_http_rules() -> None:
    is_safe = SafeMethods()
    assert is_safe(GET_METHOD)
    assert is_safe("/parley.auth.v1.AuthService/GetJwks")
    assert not is_safe(PATCH_METHOD)
    assert not is_safe(POST_METHOD)
    assert not is_safe("/parley.auth.v1.AuthService/RevokeSession")  # DELETE
    assert not is_safe(INTERNAL_METHOD)  # no HTTP rule
    assert not is_safe("/parley.nope.v1.Nothing/Here")  # unknown
    assert not is_safe("")
    assert not is_safe("not a method")


def test_cookie_header_parsing() -> None:
    assert parse_cookies('a=1; b="two" ;c=3=3; junk; =x; a=4') == {
        "a": ["1", "4"],
        "b": ["two"],
        "c": ["3=3"],
    }


@pytest.fixture
def resolver(verifier: CachedJwksVerifier) -> IdentityResolver:
    return IdentityResolver(token_verifier=verifier)


def _cookie(access: str | None, csrf: str | None = None, *extra: str) -> str:
    parts = [*extra]
    if access is not None:
        parts.append(f"{ACCESS_TOKEN_COOKIE}={access}")
    if csrf is not None:
        parts.append(f"{CSRF_COOKIE}={csrf}")
    return "; ".join(parts)


async def test_cookie_credentials_on_safe_methods_need_no_csrf_token(
    resolver: IdentityResolver, issuer: AccessTokenIssuer
) -> None:
    token = await _issue(issuer)
    identity = await resolver.resolve({"cookie": _cookie(token, None, "theme=dark")}, GET_METHOD)
    assert (identity.user_id, identity.auth_method) == ("user-1", "cookie")


@pytest.mark.parametrize(
    ("method", "csrf_cookie", "csrf_header", "outcome"),
    [
        (PATCH_METHOD, "c5rf", "c5rf", "cookie"),
        (PATCH_METHOD, "c5rf", None, "CSRF_TOKEN_MISSING/header"),
        (PATCH_METHOD, "c5rf", "", "CSRF_TOKEN_MISSING/header"),
        (PATCH_METHOD, None, "c5rf", "CSRF_TOKEN_MISSING/cookie"),
        (PATCH_METHOD, "c5rf", "other", "CSRF_TOKEN_MISMATCH"),
        (PATCH_METHOD, "c5rf", "c5rF", "CSRF_TOKEN_MISMATCH"),
        (POST_METHOD, "c5rf", None, "CSRF_TOKEN_MISSING/header"),
        (INTERNAL_METHOD, "c5rf", None, "CSRF_TOKEN_MISSING/header"),
        ("", "c5rf", None, "CSRF_TOKEN_MISSING/header"),
        (GET_METHOD, "c5rf", "other", "cookie"),
    ],
)
async def test_state_changing_cookie_calls_need_the_double_submitted_csrf_token(
    resolver: IdentityResolver,
    issuer: AccessTokenIssuer,
    method: str,
    csrf_cookie: str | None,
    csrf_header: str | None,
    outcome: str,
) -> None:
    metadata = {"cookie": _cookie(await _issue(issuer), csrf_cookie)}
    if csrf_header is not None:
        metadata[CSRF_HEADER] = csrf_header
    if outcome == "cookie":
        assert (await resolver.resolve(metadata, method)).auth_method == "cookie"
        return
    with pytest.raises(PermissionDenied) as error:
        await resolve_strictly(resolver, metadata, method)
    assert _reason(error) == outcome


async def test_cookie_tokens_are_verified_like_bearer_tokens(
    resolver: IdentityResolver, issuer: AccessTokenIssuer, keys: SigningKeyStore
) -> None:
    active = await keys.active_signing_key()
    forged = _hmac_with(_raw_public)(await _issue(issuer), active.private_key, active.kid)
    with pytest.raises(Unauthenticated) as forged_error:
        await resolve_strictly(resolver, {"cookie": _cookie(forged, "x"), CSRF_HEADER: "x"}, PATCH_METHOD)
    assert _reason(forged_error) == "TOKEN_INVALID/algorithm"
    # The token is checked before the CSRF token, so a bad cookie is UNAUTHENTICATED, not 403.
    with pytest.raises(Unauthenticated) as empty:
        await resolve_strictly(resolver, {"cookie": _cookie("")}, PATCH_METHOD)
    assert _reason(empty) == "TOKEN_INVALID/malformed"


async def test_conflicting_duplicate_cookies_are_refused(
    resolver: IdentityResolver, issuer: AccessTokenIssuer
) -> None:
    token = await _issue(issuer)
    with pytest.raises(PermissionDenied) as csrf:
        await resolve_strictly(
            resolver,
            {"cookie": _cookie(token, "one", f"{CSRF_COOKIE}=two"), CSRF_HEADER: "one"},
            PATCH_METHOD,
        )
    assert _reason(csrf) == "CSRF_TOKEN_MISMATCH/duplicate_cookie"
    with pytest.raises(Unauthenticated) as access:
        await resolve_strictly(
            resolver, {"cookie": _cookie(token, None, f"{ACCESS_TOKEN_COOKIE}=other")}, GET_METHOD
        )
    assert _reason(access) == "TOKEN_INVALID/duplicate_cookie"


async def test_a_bearer_token_wins_over_cookies_and_needs_no_csrf(
    resolver: IdentityResolver, issuer: AccessTokenIssuer
) -> None:
    token = await _issue(issuer)
    identity = await resolver.resolve(
        {"authorization": f"Bearer {token}", "cookie": _cookie("garbage")}, PATCH_METHOD
    )
    assert identity.auth_method == "jwt"


# ---------------------------------------------------------------------------------------------------
# Over real gRPC: the interceptor, and the JWKS fetched from AuthService.GetJwks.
# ---------------------------------------------------------------------------------------------------


class JwksOnlyAuth(auth_pb2_grpc.AuthServiceServicer):
    """AuthService with GetJwks, and two RPCs that only echo the signed-in caller."""

    def __init__(self, keys: SigningKeyStore) -> None:
        self._keys = keys

    async def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetCurrentUserResponse:
        caller = current_identity.get().require_user()
        return auth_pb2.GetCurrentUserResponse(user=auth_pb2.User(id=caller.user_id))

    async def UpdateCurrentUser(
        self, request: auth_pb2.UpdateCurrentUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UpdateCurrentUserResponse:
        caller = current_identity.get().require_user()
        return auth_pb2.UpdateCurrentUserResponse(user=auth_pb2.User(id=caller.user_id))

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(
            content_type="application/json", data=json.dumps(await self._keys.jwks()).encode()
        )


@pytest.fixture
async def auth_server(
    keys: SigningKeyStore, service_pki: ServicePki
) -> AsyncIterator[Callable[[CachedJwksVerifier | None], Awaitable[int]]]:
    """Starts servers hosting JwksOnlyAuth; the argument is the verifier their identity chain uses."""
    servers = []

    async def start(verifier: CachedJwksVerifier | None) -> int:
        server, port = create_server(
            load_settings(grpc_port=0, metrics_port=0, health_probe_interval_s=60),
            ServerDeps(
                services=[
                    ServiceRegistration(
                        "parley.auth.v1.AuthService",
                        JwksOnlyAuth(keys),  # type: ignore[abstract]
                        auth_pb2_grpc.add_AuthServiceServicer_to_server,
                    )
                ],
                identity=IdentityResolver(token_verifier=verifier or NoTokenVerifier()),
                registry=new_registry(),
                tracer_provider=create_tracer_provider(service="test", otlp_endpoint=None),
                tls=service_pki.files(SERVICES),
            ),
        )
        await server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        await server.stop()


async def test_over_grpc_the_jwks_is_fetched_and_cookie_calls_are_csrf_checked(
    auth_server: Callable[[CachedJwksVerifier | None], Awaitable[int]],
    issuer: AccessTokenIssuer,
    clock: Clock,
    service_pki: ServicePki,
) -> None:
    jwks_port = await auth_server(None)
    # A service that verifies tokens itself fetches the JWKS as its own workload.
    async with service_pki.channel(f"127.0.0.1:{jwks_port}", as_="chat") as jwks_channel:
        verifier = CachedJwksVerifier(grpc_jwks_fetcher(jwks_channel), rules=RULES, clock=clock)
        port = await auth_server(verifier)
        # A direct caller with its own token: the operator's grpcurl, say.
        async with service_pki.channel(f"127.0.0.1:{port}", as_="operator") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            token = await _issue(issuer)

            # A safe method: the cookie alone authenticates.
            safe = await stub.GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(), metadata=(("cookie", _cookie(token)),)
            )
            assert safe.user.id == "user-1"

            # A state-changing one without the CSRF header: 403 as soon as it asks for the caller.
            update = auth_pb2.UpdateCurrentUserRequest(user=auth_pb2.User(display_name="Ada"))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.UpdateCurrentUser(update, metadata=(("cookie", _cookie(token, "t0k")),))
            assert missing.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = rich_status(missing.value)["ErrorInfo"]
            assert isinstance(info, error_details_pb2.ErrorInfo)
            assert (info.reason, dict(info.metadata)) == ("CSRF_TOKEN_MISSING", {"cause": "header"})

            # Cookies split over several `cookie` entries are read together.
            passed = await stub.UpdateCurrentUser(
                update,
                metadata=(
                    ("cookie", f"{ACCESS_TOKEN_COOKIE}={token}"),
                    ("cookie", f"{CSRF_COOKIE}=t0k"),
                    (CSRF_HEADER, "t0k"),
                ),
            )
            assert passed.user.id == "user-1"

            with pytest.raises(grpc.aio.AioRpcError) as forged:
                await stub.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=(("authorization", f"Bearer {token}x"),)
                )
            assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
            forged_info = rich_status(forged.value)["ErrorInfo"]
            assert isinstance(forged_info, error_details_pb2.ErrorInfo)
            assert forged_info.reason == "TOKEN_INVALID"


async def test_the_auth_process_can_verify_with_its_own_store(
    keys: SigningKeyStore, issuer: AccessTokenIssuer, clock: Clock
) -> None:
    local = CachedJwksVerifier(keys.jwks, rules=RULES, clock=clock)
    assert (await local.verify(await _issue(issuer))).user_id == "user-1"


async def test_a_request_the_gateway_vouches_for_without_identity_uses_its_own_token(
    signing_key: Ed25519PrivateKey, static_verifier: JwksTokenVerifier
) -> None:
    """On an open route the gateway forwards the request without identity headers: its token decides."""
    resolver = IdentityResolver(token_verifier=static_verifier)
    identity = await resolver.resolve(
        {"authorization": f"Bearer {_token(signing_key, _claims())}"}, from_gateway=True
    )
    assert identity.user_id == "user-1"
    assert await resolver.resolve({}, from_gateway=True) is ANONYMOUS


async def test_a_refused_credential_leaves_the_caller_anonymous_until_a_user_is_required(
    static_verifier: JwksTokenVerifier,
) -> None:
    """A stale cookie or bad token must not lock a browser out of the open routes (sign-in)."""
    resolver = IdentityResolver(token_verifier=static_verifier)
    identity = await resolver.resolve(
        {"authorization": "Bearer not-a-jwt"}, "/parley.auth.v1.AuthService/Login"
    )
    assert not identity.is_authenticated
    with pytest.raises(Unauthenticated) as refused:
        identity.require_user()
    assert _reason(refused) == "TOKEN_INVALID/malformed"


async def test_the_issuer_waits_again_when_its_timer_fires_early(keys: SigningKeyStore, clock: Clock) -> None:
    """Event-loop timers can fire a millisecond early by the wall clock; a token stamped then would
    still be in the cutoff's second, so the issuer looks at the clock again before signing."""
    revocations = InMemoryRevocationList(clock=clock)
    slept: list[float] = []

    async def early_sleep(seconds: float) -> None:
        # As uvloop's timers do by the wall clock: a millisecond early, and at once below a millisecond.
        clock.advance(seconds=max(0.0, seconds - 0.001))
        slept.append(seconds)

    issuer = AccessTokenIssuer(
        keys,
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl=TTL,
        revocations=revocations,
        clock=clock,
        sleep=early_sleep,
    )
    clock.now = clock.now.replace(microsecond=200_000)
    await revocations.revoke_user_tokens_before("user-1", clock.now, clock.now + TTL)
    token = (await issuer.issue("user-1", "session-2", "pro", ["user"])).token
    iat = _segments(token)[1]["iat"]
    assert not await revocations.is_revoked("session-2", "user-1", datetime.fromtimestamp(iat, UTC))


async def test_the_issuer_waits_out_a_revocation_cutoffs_second(keys: SigningKeyStore, clock: Clock) -> None:
    """A token stamped in a cutoff's own second would be refused for its whole life; the issuer
    waits (at most a second) and stamps it after the cutoff instead."""
    revocations = InMemoryRevocationList(clock=clock)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds=seconds)

    issuer = AccessTokenIssuer(
        keys, issuer=ISSUER, audience=AUDIENCE, ttl=TTL, revocations=revocations, clock=clock, sleep=sleep
    )
    clock.now = clock.now.replace(microsecond=200_000)
    await revocations.revoke_user_tokens_before("user-1", clock.now, clock.now + TTL)
    clock.advance(seconds=0.1)
    token = (await issuer.issue("user-1", "session-2", "pro", ["user"])).token
    assert slept == [pytest.approx(0.705)]
    iat = _segments(token)[1]["iat"]
    assert iat == int(clock.now.timestamp())
    assert not await revocations.is_revoked("session-2", "user-1", datetime.fromtimestamp(iat, UTC))
    # Another user, or a later second, never waits.
    await issuer.issue("user-2", "session-3", "pro", ["user"])
    await issuer.issue("user-1", "session-2", "pro", ["user"])
    assert len(slept) == 1
