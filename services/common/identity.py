"""Who is calling: identity from gateway-set headers, or from an access JWT verified on a direct call
(as a bearer token or in the browser's access cookie, with a CSRF check on state-changing calls).

The credential itself is read by `services.common.credentials`, the same parser the gateway's check
uses; this module decides what a service accepts and verifies it."""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import jwt
from jwt import PyJWK

from services.common.clock import utc_now
from services.common.credentials import (
    check_csrf,
    double_submitted_csrf,
    invalid_token,
    presented_credential,
)
from services.common.errors import ParleyError, PermissionDenied, Unauthenticated, Unavailable
from services.common.safe_methods import SafeMethods
from services.common.token_rules import ALLOWED_ALGORITHMS, TokenRules, apply_to_vouched_claims

if TYPE_CHECKING:
    from services.common.revocation import RevocationList

logger = logging.getLogger(__name__)

# The header family only the gateway may set: Envoy removes every client-sent header with this prefix
# before any filter runs, and the gateway's own request headers (identity, the route's required
# role, version negotiation) all carry it. Services believe them only from the gateway's workload.
GATEWAY_HEADER_PREFIX: Final = "x-parley-"
USER_ID_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}user-id"
SESSION_ID_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}session-id"
PLAN_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}plan"
ROLES_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}roles"
AUTH_METHOD_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}auth-method"
# The time claims of the token behind a jwt or cookie identity, so services can apply the token rules
# Envoy cannot (`services.common.token_rules.apply_to_vouched_claims`) and refuse revoked sessions.
TOKEN_ISSUED_AT_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}token-issued-at"
TOKEN_NOT_BEFORE_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}token-not-before"
TOKEN_EXPIRES_AT_HEADER: Final = f"{GATEWAY_HEADER_PREFIX}token-expires-at"
TOKEN_TIME_HEADERS: Final = (
    (TOKEN_ISSUED_AT_HEADER, "iat"),
    (TOKEN_NOT_BEFORE_HEADER, "nbf"),
    (TOKEN_EXPIRES_AT_HEADER, "exp"),
)
IDENTITY_HEADERS: Final = (
    USER_ID_HEADER,
    SESSION_ID_HEADER,
    PLAN_HEADER,
    ROLES_HEADER,
    AUTH_METHOD_HEADER,
    *(header for header, _ in TOKEN_TIME_HEADERS),
)
# Envoy's jwt_authn copies these claims of a verified token into the identity headers (the array
# claim `roles` arrives as base64 of its JSON, which `decode_roles_header` reads; a claim the token
# lacks leaves its header out); the gateway's ext_authz check sets the same headers for the other
# credentials. jwt_authn sets no auth-method header: its identities are "jwt".
JWT_CLAIM_HEADERS: Final = (
    (USER_ID_HEADER, "sub"),
    (SESSION_ID_HEADER, "sid"),
    (PLAN_HEADER, "plan"),
    (ROLES_HEADER, "roles"),
    *TOKEN_TIME_HEADERS,
)
# The auth methods whose identity rests on an access token, checked against the token rules when the
# gateway vouches for them; an API key identity carries no token.
TOKEN_AUTH_METHODS: Final = frozenset({"jwt", "cookie"})
API_KEY_AUTH_METHOD: Final = "api_key"


@dataclass(frozen=True)
class Identity:
    """The authenticated principal of one call; `user_id` is empty for anonymous callers.

    `auth_method` is "anonymous", "jwt" (bearer token), "cookie" (browser session), or whatever the
    gateway asserted (e.g. "api_key").
    """

    user_id: str = ""
    session_id: str = ""
    plan: str = ""
    roles: frozenset[str] = field(default_factory=frozenset)
    auth_method: str = "anonymous"
    # Why the token or cookie the caller presented was refused. Such a caller is anonymous, so open
    # RPCs (sign-in with a stale cookie still in the browser) work; any RPC that needs a user
    # answers with this error instead of a generic UNAUTHENTICATED.
    credential_error: ParleyError | None = field(default=None, compare=False)

    @property
    def is_authenticated(self) -> bool:
        return bool(self.user_id)

    def require_user(self) -> Identity:
        if self.credential_error is not None:
            raise self.credential_error
        if not self.is_authenticated:
            raise Unauthenticated("This call needs a signed-in user.", reason="UNAUTHENTICATED")
        return self

    def require_role(self, role: str) -> Identity:
        self.require_user()
        if role not in self.roles:
            raise PermissionDenied(
                f"This call needs the {role!r} role.", reason="PERMISSION_DENIED", metadata={"role": role}
            )
        return self


ANONYMOUS = Identity()


class TokenVerifier(Protocol):
    """Turns an access token into an identity, or raises `Unauthenticated`."""

    async def verify(self, token: str) -> Identity: ...


class NoTokenVerifier:
    """Used when no keys are configured: every token is refused, honestly."""

    async def verify(self, token: str) -> Identity:
        raise Unauthenticated(
            "Bearer tokens cannot be verified on this server: no JWKS is configured.",
            reason="TOKEN_INVALID",
            metadata={"cause": "no_verification_keys"},
        )


def parse_jwks(jwks: Mapping[str, Any], *, strict: bool) -> dict[str, PyJWK]:
    """The verification keys of a JWK Set by kid.

    Only signature keys for `token_rules.ALLOWED_ALGORITHMS` with a `kid` are kept. `strict` (a configured
    file) raises on any other key; otherwise (a fetched set) such keys are skipped with a warning,
    so one odd key cannot take verification down.
    """
    raw_keys = jwks.get("keys")
    if not isinstance(raw_keys, list):
        raise TypeError("a JWKS needs a 'keys' list")
    keys: dict[str, PyJWK] = {}
    for raw in raw_keys:
        problem: str | None = None
        key: PyJWK | None = None
        try:
            key = PyJWK.from_dict(raw)
        except (jwt.PyJWTError, TypeError, ValueError, KeyError, AttributeError) as error:
            problem = f"unusable key ({type(error).__name__})"
        if key is not None:
            if not key.key_id:
                problem = "every JWKS key needs a 'kid'"
            elif key.algorithm_name not in ALLOWED_ALGORITHMS:
                problem = f"key {key.key_id!r} is for {key.algorithm_name}, not an accepted algorithm"
            elif isinstance(raw, Mapping) and raw.get("use", "sig") != "sig":
                problem = f"key {key.key_id!r} is not a signature key"
        if problem is not None or key is None:
            if strict:
                raise ValueError(problem)
            logger.warning("skipping a JWKS key: %s", problem)
            continue
        keys[str(key.key_id)] = key
    return keys


class _JwtVerifier(abc.ABC):
    """Verifies access tokens: the header, the signature, then the claims and revocation, all by the
    one rule set (`services.common.token_rules`); subclasses say where keys come from.

    In order: a parseable header; an accepted asymmetric `alg` and a `kid` (`TokenRules.check_header`);
    a known key for that kid whose own algorithm is the header's; a valid signature; then every claim
    rule and revocation (`TokenRules.apply`). Each failure has its own `cause`.
    """

    def __init__(
        self,
        *,
        rules: TokenRules,
        revocations: RevocationList | None,
        clock: Callable[[], datetime],
    ) -> None:
        self._rules = rules
        self._revocations = revocations
        self._clock = clock

    @abc.abstractmethod
    async def _key_for(self, kid: str) -> PyJWK | None:
        """The verification key named `kid`, or None if there is none."""

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid_token("The token is malformed.", "malformed") from None
        kid = self._rules.check_header(header)
        key = await self._key_for(kid)
        if key is None:
            raise invalid_token("The token's signing key is unknown.", "unknown_kid")
        if header["alg"] != key.algorithm_name:
            raise invalid_token("The token's algorithm is not accepted.", "algorithm")
        claims = _signed_claims(token, key)
        accepted = await self._rules.apply(header, claims, now=self._clock(), revocations=self._revocations)
        return Identity(
            user_id=accepted.subject,
            session_id=accepted.session_id,
            plan=accepted.plan,
            roles=accepted.roles,
            auth_method="jwt",
        )


def _signed_claims(token: str, key: PyJWK) -> dict[str, Any]:
    """The payload of a token whose signature `key` verifies; no claim is judged here."""
    try:
        payload = jwt.api_jws.decode(token, key=key.key, algorithms=[key.algorithm_name])
    except jwt.InvalidSignatureError:
        raise invalid_token("The token's signature is not valid.", "signature") from None
    except jwt.PyJWTError:
        raise invalid_token("The token is malformed.", "malformed") from None
    try:
        claims = json.loads(payload)
    except ValueError:
        claims = None
    if not isinstance(claims, dict):
        raise invalid_token("The token is malformed.", "malformed")
    return claims


class JwksTokenVerifier(_JwtVerifier):
    """Verifies access JWTs against a fixed JWKS (RFC 7517), e.g. a file, with pinned issuer and audience."""

    def __init__(
        self,
        jwks: Mapping[str, Any],
        *,
        rules: TokenRules,
        revocations: RevocationList | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        super().__init__(rules=rules, revocations=revocations, clock=clock)
        self._keys = parse_jwks(jwks, strict=True)

    @classmethod
    def from_file(
        cls, path: Path, *, rules: TokenRules, revocations: RevocationList | None = None
    ) -> JwksTokenVerifier:
        return cls(json.loads(path.read_text()), rules=rules, revocations=revocations)

    async def _key_for(self, kid: str) -> PyJWK | None:
        return self._keys.get(kid)


JwksFetcher = Callable[[], Awaitable[Mapping[str, Any]]]


class CachedJwksVerifier(_JwtVerifier):
    """Verifies access JWTs against the auth service's JWKS, fetched on demand and cached.

    The set is refetched when older than `cache_ttl_s`, and when a token names an unknown kid (how a
    rotation is noticed) - but never more than once per `min_refetch_interval_s`, so tokens with
    made-up kids cannot hammer the auth service. A failed fetch keeps the previous keys in use;
    with no keys at all, verification answers UNAVAILABLE rather than blaming the token.
    """

    def __init__(
        self,
        fetch_jwks: JwksFetcher,
        *,
        rules: TokenRules,
        cache_ttl_s: float = 300,
        min_refetch_interval_s: float = 5,
        revocations: RevocationList | None = None,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rules=rules, revocations=revocations, clock=clock)
        self._fetch_jwks = fetch_jwks
        self._cache_ttl_s = cache_ttl_s
        self._min_refetch_interval_s = min_refetch_interval_s
        self._monotonic = monotonic
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._fetching = asyncio.Lock()

    def _may_fetch(self) -> bool:
        """Whether the refetch budget allows a fetch now."""
        return (
            self._attempted_at is None
            or self._monotonic() - self._attempted_at >= self._min_refetch_interval_s
        )

    async def _key_for(self, kid: str) -> PyJWK | None:
        stale = self._fetched_at is None or self._monotonic() - self._fetched_at >= self._cache_ttl_s
        if stale:
            await self._refresh()
        if self._fetched_at is None:
            raise Unavailable(
                "Tokens cannot be verified right now: the signing keys are unavailable.",
                reason="SERVICE_UNAVAILABLE",
                metadata={"dependency": "jwks"},
            )
        key = self._keys.get(kid)
        if key is None:
            await self._refresh()
            key = self._keys.get(kid)
        return key

    async def _refresh(self) -> None:
        """Fetch the set if the budget allows; otherwise wait for a fetch already under way, so the
        calls that arrive while the first fetch runs use its keys instead of finding none."""
        if self._may_fetch():
            await self._refetch()
        elif self._fetching.locked():
            async with self._fetching:
                pass

    async def _refetch(self) -> None:
        wanted_at = self._monotonic()
        async with self._fetching:
            if self._attempted_at is not None and self._attempted_at >= wanted_at:
                return  # someone fetched while this call waited for the lock
            self._attempted_at = self._monotonic()
            try:
                keys = parse_jwks(await self._fetch_jwks(), strict=False)
            # Whatever the fetch raises (transport, JSON, shape), the keys already cached stay in use.
            except Exception as error:  # noqa: BLE001
                logger.warning("fetching the JWKS failed: %s: %s", type(error).__name__, error)
                return
            self._keys = keys
            self._fetched_at = self._attempted_at


class IdentityResolver:
    """Decides which identity a call carries, from its invocation metadata and method.

    In order: the identity headers of a call from the gateway's workload (its client certificate
    says so, see `services.common.service_tls`); identity headers from any other caller (refused);
    otherwise the credential the request presents (`presented_credential`): a bearer JWT, or the
    access cookie with the CSRF double-submit check on methods that are not safe; an API key is
    refused here (the gateway resolves those); nothing presented is anonymous.
    """

    def __init__(
        self,
        *,
        token_verifier: TokenVerifier,
        is_safe_method: Callable[[str], bool] | None = None,
        revocations: RevocationList | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._clock = clock
        self._token_verifier = token_verifier
        self._is_safe_method = is_safe_method or SafeMethods()
        self._revocations = revocations

    async def resolve(
        self, metadata: Mapping[str, str], method: str = "", *, from_gateway: bool = False
    ) -> Identity:
        """The caller of `method` (`/pkg.Service/Method`; empty counts as not safe); `from_gateway`:
        the call's peer proved to be the gateway's workload."""
        if from_gateway:
            if metadata.get(USER_ID_HEADER):
                return await self._from_gateway_headers(metadata)
            # The gateway vouched for no one (an open route, or a credential it leaves to the
            # services): the request's own token or cookie decides, exactly as on a direct call.
        elif any(name in metadata for name in IDENTITY_HEADERS):
            # Only the gateway may assert an identity by header; a direct caller must present a token.
            raise Unauthenticated(
                "Identity headers are accepted only from the gateway.",
                reason="UNTRUSTED_IDENTITY",
                metadata={"cause": "identity_headers"},
            )
        try:
            return await self._from_credential(metadata, method)
        except (Unauthenticated, PermissionDenied) as error:
            return Identity(credential_error=error)

    async def _from_credential(self, metadata: Mapping[str, str], method: str) -> Identity:
        """The identity the request's own bearer token or access cookie proves, or anonymous."""
        credential = presented_credential(metadata)
        if credential is None:
            return ANONYMOUS
        if credential.kind == "api_key":
            # Keys are checked with the auth service, per request and cached, by the gateway only.
            raise invalid_token(
                "API keys are accepted through the gateway only; call a service with an access token.",
                "malformed",
            )
        identity = await self._token_verifier.verify(credential.secret)
        if credential.kind == "jwt":
            return identity
        if not self._is_safe_method(method):
            check_csrf(*double_submitted_csrf(metadata))
        return replace(identity, auth_method="cookie")

    async def _from_gateway_headers(self, metadata: Mapping[str, str]) -> Identity:
        """The identity the gateway vouches for. One that rests on an access token (auth method jwt,
        jwt_authn's default, or cookie) must come with the token's time claims, and passes the token
        rules Envoy cannot apply (`apply_to_vouched_claims`): a claim the token lacked, a lifetime
        over the cap, a time in the future, an expiry Envoy let through within its clock skew, or a
        revoked session or user leaves the caller anonymous with that refusal, as on a direct call."""
        auth_method = metadata.get(AUTH_METHOD_HEADER) or "jwt"
        identity = Identity(
            user_id=metadata[USER_ID_HEADER],
            session_id=metadata.get(SESSION_ID_HEADER, ""),
            plan=metadata.get(PLAN_HEADER, ""),
            roles=decode_roles_header(metadata.get(ROLES_HEADER, "")),
            auth_method=auth_method,
        )
        if auth_method == API_KEY_AUTH_METHOD:
            return identity
        if auth_method not in TOKEN_AUTH_METHODS:
            raise _gateway_fault(f"The gateway's auth method {auth_method!r} is not one services know.")
        claims: dict[str, object] = {"sub": identity.user_id, "sid": identity.session_id}
        for header, claim in TOKEN_TIME_HEADERS:
            value = metadata.get(header, "")
            if not value:
                continue  # the token lacked the claim: the rules refuse it as such
            if not (value.isascii() and value.isdigit()):
                raise _gateway_fault(f"The gateway's {header} header is not a number of seconds.")
            claims[claim] = int(value)
        try:
            await apply_to_vouched_claims(claims, now=self._clock(), revocations=self._revocations)
        except Unauthenticated as error:
            return Identity(credential_error=error)
        return identity


def _gateway_fault(message: str) -> Unauthenticated:
    """Identity headers no gateway of ours sets: refused outright, like a forged identity."""
    return Unauthenticated(message, reason="UNTRUSTED_IDENTITY", metadata={"cause": "identity_headers"})


def encode_roles_header(roles: Iterable[str]) -> str:
    """The identity header's roles: base64 of their JSON array, which is how Envoy's jwt_authn
    copies the token's `roles` claim, so every credential yields the same format."""
    return base64.b64encode(json.dumps(list(roles), separators=(",", ":")).encode()).decode()


# Every call through the gateway carries this header and a handful of values cover every caller:
# decoded once each instead of base64 and JSON on every call. Refusals raise, so are never cached.
@functools.lru_cache(maxsize=256)
def decode_roles_header(value: str) -> frozenset[str]:
    """Roles from `encode_roles_header`'s format; anything else is a gateway fault, refused loudly."""
    if not value:
        return frozenset()
    try:
        roles = json.loads(base64.b64decode(value, validate=True))
    except (ValueError, binascii.Error) as error:
        raise _gateway_fault("The gateway's roles header is not base64 JSON.") from error
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise _gateway_fault("The gateway's roles header is not a list of names.")
    return frozenset(roles)
